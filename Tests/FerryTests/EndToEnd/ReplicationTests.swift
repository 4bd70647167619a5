import FerryWire
import Foundation
import Testing

/// Writes through the agent's export reach the controller's replica, in order, durably.
// Serialized: these runs are heavy, and side by side they would measure each other.
@Suite("replication", .serialized)
struct ReplicationTests {
    func volume(_ controller: ControllerProcess, _ target: String = "db/data") async throws -> API.Volume {
        let r = try await controller.ctl("volume", "show", target, "--json")
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
                    "--iodepth=16", "--verify=crc32c", "--verify_state_save=0", "--do_verify=1", "--end_fsync=1", "--randseed=\(Int.random(in: 1...1_000_000))"]
        if let seconds { args += ["--time_based", "--runtime=\(seconds)s", "--do_verify=0"] }
        return try await run("/usr/bin/fio", args, timeout: .seconds(300))
    }

    /// Waits until the volume's replica state is `state` and no sync is pending, as reported by
    /// the agent after `after`.
    func settled(_ controller: ControllerProcess, _ target: String = "db/data", state: API.ReplicaState = .protected,
                 after: Date = .distantPast, timeout: Duration = .seconds(60)) async throws -> API.Volume? {
        var last: API.Volume?
        let ok = try await eventually(timeout: timeout, every: .milliseconds(300)) {
            let r = try await controller.ctl("volume", "show", target, "--json")
            guard r.status == 0 else { return false }
            last = try API.decoder().decode(API.Volume.self, from: Data(r.stdout.utf8))
            return last?.replicaState == state && (last?.sync?.done ?? true) && (last?.reportedAt ?? .distantPast) > after
        }
        return ok ? last : nil
    }

    @Test("fio (512 MiB, crc32c verify) through the agent with the controller killed -9 twice and the agent killed -9 once: the replica is byte-identical, the agent resyncs only marked extents")
    func replicaMatchesSource() async throws {
        let dir = try TestDirectory()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"))
        let agent = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir)
        #expect(try await controller.waitFor("db", state: "online"))
        let image = dir.sub("volumes") + "/data.img"
        #expect(try await controller.ctl("protect", "db", "--volume", "data", "--path", image, "--create-size", "512M").status == 0)
        var info = try await volume(controller)
        let uri = "nbd+unix:///data?socket=\(try #require(info.socketPath))"
        let replica = try #require(info.replicaPath)
        // A new, empty volume: its initial sync only compares holes.
        let initial = try await settled(controller)
        #expect(initial?.sync?.kind == "full" && initial?.sync?.sentBytes == 0, "\(String(describing: initial))")

        let random = try await fio(uri, "randwrite", bs: "4k", size: "256M")
        #expect(random.status == 0, "\(random)")
        let sequential = try await fio(uri, "write", bs: "1M", size: "512M")
        #expect(sequential.status == 0, "\(sequential)")
        #expect(try await converged(image, replica), "\(agent.log)")
        info = try await volume(controller)
        #expect(info.replicaState == .protected && (info.durableSequence ?? 0) > 65_000, "\(info)")
        // Lag is measured from capture on the agent to durable on the controller.
        let metrics = try await controller.ctl("metrics")
        let count = metrics.stdout.split(separator: "\n").first { $0.hasPrefix("ferry_replication_lag_seconds_count") }
        #expect(count.flatMap { Double($0.split(separator: " ").last ?? "") }.map { $0 > 0 } == true, "\(metrics.stdout)")
        #expect(metrics.stdout.contains("ferry_volume_lag_seconds{"), "\(metrics.stdout)")
        // And exactly, per record, on the agent's clock alone: every acked record is counted.
        var counted: Double = 0
        let lagReported = try await eventually(timeout: .seconds(10), every: .milliseconds(300)) {
            let text = try await controller.ctl("metrics").stdout
            counted = text.split(separator: "\n").first { $0.hasPrefix("ferry_volume_write_lag_seconds_count{host=\"db\",volume=\"data\"}") }
                .flatMap { Double($0.split(separator: " ").last ?? "") } ?? 0
            return counted >= Double(info.durableSequence ?? .max)
        }
        #expect(lagReported, "write-lag records counted: \(counted), durable: \(String(describing: info.durableSequence))")

        // The controller dies twice in the middle of a run; the agent resumes after the last
        // durable record each time, and nothing acked is lost.
        var current = controller
        for round in 1...2 {
            async let load = fio(uri, "randwrite", bs: "16k", size: "512M", seconds: 4)
            try await Task.sleep(for: .seconds(1))
            await current.process.kill9()
            try await Task.sleep(for: .milliseconds(500))
            current = try await ControllerProcess.start(dataDir: controller.dataDir, listen: controller.agentAddress, logName: "controller-\(round + 1).log")
            let result = try await load
            #expect(result.status == 0, "workload failed while the controller was down: \(result)")
            #expect(try await converged(image, replica), "round \(round): \(agent.log)")
        }

        // The agent dies mid-write, in a 32 MiB region: its restart resyncs only the extents its
        // activity log marked there, never the whole 512 MiB.
        let load = Task { try await run("/usr/bin/fio", ["--name=crash", "--ioengine=nbd", "--uri=\(uri)", "--rw=randwrite", "--bs=4k",
                                                         "--offset=256M", "--size=32M", "--iodepth=16", "--time_based", "--runtime=10s"], timeout: .seconds(60)) }
        try await Task.sleep(for: .seconds(2))
        await agent.kill9()
        _ = try? await load.value
        let again = try await AgentProcess.start(dataDir: dir.path + "/agent-db", logPath: dir.file("db-2.log"))
        #expect(try await current.waitFor("db", state: "online"))
        let resynced = try await settled(current, after: Date())
        #expect(try await converged(image, replica), "\(again.log)")
        let sync = try #require(resynced?.sync, "\(again.log)")
        #expect(sync.kind == "marked" && sync.totalBytes <= 36 << 20 && sync.sentBytes <= sync.totalBytes, "\(sync)")
        print("agent kill -9 resync: compared \(sync.totalBytes) bytes of marked extents, sent \(sync.sentBytes) bytes, of a 512 MiB volume")
        _ = await again.terminate()
        _ = await current.process.terminate()
    }

    @Test("a 2 GiB half-empty volume's initial sync moves only its non-zero half, skipping holes and zeroed blocks")
    func initialSyncSkipsZeroes() async throws {
        let dir = try TestDirectory()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"))
        let agent = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir)
        #expect(try await controller.waitFor("db", state: "online"))
        let image = dir.sub("volumes") + "/data.img"
        // 2 GiB: 16 data chunks of 64 MiB (1 GiB) alternating with holes, and one hole chunk
        // overwritten with real zero bytes (found by content, not by SEEK_HOLE).
        #expect(try await run("/usr/bin/truncate", ["-s", "2G", image]).status == 0)
        for chunk in stride(from: 0, to: 32, by: 2) {
            let r = try await run("/usr/bin/dd", ["if=/dev/urandom", "of=\(image)", "bs=4M", "count=16", "seek=\(chunk * 16)", "conv=notrunc,fsync", "status=none"])
            #expect(r.status == 0, "\(r)")
        }
        #expect(try await run("/usr/bin/dd", ["if=/dev/zero", "of=\(image)", "bs=4M", "count=16", "seek=\(16)", "conv=notrunc", "status=none"]).status == 0)
        let protect = try await controller.ctl("protect", "db", "--volume", "data", "--path", image)
        #expect(protect.status == 0, "\(protect)")
        let info = try await volume(controller)
        #expect(info.replicaState == .initialSync || info.replicaState == .protected)
        // Writes during the sync flow through the log and the replica converges with them.
        let uri = "nbd+unix:///data?socket=\(try #require(info.socketPath))"
        #expect(try await run("/usr/bin/qemu-io", ["-f", "raw", uri, "-c", "write -P 0x5a 1536M 8M"]).status == 0)
        let synced = try await settled(controller, timeout: .seconds(180))
        #expect(try await converged(image, try #require(info.replicaPath)), "\(agent.log)")
        let sync = try #require(synced?.sync, "\(agent.log)")
        #expect(sync.kind == "full" && sync.totalBytes == 2 << 30 && sync.doneBytes == 2 << 30, "\(sync)")
        // The non-zero half, give or take the 8 MiB written meanwhile (those blocks may arrive
        // as ordinary writes before the sync compares them).
        #expect(sync.sentBytes >= (1 << 30) - (8 << 20) && sync.sentBytes <= (1 << 30) + (8 << 20), "\(sync)")
        #expect(synced?.syncedPercent == 100)
        // The replica was new: nothing was hashed to compare, the data blocks were sent.
        #expect(agent.log.contains("the controller's replica is empty"), "\(agent.log.suffix(3000))")
        print("initial sync of a 2 GiB half-empty volume: sent \(sync.sentBytes) bytes (\(Double(sync.sentBytes) / Double(1 << 30)) GiB)")
        _ = await agent.terminate()
        _ = await controller.process.terminate()
    }

    @Test("an initial sync resumes where it was after the agent and then the controller are killed -9 mid-way")
    func initialSyncResumes() async throws {
        let dir = try TestDirectory()
        var controller = try await ControllerProcess.start(dataDir: dir.sub("controller"))
        let agent = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir)
        #expect(try await controller.waitFor("db", state: "online"))
        let image = dir.sub("volumes") + "/data.img"
        #expect(try await run("/usr/bin/truncate", ["-s", "1G", image]).status == 0)
        let filled = try await run("/usr/bin/dd", ["if=/dev/urandom", "of=\(image)", "bs=4M", "count=128", "conv=notrunc,fsync", "status=none"])
        #expect(filled.status == 0, "\(filled)")
        // Throttled from the start: unthrottled, a loaded machine's sync can finish between the
        // test seeing it part-way and the kill (then the restart has nothing left to resume), and
        // the resumed sync below must still be running when the controller is killed. At
        // 400 Mbit/s the 1 GiB takes ~20 s.
        #expect(try await controller.ctl("wan", "set", "--limit", "400mbit").status == 0)
        #expect(try await controller.ctl("protect", "db", "--volume", "data", "--path", image).status == 0)
        let replica = try #require(try await volume(controller).replicaPath)

        // Part-way through, the agent dies.
        func progressed(past bytes: UInt64) async throws -> Bool {
            try await eventually(timeout: .seconds(60), every: .milliseconds(100)) {
                let v = try await volume(controller)
                return (v.sync?.doneBytes ?? 0) >= bytes && v.sync?.done == false
            }
        }
        #expect(try await progressed(past: 96 << 20), "\(agent.log)")
        // What a restart skips is what the activity log no longer marks: extents whose every
        // write the controller acked (on a loaded machine the acks, and so the clearing, lag).
        #expect(try await eventually(timeout: .seconds(60), every: .milliseconds(100)) {
            let v = try await volume(controller)
            return (v.markedExtents ?? 256) <= 240 && v.sync?.done == false
        }, "\(agent.log)")
        await agent.kill9()
        let again = try await AgentProcess.start(dataDir: dir.path + "/agent-db", logPath: dir.file("db-2.log"))
        #expect(try await controller.waitFor("db", state: "online"))
        // The new run starts from the extents still pending on disk, not from the beginning.
        var resumed: API.SyncProgress?
        #expect(try await eventually(timeout: .seconds(30), every: .milliseconds(100)) {
            resumed = try await volume(controller).sync
            return resumed?.kind == "full" && (resumed?.totalBytes ?? 0) > 0 && (resumed?.totalBytes ?? 0) < 1 << 30
        }, "\(String(describing: resumed))\n\(again.log)")

        // Then the controller dies; the agent carries on from where it stood once it is back.
        #expect(try await progressed(past: 32 << 20), "\(again.log)")
        await controller.process.kill9()
        controller = try await ControllerProcess.start(dataDir: controller.dataDir, listen: controller.agentAddress, logName: "controller-2.log")
        let synced = try await settled(controller, after: Date(), timeout: .seconds(120))
        #expect(synced?.replicaState == .protected, "\(String(describing: synced))\n\(again.log)")
        #expect(try await converged(image, replica), "\(again.log)")
        let last = try #require(synced?.sync)
        #expect(last.totalBytes < 1 << 30, "the agent compared the whole volume again: \(last)")
        // Resumed into a replica that holds the first run's records: compared by hashes again.
        #expect(agent.log.contains("the controller's replica is empty") && !again.log.contains("the controller's replica is empty"))
        print("initial sync of 1 GiB interrupted twice: after the agent restart \(resumed?.totalBytes ?? 0) bytes were left to compare; that run compared \(last.totalBytes) bytes in all")
        _ = await again.terminate()
        _ = await controller.process.terminate()
    }

    @Test("resync on demand repairs a damaged replica by moving only the differing blocks")
    func resyncOnDemand() async throws {
        let dir = try TestDirectory()
        var controller = try await ControllerProcess.start(dataDir: dir.sub("controller"))
        let agent = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir)
        #expect(try await controller.waitFor("db", state: "online"))
        let image = dir.sub("volumes") + "/data.img"
        #expect(try await controller.ctl("protect", "db", "--volume", "data", "--path", image, "--create-size", "512M").status == 0)
        let info = try await volume(controller)
        let uri = "nbd+unix:///data?socket=\(try #require(info.socketPath))"
        let replica = try #require(info.replicaPath)
        #expect(try await run("/usr/bin/qemu-io", ["-f", "raw", uri, "-c", "write -P 0x11 0 32M"]).status == 0)
        // Enough more that the controller checkpoints and empties its journal: a restart's
        // journal replay cannot repair the damage below, only the resync can.
        #expect(try await run("/usr/bin/qemu-io", ["-f", "raw", uri, "-c", "write -P 0x22 64M 300M"]).status == 0)
        #expect(try await converged(image, replica))
        #expect(try await settled(controller) != nil)
        // Damage three blocks of the replica behind the controller's back (bit rot, a bad copy).
        _ = await controller.process.terminate()
        for offset in [100_000, 9_000_000, 30_000_000] {
            #expect(try await run("/usr/bin/dd", ["if=/dev/urandom", "of=\(replica)", "bs=1", "count=4096", "seek=\(offset)", "conv=notrunc", "status=none"]).status == 0)
        }
        controller = try await ControllerProcess.start(dataDir: controller.dataDir, listen: controller.agentAddress, logName: "controller-2.log")
        #expect(try await controller.waitFor("db", state: "online"))
        #expect(try await run("/usr/bin/qemu-img", ["compare", "-q", "-f", "raw", "-F", "raw", image, replica]).status != 0)
        let missing = try await controller.ctl("volume", "resync", "db/nothing")
        #expect(missing.status != 0 && missing.stderr.contains("no volume db/nothing"), "\(missing)")
        let started = try await controller.ctl("volume", "resync", "db/data")
        #expect(started.status == 0, "\(started)")
        let done = try await settled(controller, after: Date())
        #expect(try await converged(image, replica, timeout: .seconds(10)), "\(agent.log)")
        let sync = try #require(done?.sync)
        // Each damaged range spans one or two 64 KiB blocks; nothing else moves.
        #expect(sync.kind == "full" && sync.doneBytes == 512 << 20 && sync.sentBytes >= 3 * 65536 && sync.sentBytes <= 6 * 65536, "\(sync)")
        print("resync on demand of a 512 MiB volume with 3 damaged 4 KiB ranges: sent \(sync.sentBytes) bytes")
        #expect(try await controller.audit().contains { $0.action == "volume.resync" && $0.target == "db/data" })
        _ = await agent.terminate()
        _ = await controller.process.terminate()
    }

    @Test("controller unreachable for 30 s under fio load, the change log past its caps: the workload runs on, marked extents resync, the replica is identical")
    func controllerAwayUnderLoad() async throws {
        let dir = try TestDirectory()
        var controller = try await ControllerProcess.start(dataDir: dir.sub("controller"))
        let config = dir.file("agent.yaml")
        try "change-log-memory: 4M\nchange-log-spill: 16M\n".write(toFile: config, atomically: true, encoding: .utf8)
        let agent = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir, arguments: ["--config", config])
        #expect(try await controller.waitFor("db", state: "online"))
        let image = dir.sub("volumes") + "/data.img"
        #expect(try await controller.ctl("protect", "db", "--volume", "data", "--path", image, "--create-size", "256M").status == 0)
        let info = try await volume(controller)
        let uri = "nbd+unix:///data?socket=\(try #require(info.socketPath))"
        let replica = try #require(info.replicaPath)
        #expect(try await settled(controller) != nil, "\(agent.log)\n\(controller.process.log)")

        let started = ContinuousClock.now
        async let load = run("/usr/bin/fio", ["--name=away", "--ioengine=nbd", "--uri=\(uri)", "--rw=randwrite", "--bs=64k", "--size=256M",
                                              "--iodepth=8", "--time_based", "--runtime=36s", "--rate=8m"], timeout: .seconds(120))
        try await Task.sleep(for: .seconds(2))
        await controller.process.kill9()
        try await Task.sleep(for: .seconds(30))
        controller = try await ControllerProcess.start(dataDir: controller.dataDir, listen: controller.agentAddress, logName: "controller-2.log")
        #expect(try await controller.waitFor("db", state: "online"))
        let back = Date()
        let result = try await load
        #expect(result.status == 0, "the workload failed while the controller was away: \(result)")
        #expect(ContinuousClock.now - started >= .seconds(36))
        #expect(agent.log.contains("change log overflowed"), "\(agent.log)")
        let synced = try await settled(controller, after: back, timeout: .seconds(90))
        #expect(try await converged(image, replica), "\(agent.log)")
        #expect(synced?.sync?.kind == "marked", "\(String(describing: synced))")
        _ = await agent.terminate()
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

    @Test("capture mode scan: a file the workload writes directly is compared every interval and only changed blocks move")
    func scanMode() async throws {
        let dir = try TestDirectory()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"))
        let agent = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir)
        #expect(try await controller.waitFor("db", state: "online"))
        let image = dir.sub("volumes") + "/scan.img"
        #expect(try await run("/usr/bin/truncate", ["-s", "64M", image]).status == 0)
        let tooOften = try await controller.ctl("protect", "db", "--volume", "scan", "--path", image, "--capture", "scan", "--scan-interval", "1s")
        #expect(tooOften.status != 0 && tooOften.stderr.contains("scan interval must be between 5 s and 24 h"), "\(tooOften)")
        let protect = try await controller.ctl("protect", "db", "--volume", "scan", "--path", image, "--capture", "scan", "--scan-interval", "5s")
        #expect(protect.status == 0 && protect.stdout.contains("capture: scan every 5s"), "\(protect)")
        let info = try await volume(controller, "db/scan")
        #expect(info.captureMode == "scan" && info.scanIntervalSeconds == 5 && info.socketPath?.isEmpty != false, "\(info)")
        #expect(!FileManager.default.fileExists(atPath: dir.path + "/agent-db/sockets/scan.sock"))
        let replica = try #require(info.replicaPath)
        // The workload writes the file itself, not through the agent.
        #expect(try await run("/usr/bin/dd", ["if=/dev/urandom", "of=\(image)", "bs=64k", "count=3", "seek=100", "conv=notrunc,fsync", "status=none"]).status == 0)
        #expect(try await converged(image, replica, timeout: .seconds(30)), "\(agent.log)")
        let before = try await settled(controller, "db/scan", timeout: .seconds(30))
        #expect(before?.replicaState == .protected, "\(String(describing: before))")
        // A scan that finds nothing first, so the next one that moves bytes is the change's.
        var after: API.Volume?
        #expect(try await eventually(timeout: .seconds(20), every: .milliseconds(100)) {
            after = try await volume(controller, "db/scan")
            return after?.sync?.kind == "scan" && after?.sync?.done == true && after?.sync?.sentBytes == 0
        }, "\(String(describing: after))")
        #expect(try await run("/usr/bin/dd", ["if=/dev/urandom", "of=\(image)", "bs=4k", "count=1", "seek=9000", "conv=notrunc,fsync", "status=none"]).status == 0)
        // One 4 KiB change moves one 64 KiB block, in a scan of its own. (A scan's report stands
        // until the next scan starts, 5 s later: watched closely, not after the comparison.)
        #expect(try await eventually(timeout: .seconds(20), every: .milliseconds(100)) {
            after = try await volume(controller, "db/scan")
            return after?.sync?.kind == "scan" && after?.sync?.done == true && (after?.sync?.sentBytes ?? 0) > 0
        }, "\(String(describing: after))")
        #expect(after?.sync?.sentBytes == 65536, "\(String(describing: after?.sync))")
        #expect(try await converged(image, replica, timeout: .seconds(30)), "\(agent.log)")
        _ = await agent.terminate()
        _ = await controller.process.terminate()
    }
}
