@testable import FerryAgentCore
@testable import FerryNBD
import FerryWire
import Foundation
import NIOCore
import NIOPosix
import Testing

/// A hand-rolled NBD client that can misbehave: requests past the end, unknown commands, huge
/// lengths, options out of order, vanishing mid-request.
struct RawNBDClient {
    let channel: NIOAsyncChannel<ByteBuffer, ByteBuffer>

    static func connect(_ socket: String) async throws -> RawNBDClient {
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connect(unixDomainSocketPath: socket) { channel in
                channel.eventLoop.makeCompletedFuture { try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel) }
            }
        return RawNBDClient(channel: channel)
    }

    /// Runs `body` with a reader and writer; the connection is closed afterwards.
    func session<T: Sendable>(_ body: (inout InboundReader, NIOAsyncChannelOutboundWriter<ByteBuffer>) async throws -> T) async throws -> T {
        try await channel.executeThenClose { inbound, outbound in
            var reader = InboundReader(inbound.makeAsyncIterator())
            return try await body(&reader, outbound)
        }
    }

    /// Greeting, fixed newstyle, then GO for `name` (structured replies off). Returns the export size.
    static func handshake(_ reader: inout InboundReader, _ out: NIOAsyncChannelOutboundWriter<ByteBuffer>, name: String = "vol") async throws -> UInt64 {
        var greeting = try await reader.read(18)
        #expect(greeting.readInteger(as: UInt64.self) == NBD.initMagic)
        #expect(greeting.readInteger(as: UInt64.self) == NBD.optionMagic)
        var flags = ByteBuffer()
        flags.writeInteger(NBD.ClientFlag.fixedNewstyle | NBD.ClientFlag.noZeroes)
        try await out.write(flags)
        var go = ByteBuffer()
        go.writeInteger(UInt32(name.utf8.count))
        go.writeString(name)
        go.writeInteger(UInt16(0))
        try await out.write(option(NBD.Option.go.rawValue, go))
        var size: UInt64 = 0
        while true {
            var header = try await reader.read(20)
            _ = header.readInteger(as: UInt64.self)
            _ = header.readInteger(as: UInt32.self)
            let type = header.readInteger(as: UInt32.self)!
            let length = Int(header.readInteger(as: UInt32.self)!)
            var data = try await reader.read(length)
            if type == NBD.Reply.info, data.readInteger(as: UInt16.self) == NBD.Info.export { size = data.readInteger(as: UInt64.self)! }
            if type == NBD.Reply.ack { return size }
            guard type & (1 << 31) == 0 else { throw FerryError(.badRequest, "GO refused with \(type)") }
        }
    }

    static func option(_ option: UInt32, _ data: ByteBuffer = ByteBuffer()) -> ByteBuffer {
        var b = ByteBuffer()
        b.writeInteger(NBD.optionMagic)
        b.writeInteger(option)
        b.writeInteger(UInt32(data.readableBytes))
        b.writeImmutableBuffer(data)
        return b
    }

    static func request(_ command: UInt16, cookie: UInt64, offset: UInt64, length: UInt32, flags: UInt16 = 0) -> ByteBuffer {
        var b = ByteBuffer()
        b.writeInteger(NBD.requestMagic)
        b.writeInteger(flags)
        b.writeInteger(command)
        b.writeInteger(cookie)
        b.writeInteger(offset)
        b.writeInteger(length)
        return b
    }

    /// A simple reply: (error, cookie).
    static func reply(_ reader: inout InboundReader) async throws -> (error: UInt32, cookie: UInt64) {
        var r = try await reader.read(16)
        #expect(r.readInteger(as: UInt32.self) == NBD.simpleReplyMagic)
        return (r.readInteger(as: UInt32.self)!, r.readInteger(as: UInt64.self)!)
    }
}

