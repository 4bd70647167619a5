@testable import FerryCLICore
@testable import FerryControllerCore
import FerryWire
import NIOCore
import Testing

@Suite("Unit WAN mode: token buckets, limits per host and for all, frame compression, rates")
struct UnitWANTests {
    @Test("a bucket lets its burst through at once, then makes each reservation wait its transmission time at the rate; a new rate applies from then on")
    func tokenBucket() {
        let t0 = ContinuousClock.now
        var bucket = TokenBucket(bytesPerSecond: 1_000_000, now: t0)   // burst: 100 kB
        #expect(bucket.reserve(100_000, now: t0) == .zero)
        // The next 500 kB wait half a second; the 500 kB after them another half.
        #expect(bucket.reserve(500_000, now: t0) == .milliseconds(500))
        #expect(bucket.reserve(500_000, now: t0) == .seconds(1))
        // A second later 1 MB has refilled: what was owed is paid and nothing saved.
        #expect(bucket.reserve(0, now: t0 + .seconds(1)) == .zero)
        #expect(bucket.reserve(1000, now: t0 + .seconds(1)) == .milliseconds(1))
        // Idle for long: saved up to the burst only.
        #expect(bucket.reserve(100_000, now: t0 + .seconds(60)) == .zero)
        #expect(bucket.reserve(100_000, now: t0 + .seconds(60)) == .milliseconds(100))
        // Twice the rate: the same debt clears in half the time.
        bucket.setRate(2_000_000, now: t0 + .seconds(60))
        #expect(bucket.reserve(200_000, now: t0 + .seconds(60)) == .milliseconds(150))
    }

    @Test("a host's limit and the limit for all hosts both apply, each direction on its own; removing a limit lifts it; compression falls back to all hosts' setting")
    func limiter() {
        let wan = WANLimiter()
        let t0 = ContinuousClock.now
        #expect(wan.reserve(hostID: "a", .inbound, bytes: 10 << 20, now: t0) == .zero)
        wan.set(hostID: nil, API.WANRule(limitBytesPerSecond: 1_000_000))
        wan.set(hostID: "a", API.WANRule(limitBytesPerSecond: 250_000, compression: .lz4))
        // a: its own bucket (burst 64 KiB) is the tighter one.
        let waitA = wan.reserve(hostID: "a", .inbound, bytes: 65536 + 250_000, now: t0)
        #expect(waitA == .seconds(1))
        // b has no limit of its own; all hosts' bucket already carries a's 315,536 bytes.
        let waitB = wan.reserve(hostID: "b", .inbound, bytes: 100_000, now: t0)
        #expect(waitB > .milliseconds(300) && waitB < .milliseconds(320), "\(waitB)")
        // The other direction is untouched.
        #expect(wan.reserve(hostID: "a", .outbound, bytes: 65536, now: t0) == .zero)
        wan.set(hostID: "a", API.WANRule(compression: .lz4))
        wan.set(hostID: nil, API.WANRule())
        #expect(wan.reserve(hostID: "a", .inbound, bytes: 100 << 20, now: t0) == .zero)
        #expect(wan.compression(hostID: "a") == .lz4 && wan.compression(hostID: "b") == .none)
        wan.set(hostID: nil, API.WANRule(compression: .lz4))
        #expect(wan.compression(hostID: "b") == .lz4)
    }

    @Test("frames compress on their own and round-trip; one that does not shrink travels as is; every decompressed size is checked before any work")
    func frames() throws {
        let allocator = ByteBufferAllocator()
        let text = ByteBuffer(string: String(repeating: "INSERT INTO orders VALUES (42, 'widget', 3.50);\n", count: 2000))
        var random = allocator.buffer(capacity: 64 << 10)
        for _ in 0..<(64 << 10) / 8 { random.writeInteger(UInt64.random(in: 0...UInt64.max)) }
        let outcome = AttachedFrameCompression.compress([text, random], allocator: allocator)
        #expect(outcome.sizes == [UInt32(text.readableBytes), UInt32(random.readableBytes)])
        #expect(outcome.frames[0].readableBytes < text.readableBytes / 10)
        #expect(outcome.frames[1] == random, "incompressible data travels as is")
        #expect(outcome.inBytes == text.readableBytes + random.readableBytes)
        #expect(outcome.outBytes == outcome.frames[0].readableBytes + random.readableBytes)
        let back = try AttachedFrameCompression.decompress(outcome.frames, sizes: outcome.sizes, maxFrameBytes: 1 << 20, allocator: allocator)
        #expect(back == [text, random])

        func refused(_ frames: [ByteBuffer], _ sizes: [UInt32], max: Int = 1 << 20) -> String {
            do {
                _ = try AttachedFrameCompression.decompress(frames, sizes: sizes, maxFrameBytes: max, allocator: allocator)
                return "accepted"
            } catch let error as FerryError { return error.message } catch { return "\(error)" }
        }
        let block = outcome.frames[0], size = outcome.sizes[0]
        #expect(refused([block], []).contains("0 decompressed sizes for 1"))
        #expect(refused([block], [size], max: Int(size) - 1).contains("frame limit"))
        #expect(refused([block], [size - 1]).contains("corrupt"))
        #expect(refused([block], [size + 1]).contains("corrupt"))
        #expect(refused([ByteBuffer()], [10]).contains("empty attached frame"))
        #expect(refused([random], [UInt32(random.readableBytes) - 1]).contains("claims only"))
        // A block cut short. (LZ4 blocks carry no checksum: a corrupted literal that still expands
        // to the stated size is the sender's own data, which only it could have sent over its TLS.)
        #expect(refused([block.getSlice(at: block.readerIndex, length: block.readableBytes / 2)!], [size]).contains("corrupt"))
        #expect(refused(Array(repeating: block, count: 3), Array(repeating: UInt32(30 << 20), count: 3), max: 40 << 20).contains("over"))
    }

    @Test("rates: bits with kbit/mbit/gbit, bytes with KB/s MB/s GB/s, none; anything else refused")
    func rates() throws {
        #expect(try WANCommand.rate("100mbit") == 12_500_000)
        #expect(try WANCommand.rate("500kbit") == 62_500)
        #expect(try WANCommand.rate("1gbit") == 125_000_000)
        #expect(try WANCommand.rate("12.5MB/s") == 12_500_000)
        #expect(try WANCommand.rate("none") == 0)
        for bad in ["100", "fast", "-5mbit", "0mbit", "nanmbit", "1e30gbit", "mbit"] {
            #expect(throws: FerryError.self, "\(bad)") { try WANCommand.rate(bad) }
        }
    }
}
