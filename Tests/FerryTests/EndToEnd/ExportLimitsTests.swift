import FerryWire
import Foundation
import Testing

/// Work an authenticated host can make the controller do over NBD+TLS is bounded.
@Suite("export limits", .serialized)
struct ExportLimitsTests {
    static let neverReads = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("tools/nbd_never_reads.py").path

    @Test("a client that asks for data and never reads it holds the controller's memory bounded (backpressure through the joined connection)")
    func neverReadingClient() async throws {
        let points = RecoveryPointTests()
        let c = try await points.cluster(["db": ["data"]], controllerArguments: ["--nbd-tls-listen", "127.0.0.1:0"])
        defer {
            for agent in c.agents.values { agent.signal(SIGTERM) }
            c.controller.process.signal(SIGTERM)
        }
        let export = try await points.export(c.controller, "db/data", point: "latest", for: ["db"])
        let address = try String(contentsOfFile: c.controller.dataDir + "/nbd-tls-listen.addr", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let agentDir = c.dir.path + "/agent-db"
        let before = try c.controller.process.residentBytes()
        // 16 MiB reads of the whole volume for 9 s, none of them read by the client. Memory is
        // sampled twice while it holds on: bounded means flat, not merely slow to grow.
        async let client = run(RecoveryPointTests.python, [Self.neverReads, address, export.id, "\(16 << 20)", "9", agentDir + "/ca.pem",
                                                           agentDir + "/agent.pem", agentDir + "/agent.key", ControllerIdentity.serverName],
                               timeout: .seconds(60))
        try await Task.sleep(for: .seconds(3))
        let early = try c.controller.process.residentBytes()
        try await Task.sleep(for: .seconds(5))
        let late = try c.controller.process.residentBytes()
        let r = try await client
        #expect(r.status == 0, "\(r)")
        let grown = Int64(try c.controller.process.peakResidentBytes()) - Int64(before)
        let climbing = Int64(late) - Int64(early)
        print("never-reading client: \(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) read requests of 16 MiB sent; controller peak RSS grew \(grown >> 20) MiB, \(climbing >> 20) MiB of it in the last 5 s")
        #expect(grown < 64 << 20, "the controller buffered replies for a client that never reads: +\(grown >> 20) MiB")
        #expect(climbing < 8 << 20, "the controller's memory kept growing while the client did not read: +\(climbing >> 20) MiB in 5 s")
        #expect(c.controller.process.isRunning)
    }
}
