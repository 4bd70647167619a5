import FerryWire
import Foundation
import Glibc
import Testing

/// A drill that lands on the recovery host's own storage, through real processes: the
/// controller, a source agent and a recovery agent, fio writing and verifying through the
/// recovered socket while the volume hydrates, both daemons killed -9 midway.
@Suite("hydrating drill", .serialized)
struct HydrationDrillTests {
    func fio(_ uri: String, _ extra: [String]) async throws -> CommandResult {
        try await run("/usr/bin/fio", ["--name=workload", "--ioengine=nbd", "--uri=\(uri)", "--rw=randwrite", "--bs=4k", "--size=8M",
                                       "--offset=200M", "--iodepth=8", "--verify=crc32c", "--verify_state_save=0",
                                       "--randseed=7"] + extra, timeout: .seconds(240))
    }

    func plan(_ controller: ControllerProcess) async throws -> API.Plan {
        let r = try await controller.ctl("plan", "show", "shop", "--json")
        guard r.status == 0 else { throw FerryError(.internalError, "plan show: \(r)") }
        return try API.decoder().decode(API.Plan.self, from: Data(r.stdout.utf8))
    }

    @Test("drill --hydrate: served at once, copied in the background (holes skipped, progress in plan show and /metrics), fio's writes survive kill -9 of both daemons midway, the copy resumes, the export is released when complete, and the workload goes on with the controller gone")
    func hydratingDrill() async throws {
        let failover = FailoverTests()
        let lab = try await HydrationLab.start(size: "256M", writes: ["write -P 0x11 0 64M", "write -P 0x22 128M 32M"])
        let dir = lab.dir, recConfig = lab.recConfig, site = lab.site, point = lab.point, target = lab.target, db = lab.db
        var controller = lab.controller, rec1 = lab.rec1
        var r: CommandResult
        // Hydration lands a drill, a failover or a migration: asked of another operation (through the
        // API) it is refused, nothing started.
        let api = try #require(controller.apiEnvironment["FERRY_API"]), token = try #require(controller.apiEnvironment["FERRY_TOKEN"])
        r = try await run("/usr/bin/curl", ["-sS", "--cacert", controller.caPath, "-H", "Authorization: Bearer \(token)",
                                            "-H", "Content-Type: application/json", "-d", #"{"operation":"commit","hydrate":true}"#,
                                            api + "/v1/plans/shop/jobs"])
        #expect(r.stdout.contains("bad-request") && r.stdout.contains("hydrate applies to a drill, a failover or a migration"), "\(r)")
        #expect(try await plan(controller).state == .protected)

        // Targets are checked before anything is served: outside the host's protect-allow, and on
        // a file system without room for the point's data (96 MiB on a 16 MiB tmpfs).
        let small = dir.sub("small")
        #expect(try await run("/usr/bin/mount", ["-t", "tmpfs", "-o", "size=16M", "ferry-test-small", small]).status == 0)
        defer { _ = umount2(small, Int32(MNT_DETACH)) }
        for (bad, reason) in [("/etc/ferry-hydration-test.img", "not allowed"), (small + "/t.img", "MiB free")] {
            try await lab.applyPlan(target: bad)
            let refused = try await failover.job(site, "drill", "shop", "--point", point, "--hydrate")
            #expect(refused.state == .failed && (refused.error ?? "").contains(reason), "\(refused)")
            #expect(!FileManager.default.fileExists(atPath: bad))
            // Nothing was recovered: the plan is as before, and no export was left behind.
            #expect(try await plan(controller).state == .protected)
            let exports = try await controller.ctl("exports", "--json")
            #expect(exports.status == 0 && !exports.stdout.contains("r-"), "\(exports)")
        }
        try await lab.applyPlan()

        let drill = try await failover.job(site, "drill", "shop", "--point", point, "--hydrate")
        #expect(drill.state == .succeeded, "\(drill)")
        let uri = "nbd+unix:///db-data?socket=\(dir.path)/agent-rec1/sockets/recovered-db-data.sock"
        // Served at once: the point's data reads back through the recovered socket.
        var q = try await failover.qemuIO(uri, "read -P 0x11 0 1M", "read -P 0x22 150M 1M", "read -P 0 100M 1M")
        #expect(q.ok, "\(q.output)")
        r = try await fio(uri, ["--do_verify=1", "--end_fsync=1"])
        #expect(r.status == 0, "\(r)")
        // Progress shows while it copies.
        #expect(try await eventually(timeout: .seconds(20), every: .milliseconds(200)) {
            guard let h = try await plan(controller).hydration?.first else { return false }
            return h.localBytes > 0 && !h.complete && h.target == target && h.sizeBytes == 256 << 20
        })

        // Both daemons die midway; both come back.
        let exportAddress = try String(contentsOfFile: controller.dataDir + "/nbd-tls-listen.addr", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        await rec1.kill9()
        await controller.process.kill9()
        controller = try await ControllerProcess.start(dataDir: controller.dataDir, listen: controller.agentAddress,
                                                       arguments: ["--nbd-tls-listen", exportAddress], logName: "controller-2.log")
        rec1 = try await AgentProcess.start(dataDir: dir.path + "/agent-rec1", arguments: ["--config", recConfig], logPath: dir.path + "/agent-rec1-2.log")
        // fio's flushed writes are there after the restart (the map kept their blocks local).
        // (The socket file outlives the killed agent: wait until the new one answers.)
        #expect(try await eventually(timeout: .seconds(20), every: .milliseconds(200)) {
            try await run("/usr/bin/nbdinfo", ["--size", uri]).status == 0
        }, "\(rec1.log.suffix(2000))")
        r = try await fio(uri, ["--verify_only"])
        #expect(r.status == 0, "after kill -9: \(r)")
        // It had not finished: the restarted agent resumes from its saved map, not from nothing.
        let resumed = rec1.log.split(separator: "\n").first { $0.contains("hydrating a recovered volume") }
        let local = resumed.flatMap { line in line.split(separator: " ").first { $0.hasPrefix("local=") } }.flatMap { UInt64($0.dropFirst(6)) }
        #expect(local.map { $0 > 0 && $0 < 256 << 20 } == true, "\(resumed ?? "no resume line")")

        // It completes; the controller's export for it is released.
        #expect(try await eventually(timeout: .seconds(180), every: .milliseconds(500)) {
            try await plan(controller).hydration?.first?.released == true
        }, "\(rec1.log.suffix(3000))")
        let done = try #require(try await plan(controller).hydration?.first)
        // In the drill job's report (the job ended before the copy did, and the controller restarted since).
        let job = try await controller.ctl("job", "show", drill.id, "--json")
        let report = try API.decoder().decode(API.Job.self, from: Data(job.stdout.utf8)).report["hydration_db-data"] ?? ""
        #expect(report.contains("complete on rec1") && report.contains("of \(256 << 20) bytes fetched"), "\(job)")
        // Also where the source volume is shown.
        let shown = try await controller.ctl("volume", "show", "db/data")
        #expect(shown.stdout.contains("hydration") && shown.stdout.contains("complete, export released") && shown.stdout.contains(target), "\(shown)")
        #expect(done.complete && done.localBytes == 256 << 20, "\(done)")
        // Holes were not moved: about the 96 MiB of data plus what fio read through before the copy.
        #expect(done.fetchedBytes < 140 << 20, "fetched \(done.fetchedBytes)")
        let exports = try await controller.ctl("exports", "--json")
        #expect(exports.status == 0 && !exports.stdout.contains("r-"), "\(exports)")
        let metrics = try await controller.ctl("metrics")
        #expect(metrics.stdout.contains("ferry_hydration_complete{") && metrics.stdout.contains("ferry_hydration_local_bytes{"), "\(metrics)")
        let audit = try await controller.audit()
        #expect(audit.contains { $0.action == "recovery.hydrated" && $0.target == "db/data" })

        // The target is the point with fio's writes: outside fio's range, byte for byte the point.
        let pointFile = dir.file("point.img")
        r = try await controller.ctl("volume", "export", "db/data", "--point", point, "--out", pointFile)
        #expect(r.status == 0, "\(r)")
        r = try await run("/usr/bin/cmp", ["-n", "\(200 << 20)", pointFile, target])
        #expect(r.status == 0, "\(r)")
        r = try await run("/usr/bin/cmp", ["-i", "\(208 << 20)", pointFile, target])
        #expect(r.status == 0, "\(r)")

        // The controller gone for good: the recovered workload goes on, writing and verifying.
        await controller.process.kill9()
        r = try await fio(uri, ["--do_verify=1", "--end_fsync=1", "--randseed=9"])
        #expect(r.status == 0, "with the controller gone: \(r)")
        q = try await failover.qemuIO(uri, "read -P 0x22 130M 1M")
        #expect(q.ok, "\(q.output)")
        db.signal(SIGTERM)
        rec1.signal(SIGTERM)
    }
}
