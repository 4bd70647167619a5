import FerryWire
import NIOCore
import NIOEmbedded
import NIOTestUtils
import Testing

@Suite("Unit FrameCodec")
struct UnitFrameCodecTests {
    /// A frame as it is on the wire: 4-byte big-endian length, then the body.
    static func wireFrame(_ body: [UInt8]) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.writeInteger(UInt32(body.count))
        buffer.writeBytes(body)
        return buffer
    }

    static func body(_ count: Int) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ count) }
    }

    static func header(_ length: UInt32) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.writeInteger(length)
        return buffer
    }

    @Test("decoder passes ByteToMessageDecoderVerifier for frames of many sizes, empty body included")
    func verifier() throws {
        let sizes = [0, 1, 2, 3, 4, 5, 0, 7, 63, 255, 256, 1_000, 4_099, 9_000]
        let pairs: [(ByteBuffer, [ByteBuffer])] = sizes.map { n in
            let body = Self.body(n)
            return (Self.wireFrame(body), [ByteBuffer(bytes: body)])
        }
        try ByteToMessageDecoderVerifier.verifyDecoder(inputOutputPairs: pairs) {
            FrameDecoder(limit: FrameLimit(FrameSize.unauthenticated))
        }
    }

    @Test("a frame exactly at the limit is accepted")
    func frameAtLimit() throws {
        let body = Self.body(1_000)
        try ByteToMessageDecoderVerifier.verifyDecoder(inputOutputPairs: [(Self.wireFrame(body), [ByteBuffer(bytes: body)])]) {
            FrameDecoder(limit: FrameLimit(1_000))
        }
    }

    @Test("a length over the limit fails on the 4th header byte, with no body sent", arguments: [1_025, 64 * 1024, .max] as [UInt32])
    func oversizedHeaderRejectedImmediately(length: UInt32) throws {
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(FrameDecoder(limit: FrameLimit(1_024))))
        let header = Self.header(length)
        // The first three bytes are not enough to know the length: nothing happens.
        for i in 0..<3 {
            try channel.writeInbound(header.getSlice(at: i, length: 1)!)
            #expect(try channel.readInbound(as: ByteBuffer.self) == nil)
        }
        // The fourth completes the header: rejected at once, although not one body byte arrived.
        let error = #expect(throws: FerryError.self) {
            try channel.writeInbound(header.getSlice(at: 3, length: 1)!)
        }
        #expect(error?.code == .frameTooLarge)
        #expect(try channel.readInbound(as: ByteBuffer.self) == nil)
        _ = try? channel.finish()
    }

    @Test("a whole header in one write over the limit is rejected")
    func oversizedHeaderInOneWrite() throws {
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(FrameDecoder(limit: FrameLimit(FrameSize.unauthenticated))))
        let error = #expect(throws: FerryError.self) {
            try channel.writeInbound(Self.header(UInt32(FrameSize.unauthenticated + 1)))
        }
        #expect(error?.code == .frameTooLarge)
        _ = try? channel.finish()
    }

    @Test("FrameLimit.set on a live channel applies to the next frame, both up and down")
    func limitChangesTakeEffect() throws {
        let limit = FrameLimit(16)
        #expect(limit.current == 16)
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(FrameDecoder(limit: limit)))

        let small = Self.body(16)
        try channel.writeInbound(Self.wireFrame(small))
        #expect(try channel.readInbound(as: ByteBuffer.self) == ByteBuffer(bytes: small))

        limit.set(128)
        #expect(limit.current == 128)
        let large = Self.body(100)
        try channel.writeInbound(Self.wireFrame(large))
        #expect(try channel.readInbound(as: ByteBuffer.self) == ByteBuffer(bytes: large))

        limit.set(64)
        let error = #expect(throws: FerryError.self) {
            try channel.writeInbound(Self.header(100))
        }
        #expect(error?.code == .frameTooLarge)
        _ = try? channel.finish()
    }

    @Test("a frame over a small limit is refused, the same frame passes a fresh decoder after raising the shared limit")
    func raisedLimitOnNewDecoder() throws {
        let limit = FrameLimit(10)
        let body = Self.body(50)
        let first = EmbeddedChannel()
        try first.pipeline.syncOperations.addHandler(ByteToMessageHandler(FrameDecoder(limit: limit)))
        #expect(throws: FerryError.self) { try first.writeInbound(Self.wireFrame(body)) }
        _ = try? first.finish()

        limit.set(50)
        let second = EmbeddedChannel()
        try second.pipeline.syncOperations.addHandler(ByteToMessageHandler(FrameDecoder(limit: limit)))
        try second.writeInbound(Self.wireFrame(body))
        #expect(try second.readInbound(as: ByteBuffer.self) == ByteBuffer(bytes: body))
        #expect(try second.finish().isClean)
    }

    @Test("FrameWriter output decodes back through FrameDecoder; a large frame goes out uncopied behind its own header",
          arguments: [0, 1, 4, 300, FrameWriter.copyLimit - 1, FrameWriter.copyLimit, 70_000])
    func writerRoundTrip(size: Int) throws {
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(FrameWriter())
        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(FrameDecoder(limit: FrameLimit(FrameSize.defaultAuthenticated))))

        let body = Self.body(size)
        try channel.writeOutbound(ByteBuffer(bytes: body))
        var wire = try #require(try channel.readOutbound(as: ByteBuffer.self))
        if size >= FrameWriter.copyLimit {
            // Header alone, then the frame itself.
            #expect(wire.readableBytes == FrameSize.headerBytes)
            var payload = try #require(try channel.readOutbound(as: ByteBuffer.self))
            wire.writeBuffer(&payload)
        }
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)
        #expect(wire.readableBytes == FrameSize.headerBytes + size)
        #expect(wire.getInteger(at: wire.readerIndex, as: UInt32.self) == UInt32(size))
        #expect(Array(wire.readableBytesView.dropFirst(FrameSize.headerBytes)) == body)

        try channel.writeInbound(wire)
        let decoded = try #require(try channel.readInbound(as: ByteBuffer.self))
        #expect(Array(decoded.readableBytesView) == body)
        #expect(try channel.readInbound(as: ByteBuffer.self) == nil)
        #expect(try channel.finish().isClean)
    }

    @Test("several encoded envelopes in one inbound write come out as separate envelopes")
    func envelopesThroughCodec() throws {
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(FrameWriter())
        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(FrameDecoder(limit: FrameLimit(FrameSize.unauthenticated))))

        var goodbye = Ferry_V1_Goodbye()
        goodbye.reason = "shutting down"
        var heartbeat = Ferry_V1_Heartbeat()
        heartbeat.sentUnixMs = 1_700_000_000_123
        let envelopes: [Ferry_V1_Envelope] = [
            .with(id: 1, .heartbeat(heartbeat)),
            .with(id: 2, inReplyTo: 1, .goodbye(goodbye)),
            Ferry_V1_Envelope(),
        ]
        var joined = ByteBuffer()
        for e in envelopes {
            try channel.writeOutbound(try e.frame())
            var wire = try #require(try channel.readOutbound(as: ByteBuffer.self))
            joined.writeBuffer(&wire)
        }
        try channel.writeInbound(joined)
        for e in envelopes {
            let frame = try #require(try channel.readInbound(as: ByteBuffer.self))
            #expect(try Ferry_V1_Envelope(frame: frame) == e)
        }
        #expect(try channel.finish().isClean)
    }
}
