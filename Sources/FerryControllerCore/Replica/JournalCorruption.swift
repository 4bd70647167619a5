import Foundation

/// Damage found in a replica's journal: a record of a segment fails its CRC (or its file is
/// shorter than recorded). Kept in `state.json`, so a restart still knows: the damaged segment
/// is never folded nor deleted, reads of a point over the record fail, and the replica needs a
/// full resync before its base image can move past it.
public struct JournalCorruption: Codable, Sendable, Equatable {
    /// The damaged segment's id.
    public var segment: UInt64
    /// Byte of the segment where the first bad record starts.
    public var offset: Int
    /// What was found and what repairs it, for the operator.
    public var message: String
    /// A full resync has completed since: the latest image matches the source again, and the
    /// next fold rebuilds the base image from it and drops the damaged journal.
    public var resynced = false

    public init(segment: UInt64, offset: Int, message: String) {
        self.segment = segment
        self.offset = offset
        self.message = message
    }

    /// The error for a segment found damaged, `found` saying when (e.g. "while folding").
    static func of(segment: UInt64, offset: Int, path: String, found: String, lost: String? = nil) -> JournalCorruption {
        let what = "journal segment \(path) is damaged: the record at byte \(offset) fails its CRC check (found \(found))"
        let consequence = lost ?? "points over it cannot be read and the journal cannot fold past it"
        return JournalCorruption(segment: segment, offset: offset,
                                 message: "\(what); \(consequence). The replica is resyncing from its agent (a full block-hash comparison, or `ferryctl volume resync`); once it completes the base image is rebuilt from the resynced replica and the damaged history is dropped")
    }
}
