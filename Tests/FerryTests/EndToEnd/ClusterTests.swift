import FerryAgentCore
import FerryWire
import Foundation
import Testing

/// The built daemons and ferryctl as real processes over real sockets.
@Suite("controller, agents and ferryctl end to end")
struct ClusterTests {
    @Test("two agents enroll with ferryctl tokens, report inventory and show in ferryctl hosts")
    func enrollAndList() async throws {
        let dir = try TestDirectory()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"))
        let db = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir)
        let web = try await AgentProcess.enrollAndStart("web", controller: controller, in: dir)
        #expect(try await controller.waitFor("db", state: "online"))
        #expect(try await controller.waitFor("web", state: "online"))

        let host = try #require(try await controller.host("db"))
        let inventory = try #require(host.inventory)
        #expect(inventory.cpus > 0 && inventory.memoryBytes > 0 && !inventory.kernel.isEmpty && !inventory.bootID.isEmpty)
        #expect(inventory.interfaces.contains { $0.name == "lo" && $0.addresses.contains("127.0.0.1/8") })
        #expect(host.address?.hasPrefix("127.0.0.1:") == true)
        #expect(host.certificateExpiry.map { $0.timeIntervalSinceNow > 29 * 86_400 } == true)

        // Keys stay private on disk.
        for file in ["agent-db/agent.key", "controller/ca.key", "controller/admin.token", "controller/ferryctl.env"] {
            let attributes = try FileManager.default.attributesOfItem(atPath: dir.file(file))
            #expect((attributes[.posixPermissions] as? Int) == 0o600, "\(file)")
        }

        let table = try await controller.ctl("hosts")
        #expect(table.status == 0)
        #expect(table.stdout.contains("NAME") && table.stdout.contains("db") && table.stdout.contains("web") && table.stdout.contains("online"))
        let show = try await controller.ctl("host", "show", "db")
        #expect(show.status == 0 && show.stdout.contains("lo"), "\(show)")
        let refreshed = try await controller.ctl("host", "refresh", "web")
        #expect(refreshed.status == 0, "\(refreshed)")

        let entries = try await controller.audit()
        #expect(entries.filter { $0.action == "host.enroll" }.count == 2)
        let tokenCreations = entries.filter { $0.action == "token.create" }
        #expect(tokenCreations.count == 2 && tokenCreations.allSatisfy { $0.actor == "api:admin" })

