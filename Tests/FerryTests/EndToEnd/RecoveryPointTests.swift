import FerryCLICore
import FerryWire
import Foundation
import Testing

/// Consistency groups and recovery points through real agents, a real controller and the
/// project's workload generator and checker (Tests/workload/ferry_workload.py).
@Suite("recovery points", .serialized)
struct RecoveryPointTests {
    static let workload = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("workload/ferry_workload.py").path
    static let python = "/usr/bin/python3"

    struct Cluster {
        let dir: TestDirectory
        var controller: ControllerProcess
        var agents: [String: ChildProcess]
        /// HOST/VOLUME → source image path and export URI.
        var images: [String: String]
        var uris: [String: String]
    }

    /// A controller and agents `hosts`, each with its volumes protected (16 MiB, new) and
    /// hooks `quiesce` / `thaw` that log to files, plus `slow` (sleeps) and `broken` (fails).
    func cluster(_ volumes: [String: [String]], size: String = "16M", controllerArguments: [String] = []) async throws -> Cluster {
        let dir = try TestDirectory()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"), arguments: controllerArguments)
        var agents: [String: ChildProcess] = [:]
        var images: [String: String] = [:], uris: [String: String] = [:]
        for (host, vols) in volumes.sorted(by: { $0.key < $1.key }) {
            let config = dir.file("agent-\(host).yaml")
            let hooks = dir.sub("hooks")
            try """
            hooks:
              quiesce: "echo quiesce >> \(hooks)/\(host).log"
              thaw: "echo thaw >> \(hooks)/\(host).log"
              slow: "sleep 30"
              broken: "echo disk not ready >&2; exit 3"
              marker: "echo started > \(hooks)/\(host).started; sleep 2; echo done > \(hooks)/\(host).marker"
            """.write(toFile: config, atomically: true, encoding: .utf8)
            agents[host] = try await AgentProcess.enrollAndStart(host, controller: controller, in: dir, arguments: ["--config", config])
            #expect(try await controller.waitFor(host, state: "online"))
            for v in vols {
                let image = dir.sub("volumes-\(host)") + "/\(v).img"
                let r = try await controller.ctl("protect", host, "--volume", v, "--path", image, "--create-size", size)
                #expect(r.status == 0, "\(r)")
                images["\(host)/\(v)"] = image
            }
        }
        for target in images.keys {
            let info = try await volume(controller, target)
            uris[target] = "nbd+unix:///\(target.split(separator: "/")[1])?socket=\(try #require(info.socketPath))"
        }
        for target in images.keys { #expect(try await protected(controller, target), "\(target) never became protected") }
        return Cluster(dir: dir, controller: controller, agents: agents, images: images, uris: uris)
    }

    func volume(_ controller: ControllerProcess, _ target: String) async throws -> API.Volume {
        let r = try await controller.ctl("volume", "show", target, "--json")
        guard r.status == 0 else { throw FerryError(.internalError, "volume show: \(r)") }
        return try API.decoder().decode(API.Volume.self, from: Data(r.stdout.utf8))
    }

    func protected(_ controller: ControllerProcess, _ target: String, timeout: Duration = .seconds(60)) async throws -> Bool {
        try await eventually(timeout: timeout, every: .milliseconds(300)) {
            let v = try await volume(controller, target)
            return v.replicaState == .protected && (v.sync?.done ?? true)
        }
    }

    /// The replica holds everything the agent captured.
    func caughtUp(_ controller: ControllerProcess, _ target: String) async throws -> Bool {
        try await eventually(timeout: .seconds(60), every: .milliseconds(300)) {
            let v = try await volume(controller, target)
            return v.replicaState == .protected && v.lastSequence != nil && v.durableSequence == v.lastSequence
        }
    }

    func points(_ controller: ControllerProcess, _ group: String) async throws -> [API.Point] {
        let r = try await controller.ctl("points", group, "--json")
        guard r.status == 0 else { throw FerryError(.internalError, "points: \(r)") }
        return try API.decoder().decode([API.Point].self, from: Data(r.stdout.utf8))
    }

    func export(_ controller: ControllerProcess, _ target: String, point: String, for hosts: [String] = []) async throws -> API.Export {
        let r = try await controller.ctl(["volume", "export", target, "--point", point, "--json"] + hosts.flatMap { ["--for", $0] })
        guard r.status == 0 else { throw FerryError(.internalError, "volume export \(target) --point \(point): \(r)") }
        return try API.decoder().decode(API.Export.self, from: Data(r.stdout.utf8))
    }

    @Test("the checker catches what it must: its selftest makes images with a missing write, flipped bytes, stale blocks and broken cuts, and passes images that are prefixes")
    func checkerSelftest() async throws {
        let r = try await run(Self.python, [Self.workload, "selftest", "--no-nbd"], timeout: .seconds(120))
        #expect(r.status == 0 && r.stdout.contains(" 0 failed"), "\(r)")
    }

    @Test("two-phase group cuts: 200+ points of every kind, with the controller killed -9 twice, all pass the checker (every image a prefix of its volume's writes, no cut with a dependency outside it); a quiescent point equals the source per qemu-img compare")
    func checkerPassesOnAllPoints() async throws {
        var c = try await cluster(["db": ["data", "log"], "app": ["data", "cache"]])
        let shop = ["db/data", "db/log", "app/data"]
        var r = try await c.controller.ctl(["group", "create", "shop", "--crash-interval", "1s", "--app-interval", "4s",
                                            "--quiesce-hook", "quiesce", "--thaw-hook", "thaw"] + shop.flatMap { ["--volume", $0] })
        #expect(r.status == 0, "\(r)")
        r = try await c.controller.ctl("group", "create", "solo", "--volume", "app/cache", "--crash-interval", "1s", "--app-interval", "5s",
                                       "--quiesce-hook", "quiesce", "--thaw-hook", "thaw")
        #expect(r.status == 0, "\(r)")

        let log = c.dir.file("workload.jsonl"), stop = c.dir.file("stop"), ready = c.dir.file("ready")
        let targets = shop + ["app/cache"]
        let workload = try await ChildProcess(Self.python, [Self.workload, "run", "--log", log, "--stop-file", stop, "--ready-file", ready,
                                                      "--rate", "500", "--blocks", "1024"] + targets.flatMap { ["--volume", "\($0)=\(c.uris[$0]!)"] },
                                        logPath: c.dir.file("workload.out"))
        #expect(await eventually(timeout: .seconds(20)) { FileManager.default.fileExists(atPath: ready) || !workload.isRunning })
        #expect(workload.isRunning, "\(workload.log)")

        // Manual points back to back (through the API, as ferryctl makes them), around two
        // controller crashes; the scheduler adds crash and app points of both groups meanwhile.
        // The last phase goes on until there are enough points, however busy the machine is.
        var manual = 0
        func settings(_ controller: ControllerProcess) -> APIClient.Settings {
            APIClient.Settings(baseURL: controller.apiEnvironment["FERRY_API"]!, token: controller.apiEnvironment["FERRY_TOKEN"],
                               caPath: controller.caPath)
        }
        for phase in 0..<3 {
            // The last phase runs until there are enough points to check: how fast cuts go
            // depends on the machine's load, and the test is about the points, not the rate.
            let until = ContinuousClock.now + .seconds(phase < 2 ? 10 : 150)
            try await APIClient.withClient(settings(c.controller)) { client in
                var total = 0
                while ContinuousClock.now < until, phase < 2 || total < 240 {
                    let group = manual % 5 == 4 ? "solo" : "shop"
                    // Manual app points now and then, rarer than the 4 s app schedule: a manual app point resets it.
                    let request = API.PointCreateRequest(app: manual % 60 == 0, label: "m\(manual)")
                    if (try? await client.createPoint(group: group, request)) != nil {
                        manual += 1
                        // A schedule counts from the newest point, manual ones too: pause now and
                        // then past the 1 s crash interval so scheduled points are due as well.
                        if manual % 20 == 0 { try await Task.sleep(for: .milliseconds(1300)) }
                    }
                    // About ten a second: enough points in every phase, not thousands to check.
                    try await Task.sleep(for: .milliseconds(80))
                    if phase == 2, manual % 10 == 0 {
                        total = try await client.points(group: "shop").count + client.points(group: "solo").count
                    }
                }
            }
            if phase < 2 {
                await c.controller.process.kill9()
                c.controller = try await ControllerProcess.start(dataDir: c.controller.dataDir, listen: c.controller.agentAddress,
                                                                 logName: "controller-\(phase + 2).log")
                for host in c.agents.keys {
                    let online = try await c.controller.waitFor(host, state: "online", timeout: .seconds(30))
                    let sessions = online ? "" : c.controller.process.log.split(separator: "\n")
                        .filter { $0.contains("session") || $0.contains("host=\(host)") }.suffix(60).joined(separator: "\n")
                    #expect(online, "\(host) not back online:\n\(c.agents[host]!.log.suffix(4000))\ncontroller, lines about sessions and \(host):\n\(sessions)")
                }
            }
        }
        _ = FileManager.default.createFile(atPath: stop, contents: nil)
        #expect(await workload.waitForExit(timeout: .seconds(20)) == 0, "\(workload.log)")
        for t in targets { #expect(try await caughtUp(c.controller, t), "\(t) did not catch up") }

        let shopPoints = try await points(c.controller, "shop"), soloPoints = try await points(c.controller, "solo")
        let all = shopPoints + soloPoints
        let kinds = Set(all.map(\.kind))
        #expect(kinds.isSuperset(of: ["crash", "app", "group-crash", "group-app", "manual"]), "\(kinds)")
        #expect(all.count >= 200, "only \(all.count) points (\(manual) manual)")
        #expect(all.allSatisfy { $0.complete })
        #expect(shopPoints.allSatisfy { $0.hookError == nil }, "\(shopPoints.compactMap(\.hookError))")
        // Every app point ran the quiesce hook, then the thaw hook.
        let hookLog = (try? String(contentsOfFile: c.dir.sub("hooks") + "/db.log", encoding: .utf8)) ?? ""
        #expect(hookLog.contains("quiesce\nthaw\n"))

        // Every point of both groups, served by the controller, through the checker, in
        // batches (the controller serves at most 1024 exports at once).
        struct Set_: Encodable { var point: String; var group: Bool; var images: [String: String] }
        let settings = settings(c.controller)
        var checked = 0, violations = 0
        var prefixes = Set<Int>()
        for (n, batch) in stride(from: 0, to: all.count, by: 150).map({ Array(all[$0..<min(all.count, $0 + 150)]) }).enumerated() {
            let sets = try await APIClient.withClient(settings) { client in
                var sets: [Set_] = []
                for p in batch {
                    var images: [String: String] = [:]
                    for m in p.members {
                        let parts = m.volume.split(separator: "/").map(String.init)
                        images[m.volume] = try await client.createExport(host: parts[0], name: parts[1],
                                                                         API.ExportCreateRequest(point: p.id, asOf: nil, writable: false)).uri
                    }
                    sets.append(Set_(point: p.id, group: p.members.count > 1, images: images))
                }
                return sets
            }
            let setsPath = c.dir.file("sets-\(n).json"), reportPath = c.dir.file("report-\(n).json")
            try JSONEncoder().encode(sets).write(to: URL(fileURLWithPath: setsPath))
            let check = try await run(Self.python, [Self.workload, "check", "--log", log, "--sets", setsPath, "--report", reportPath, "--quiet"],
                                      timeout: .seconds(300))
            #expect(check.status == 0, "\(check)")
            let report = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: reportPath))) as? [String: Any]
            let totals = report?["totals"] as? [String: Any]
            checked += totals?["sets"] as? Int ?? 0
            violations += totals?["violations"] as? Int ?? 1
            for set in report?["sets"] as? [[String: Any]] ?? [] where set["ok"] as? Bool == false {
                let point = all.first { $0.id == set["point"] as? String }
                Issue.record("point \(set["point"] ?? "?") (\(point?.kind ?? "?"), members \(point?.members ?? [])): \(set["violations"] ?? "")")
            }
            for set in report?["sets"] as? [[String: Any]] ?? [] {
                if let k = (set["prefix"] as? [String: Any])?["db/data"] as? Int { prefixes.insert(k) }
            }
            try await APIClient.withClient(settings) { client in
                for e in try await client.exports() { try await client.removeExport(id: e.id) }
            }
        }
        #expect(checked == all.count && violations == 0, "checked \(checked) of \(all.count), \(violations) violations")
        print("recovery points: checked \(checked) points (\(manual) manual; kinds \(kinds.sorted())), \(violations) violations, \(prefixes.count) distinct db/data prefixes")
        // Points spread over the run: the cuts are not all at the start or the end.
        #expect(prefixes.count > 50, "\(prefixes.count) distinct prefixes")

