@testable import FerryControllerCore
import FerryWire
import Foundation
import NIOCore
import NIOPosix
import Synchronization
import Testing

@Suite("replica store: journal segments, base image, retention")
struct UnitReplicaStoreTests {
    static let size: UInt64 = 8 << 20

    /// A batch of `count` 64 KiB writes of `fill` at pseudo-random block offsets.
    func batch(epoch: UInt64, from sequence: UInt64, count: Int, fill: UInt8, captured: Int64) -> Ferry_V1_ReplicationBatch {
        var b = Ferry_V1_ReplicationBatch()
        b.volume = "v"
        b.epoch = epoch
        b.records = (0..<count).map { i in
            var r = Ferry_V1_ReplicationRecord()
            r.sequence = sequence + UInt64(i)
            r.offset = (UInt64(i * 37 + Int(fill)) % 128) * 65536
            // Each record its own bytes, so a record given another's bytes shows.
            r.data = Data(repeating: fill &+ UInt8(i), count: 65536)
            r.capturedUnixNanos = captured
            return r
        }
        return b
    }

    func bytes(_ path: String) -> Data { FileManager.default.contents(atPath: path) ?? Data() }

    @Test("records stay in segments for the retention window, then fold into the base image in order; the base ends equal to the latest image")
    func foldsByAge() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                let old = Int64(Date().addingTimeInterval(-7200).timeIntervalSince1970 * 1e9)
                do {
                    let store = try ReplicaStore(directory: dir + "/r", size: Self.size, pool: pool, retention: .seconds(3600), segmentBytes: 1 << 20)
                    let recent = Int64(Date().timeIntervalSince1970 * 1e9)
                    var sequence: UInt64 = 1
                    for fill in UInt8(1)...6 {
                        _ = try await store.apply(batch(epoch: 5, from: sequence, count: 20, fill: fill, captured: fill <= 3 ? old : recent))
                        sequence += 20
                    }
                    let before = await store.journalBytes
                    #expect(before > 6 * 20 * 65536)
                    // Before retention knows what points need (capOnly), nothing under the
                    // size cap folds, however old.
                    #expect(try await store.fold(capOnly: true) == 0)
                    // Only what is older than an hour goes into the base.
                    let folded = try await store.fold()
                    #expect(folded == 3)
                    #expect(await store.journalBytes < before)
                    #expect(await store.state.baseAsOf == old)
                    #expect(bytes(dir + "/r/base.img") != bytes(dir + "/r/replica.img"))
                }
                // With a zero window everything folds and the base catches up with the latest.
                let all = try ReplicaStore(directory: dir + "/r", size: Self.size, pool: pool, retention: .zero, segmentBytes: 1 << 20)
                #expect(await all.durable == 120)
                _ = try await all.fold()
                #expect(await all.journalBytes == 0)
                #expect(bytes(dir + "/r/base.img") == bytes(dir + "/r/replica.img"))
                #expect((try FileManager.default.contentsOfDirectory(atPath: dir + "/r/journal")).isEmpty)
            }
        }
    }

    @Test("past the journal size cap the oldest segments fold whatever their age")
    func foldsBySize() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                let store = try ReplicaStore(directory: dir + "/r", size: Self.size, pool: pool, journalLimit: 2 << 20, segmentBytes: 1 << 20)
                let now = Int64(Date().timeIntervalSince1970 * 1e9)
                for round in 0..<5 {
                    _ = try await store.apply(batch(epoch: 9, from: UInt64(round * 20 + 1), count: 20, fill: UInt8(round + 1), captured: now))
                }
                _ = try await store.fold()
                #expect(await store.journalBytes <= 2 << 20)
                #expect(await store.state.foldedThrough >= 2)
            }
        }
    }

    @Test("a torn tail of the active segment is cut on restart; everything before it is replayed and nothing acked is lost")
    func tornTailIsCut() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                let now = Int64(Date().timeIntervalSince1970 * 1e9)
                do {
                    let store = try ReplicaStore(directory: dir + "/r", size: Self.size, pool: pool)
                    #expect(try await store.apply(batch(epoch: 3, from: 1, count: 10, fill: 7, captured: now)) == 10)
                }
                let expected = bytes(dir + "/r/replica.img")
                // A half-written record at the end (a crash mid-append), and damage to the image
                // the journal must repair (writes not yet checkpointed).
                let segment = dir + "/r/journal/" + (try FileManager.default.contentsOfDirectory(atPath: dir + "/r/journal").first { $0.hasSuffix(".seg") }!)
                let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: segment))
                try handle.seekToEnd()
                try handle.write(contentsOf: Data([0x46, 0x4A, 0x52, 0x32, 1, 2, 3]))
                try handle.close()
                let image = try FileHandle(forWritingTo: URL(fileURLWithPath: dir + "/r/replica.img"))
                try image.truncate(atOffset: 0)
                try image.truncate(atOffset: Self.size)
                try image.close()
                let reopened = try ReplicaStore(directory: dir + "/r", size: Self.size, pool: pool)
                #expect(await reopened.durable == 10)
                #expect(bytes(dir + "/r/replica.img") == expected)
                // The agent resends from 11; a duplicate is ignored, a gap refused.
                #expect(try await reopened.apply(batch(epoch: 3, from: 5, count: 10, fill: 8, captured: now)) == 14)
                await #expect(throws: FerryError.self) { try await reopened.apply(batch(epoch: 3, from: 20, count: 1, fill: 9, captured: now)) }
            }
        }
    }

    @Test("folding while batches are applied (the actor is reentrant) loses nothing: the reopened replica and the base match")
    func foldDuringApply() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                let now = Int64(Date().timeIntervalSince1970 * 1e9)
                do {
                    let store = try ReplicaStore(directory: dir + "/r", size: Self.size, pool: pool, retention: .zero, segmentBytes: 256 << 10)
                    try await withThrowingTaskGroup(of: Void.self) { group in
                        group.addTask {
                            for round in 0..<60 {
                                _ = try await store.apply(batch(epoch: 4, from: UInt64(round * 4 + 1), count: 4, fill: UInt8(round % 250 + 1), captured: now))
                            }
                        }
                        group.addTask {
                            for _ in 0..<200 {
                                _ = try await store.fold()
                                await Task.yield()
                            }
                        }
                        try await group.waitForAll()
                    }
                    #expect(await store.durable == 240)
                }
                let expected = bytes(dir + "/r/replica.img")
                let reopened = try ReplicaStore(directory: dir + "/r", size: Self.size, pool: pool, retention: .zero)
                #expect(await reopened.durable == 240)
                #expect(bytes(dir + "/r/replica.img") == expected)
                _ = try await reopened.fold()
                #expect(bytes(dir + "/r/base.img") == expected)
            }
        }
    }

    /// `batch` with its writes' bytes moved into attachments (every other one, when `mixed`);
    /// consecutive attached records share a frame in threes, as an agent gathers small writes.
    func attached(_ b: Ferry_V1_ReplicationBatch, mixed: Bool = false) -> (Ferry_V1_ReplicationBatch, [ByteBuffer]) {
        var out = b
        var attachments: [ByteBuffer] = []
        var shared = 0
        for i in out.records.indices where !mixed || i % 2 == 0 {
            var bytes = ByteBuffer(bytes: out.records[i].data)
            out.records[i].attachedLength = UInt32(out.records[i].data.count)
            out.records[i].data = Data()
            if shared % 3 != 0, !attachments.isEmpty {
                attachments[attachments.count - 1].writeBuffer(&bytes)
            } else {
                attachments.append(bytes)
            }
            shared += 1
        }
        return (out, attachments)
    }

    @Test("batches queued back to back are committed in groups, with attached and inline bytes; a gap refuses its batch and those after it, not those before")
    func groupCommit() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                let now = Int64(Date().timeIntervalSince1970 * 1e9)
                let store = try ReplicaStore(directory: dir + "/r", size: Self.size, pool: pool)
                let reference = try ReplicaStore(directory: dir + "/ref", size: Self.size, pool: pool)
                let outcomes = Mutex<[Int: Result<UInt64, any Error>]>([:])
                // 40 batches submitted without waiting: batch 30 skips a sequence.
                for i in 0..<40 {
                    let from = UInt64(i * 5 + 1) + (i >= 30 ? 1 : 0)
                    let plain = batch(epoch: 2, from: from, count: 5, fill: UInt8(i + 1), captured: now)
                    let (b, a) = attached(plain, mixed: i % 3 == 0)
                    await store.submit(b, attachments: a) { result in outcomes.withLock { $0[i] = result } }
                    if i < 30 { _ = try await reference.apply(plain) }
                }
                for _ in 0..<6000 where outcomes.withLock({ $0.count }) < 40 { try await Task.sleep(for: .milliseconds(10)) }
                let results = outcomes.withLock { $0 }
                for i in 0..<30 {
                    guard case .success(let durable)? = results[i] else { Issue.record("batch \(i) refused: \(String(describing: results[i]))"); continue }
                    #expect(durable >= UInt64(i * 5 + 5))
                }
                for i in 30..<40 {
                    guard case .failure? = results[i] else { Issue.record("batch \(i) after the gap was accepted"); continue }
                }
                #expect(await store.durable == 150)
                #expect(await store.lastError?.contains("gap") == true)
                #expect(bytes(dir + "/r/replica.img") == bytes(dir + "/ref/replica.img"))
                // The journal holds the same records as one written batch by batch: reopened
                // from it alone (image wiped), the replica is rebuilt identically.
                try FileManager.default.removeItem(atPath: dir + "/r/replica.img")
                let reopened = try ReplicaStore(directory: dir + "/r", size: Self.size, pool: pool)
                #expect(await reopened.durable == 150)
                #expect(bytes(dir + "/r/replica.img") == bytes(dir + "/ref/replica.img"))
            }
        }
    }

    @Test("attachments that do not match the batch's write records are refused and nothing is applied")
    func attachmentMismatch() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                let now = Int64(Date().timeIntervalSince1970 * 1e9)
                let store = try ReplicaStore(directory: dir + "/r", size: Self.size, pool: pool)
                let (b, a) = attached(batch(epoch: 2, from: 1, count: 4, fill: 1, captured: now))
                await #expect(throws: FerryError.self) { try await store.apply(b, attachments: Array(a.dropLast())) }
                await #expect(throws: FerryError.self) { try await store.apply(b, attachments: a + [ByteBuffer(bytes: [1])]) }
                // A record whose bytes would straddle two frames.
                var split = a
                let cut = split[0].readableBytes - 100
                let tail = split[0].getSlice(at: split[0].readerIndex + cut, length: 100)!
                split[0].moveWriterIndex(to: split[0].readerIndex + cut)
                split.insert(tail, at: 1)
                await #expect(throws: FerryError.self) { try await store.apply(b, attachments: split) }
                // Both inline and attached bytes.
                var both = b
                both.records[1].data = Data([1, 2, 3])
                let error = await #expect(throws: FerryError.self) { try await store.apply(both, attachments: a) }
                #expect(error?.message.contains("exactly one of") == true)
                var outside = b
                outside.records[0].offset = Self.size - 100
                await #expect(throws: FerryError.self) { try await store.apply(outside, attachments: a) }
                #expect(await store.durable == 0)
                #expect(try await store.apply(b, attachments: a) == 4)
            }
        }
    }

    @Test("a report waits for the batches queued before it: a new epoch it announces is the one left standing")
    func reportAfterQueuedBatches() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                let now = Int64(Date().timeIntervalSince1970 * 1e9)
                let store = try ReplicaStore(directory: dir + "/r", size: Self.size, pool: pool)
                let outcomes = Mutex<[Result<UInt64, any Error>]>([])
                for i in 0..<10 {
                    let (b, a) = attached(batch(epoch: 2, from: UInt64(i * 5 + 1), count: 5, fill: UInt8(i + 1), captured: now))
                    await store.submit(b, attachments: a) { result in outcomes.withLock { $0.append(result) } }
                }
                // The agent restarted after sending them: its first report is of a new epoch.
                var report = Ferry_V1_VolumeReport()
                report.volume = "v"
                report.epoch = 3
                try await store.note(report)
                #expect(outcomes.withLock { $0.count } == 10)
                #expect(outcomes.withLock { $0.allSatisfy { if case .success = $0 { true } else { false } } })
                #expect(await store.state.epoch == 3)
            }
        }
    }

    @Test("a replica replaying its journal on open (on the pool) holds up no lookup of another replica; lookups of the one opening wait for it and get the same store")
    func openOffTheManager() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                let size: UInt64 = 64 << 20
                // 96 MiB of records after the checkpoint: replayed onto the image when opened.
                do {
                    let store = try ReplicaStore(directory: dir + "/replicas/h1/slow", size: size, pool: pool)
                    var sequence: UInt64 = 1
                    for fill in UInt8(1)...12 {
                        var b = batch(epoch: 7, from: sequence, count: 128, fill: fill, captured: 1)
                        for i in b.records.indices { b.records[i].offset = UInt64(i) * 65536 * 4 % size }
                        _ = try await store.apply(b)
                        sequence += 128
                    }
                }
                let manager = ReplicaManager(root: dir + "/replicas", pool: pool)
                let quick = try await manager.replica(hostID: "h1", volume: "quick", size: 1 << 20)
                // Both pool threads held: the slow replica's replay cannot run until released,
                // so its open is in flight for as long as the test looks (no race with the clock).
                let hold = DispatchSemaphore(value: 0)
                for _ in 0..<2 { pool.submit { _ in hold.wait() } }
                async let slow = manager.replica(hostID: "h1", volume: "slow", size: size)
                async let again = manager.replica(hostID: "h1", volume: "slow", size: size)
                let opening = await eventually(timeout: .seconds(30), every: .milliseconds(5)) { await manager.isOpening("h1/slow") }
                #expect(opening, "the slow replica never showed as opening")
                // While it opens, the open one is found at once: the manager is not busy replaying.
                for _ in 0..<100 {
                    let found = try await manager.replica(hostID: "h1", volume: "quick", size: 1 << 20)
                    #expect(found === quick)
                }
                #expect(await manager.opened(hostID: "h1", volume: "slow") == nil)
                hold.signal()
                hold.signal()
                let (a, b) = try await (slow, again)
                #expect(a === b)
                #expect(await a.durable == 12 * 128)
            }
        }
    }
}