        // SIGTERM: each daemon drains and exits 0 within 5 s.
        for agent in [db, web] {
            let (status, took) = await agent.terminate()
            #expect(status == 0, "\(agent.log)")
            #expect(took < .seconds(5))
        }
        #expect(try await controller.waitFor("db", state: "offline", timeout: .seconds(5)))
        let (status, took) = await controller.process.terminate()
        #expect(status == 0, "\(controller.process.log)")
        #expect(took < .seconds(5))
    }

    @Test("a silent peer is declared dead within three heartbeats, on both sides, and the agent comes back")
    func heartbeats() async throws {
        let dir = try TestDirectory()
        let interval = 1.0
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"), arguments: ["--heartbeat-interval", "1s"])
        let agent = try await AgentProcess.enrollAndStart("app", controller: controller, in: dir)
        #expect(try await controller.waitFor("app", state: "online"))

        // Agent frozen: the controller drops it after three missed heartbeats.
        agent.signal(SIGSTOP)
        let frozen = Date()
        // Timed by the controller's own log line (its timestamp, to the second), not by when this
        // test sees it: on a loaded machine the test's own polling can lag by seconds.
        let declared = await eventually(timeout: .seconds(15), every: .milliseconds(50)) {
            controller.process.log.contains("agent presumed dead")
        }
        #expect(declared, "\(controller.process.log)")
        let line = controller.process.log.split(separator: "\n").first { $0.contains("agent presumed dead") }.map(String.init) ?? ""
        let stamp = ISO8601DateFormatter().date(from: String(line.prefix(24)))
        let detected = stamp.map { $0.timeIntervalSince(frozen) } ?? .infinity
        print("dead agent declared by the controller \(detected) s after the freeze (logged to the second; heartbeat 1 s)")
        // Three intervals of silence, checked every half interval; the log's second has up to 1 s
        // of rounding down, and a loaded CI machine adds some. The silence may have begun up to
        // an interval before the freeze (the last heartbeat), so the earliest a correct
        // controller declares it, as seen from the freeze, is three intervals less two seconds.
        #expect(detected < interval * 3 + 3, "declared after \(detected) s: \(line)")
        #expect(detected >= interval * 3 - 2, "declared after \(detected) s: \(line)")
        #expect(try await controller.waitFor("app", state: "offline", timeout: .seconds(10)))

        // Thawed, the agent finds its session gone and reconnects by itself.
        agent.signal(SIGCONT)
        #expect(try await controller.waitFor("app", state: "online", timeout: .seconds(10)))

        // Controller frozen: the agent gives up on the session after three intervals and redials.
        let before = agent.log.components(separatedBy: "presumed dead").count
        controller.process.signal(SIGSTOP)
        let agentNoticed = await eventually(timeout: .seconds(interval * 3 + 3)) {
            agent.log.components(separatedBy: "presumed dead").count > before
        }
        controller.process.signal(SIGCONT)
        #expect(agentNoticed, "\(agent.log)")
        #expect(try await controller.waitFor("app", state: "online", timeout: .seconds(10)))
    }

    @Test("the agent is back on its own within 10 s after the controller is killed and restarted",
          arguments: [SIGKILL, SIGTERM])
    func controllerRestart(signal: Int32) async throws {
        let dir = try TestDirectory()
        let dataDir = dir.sub("controller")
        let first = try await ControllerProcess.start(dataDir: dataDir)
        let agent = try await AgentProcess.enrollAndStart("db", controller: first, in: dir)
        #expect(try await first.waitFor("db", state: "online"))

        first.process.signal(signal)
        _ = await first.process.waitForExit(timeout: .seconds(10))
        // Down for a moment, so the agent is mid-backoff when the controller returns.
        try await Task.sleep(for: .seconds(2))
        // Timed from when the new controller listens: what is measured is the agent's own
        // reconnecting, not how long a process takes to start on a loaded machine.
        let second = try await ControllerProcess.start(dataDir: dataDir, listen: first.agentAddress, logName: "controller-2.log")
        let restarted = ContinuousClock.now
        #expect(try await second.waitFor("db", state: "online", timeout: .seconds(10)))
        let back = ContinuousClock.now - restarted
        print("agent back online \(back) after the controller restarted (signal \(signal))")
        #expect(back < .seconds(10), "back after \(back)")
        // The same identity: no re-enrollment happened.
        #expect(try await second.hosts().count == 1)
        #expect(agent.isRunning)
        _ = await agent.terminate()
        _ = await second.process.terminate()
    }

    @Test("host remove revokes: the session closes, the agent stops with code 3, and every later attempt is refused")
    func revocation() async throws {
        let dir = try TestDirectory()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"))
        let web = try await AgentProcess.enrollAndStart("web", controller: controller, in: dir)
        let db = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir)
        #expect(try await controller.waitFor("web", state: "online"))
        #expect(try await controller.waitFor("db", state: "online"))

        let removed = try await controller.ctl("host", "remove", "web")
        #expect(removed.status == 0, "\(removed)")
        #expect(await web.waitForExit(timeout: .seconds(15)) == AgentSession.exitCodeRevoked, "\(web.log)")
        #expect(try await controller.host("web") == nil)
        #expect(try await controller.audit()
            .contains { $0.action == "host.remove" && $0.target == "web" && $0.actor == "api:admin" })

        // A restart of the revoked agent is refused at once, with a reason.
        let again = try await AgentProcess.start(dataDir: dir.path + "/agent-web", logPath: dir.file("web-again.log"))
        #expect(await again.waitForExit(timeout: .seconds(15)) == AgentSession.exitCodeRevoked)
        #expect(again.log.contains("revoked"), "\(again.log)")
        let metrics = try await controller.ctl("metrics")
        #expect(metrics.stdout.contains("reason=\"revoked\""), "\(metrics.stdout)")

        // The other host is untouched.
        #expect(try await controller.host("db")?.state == .online)
        #expect(db.isRunning)
        let missing = try await controller.ctl("host", "remove", "web")
        #expect(missing.status != 0 && missing.stderr.split(separator: "\n").count == 1, "\(missing)")
    }

    @Test("the agent renews its certificate over the session before it expires and keeps working with the new one")
    func renewal() async throws {
        let dir = try TestDirectory()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"), arguments: ["--certificate-validity", "20s"])
        let agent = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir)
        let firstSerial = try #require(try await controller.waitFor("db", state: "online") ? try await controller.host("db")?.certificateSerial : nil)
        // Renewal is due after two thirds of the 20 s lifetime.
        let renewed = try await eventually(timeout: .seconds(25), every: .milliseconds(500)) {
            try await controller.host("db")?.certificateSerial != firstSerial
        }
        #expect(renewed, "\(agent.log)")
        #expect(agent.log.contains("certificate renewed"))
        // After the first certificate has expired, a fresh connection works with the renewed one,
        // and supersedes (revokes) the old one.
        try await Task.sleep(for: .seconds(8))
        _ = await agent.terminate()
        #expect(try await controller.waitFor("db", state: "offline", timeout: .seconds(5)))
        let restarted = try await AgentProcess.start(dataDir: dir.path + "/agent-db", logPath: dir.file("db-2.log"))
        #expect(try await controller.waitFor("db", state: "online", timeout: .seconds(10)), "\(restarted.log)")
        // (Later renewals supersede their predecessors too: the first serial is among them.)
        let superseded = try await controller.audit().filter { $0.action == "host.certificate-superseded" }
        #expect(superseded.contains { $0.detail.contains(firstSerial) }, "\(superseded)")
        _ = await restarted.terminate()
    }

    @Test("SIGTERM: the controller says goodbye to live sessions and exits 0 within 5 s; an agent exits 0 within 5 s even while its controller is frozen")
    func shutdown() async throws {
        let dir = try TestDirectory()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"))
        let db = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir)
        let web = try await AgentProcess.enrollAndStart("web", controller: controller, in: dir)
        #expect(try await controller.waitFor("db", state: "online"))
        #expect(try await controller.waitFor("web", state: "online"))
        let (status, took) = await controller.process.terminate()
        print("controller with 2 live sessions exited \(status.map(String.init) ?? "-") \(took) after SIGTERM")
        #expect(status == 0, "\(controller.process.log)")
        #expect(took < .seconds(5), "took \(took)")
        #expect(await eventually(timeout: .seconds(5)) { db.log.contains("controller shutting down") && web.log.contains("controller shutting down") })

        // A frozen controller: the agent is mid-handshake or waiting for a welcome when SIGTERM comes.
        let frozen = try await ControllerProcess.start(dataDir: controller.dataDir, listen: controller.agentAddress, logName: "controller-2.log")
        #expect(try await frozen.waitFor("db", state: "online", timeout: .seconds(10)))
        frozen.process.signal(SIGSTOP)
        try await Task.sleep(for: .seconds(1))
        for agent in [db, web] {
            let (status, took) = await agent.terminate()
            print("agent exited \(status.map(String.init) ?? "-") \(took) after SIGTERM with its controller frozen")
            #expect(status == 0, "\(agent.log)")
            #expect(took < .seconds(5), "took \(took)")
        }
        frozen.process.signal(SIGCONT)
        _ = await frozen.process.terminate()
    }
}

