import NIOCore
import Synchronization

/// The largest frame a peer may send, adjustable while the connection is open: small before the
/// peer has authenticated, larger once it has.
public final class FrameLimit: Sendable {
    private let bytes: Atomic<Int>

    public init(_ bytes: Int) { self.bytes = Atomic(bytes) }

    public var current: Int { bytes.load(ordering: .relaxed) }

    public func set(_ newValue: Int) { bytes.store(newValue, ordering: .relaxed) }
}

/// Frame sizes used on agent sessions.
public enum FrameSize {
    /// Cap before the peer has authenticated (enrollment requests are a few KiB).
    public static let unauthenticated = 64 * 1024
    /// Default cap for an authenticated session: a replication batch may carry one 32 MiB write
    /// (the largest NBD request) plus its envelope.
    public static let defaultAuthenticated = 40 * 1024 * 1024
    /// The least an authenticated cap may be set to, for the same reason.
    public static let minimumAuthenticated = 34 * 1024 * 1024
    /// Bytes of the length prefix.
    public static let headerBytes = 4
}

/// Splits a byte stream into frames of a 4-byte big-endian length followed by that many bytes.
///
/// A length over the limit is rejected as soon as the 4 header bytes arrive, before any of the
/// body is buffered.
public struct FrameDecoder: NIOSingleStepByteToMessageDecoder {
    public typealias InboundOut = ByteBuffer

    private let limit: FrameLimit

    public init(limit: FrameLimit) { self.limit = limit }

    public mutating func decode(buffer: inout ByteBuffer) throws -> ByteBuffer? {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return nil }
        let max = limit.current
        guard length <= max else {
            throw FerryError(.frameTooLarge, "frame of \(length) bytes exceeds the limit of \(max) bytes")
        }
        let whole = FrameSize.headerBytes + Int(length)
        guard buffer.readableBytes >= whole else {
            if buffer.readerIndex > 0 {
                // Frames already taken from this buffer are slices of it, still held (a batch's
                // attachments wait in the replica's queue): move this frame's first bytes to
                // storage of its own, sized for the whole frame, so the rest lands in place.
                var own = ByteBufferAllocator().buffer(capacity: whole)
                own.writeBuffer(&buffer)
                buffer = own
            } else if buffer.writableBytes < whole - buffer.readableBytes {
                // Room for the whole frame at once: the buffer would otherwise double (and
                // copy everything so far) several times while a large frame arrives.
                buffer.reserveCapacity(minimumWritableBytes: whole - buffer.readableBytes)
            }
            return nil
        }
        buffer.moveReaderIndex(forwardBy: FrameSize.headerBytes)
        return buffer.readSlice(length: Int(length))
    }

    /// Never: `decode` moves a partial frame to storage of its own instead. Reclaiming would
    /// copy the partial frame within storage the slices already handed out still share, which
    /// allocates and copies it again (a quarter of the controller's time at 500 MB/s).
    public func shouldReclaimBytes(buffer: ByteBuffer) -> Bool { false }

    public mutating func decodeLast(buffer: inout ByteBuffer, seenEOF: Bool) throws -> ByteBuffer? {
        // A partial frame at EOF is simply dropped: the peer went away mid-frame.
        try decode(buffer: &buffer)
    }
}

/// Prefixes each outbound frame with its 4-byte big-endian length.
///
/// A large frame (replication data) is not copied: its header goes out as a buffer of its own,
/// followed by the frame as it is. A small one is copied behind its header, so it costs one
/// write (and one TLS record) rather than two.
public final class FrameWriter: ChannelOutboundHandler, RemovableChannelHandler {
    public typealias OutboundIn = ByteBuffer
    public typealias OutboundOut = ByteBuffer

    /// Frames at least this long travel without a copy.
    public static let copyLimit = 16 * 1024

    public init() {}

    public func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let frame = unwrapOutboundIn(data)
        if frame.readableBytes < Self.copyLimit {
            var out = context.channel.allocator.buffer(capacity: FrameSize.headerBytes + frame.readableBytes)
            out.writeInteger(UInt32(frame.readableBytes))
            out.writeImmutableBuffer(frame)
            context.write(wrapOutboundOut(out), promise: promise)
        } else {
            var header = context.channel.allocator.buffer(capacity: FrameSize.headerBytes)
            header.writeInteger(UInt32(frame.readableBytes))
            context.write(wrapOutboundOut(header), promise: nil)
            context.write(wrapOutboundOut(frame), promise: promise)
        }
    }
}
