import FerryWire
import Foundation
import Testing

/// Recovery plans run as jobs through real processes: a controller, source agents db and app,
/// recovery agents rec1 and rec2, hooks that record what they were given, and qemu-io reading
/// and writing through the agents' NBD sockets.
@Suite("failover", .serialized)
struct FailoverTests {
    struct Site {
        let dir: TestDirectory
        var controller: ControllerProcess
        var agents: [String: ChildProcess]
        let hooks: String
        /// HOST/VOLUME → source image file and the source export's URI.
        var images: [String: String]
        var uris: [String: String]

        func recoveredURI(_ recoveryHost: String, _ target: String) -> String {
            let name = target.replacingOccurrences(of: "/", with: "-")
            return "nbd+unix:///\(name)?socket=\(dir.path)/agent-\(recoveryHost)/sockets/recovered-\(name).sock"
        }
    }

    static let plan = """
        name: shop
        description: a database and an app server
        groups:
          - name: db
            items:
              - host: db
                recovery-host: rec1
                start-hook: start
                stop-hook: stop
                timeout: 60s
                networks:
                  - source: prod
                    recovery: dr
                    test: drill
          - name: app
            pre:
              - gate: "confirm the database is up"
                timeout: 10m
            items:
              - host: app
                recovery-host: rec2
                start-hook: start
                stop-hook: stop
                timeout: 60s
        """

