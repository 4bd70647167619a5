import NIOCore

/// Bounds what decoding one message may cost, checked on the raw bytes before the message is
/// decoded: a frame may hold up to its cap in bytes, but 10 million empty records fit in 20 MB
/// and would cost gigabytes as decoded values. The scan counts the fields of the envelope's body
/// and of each message directly inside it (a batch's records, a command's blocks), skipping
/// every byte string by its length, and refuses a message past the budget.
public enum MessageBudget {
    /// Fields counted in one message at most: a full replication batch (16,384 records of a
    /// few fields each) fits with room to spare.
    public static let maxFields = 262_144

    public static func check(_ frame: ByteBuffer) throws {
        var budget = maxFields
        try frame.withUnsafeReadableBytes { bytes in
            var envelope = WireReader(bytes[...])
            while let field = try envelope.next() {
                // The body is the one length-delimited field of the envelope (numbers 10 and up).
                guard field.number >= 10, case .bytes(let body) = field.value else { continue }
                try count(body, depth: 1, budget: &budget)
            }
        }
    }

    /// Counts the fields of `message` and, one level down, of any length-delimited field that
    /// reads as a message (a byte string that happens to read as one only costs more budget).
    private static func count(_ message: Slice<UnsafeRawBufferPointer>, depth: Int, budget: inout Int) throws {
        var reader = WireReader(message)
        while let field = try reader.next() {
            budget -= 1
            guard budget >= 0 else {
                throw FerryError(.protocolViolation, "a message with more than \(maxFields) fields is refused before it is decoded")
            }
            if depth > 0, case .bytes(let inner) = field.value, WireReader.isMessage(inner) {
                try count(inner, depth: depth - 1, budget: &budget)
            }
        }
    }
}

/// Reads protobuf wire format field by field without decoding values into messages.
struct WireReader {
    enum Value {
        case scalar
        case bytes(Slice<UnsafeRawBufferPointer>)
    }

    private var rest: Slice<UnsafeRawBufferPointer>

    init(_ bytes: Slice<UnsafeRawBufferPointer>) { rest = bytes }

    /// The next field, nil at the end; malformed input throws.
    mutating func next() throws -> (number: UInt64, value: Value)? {
        guard !rest.isEmpty else { return nil }
        let key = try varint()
        let number = key >> 3
        guard number > 0 else { throw Self.malformed }
        switch key & 7 {
        case 0: _ = try varint(); return (number, .scalar)
        case 1: try skip(8); return (number, .scalar)
        case 5: try skip(4); return (number, .scalar)
        case 2:
            let length = try varint()
            guard length <= UInt64(rest.count) else { throw Self.malformed }
            let start = rest.startIndex
            let value = rest[start..<start + Int(length)]
            rest = rest[(start + Int(length))...]
            return (number, .bytes(value))
        default:
            // Groups (3, 4) are not used by proto3 and never sent by Ferry.
            throw Self.malformed
        }
    }

    /// Whether `bytes` parse as a sequence of well-formed fields.
    static func isMessage(_ bytes: Slice<UnsafeRawBufferPointer>) -> Bool {
        var reader = WireReader(bytes)
        do {
            while try reader.next() != nil {}
            return true
        } catch {
            return false
        }
    }

    static let malformed = FerryError(.protocolViolation, "malformed message: not protobuf wire format")

    private mutating func varint() throws -> UInt64 {
        var value: UInt64 = 0
        var shift: UInt64 = 0
        while let byte = rest.first {
            rest = rest.dropFirst()
            guard shift < 64 else { throw Self.malformed }
            value |= UInt64(byte & 0x7F) << shift
            if byte & 0x80 == 0 { return value }
            shift += 7
        }
        throw Self.malformed
    }

    private mutating func skip(_ n: Int) throws {
        guard rest.count >= n else { throw Self.malformed }
        rest = rest.dropFirst(n)
    }
}
