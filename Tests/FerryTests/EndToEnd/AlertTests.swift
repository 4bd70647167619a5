import Crypto
import FerryWire
import Foundation
import Testing

/// Alerts through real processes: a controller whose rules fire on a killed agent, a failed
/// drill, a plan never drilled and certificates inside the expiry window, delivered to a
/// webhook receiver that refuses the first attempts.
@Suite("alerts", .serialized)
struct AlertTests {
    struct Received: Decodable {
        var headers: [String: String]
        var body: String
        var answered: Int
    }

    @Test("host offline, volume paused, RPO, job failed, drill overdue and certificate expiring fire; webhooks get signed notifications, retried after 500s; resolved when the host is back")
    func alertsReachWebhooks() async throws {
        let dir = try TestDirectory()
        // The receiver refuses the first two requests: those deliveries are retried.
        let portFile = dir.file("webhook.port"), log = dir.file("webhook.log")
        let receiver = try await ChildProcess("/usr/bin/python3", [URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("tools/webhook_receiver.py").path, "--port-file", portFile, "--log", log, "--fail", "2"],
            logPath: dir.file("receiver.out"))
        defer { receiver.signal(SIGTERM) }
        #expect(await eventually(timeout: .seconds(10)) { FileManager.default.fileExists(atPath: portFile) })
        let port = try String(contentsOfFile: portFile, encoding: .utf8)
        let config = dir.file("controller.yaml")
        try """
        alert-webhooks: ["http://127.0.0.1:\(port)/hook"]
        alert-interval: 200ms
        alert-host-offline: 1s
        alert-drill-overdue: 2s
        alert-certificate-expiry: 400d
        alert-lag: 1h
        """.write(toFile: config, atomically: true, encoding: .utf8)
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"), arguments: ["--config", config, "--nbd-tls-listen", "127.0.0.1:0"])
        defer { controller.process.signal(SIGTERM) }
        var agents: [String: ChildProcess] = [:]
        for host in ["db", "rec1"] {
            let agentConfig = dir.file("agent-\(host).yaml")
            try "hooks:\n  start: \"exit 3\"\n  stop: \"true\"\n".write(toFile: agentConfig, atomically: true, encoding: .utf8)
            agents[host] = try await AgentProcess.enrollAndStart(host, controller: controller, in: dir, arguments: ["--config", agentConfig])
            #expect(try await controller.waitFor(host, state: "online"))
        }
        defer { for a in agents.values { a.signal(SIGTERM) } }
        #expect(try await controller.ctl("protect", "db", "--volume", "data", "--path", dir.sub("volumes-db") + "/data.img", "--create-size", "8M").status == 0)
        #expect(try await controller.ctl("group", "create", "shop", "--volume", "db/data", "--crash-interval", "1s", "--rpo-alert", "3s").status == 0)
        try """
        name: shop
        groups:
          - name: db
            items:
              - host: db
                recovery-host: rec1
                start-hook: start
                timeout: 30s
        """.write(toFile: dir.file("plan.yaml"), atomically: true, encoding: .utf8)
        #expect(try await controller.ctl("plan", "apply", "-f", dir.file("plan.yaml")).status == 0)

        func alerts(all: Bool = false) async throws -> [API.Alert] {
            let r = try await controller.ctl(all ? ["alerts", "--all", "--json"] : ["alerts", "--json"])
            guard r.status == 0 else { throw FerryError(.internalError, "alerts: \(r)") }
            return try API.decoder().decode([API.Alert].self, from: Data(r.stdout.utf8))
        }
        func firing(_ rule: API.AlertRule, _ subject: String) async throws -> Bool {
            try await alerts().contains { $0.rule == rule && $0.subject == subject }
        }

        // Certificates valid 30 days are inside a 400-day window; the plan was never drilled.
        #expect(try await eventually(timeout: .seconds(10), every: .milliseconds(200)) {
            let open = Set(try await alerts().map { "\($0.rule.rawValue) \($0.subject)" })
            return open.isSuperset(of: ["certificate-expiring db", "certificate-expiring rec1", "drill-overdue shop"])
        })
        // A drill whose start hook exits 3 fails: job-failed.
        let drill = try await controller.ctl("drill", "shop", "--json")
        #expect(drill.status != 0, "\(drill)")
        #expect(try await eventually(timeout: .seconds(10), every: .milliseconds(200)) { try await firing(.jobFailed, "shop") })

        // The protected host dies: it goes offline, its volume pauses, the group's points stop.
        await agents["db"]?.kill9()
        #expect(try await eventually(timeout: .seconds(30), every: .milliseconds(200)) {
            let open = Set(try await alerts().map { "\($0.rule.rawValue) \($0.subject)" })
            return open.isSuperset(of: ["host-offline db", "volume-paused db/data", "rpo shop"])
        })
        let paused = try #require(try await alerts().first { $0.rule == .volumePaused })
        #expect(paused.message.contains("host is offline"), "\(paused.message)")

        // It comes back: those three resolve by themselves.
        agents["db"] = try await AgentProcess.start(dataDir: dir.path + "/agent-db", arguments: ["--config", dir.file("agent-db.yaml")],
                                                    logPath: dir.file("agent-db-2.log"))
        #expect(try await eventually(timeout: .seconds(60), every: .milliseconds(300)) {
            let open = try await alerts()
            return !open.contains { [.hostOffline, .volumePaused, .rpo].contains($0.rule) }
        })
        let history = try await alerts(all: true)
        for rule in [API.AlertRule.hostOffline, .volumePaused, .rpo] {
            let a = try #require(history.first { $0.rule == rule }, "\(rule)")
            #expect(a.state == .resolved && a.resolvedAt != nil)
        }

        // Every event reached the webhook, signed; the refused first attempts were retried.
        let secret = try String(contentsOfFile: controller.dataDir + "/alert-webhook.secret", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        let expected = history.count + history.filter { $0.state == .resolved }.count
        var received: [Received] = []
        #expect(await eventually(timeout: .seconds(30), every: .milliseconds(300)) {
            received = ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").split(separator: "\n")
                .compactMap { try? JSONDecoder().decode(Received.self, from: Data($0.utf8)) }
            return received.filter { $0.answered == 200 }.count >= expected
        }, "\(received.count) requests for \(expected) events")
        #expect(received.prefix(2).allSatisfy { $0.answered == 500 })
        var events: Set<String> = []
        for r in received {
            let headers = Dictionary(uniqueKeysWithValues: r.headers.map { ($0.key.lowercased(), $0.value) })
            let timestamp = try #require(headers["x-ferry-timestamp"])
            let mac = HMAC<SHA256>.authenticationCode(for: Data((timestamp + "." + r.body).utf8), using: SymmetricKey(data: Data(secret.utf8)))
            #expect(headers["x-ferry-signature"] == "sha256=" + mac.map { String(format: "%02x", $0) }.joined(), "a bad signature")
            let note = try API.decoder().decode(API.AlertNotification.self, from: Data(r.body.utf8))
            #expect(headers["x-ferry-alert"] == note.alert.id && headers["x-ferry-event"] == note.event.rawValue)
            if r.answered == 200 { events.insert("\(note.alert.id) \(note.event)") }
        }
        #expect(events.count == expected, "\(events.sorted())")
        // Deliveries are on record: a refused attempt, then the retry that got through.
        let retried = history.filter { ($0.deliveries ?? []).contains { $0.status == 500 && !$0.delivered } }
        #expect(!retried.isEmpty)
        for a in retried {
            #expect(a.deliveries?.contains { $0.delivered && $0.attempt >= 2 } == true, "\(a)")
        }
        let metrics = try await controller.ctl("metrics")
        #expect(metrics.stdout.contains("ferry_alerts_firing{rule=\"certificate-expiring\"} 2"), "\(metrics.stdout.prefix(300))")
        let audit = try await controller.audit()
        #expect(audit.contains { $0.action == "alert.open" } && audit.contains { $0.action == "alert.resolve" })
    }
}
