import FerryWire
import Foundation
import NIOCore
import Testing

@Suite("Unit MessageBudget")
struct MessageBudgetTests {
    /// An Envelope whose body is a ReplicationBatch of `count` empty records, built on the wire
    /// by hand (field 100 of the envelope, field 3 of the batch, each record 0 bytes long).
    static func emptyRecordsBatch(count: Int) -> [UInt8] {
        func varint(_ v: Int) -> [UInt8] {
            var v = UInt64(v), out: [UInt8] = []
            repeat {
                out.append(UInt8(v & 0x7F) | (v > 0x7F ? 0x80 : 0))
                v >>= 7
            } while v > 0
            return out
        }
        var body = [UInt8](repeating: 0, count: count * 2)
        for i in 0..<count { body[2 * i] = 0x1A }
        return varint(100 << 3 | 2) + varint(body.count) + body
    }

    @Test("ten million empty records are refused from the raw bytes, quickly, before any is decoded")
    func floodRefused() throws {
        let frame = ByteBuffer(bytes: Self.emptyRecordsBatch(count: 10_000_000))
        let started = ContinuousClock.now
        #expect(throws: FerryError.self) { try Ferry_V1_Envelope(frame: frame) }
        do {
            _ = try Ferry_V1_Envelope(frame: frame)
        } catch let error as FerryError {
            #expect(error.code == .protocolViolation && error.message.contains("before it is decoded"), "\(error)")
        }
        // The message above proves it was refused before decoding; this only catches a hang.
        #expect(ContinuousClock.now - started < .seconds(60))
    }

    @Test("a full replication batch (16,384 records with attached bytes) and every ordinary message pass")
    func ordinaryMessagesPass() throws {
        var batch = Ferry_V1_ReplicationBatch()
        batch.volume = "data"
        batch.epoch = .max
        batch.generation = 3
        batch.records = (0..<Attachments.maxCount).map { i in
            var r = Ferry_V1_ReplicationRecord()
            r.sequence = UInt64(i + 1)
            r.offset = UInt64(i) * 4096
            r.capturedUnixNanos = .max
            if i % 3 == 0 { r.zeroLength = 4096 } else if i % 3 == 1 { r.attachedLength = 4096 } else { r.data = Data(repeating: 0x0A, count: 512) }
            return r
        }
        let envelope = Ferry_V1_Envelope.with(id: 9, .replicationBatch(batch))
        let decoded = try Ferry_V1_Envelope(frame: try envelope.frame())
        #expect(decoded == envelope)
        var hashes = Ferry_V1_ResyncHashes()
        hashes.hashes = (0..<BlockHashing.maxBlocks).map { _ in Data((0..<16).map { _ in UInt8.random(in: 0...255) }) }
        let h = Ferry_V1_Envelope.with(.resyncHashes(hashes))
        #expect(try Ferry_V1_Envelope(frame: try h.frame()) == h)
    }

    @Test("malformed wire bytes are refused with a clear error, never a trap")
    func malformed() {
        for bytes: [UInt8] in [[0xA2, 0x06, 0xFF], [0x08], [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF], [0x0B], [0x00, 0x00],
                               [0xA2, 0x06, 0x02, 0x1A, 0x7F], [0xA2, 0x06] + [UInt8](repeating: 0xFF, count: 12)] {
            #expect(throws: FerryError.self, "\(bytes)") { try Ferry_V1_Envelope(frame: ByteBuffer(bytes: bytes)) }
        }
    }
}
