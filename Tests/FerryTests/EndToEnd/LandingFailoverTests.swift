import FerryWire
import Foundation
import Glibc
import Testing

/// Failovers that land on the recovery host's own storage (`--hydrate`), through real
/// processes: the recovered volume is a protected volume of its recovery host from its first
/// write, its replica built on the controller from the failover point, its group mirrored.
@Suite("failover that lands", .serialized)
struct LandingFailoverTests {
    let failover = FailoverTests()

    /// db protects 128 MiB with 48 MiB of data; see `HydrationLab`.
    func lab() async throws -> HydrationLab {
        try await HydrationLab.start(size: "128M", writes: ["write -P 0x11 0 32M", "write -P 0x22 64M 16M"])
    }

    func planView(_ controller: ControllerProcess) async throws -> API.Plan {
        let r = try await controller.ctl("plan", "show", "shop", "--json")
        guard r.status == 0 else { throw FerryError(.internalError, "plan show: \(r)") }
        return try API.decoder().decode(API.Plan.self, from: Data(r.stdout.utf8))
    }

    /// A new point of the mirrored group, exported, is rec1's landed disk byte for byte.
    func expectRecoveredPointEqualsTarget(_ controller: ControllerProcess, _ lab: HydrationLab) async throws {
        var r = try await controller.ctl("point", "create", "shop-recovered")
        #expect(r.status == 0, "\(r)")
        let pointFile = lab.dir.file("recovered-point.img")
        r = try await controller.ctl("volume", "export", "rec1/db-data", "--point", r.stdout.trimmingCharacters(in: .whitespacesAndNewlines),
                                     "--out", pointFile, "--force")
        #expect(r.status == 0, "\(r)")
        r = try await run("/usr/bin/cmp", [pointFile, lab.target])
        #expect(r.status == 0, "\(r)")
    }

    func volumes(_ controller: ControllerProcess) async throws -> [API.Volume] {
        let r = try await controller.ctl("volumes", "--json")
        guard r.status == 0 else { throw FerryError(.internalError, "volumes: \(r)") }
        return try API.decoder().decode([API.Volume].self, from: Data(r.stdout.utf8))
    }

    /// A failover --hydrate of plan shop at the lab's point, then 4 MiB of 0x33 at 8 MiB written
    /// on rec1's landed volume and replicated. Returns that volume's NBD URI.
    func landedFailover(_ lab: HydrationLab) async throws -> String {
        let job = try await failover.job(lab.site, "failover", "shop", "--point", lab.point, "--hydrate")
        #expect(job.state == .succeeded, "\(job)\n\(lab.controller.process.log.suffix(3000))")
        let uri = "nbd+unix:///db-data?socket=\(lab.dir.path)/agent-rec1/sockets/db-data.sock"
        #expect(try await failover.qemuIO(uri, "write -P 0x33 8M 4M", "flush").ok)
        #expect(try await failover.caughtUp(lab.site, "rec1/db-data"), "\(lab.controller.process.log.suffix(3000))")
        return uri
    }

