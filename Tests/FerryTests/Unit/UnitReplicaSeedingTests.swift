@testable import FerryControllerCore
import FerryWire
import Foundation
import Logging
import NIOCore
import Synchronization
import Testing

/// A recovered volume's replica built on the controller from the source replica's point.
@Suite("replica seeding from a failover point")
struct UnitReplicaSeedingTests {
    static let size: UInt64 = 4 << 20

    func batch(epoch: UInt64, from sequence: UInt64, fills: [(offset: UInt64, byte: UInt8)]) -> Ferry_V1_ReplicationBatch {
        var b = Ferry_V1_ReplicationBatch()
        b.volume = "v"
        b.epoch = epoch
        b.records = fills.enumerated().map { i, f in
            var r = Ferry_V1_ReplicationRecord()
            r.sequence = sequence + UInt64(i)
            r.offset = f.offset
            r.data = Data(repeating: f.byte, count: 65536)
            r.capturedUnixNanos = 1
            return r
        }
        return b
    }

    /// Waits for `done` of a build, and returns whether the replica was put in place and the error.
    final class Outcome: Sendable {
        let value = Mutex<(Bool, String?)?>(nil)
    }

    @Test("the replica is the point byte for byte (not what the source wrote after it), synced, and opens; a point the source does not hold starts it empty (never synced) for a full initial sync instead of leaving it unbuilt")
    func seeds() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                let manager = ReplicaManager(root: dir + "/replicas", pool: pool)
                let source = try await manager.replica(hostID: "src", volume: "v", size: Self.size)
                _ = try await source.apply(batch(epoch: 7, from: 1, fills: [(0, 0x11), (1 << 20, 0x22)]))
                let point = ReplicaPosition(epoch: 7, sequence: 2)
                // Written after the point: not in the seeded replica.
                _ = try await source.apply(batch(epoch: 7, from: 3, fills: [(0, 0x33)]))
                let logger = Logger(label: "unit")
                let outcome = Outcome()
                #expect(await manager.ensureSeeded(hostID: "rec", volume: "v", size: Self.size, from: source, at: point, logger: logger) { inPlace, error in
                    outcome.value.withLock { $0 = (inPlace, error.map { "\($0)" }) }
                } == false)
                // While it builds, it is neither opened nor made empty.
                #expect(await manager.isSeeding(hostID: "rec", volume: "v"))
                await #expect(throws: FerryError.self) { _ = try await manager.replica(hostID: "rec", volume: "v", size: Self.size) }
                #expect(await eventually(timeout: .seconds(30), every: .milliseconds(20)) { outcome.value.withLock { $0 != nil } })
                #expect(outcome.value.withLock { $0?.0 == true && $0?.1 == nil })
                #expect(await !manager.isSeeding(hostID: "rec", volume: "v"))
                let seeded = try await manager.replica(hostID: "rec", volume: "v", size: Self.size)
                #expect(await seeded.state.initialSynced)
                let expected = try await source.openImage(at: point)
                var want = ByteBuffer(), got = ByteBuffer()
                try expected.read(offset: 0, length: Int(Self.size), into: &want)
                try expected.close()
                let image = try await seeded.openImage(at: ReplicaPosition(epoch: 0, sequence: 0))
                try image.read(offset: 0, length: Int(Self.size), into: &got)
                try image.close()
                #expect(want == got)
                #expect(want.getBytes(at: 0, length: 1) == [0x11] && want.getBytes(at: 1 << 20, length: 1) == [0x22])
                // Already there: nothing runs again.
                #expect(await manager.ensureSeeded(hostID: "rec", volume: "v", size: Self.size, from: source, at: point, logger: logger) { _, _ in })

                // A point the source does not hold.
                let failed = Outcome()
                _ = await manager.ensureSeeded(hostID: "rec", volume: "w", size: Self.size, from: source,
                                               at: ReplicaPosition(epoch: 99, sequence: 5), logger: logger) { inPlace, error in
                    failed.value.withLock { $0 = (inPlace, error.map { "\($0)" }) }
                }
                #expect(await eventually(timeout: .seconds(30), every: .milliseconds(20)) { failed.value.withLock { $0 != nil } })
                #expect(failed.value.withLock { $0?.0 == true && $0?.1 != nil })
                let empty = try await manager.replica(hostID: "rec", volume: "w", size: Self.size)
                #expect(await !empty.state.initialSynced)
                #expect(!FileManager.default.fileExists(atPath: dir + "/replicas/rec/w.seeding"))
            }
        }
    }
}
