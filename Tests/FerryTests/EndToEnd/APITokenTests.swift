import FerryWire
import Foundation
import Testing

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