@Suite("inventory", .enabled(if: getuid() == 0, "network namespaces need root"))
struct InventoryTests {
    @Test("an inventory change on the host reaches the controller by itself, and is audited")
    func inventoryChange() async throws {
        let dir = try TestDirectory()
        let namespace = try await NetworkNamespace()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"), namespace: namespace)
        let config = dir.file("agent.yaml")
        try "inventory-interval: 1s\nreconnect-max-delay: 2s\n".write(toFile: config, atomically: true, encoding: .utf8)
        let agent = try await AgentProcess.enrollAndStart("app", controller: controller, in: dir, arguments: ["--config", config])
        #expect(try await controller.waitFor("app", state: "online"))
        // Inside its namespace the host sees only loopback.
        #expect(try await controller.host("app")?.inventory?.interfaces.map(\.name) == ["lo"])

        // A NIC appears with an address (a veth pair, both ends in the test's own namespace).
        try await namespace.ip("-n", namespace.name, "link", "add", "ferry0", "type", "veth", "peer", "name", "ferry1")
        try await namespace.ip("-n", namespace.name, "addr", "add", "198.51.100.7/24", "dev", "ferry0")
        try await namespace.ip("-n", namespace.name, "link", "set", "ferry0", "up")
        let seen = try await eventually(timeout: .seconds(10), every: .milliseconds(200)) {
            try await controller.host("app")?.inventory?.interfaces.first { $0.name == "ferry0" }?.addresses == ["198.51.100.7/24"]
        }
        #expect(seen, "\(agent.log)")
        let entries = try await controller.audit()
        #expect(entries.filter { $0.action == "host.inventory" && $0.actor == "agent:app" }.count >= 2)
        _ = await agent.terminate()
        _ = await controller.process.terminate()
    }
}
