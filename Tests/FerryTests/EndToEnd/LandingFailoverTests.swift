import FerryWire
import Foundation
import Glibc
import Testing

/// Failovers that land on the recovery host's own storage (`--hydrate`), through real
/// processes: the recovered volume is a protected volume of its recovery host from its first
/// write, its replica built on the controller from the failover point, its group mirrored.
@Suite("failover that lands", .serialized)
struct LandingFailoverTests {
    static let plan = """
        name: shop
        groups:
          - name: db
            items:
              - host: db
                recovery-host: rec1
                targets:
                  data: TARGET
        """

    struct Lab {
        let dir: TestDirectory
        var controller: ControllerProcess
        let db: ChildProcess
        var rec1: ChildProcess
        let recConfig: String
        let site: FailoverTests.Site
        let point: String
        let target: String
        let planFile: String
    }

    let failover = FailoverTests()

    /// db protects 128 MiB with 48 MiB of data in a group; a point is cut; rec1's hydration is
    /// slowed (so it is midway when the test acts) and the plan lands db/data on rec1 at `target`.
    func lab() async throws -> Lab {
        let dir = try TestDirectory()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"), arguments: ["--nbd-tls-listen", "127.0.0.1:0"])
        let recConfig = dir.file("agent-rec1.yaml")
        try "hydration-rate-limit: 4M\n".write(toFile: recConfig, atomically: true, encoding: .utf8)
        let db = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir)
        let rec1 = try await AgentProcess.enrollAndStart("rec1", controller: controller, in: dir, arguments: ["--config", recConfig])
        #expect(try await controller.waitFor("db", state: "online"))
        #expect(try await controller.waitFor("rec1", state: "online"))
        var r = try await controller.ctl("protect", "db", "--volume", "data", "--path", dir.sub("volumes-db") + "/data.img", "--create-size", "128M")
        #expect(r.status == 0, "\(r)")
        let source = "nbd+unix:///data?socket=\(dir.path)/agent-db/sockets/data.sock"
        let w = try await failover.qemuIO(source, "write -P 0x11 0 32M", "write -P 0x22 64M 16M", "flush")
        #expect(w.ok, "\(w.output)")
        let site = FailoverTests.Site(dir: dir, controller: controller, agents: [:], hooks: "", images: [:], uris: [:])
        #expect(try await failover.caughtUp(site, "db/data"))
        r = try await controller.ctl("group", "create", "shop", "--volume", "db/data", "--crash-interval", "0", "--app-interval", "0")
        #expect(r.status == 0, "\(r)")
        r = try await controller.ctl("point", "create", "shop")
        #expect(r.status == 0, "\(r)")
        let point = r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let target = dir.path + "/rec1-target/db-data.img"
        let planFile = dir.file("plan.yaml")
        try Self.plan.replacingOccurrences(of: "TARGET", with: target).write(toFile: planFile, atomically: true, encoding: .utf8)
        r = try await controller.ctl("plan", "apply", "-f", planFile)
        #expect(r.status == 0, "\(r)")
        return Lab(dir: dir, controller: controller, db: db, rec1: rec1, recConfig: recConfig, site: site, point: point, target: target, planFile: planFile)
    }

    func planView(_ controller: ControllerProcess) async throws -> API.Plan {
        let r = try await controller.ctl("plan", "show", "shop", "--json")
        guard r.status == 0 else { throw FerryError(.internalError, "plan show: \(r)") }
        return try API.decoder().decode(API.Plan.self, from: Data(r.stdout.utf8))
    }

    func volumes(_ controller: ControllerProcess) async throws -> [API.Volume] {
        let r = try await controller.ctl("volumes", "--json")
        guard r.status == 0 else { throw FerryError(.internalError, "volumes: \(r)") }
        return try API.decoder().decode([API.Volume].self, from: Data(r.stdout.utf8))
    }

    @Test("failover --hydrate: pre-flight refuses before fencing; then the recovered volume is rec1's protected volume from its first write (replica built from the point, writes replicated, mirrored group's point equals rec1's disk), hydration survives kill -9 of rec1, the export goes when complete, the workload goes on with the controller gone, and its writes meanwhile replicate once it is back")
    func landingFailover() async throws {
        var lab = try await lab()
        var controller = lab.controller

        // Pre-flight: a target outside rec1's protect-allow fails the job before anything is fenced.
        try Self.plan.replacingOccurrences(of: "TARGET", with: "/etc/ferry-landing-test.img").write(toFile: lab.planFile, atomically: true, encoding: .utf8)
        var r = try await controller.ctl("plan", "apply", "-f", lab.planFile)
        #expect(r.status == 0, "\(r)")
        let refused = try await failover.job(lab.site, "failover", "shop", "--point", lab.point, "--hydrate")
        #expect(refused.state == .failed && (refused.error ?? "").contains("not allowed"), "\(refused)")
        #expect(refused.steps.first { $0.name.hasPrefix("fence") }?.state == .pending, "\(refused.steps)")
        #expect(try await planView(controller).state == .protected)
        let source = "nbd+unix:///data?socket=\(lab.dir.path)/agent-db/sockets/data.sock"
        #expect(try await failover.qemuIO(source, "write -P 0x44 100M 1M", "flush").ok, "the source still takes writes")
        #expect(!FileManager.default.fileExists(atPath: "/etc/ferry-landing-test.img"))
        try Self.plan.replacingOccurrences(of: "TARGET", with: lab.target).write(toFile: lab.planFile, atomically: true, encoding: .utf8)
        r = try await controller.ctl("plan", "apply", "-f", lab.planFile)
        #expect(r.status == 0, "\(r)")

        let job = try await failover.job(lab.site, "failover", "shop", "--point", lab.point, "--hydrate")
        #expect(job.state == .succeeded, "\(job)\n\(controller.process.log.suffix(3000))")
        #expect(try await planView(controller).state == .failedOver)
        // Served at once on rec1's own volume socket, the point's data there.
        let uri = "nbd+unix:///db-data?socket=\(lab.dir.path)/agent-rec1/sockets/db-data.sock"
        var q = try await failover.qemuIO(uri, "read -P 0x11 0 1M", "read -P 0x22 70M 1M", "read -P 0 100M 1M")
        #expect(q.ok, "\(q.output)")
        // Listed under rec1, a protected volume, at its target.
        let landed = try #require(try await volumes(controller).first { $0.host == "rec1" && $0.name == "db-data" })
        #expect(landed.path == lab.target && landed.sizeBytes == 128 << 20, "\(landed)")
        // Its first writes reach its own replica (built from the point: no initial sync).
        q = try await failover.qemuIO(uri, "write -P 0x33 8M 4M", "flush")
        #expect(q.ok, "\(q.output)")
        #expect(try await failover.caughtUp(lab.site, "rec1/db-data"), "\(controller.process.log.suffix(3000))")
        #expect(controller.process.log.contains("replica built from its failover point"))
        #expect((try await failover.volume(controller, "rec1/db-data").sync?.sentBytes ?? 0) < 16 << 20, "no full copy over the network")

        // The source group has a twin over the recovered volume.
        let groups = try await controller.ctl("groups")
        #expect(groups.stdout.contains("shop-recovered"), "\(groups)")

        // rec1 dies midway through the hydration and comes back: the copy resumes, the write stays.
        await lab.rec1.kill9()
        lab.rec1 = try AgentProcess.start(dataDir: lab.dir.path + "/agent-rec1", arguments: ["--config", lab.recConfig],
                                          logPath: lab.dir.path + "/agent-rec1-2.log")
        // (The killed agent's socket file stays until the new one binds it again.)
        #expect(try await eventually(timeout: .seconds(20), every: .milliseconds(200)) {
            try await failover.qemuIO(uri, readOnly: true, "read 0 4k").ok
        })
        q = try await failover.qemuIO(uri, "read -P 0x33 8M 4M", "read -P 0x11 0 8M", "read -P 0x11 12M 20M")
        #expect(q.ok, "after kill -9 of rec1: \(q.output)")
        // It had not finished: the restarted agent resumes from its saved map.
        let resumed = lab.rec1.log.split(separator: "\n").first { $0.contains("hydrating a recovered volume") }
        let local = resumed.flatMap { line in line.split(separator: " ").first { $0.hasPrefix("local=") } }.flatMap { UInt64($0.dropFirst(6)) }
        #expect(local.map { $0 > 0 && $0 < 128 << 20 } == true, "\(resumed ?? "no resume line")")

        // Complete: the point export is released.
        #expect(try await eventually(timeout: .seconds(120), every: .milliseconds(500)) {
            try await planView(controller).hydration?.first?.released == true
        }, "\(lab.rec1.log.suffix(3000))")
        let exports = try await controller.ctl("exports", "--json")
        #expect(exports.status == 0 && !exports.stdout.contains("r-"), "\(exports)")

        // A point of the mirrored group equals rec1's disk byte for byte.
        #expect(try await failover.caughtUp(lab.site, "rec1/db-data"))
        r = try await controller.ctl("point", "create", "shop-recovered")
        #expect(r.status == 0, "\(r)")
        let recoveredPoint = r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let pointFile = lab.dir.file("recovered-point.img")
        r = try await controller.ctl("volume", "export", "rec1/db-data", "--point", recoveredPoint, "--out", pointFile)
        #expect(r.status == 0, "\(r)")
        r = try await run("/usr/bin/cmp", [pointFile, lab.target])
        #expect(r.status == 0, "\(r)")

        // Reprotect from a landed failover is not built: refused, clearly, nothing changed.
        let reprotect = try await controller.ctl("reprotect", "shop", "--json")
        #expect(reprotect.status != 0 && reprotect.stderr.contains("not available yet"), "\(reprotect)")

        // The controller gone: the workload goes on on rec1's own storage.
        let exportAddress = try String(contentsOfFile: controller.dataDir + "/nbd-tls-listen.addr", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        await controller.process.kill9()
        q = try await failover.qemuIO(uri, "write -P 0x55 40M 2M", "flush", "read -P 0x55 40M 2M", "read -P 0x22 64M 16M")
        #expect(q.ok, "with the controller gone: \(q.output)")
        // Back: what was written meanwhile replicates.
        controller = try await ControllerProcess.start(dataDir: controller.dataDir, listen: controller.agentAddress,
                                                       arguments: ["--nbd-tls-listen", exportAddress], logName: "controller-2.log")
        let site = FailoverTests.Site(dir: lab.dir, controller: controller, agents: [:], hooks: "", images: [:], uris: [:])
        #expect(try await failover.caughtUp(site, "rec1/db-data"), "\(controller.process.log.suffix(3000))")
        r = try await controller.ctl("point", "create", "shop-recovered")
        #expect(r.status == 0, "\(r)")
        r = try await controller.ctl("volume", "export", "rec1/db-data", "--point", r.stdout.trimmingCharacters(in: .whitespacesAndNewlines),
                                     "--out", pointFile, "--force")
        #expect(r.status == 0, "\(r)")
        r = try await run("/usr/bin/cmp", [pointFile, lab.target])
        #expect(r.status == 0, "\(r)")
        lab.db.signal(SIGTERM)
        lab.rec1.signal(SIGTERM)
    }

    @Test("migrate --hydrate: zero data loss, the workload ends on rec1's storage as rec1's protected volume, the source unprotected, and nothing of it on the controller's data path")
    func landingMigration() async throws {
        let lab = try await lab()
        let controller = lab.controller
        let source = "nbd+unix:///data?socket=\(lab.dir.path)/agent-db/sockets/data.sock"
        // Written after the point: a planned move loses nothing.
        #expect(try await failover.qemuIO(source, "write -P 0x66 90M 2M", "flush").ok)
        let job = try await failover.job(lab.site, "migrate", "shop", "--hydrate")
        #expect(job.state == .succeeded, "\(job)\n\(controller.process.log.suffix(3000))")
        #expect(try await planView(controller).state == .migrated)
        #expect(job.report["rpo_seconds"] == "0", "\(job.report)")
        let all = try await volumes(controller)
        #expect(!all.contains { $0.host == "db" }, "the source is unprotected: \(all.map { "\($0.host)/\($0.name)" })")
        #expect(all.contains { $0.host == "rec1" && $0.name == "db-data" && $0.path == lab.target })
        let uri = "nbd+unix:///db-data?socket=\(lab.dir.path)/agent-rec1/sockets/db-data.sock"
        var q = try await failover.qemuIO(uri, "read -P 0x66 90M 2M", "read -P 0x11 0 1M")
        #expect(q.ok, "\(q.output)")
        #expect(try await eventually(timeout: .seconds(120), every: .milliseconds(500)) {
            try await planView(controller).hydration?.first?.released == true
        }, "\(lab.rec1.log.suffix(3000))")
        #expect(try await failover.caughtUp(lab.site, "rec1/db-data"))
        // Nothing of it is served by the controller any more: it goes, the workload does not notice.
        await controller.process.kill9()
        q = try await failover.qemuIO(uri, "write -P 0x77 0 4M", "flush", "read -P 0x77 0 4M", "read -P 0x66 90M 2M", "read -P 0x22 64M 16M")
        #expect(q.ok, "with the controller gone: \(q.output)")
        lab.db.signal(SIGTERM)
        lab.rec1.signal(SIGTERM)
    }
}
