import FerryNBD
import FerryWire
import Foundation
import NIOSSL
import Testing

/// Revocation takes effect on live connections, not only on the next one.
@Suite("revocation of live connections", .serialized)
struct RevocationTests {
    /// A point export made for `host`, opened with that agent's own certificate.
    func openExport(_ c: RecoveryPointTests.Cluster, host: String, volume: String) async throws -> NBDClient {
        let points = RecoveryPointTests()
        var r = try await c.controller.ctl("group", "create", "g", "--volume", volume, "--crash-interval", "0", "--app-interval", "0",
                                            // Not a timing test: a loaded machine must not abort the cut.
                                            "--hold-budget", "2s")
        #expect(r.status == 0, "\(r)")
        for _ in 0..<10 {
            r = try await c.controller.ctl("point", "create", "g")
            if r.status == 0 || !r.stderr.contains("hold budget") { break }
        }
        #expect(r.status == 0, "\(r)")
        let point = r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let export = try await points.export(c.controller, volume, point: point, for: [host])
        let address = try String(contentsOfFile: c.controller.dataDir + "/nbd-tls-listen.addr", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let colon = try #require(address.lastIndex(of: ":"))
        let agentDir = c.dir.path + "/agent-" + host
        let context = try NBDClientTLS.makeContext(
            trustRoots: try NIOSSLCertificate.fromPEMFile(agentDir + "/ca.pem"),
            certificateChain: try NIOSSLCertificate.fromPEMFile(agentDir + "/agent.pem"),
            privateKey: try NIOSSLPrivateKey(file: agentDir + "/agent.key", format: .pem))
        return try await NBDClient.connect(host: String(address[..<colon]), port: try #require(Int(address[address.index(after: colon)...])),
                                           export: export.id, tls: NBDClientTLS(context: context, serverHostname: ControllerIdentity.serverName))
    }

    @Test("ferryctl host remove ends the host's session and its open NBD+TLS connections within 2 s")
    func removeEndsLiveConnections() async throws {
        let c = try await RecoveryPointTests().cluster(["db": ["data"], "web": ["root"]], controllerArguments: ["--nbd-tls-listen", "127.0.0.1:0"])
        defer {
            for agent in c.agents.values { agent.signal(SIGTERM) }
            c.controller.process.signal(SIGTERM)
        }
        let client = try await openExport(c, host: "db", volume: "db/data")
        _ = try await client.read(offset: 0, length: 4096)

        let started = ContinuousClock.now
        let r = try await c.controller.ctl("host", "remove", "db")
        #expect(r.status == 0, "\(r)")
        let cut = await eventually(timeout: .seconds(2), every: .milliseconds(50)) {
            (try? await client.read(offset: 0, length: 4096)) == nil
        }
        #expect(cut, "the NBD+TLS connection outlived the host's removal")
        #expect(await eventually(timeout: .seconds(2), every: .milliseconds(50)) {
            c.agents["db"]?.log.contains("revoked") == true || c.agents["db"]?.isRunning == false
        }, "\(c.agents["db"]?.log.suffix(2000) ?? "")")
        print("host remove: connections ended \(ContinuousClock.now - started) after the command started")
        await client.close()
        // Other hosts are untouched.
        #expect(try await c.controller.host("web")?.state == .online)
    }

    @Test("a session ends when its certificate expires: the agent reconnects with its renewed certificate, which supersedes the old one at once")
    func sessionEndsAtCertificateExpiry() async throws {
        let dir = try TestDirectory()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"), arguments: ["--certificate-validity", "12s"])
        let agent = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir)
        defer {
            agent.signal(SIGTERM)
            controller.process.signal(SIGTERM)
        }
        #expect(try await controller.waitFor("db", state: "online"))
        // Renewal after two thirds of the lifetime (8 s); the first certificate ends at 12 s and
        // its session with it; without any restart the renewed certificate takes over.
        let superseded = try await eventually(timeout: .seconds(25), every: .milliseconds(300)) {
            try await controller.audit().contains { $0.action == "host.certificate-superseded" }
        }
        #expect(superseded, "\(controller.process.log.suffix(3000))")
        #expect(controller.process.log.contains("certificate expired"))
        #expect(try await controller.waitFor("db", state: "online", timeout: .seconds(10)))
    }
}
