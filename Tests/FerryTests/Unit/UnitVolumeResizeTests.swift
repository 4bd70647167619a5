@testable import FerryAgentCore
@testable import FerryControllerCore
import FerryWire
import Foundation
import NIOCore
import NIOPosix
import Synchronization
import Testing

/// Online resize without processes: the agent's volume and change log, the replica's journal
/// (records past an older size after a resize record), points that keep their own size, and the
/// sink that follows a grown source.
@Suite("online volume resize")
struct UnitVolumeResizeTests {
    static let mib: UInt64 = 1 << 20

    enum Change {
        case write(UInt64, UInt8, Int)
        case zero(UInt64, UInt64)
        case resize(UInt64)
    }

    func batch(epoch: UInt64, from sequence: UInt64, _ changes: [Change]) -> Ferry_V1_ReplicationBatch {
        var b = Ferry_V1_ReplicationBatch()
        b.volume = "v"
        b.epoch = epoch
        b.records = changes.enumerated().map { i, c in
            var r = Ferry_V1_ReplicationRecord()
            r.sequence = sequence + UInt64(i)
            r.capturedUnixNanos = Int64(Date().timeIntervalSince1970 * 1e9)
            switch c {
            case .write(let offset, let fill, let count):
                r.offset = offset
                r.data = Data(repeating: fill, count: count)
            case .zero(let offset, let length):
                r.offset = offset
                r.zeroLength = length
            case .resize(let size):
                r.resizeBytes = size
            }
            return r
        }
        return b
    }

    func read(_ image: PointImage, _ offset: UInt64, _ length: Int) throws -> [UInt8] {
        var buffer = ByteBuffer()
        try image.read(offset: offset, length: length, into: &buffer)
        return Array(buffer.readableBytesView)
    }

    func fileSize(_ path: String) -> UInt64 {
        var st = stat()
        return stat(path, &st) == 0 ? UInt64(st.st_size) : 0
    }

