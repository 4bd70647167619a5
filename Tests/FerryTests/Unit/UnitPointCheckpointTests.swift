@testable import FerryControllerCore
import FerryWire
import Foundation
import Testing

/// Opening a point image starts from the newest checkpoint before the point (the journal's
/// index at a sealed segment's end), so its cost does not grow with the journal: these check
/// that images built from checkpoints read exactly as the journal replayed, across epochs,
/// folds and restarts, and that opening the latest point walks only what follows one.
@Suite("point image checkpoints")
struct UnitPointCheckpointTests {
    typealias Images = UnitPointImageTests

    @Test("images opened from checkpoints read as the journal replayed; the latest walks only the segments after the newest checkpoint")
    func checkpointsMatchReplay() async throws {
        let t = Images()
        try await withUnitTempDir { dir in
            try await withPool { pool in
                var random = Images.Random(state: 11)
                var model = Images.Model(size: Images.size)
                let store = try ReplicaStore(directory: dir + "/r", size: Images.size, pool: pool, segmentBytes: 64 << 10)
                var points = try await t.fill(store, epoch: Images.first, rounds: 12, model: &model, random: &random)
                // A checkpoint in the first epoch, then more of it and a second epoch after it.
                try await store.refreshCheckpoint()
                let first = await store.checkpointSegments
                #expect(first.count == 1)
                points += try await t.fill(store, epoch: Images.first, rounds: 6, from: points.last!.0.sequence + 1, model: &model, random: &random)
                var report = Ferry_V1_VolumeReport()
                report.volume = "v"
                report.epoch = Images.second
                try await store.note(report)
                points += try await t.fill(store, epoch: Images.second, rounds: 12, model: &model, random: &random)
                try await store.refreshCheckpoint()
                let both = await store.checkpointSegments
                #expect(both.count == 2 && both.first == first.first && both.last! > first.first!)

                // The latest point: everything up to the newest checkpoint comes from it.
                let latest = try await store.openImage(at: points.last!.0)
                #expect(latest.segmentCount > 10)
                #expect(latest.walkedSegments <= 1)
                try t.check(latest, equals: points.last!.1, random: &random, "latest, from the checkpoint")
                try latest.close()

                // Every point, oldest first: each reads as its replay (points after a checkpoint
                // start from it; the opens leave more checkpoints, which later ones use).
                for (i, (position, expected)) in points.enumerated() {
                    let image = try await store.openImage(at: position)
                    try t.check(image, equals: expected, random: &random, "point \(i) at \(position)")
                    try image.close()
                }
                #expect(await store.checkpointSegments.count >= 2)
                #expect(await store.openImages == 0)
            }
        }
    }

