import FerryAgentCore
import FerryWire
import Foundation
import Testing

/// Work anyone who can reach a listener makes the controller do before authenticating is
/// bounded: connections per source address and in all, failed enrollments per address.
@Suite("pre-authentication limits", .serialized)
struct PreAuthLimitsTests {
    static let flood = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("tools/preauth_flood.py").path

    /// Established TCP connections to `port` from the flood's source addresses (127.0.1.x).
    func established(port: String) async throws -> Int {
        let r = try await run("/usr/bin/ss", ["-Htn", "state", "established", "( dport = :\(port) and src 127.0.1.0/24 )"])
        return r.stdout.split(separator: "\n").count
    }

    @Test("2,000 idle connections from 40 addresses and a flood of bogus enrollments: each address holds at most its cap, enrollments are refused then rate-limited (audited), a real agent still connects within 5 s and group points are cut")
    func idleFloodAndBogusEnrollments() async throws {
        let dir = try TestDirectory()
        let config = dir.file("controller.yaml")
        try "max-connections-per-address: 32\nenrollment-failures-per-minute: 10\n".write(toFile: config, atomically: true, encoding: .utf8)
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"), arguments: ["--config", config, "--nbd-tls-listen", "127.0.0.1:0"])
        let agentDir = dir.path + "/agent-db"
        var agent = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir)
        defer {
            agent.signal(SIGTERM)
            controller.process.signal(SIGTERM)
        }
        #expect(try await controller.waitFor("db", state: "online"))
        var r = try await controller.ctl("protect", "db", "--volume", "data", "--path", dir.sub("volumes") + "/data.img", "--create-size", "16M")
        #expect(r.status == 0, "\(r)")
        r = try await controller.ctl("group", "create", "g", "--volume", "db/data", "--crash-interval", "0", "--app-interval", "0")
        #expect(r.status == 0, "\(r)")

        // A bogus enrollment that gets as far as the token lookup: this CA, a real CSR, no such secret.
        let real = try await controller.token()
        let bogus = String(real.dropLast(8)) + "AAAAAAAA"
        var request = Ferry_V1_EnrollRequest()
        request.token = bogus
        request.csrDer = Data(try HostKeyRequest.make(name: "intruder").csrDER)
        request.requestedName = "intruder"
        let frame = dir.file("enroll.frame")
        try Data(Frames.envelope(.enrollRequest(request), id: 1)).write(to: URL(fileURLWithPath: frame))

        let agentPort = String(controller.agentAddress.split(separator: ":").last ?? "")
        let nbdAddress = try String(contentsOfFile: controller.dataDir + "/nbd-tls-listen.addr", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let nbdPort = String(nbdAddress.split(separator: ":").last ?? "")
        // 2,000 idle connections to the agent listener (50 from each of 40 addresses), 400 to the
        // NBD+TLS listener, and 30 bogus enrollments.
        let flood = try await ChildProcess(RecoveryPointTests.python, [Self.flood, controller.agentAddress, controller.caPath, frame, "2000", "40", "30", "20"],
                                     logPath: dir.file("flood.log"))
        let nbdFlood = try await ChildProcess(RecoveryPointTests.python, [Self.flood, nbdAddress, controller.caPath, frame, "400", "8", "0", "20"],
                                        logPath: dir.file("nbd-flood.log"))
        defer {
            flood.signal(SIGTERM)
            nbdFlood.signal(SIGTERM)
        }
        #expect(await eventually(timeout: .seconds(60), every: .milliseconds(200)) { flood.log.contains("held") && nbdFlood.log.contains("held") },
                "\(flood.log)\(nbdFlood.log)")
        let held = try await established(port: agentPort), nbdHeld = try await established(port: nbdPort)
        print("flood: \(flood.log.trimmingCharacters(in: .whitespacesAndNewlines)); the controller holds \(held) of 2000 (cap 32 x 40 = 1280) and \(nbdHeld) of 400 NBD+TLS (cap 32 x 8 = 256)")
        #expect(held <= 40 * 32 && held >= 40 * 16, "\(held)")
        #expect(nbdHeld <= 8 * 32, "\(nbdHeld)")
        #expect(flood.log.contains(#""rate-limited": 20"#) && flood.log.contains(#""refused": 10"#), "\(flood.log)")

        // Meanwhile a real agent, restarted, is back within 5 s, and a group point is cut.
        await agent.kill9()
        #expect(try await controller.waitFor("db", state: "offline", timeout: .seconds(20)))
        let started = ContinuousClock.now
        agent = try await AgentProcess.start(dataDir: agentDir, logPath: dir.file("db-2.log"))
        #expect(try await controller.waitFor("db", state: "online", timeout: .seconds(5)), "\(agent.log.suffix(2000))")
        print("real agent back online \(ContinuousClock.now - started) after its start, under the flood")
        // (Its restart began a new capture epoch: cuts wait for the resync that follows.)
        #expect(try await eventually(timeout: .seconds(30), every: .milliseconds(500)) {
            r = try await controller.ctl("point", "create", "g")
            return r.status == 0
        }, "\(r)")
        #expect(try await controller.audit().contains { $0.action == "enroll.rate-limited" && $0.actor == "address:127.0.2.1" })
        #expect(controller.process.isRunning)
    }
}
