import NIOCore
import SwiftProtobuf

extension Ferry_V1_Envelope {
    /// Decodes one frame. Unknown fields are kept, so a newer peer's additions do not fail here;
    /// a frame that is not a valid Envelope is a protocol violation.
    public init(frame: ByteBuffer) throws {
        try MessageBudget.check(frame)
        do {
            try self.init(serializedBytes: ProtobufBytes(frame))
        } catch {
            throw FerryError(.protocolViolation, "malformed message (\(frame.readableBytes) bytes): \(error)")
        }
    }

    /// Serializes into a buffer ready to hand to the frame encoder.
    public func frame(allocator: ByteBufferAllocator = ByteBufferAllocator()) throws -> ByteBuffer {
        let bytes: ProtobufBytes = try serializedBytes()
        return bytes.buffer
    }

    /// A short name of the body, for logs and errors.
    public var bodyName: String {
        switch body {
        case .none: return "unknown"
        case .hello: return "hello"
        case .welcome: return "welcome"
        case .heartbeat: return "heartbeat"
        case .goodbye: return "goodbye"
        case .error: return "error"
        case .inventoryUpdate: return "inventory-update"
        case .command: return "command"
        case .commandResult: return "command-result"
        case .enrollRequest: return "enroll-request"
        case .enrollResponse: return "enroll-response"
        case .renewRequest: return "renew-request"
        case .renewResponse: return "renew-response"
        case .replicationBatch: return "replication-batch"
        case .replicationAck: return "replication-ack"
        case .resyncHashes: return "resync-hashes"
        case .resyncDiff: return "resync-diff"
        case .volumeReport: return "volume-report"
        case .recoveryReport: return "recovery-report"
        }
    }

    public static func with(id: UInt64 = 0, inReplyTo: UInt64 = 0, _ body: Ferry_V1_Envelope.OneOf_Body) -> Self {
        var e = Self()
        e.id = id
        e.inReplyTo = inReplyTo
        e.body = body
        return e
    }
}

/// A ByteBuffer as SwiftProtobuf's bag of bytes: a message serializes straight into it and parses
/// straight from it, with no intermediate array (replication frames carry megabytes).
struct ProtobufBytes: SwiftProtobufContiguousBytes {
    var buffer: ByteBuffer

    init(_ buffer: ByteBuffer) { self.buffer = buffer }

    init(repeating: UInt8, count: Int) {
        buffer = ByteBufferAllocator().buffer(capacity: count)
        buffer.writeRepeatingByte(repeating, count: count)
    }

    init<S: Sequence>(_ sequence: S) where S.Element == UInt8 {
        buffer = ByteBufferAllocator().buffer(capacity: sequence.underestimatedCount)
        buffer.writeBytes(sequence)
    }

    var count: Int { buffer.readableBytes }

    func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try buffer.withUnsafeReadableBytes(body)
    }

    mutating func withUnsafeMutableBytes<R>(_ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows -> R {
        try buffer.withUnsafeMutableReadableBytes(body)
    }
}