    @Test("after a fold a checkpoint's extents in folded segments read from the base; a restart rebuilds the index in the background")
    func foldAndRestart() async throws {
        let t = Images()
        try await withUnitTempDir { dir in
            try await withPool { pool in
                var random = Images.Random(state: 12)
                var model = Images.Model(size: Images.size)
                let old = Int64(Date().addingTimeInterval(-7200).timeIntervalSince1970 * 1e9)
                var points: [(ReplicaPosition, [UInt8])] = []
                do {
                    let store = try ReplicaStore(directory: dir + "/r", size: Images.size, pool: pool, retention: .seconds(3600),
                                                 segmentBytes: 64 << 10)
                    points = try await t.fill(store, epoch: Images.first, rounds: 24, model: &model, random: &random, captured: old)
                    try await store.refreshCheckpoint()
                    let checkpoint = try #require(await store.checkpointSegments.last)
                    // Fold about half of the journal, keeping the points after the pin.
                    let pin = points[12].0
                    await store.pin(pin)
                    #expect(try await store.fold() > 0)
                    let base = try #require(await store.basePosition)
                    #expect(await store.checkpointSegments == [checkpoint])
                    for (i, (position, expected)) in points.enumerated() where await store.compare(position, base) != .orderedAscending {
                        let image = try await store.openImage(at: position)
                        try t.check(image, equals: expected, random: &random, "point \(i) after a fold under a checkpoint")
                        try image.close()
                    }
                    // A fold past the checkpoint's segment drops it.
                    await store.pin(nil)
                    _ = try await store.fold()
                    #expect(await store.checkpointSegments.isEmpty)
                    let last = try await store.openImage(at: points.last!.0)
                    try t.check(last, equals: points.last!.1, random: &random, "latest after a full fold")
                    try last.close()
                }
                // After a restart nothing is indexed: the first image walks every segment, the
                // background refresh leaves a checkpoint, and the next image walks none or one.
                points += try await {
                    let store = try ReplicaStore(directory: dir + "/r", size: Images.size, pool: pool, retention: .seconds(3600),
                                                 segmentBytes: 64 << 10)
                    return try await t.fill(store, epoch: Images.second, rounds: 12, model: &model, random: &random)
                }()
                let store = try ReplicaStore(directory: dir + "/r", size: Images.size, pool: pool, retention: .seconds(3600),
                                             segmentBytes: 64 << 10)
                #expect(await store.checkpointSegments.isEmpty)
                let cold = try await store.openImage(at: points.last!.0)
                #expect(cold.walkedSegments == cold.segmentCount && cold.segmentCount > 5)
                try t.check(cold, equals: points.last!.1, random: &random, "latest after a restart, walked")
                try cold.close()
                try await store.refreshCheckpoint()
                #expect(await store.checkpointSegments.count == 1)
                let warm = try await store.openImage(at: points.last!.0)
                #expect(warm.walkedSegments <= 1)
                try t.check(warm, equals: points.last!.1, random: &random, "latest after a restart, from the checkpoint")
                try warm.close()
            }
        }
    }

    func checkpoint(_ segment: UInt64, extents: Int = 1) -> PointCheckpoint {
        PointCheckpoint(segment: segment, bytes: 100, lastEpoch: 1, lastSequence: segment,
                        extents: Array(repeating: .init(start: 0, end: 1, segment: segment, header: 0, data: 0, zeroed: false), count: extents))
    }

    @Test("checkpoints are kept spread over the journal, within their count and memory budget; a fold and a rebase drop them")
    func keptSpread() {
        var kept = PointCheckpoints()
        // One per segment, as a refresh every few seconds under load leaves them.
        for s in UInt64(1)...60 { kept.add(checkpoint(s)) }
        let segments = kept.all.map(\.segment)
        #expect(segments.last == 60)
        #expect(segments.count == PointCheckpoints.maxCount)
        #expect(zip(segments.dropLast(), segments.dropLast().dropFirst()).allSatisfy { $1 - $0 >= PointCheckpoints.spacing })
        // The newest at or before a segment, and only while the segment holds what was indexed.
        #expect(kept.best(atOrBefore: 59) { _ in 100 }?.segment == segments[segments.count - 2])
        #expect(kept.best(atOrBefore: 60) { $0 == 60 ? 200 : 100 }?.segment == segments[segments.count - 2])
        #expect(kept.best(atOrBefore: segments[0] - 1) { _ in 100 } == nil)
        // Memory: a checkpoint alone over the budget is not kept; together they stay under it.
        var big = PointCheckpoints()
        big.add(checkpoint(1, extents: PointCheckpoints.maxExtents + 1))
        #expect(big.all.isEmpty)
        big.add(checkpoint(10, extents: PointCheckpoints.maxExtents / 2 + 1))
        big.add(checkpoint(20, extents: PointCheckpoints.maxExtents / 2 + 1))
        #expect(big.all.map(\.segment) == [20])
        kept.folded(through: segments[2])
        #expect(kept.all.map(\.segment) == Array(segments.dropFirst(3)))
        kept.removeAll()
        #expect(kept.all.isEmpty)
    }
}
