import FerryControllerCore
import FerryWire
import Foundation
import NIOCore
import NIOPosix
import Testing

@Suite("replica store: journal integrity (damaged segments, state file)")
struct UnitJournalIntegrityTests {
    static let size: UInt64 = 8 << 20
    static let epoch: UInt64 = 5
    /// A record's header before its bytes (see `JournalRecord`).
    static let header = 52
    static let recordBytes = 65536
    /// Each batch of 20 records fills one segment (1 MiB segments, one append per batch).
    static let perSegment = 20

    /// A batch of 20 64 KiB writes of `fill`, at distinct 64 KiB blocks.
    func batch(from sequence: UInt64, fill: UInt8) -> Ferry_V1_ReplicationBatch {
        var b = Ferry_V1_ReplicationBatch()
        b.volume = "v"
        b.epoch = Self.epoch
        b.records = (0..<Self.perSegment).map { i in
            var r = Ferry_V1_ReplicationRecord()
            r.sequence = sequence + UInt64(i)
            r.offset = Self.offset(record: i, fill: fill)
            r.data = Data(repeating: fill &+ UInt8(i), count: Self.recordBytes)
            r.capturedUnixNanos = Int64(Date().timeIntervalSince1970 * 1e9)
            return r
        }
        return b
    }

    static func offset(record i: Int, fill: UInt8) -> UInt64 { (UInt64(i * 37 + Int(fill)) % 128) * 65536 }

    func open(_ dir: String, _ pool: NIOThreadPool) throws -> ReplicaStore {
        try ReplicaStore(directory: dir + "/r", size: Self.size, pool: pool, retention: .zero, segmentBytes: 1 << 20)
    }

    /// Six segments of 20 records each, sequences 1...120 (segment k holds 20k-19...20k).
    func fill(_ store: ReplicaStore) async throws {
        for k in 0..<6 {
            _ = try await store.apply(batch(from: UInt64(k * Self.perSegment + 1), fill: UInt8(k + 1)))
        }
    }

    func segmentPath(_ dir: String, _ id: UInt64) -> String { dir + "/r/journal/" + String(format: "%016llx", id) + ".seg" }