@Suite("NBD export bad input")
struct NBDBadInputTests {
    @Test("past the end, unknown command, oversized read, an empty write: the NBD answer, and the connection goes on")
    func errorsKeepTheConnection() async throws {
        let export = try await NBDExportTests.Export(size: 8 << 20)
        let client = try await RawNBDClient.connect(export.socket)
        try await client.session { reader, out in
            let size = try await RawNBDClient.handshake(&reader, out)
            #expect(size == 8 << 20)
            try await out.write(RawNBDClient.request(NBD.Command.read.rawValue, cookie: 1, offset: size - 512, length: 4096))
            #expect(try await RawNBDClient.reply(&reader) == (NBD.Errno.invalid.rawValue, 1))
            // A write past the end: its payload is consumed, the error returned, nothing applied.
            var write = RawNBDClient.request(NBD.Command.write.rawValue, cookie: 2, offset: size, length: 4096)
            write.writeRepeatingByte(0xEE, count: 4096)
            try await out.write(write)
            #expect(try await RawNBDClient.reply(&reader) == (NBD.Errno.noSpace.rawValue, 2))
            try await out.write(RawNBDClient.request(42, cookie: 3, offset: 0, length: 0))
            #expect(try await RawNBDClient.reply(&reader) == (NBD.Errno.invalid.rawValue, 3))
            try await out.write(RawNBDClient.request(NBD.Command.read.rawValue, cookie: 4, offset: 0, length: 64 << 20))
            #expect(try await RawNBDClient.reply(&reader) == (NBD.Errno.overflow.rawValue, 4))
            // An offset that would wrap around 2^64.
            try await out.write(RawNBDClient.request(NBD.Command.trim.rawValue, cookie: 5, offset: UInt64.max - 10, length: 4096))
            #expect(try await RawNBDClient.reply(&reader).error == NBD.Errno.noSpace.rawValue)
            // An empty write succeeds and records nothing (an empty record would stall replication).
            try await out.write(RawNBDClient.request(NBD.Command.write.rawValue, cookie: 8, offset: 0, length: 0))
            #expect(try await RawNBDClient.reply(&reader) == (0, 8))
            // Still served: a good write and read.
            var good = RawNBDClient.request(NBD.Command.write.rawValue, cookie: 6, offset: 4096, length: 512)
            good.writeRepeatingByte(0x5A, count: 512)
            try await out.write(good)
            #expect(try await RawNBDClient.reply(&reader) == (0, 6))
            try await out.write(RawNBDClient.request(NBD.Command.read.rawValue, cookie: 7, offset: 4096, length: 512))
            #expect(try await RawNBDClient.reply(&reader) == (0, 7))
            let data = try await reader.read(512)
            #expect(data.readableBytesView.allSatisfy { $0 == 0x5A })
        }
        #expect(export.recorder.changes.count == 1)
    }

    @Test("a write over 32 MiB, a request before negotiation ends, bad magic: that connection closes, others go on")
    func violationsClose() async throws {
        let export = try await NBDExportTests.Export(size: 8 << 20)
        // Over the maximum payload: closed without reading it.
        let huge = try await RawNBDClient.connect(export.socket)
        let hugeClosed = try await huge.session { reader, out in
            _ = try await RawNBDClient.handshake(&reader, out)
            try await out.write(RawNBDClient.request(NBD.Command.write.rawValue, cookie: 1, offset: 0, length: 64 << 20))
            do { _ = try await reader.read(1); return false } catch { return true }
        }
        #expect(hugeClosed)

        // A transmission request where an option belongs.
        let early = try await RawNBDClient.connect(export.socket)
        let earlyClosed = try await early.session { reader, out in
            _ = try await reader.read(18)
            var flags = ByteBuffer()
            flags.writeInteger(NBD.ClientFlag.fixedNewstyle)
            try await out.write(flags)
            try await out.write(RawNBDClient.request(NBD.Command.read.rawValue, cookie: 1, offset: 0, length: 512))
            do { _ = try await reader.read(1); return false } catch { return true }
        }
        #expect(earlyClosed)

        // Unknown options are refused politely, then negotiation continues.
        let polite = try await RawNBDClient.connect(export.socket)
        try await polite.session { reader, out in
            _ = try await reader.read(18)
            var flags = ByteBuffer()
            flags.writeInteger(NBD.ClientFlag.fixedNewstyle | NBD.ClientFlag.noZeroes)
            try await out.write(flags)
            try await out.write(RawNBDClient.option(99))
            var reply = try await reader.read(20)
            reply.moveReaderIndex(forwardBy: 12)
            #expect(reply.readInteger(as: UInt32.self) == NBD.Reply.errUnsupported)
            try await out.write(RawNBDClient.option(NBD.Option.abort.rawValue))
            var ack = try await reader.read(20)
            ack.moveReaderIndex(forwardBy: 12)
            #expect(ack.readInteger(as: UInt32.self) == NBD.Reply.ack)
        }

        // The export still works for a real client.
        let r = try await run("/usr/bin/qemu-io", ["-f", "raw", export.uri, "-c", "write -P 0x42 0 64k", "-c", "read -P 0x42 0 64k"])
        #expect(r.status == 0, "\(r)")
    }

