import FerryWire
import Foundation
import Testing

/// Exports over NBD+TLS are bound to the hosts they were made for: hosts A (db), B (rec2) and
/// R (rec1); A's volume is recovered onto R. Driven with libnbd's own tools and each agent's
/// real certificate.
@Suite("export access", .serialized)
struct ExportAccessTests {
    /// An agent's identity laid out as libnbd expects it (ca-cert.pem, client-cert.pem, client-key.pem).
    func certificates(_ site: FailoverTests.Site, _ host: String) throws -> String {
        let dir = site.dir.sub("tls-\(host)"), agent = site.dir.path + "/agent-\(host)"
        for (from, to) in [("ca.pem", "ca-cert.pem"), ("agent.pem", "client-cert.pem"), ("agent.key", "client-key.pem")]
        where !FileManager.default.fileExists(atPath: dir + "/" + to) {
            try FileManager.default.copyItem(atPath: agent + "/" + from, toPath: dir + "/" + to)
        }
        return dir
    }

    /// The export names `host` is shown by LIST over TLS.
    func list(_ site: FailoverTests.Site, as host: String, address: String) async throws -> [String] {
        let r = try await run("/usr/bin/nbdinfo", ["--list", "--json", "nbds://\(address)/?tls-certificates=\(try certificates(site, host))"],
                              timeout: .seconds(30))
        // nbdinfo fails a list with no export in it; an empty list is what that means.
        guard r.status == 0 else { return [] }
        struct Listing: Decodable { struct Export: Decodable { var name: String; enum CodingKeys: String, CodingKey { case name = "export-name" } }
            var exports: [Export] }
        return try JSONDecoder().decode(Listing.self, from: Data(r.stdout.utf8)).exports.map(\.name)
    }

    /// Whether `host` can open `export` (reads its size over TLS).
    func opens(_ site: FailoverTests.Site, as host: String, address: String, _ export: String) async throws -> Bool {
        let r = try await run("/usr/bin/nbdinfo", ["--size", "nbds://\(address)/\(export)?tls-certificates=\(try certificates(site, host))"],
                              timeout: .seconds(30))
        return r.status == 0 && Int(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) == 16 << 20
    }

    @Test("a recovery export opens only for its recovery host, a point export only for the hosts it was made for; LIST shows a host only what it may open; every open and refusal is audited")
    func exportsBoundToPrincipals() async throws {
        let failover = FailoverTests()
        let site = try await failover.site()
        #expect(try await failover.qemuIO(site.uris["db/data"]!, "write -P 0x11 0 1M").ok)
        #expect(try await failover.caughtUp(site, "db/data"))
        let drill = try await failover.jobThroughGate(site, "drill", "shop", "--point", "latest")
        #expect(drill.state == .succeeded, "\(drill)")
        let address = try String(contentsOfFile: site.controller.dataDir + "/nbd-tls-listen.addr", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)

        // R sees exactly the recovery export made for it, and opens it.
        let rec1Sees = try await list(site, as: "rec1", address: address)
        #expect(rec1Sees.count == 1 && rec1Sees.allSatisfy { $0.hasPrefix("r-") }, "\(rec1Sees)")
        let dbRecovery = try #require(rec1Sees.first)
        #expect(try await opens(site, as: "rec1", address: address, dbRecovery))
        // B (another recovery host) and A (the source itself) neither see nor open it.
        let rec2Sees = try await list(site, as: "rec2", address: address)
        #expect(rec2Sees.count == 1 && !rec2Sees.contains(dbRecovery), "rec2 sees only app's recovery: \(rec2Sees)")
        #expect(try await list(site, as: "db", address: address).isEmpty)
        #expect(try await opens(site, as: "rec2", address: address, dbRecovery) == false)
        #expect(try await opens(site, as: "db", address: address, dbRecovery) == false)
        // No default export over TLS, even for a host with exactly one.
        #expect(try await opens(site, as: "rec1", address: address, "") == false)

        // A point export without --for is served on the controller's local socket only.
        var r = try await site.controller.ctl("volume", "export", "db/data", "--point", "latest", "--json")
        #expect(r.status == 0, "\(r)")
        let local = try API.decoder().decode(API.Export.self, from: Data(r.stdout.utf8))
        #expect(local.hosts.isEmpty)
        #expect(try await opens(site, as: "db", address: address, local.id) == false)
        #expect(try await run("/usr/bin/nbdinfo", ["--size", local.uri]).status == 0, "the local socket still serves it")
        // With --for rec2 it opens for rec2 only.
        r = try await site.controller.ctl("volume", "export", "db/data", "--point", "latest", "--for", "rec2", "--json")
        #expect(r.status == 0, "\(r)")
        let shared = try API.decoder().decode(API.Export.self, from: Data(r.stdout.utf8))
        #expect(shared.hosts == ["rec2"])
        #expect(try await opens(site, as: "rec2", address: address, shared.id))
        #expect(try await opens(site, as: "rec1", address: address, shared.id) == false)
        #expect(try await list(site, as: "rec2", address: address).contains(shared.id))
        r = try await site.controller.ctl("volume", "export", "db/data", "--point", "latest", "--for", "nosuchhost")
        #expect(r.status != 0 && r.stderr.contains("nosuchhost"), "\(r)")

        // Every open and every refusal is in the audit log with host, export and volume.
        #expect(try await eventually(timeout: .seconds(10)) {
            let audit = try await site.controller.audit()
            let refused = audit.filter { $0.action == "export.refused" }
            let opened = audit.filter { $0.action == "export.open" }
            return refused.contains { $0.actor == "agent:rec2" && $0.target == dbRecovery && $0.detail == "volume=db/data" }
                && refused.contains { $0.actor == "agent:db" && $0.target == dbRecovery }
                && refused.contains { $0.actor == "agent:rec1" && $0.target == shared.id }
                && opened.contains { $0.actor == "agent:rec1" && $0.target == dbRecovery && $0.detail == "volume=db/data" }
                && opened.contains { $0.actor == "agent:rec2" && $0.target == shared.id }
        })
        let accesses = try await site.controller.audit().filter { $0.action.hasPrefix("export.") }
        #expect(accesses.contains { $0.action == "export.refused" }, "\(accesses)")

        // The recovered volume still works for its host after all this.
        #expect(try await failover.qemuIO(site.recoveredURI("rec1", "db/data"), "read -P 0x11 0 1M").ok)
        for agent in site.agents.values { agent.signal(SIGTERM) }
        site.controller.process.signal(SIGTERM)
    }
}
