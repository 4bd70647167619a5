import FerryWire
import Foundation
import GRDB
import Testing

extension ControllerProcess {
    /// The audit log's actions, oldest first, read from the database itself (for when the API
    /// refuses the test).
    func auditFromDatabase() throws -> [String] {
        var configuration = Configuration()
        configuration.readonly = true
        let db = try DatabaseQueue(path: dataDir + "/state.sqlite", configuration: configuration)
        return try db.read { try String.fetchAll($0, sql: "SELECT action FROM audit ORDER BY id") }
    }
}

/// The operator API's bearer tokens and roles, through ferryctl.
@Suite("operator API tokens, roles and ferryctl errors")
struct APITokenTests {
    @Test("viewer reads, operator operates, admin administers; a removed token stops working; all audited")
    func roles() async throws {
        let dir = try TestDirectory()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"))
        let agent = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir)
        #expect(try await controller.waitFor("db", state: "online"))

        func create(_ name: String, _ role: String) async throws -> String {
            let r = try await controller.ctl("api-token", "create", name, "--role", role)
            #expect(r.status == 0, "\(r)")
            return r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        func denied(_ r: CommandResult, _ text: String) {
            #expect(r.status == 1, "\(r)")
            #expect(r.stderr.split(separator: "\n").count == 1 && r.stderr.contains(text), "\(r)")
        }
        let viewer = try await create("alice", "viewer")
        let operatorToken = try await create("bob", "operator")
        denied(try await controller.ctl(["api-token", "create", "eve", "--role", "root"]), "role must be viewer, operator or admin")
        denied(try await controller.ctl(["api-token", "create", "alice", "--role", "admin"]), "exists already")

        let asViewer = ["FERRY_TOKEN": viewer]
        #expect(try await controller.ctl(["hosts"], environment: asViewer).status == 0)
        #expect(try await controller.ctl(["metrics"], environment: asViewer).status == 0)
        denied(try await controller.ctl(["host", "refresh", "db"], environment: asViewer), "has role viewer; this needs operator")
        denied(try await controller.ctl(["token", "create"], environment: asViewer), "this needs admin")
        #expect(try await controller.ctl(["wan"], environment: asViewer).status == 0)
        denied(try await controller.ctl(["wan", "set", "--limit", "10mbit"], environment: asViewer), "has role viewer; this needs operator")

        let asOperator = ["FERRY_TOKEN": operatorToken]
        #expect(try await controller.ctl(["host", "refresh", "db"], environment: asOperator).status == 0)
        denied(try await controller.ctl(["host", "remove", "db"], environment: asOperator), "this needs admin")

        let listed = try await controller.ctl("api-tokens", "--json")
        let tokens = try API.decoder().decode([API.APIToken].self, from: Data(listed.stdout.utf8))
        #expect(tokens.map(\.name) == ["admin", "alice", "bob"])
        #expect(tokens.allSatisfy { $0.token == nil })

        #expect(try await controller.ctl("api-token", "remove", "alice").status == 0)
        denied(try await controller.ctl(["hosts"], environment: asViewer), "not recognised")
        denied(try await controller.ctl("api-token", "remove", "admin"), "cannot be removed")
        denied(try await controller.ctl(["hosts"], environment: ["FERRY_TOKEN": "fat_guessed"]), "not recognised")
        // Health needs no token; everything else does.
        #expect(try await controller.ctl(["health"], environment: ["FERRY_TOKEN": "fat_guessed"]).status == 0)

        let entries = try await controller.audit()
        #expect(entries.contains { $0.action == "api-token.create" && $0.target == "bob" && $0.actor == "api:admin" })
        #expect(entries.contains { $0.action == "api-token.remove" && $0.target == "alice" })
        _ = await agent.terminate()
        _ = await controller.process.terminate()
    }