        // Nothing writes now: a new point equals the sources, byte for byte, as a plain file.
        r = try await c.controller.ctl("point", "create", "shop", "--json")
        #expect(r.status == 0, "\(r)")
        let last = try API.decoder().decode(API.Point.self, from: Data(r.stdout.utf8))
        for t in shop {
            let out = c.dir.file(t.replacingOccurrences(of: "/", with: "-") + ".point.img")
            r = try await c.controller.ctl("volume", "export", t, "--point", last.id, "--out", out)
            #expect(r.status == 0, "\(r)")
            let compare = try await run("/usr/bin/qemu-img", ["compare", "-f", "raw", "-F", "raw", c.images[t]!, out])
            #expect(compare.status == 0, "\(t): \(compare)")
        }
        for a in c.agents.values { a.signal(SIGTERM) }
        c.controller.process.signal(SIGTERM)
    }

    @Test("a hook the controller asked for finishes even when the controller dies while it runs (a lost session does not kill it), and the agent's next session works")
    func hookOutlivesSession() async throws {
        var c = try await cluster(["db": ["data"]])
        var r = try await c.controller.ctl("group", "create", "g", "--volume", "db/data", "--quiesce-hook", "marker", "--thaw-hook", "thaw",
                                           "--crash-interval", "0", "--app-interval", "0", "--hook-timeout", "60s", "--hold-budget", "2s")
        #expect(r.status == 0, "\(r)")
        let hooks = c.dir.sub("hooks"), controller = c.controller
        async let point = controller.ctl("point", "create", "g", "--app")
        #expect(await eventually(timeout: .seconds(20)) { FileManager.default.fileExists(atPath: hooks + "/db.started") })
        await c.controller.process.kill9()
        _ = try? await point
        #expect(await eventually(timeout: .seconds(20)) { FileManager.default.fileExists(atPath: hooks + "/db.marker") },
                "the quiesce hook was killed with the session")
        c.controller = try await ControllerProcess.start(dataDir: c.controller.dataDir, listen: c.controller.agentAddress, logName: "controller-2.log")
        #expect(try await c.controller.waitFor("db", state: "online", timeout: .seconds(30)))
        r = try await c.controller.ctl("point", "create", "g", "--json")
        #expect(r.status == 0, "\(r)")
        for a in c.agents.values { a.signal(SIGTERM) }
        c.controller.process.signal(SIGTERM)
    }

    @Test("bad input: unprotected or already grouped volumes, unknown, pruned and out-of-retention points are clear errors; a failing or slow quiesce hook leaves a crash-consistent point with the error; a member that stops answering aborts the cut, the others resume at once and no point is recorded")
    func badInput() async throws {
        let c = try await cluster(["db": ["data", "x"], "app": ["data", "y"]])
        let ctl = c.controller
        var r = try await ctl.ctl("group", "create", "g1", "--volume", "db/nothing")
        #expect(r.status != 0 && r.stderr.contains("not a protected volume"), "\(r)")
        r = try await ctl.ctl("group", "create", "g1", "--volume", "db/data", "--quiesce-hook", "broken", "--thaw-hook", "thaw",
                              "--crash-interval", "0", "--app-interval", "0")
        #expect(r.status == 0, "\(r)")
        r = try await ctl.ctl("group", "create", "g2", "--volume", "app/data", "--volume", "db/data")
        #expect(r.status != 0 && r.stderr.contains("already in group 'g1'"), "\(r)")

        // A hook that fails: the point is taken, crash-consistent, with the hook's error.
        r = try await ctl.ctl("point", "create", "g1", "--app", "--json")
        #expect(r.status == 0, "\(r)")
        let failed = try API.decoder().decode(API.Point.self, from: Data(r.stdout.utf8))
        #expect(failed.consistency == "crash" && failed.hookError?.contains("disk not ready") == true, "\(failed)")

        r = try await ctl.ctl("volume", "export", "db/data", "--point", "p-nope")
        #expect(r.status != 0 && r.stderr.contains("no recovery point 'p-nope'"), "\(r)")
        r = try await ctl.ctl("volume", "export", "db/data", "--as-of", "2001-01-01T00:00:00Z")
        #expect(r.status != 0 && r.stderr.contains("outside retention"), "\(r)")
        // A time as `ferryctl points` shows it (to the second) finds the point of that second.
        let iso = ISO8601DateFormatter()
        r = try await ctl.ctl("volume", "export", "db/data", "--as-of", iso.string(from: failed.createdAt), "--json")
        #expect(r.status == 0 && (try? API.decoder().decode(API.Export.self, from: Data(r.stdout.utf8)))?.point == failed.id, "\(r)")
        // A download that fails leaves an existing file as it was, and no partial file.
        let kept = c.dir.file("kept.img")
        try Data("keep me".utf8).write(to: URL(fileURLWithPath: kept))
        r = try await ctl.ctl("volume", "export", "db/data", "--point", failed.id, "--out", kept)
        #expect(r.status != 0 && r.stderr.contains("--force"), "\(r)")
        r = try await ctl.ctl("volume", "export", "db/data", "--point", "p-nope", "--out", kept, "--force")
        #expect(r.status != 0)
        #expect(FileManager.default.contents(atPath: kept) == Data("keep me".utf8))
        #expect(!FileManager.default.fileExists(atPath: kept + ".partial"))
        r = try await ctl.ctl("volume", "export", "db/data", "--point", failed.id, "--out", kept, "--force")
        #expect(r.status == 0 && (FileManager.default.contents(atPath: kept)?.count ?? 0) == 16 << 20, "\(r)")

        // A hook that outlives its timeout, and retention that keeps only the newest of each kind.
        r = try await ctl.ctl("group", "create", "pr", "--volume", "app/data", "--quiesce-hook", "slow", "--hook-timeout", "1s",
                              "--crash-interval", "0", "--app-interval", "0", "--keep-all", "0s", "--keep-hourly", "0s", "--keep-daily", "0s")
        #expect(r.status == 0, "\(r)")
        r = try await ctl.ctl("point", "create", "pr", "--app", "--json")
        #expect(r.status == 0, "\(r)")
        let slow = try API.decoder().decode(API.Point.self, from: Data(r.stdout.utf8))
        #expect(slow.consistency == "crash" && slow.hookError?.contains("timed out") == true, "\(slow)")
        for _ in 0..<2 { #expect(try await ctl.ctl("point", "create", "pr").status == 0) }
        #expect(try await eventually(timeout: .seconds(30), every: .milliseconds(500)) { try await points(ctl, "pr").count == 1 })
        r = try await ctl.ctl("volume", "export", "app/data", "--point", slow.id)
        #expect(r.status != 0 && r.stderr.contains("was pruned"), "\(r)")

        // A member that stops answering (its agent paused) aborts the round within the budget.
        r = try await ctl.ctl("group", "create", "pair", "--volume", "db/x", "--volume", "app/y", "--crash-interval", "0", "--app-interval", "0")
        #expect(r.status == 0, "\(r)")
        #expect(try await ctl.ctl("point", "create", "pair").status == 0)
        let app = try #require(c.agents["app"])
        app.signal(SIGSTOP)
        r = try await ctl.ctl("point", "create", "pair")
        #expect(r.status != 0 && r.stderr.contains("aborted"), "\(r)")
        // The healthy member writes on at once.
        let started = ContinuousClock.now
        let write = try await run("/usr/bin/qemu-io", ["-f", "raw", "-t", "none", "-c", "write -P 7 0 64k", c.uris["db/x"]!], timeout: .seconds(10))
        let took = started.duration(to: .now)
        app.signal(SIGCONT)
        #expect(write.status == 0 && took < .seconds(2), "\(write) in \(took)")
        #expect(try await points(ctl, "pair").count == 1)
        let metrics = try await ctl.ctl("metrics")
        #expect(metrics.stdout.contains("ferry_group_cut_rounds_total{group=\"pair\",outcome=\"aborted\"}")
                || metrics.stdout.contains("ferry_group_cut_rounds_total{outcome=\"aborted\",group=\"pair\"}"), "\(metrics.stdout)")
        #expect(metrics.stdout.contains("ferry_group_cut_pause_seconds_bucket"))
        for a in c.agents.values { a.signal(SIGTERM) }
        ctl.process.signal(SIGTERM)
    }

    @Test("a group of 64 volumes over 4 agents cuts points across all of them")
    func sixtyFourVolumes() async throws {
        var layout: [String: [String]] = [:]
        for h in ["h1", "h2", "h3", "h4"] { layout[h] = (1...16).map { "v\($0)" } }
        let c = try await cluster(layout, size: "1M")
        let all = layout.flatMap { host, vols in vols.map { "\(host)/\($0)" } }.sorted()
        var r = try await c.controller.ctl(["group", "create", "wide", "--crash-interval", "0", "--app-interval", "0"] + all.flatMap { ["--volume", $0] })
        #expect(r.status == 0, "\(r)")
        for _ in 0..<3 {
            r = try await c.controller.ctl("point", "create", "wide")
            #expect(r.status == 0, "\(r)")
        }
        let points = try await points(c.controller, "wide")
        #expect(points.count == 3 && points.allSatisfy { $0.members.count == 64 && $0.kind == "manual" }, "\(points)")
        #expect(try await eventually(timeout: .seconds(20)) { try await self.points(c.controller, "wide").allSatisfy { $0.complete } })
        for a in c.agents.values { a.signal(SIGTERM) }
        c.controller.process.signal(SIGTERM)
    }

    @Test("an enrolled host reads a point-in-time export made for it over NBD with STARTTLS (nbdcopy with its certificate); without a client certificate, or without TLS, it is refused")
    func exportOverTLS() async throws {
        let c = try await cluster(["db": ["data"]], controllerArguments: ["--nbd-tls-listen", "127.0.0.1:0"])
        let w = try await run("/usr/bin/qemu-io", ["-f", "raw", "-t", "none", "-c", "write -P 0x5a 1M 2M", c.uris["db/data"]!])
        #expect(w.status == 0, "\(w)")
        var r = try await c.controller.ctl("group", "create", "g", "--volume", "db/data", "--crash-interval", "0", "--app-interval", "0")
        #expect(r.status == 0, "\(r)")
        r = try await c.controller.ctl("point", "create", "g")
        #expect(r.status == 0, "\(r)")
        let point = r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(try await eventually(timeout: .seconds(20)) { try await points(c.controller, "g").allSatisfy { $0.complete } })
        let export = try await self.export(c.controller, "db/data", point: point, for: ["db"])
        let address = try String(contentsOfFile: c.controller.dataDir + "/nbd-tls-listen.addr", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)

        // The agent's own identity, laid out as libnbd expects it.
        let certs = c.dir.sub("tls"), agentDir = c.dir.path + "/agent-db"
        for (from, to) in [("ca.pem", "ca-cert.pem"), ("agent.pem", "client-cert.pem"), ("agent.key", "client-key.pem")] {
            try FileManager.default.copyItem(atPath: agentDir + "/" + from, toPath: certs + "/" + to)
        }
        let copy = c.dir.file("over-tls.img"), local = c.dir.file("local.img")
        r = try await run("/usr/bin/nbdcopy", ["nbds://\(address)/\(export.id)?tls-certificates=\(certs)", copy])
        #expect(r.status == 0, "\(r)\n\(c.controller.process.log.suffix(2000))")
        r = try await c.controller.ctl("volume", "export", "db/data", "--point", point, "--out", local)
        #expect(r.status == 0, "\(r)")
        #expect(try await run("/usr/bin/qemu-img", ["compare", "-f", "raw", "-F", "raw", copy, local]).status == 0)
        #expect(try await run("/usr/bin/qemu-img", ["compare", "-f", "raw", "-F", "raw", copy, c.images["db/data"]!]).status == 0)
        // Block status over TLS: only what was written is data.
        let size = try #require(try FileManager.default.attributesOfItem(atPath: c.images["db/data"]!)[.size] as? Int)
        let map = try await NBDExportTests.nbdinfoMap("nbds://\(address)/\(export.id)?tls-certificates=\(certs)")
        #expect(map.map { [$0.offset, $0.length, $0.data ? 1 : 0] } == [[0, 1 << 20, 0], [1 << 20, 2 << 20, 1], [3 << 20, size - (3 << 20), 0]], "\(map)")

        // No client certificate: the handshake fails. No TLS at all: every option is refused.
        let anonymous = c.dir.sub("anonymous")
        try FileManager.default.copyItem(atPath: agentDir + "/ca.pem", toPath: anonymous + "/ca-cert.pem")
        r = try await run("/usr/bin/nbdinfo", ["nbds://\(address)/\(export.id)?tls-certificates=\(anonymous)"], timeout: .seconds(30))
        #expect(r.status != 0, "\(r)")
        r = try await run("/usr/bin/nbdinfo", ["nbd://\(address)/\(export.id)"], timeout: .seconds(30))
        #expect(r.status != 0 && r.stderr.contains("opt_go"), "\(r)")
        c.agents["db"]?.signal(SIGTERM)
        c.controller.process.signal(SIGTERM)
    }
}
