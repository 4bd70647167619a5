@testable import FerryAgentCore
@testable import FerryControllerCore
import FerryWire
import Foundation
import NIOCore
import NIOPosix
import Testing

/// The ordered reverse stream of a failover that landed, without processes: the replica hands
/// out its journal's records in write order, and the sink's write-ahead journal leaves the
/// volume at one of those positions after any crash.
@Suite("ordered sink: journal records out, write-ahead journal in")
struct UnitSinkJournalTests {
    /// A fenced 1 MiB volume in `dir`.
    func sinkVolume(_ dir: String, pool: NIOThreadPool) throws -> BlockVolume {
        let path = dir + "/sink.img"
        _ = FileManager.default.createFile(atPath: path, contents: nil)
        truncate(path, 1 << 20)
        let volume = try BlockVolume(name: "sink", path: path, recorder: InMemoryChangeRecorder(), pool: pool)
        volume.fence()
        return volume
    }

    func block(_ offset: UInt64, _ fill: UInt8, _ count: Int = 4096) -> SinkChange {
        .write(offset: offset, data: ByteBuffer(repeating: fill, count: count))
    }

    func contents(_ dir: String, at offset: Int, count: Int) -> [UInt8] {
        Array((FileManager.default.contents(atPath: dir + "/sink.img") ?? Data())[offset..<(offset + count)])
    }

    @Test("a batch is applied in order and its position recorded; a whole journal left by a crash is redone, a torn one dropped without touching the volume")
    func writeAheadJournal() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                let volume = try sinkVolume(dir, pool: pool)
                let journal = SinkJournal(directory: dir, volume: "sink")
                #expect(try journal.position() == nil)
                let first = SinkJournal.Position(source: "r/v", epoch: 7, sequence: 3)
                // The same block three times, then a zeroed range: the last write wins.
                try journal.apply([block(0, 1), block(0, 2), block(0, 3), block(8192, 9), .zero(offset: 8192, length: 4096)], through: first, to: volume)
                #expect(try journal.position() == first)
                #expect(contents(dir, at: 0, count: 4096).allSatisfy { $0 == 3 })
                #expect(contents(dir, at: 8192, count: 4096).allSatisfy { $0 == 0 })
                #expect(!FileManager.default.fileExists(atPath: journal.walPath))

                // A crash after the journal was durable, before the volume was written: redone.
                let second = SinkJournal.Position(source: "r/v", epoch: 7, sequence: 5)
                let wal = Self.journalBytes([block(4096, 5), block(0, 6)], through: second)
                try wal.write(to: URL(fileURLWithPath: journal.walPath))
                #expect(contents(dir, at: 0, count: 4096).allSatisfy { $0 == 3 })
                try journal.recover(volume: volume)
                #expect(try journal.position() == second)
                #expect(contents(dir, at: 0, count: 4096).allSatisfy { $0 == 6 } && contents(dir, at: 4096, count: 4096).allSatisfy { $0 == 5 })
                #expect(!FileManager.default.fileExists(atPath: journal.walPath))