    func segmentFiles(_ dir: String) throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: dir + "/r/journal").filter { $0.hasSuffix(".seg") }.sorted()
    }

    /// Flips one byte in the bytes of record `index` (from 0) of segment `id`.
    func flip(_ dir: String, segment id: UInt64, record index: Int) throws {
        let path = segmentPath(dir, id)
        var data = try Data(contentsOf: URL(fileURLWithPath: path))
        let at = index * (Self.header + Self.recordBytes) + Self.header + 1000
        #expect(at < data.count)
        data[at] ^= 0x5A
        try data.write(to: URL(fileURLWithPath: path))
    }

    func bytes(_ path: String) -> Data { FileManager.default.contents(atPath: path) ?? Data() }

    func read(_ image: PointImage, _ offset: UInt64, _ length: Int) throws -> [UInt8] {
        var buffer = ByteBuffer()
        try image.read(offset: offset, length: length, into: &buffer)
        return Array(buffer.readableBytesView)
    }

    @Test("a byte flipped in a sealed segment: folding refuses it, keeps it and leaves the base image as it was; the damage is recorded and shown")
    func foldRefusesDamagedSegment() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                let store = try open(dir, pool)
                try await fill(store)
                #expect(try segmentFiles(dir).count == 6)
                try flip(dir, segment: 1, record: 3)
                let base = bytes(dir + "/r/base.img")
                let error = await #expect(throws: FerryError.self) { try await store.fold() }
                #expect(error?.code == .io)
                #expect(error?.message.contains("damaged") == true)
                // Nothing of it reached the base image, and every segment is still there.
                #expect(bytes(dir + "/r/base.img") == base)
                #expect(try segmentFiles(dir).count == 6)
                #expect(await store.state.foldedThrough == 0)
                #expect(await store.state.corruption?.segment == 1)
                #expect(await store.state.resyncNeeded)
                #expect(await store.lastError?.contains("damaged") == true)
                // Folding again does not fold past it either.
                _ = try await store.fold()
                #expect(try segmentFiles(dir).count == 6)
                #expect(bytes(dir + "/r/base.img") == base)
                // The mark survives a restart, which keeps every segment.
                let reopened = try open(dir, pool)
                #expect(await reopened.state.corruption?.segment == 1)
                #expect(await reopened.lastError?.contains("damaged") == true)
                #expect(try segmentFiles(dir).count == 6)
            }
        }
    }

    @Test("a restart finds a damaged sealed segment while replaying: it and every later segment are kept, the damage is recorded")
    func restartKeepsLaterSegments() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                do {
                    let store = try open(dir, pool)
                    try await fill(store)
                    #expect(await store.durable == 120)
                }
                // Nothing was checkpointed: a restart replays the journal, through segment 2.
                try flip(dir, segment: 2, record: 4)
                let sizes = try segmentFiles(dir).map { bytes(dir + "/r/journal/" + $0).count }
                let reopened = try open(dir, pool)
                #expect(try segmentFiles(dir).count == 6)
                #expect(try segmentFiles(dir).map { bytes(dir + "/r/journal/" + $0).count } == sizes)
                let state = await reopened.state
                #expect(state.corruption?.segment == 2)
                #expect(state.corruption?.offset == 4 * (Self.header + Self.recordBytes))
                #expect(state.resyncNeeded)
                // Replayed up to the damage, not past it.
                #expect(await reopened.durable == 24)
                #expect(await reopened.lastError?.contains("damaged") == true)
                // Again: nothing is cut or deleted on a second restart either.
                _ = try open(dir, pool)
                #expect(try segmentFiles(dir).map { bytes(dir + "/r/journal/" + $0).count } == sizes)
            }
        }
    }

    @Test("a point image opens over a damaged record (headers only) but a read of it fails with an I/O error; other reads work")
    func imageReadOverDamageFails() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                let store = try open(dir, pool)
                try await fill(store)
                try flip(dir, segment: 1, record: 3)
                // At the end of segment 1 each of its records is the newest at its block.
                let image = try await store.openImage(at: ReplicaPosition(epoch: Self.epoch, sequence: 20))
                let damaged = Self.offset(record: 3, fill: 1), whole = Self.offset(record: 2, fill: 1)
                #expect(try read(image, whole, 4096) == [UInt8](repeating: 1 &+ 2, count: 4096))
                let error = #expect(throws: FerryError.self) { try read(image, damaged + 8192, 4096) }
                #expect(error?.code == .io)
                #expect(error?.message.contains("CRC") == true)
                // A whole-image export fails too, rather than write the wrong bytes.
                #expect(throws: FerryError.self) { try image.copy(toFile: dir + "/export.img") }
                try image.close()
                // The read marked the replica for a resync.
                for _ in 0..<500 where await store.state.corruption == nil { try await Task.sleep(for: .milliseconds(10)) }
                #expect(await store.state.corruption?.segment == 1)
            }
        }
    }

    @Test("a torn tail of the active segment is still cut; damage amid its records, with whole ones after it, is not")
    func activeSegmentTail() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                for root in [dir + "/torn", dir + "/damaged"] {
                    let store = try open(root, pool)
                    try await fill(store)
                }
                // A crash mid-append: half a record at the end of the active segment.
                let torn = segmentPath(dir + "/torn", 6)
                let length = bytes(torn).count
                let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: torn))
                try handle.seekToEnd()
                try handle.write(contentsOf: Data([0x46, 0x4A, 0x52, 0x32, 1, 2, 3]))
                try handle.close()
                let reopened = try open(dir + "/torn", pool)
                #expect(bytes(torn).count == length)
                #expect(await reopened.durable == 120)
                #expect(await reopened.state.corruption == nil)
                // A flipped byte in its record 10 of 20: the 9 records after it were acked.
                let damaged = segmentPath(dir + "/damaged", 6)
                try flip(dir + "/damaged", segment: 6, record: 10)
                let store = try open(dir + "/damaged", pool)
                #expect(bytes(damaged).count == length)
                #expect(await store.durable == 110)
                #expect(await store.state.corruption?.segment == 6)
            }
        }
    }

    @Test("a damaged or unreadable state.json makes opening the replica fail with a clear error, never start afresh")
    func damagedStateFile() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                do {
                    let store = try open(dir, pool)
                    try await fill(store)
                }
                let path = dir + "/r/state.json"
                try Data("{\"epoch\": 5, \"checkpo".utf8).write(to: URL(fileURLWithPath: path))
                let damaged = #expect(throws: FerryError.self) { try open(dir, pool) }
                #expect(damaged?.message.contains("state.json is damaged") == true)
                try FileManager.default.removeItem(atPath: path)
                try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false)
                let unreadable = #expect(throws: FerryError.self) { try open(dir, pool) }
                #expect(unreadable?.message.contains("cannot read the replica state") == true)
            }
        }
    }

    @Test("a full resync repairs a damaged replica: the base image is rebuilt from the latest, the damaged journal dropped, folding resumes")
    func resyncRepairs() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                let store = try open(dir, pool)
                try await fill(store)
                try flip(dir, segment: 2, record: 0)
                await #expect(throws: FerryError.self) { try await store.fold() }
                #expect(await store.state.foldedThrough == 1)
                // A report of a marked (partial) sync does not clear it; a full one does.
                var report = Ferry_V1_VolumeReport()
                report.volume = "v"
                report.epoch = Self.epoch
                report.lastSequence = 120
                report.sync.kind = .marked
                try await store.note(report)
                #expect(await store.state.corruption?.resynced == false)
                #expect(await store.repairResyncDue)
                await store.sessionEnded()
                report.sync.kind = .full
                try await store.note(report)
                #expect(await store.state.corruption?.resynced == true)
                #expect(await !store.state.resyncNeeded)
                #expect(try await store.fold() == 5)
                #expect(await store.state.corruption == nil)
                #expect(await store.lastError == nil)
                #expect(try segmentFiles(dir).isEmpty)
                #expect(bytes(dir + "/r/base.img") == bytes(dir + "/r/replica.img"))
                #expect(await store.basePosition == ReplicaPosition(epoch: Self.epoch, sequence: 120))
                // Replication goes on, and a restart is clean.
                #expect(try await store.apply(batch(from: 121, fill: 9)) == 140)
                let reopened = try open(dir, pool)
                #expect(await reopened.durable == 140)
                #expect(await reopened.state.corruption == nil)
                let image = try await reopened.openImage(at: ReplicaPosition(epoch: Self.epoch, sequence: 140))
                try image.copy(toFile: dir + "/export.img")
                try image.close()
                #expect(bytes(dir + "/export.img") == bytes(dir + "/r/replica.img"))
            }
        }
    }
}
