/// The index of a replica's journal at the end of one sealed segment: which record last wrote
/// each byte of the volume, over all the segments up to it. A point image after that segment
/// starts from it and walks only the segments after it, so opening one costs the volume's
/// written extents and the journal after the checkpoint, not the whole journal.
///
/// Extents name their segment by id: a segment folded into the base image since reads from
/// the base (which then holds exactly that record's bytes, as no later record up to the
/// checkpoint overwrote them).
struct PointCheckpoint: Sendable {
    /// The sealed segment it ends with, and its durable bytes when indexed (a segment whose
    /// bytes differ is not the one indexed).
    var segment: UInt64
    var bytes: Int
    /// The last record indexed: a duplicate of an earlier record after it is skipped.
    var lastEpoch: UInt64
    var lastSequence: UInt64
    /// Sorted, non-overlapping.
    var extents: [Extent]

    struct Extent: Sendable {
        var start: UInt64
        var end: UInt64
        /// The record's segment, and its header's and this extent's first byte's offsets there.
        var segment: UInt64
        var header: Int
        var data: Int
        var zeroed: Bool
    }
}

/// A replica's checkpoints, newest last, kept spread over the journal and within a memory
/// budget. Pure state: the replica feeds it what opening images made and what folding dropped.
struct PointCheckpoints: Sendable {
    /// Most checkpoints kept.
    static let maxCount = 6
    /// Checkpoints other than the newest are at least this many segments apart: an older
    /// point walks at most about this far past one.
    static let spacing: UInt64 = 8
    /// Most extents over all checkpoints of a replica (40 bytes each: 80 MiB).
    static let maxExtents = 2 << 20

    private(set) var all: [PointCheckpoint] = []

    /// The newest checkpoint at or before `segment` whose segment still holds `bytes(id)`.
    func best(atOrBefore segment: UInt64, bytes: (UInt64) -> Int?) -> PointCheckpoint? {
        all.last { $0.segment <= segment && bytes($0.segment) == $0.bytes }
    }

    /// The newest checkpoint's segment, if any.
    var newest: UInt64? { all.last?.segment }

    mutating func add(_ checkpoint: PointCheckpoint) {
        guard checkpoint.extents.count <= Self.maxExtents else { return }
        all.removeAll { $0.segment == checkpoint.segment }
        all.append(checkpoint)
        all.sort { $0.segment < $1.segment }
        // Spread: the newest is kept; the older ones at least `spacing` segments apart, the
        // oldest first (so checkpoints made one segment apart advance that history in steps).
        let newest = all[all.count - 1]
        var kept: [PointCheckpoint] = []
        for c in all.dropLast() where kept.last.map({ c.segment - $0.segment >= Self.spacing }) ?? true {
            kept.append(c)
        }
        all = kept + [newest]
        while all.count > Self.maxCount || (all.count > 1 && all.reduce(0, { $0 + $1.extents.count }) > Self.maxExtents) {
            all.removeFirst()
        }
    }

    /// Segments up to `segment` were folded: points at or before their end are gone.
    mutating func folded(through segment: UInt64) {
        all.removeAll { $0.segment <= segment }
    }

    /// The journal was replaced (a rebase): every checkpoint names segments that are gone.
    mutating func removeAll() { all.removeAll() }
}
