import FerryWire
import Foundation
import Testing

/// The agent's memory is bounded by design: the change log's budget is its only large buffer.
@Suite("agent memory bound", .serialized)
struct MemoryBoundTests {
    @Test("fio writing 1 MiB blocks as fast as it can, far past the change log's budget: the agent's resident memory grows by at most that budget plus 48 MiB, and the replica converges")
    func peakStaysUnderBudget() async throws {
        let dir = try TestDirectory()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"))
        let config = dir.file("agent.yaml")
        let budget: UInt64 = 64 << 20
        try "change-log-memory: 64M\n".write(toFile: config, atomically: true, encoding: .utf8)
        let agent = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir, arguments: ["--config", config])
        #expect(try await controller.waitFor("db", state: "online"))
        let image = dir.sub("volumes") + "/data.img"
        #expect(try await controller.ctl("protect", "db", "--volume", "data", "--path", image, "--create-size", "512M").status == 0)
        let shown = try await controller.ctl("volume", "show", "db/data", "--json")
        let info = try API.decoder().decode(API.Volume.self, from: Data(shown.stdout.utf8))
        let uri = "nbd+unix:///data?socket=\(try #require(info.socketPath))"
        let replica = try #require(info.replicaPath)
        #expect(try await eventually(timeout: .seconds(60), every: .milliseconds(300)) {
            let r = try await controller.ctl("volume", "show", "db/data", "--json")
            let v = try? API.decoder().decode(API.Volume.self, from: Data(r.stdout.utf8))
            return v?.replicaState == .protected && (v?.sync?.done ?? true)
        })
        let before = try agent.residentBytes()

        let fio = try await run("/usr/bin/fio", ["--name=flood", "--ioengine=nbd", "--uri=\(uri)", "--rw=write", "--bs=1M", "--size=512M",
                                                 "--iodepth=16", "--time_based", "--runtime=12s", "--output-format=json",
                                                 "--output=\(dir.file("fio.json"))"], timeout: .seconds(120))
        #expect(fio.status == 0, "\(fio)")
        let json = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: dir.file("fio.json")))) as? [String: Any]
        let written = ((json?["jobs"] as? [[String: Any]])?.first?["write"] as? [String: Any])?["io_bytes"] as? Int ?? 0
        // The run must have pushed far more through the agent than its budget holds, or the
        // bound below would prove nothing.
        #expect(written >= 8 * Int(budget), "fio wrote only \(written) bytes")
        #expect(try await eventually(timeout: .seconds(120), every: .milliseconds(500)) {
            try await run("/usr/bin/qemu-img", ["compare", "-q", "-f", "raw", "-F", "raw", image, replica]).status == 0
        }, "\(agent.log)")
        let peak = try agent.peakResidentBytes()
        let grown = Int64(peak) - Int64(before)
        print("agent resident memory: \(before >> 20) MiB before, peak \(peak >> 20) MiB after \(written >> 20) MiB written (budget \(budget >> 20) MiB)")
        #expect(grown < Int64(budget) + (48 << 20), "the agent's peak grew by \(grown >> 20) MiB over \(before >> 20) MiB")
        _ = await agent.terminate()
        _ = await controller.process.terminate()
    }
}
