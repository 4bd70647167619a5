import CLZ4
import NIOCore

/// LZ4 block compression of the frames a replication batch attaches (the written bytes), for
/// streams over a WAN. Each frame is compressed on its own and kept only where it got smaller;
/// the batch lists every frame's decompressed length (`ReplicationBatch.attached_sizes`), which
/// the receiver checks before it decompresses anything.
public enum AttachedFrameCompression {
    /// What compressing one batch's frames did, for the sender's counters.
    public struct Outcome: Sendable {
        public var frames: [ByteBuffer]
        public var sizes: [UInt32]
        public var inBytes: Int
        public var outBytes: Int
    }

    /// Compresses each frame; a frame that would not shrink is kept as is.
    public static func compress(_ frames: [ByteBuffer], allocator: ByteBufferAllocator) -> Outcome {
        var outcome = Outcome(frames: [], sizes: [], inBytes: 0, outBytes: 0)
        outcome.frames.reserveCapacity(frames.count)
        outcome.sizes.reserveCapacity(frames.count)
        for frame in frames {
            let size = frame.readableBytes
            outcome.sizes.append(UInt32(size))
            outcome.inBytes += size
            if let block = compress(frame, allocator: allocator) {
                outcome.outBytes += block.readableBytes
                outcome.frames.append(block)
            } else {
                outcome.outBytes += size
                outcome.frames.append(frame)
            }
        }
        return outcome
    }

    /// One frame as an LZ4 block, or nil when the block would not be smaller than the frame.
    public static func compress(_ frame: ByteBuffer, allocator: ByteBufferAllocator) -> ByteBuffer? {
        let size = frame.readableBytes
        guard size > 64, size <= Int(Int32.max) else { return nil }
        var block = allocator.buffer(capacity: size - 1)
        let written = frame.withUnsafeReadableBytes { source in
            block.writeWithUnsafeMutableBytes(minimumWritableBytes: size - 1) { target in
                // A capacity one byte short of the input: LZ4 gives up (0) unless it saves something.
                Int(LZ4_compress_default(source.baseAddress!.assumingMemoryBound(to: CChar.self),
                                         target.baseAddress!.assumingMemoryBound(to: CChar.self),
                                         Int32(size), Int32(size - 1)))
            }
        }
        return written > 0 ? block : nil
    }

    /// The frames as sent, decompressed. Every size is checked before any work: one per frame,
    /// none over `maxFrameBytes`, none under its frame's wire length, all together at most
    /// `Attachments.maxBytes`; a block must expand to exactly its size.
    public static func decompress(_ frames: [ByteBuffer], sizes: [UInt32], maxFrameBytes: Int,
                                  allocator: ByteBufferAllocator) throws -> [ByteBuffer] {
        guard sizes.count == frames.count else {
            throw FerryError(.protocolViolation, "a batch lists \(sizes.count) decompressed sizes for \(frames.count) attached frames")
        }
        var total = 0
        for (frame, size) in zip(frames, sizes) {
            guard Int(size) <= maxFrameBytes else {
                throw FerryError(.protocolViolation, "an attached frame claims \(size) bytes decompressed, over the \(maxFrameBytes)-byte frame limit")
            }
            guard frame.readableBytes > 0 || size == 0 else {
                throw FerryError(.protocolViolation, "an empty attached frame claims \(size) bytes decompressed")
            }
            guard frame.readableBytes <= Int(size) else {
                throw FerryError(.protocolViolation, "an attached frame of \(frame.readableBytes) bytes claims only \(size) decompressed")
            }
            total += Int(size)
        }
        guard total <= Attachments.maxBytes else {
            throw FerryError(.protocolViolation, "a batch's attached frames claim \(total) bytes decompressed, over \(Attachments.maxBytes)")
        }
        return try zip(frames, sizes).map { frame, size in
            let size = Int(size)
            guard frame.readableBytes < size else { return frame }
            var out = allocator.buffer(capacity: size)
            let produced = frame.withUnsafeReadableBytes { source in
                out.writeWithUnsafeMutableBytes(minimumWritableBytes: size) { target in
                    max(0, Int(LZ4_decompress_safe(source.baseAddress!.assumingMemoryBound(to: CChar.self),
                                                   target.baseAddress!.assumingMemoryBound(to: CChar.self),
                                                   Int32(source.count), Int32(size))))
                }
            }
            guard produced == size else {
                throw FerryError(.protocolViolation, "an attached LZ4 block is corrupt or does not expand to its stated \(size) bytes")
            }
            return out
        }
    }
}