    @Test("past the connection limit a new client is closed at once; the ones being served go on, and a freed place is taken again")
    func connectionLimit() async throws {
        let export = try await NBDExportTests.Export(size: 8 << 20, maxConnections: 2)
        func refused() async throws -> Bool {
            let client = try await RawNBDClient.connect(export.socket)
            return try await client.session { reader, _ in
                do { _ = try await reader.read(18); return false } catch { return true }
            }
        }
        let first = try await RawNBDClient.connect(export.socket)
        let second = try await RawNBDClient.connect(export.socket)
        try await first.session { reader, out in
            let size = try await RawNBDClient.handshake(&reader, out)
            #expect(size == 8 << 20)
            try await second.session { reader2, out2 in
                let size2 = try await RawNBDClient.handshake(&reader2, out2)
                #expect(size2 == 8 << 20)
                let third = try await refused()
                #expect(third)
            }
            // The first is still served.
            try await out.write(RawNBDClient.request(NBD.Command.read.rawValue, cookie: 9, offset: 0, length: 4096))
            let reply = try await RawNBDClient.reply(&reader)
            #expect(reply.error == 0 && reply.cookie == 9)
        }
        // Both closed: a new client is served again once the server has seen them go.
        var served = false
        for _ in 0..<50 where !served {
            served = try await !refused()
            if !served { try await Task.sleep(for: .milliseconds(100)) }
        }
        #expect(served)
    }

    @Test("a client vanishing mid-write: nothing partial is applied or captured")
    func vanishingClient() async throws {
        let export = try await NBDExportTests.Export(size: 8 << 20)
        let client = try await RawNBDClient.connect(export.socket)
        try await client.session { reader, out in
            _ = try await RawNBDClient.handshake(&reader, out)
            var partial = RawNBDClient.request(NBD.Command.write.rawValue, cookie: 1, offset: 0, length: 1 << 20)
            partial.writeRepeatingByte(0x77, count: 300 * 1024)
            try await out.write(partial)
            // Closing here (leaving the session) drops the rest of the payload.
        }
        try await Task.sleep(for: .milliseconds(300))
        #expect(export.recorder.changes.isEmpty)
        let image = try #require(FileManager.default.contents(atPath: export.image))
        #expect(!image.contains(0x77))
        let r = try await run("/usr/bin/nbdinfo", [export.uri])
        #expect(r.status == 0, "\(r)")
    }
}

/// The test client's reader: exact byte counts from a NIO connection's inbound stream.
struct InboundReader {
    struct EndOfStream: Error {}

    private var iterator: NIOAsyncChannelInboundStream<ByteBuffer>.AsyncIterator
    private var buffer = ByteBuffer()

    init(_ iterator: NIOAsyncChannelInboundStream<ByteBuffer>.AsyncIterator) { self.iterator = iterator }

    mutating func read(_ count: Int) async throws -> ByteBuffer {
        if buffer.readableBytes >= count { return buffer.readSlice(length: count)! }
        // Assemble into a buffer sized for the whole request: each byte is copied once, and
        // never into storage a slice handed out earlier still shares (that would copy it all).
        var assembled = buffer.readableBytes > 0 ? ByteBufferAllocator().buffer(capacity: count) : ByteBuffer()
        assembled.writeBuffer(&buffer)
        while assembled.readableBytes < count {
            guard var chunk = try await iterator.next() else { throw EndOfStream() }
            if assembled.readableBytes == 0 && (chunk.readableBytes >= count || assembled.capacity == 0) {
                assembled = chunk
                if assembled.readableBytes < count {
                    var grown = ByteBufferAllocator().buffer(capacity: count)
                    grown.writeBuffer(&assembled)
                    assembled = grown
                }
            } else {
                assembled.writeBuffer(&chunk)
            }
        }
        buffer = assembled
        return buffer.readSlice(length: count)!
    }

    /// Whether a whole transmission request (header, and payload for a write) is buffered
    /// already, so it can join the batch being formed without waiting.
    func hasWholeRequest() -> Bool {
        guard buffer.readableBytes >= NBDRequest.size,
              let type = buffer.getInteger(at: buffer.readerIndex + 6, as: UInt16.self),
              let length = buffer.getInteger(at: buffer.readerIndex + 24, as: UInt32.self)
        else { return false }
        return type != NBD.Command.write.rawValue || buffer.readableBytes >= NBDRequest.size + Int(length)
    }

    mutating func read<T: FixedWidthInteger>(_ type: T.Type) async throws -> T {
        var bytes = try await read(MemoryLayout<T>.size)
        return bytes.readInteger(as: T.self)!
    }
}
