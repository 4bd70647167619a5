import FerryWire
import NIOCore

/// One change a sink applies to its (fenced) volume, from a reverse stream: written bytes, a
/// zeroed range, or a growth of the volume its source made (an online resize there).
enum SinkChange: Sendable {
    case write(offset: UInt64, data: ByteBuffer)
    case zero(offset: UInt64, length: UInt64)
    /// The volume grows to `size` bytes before any later change; a volume already that large
    /// (or larger) is left as it is.
    case grow(size: UInt64)

    /// The change a block of an `ApplyBlocks` command asks for.
    init(_ block: Ferry_V1_AppliedBlock) throws {
        let kinds = (block.data.isEmpty ? 0 : 1) + (block.zeroLength > 0 ? 1 : 0) + (block.resizeBytes > 0 ? 1 : 0)
        guard kinds <= 1 else {
            throw FerryError(.badRequest, "an applied block is one of: bytes, a zeroed range, a resize")
        }
        if block.resizeBytes > 0 {
            // Any size: a source protected at a size that is no multiple of 512 grows its sink to it.
            guard block.offset == 0 else {
                throw FerryError(.badRequest, "a resize block has offset 0, not \(block.offset)")
            }
            try WireLimits.checkVolumeSize(block.resizeBytes, "a resize block")
            self = .grow(size: block.resizeBytes)
        } else if !block.data.isEmpty {
            self = .write(offset: block.offset, data: ByteBuffer(bytes: block.data))
        } else {
            self = .zero(offset: block.offset, length: block.zeroLength)
        }
    }

    /// Bytes of data it carries.
    var dataBytes: UInt64 {
        if case .write(_, let data) = self { return UInt64(data.readableBytes) }
        return 0
    }

    /// Bytes it changes on the volume (written or zeroed).
    var changedBytes: UInt64 {
        switch self {
        case .write(_, let data): UInt64(data.readableBytes)
        case .zero(_, let length): length
        case .grow: 0
        }
    }
}
