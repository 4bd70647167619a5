@testable import FerryAgentCore
import FerryNBD
import FerryWire
import Foundation
import Logging
import NIOCore
import NIOPosix
import Synchronization
import Testing

/// A recovered volume hydrating onto a local target from a point served over NBD, with the real
/// clients as the workload: fio (verify=crc32c) and qemu-io through the hydrating export, while
/// the copier runs; a reopen from the saved map resumes; the target ends as the point with the
/// workload's writes.
@Suite("hydration")
struct HydrationTests {
    /// The point: a sparse file with data in three places, served read-only on a unix socket.
    final class Point: Sendable {
        let dir: TestDirectory
        let image: String
        let socket: String
        let pool: NIOThreadPool
        let serving: Task<Void, any Error>
        static let size: UInt64 = 256 << 20
        static let data: [(offset: UInt64, length: Int)] = [(8 << 20, 16 << 20), (100 << 20, 32 << 20), (200 << 20, 1 << 20)]

        init() async throws {
            dir = try TestDirectory("ferry-hydrate")
            image = dir.file("point.img")
            socket = dir.file("point.sock")
            #expect(FileManager.default.createFile(atPath: image, contents: nil))
            #expect(truncate(image, off_t(Self.size)) == 0)
            let fd = open(image, O_WRONLY)
            for (i, d) in Self.data.enumerated() {
                var bytes = [UInt8](repeating: 0, count: d.length)
                for j in stride(from: 0, to: d.length, by: 4096) { bytes[j] = UInt8(truncatingIfNeeded: i * 31 + j / 4096 + 1); bytes[j + 1] = 0xA5 }
                _ = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(d.offset)) }
            }
            close(fd)
            pool = NIOThreadPool(numberOfThreads: 2)
            pool.start()
            let volume = try BlockVolume(name: "point", path: image, recorder: InMemoryChangeRecorder(), pool: pool, readOnly: true)
            let server = NBDServer(volumes: [volume], logger: Logger(label: "point"))
            var tasks: [Task<Void, any Error>] = []
            try await server.start(unixSocket: socket, into: &tasks)
            serving = tasks[0]
        }

        func connect(allocation: Bool) -> @Sendable () async throws -> NBDClient {
            let socket = self.socket
            return { try await NBDClient.connect(unixSocket: socket, export: "point", allocation: allocation) }
        }

        deinit {
            serving.cancel()
            try? pool.syncShutdownGracefully()
        }
    }

    /// A hydrating volume over a target in the point's directory, served on a socket of its own.
    final class Recovered: Sendable {
        let volume: HydratingVolume
        let socket: String
        let serving: Task<Void, any Error>
        let completions: Completions
        var uri: String { "nbd+unix:///data?socket=\(socket)" }

        init(_ point: Point, target: String, socketName: String) async throws {
            let remote = RecoveredVolume(name: "data", source: "db/data", size: Point.size, first: nil, retryFor: .seconds(30),
                                         logger: Logger(label: "remote"), connect: point.connect(allocation: false))
            let completions = Completions()
            self.completions = completions
            volume = try HydratingVolume.open(name: "data", source: "db/data", size: Point.size, target: target,
                                              mapPath: target + ".map", point: "point-1", remote: remote,
                                              logger: Logger(label: "hydrate"), onComplete: { completions.add() })
            socket = point.dir.file(socketName)
            var tasks: [Task<Void, any Error>] = []
            try await NBDServer(volumes: [volume], logger: Logger(label: "recovered")).start(unixSocket: socket, into: &tasks)
            serving = tasks[0]
        }

        deinit { serving.cancel() }
    }

    @Test("reads fetch and keep what is not local, the copier skips holes and never overwrites a workload write (fio verify during hydration), a reopen resumes from the saved map, and the target ends as the point plus the writes")
    func hydrateWhileServing() async throws {
        let point = try await Point()
        let target = point.dir.file("target.img")
        var recovered: Recovered? = try await Recovered(point, target: target, socketName: "r1.sock")
        let r1 = try #require(recovered)

        // Read-through before any copying: the data is the point's, and only what was read is fetched.
        var r = try await run("/usr/bin/qemu-io", ["-f", "raw", "-c", "read -P 0 0 1M", r1.uri])
        #expect(r.status == 0, "\(r)")
        let reader = try await NBDClient.connect(unixSocket: r1.socket, export: "data")
        let got = try await reader.read(offset: 100 << 20, length: 8192)
        await reader.close()
        let file = try #require(FileHandle(forReadingAtPath: point.image))
        try file.seek(toOffset: 100 << 20)
        #expect(Array(got.readableBytesView) == Array(try #require(try file.read(upToCount: 8192))))
        let afterRead = r1.volume.progress
        #expect(afterRead.fetchedBytes > 0 && afterRead.fetchedBytes <= 2 << 20, "\(afterRead)")
        #expect(!afterRead.complete)

        // The copier, slowed to 8 MiB/s, stopped partway as by kill -9 of the agent: the map was saved.
        let pool = point.pool
        let reports = Reports()
        let copier = Task {
            await Hydrator(volume: r1.volume, connect: point.connect(allocation: true), pool: pool, logger: Logger(label: "copier"),
                           rateLimit: 8 << 20, report: { p, _ in reports.add(p) }).run()
        }
        // (A long bound: on a loaded 2-core machine the copier's first steps can wait on the pools.)
        #expect(await eventually(timeout: .seconds(120), every: .milliseconds(20)) { r1.volume.progress.fetchedBytes >= afterRead.fetchedBytes + (4 << 20) })
        copier.cancel()
        await copier.value
        let saved = r1.volume.progress
        #expect(!saved.complete && saved.localBytes > afterRead.localBytes, "\(saved)")
        recovered = nil

        // Reopened: it resumes from the saved map; the copier and fio at once (fio's verify fails
        // on any block the copier put back over a write).
        let r2 = try await Recovered(point, target: target, socketName: "r2.sock")
        #expect(r2.volume.progress.localBytes == saved.localBytes, "the saved map resumes: \(saved)")
        let resumed = Task {
            await Hydrator(volume: r2.volume, connect: point.connect(allocation: true), pool: pool, logger: Logger(label: "copier"),
                           rateLimit: 16 << 20, report: { p, _ in reports.add(p) }).run()
        }
        r = try await run("/usr/bin/fio", [
            "--name=workload", "--ioengine=nbd", "--uri=\(r2.uri)", "--rw=randrw", "--bs=4k", "--size=48M", "--offset=4M",
            "--iodepth=16", "--verify=crc32c", "--verify_state_save=0", "--do_verify=1", "--end_fsync=1",
        ], timeout: .seconds(240))
        #expect(r.status == 0, "\(r)")
        await resumed.value
        let done = r2.volume.progress
        #expect(done.complete && done.localBytes == Point.size, "\(done)")
        #expect(r2.completions.count == 1)
        // Holes and zero ranges were not moved: about the data ranges (49 MiB) and fio's reads.
        #expect(saved.fetchedBytes + done.fetchedBytes < 100 << 20, "fetched \(saved.fetchedBytes) + \(done.fetchedBytes)")
        #expect(reports.last?.complete == true)

        // fio's writes are still there after the copier finished; elsewhere the target is the point.
        r = try await run("/usr/bin/fio", [
            "--name=workload", "--ioengine=nbd", "--uri=\(r2.uri)", "--rw=randrw", "--bs=4k", "--size=48M", "--offset=4M",
            "--iodepth=16", "--verify=crc32c", "--verify_state_save=0", "--verify_only",
        ], timeout: .seconds(240))
        #expect(r.status == 0, "\(r)")
        r = try await run("/usr/bin/cmp", ["-n", "\(4 << 20)", point.image, target])
        #expect(r.status == 0, "\(r)")
        r = try await run("/usr/bin/cmp", ["-i", "\(52 << 20)", point.image, target])
        #expect(r.status == 0, "\(r)")
        // The target stayed sparse where the point has holes (holes are not written).
        var st = stat()
        stat(target, &st)
        #expect(Int(st.st_blocks) * 512 < 120 << 20, "target allocates \(Int(st.st_blocks) * 512) bytes")
        // Complete: its allocation map is the target's own.
        let map = try await NBDExportTests.nbdinfoMap(r2.uri)
        #expect(map.contains { $0.offset == 100 << 20 && $0.data } && map.contains { !$0.data }, "\(map)")
    }

    final class Completions: Sendable {
        private let value = Atomic<Int>(0)
        func add() { value.add(1, ordering: .relaxed) }
        var count: Int { value.load(ordering: .relaxed) }
    }

    final class Reports: Sendable {
        private let list = Mutex<[HydratingVolume.Progress]>([])
        func add(_ p: HydratingVolume.Progress) { list.withLock { $0.append(p) } }
        var last: HydratingVolume.Progress? { list.withLock { $0.last } }
    }

    @Test("the map: runs of missing blocks, the first missing, the last short block, and its file form (damaged or foreign maps refused)")
    func map() throws {
        var map = HydrationMap(size: 10 * 65536 + 100, source: "p", targetZeroed: true)
        #expect(map.blockCount == 11)
        #expect(map.missingRuns(in: 0..<11) == [0..<11])
        map.setLocal(3)
        map.setLocal(4)
        #expect(map.missingRuns(in: 0..<11, maxBlocks: 2) == [0..<2, 2..<3, 5..<7, 7..<9, 9..<11])
        #expect(map.firstMissing(from: 3) == 5)
        for b in 0..<10 { map.setLocal(b) }
        #expect(map.firstMissing(from: 0) == 10 && !map.isComplete)
        map.setLocal(10)
        #expect(map.isComplete && map.localBytes == 10 * 65536 + 100 && map.firstMissing(from: 0) == nil)
        let decoded = HydrationMap.decode(map.encoded())
        #expect(decoded == map)
        var bytes = map.encoded()
        bytes[bytes.count - 1] |= 0x80 // a bit past the last block
        #expect(HydrationMap.decode(bytes) == nil)
        #expect(HydrationMap.decode(Array(map.encoded().dropLast())) == nil)
        #expect(HydrationMap.decode(Array("not a map".utf8)) == nil)
    }
}