                // Torn (cut short, or one byte flipped): never applied, dropped, position kept.
                let third = SinkJournal.Position(source: "r/v", epoch: 7, sequence: 6)
                let torn = Self.journalBytes([block(0, 7)], through: third)
                for bad in [torn.prefix(torn.count - 100), { var d = torn; d[40] ^= 1; return d }()] {
                    try Data(bad).write(to: URL(fileURLWithPath: journal.walPath))
                    try journal.recover(volume: volume)
                    #expect(try journal.position() == second)
                    #expect(contents(dir, at: 0, count: 4096).allSatisfy { $0 == 6 })
                    #expect(!FileManager.default.fileExists(atPath: journal.walPath))
                }
                // Blocks outside the volume are refused at decoding.
                let outside = Self.journalBytes([block((1 << 20) - 2048, 1)], through: third)
                #expect(SinkJournal.decode(outside, volumeSize: 1 << 20) == nil)
            }
        }
    }

    @Test("the replica hands out the records after a position in write order, bounded by count and bytes, across segments; a waiter wakes on the next append")
    func recordsInOrder() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                let store = try ReplicaStore(directory: dir + "/r", size: UnitReplicaStoreTests.size, pool: pool, segmentBytes: 256 << 10)
                let batches = UnitReplicaStoreTests()
                let now = Int64(Date().timeIntervalSince1970 * 1e9)
                // 10 records of 64 KiB in 256 KiB segments: they span several segments.
                _ = try await store.apply(batches.batch(epoch: 5, from: 1, count: 10, fill: 1, captured: now))
                let all = try await store.records(after: ReplicaPosition(epoch: 5, sequence: 3), maxBytes: 64 << 20, maxCount: 100)
                #expect(all.map(\.position.sequence) == Array(4...10))
                for e in all {
                    let i = Int(e.position.sequence - 1)
                    #expect(e.offset == (UInt64(i * 37 + 1) % 128) * 65536 && e.length == 65536)
                    #expect(e.data?.readableBytesView.allSatisfy { $0 == 1 &+ UInt8(i) } == true, "record \(e.position)")
                }
                #expect(try await store.records(after: ReplicaPosition(epoch: 5, sequence: 3), maxBytes: 64 << 20, maxCount: 2).map(\.position.sequence) == [4, 5])
                #expect(try await store.records(after: ReplicaPosition(epoch: 5, sequence: 3), maxBytes: 3 * 65536, maxCount: 100).count == 3)
                // At least one record, however small the byte bound.
                #expect(try await store.records(after: ReplicaPosition(epoch: 5, sequence: 0), maxBytes: 1, maxCount: 100).map(\.position.sequence) == [1])
                let latest = await store.latestPosition
                #expect(try await store.records(after: latest, maxBytes: 64 << 20, maxCount: 100).isEmpty)
                // An epoch the replica never had is refused, not read as empty.
                await #expect(throws: FerryError.self) { try await store.records(after: ReplicaPosition(epoch: 99, sequence: 1), maxBytes: 1, maxCount: 1) }

                let waiter = Task { await store.waitForAppend(beyond: latest) }
                _ = try await store.apply(batches.batch(epoch: 5, from: 11, count: 1, fill: 9, captured: now))
                await waiter.value
                #expect(try await store.records(after: latest, maxBytes: 64 << 20, maxCount: 100).map(\.position.sequence) == [11])
                // A cancelled waiter returns too.
                let cancelled = Task { await store.waitForAppend(beyond: await store.latestPosition) }
                cancelled.cancel()
                await cancelled.value
            }
        }
    }

    static func journalBytes(_ blocks: [SinkChange], through: SinkJournal.Position) -> Data {
        Data(SinkJournal.encode(blocks, through: through))
    }
}

@Suite("failback to another host: the plan's text")
struct UnitPlanRehomeTests {
    @Test("each item's and hook step's host: OLD line names the new host; recovery-host, other hosts, comments' hosts and quoting are handled")
    func rehomedText() {
        let source = """
            name: shop
            groups:
              - name: db
                pre:
                  - hook: quiesce
                    host: db
                items:
                  - host: db   # the database
                    recovery-host: rec1
                  - host: "db"
                    recovery-host: db
                  - host: dbx
                    recovery-host: rec2
            """
        let out = StateStore.rehomed(source, hosts: ["db": "db2"])
        let lines = out.split(separator: "\n").map(String.init)
        #expect(lines.filter { $0.contains("host: db2") }.count == 3, "\(out)")
        #expect(lines.contains("      - host: db2") && lines.contains("        host: db2"), "\(out)")
        #expect(lines.contains("        recovery-host: db") && lines.contains("      - host: dbx"), "recovery-host and other hosts stay: \(out)")
        #expect(StateStore.rehomed(source, hosts: [:]) == source)
    }
}
