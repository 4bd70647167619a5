import FerryWire
import Foundation
import Testing

/// Fencing on the data path: what an old primary writes while it is cut off from the controller
/// never reaches its replica, even once the link heals. The link is a relay the test freezes
/// (SIGSTOP: bytes wait in buffers, nothing is reset), as when a route between sites goes away.
@Suite("fence on the data path", .serialized)
struct FenceDataPathTests {
    static let proxy = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("tools/link_proxy.py").path

    static let plan = """
        name: solo
        groups:
          - name: db
            items:
              - host: db
                recovery-host: rec1
                start-hook: start
                timeout: 60s
        """

    @Test("an unplanned failover while the source is cut off: the writes it takes meanwhile arrive after the link heals and are refused (audited), the replica's latest never holds them, and the source comes back fenced; after reprotect and failback they still never reach the replica")
    func writesAfterTheFenceNeverLand() async throws {
        let dir = try TestDirectory()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"), arguments: ["--nbd-tls-listen", "127.0.0.1:0"])
        let link = try await ChildProcess("/usr/bin/python3", [Self.proxy, "127.0.0.1", controller.agentAddress], logPath: dir.file("link.log"))
        defer { link.signal(SIGCONT); link.signal(SIGTERM) }
        #expect(await eventually(timeout: .seconds(10)) { (try? String(contentsOfFile: link.logPath, encoding: .utf8))?.contains("\n") == true })
        let port = try #require(Int(try String(contentsOfFile: link.logPath, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)))

        // db reaches the controller only through the link; rec1 directly.
        let dbDir = dir.path + "/agent-db"
        let enrolled = try await AgentProcess.enroll(controller: controller, token: try await controller.token(host: "db"), dataDir: dbDir)
        #expect(enrolled.status == 0, "\(enrolled)")
        let recConfig = dir.file("agent-rec1.yaml")
        try "hooks:\n  start: \"true\"\n".write(toFile: recConfig, atomically: true, encoding: .utf8)
        let db = try await AgentProcess.start(dataDir: dbDir, arguments: ["--controller", "127.0.0.1:\(port)", "--config", recConfig])
        let rec1 = try await AgentProcess.enrollAndStart("rec1", controller: controller, in: dir, arguments: ["--config", recConfig])
        defer {
            for p in [db, rec1] { p.signal(SIGTERM) }
            controller.process.signal(SIGTERM)
        }
        #expect(try await controller.waitFor("db", state: "online"))
        #expect(try await controller.waitFor("rec1", state: "online"))

        let failover = FailoverTests()
        var r = try await controller.ctl("protect", "db", "--volume", "data", "--path", dir.sub("volumes-db") + "/data.img", "--create-size", "16M")
        #expect(r.status == 0, "\(r)")
        #expect(try await eventually(timeout: .seconds(60), every: .milliseconds(300)) {
            let v = try await failover.volume(controller, "db/data")
            return v.replicaState == .protected && (v.sync?.done ?? true)
        })
        let uri = "nbd+unix:///data?socket=\(try #require(try await failover.volume(controller, "db/data").socketPath))"
        r = try await controller.ctl("group", "create", "g", "--volume", "db/data", "--crash-interval", "0", "--app-interval", "0",
                                          // Not a timing test: a loaded machine must not abort the cut.
                                          "--hold-budget", "2s")
        #expect(r.status == 0, "\(r)")
        let planFile = dir.file("plan.yaml")
        try Self.plan.write(toFile: planFile, atomically: true, encoding: .utf8)
        r = try await controller.ctl("plan", "apply", "-f", planFile)
        #expect(r.status == 0, "\(r)")

        #expect(try await failover.qemuIO(uri, "write -P 0x11 0 1M").ok)
        #expect(try await eventually(timeout: .seconds(30), every: .milliseconds(200)) {
            let v = try await failover.volume(controller, "db/data")
            return v.lastSequence != nil && v.durableSequence == v.lastSequence
        })
        for _ in 0..<10 {
            r = try await controller.ctl("point", "create", "g")
            if r.status == 0 || !r.stderr.contains("hold budget") { break }
        }
        #expect(r.status == 0, "\(r)")
        let point = r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)

        // The link goes away; db's workload writes on, as it must.
        link.signal(SIGSTOP)
        #expect(try await failover.qemuIO(uri, "write -P 0x22 1M 1M").ok, "a source cut off from the controller still takes writes")

        // Unplanned failover meanwhile: db cannot answer its fence.
        r = try await controller.ctl("failover", "solo", "--point", point, "--json")
        let job = try API.decoder().decode(API.Job.self, from: Data(r.stdout.utf8))
        #expect(job.state == .succeeded, "\(r)")

        // The link heals: what db captured after the fence reaches the controller and is refused.
        link.signal(SIGCONT)
        #expect(try await eventually(timeout: .seconds(60), every: .milliseconds(300)) {
            try await controller.audit().contains { $0.action == "replication.refused" && $0.target == "db/data" }
        }, "\(controller.process.log.suffix(3000))")
        #expect(try await eventually(timeout: .seconds(30), every: .milliseconds(300)) {
            try await failover.qemuIO(uri, "write -P 0x33 2M 4k").ok == false
        }, "db comes back fenced")

        // The replica's newest state is the fenced one: the cut-off writes are not in it.
        let latest = dir.file("latest.img")
        r = try await controller.ctl("volume", "export", "db/data", "--point", "latest", "--out", latest)
        #expect(r.status == 0, "\(r)")
        let image = try #require(FileManager.default.contents(atPath: latest))
        #expect(image[0] == 0x11 && image[(1 << 20) - 1] == 0x11)
        #expect(image[1 << 20] == 0 && image[(2 << 20) - 1] == 0, "a write db took after its fence reached the replica")

        // Home again: reprotect makes db a copy of rec1, failback gives db its volume back under
        // a new generation. What db captured while cut off was refused at the fence, and the sink
        // has overwritten it since: it must not reach the replica now either (stamped with the
        // new generation, it would pass the open gate and land over the resync's blocks).
        r = try await controller.ctl("reprotect", "solo", "--json")
        #expect((try? API.decoder().decode(API.Job.self, from: Data(r.stdout.utf8)))?.state == .succeeded, "\(r)")
        r = try await controller.ctl("failback", "solo", "--json")
        #expect((try? API.decoder().decode(API.Job.self, from: Data(r.stdout.utf8)))?.state == .succeeded, "\(r)")
        #expect(try await failover.qemuIO(uri, "write -P 0x44 3M 64k").ok, "db takes writes again")
        #expect(try await eventually(timeout: .seconds(60), every: .milliseconds(300)) {
            let v = try await failover.volume(controller, "db/data")
            return v.lastSequence != nil && v.durableSequence == v.lastSequence && (v.sync?.done ?? true)
        })
        // Not in the journal at all (not only overwritten by a later resync block): a point cut
        // between the two would hold it.
        let stale = Data(repeating: 0x22, count: 64 << 10)
        let replicas = dir.sub("controller") + "/replicas"
        let segments = (FileManager.default.enumerator(atPath: replicas)?.allObjects as? [String] ?? []).filter { $0.hasSuffix(".seg") }
        #expect(!segments.isEmpty)
        for segment in segments {
            let bytes = try #require(FileManager.default.contents(atPath: replicas + "/" + segment))
            #expect(bytes.range(of: stale) == nil, "journal segment \(segment) holds a write db took while it was cut off and fenced")
        }
        let home = dir.file("home.img")
        r = try await controller.ctl("volume", "export", "db/data", "--point", "latest", "--out", home)
        #expect(r.status == 0, "\(r)")
        let after = try #require(FileManager.default.contents(atPath: home))
        #expect(after[0] == 0x11 && after[1 << 20] == 0 && after[(2 << 20) - 1] == 0 && after[3 << 20] == 0x44)
    }
}