    @Test("failover --hydrate: pre-flight refuses before fencing; then the recovered volume is rec1's protected volume from its first write (replica built from the point, writes replicated, mirrored group's point equals rec1's disk), hydration survives kill -9 of rec1, the export goes when complete, the workload goes on with the controller gone, and its writes meanwhile replicate once it is back")
    func landingFailover() async throws {
        var lab = try await lab()
        var controller = lab.controller

        // Pre-flight: a target outside rec1's protect-allow fails the job before anything is fenced.
        try await lab.applyPlan(target: "/etc/ferry-landing-test.img")
        let refused = try await failover.job(lab.site, "failover", "shop", "--point", lab.point, "--hydrate")
        #expect(refused.state == .failed && (refused.error ?? "").contains("not allowed"), "\(refused)")
        #expect(refused.steps.first { $0.name.hasPrefix("fence") }?.state == .pending, "\(refused.steps)")
        #expect(try await planView(controller).state == .protected)
        let source = "nbd+unix:///data?socket=\(lab.dir.path)/agent-db/sockets/data.sock"
        #expect(try await failover.qemuIO(source, "write -P 0x44 100M 1M", "flush").ok, "the source still takes writes")
        #expect(!FileManager.default.fileExists(atPath: "/etc/ferry-landing-test.img"))
        try await lab.applyPlan()

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
        lab.rec1 = try await AgentProcess.start(dataDir: lab.dir.path + "/agent-rec1", arguments: ["--config", lab.recConfig],
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
        try await expectRecoveredPointEqualsTarget(controller, lab)

        // A rollback would throw away what rec1 wrote since: refused, clearly, nothing changed.
        let rollback = try await controller.ctl("rollback", "shop", "--json")
        #expect(rollback.status != 0 && rollback.stderr.contains("reprotect and fail back instead"), "\(rollback)")
        #expect(try await planView(controller).state == .failedOver)

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
        try await expectRecoveredPointEqualsTarget(controller, lab)
        lab.db.signal(SIGTERM)
        lab.rec1.signal(SIGTERM)
    }

    @Test("reprotect of a landed failover: db/data is made equal by block hashes, then follows rec1/db-data's journal in write order (sink lag in ferryctl volumes), through kill -9 of db and of the controller; failback is a planned failover in reverse: zero data loss, db/data owns its volume again, rec1's landed volume and mirrored group go")
    func landedReprotectAndFailback() async throws {
        var lab = try await lab()
        var controller = lab.controller
        let uri = try await landedFailover(lab)

        // Reprotect: only what rec1 changed travels (4 MiB), not the 48 MiB of data, and under
        // db's WAN limit (16 Mbit/s): a reverse stream passes it too.
        var limit = try await controller.ctl("wan", "set", "--host", "db", "--limit", "16mbit")
        #expect(limit.status == 0, "\(limit)")
        let reprotect = try await failover.job(lab.site, "reprotect", "shop")
        #expect(reprotect.state == .succeeded, "\(reprotect)\n\(controller.process.log.suffix(3000))")
        let throttledOut = try await WANTests().metric(controller, #"ferry_wan_throttled_seconds_total{host="db",direction="out"}"#)
        #expect(throttledOut > 1, "4 MiB or more at 2 MB/s into db: waited \(throttledOut) s")
        limit = try await controller.ctl("wan", "set", "--host", "db", "--limit", "none")
        #expect(limit.status == 0, "\(limit)")
        #expect(try await planView(controller).state == .reversed)
        let sent = UInt64(reprotect.report["bytes_sent"] ?? "") ?? 0
        #expect(sent >= 4 << 20 && sent < 16 << 20, "\(reprotect.report)")
        #expect(reprotect.steps.contains { $0.detail?.contains("following rec1's journal in write order") == true }, "\(reprotect.steps)")

        // rec1's writes from now on reach db's disk in write order: the same range overwritten
        // three times ends as the last write; a new range arrives too.
        #expect(try await failover.qemuIO(uri, "write -P 0x61 20M 1M", "write -P 0x62 20M 1M", "write -P 0x63 20M 1M",
                                          "write -P 0x64 100M 2M", "flush").ok)
        let sinkFile = lab.dir.sub("volumes-db") + "/data.img"
        func sinkCaughtUp() async throws -> Bool {
            try await eventually(timeout: .seconds(60), every: .milliseconds(300)) {
                guard let sink = try await volumes(controller).first(where: { $0.host == "db" && $0.name == "data" })?.sink else { return false }
                return sink.behindRecords == 0 && sink.sequence > 0 && sink.follows == "rec1/db-data" && sink.lagSeconds == 0
            }
        }
        #expect(try await failover.caughtUp(lab.site, "rec1/db-data"))
        #expect(try await sinkCaughtUp(), "\(controller.process.log.suffix(3000))")
        func sinkHolds(_ pattern: UInt8, at offset: Int, count: Int) throws -> Bool {
            let handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: sinkFile))
            defer { try? handle.close() }
            try handle.seek(toOffset: UInt64(offset))
            let bytes = try handle.read(upToCount: count) ?? Data()
            return bytes.count == count && bytes.allSatisfy { $0 == pattern }
        }
        #expect(try sinkHolds(0x63, at: 20 << 20, count: 1 << 20))
        #expect(try sinkHolds(0x64, at: 100 << 20, count: 2 << 20))
        #expect(try sinkHolds(0x33, at: 8 << 20, count: 4 << 20))
        // The source itself stays fenced: its own workload cannot write it meanwhile.
        let source = "nbd+unix:///data?socket=\(lab.dir.path)/agent-db/sockets/data.sock"
        #expect(try await !failover.qemuIO(source, "write -P 0x99 0 4k").ok, "a sink is read-only to its own workload")

        // db dies while rec1 writes; back, it goes on from the position it recorded.
        await lab.db.kill9()
        #expect(try await failover.qemuIO(uri, "write -P 0x71 30M 3M", "write -P 0x72 31M 1M", "flush").ok)
        let db = try await AgentProcess.start(dataDir: lab.dir.path + "/agent-db", logPath: lab.dir.path + "/agent-db-2.log")
        #expect(try await controller.waitFor("db", state: "online"))
        // "Caught up" is relative to what the controller has journaled, and rec1 may still be
        // sending these writes: wait for the data itself.
        #expect(try await eventually(timeout: .seconds(60), every: .milliseconds(300)) {
            try sinkHolds(0x71, at: 30 << 20, count: 1 << 20) && sinkHolds(0x72, at: 31 << 20, count: 1 << 20) && sinkHolds(0x71, at: 32 << 20, count: 1 << 20)
        }, "\(controller.process.log.suffix(3000))")
        #expect(try await sinkCaughtUp(), "\(controller.process.log.suffix(3000))")

        // The controller killed -9 and back: the sinks follow on from the positions they recorded.
        let exportAddress = try String(contentsOfFile: controller.dataDir + "/nbd-tls-listen.addr", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        await controller.process.kill9()
        #expect(try await failover.qemuIO(uri, "write -P 0x73 34M 1M", "flush").ok)
        controller = try await ControllerProcess.start(dataDir: controller.dataDir, listen: controller.agentAddress,
                                                       arguments: ["--nbd-tls-listen", exportAddress], logName: "controller-2.log")
        lab.controller = controller
        // rec1 resends what the killed controller had not acked once it reconnects: wait for the data.
        #expect(try await eventually(timeout: .seconds(60), every: .milliseconds(300)) {
            try sinkHolds(0x73, at: 34 << 20, count: 1 << 20)
        }, "\(controller.process.log.suffix(3000))")
        #expect(try await sinkCaughtUp(), "\(controller.process.log.suffix(3000))")

        // The last write before failback: zero data loss means it is on db afterwards.
        #expect(try await failover.qemuIO(uri, "write -P 0x7f 50M 1M", "flush").ok)
        let site = FailoverTests.Site(dir: lab.dir, controller: controller, agents: [:], hooks: "", images: [:], uris: [:])
        let failback = try await failover.job(site, "failback", "shop")
        #expect(failback.state == .succeeded, "\(failback)\n\(controller.process.log.suffix(3000))")
        #expect(failback.steps.contains { $0.detail?.contains("zero data loss") == true }, "\(failback.steps)")
        #expect(try await planView(controller).state == .protected)
        var q = try await failover.qemuIO(source, "read -P 0x7f 50M 1M", "read -P 0x63 20M 1M", "read -P 0x72 31M 1M", "read -P 0x33 8M 4M",
                                          "read -P 0x11 0 8M", "read -P 0x22 64M 16M", "read -P 0x64 100M 2M")
        #expect(q.ok, "after failback: \(q.output)")
        // db owns its volume again, protected; rec1's landed volume and the mirrored group are gone.
        q = try await failover.qemuIO(source, "write -P 0x81 60M 1M", "flush")
        #expect(q.ok, "\(q.output)")
        #expect(try await failover.caughtUp(site, "db/data"), "\(controller.process.log.suffix(3000))")
        let all = try await volumes(controller)
        #expect(!all.contains { $0.host == "rec1" }, "\(all.map { "\($0.host)/\($0.name)" })")
        #expect(all.first { $0.host == "db" }?.sink == nil)
        let groups = try await controller.ctl("groups")
        #expect(groups.status == 0 && !groups.stdout.contains("shop-recovered"), "\(groups)")
        db.signal(SIGTERM)
        lab.rec1.signal(SIGTERM)
    }

    @Test("failback --to db=db2 after a landed failover with db lost for good: refused for the recovery host or a host not in the plan; db2's volume is created and made equal by a full copy (bytes reported), takes db's place in the plan (its text too) and group shop, serves every write with zero loss and is protected; db's volume is released")
    func landedFailbackToAnotherHost() async throws {
        let lab = try await lab()
        let controller = lab.controller
        let db2 = try await AgentProcess.enrollAndStart("db2", controller: controller, in: lab.dir)
        #expect(try await controller.waitFor("db2", state: "online"))
        let uri = try await landedFailover(lab)
        let reprotect = try await failover.job(lab.site, "reprotect", "shop")
        #expect(reprotect.state == .succeeded, "\(reprotect)")
        #expect(try await failover.qemuIO(uri, "write -P 0x7f 50M 1M", "flush").ok)

        for (to, why) in [("db=rec1", "neither its recovery host"), ("web=db2", "has no item for host web"), ("db", "HOST=NEWHOST")] {
            let r = try await controller.ctl("failback", "shop", "--to", to)
            #expect(r.status != 0 && r.stderr.contains(why), "--to \(to): \(r)")
        }
        #expect(try await planView(controller).state == .reversed)

        // db is lost for good (its agent and its disk): db2 takes its place, at the same path.
        await lab.db.kill9()
        try FileManager.default.removeItem(atPath: lab.dir.sub("volumes-db") + "/data.img")
        let failback = try await failover.job(lab.site, "failback", "shop", "--to", "db=db2")
        #expect(failback.state == .succeeded, "\(failback)\n\(controller.process.log.suffix(3000))")
        let prepared = failback.steps.first { $0.name.hasPrefix("make db2's volumes equal") }?.detail ?? ""
        #expect(prepared.contains("created data empty (full copy)"), "\(failback.steps)")
        let moved = UInt64(prepared.split(separator: " ").first { $0.allSatisfy(\.isNumber) }.map(String.init) ?? "") ?? 0
        // The point's 48 MiB of data and rec1's writes since (zero blocks do not travel).
        #expect(moved >= 48 << 20 && moved <= 53 << 20, "\(prepared)")
        let plan = try await planView(controller)
        #expect(plan.state == .protected && plan.plan.groups.first?.items.first?.host == "db2", "\(plan)")
        #expect(plan.source.contains("- host: db2") && !plan.source.contains("host: db\n"), "\(plan.source)")
        let db2URI = "nbd+unix:///data?socket=\(lab.dir.path)/agent-db2/sockets/data.sock"
        var q = try await failover.qemuIO(db2URI, "read -P 0x7f 50M 1M", "read -P 0x33 8M 4M", "read -P 0x11 0 8M", "read -P 0x22 64M 16M", "read -P 0 100M 1M")
        #expect(q.ok, "db2 after failback: \(q.output)")
        q = try await failover.qemuIO(db2URI, "write -P 0x81 60M 1M", "flush")
        #expect(q.ok, "\(q.output)")
        #expect(try await failover.caughtUp(lab.site, "db2/data"), "\(controller.process.log.suffix(3000))")
        let all = try await volumes(controller).map { "\($0.host)/\($0.name)" }
        #expect(all == ["db2/data"], "\(all)")
        let groups = try await controller.ctl("group", "show", "shop", "--json")
        #expect(groups.status == 0 && groups.stdout.contains("db2/data") && !groups.stdout.contains("\"db/data\""), "\(groups)")
        db2.signal(SIGTERM)
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

    @Test("the landed site is a protected site like any other: after migrate --hydrate onto rec1, rec1 is lost and its plan fails over again, at a point of the landed replica, onto rec2")
    func secondFailover() async throws {
        let lab = try await lab()
        let controller = lab.controller
        let rec2 = try await AgentProcess.enrollAndStart("rec2", controller: controller, in: lab.dir)
        #expect(try await controller.waitFor("rec2", state: "online"))
        let job = try await failover.job(lab.site, "migrate", "shop", "--hydrate")
        #expect(job.state == .succeeded, "\(job)")
        #expect(try await eventually(timeout: .seconds(120), every: .milliseconds(500)) {
            try await planView(controller).hydration?.first?.released == true
        })
        // The workload writes on rec1; a point of the landed volume's group holds it.
        let landed = "nbd+unix:///db-data?socket=\(lab.dir.path)/agent-rec1/sockets/db-data.sock"
        #expect(try await failover.qemuIO(landed, "write -P 0x88 20M 1M", "flush").ok)
        #expect(try await failover.caughtUp(lab.site, "rec1/db-data"))
        var r = try await controller.ctl("point", "create", "shop-recovered")
        #expect(r.status == 0, "\(r)")
        let point = r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        // A plan for the landed site, then rec1 is lost for good.
        let planFile = lab.dir.file("plan2.yaml")
        try """
            name: shop2
            groups:
              - name: db
                items:
                  - host: rec1
                    recovery-host: rec2
            """.write(toFile: planFile, atomically: true, encoding: .utf8)
        r = try await controller.ctl("plan", "apply", "-f", planFile)
        #expect(r.status == 0, "\(r)")
        await lab.rec1.kill9()
        let again = try await failover.job(lab.site, "failover", "shop2", "--point", point, "--hydrate")
        #expect(again.state == .succeeded, "\(again)\n\(controller.process.log.suffix(3000))")
        let second = "nbd+unix:///rec1-db-data?socket=\(lab.dir.path)/agent-rec2/sockets/rec1-db-data.sock"
        let q = try await failover.qemuIO(second, "read -P 0x88 20M 1M", "read -P 0x11 0 20M", "read -P 0x22 64M 16M", "read -P 0 100M 1M")
        #expect(q.ok, "\(q.output)")
        let all = try await volumes(controller)
        #expect(all.contains { $0.host == "rec2" && $0.name == "rec1-db-data" }, "\(all.map { "\($0.host)/\($0.name)" })")
        #expect(try await failover.caughtUp(lab.site, "rec2/rec1-db-data"))
        lab.db.signal(SIGTERM)
        rec2.signal(SIGTERM)
    }
}