    @Test("a resize record lets later records lie past the old size, also in a batch queued behind it; points keep their own size; a restart, a crash before the state was saved and a fold keep it all")
    func replicaFollowsAResize() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                let before = ReplicaPosition(epoch: 5, sequence: 2), after = ReplicaPosition(epoch: 5, sequence: 6)
                let grown = Mutex<[UInt64]>([])
                do {
                    let store = try ReplicaStore(directory: dir + "/r", size: Self.mib, pool: pool, segmentBytes: 1 << 20)
                    await store.setGrowthHandler { size in grown.withLock { $0.append(size) } }
                    #expect(try await store.apply(batch(epoch: 5, from: 1, [.write(0, 0xAA, 65536), .write(Self.mib - 4096, 0xAB, 4096)])) == 2)
                    // Past the size without a resize: refused, nothing applied.
                    await #expect(throws: FerryError.self) { try await store.apply(batch(epoch: 5, from: 3, [.write(Self.mib, 1, 4096)])) }
                    // The resize and a write straddling the old end in one batch, and a batch
                    // queued behind it (not yet durable when it arrives) writing far past the old end.
                    let results = Mutex<[Result<UInt64, any Error>]>([])
                    await withTaskGroup(of: Void.self) { group in
                        let first = batch(epoch: 5, from: 3, [.resize(3 * Self.mib), .write(Self.mib - 4096, 0xBB, 8192)])
                        let second = batch(epoch: 5, from: 5, [.write(2 * Self.mib, 0xCC, 65536), .zero(3 * Self.mib - 8192, 8192)])
                        let done = AsyncStream<Void>.makeStream()
                        await store.submit(first, attachments: []) { r in results.withLock { $0.append(r) }; done.continuation.yield() }
                        await store.submit(second, attachments: []) { r in results.withLock { $0.append(r) }; done.continuation.yield() }
                        group.addTask { var n = 0; for await _ in done.stream { n += 1; if n == 2 { break } } }
                    }
                    // Committed together or one after the other: both taken, in order.
                    let durable = results.withLock { $0.map { (try? $0.get()) ?? 0 } }
                    #expect(durable == [4, 6] || durable == [6, 6], "\(durable)")
                    #expect(await store.size == 3 * Self.mib)
                    #expect(await store.state.sizes == [ReplicaStore.SizeChange(position: ReplicaPosition(epoch: 5, sequence: 3), size: 3 * Self.mib, previous: Self.mib)])
                    #expect(grown.withLock { $0 } == [3 * Self.mib])
                    #expect(fileSize(dir + "/r/replica.img") == 3 * Self.mib && fileSize(dir + "/r/base.img") == 3 * Self.mib)
                    // A smaller size later is refused (volumes only grow); the same size again is harmless.
                    await #expect(throws: FerryError.self) { try await store.apply(batch(epoch: 5, from: 7, [.resize(2 * Self.mib)])) }
                    #expect(try await store.apply(batch(epoch: 5, from: 7, [.resize(3 * Self.mib)])) == 7)
                    #expect(await store.state.sizes.count == 1)
                    let sizes = (await store.size(at: before), await store.size(at: after))
                    #expect(sizes.0 == Self.mib && sizes.1 == 3 * Self.mib)
                }
                // A crash after the journal was durable and before the state file said so: the
                // journal (its active segment, scanned on open) is the truth.
                let statePath = dir + "/r/state.json"
                var state = try JSONDecoder().decode(ReplicaStore.State.self, from: Data(contentsOf: URL(fileURLWithPath: statePath)))
                state.sizes = []
                try JSONEncoder().encode(state).write(to: URL(fileURLWithPath: statePath))
                // Opened with the size the controller's record had before the resize.
                for round in 0..<2 {
                    let store = try ReplicaStore(directory: dir + "/r", size: Self.mib, pool: pool, segmentBytes: 1 << 20)
                    let (durable, lastError, size, changes) = (await store.durable, await store.lastError, await store.size, await store.state.sizes.count)
                    #expect(durable == 7 && lastError == nil, "round \(round)")
                    #expect(size == 3 * Self.mib && changes == 1, "round \(round)")
                    let old = try await store.openImage(at: before)
                    #expect(old.size == Self.mib)
                    #expect(try read(old, 0, 4) == [0xAA, 0xAA, 0xAA, 0xAA])
                    #expect(try read(old, Self.mib - 4096, 4096) == [UInt8](repeating: 0xAB, count: 4096))
                    #expect(throws: FerryError.self) { _ = try read(old, Self.mib, 512) }
                    try old.close()
                    let new = try await store.openImage(at: after)
                    #expect(new.size == 3 * Self.mib)
                    #expect(try read(new, Self.mib - 4096, 8192) == [UInt8](repeating: 0xBB, count: 8192))
                    #expect(try read(new, 2 * Self.mib, 65536) == [UInt8](repeating: 0xCC, count: 65536))
                    #expect(try read(new, 3 * Self.mib - 8192, 8192) == [UInt8](repeating: 0, count: 8192))
                    try new.close()
                    // A sink following the replica gets the resize in journal order.
                    let entries = try await store.records(after: before, maxBytes: 1 << 20, maxCount: 100)
                    #expect(entries.map(\.position.sequence) == [3, 4, 5, 6, 7] && entries[0].resize && entries[0].length == 3 * Self.mib)
                }
                // Folded into the base: the base is the latest image, the earlier point is gone.
                let store = try ReplicaStore(directory: dir + "/r", size: Self.mib, pool: pool, retention: .zero, segmentBytes: 1 << 20)
                _ = try await store.fold()
                let (journalBytes, size) = (await store.journalBytes, await store.size)
                #expect(journalBytes == 0 && size == 3 * Self.mib)
                #expect(FileManager.default.contents(atPath: dir + "/r/base.img") == FileManager.default.contents(atPath: dir + "/r/replica.img"))
                await #expect(throws: FerryError.self) { try await store.openImage(at: before) }
                let latest = try await store.openImage(at: await store.latestPosition)
                #expect(latest.size == 3 * Self.mib)
                #expect(try read(latest, 2 * Self.mib, 4) == [0xCC, 0xCC, 0xCC, 0xCC])
                try latest.close()
            }
        }
    }

    @Test("the agent grows the file and records the resize in write order; writes past the old end follow it; shrinking is refused; a new epoch starts by announcing the size")
    func agentVolumeGrows() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                let path = dir + "/v.img"
                #expect(FileManager.default.createFile(atPath: path, contents: nil) && truncate(path, off_t(Self.mib)) == 0)
                let activity = try ActivityLog(path: dir + "/v.fal", volumeBytes: Self.mib)
                let log = try ChangeLog(memoryBytes: 8 << 20, activity: activity)
                let volume = try BlockVolume(name: "v", path: path, recorder: log, pool: pool)
                let allocator = ByteBufferAllocator()
                _ = volume.performNow(.write(offset: 0, data: ByteBuffer(repeating: 1, count: 4096), fua: false), allocator: allocator)
                // Past the end: the export refuses it (NBD bounds are checked against the size).
                #expect(volume.size == Self.mib)
                #expect(try volume.resize(to: 4 * Self.mib) == 2)
                #expect(volume.size == 4 * Self.mib && fileSize(path) == 4 * Self.mib && activity.extentCount == 1)
                #expect(try volume.resize(to: 4 * Self.mib) == nil)
                #expect(throws: FerryError.self) { try volume.resize(to: 2 * Self.mib) }
                _ = volume.performNow(.write(offset: 3 * Self.mib, data: ByteBuffer(repeating: 2, count: 4096), fua: false), allocator: allocator)
                #expect(try volume.resize(to: 8 * Self.mib - 512) == 4)
                #expect(activity.extentCount == 2)
                let kinds = try log.records(after: 0, maxBytes: 1 << 30).map { c -> String in
                    switch c.kind {
                    case .write: "write@\(c.offset)"
                    case .zero: "zero@\(c.offset)"
                    case .resize(let size): "resize:\(size)"
                    }
                }
                #expect(kinds == ["write@0", "resize:\(4 * Self.mib)", "write@\(3 * Self.mib)", "resize:\(8 * Self.mib - 512)"])
                // After an overflow the new epoch opens with the size: the replica may never have
                // received the resize records the old epoch dropped.
                let epoch = log.epoch
                #expect(log.restartEpoch() != epoch)
                let first = try log.records(after: 0, maxBytes: 1 << 30)
                #expect(first.count == 1 && first[0].sequence == 1 && first[0].kind == .resize(size: 8 * Self.mib - 512))
                #expect(log.last == 1)
                // A volume grown since without a resize record here (as a sink, by the reverse
                // stream) announces its size now, never the last one recorded (a shrink the
                // replica refuses).
                #expect(log.restartEpoch(size: 12 * Self.mib) != epoch)
                #expect(try log.records(after: 0, maxBytes: 1 << 30).map(\.kind) == [.resize(size: 12 * Self.mib)])
                // So does a new log of a volume resized in an earlier run.
                let next = try ChangeLog(memoryBytes: 8 << 20, announceSize: 8 * Self.mib - 512)
                #expect(try next.records(after: 0, maxBytes: 1 << 30).map(\.kind) == [.resize(size: 8 * Self.mib - 512)])
                #expect(try ChangeLog(memoryBytes: 8 << 20).records(after: 0, maxBytes: 1 << 30).isEmpty)
            }
        }
    }

    @Test("a volume grown by its owner (read-only, as a scanned one, or a block device) is followed, never grown here: the size must be there first")
    func followsAGrownBacking() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                let path = dir + "/scanned.img"
                #expect(FileManager.default.createFile(atPath: path, contents: nil) && truncate(path, off_t(Self.mib)) == 0)
                let log = InMemoryChangeRecorder()
                let volume = try BlockVolume(name: "s", path: path, recorder: log, pool: pool, readOnly: true)
                let refused = #expect(throws: FerryError.self) { try volume.resize(to: 2 * Self.mib) }
                #expect(refused?.message.contains("grow it to \(2 * Self.mib) first") == true)
                #expect(fileSize(path) == Self.mib)
                #expect(truncate(path, off_t(2 * Self.mib)) == 0)
                #expect(try volume.resize(to: 2 * Self.mib) == 1)
                #expect(volume.size == 2 * Self.mib && log.changes.map(\.kind) == [.resize(size: 2 * Self.mib)])
            }
        }
    }

    @Test("a sink grows as its source did: a growth in an ordered batch comes before the blocks past the old end, survives the write-ahead journal's redo, and never shrinks the volume")
    func sinkGrows() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                let path = dir + "/sink.img"
                #expect(FileManager.default.createFile(atPath: path, contents: nil) && truncate(path, off_t(Self.mib)) == 0)
                let volume = try BlockVolume(name: "sink", path: path, recorder: InMemoryChangeRecorder(), pool: pool)
                volume.fence()
                let journal = SinkJournal(directory: dir, volume: "sink")
                let past = SinkChange.write(offset: 2 * Self.mib, data: ByteBuffer(repeating: 7, count: 4096))
                #expect(throws: FerryError.self) { try volume.applyAsSink([past], flush: false) }
                let through = SinkJournal.Position(source: "r/v", epoch: 1, sequence: 4)
                // Journaled, then a crash before the volume was touched: the redo grows it first.
                try Data(SinkJournal.encode([.grow(size: 3 * Self.mib), past], through: through)).write(to: URL(fileURLWithPath: journal.walPath))
                #expect(SinkJournal.decode(try Data(contentsOf: URL(fileURLWithPath: journal.walPath)), volumeSize: Self.mib) != nil)
                #expect(SinkJournal.decode(Data(SinkJournal.encode([past], through: through)), volumeSize: Self.mib) == nil)
                try journal.recover(volume: volume)
                #expect(try journal.position() == through && volume.size == 3 * Self.mib && fileSize(path) == 3 * Self.mib)
                let data = try Data(contentsOf: URL(fileURLWithPath: path))
                #expect(data[Int(2 * Self.mib)..<Int(2 * Self.mib + 4096)].allSatisfy { $0 == 7 })
                try volume.applyAsSink([.grow(size: Self.mib)], flush: false)
                #expect(volume.size == 3 * Self.mib)
            }
        }
    }
}