    /// A controller with NBD over TLS for recovery hosts; db and app each protect one 16 MiB
    /// volume in group `shop` (a crash point a second); rec1 and rec2 only run hooks.
    func site() async throws -> Site {
        let dir = try TestDirectory()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"), arguments: ["--nbd-tls-listen", "127.0.0.1:0"])
        let hooks = dir.sub("hooks")
        var agents: [String: ChildProcess] = [:]
        var images: [String: String] = [:], uris: [String: String] = [:]
        for host in ["db", "app", "rec1", "rec2"] {
            let config = dir.file("agent-\(host).yaml")
            try """
            hooks:
              start: "env | grep ^FERRY_ | sort > \(hooks)/\(host)-start.env; echo start >> \(hooks)/\(host).log"
              stop: "echo stop >> \(hooks)/\(host).log"
            """.write(toFile: config, atomically: true, encoding: .utf8)
            agents[host] = try await AgentProcess.enrollAndStart(host, controller: controller, in: dir, arguments: ["--config", config])
            #expect(try await controller.waitFor(host, state: "online"))
        }
        for host in ["db", "app"] {
            let image = dir.sub("volumes-\(host)") + "/data.img"
            let r = try await controller.ctl("protect", host, "--volume", "data", "--path", image, "--create-size", "16M")
            #expect(r.status == 0, "\(r)")
            images["\(host)/data"] = image
        }
        for target in images.keys {
            #expect(try await eventually(timeout: .seconds(60), every: .milliseconds(300)) {
                let v = try await volume(controller, target)
                return v.replicaState == .protected && (v.sync?.done ?? true)
            }, "\(target) never became protected")
            uris[target] = "nbd+unix:///data?socket=\(try #require(try await volume(controller, target).socketPath))"
        }
        let r = try await controller.ctl("group", "create", "shop", "--volume", "db/data", "--volume", "app/data", "--crash-interval", "1s")
        #expect(r.status == 0, "\(r)")
        let planFile = dir.file("plan.yaml")
        try Self.plan.write(toFile: planFile, atomically: true, encoding: .utf8)
        let applied = try await controller.ctl("plan", "apply", "-f", planFile)
        #expect(applied.status == 0, "\(applied)")
        return Site(dir: dir, controller: controller, agents: agents, hooks: hooks, images: images, uris: uris)
    }

    func volume(_ controller: ControllerProcess, _ target: String) async throws -> API.Volume {
        let r = try await controller.ctl("volume", "show", target, "--json")
        guard r.status == 0 else { throw FerryError(.internalError, "volume show: \(r)") }
        return try API.decoder().decode(API.Volume.self, from: Data(r.stdout.utf8))
    }

    /// qemu-io against an NBD URI: whether every command succeeded, and what it printed.
    func qemuIO(_ uri: String, readOnly: Bool = false, _ commands: String...) async throws -> (ok: Bool, output: String) {
        let r = try await run("/usr/bin/qemu-io", ["-f", "raw"] + (readOnly ? ["-r"] : []) + commands.flatMap { ["-c", $0] } + [uri], timeout: .seconds(60))
        let output = r.stdout + r.stderr
        return (r.status == 0 && !output.contains("failed") && !output.contains("error"), output)
    }

    /// Runs an operation through ferryctl (which waits for the job) and returns the job.
    func job(_ site: Site, _ arguments: String...) async throws -> API.Job {
        let r = try await site.controller.ctl(arguments + ["--json"])
        guard let job = try? API.decoder().decode(API.Job.self, from: Data(r.stdout.utf8)) else {
            throw FerryError(.internalError, "\(arguments.joined(separator: " ")): \(r)\n\(site.controller.process.log.suffix(4000))")
        }
        return job
    }

    /// Resumes the first gate of a job once it waits there.
    func resumeGate(_ site: Site, _ id: String) async throws -> Bool {
        let waiting = try await eventually(timeout: .seconds(90), every: .milliseconds(200)) {
            let r = try await site.controller.ctl("job", "show", id, "--json")
            return (try? API.decoder().decode(API.Job.self, from: Data(r.stdout.utf8)))?.state == .waiting
        }
        guard waiting else { return false }
        return try await site.controller.ctl("job", "resume", id).status == 0
    }

    /// Starts an operation without waiting, resumes its gate, and waits for its end.
    func jobThroughGate(_ site: Site, _ arguments: String...) async throws -> API.Job {
        let started = try await site.controller.ctl(arguments + ["--no-wait", "--json"])
        let job = try API.decoder().decode(API.Job.self, from: Data(started.stdout.utf8))
        #expect(try await resumeGate(site, job.id))
        let watched = try await site.controller.ctl("job", "watch", job.id, "--json")
        return try API.decoder().decode(API.Job.self, from: Data(watched.stdout.utf8))
    }

    func caughtUp(_ site: Site, _ target: String) async throws -> Bool {
        try await eventually(timeout: .seconds(60), every: .milliseconds(300)) {
            let v = try await volume(site.controller, target)
            return v.replicaState == .protected && v.lastSequence != nil && v.durableSequence == v.lastSequence
        }
    }

    @Test("drill, cleanup, planned failover (zero data loss, sources fenced), reprotect (only changed blocks move), failback: data verified through the agents' NBD sockets at every step")
    func fullCycle() async throws {
        var site = try await site()
        for (target, uri) in site.uris {
            let pattern = target.hasPrefix("db") ? "0x11" : "0x12"
            #expect(try await qemuIO(uri, "write -P \(pattern) 0 1M").ok)
        }
        for target in site.uris.keys { #expect(try await caughtUp(site, target)) }

        // Drill: recovered in the test network from the latest state; production goes on.
        let drill = try await jobThroughGate(site, "drill", "shop", "--point", "latest")
        #expect(drill.state == .succeeded, "\(drill)")
        let drillEnv = try String(contentsOfFile: site.hooks + "/rec1-start.env", encoding: .utf8)
        #expect(drillEnv.contains("FERRY_NETWORK=test") && drillEnv.contains("FERRY_SOURCE_HOST=db") && drillEnv.contains("FERRY_PLAN=shop"), "\(drillEnv)")
        let description = try #require(drillEnv.split(separator: "\n").first { $0.hasPrefix("FERRY_RECOVERY_FILE=") }).dropFirst("FERRY_RECOVERY_FILE=".count)
        let json = try String(contentsOfFile: String(description), encoding: .utf8)
        #expect(json.contains("source_inventory") && json.contains("\"drill\"") && json.contains("recovered-db-data.sock"), "\(json)")
        var r = try await qemuIO(site.recoveredURI("rec1", "db/data"), "read -P 0x11 0 1M", "write -P 0x99 4M 64k", "read -P 0x99 4M 64k")
        #expect(r.ok, "\(r.output)")
        r = try await qemuIO(site.uris["db/data"]!, "write -P 0x13 8M 64k", "read -P 0 4M 64k")
        #expect(r.ok, "production writes on during a drill, untouched by the drill's writes: \(r.output)")
        // Without --json, off a terminal, ferryctl follows the job a line per step change.
        let text = try await site.controller.ctl("drill", "cleanup", "shop")
        #expect(text.status == 0 && text.stdout.contains("done") && text.stdout.contains("drop overlays")
                && text.stdout.contains("succeeded") && text.stdout.contains("drill_rto_seconds"), "\(text)")
        let lines = text.stdout.split(separator: "\n").filter { $0.contains("drop overlays") }
        #expect(lines.count <= 2, "one line as it starts, one as it ends: \(lines)")
        let jobs = try await site.controller.ctl("jobs", "--json")
        let cleanup = try #require(try API.decoder().decode([API.Job].self, from: Data(jobs.stdout.utf8)).first)
        #expect(cleanup.operation == .drillCleanup && cleanup.state == .succeeded, "\(cleanup)")
        #expect(cleanup.report["drill_rto_seconds"] != nil && cleanup.report["drill_rpo_seconds"] != nil, "\(cleanup.report)")
        #expect(!FileManager.default.fileExists(atPath: site.dir.path + "/agent-rec1/sockets/recovered-db-data.sock"))

        // Planned failover: writes right up to it are all there afterwards.
        #expect(try await qemuIO(site.uris["db/data"]!, "write -P 0x22 1M 1M").ok)
        #expect(try await qemuIO(site.uris["app/data"]!, "write -P 0x23 1M 1M").ok)
        let failover = try await jobThroughGate(site, "failover", "shop", "--planned")
        #expect(failover.state == .succeeded, "\(failover)")
        #expect(failover.report["rpo_seconds"] == "0" && failover.report["rto_seconds"] != nil, "\(failover.report)")
        #expect(try String(contentsOfFile: site.hooks + "/db.log", encoding: .utf8).contains("stop"), "the source's stop hook ran")
        r = try await qemuIO(site.recoveredURI("rec1", "db/data"), "read -P 0x11 0 1M", "read -P 0x22 1M 1M", "read -P 0x13 8M 64k", "read -P 0 4M 64k")
        #expect(r.ok, "zero data loss, and no drill write: \(r.output)")
        r = try await qemuIO(site.recoveredURI("rec2", "app/data"), "read -P 0x23 1M 1M")
        #expect(r.ok, "\(r.output)")
        r = try await qemuIO(site.uris["db/data"]!, "write -P 0x66 0 4k")
        #expect(!r.ok, "a fenced source refuses writes: \(r.output)")
        #expect(try await qemuIO(site.uris["db/data"]!, readOnly: true, "read -P 0x11 0 4k").ok, "a fenced source still reads")
        let env = try String(contentsOfFile: site.hooks + "/rec1-start.env", encoding: .utf8)
        #expect(env.contains("FERRY_NETWORK=production"), "\(env)")

        // The recovered hosts run: their writes go to the overlays, then reprotect sends them home.
        #expect(try await qemuIO(site.recoveredURI("rec1", "db/data"), "write -P 0x33 2M 128k", "flush").ok)
        // The recovery host's agent dies and comes back: it serves its recovered volume again.
        await site.agents["rec1"]!.kill9()
        site.agents["rec1"] = try await AgentProcess.start(dataDir: site.dir.path + "/agent-rec1", arguments: ["--config", site.dir.file("agent-rec1.yaml")])
        #expect(try await site.controller.waitFor("rec1", state: "online"))
        #expect(try await eventually(timeout: .seconds(20)) {
            try await qemuIO(site.recoveredURI("rec1", "db/data"), "read -P 0x33 2M 128k", "read -P 0x22 1M 1M").ok
        }, "recovered volume served again after an agent restart")
        let reprotect = try await job(site, "reprotect", "shop")
        #expect(reprotect.state == .succeeded, "\(reprotect)")
        let sent = UInt64(reprotect.report["bytes_sent"] ?? "") ?? .max
        #expect(sent >= 128 << 10 && sent <= 2 << 20, "only changed blocks move: \(reprotect.report)")
        // Writes after reprotect stream on to the sink.
        #expect(try await qemuIO(site.recoveredURI("rec1", "db/data"), "write -P 0x44 3M 64k", "flush").ok)
        #expect(await eventually(timeout: .seconds(20), every: .milliseconds(250)) {
            guard let h = FileHandle(forReadingAtPath: site.images["db/data"]!) else { return false }
            defer { try? h.close() }
            try? h.seek(toOffset: 3 << 20)
            return h.readData(ofLength: 65536) == Data(repeating: 0x44, count: 65536)
        }, "the reverse stream delivered a write made after reprotect")

        // Failback: home again, protected again, the recovered hosts' writes kept.
        let failback = try await jobThroughGate(site, "failback", "shop")
        #expect(failback.state == .succeeded, "\(failback)")
        r = try await qemuIO(site.uris["db/data"]!, "read -P 0x11 0 1M", "read -P 0x22 1M 1M", "read -P 0x33 2M 128k", "read -P 0x44 3M 64k",
                             "write -P 0x55 5M 64k")
        #expect(r.ok, "failed back with every write, and writable: \(r.output)")
        #expect(!FileManager.default.fileExists(atPath: site.dir.path + "/agent-rec1/sockets/recovered-db-data.sock"))
        #expect(try await caughtUp(site, "db/data"))
        let plans = try await site.controller.ctl("plans")
        #expect(plans.stdout.contains("protected"), "\(plans)")
        for (_, agent) in site.agents { await agent.kill9() }
        await site.controller.process.kill9()
    }

    @Test("unplanned failover at latest-group with the source dead and the controller killed -9 at a gate: the job resumes after restart; the source comes back fenced (its export refuses writes); bad plans are refused with their lines")
    func unplannedAndRestart() async throws {
        var site = try await site()
        #expect(try await qemuIO(site.uris["db/data"]!, "write -P 0x21 0 1M").ok)
        for target in site.uris.keys { #expect(try await caughtUp(site, target)) }
        // A group point after the write.
        var cut = try await site.controller.ctl("point", "create", "shop")
        // A cut aborts when a member answers past the hold budget (a busy machine): try again.
        for _ in 0..<10 where cut.status != 0 && cut.stderr.contains("hold budget") {
            cut = try await site.controller.ctl("point", "create", "shop")
        }
        #expect(cut.status == 0, "\(cut)")

        // Bad input first: a plan with an unknown host and a volume of another plan.
        let bad = site.dir.file("bad.yaml")
        try "name: other\ngroups:\n  - name: g\n    items:\n      - host: nosuch\n        recovery-host: rec1\n      - host: db\n        recovery-host: rec1\n"
            .write(toFile: bad, atomically: true, encoding: .utf8)
        let refused = try await site.controller.ctl("plan", "apply", "-f", bad)
        #expect(refused.status != 0 && refused.stderr.contains("bad.yaml:5:") && refused.stderr.contains("bad.yaml:7:"), "\(refused)")
        let noPoint = try await site.controller.ctl("failover", "shop")
        #expect(noPoint.status != 0 && noPoint.stderr.contains("--point"), "\(noPoint)")

        // The source host dies with writes the controller never acked (its link nearly shut):
        // their extents stay marked in its activity log.
        #expect(try await site.controller.ctl("wan", "set", "--host", "db", "--limit", "1mbit").status == 0)
        #expect(try await qemuIO(site.uris["db/data"]!, "write -P 0x2f 2M 4M").ok)
        // (4 MiB take 32 s at 1 Mbit/s: marked durably before each write, cleared only by acks;
        // the restarted agent's log below says it found them.)
        await site.agents["db"]!.kill9()
        #expect(try await site.controller.ctl("wan", "set", "--host", "db", "--limit", "none").status == 0)
        let started = try await site.controller.ctl("failover", "shop", "--point", "latest-group", "--no-wait", "--json")
        let job = try API.decoder().decode(API.Job.self, from: Data(started.stdout.utf8))
        let waiting = try await eventually(timeout: .seconds(90), every: .milliseconds(200)) {
            let r = try await site.controller.ctl("job", "show", job.id, "--json")
            return (try? API.decoder().decode(API.Job.self, from: Data(r.stdout.utf8)))?.state == .waiting
        }
        #expect(waiting, "the job reached its gate")
        // The controller dies in the middle of the failover, and comes back.
        let exportAddress = try String(contentsOfFile: site.controller.dataDir + "/nbd-tls-listen.addr", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        await site.controller.process.kill9()
        site.controller = try await ControllerProcess.start(dataDir: site.controller.dataDir, listen: site.controller.agentAddress,
                                                            arguments: ["--nbd-tls-listen", exportAddress], logName: "controller-2.log")
        // The db host is recovered already: its volume is served again after the restart.
        var r = try await qemuIO(site.recoveredURI("rec1", "db/data"), "read -P 0x21 0 1M")
        #expect(r.ok, "recovered volume readable after the controller restart: \(r.output)")
        #expect(try await resumeGate(site, job.id))
        let watched = try await site.controller.ctl("job", "watch", job.id, "--json")
        let done = try API.decoder().decode(API.Job.self, from: Data(watched.stdout.utf8))
        #expect(done.state == .succeeded, "\(done)\n\(site.controller.process.log.suffix(3000))")
        #expect(done.report["point"] != nil, "\(done.report)")
        r = try await qemuIO(site.recoveredURI("rec2", "app/data"), "write -P 0x31 0 64k", "read -P 0x31 0 64k")
        #expect(r.ok, "\(r.output)")

        // The old primary comes back: fenced before it serves a write.
        let earlierRuns = site.agents["db"]!.log.utf8.count   // (the log file is appended to)
        site.agents["db"] = try await AgentProcess.start(dataDir: site.dir.path + "/agent-db", arguments: ["--config", site.dir.file("agent-db.yaml")])
        #expect(try await site.controller.waitFor("db", state: "online"))
        r = try await qemuIO(site.uris["db/data"]!, "write -P 0x66 0 4k")
        #expect(!r.ok, "the old primary's export refuses writes: \(r.output)")
        #expect(try await qemuIO(site.uris["db/data"]!, readOnly: true, "read -P 0x21 0 4k").ok)
        // Reprotect moves only what changed: the recovered app's 64 KiB, and db's unacked 4 MiB
        // undone (of 16 MiB volumes).
        let reprotect = try await self.job(site, "reprotect", "shop")
        #expect(reprotect.state == .succeeded, "\(reprotect)")
        let sent = UInt64(reprotect.report["bytes_sent"] ?? "") ?? .max
        #expect(sent <= 5 << 20, "\(reprotect.report)")
        // Its marked extents are not resynced while it is fenced: a resync in the restarted
        // agent's new capture epoch is refused, and the refusal ended its session, again at
        // every reconnect (found by the soak).
        let dbLog = String(decoding: site.agents["db"]!.log.utf8.dropFirst(earlierRuns), as: UTF8.self)
        #expect(dbLog.contains("extents marked by an earlier run"), "\(dbLog.suffix(3000))")
        #expect(dbLog.components(separatedBy: "session open").count == 2, "one session, never refused: \(dbLog.suffix(3000))")
        #expect(!site.controller.process.log.contains("refused: the volume is fenced"), "\(site.controller.process.log.suffix(3000))")
        for (_, agent) in site.agents { await agent.kill9() }
        await site.controller.process.kill9()
    }

    @Test("a drill cancelled at its gate leaves the plan in drill, and cleanup withdraws what it recovered; a planned failover rolled back gives the sources their volumes again; migrate moves the plan for good and unprotects the sources; plan changes are refused while a plan is away")
    func cancelAndMigrate() async throws {
        let site = try await site()
        #expect(try await qemuIO(site.uris["db/data"]!, "write -P 0x41 0 1M").ok)
        for target in site.uris.keys { #expect(try await caughtUp(site, target)) }
        let started = try await site.controller.ctl("drill", "shop", "--no-wait", "--json")
        let drill = try API.decoder().decode(API.Job.self, from: Data(started.stdout.utf8))
        #expect(try await eventually(timeout: .seconds(90), every: .milliseconds(200)) {
            let r = try await site.controller.ctl("job", "show", drill.id, "--json")
            return (try? API.decoder().decode(API.Job.self, from: Data(r.stdout.utf8)))?.state == .waiting
        })
        #expect(try await site.controller.ctl("job", "cancel", drill.id).status == 0)
        let cancelled = try await site.controller.ctl("job", "watch", drill.id, "--json")
        #expect(cancelled.status != 0, "watching a cancelled job exits 1")
        let job = try API.decoder().decode(API.Job.self, from: Data(cancelled.stdout.utf8))
        #expect(job.state == .cancelled, "\(job)")
        let socket = site.dir.path + "/agent-rec1/sockets/recovered-db-data.sock"
        #expect(FileManager.default.fileExists(atPath: socket), "db was recovered before the gate")
        var plans = try await site.controller.ctl("plans")
        #expect(plans.stdout.contains("drill"), "\(plans)")
        let planFile = site.dir.file("plan.yaml")
        let refused = try await site.controller.ctl("plan", "apply", "-f", planFile)
        #expect(refused.status != 0 && refused.stderr.contains("drill"), "a plan in a drill cannot change: \(refused)")
        let cleanup = try await self.job(site, "drill", "cleanup", "shop")
        #expect(cleanup.state == .succeeded, "\(cleanup)")
        #expect(!FileManager.default.fileExists(atPath: socket))

        // A planned failover, then rolled back: the sources take writes again, the recovered
        // host's writes are gone with its overlay.
        let failover = try await jobThroughGate(site, "failover", "shop", "--planned")
        #expect(failover.state == .succeeded, "\(failover)")
        #expect(try await qemuIO(site.recoveredURI("rec1", "db/data"), "write -P 0x77 2M 64k").ok)
        #expect(!(try await qemuIO(site.uris["db/data"]!, "write -P 0x78 3M 64k").ok), "fenced")
        let rollback = try await jobThroughGate(site, "rollback", "shop")
        #expect(rollback.state == .succeeded, "\(rollback)")
        let back = try await qemuIO(site.uris["db/data"]!, "read -P 0x41 0 1M", "read -P 0 2M 64k", "write -P 0x78 3M 64k")
        #expect(back.ok, "the source owns its volume again, without the recovered host's writes: \(back.output)")
        #expect(!FileManager.default.fileExists(atPath: socket))
        for target in site.uris.keys { #expect(try await caughtUp(site, target)) }

        let migrate = try await jobThroughGate(site, "migrate", "shop")
        #expect(migrate.state == .succeeded, "\(migrate)")
        #expect(migrate.report["rpo_seconds"] == "0", "\(migrate.report)")
        plans = try await site.controller.ctl("plans")
        #expect(plans.stdout.contains("migrated"), "\(plans)")
        let volumes = try await site.controller.ctl("volumes")
        #expect(!volumes.stdout.contains("data") || !volumes.stdout.contains("db"), "the sources are unprotected: \(volumes)")
        let r = try await qemuIO(site.recoveredURI("rec1", "db/data"), "read -P 0x41 0 1M", "write -P 0x42 1M 64k")
        #expect(r.ok, "the migrated host runs on: \(r.output)")
        for (_, agent) in site.agents { await agent.kill9() }
        await site.controller.process.kill9()
    }
}