    @Test("API tokens expire; rotation replaces a secret at once (the bootstrap admin's files too, and a restart accepts it); failed attempts are audited, then refused for a while; /healthz says only ok without a token")
    func expiryRotationAndFailures() async throws {
        let dir = try TestDirectory()
        var controller = try await ControllerProcess.start(dataDir: dir.sub("controller"))
        let api = try #require(controller.apiEnvironment["FERRY_API"])
        func curl(_ path: String, token: String? = nil) async throws -> CommandResult {
            try await run("/usr/bin/curl", ["-sS", "--cacert", controller.caPath, api + path] + (token.map { ["-H", "Authorization: Bearer \($0)"] } ?? []))
        }
        // Health: nothing about the controller without a token.
        let bare = try await curl("/healthz").stdout
        #expect(bare.replacingOccurrences(of: " ", with: "").replacingOccurrences(of: "\n", with: "") == #"{"status":"ok"}"#, "\(bare)")
        let adminToken = try #require(controller.apiEnvironment["FERRY_TOKEN"])
        #expect(try await curl("/healthz", token: adminToken).stdout.contains("agentsOnline"))

        // A token made to live 10 s stops working after it, with a message that says so.
        var r = try await controller.ctl("api-token", "create", "brief", "--role", "viewer", "--expires-in", "10s")
        #expect(r.status == 0, "\(r)")
        let brief = r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(try await controller.ctl(["hosts"], environment: ["FERRY_TOKEN": brief]).status == 0)
        r = try await controller.ctl("api-token", "create", "forever", "--expires-in", "9999d")
        #expect(r.status != 0 && r.stderr.contains("a token lives"), "\(r)")
        let listed = try API.decoder().decode([API.APIToken].self, from: Data(try await controller.ctl("api-tokens", "--json").stdout.utf8))
        #expect(listed.first { $0.name == "brief" }?.expiresAt != nil && listed.first { $0.name == "admin" }?.expiresAt == nil, "\(listed)")
        #expect(try await eventually(timeout: .seconds(20), every: .milliseconds(500)) {
            let r = try await controller.ctl(["hosts"], environment: ["FERRY_TOKEN": brief])
            return r.status != 0 && r.stderr.contains("expired")
        })

        // Rotation: the old secret is refused at once, the new one works.
        r = try await controller.ctl("api-token", "create", "ops", "--role", "operator")
        let oldOps = r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        r = try await controller.ctl("api-token", "rotate", "ops")
        #expect(r.status == 0, "\(r)")
        let newOps = r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(newOps != oldOps && newOps.hasPrefix("fat_"))
        #expect(try await controller.ctl(["hosts"], environment: ["FERRY_TOKEN": oldOps]).status != 0)
        #expect(try await controller.ctl(["hosts"], environment: ["FERRY_TOKEN": newOps]).status == 0)
        // The bootstrap admin token: its file and ferryctl.env follow, and a restart takes them.
        r = try await controller.ctl("api-token", "rotate", "admin")
        #expect(r.status == 0, "\(r)")
        let newAdmin = r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(try await controller.ctl(["hosts"]).status != 0, "the old admin secret still works")
        #expect(try String(contentsOfFile: controller.dataDir + "/admin.token", encoding: .utf8).contains(newAdmin))
        #expect(try String(contentsOfFile: controller.dataDir + "/ferryctl.env", encoding: .utf8).contains("FERRY_TOKEN=\(newAdmin)"))
        _ = await controller.process.terminate()
        controller = try await ControllerProcess.start(dataDir: controller.dataDir, logName: "controller-2.log")
        #expect(try await controller.ctl(["hosts"]).status == 0, "\(controller.process.log.suffix(2000))")
        let audit = try await controller.audit()
        #expect(audit.contains { $0.action == "api-token.rotate" && $0.target == "admin" })

        // Failed attempts: audited one by one, then the address is refused for the rest of the
        // minute, valid token or not (last: it locks this test out).
        for i in 0..<22 {
            let r = try await controller.ctl(["hosts"], environment: ["FERRY_TOKEN": "fat_guess\(i)"])
            #expect(r.status != 0)
        }
        r = try await controller.ctl(["hosts"])
        #expect(r.status != 0 && r.stderr.contains("too many failed token attempts"), "\(r)")
        let trail = try controller.auditFromDatabase()
        // This controller's limiter (it restarted) counted 19 and limited at the 20th.
        let last = trail.suffix(20)
        #expect(last.filter { $0 == "api.auth-failed" }.count == 19 && last.last == "api.auth-rate-limited"
                && trail.filter { $0 == "api.auth-rate-limited" }.count == 1, "\(trail)")
        _ = await controller.process.terminate()
    }

    @Test("ferryctl failures are one line and a non-zero exit: no settings, nothing listening, another CA")
    func ferryctlErrors() async throws {
        let dir = try TestDirectory()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"))
        let api = try #require(controller.apiEnvironment["FERRY_API"])
        let otherCA = try CertificateAuthority.create(commonName: "Another CA")
        try PEMFiles.writePublic(try PEMFiles.pem(otherCA.certificate), to: dir.file("other-ca.pem"))
        let port = try #require(api.split(separator: ":").last)
        let cases: [(env: [String: String], message: String)] = [
            (["FERRY_API": "", "FERRY_TOKEN": ""], "FERRY_API"),
            (["FERRY_API": "https://127.0.0.1:1"], "connection refused"),
            (["FERRY_CA": dir.file("other-ca.pem")], "not signed by the CA"),
            (["FERRY_API": "https://127.0.0.2:\(port)"], "cannot reach"),
        ]
        for c in cases {
            let r = try await controller.ctl(["hosts"], environment: c.env)
            #expect(r.status == 1, "\(c.env): \(r)")
            let lines = r.stderr.split(separator: "\n")
            #expect(lines.count == 1 && lines[0].hasPrefix("ferryctl: ") && lines[0].contains(c.message), "\(c.env): \(r)")
        }
        _ = await controller.process.terminate()
    }
}
