import FerryWire
import Foundation
import NIOCore

/// A replica journal record read out for a sink, its bytes copied out of the segment.
public struct JournalEntry: Sendable {
    public var position: ReplicaPosition
    public var offset: UInt64
    public var length: UInt64
    /// The bytes written; nil for a zeroed range or a resize.
    public var data: ByteBuffer?
    /// A resize record: the volume grew to `length` bytes here.
    public var resize = false
}

/// Reads journal records after a position, in journal order, for a sink that follows the
/// replica (reprotect of a failover that landed).
enum JournalReader {
    /// One segment to read: its durable bytes, and the sequence (of its own epoch) up to which its
    /// records were applied already (nil: none of them).
    struct Source: Sendable {
        var path: String
        var epoch: UInt64
        var bytes: Int
        var skipThrough: UInt64?
    }

    /// Records of `sources` (in journal order) past their `skipThrough`, until about `maxBytes`
    /// of data or `maxCount` records (at least one record when there is one). Each record's CRC is
    /// checked; a damaged one stops the read with an error (the replica then needs a resync).
    static func read(_ sources: [Source], size: UInt64, maxBytes: Int, maxCount: Int) throws -> [JournalEntry] {
        var out: [JournalEntry] = []
        var bytes = 0
        for source in sources {
            let full = try JournalRecord.withSegment(source.path) { mapped -> Bool in
                let segment = UnsafeRawBufferPointer(rebasing: mapped[..<min(mapped.count, source.bytes)])
                var failure: FerryError?
                var full = false
                _ = JournalRecord.walkHeaders(segment, size: size) { h in
                    if h.epoch != source.epoch { return true }
                    if let skip = source.skipThrough, h.sequence <= skip { return true }
                    let length = h.kind == .write ? Int(h.length) : 0
                    if !out.isEmpty, out.count >= maxCount || bytes + length > maxBytes {
                        full = true
                        return false
                    }
                    guard JournalRecord.verify(segment, header: h.payload - JournalRecord.headerSize) else {
                        failure = FerryError(.io, "journal segment \(source.path) has a damaged record at sequence \(h.sequence); the replica needs a resync")
                        return false
                    }
                    var data: ByteBuffer?
                    if h.kind == .write {
                        data = ByteBuffer(bytes: UnsafeRawBufferPointer(rebasing: segment[h.payload..<(h.payload + length)]))
                    }
                    out.append(JournalEntry(position: ReplicaPosition(epoch: h.epoch, sequence: h.sequence), offset: h.offset,
                                            length: h.length, data: data, resize: h.kind == .resize))
                    bytes += length
                    return true
                }
                if let failure { throw failure }
                return full
            }
            if full { break }
        }
        return out
    }
}
