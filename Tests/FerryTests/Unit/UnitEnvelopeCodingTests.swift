import FerryWire
import NIOCore
import Testing

@Suite("Unit EnvelopeCoding")
struct UnitEnvelopeCodingTests {
    /// Protobuf wire bytes of a length-delimited field.
    static func lengthDelimited(field: Int, _ payload: [UInt8]) -> [UInt8] {
        varint(UInt64(field << 3 | 2)) + varint(UInt64(payload.count)) + payload
    }

    static func varint(_ value: UInt64) -> [UInt8] {
        var v = value
        var out: [UInt8] = []
        repeat {
            var byte = UInt8(v & 0x7F)
            v >>= 7
            if v != 0 { byte |= 0x80 }
            out.append(byte)
        } while v != 0
        return out
    }

    static let malformed: [[UInt8]] = [
        [0x08],                                     // field 1 (varint) with no value
        [0x00],                                     // field number 0
        [0x0F],                                     // wire type 7 does not exist
        [0x52, 0x05, 0x08],                         // field 10 (hello) says 5 bytes, has 1
        [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF], // varint longer than 10 bytes
        Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8), // someone speaking HTTP to the agent port
    ]

    @Test("malformed bytes are a protocol violation", arguments: malformed)
    func malformedIsProtocolViolation(bytes: [UInt8]) {
        let error = #expect(throws: FerryError.self) {
            _ = try Ferry_V1_Envelope(frame: ByteBuffer(bytes: bytes))
        }
        #expect(error?.code == .protocolViolation)
        #expect(error?.wireCode == .protocolViolation)
    }

    @Test("an envelope round-trips through frame(), and only the readable bytes are decoded")
    func roundTrip() throws {
        var hb = Ferry_V1_Heartbeat()
        hb.sentUnixMs = 42
        let envelope = Ferry_V1_Envelope.with(id: 9, inReplyTo: 4, .heartbeat(hb))
        var frame = try envelope.frame()
        #expect(try Ferry_V1_Envelope(frame: frame) == envelope)
        #expect(envelope.bodyName == "heartbeat")

        // A decoder hands over a slice whose reader index is not 0: bytes before it must not count.
        var shifted = ByteBuffer(bytes: [0xFF, 0xFF, 0xFF])
        shifted.writeBuffer(&frame)
        shifted.moveReaderIndex(forwardBy: 3)
        #expect(try Ferry_V1_Envelope(frame: shifted) == envelope)
    }

    @Test("an unknown body field decodes with body == nil and keeps the unknown bytes", arguments: [23, 49, 150, 250, 399])
    func unknownBodyFieldIsKept(field: Int) throws {
        // An envelope from a newer peer: id and in_reply_to as today, a body this build does not know.
        var header = Ferry_V1_Envelope()
        header.id = 7
        header.inReplyTo = 3
        var bytes: [UInt8] = try header.serializedBytes()
        let future = Self.lengthDelimited(field: field, Self.lengthDelimited(field: 1, Array("batch-0001".utf8)))
        bytes += future

        let decoded = try Ferry_V1_Envelope(frame: ByteBuffer(bytes: bytes))
        #expect(decoded.id == 7)
        #expect(decoded.inReplyTo == 3)
        #expect(decoded.body == nil)
        #expect(decoded.bodyName == "unknown")
        #expect(Array(decoded.unknownFields.data) == future)
        // Re-serializing forwards the unknown field unchanged.
        let again: [UInt8] = try decoded.serializedBytes()
        #expect(again == bytes)
    }

    @Test("an unknown field next to a known body leaves the known body intact")
    func unknownFieldBesideKnownBody() throws {
        var goodbye = Ferry_V1_Goodbye()
        goodbye.reason = "bye"
        let envelope = Ferry_V1_Envelope.with(id: 1, .goodbye(goodbye))
        let extra = Self.varint(UInt64(9 << 3 | 0)) + Self.varint(12345) // field 9, varint: a header field no version uses yet
        let bytes: [UInt8] = try envelope.serializedBytes() + extra
        let decoded = try Ferry_V1_Envelope(frame: ByteBuffer(bytes: bytes))
        #expect(decoded.goodbye.reason == "bye")
        #expect(decoded.bodyName == "goodbye")
        #expect(Array(decoded.unknownFields.data) == extra)
    }

    @Test("an empty frame is a valid envelope with no body")
    func emptyFrame() throws {
        let decoded = try Ferry_V1_Envelope(frame: ByteBuffer())
        #expect(decoded.body == nil)
        #expect(decoded.id == 0)
    }
}
