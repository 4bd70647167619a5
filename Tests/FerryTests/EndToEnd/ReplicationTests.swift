import FerryWire
import Foundation
import Testing

/// Writes through the agent's export reach the controller's replica, in order, durably.
@Suite("replication")
struct ReplicationTests {
    func volume(_ controller: ControllerProcess) async throws -> API.Volume {
        let r = try await controller.ctl("volume", "show", "db/data", "--json")
        guard r.status == 0 else { throw FerryError(.internalError, "volume show: \(r)") }
        return try API.decoder().decode(API.Volume.self, from: Data(r.stdout.utf8))
    }

    /// Waits until the replica image equals the source image, byte for byte.
    func converged(_ source: String, _ replica: String, timeout: Duration = .seconds(60)) async throws -> Bool {
        try await eventually(timeout: timeout, every: .milliseconds(500)) {
            try await run("/usr/bin/qemu-img", ["compare", "-q", "-f", "raw", "-F", "raw", source, replica]).status == 0
        }
    }

    func fio(_ uri: String, _ rw: String, bs: String, size: String, seconds: Int? = nil) async throws -> CommandResult {
        var args = ["--name=ferry", "--ioengine=nbd", "--uri=\(uri)", "--rw=\(rw)", "--bs=\(bs)", "--size=\(size)",
                    "--iodepth=16", "--verify=crc32c", "--do_verify=1", "--end_fsync=1", "--randseed=\(Int.random(in: 1...1_000_000))"]
        if let seconds { args += ["--time_based", "--runtime=\(seconds)s", "--do_verify=0"] }
        return try await run("/usr/bin/fio", args, timeout: .seconds(300))
    }

    @Test("fio through the agent, random and sequential with crc32c verify, with the controller killed -9 twice: the replica is byte-identical")
    func replicaMatchesSource() async throws {
        let dir = try TestDirectory()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"))
        let agent = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir)
        #expect(try await controller.waitFor("db", state: "online"))
        let image = dir.sub("volumes") + "/data.img"
        #expect(try await controller.ctl("protect", "db", "--volume", "data", "--path", image, "--create-size", "128M").status == 0)
        var info = try await volume(controller)
        let uri = "nbd+unix:///data?socket=\(try #require(info.socketPath))"
        let replica = try #require(info.replicaPath)

        let random = try await fio(uri, "randwrite", bs: "4k", size: "32M")
        #expect(random.status == 0, "\(random)")
        let sequential = try await fio(uri, "write", bs: "1M", size: "96M")
        #expect(sequential.status == 0, "\(sequential)")
        #expect(try await converged(image, replica), "\(agent.log)")
        info = try await volume(controller)
        #expect(info.replicaState == "replicating" && (info.durableSequence ?? 0) > 8000)
        // Lag is measured from capture on the agent to durable on the controller.
        let metrics = try await controller.ctl("metrics")
        let count = metrics.stdout.split(separator: "\n").first { $0.hasPrefix("ferry_replication_lag_seconds_count") }
        #expect(count.flatMap { Double($0.split(separator: " ").last ?? "") }.map { $0 > 0 } == true, "\(metrics.stdout)")

        // The controller dies twice in the middle of a run; the agent resumes after the last
        // durable record each time, and nothing acked is lost.
        var current = controller
        for round in 1...2 {
            async let load = fio(uri, "randwrite", bs: "16k", size: "64M", seconds: 4)
            try await Task.sleep(for: .seconds(1))
            await current.process.kill9()
            try await Task.sleep(for: .milliseconds(500))
            current = try await ControllerProcess.start(dataDir: controller.dataDir, listen: controller.agentAddress, logName: "controller-\(round + 1).log")
            let result = try await load
            #expect(result.status == 0, "workload failed while the controller was down: \(result)")
            #expect(try await converged(image, replica), "round \(round): \(agent.log)")
        }
        info = try await volume(current)
        #expect(info.replicaState == "replicating")
        _ = await agent.terminate()
        _ = await current.process.terminate()
    }

    @Test("an agent restart starts a new capture epoch: the replica says it needs a resync")
    func agentRestartIsFlagged() async throws {
        let dir = try TestDirectory()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"))
        let agent = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir)
        #expect(try await controller.waitFor("db", state: "online"))
        let image = dir.sub("volumes") + "/data.img"
        #expect(try await controller.ctl("protect", "db", "--volume", "data", "--path", image, "--create-size", "16M").status == 0)
        let info = try await volume(controller)
        let uri = "nbd+unix:///data?socket=\(try #require(info.socketPath))"
        #expect(try await run("/usr/bin/qemu-io", ["-f", "raw", uri, "-c", "write -P 0x33 0 1M"]).status == 0)
        #expect(try await converged(image, try #require(info.replicaPath)))
        await agent.kill9()
        let again = try AgentProcess.start(dataDir: dir.path + "/agent-db", logPath: dir.file("db-2.log"))
        #expect(try await eventually(timeout: .seconds(10), every: .milliseconds(200)) {
            try await run("/usr/bin/nbdinfo", ["--size", uri]).status == 0
        })
        #expect(try await run("/usr/bin/qemu-io", ["-f", "raw", uri, "-c", "write -P 0x44 1M 1M"]).status == 0)
        let flagged = try await eventually(timeout: .seconds(15), every: .milliseconds(300)) {
            try await volume(controller).replicaState == "resync-needed"
        }
        #expect(flagged, "\(again.log)")
        // Writes of the new epoch still flow.
        #expect(try await converged(image, try #require(info.replicaPath)))
        _ = await again.terminate()
        _ = await controller.process.terminate()
    }

    @Test("a second volume protected while the first streams: both replicas converge")
    func twoVolumes() async throws {
        let dir = try TestDirectory()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"))
        let agent = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir)
        #expect(try await controller.waitFor("db", state: "online"))
        let volumes = dir.sub("volumes")
        #expect(try await controller.ctl("protect", "db", "--volume", "data", "--path", volumes + "/data.img", "--create-size", "64M").status == 0)
        let data = try await volume(controller)
        async let load = fio("nbd+unix:///data?socket=\(try #require(data.socketPath))", "randwrite", bs: "8k", size: "48M", seconds: 3)
        try await Task.sleep(for: .seconds(1))
        let second = try await controller.ctl("protect", "db", "--volume", "logs", "--path", volumes + "/logs.img", "--create-size", "16M")
        #expect(second.status == 0, "\(second)")
        let logsInfo = try API.decoder().decode(API.Volume.self, from: Data(try await controller.ctl("volume", "show", "db/logs", "--json").stdout.utf8))
        let wrote = try await run("/usr/bin/qemu-io", ["-f", "raw", "nbd+unix:///logs?socket=\(try #require(logsInfo.socketPath))", "-c", "write -P 0x6c 0 4M"])
        #expect(wrote.status == 0, "\(wrote)")
        #expect(try await load.status == 0)
        #expect(try await converged(volumes + "/data.img", try #require(data.replicaPath)), "\(agent.log)")
        #expect(try await converged(volumes + "/logs.img", try #require(logsInfo.replicaPath)), "\(agent.log)")
        // No gap was ever seen: the session was never torn down for it.
        #expect(!controller.process.log.contains("replication gap"))
        _ = await agent.terminate()
        _ = await controller.process.terminate()
    }
}
