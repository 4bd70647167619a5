import FerryWire
import Foundation
import Testing

/// Journal integrity through real processes: a byte flipped on the controller's disk is found,
/// kept, shown and repaired, never silently folded, cut or served.
@Suite("journal integrity", .serialized)
struct JournalIntegrityTests {
    @Test("a flipped byte in a journal segment with records after it: the restart keeps every segment and shows the damage, no export serves the altered bytes, and the agent's full resync repairs the replica")
    func flippedByteFoundKeptAndRepaired() async throws {
        let points = RecoveryPointTests()
        var c = try await points.cluster(["db": ["data"]])
        let failover = FailoverTests()
        defer {
            for agent in c.agents.values { agent.signal(SIGTERM) }
            c.controller.process.signal(SIGTERM)
        }
        let uri = try #require(c.uris["db/data"])
        let w = try await run("/usr/bin/qemu-io", ["-f", "raw", "-t", "none", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 1M 64k",
                                                   "-c", "write -P 0x33 2M 64k", uri])
        #expect(w.status == 0, "\(w)")
        #expect(try await eventually(timeout: .seconds(30), every: .milliseconds(200)) {
            let v = try await failover.volume(c.controller, "db/data")
            return v.lastSequence != nil && v.durableSequence == v.lastSequence
        })

        // Both stopped; one byte of the first record's data flipped on the controller's disk.
        let agent = try #require(c.agents["db"])
        _ = await agent.terminate()
        _ = await c.controller.process.terminate()
        let replicas = c.controller.dataDir + "/replicas"
        let journal = try #require(FileManager.default.subpathsOfDirectory(atPath: replicas).first { $0.hasSuffix("data/journal") })
        let segments = try FileManager.default.contentsOfDirectory(atPath: replicas + "/" + journal).filter { $0.hasSuffix(".seg") }.sorted()
        let first = replicas + "/" + journal + "/" + (try #require(segments.first))
        func sizes() throws -> [UInt64] {
            try segments.map { try FileManager.default.attributesOfItem(atPath: replicas + "/" + journal + "/" + $0)[.size] as? UInt64 ?? 0 }
        }
        let before = try sizes()
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: first))
        try handle.seek(toOffset: 52 + 100)
        let byte = try #require(try handle.read(upToCount: 1)?.first)
        try handle.seek(toOffset: 52 + 100)
        try handle.write(contentsOf: Data([byte ^ 0xFF]))
        try handle.close()

        // Restarted (the agent still away): nothing cut, the damage shown, no bad data served.
        c.controller = try await ControllerProcess.start(dataDir: c.controller.dataDir, listen: c.controller.agentAddress, logName: "controller-2.log")
        let damaged = try await failover.volume(c.controller, "db/data")
        #expect(damaged.replicaState == .error && damaged.lastError?.contains("damaged") == true, "\(damaged)")
        #expect(try sizes() == before, "a segment was cut or removed at start-up")
        let out = c.dir.file("latest.img")
        // The replica's latest is where its journal is intact: the damaged record is refused or
        // not reached, never read back altered (its byte 100 was 0x11, flipped it reads 0xEE).
        var r = try await c.controller.ctl("volume", "export", "db/data", "--point", "latest", "--out", out)
        if r.status == 0 {
            let image = try #require(FileManager.default.contents(atPath: out))
            #expect(image[100] != 0xEE && image[0] == image[100], "an image over a damaged record was served")
        }

        // The agent comes back: a full resync repairs the replica, which then equals the source.
        c.agents["db"] = try await AgentProcess.start(dataDir: c.dir.path + "/agent-db", logPath: c.dir.file("db-2.log"))
        #expect(try await c.controller.waitFor("db", state: "online", timeout: .seconds(30)), "\(c.agents["db"]?.log.suffix(3000) ?? "")")
        var repaired: API.Volume?
        #expect(try await eventually(timeout: .seconds(60), every: .milliseconds(500)) {
            repaired = try await failover.volume(c.controller, "db/data")
            return repaired?.replicaState == .protected
        }, "\(String(describing: repaired))\n\(c.controller.process.log.suffix(3000))")
        r = try await c.controller.ctl("volume", "export", "db/data", "--point", "latest", "--out", out, "--force")
        #expect(r.status == 0, "\(r)")
        #expect(try await run("/usr/bin/qemu-img", ["compare", "-q", "-f", "raw", "-F", "raw", out, try #require(c.images["db/data"])]).status == 0)
    }
}
