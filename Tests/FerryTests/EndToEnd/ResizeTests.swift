import FerryWire
import Foundation
import Testing

/// `ferryctl volume resize` through a real controller and agent, with qemu-io and nbdinfo as
/// the workload and the checks.
@Suite("online volume resize", .serialized)
struct ResizeTests {
    static let mib: UInt64 = 1 << 20

    func volume(_ controller: ControllerProcess, _ target: String) async throws -> API.Volume {
        let r = try await controller.ctl("volume", "show", target, "--json")
        guard r.status == 0 else { throw FerryError(.internalError, "volume show: \(r)") }
        return try API.decoder().decode(API.Volume.self, from: Data(r.stdout.utf8))
    }

    /// The replica holds everything the agent captured, and no sync is running.
    func caughtUp(_ controller: ControllerProcess, _ target: String, timeout: Duration = .seconds(60)) async throws -> Bool {
        try await eventually(timeout: timeout, every: .milliseconds(200)) {
            let v = try await volume(controller, target)
            return v.replicaState == .protected && v.lastSequence != nil && v.durableSequence == v.lastSequence && (v.sync?.done ?? true)
        }
    }

    func point(_ controller: ControllerProcess, _ group: String) async throws -> String {
        var r = try await controller.ctl("point", "create", group)
        // A cut a busy machine could not hold within the budget aborts and records nothing: try again.
        for _ in 0..<5 where r.status != 0 && r.stderr.contains("aborted") {
            r = try await controller.ctl("point", "create", group)
        }
        guard r.status == 0 else { throw FerryError(.internalError, "point create: \(r)") }
        return r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    func export(_ controller: ControllerProcess, _ target: String, point: String) async throws -> String {
        let r = try await controller.ctl("volume", "export", target, "--point", point, "--json")
        guard r.status == 0 else { throw FerryError(.internalError, "volume export: \(r)") }
        return try API.decoder().decode(API.Export.self, from: Data(r.stdout.utf8)).uri
    }

    func size(_ uri: String) async throws -> UInt64? {
        let r = try await run("/usr/bin/nbdinfo", ["--size", uri])
        return r.status == 0 ? UInt64(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) : nil
    }

    /// qemu-io commands on `uri`; every `read -P` must find its pattern.
    func qemuIO(_ uri: String, _ commands: [String], readOnly: Bool = false) async throws -> CommandResult {
        try await run("/usr/bin/qemu-io", ["-f", "raw"] + (readOnly ? ["-r"] : []) + [uri] + commands.flatMap { ["-c", $0] })
    }

    func verified(_ r: CommandResult) -> Bool { r.status == 0 && !r.stdout.contains("Pattern verification failed") }

    @Test("resize grows a protected volume with no resync: new connections see the new size, writes past the old end replicate, points keep their own size, shrinking is refused; kill -9 of the agent and the controller keeps it all")
    func growsOnline() async throws {
        let dir = try TestDirectory()
        var controller = try await ControllerProcess.start(dataDir: dir.sub("controller"))
        var agent = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir)
        #expect(try await controller.waitFor("db", state: "online"))
        let image = dir.sub("volumes") + "/data.img"
        var r = try await controller.ctl("protect", "db", "--volume", "data", "--path", image, "--create-size", "32M")
        #expect(r.status == 0, "\(r)")
        // Not a timing test: a loaded machine must not abort the cuts.
        r = try await controller.ctl("group", "create", "g", "--volume", "db/data", "--crash-interval", "1h", "--hold-budget", "2s")
        #expect(r.status == 0, "\(r)")
        let socket = try #require(try await volume(controller, "db/data").socketPath)
        let uri = "nbd+unix:///data?socket=\(socket)"
        #expect(try await qemuIO(uri, ["write -P 0xa1 0 1M", "write -P 0xa2 31M 1M", "flush"]).status == 0)
        #expect(try await caughtUp(controller, "db/data"))
        let before = try await volume(controller, "db/data")
        let small = try await point(controller, "g")

        // Grow it by half, online: the workload's connection is not touched.
        let busy = try await ChildProcess("/usr/bin/qemu-io", ["-f", "raw", uri, "-c", "write -P 0xa3 4M 1M", "-c", "sleep 3000", "-c", "read -P 0xa3 4M 1M"],
                                          logPath: dir.file("busy.log"))
        r = try await controller.ctl("volume", "resize", "db/data", "--size", "48M")
        #expect(r.status == 0 && r.stdout.contains("grown from 32.0 MiB to 48.0 MiB") && !r.stdout.contains("still"), "\(r)")
        #expect(try await size(uri) == 48 * Self.mib)
        #expect(await busy.waitForExit(timeout: .seconds(30)) == 0 && !busy.log.contains("failed"), "\(busy.log)")
        #expect((try FileManager.default.attributesOfItem(atPath: image)[.size] as? Int) == 48 << 20)
        // Writes past the old end, one straddling it.
        #expect(try await qemuIO(uri, ["write -P 0xb1 40M 1M", "write -P 0xb2 32256K 1M", "write -P 0xb3 47M 1M", "flush"]).status == 0)
        #expect(try await caughtUp(controller, "db/data"))
        let grown = try await volume(controller, "db/data")
        #expect(grown.sizeBytes == 48 * Self.mib && grown.replicaState == .protected)
        // No resync: the same syncs as before, nothing compared since.
        #expect(grown.syncsCompleted == before.syncsCompleted && grown.markedExtents ?? 0 <= 3, "\(grown)")
        let large = try await point(controller, "g")
        #expect(try await controller.audit().contains { $0.action == "volume.resize" && $0.target == "db/data" && $0.detail.contains("from=33554432 to=50331648") })

        // Shrinking is refused; the same size again changes nothing.
        r = try await controller.ctl("volume", "resize", "db/data", "--size", "16M")
        #expect(r.status == 1 && r.stderr.contains("shrinking it to 16777216 is refused"), "\(r)")
        r = try await controller.ctl("volume", "resize", "db/data", "--size", "48M")
        #expect(r.status == 0 && r.stdout.contains("nothing changed"), "\(r)")
        r = try await controller.ctl("volume", "resize", "db/data", "--size", "50000001")
        #expect(r.status == 1 && r.stderr.contains("512-byte sectors"), "\(r)")

        // Each point keeps its own size.
        let old = try await export(controller, "db/data", point: small)
        #expect(try await size(old) == 32 * Self.mib)
        #expect(verified(try await qemuIO(old, ["read -P 0xa1 0 1M", "read -P 0xa2 31M 1M"], readOnly: true)))
        let new = try await export(controller, "db/data", point: large)
        #expect(try await size(new) == 48 * Self.mib)
        #expect(verified(try await qemuIO(new, ["read -P 0xa1 0 1M", "read -P 0xa3 4M 1M", "read -P 0xa2 31M 512K", "read -P 0xb2 32256K 1M",
                                                "read -P 0 33280K 7M", "read -P 0xb1 40M 1M", "read -P 0xb3 47M 1M"], readOnly: true)))

        // kill -9 both; the controller replays a journal with records past the old size.
        await agent.kill9()
        await controller.process.kill9()
        controller = try await ControllerProcess.start(dataDir: controller.dataDir, listen: controller.agentAddress, logName: "controller-2.log")
        // The agent is away: a resize needs it.
        r = try await controller.ctl("volume", "resize", "db/data", "--size", "64M")
        #expect(r.status == 1 && r.stderr.contains("not connected"), "\(r)")
        agent = try await AgentProcess.start(dataDir: dir.path + "/agent-db", logPath: dir.file("db-2.log"))
        #expect(try await controller.waitFor("db", state: "online"))
        #expect(try await eventually(timeout: .seconds(10)) { try await size(uri) == 48 * Self.mib })
        #expect(try await qemuIO(uri, ["write -P 0xc1 46M 1M", "flush"]).status == 0)
        #expect(try await caughtUp(controller, "db/data"))
        let restarted = try await volume(controller, "db/data")
        #expect(restarted.sizeBytes == 48 * Self.mib && restarted.lastError == nil, "\(restarted)")
        let after = try await point(controller, "g")
        let last = try await export(controller, "db/data", point: after)
        #expect(try await size(last) == 48 * Self.mib)
        #expect(verified(try await qemuIO(last, ["read -P 0xb1 40M 1M", "read -P 0xc1 46M 1M", "read -P 0xb3 47M 1M"], readOnly: true)))
        #expect(try await size(try await export(controller, "db/data", point: small)) == 32 * Self.mib)

        // Grown again after the restarts: the agent's new epoch announced 48M first.
        r = try await controller.ctl("volume", "resize", "db/data", "--size", "64M", "--json")
        let result = try API.decoder().decode(API.ResizeResult.self, from: Data(r.stdout.utf8))
        #expect(result.changed && result.previousBytes == 48 * Self.mib && result.replicaBytes == 64 * Self.mib, "\(r)")
        #expect(try await qemuIO(uri, ["write -P 0xd1 63M 1M", "flush"]).status == 0)
        #expect(try await caughtUp(controller, "db/data"))
        let biggest = try await export(controller, "db/data", point: try await point(controller, "g"))
        #expect(try await size(biggest) == 64 * Self.mib)
        #expect(verified(try await qemuIO(biggest, ["read -P 0xd1 63M 1M", "read -P 0xc1 46M 1M", "read -P 0xa1 0 1M"], readOnly: true)))
        await agent.kill9()
    }

    @Test("a failover at a point before a resize gets the point's size; the landed volume grows on its recovery host; reprotect grows the original volume as its sink (hash pass, then journal order); failback brings the grown volume home with zero data loss and its replica follows")
    func grownVolumeFailsBack() async throws {
        let failover = FailoverTests()
        var lab = try await HydrationLab.start(size: "32M", writes: ["write -P 0x11 0 8M"])
        let controller = lab.controller
        let source = "nbd+unix:///data?socket=\(lab.dir.path)/agent-db/sockets/data.sock"
        // db/data grows after the lab's point: the point keeps 32 MiB.
        var r = try await controller.ctl("volume", "resize", "db/data", "--size", "40M")
        #expect(r.status == 0, "\(r)")
        #expect(try await failover.qemuIO(source, "write -P 0x12 36M 1M", "flush").ok)
        #expect(try await failover.caughtUp(lab.site, "db/data"))

        let job = try await failover.job(lab.site, "failover", "shop", "--point", lab.point, "--hydrate")
        #expect(job.state == .succeeded, "\(job)\n\(controller.process.log.suffix(3000))")
        let landed = "nbd+unix:///db-data?socket=\(lab.dir.path)/agent-rec1/sockets/db-data.sock"
        #expect(try await size(landed) == 32 * Self.mib)
        // Still filling from the point: refused until it is all local, then grown there.
        var refusedWhileFilling = false
        #expect(try await eventually(timeout: .seconds(60), every: .milliseconds(300)) {
            r = try await controller.ctl("volume", "resize", "rec1/db-data", "--size", "48M")
            if r.stderr.contains("still filling") { refusedWhileFilling = true }
            return r.status == 0
        }, "\(r)")
        #expect(refusedWhileFilling)
        #expect(try await size(landed) == 48 * Self.mib)
        #expect(try await failover.qemuIO(landed, "write -P 0x21 44M 2M", "write -P 0x22 31M 2M", "flush").ok)
        #expect(try await failover.caughtUp(lab.site, "rec1/db-data"))
        // rec1 killed -9 and back: its hydrated volume is served at its new size (its map is the
        // point's, complete, smaller than the volume now).
        await lab.rec1.kill9()
        lab.rec1 = try await AgentProcess.start(dataDir: lab.dir.path + "/agent-rec1", arguments: ["--config", lab.recConfig],
                                                logPath: lab.dir.file("rec1-2.log"))
        #expect(try await controller.waitFor("rec1", state: "online"))
        #expect(try await eventually(timeout: .seconds(10)) { try await size(landed) == 48 * Self.mib }, "\(lab.rec1.log.suffix(2000))")
        #expect(try await failover.qemuIO(landed, "read -P 0x21 44M 2M", "read -P 0x11 0 8M").ok)
        #expect(try await failover.caughtUp(lab.site, "rec1/db-data"))

        // db/data (40 MiB, fenced) becomes rec1's sink: it grows to 48 MiB in the pass by block
        // hashes, then follows rec1's journal, which grows again meanwhile.
        let reprotect = try await failover.job(lab.site, "reprotect", "shop")
        #expect(reprotect.state == .succeeded, "\(reprotect)\n\(controller.process.log.suffix(3000))")
        r = try await controller.ctl("volume", "resize", "rec1/db-data", "--size", "56M")
        #expect(r.status == 0, "\(r)")
        #expect(try await failover.qemuIO(landed, "write -P 0x23 54M 1M", "flush").ok)
        let sinkFile = lab.dir.sub("volumes-db") + "/data.img"
        #expect(try await eventually(timeout: .seconds(60), every: .milliseconds(300)) {
            (try FileManager.default.attributesOfItem(atPath: sinkFile)[.size] as? Int) == 56 << 20
        }, "\(controller.process.log.suffix(3000))")

        // Failback: db owns a 56 MiB volume holding everything rec1 wrote.
        #expect(try await failover.qemuIO(landed, "write -P 0x24 50M 1M", "flush").ok)
        let failback = try await failover.job(lab.site, "failback", "shop")
        #expect(failback.state == .succeeded, "\(failback)\n\(controller.process.log.suffix(3000))")
        #expect(try await size(source) == 56 * Self.mib)
        let q = try await failover.qemuIO(source, "read -P 0x11 0 8M", "read -P 0x22 31M 2M", "read -P 0x21 44M 2M", "read -P 0x24 50M 1M",
                                          "read -P 0x23 54M 1M", "read -P 0 36M 1M")
        #expect(q.ok, "after failback: \(q.output)")
        // Its replica grew with it: a write at the new end replicates and a new point holds it.
        #expect(try await failover.qemuIO(source, "write -P 0x31 55M 1M", "flush").ok)
        #expect(try await caughtUp(controller, "db/data"), "\(controller.process.log.suffix(3000))")
        #expect(try await volume(controller, "db/data").sizeBytes == 56 * Self.mib)
        let home = try await export(controller, "db/data", point: try await point(controller, "shop"))
        #expect(try await size(home) == 56 * Self.mib)
        #expect(verified(try await qemuIO(home, ["read -P 0x31 55M 1M", "read -P 0x23 54M 1M", "read -P 0x11 0 8M"], readOnly: true)))
        lab.db.signal(SIGTERM)
        lab.rec1.signal(SIGTERM)
        lab.controller = controller
    }
}
