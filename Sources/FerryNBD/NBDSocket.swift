import CFerrySystem
import FerryWire
import Foundation
import NIOCore

/// One NBD client connection's socket, read and written with blocking calls by the thread that
/// serves the connection (never an event loop, never a Swift concurrency thread).
struct NBDSocket: ~Copyable {
    struct EndOfStream: Error {}

    let fd: Int32
    /// Bytes received and not consumed yet.
    private var buffer: ByteBuffer
    /// Pending replies, written together when the client has nothing more queued.
    private var replies: [ByteBuffer] = []
    private var replyBytes = 0

    /// Bytes asked of the kernel per read: enough for many small requests at once.
    static let readChunk = 256 * 1024

    init(fd: Int32) {
        self.fd = fd
        buffer = ByteBufferAllocator().buffer(capacity: Self.readChunk)
    }

    /// Exactly `count` bytes. A large payload is received straight into a buffer of its own,
    /// so it is never copied again on its way to the disk.
    mutating func read(_ count: Int) throws -> ByteBuffer {
        if buffer.readableBytes >= count { return buffer.readSlice(length: count)! }
        if count >= Self.readChunk {
            var payload = ByteBufferAllocator().buffer(capacity: count)
            payload.writeBuffer(&buffer)
            while payload.readableBytes < count { try Self.receive(fd, into: &payload, upTo: count - payload.readableBytes) }
            return payload
        }
        // Keep what is left, then refill one chunk at a time.
        var fresh = ByteBufferAllocator().buffer(capacity: Swift.max(Self.readChunk, count))
        fresh.writeBuffer(&buffer)
        buffer = fresh
        while buffer.readableBytes < count {
            let room = buffer.writableBytes
            try Self.receive(fd, into: &buffer, upTo: room)
        }
        return buffer.readSlice(length: count)!
    }

    /// Exactly `count` bytes in storage of their own, for data that is kept (a write payload
    /// waits in the change log until the controller acks it): a small payload is copied out of
    /// the shared read buffer rather than keeping all of it alive.
    mutating func readOwned(_ count: Int) throws -> ByteBuffer {
        let bytes = try read(count)
        guard count < Self.readChunk else { return bytes }
        var owned = ByteBufferAllocator().buffer(capacity: count)
        owned.writeImmutableBuffer(bytes)
        return owned
    }

    mutating func read<T: FixedWidthInteger>(_ type: T.Type) throws -> T {
        var bytes = try read(MemoryLayout<T>.size)
        return bytes.readInteger(as: T.self)!
    }

    private static func receive(_ fd: Int32, into target: inout ByteBuffer, upTo limit: Int) throws {
        var failure: Int32 = 0
        let n = target.writeWithUnsafeMutableBytes(minimumWritableBytes: 1) { out in
            let r = recv(fd, out.baseAddress, Swift.min(out.count, Swift.max(limit, 1)), 0)
            if r < 0 { failure = errno }
            return Swift.max(r, 0)
        }
        if failure == EINTR { return }
        if failure == EAGAIN || failure == EWOULDBLOCK { throw NBDProtocolError("client sent nothing within the negotiation timeout") }
        if failure != 0 || n == 0 { throw EndOfStream() }
    }

    /// Whether a whole transmission request (header, and payload for a write) is buffered
    /// already, so it can be served before the replies so far are sent.
    var hasWholeRequest: Bool {
        guard buffer.readableBytes >= NBDRequest.size,
              let type = buffer.getInteger(at: buffer.readerIndex + 6, as: UInt16.self),
              let length = buffer.getInteger(at: buffer.readerIndex + 24, as: UInt32.self)
        else { return false }
        return type != NBD.Command.write.rawValue || buffer.readableBytes >= NBDRequest.size + Int(length)
    }

    /// Queues a reply; `flush` sends everything queued.
    mutating func queue(_ reply: ByteBuffer) {
        replies.append(reply)
        replyBytes += reply.readableBytes
    }

    mutating func queue(_ more: [ByteBuffer]) {
        for reply in more { queue(reply) }
    }

    /// Enough replies are queued that holding more would only cost memory.
    var repliesFull: Bool { replyBytes >= 1 << 20 || replies.count >= 128 }

    mutating func flush() throws {
        guard !replies.isEmpty else { return }
        defer {
            replies.removeAll(keepingCapacity: true)
            replyBytes = 0
        }
        let failed = FileIO.writeAll(fd, replies, socket: true)
        if failed != 0 { throw EndOfStream() }
    }

    /// Writes one buffer now (negotiation).
    mutating func write(_ bytes: ByteBuffer) throws {
        queue(bytes)
        try flush()
    }

    /// Bounds how long a read may wait (0: forever).
    func setReadTimeout(seconds: Int) {
        var tv = timeval(tv_sec: seconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }
}
