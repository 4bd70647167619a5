import FerryWire
import Foundation
import Testing

/// Operators who bring their own CA (and server certificate) made with the openssl command line.
@Suite("operator PKI and configuration files")
struct OperatorPKITests {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().path

    func openssl(_ arguments: [String]) async throws {
        let r = try await run("/usr/bin/openssl", arguments)
        #expect(r.status == 0, "openssl \(arguments.joined(separator: " ")): \(r)")
    }

    @Test("an EC CA and server certificate from deploy/pki/make-operator-ca.sh, given by a config file")
    func ecCAWithServerCertificate() async throws {
        let dir = try TestDirectory()
        let pki = dir.sub("pki")
        let made = try await run("/bin/bash", [Self.repository + "/deploy/pki/make-operator-ca.sh", "--server-cert", pki])
        #expect(made.status == 0, "\(made)")
        let config = dir.file("controller.yaml")
        try """
        # written by the test
        ca-cert: \(pki)/ca.pem
        ca-key: \(pki)/ca.key
        server-cert: \(pki)/server.pem
        server-key: \(pki)/server.key
        heartbeat-interval: 1s
        """.write(toFile: config, atomically: true, encoding: .utf8)
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"), arguments: ["--config", config])
        // The controller made no CA of its own and serves the operator's server certificate.
        #expect(!FileManager.default.fileExists(atPath: controller.dataDir + "/ca.key"))
        #expect(controller.caPath == pki + "/ca.pem")
        let agent = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir)
        #expect(try await controller.waitFor("db", state: "online"))
        // The agent's certificate chains to the operator's CA, checked by openssl itself.
        try await openssl(["verify", "-CAfile", pki + "/ca.pem", dir.path + "/agent-db/agent.pem"])
        _ = await agent.terminate()
        _ = await controller.process.terminate()
    }

    @Test("an RSA CA made with plain openssl commands; the controller issues its own server certificate from it")
    func rsaCA() async throws {
        let dir = try TestDirectory()
        let pki = dir.sub("pki")
        try await openssl([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", "/O=Example/CN=Example RSA CA",
            "-keyout", pki + "/ca.key", "-out", pki + "/ca.pem",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        ])
        let controller = try await ControllerProcess.start(
            dataDir: dir.sub("controller"), arguments: ["--ca-cert", pki + "/ca.pem", "--ca-key", pki + "/ca.key"]
        )
        let agent = try await AgentProcess.enrollAndStart("web", controller: controller, in: dir)
        #expect(try await controller.waitFor("web", state: "online"))
        try await openssl(["verify", "-CAfile", pki + "/ca.pem", controller.dataDir + "/server.pem"])
        try await openssl(["verify", "-CAfile", pki + "/ca.pem", dir.path + "/agent-web/agent.pem"])
        // ferryctl trusts the operator's CA for the API as well.
        #expect(try await controller.ctl("hosts").status == 0)
        _ = await agent.terminate()
        _ = await controller.process.terminate()
    }

    @Test("bad configuration is one clear line and exit code 2")
    func badConfiguration() async throws {
        let dir = try TestDirectory()
        let pki = dir.sub("pki")
        try await openssl([
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "30", "-subj", "/CN=leaf",
            "-keyout", pki + "/leaf.key", "-out", pki + "/leaf.pem", "-addext", "basicConstraints=critical,CA:FALSE",
        ])
        let typo = dir.file("typo.yaml")
        try "listen: 127.0.0.1:0\nheartbeat-intervall: 5s\n".write(toFile: typo, atomically: true, encoding: .utf8)
        let cases: [(arguments: [String], message: String)] = [
            (["--config", typo], "heartbeat-intervall"),
            (["--heartbeat-interval", "soon"], "is not a duration"),
            (["--ca-cert", pki + "/leaf.pem"], "ca-cert and ca-key go together"),
            (["--ca-cert", pki + "/leaf.pem", "--ca-key", pki + "/leaf.key"], "not a CA"),
            (["--listen", "nowhere"], "HOST:PORT"),
        ]
        for c in cases {
            let r = try await run(Binaries.path("ferry-controller"), ["--data-dir", dir.sub("c-\(UUID().uuidString)")] + c.arguments, timeout: .seconds(20))
            #expect(r.status == 2, "\(c.arguments): \(r)")
            let lines = r.stderr.split(separator: "\n")
            #expect(lines.count == 1 && lines[0].contains(c.message), "\(c.arguments): \(r)")
        }
        let agentConfig = dir.file("agent.yaml")
        try "data-dir: \(dir.path)/a\nreconnect-max-delay: 1ms\n".write(toFile: agentConfig, atomically: true, encoding: .utf8)
        let r = try await run(Binaries.path("ferry-agent"), ["run", "--config", agentConfig])
        #expect(r.status == 2 && r.stderr.contains("reconnect-initial-delay must be positive and not above reconnect-max-delay"), "\(r)")
    }
}
