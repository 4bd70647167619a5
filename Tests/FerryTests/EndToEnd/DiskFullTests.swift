import FerryWire
import Foundation
import Testing

/// A full controller disk is a state of the volumes that write into it, not a crash loop.
@Suite("controller disk full", .serialized)
struct DiskFullTests {
    func freeBytes(_ path: String) -> UInt64 {
        var fs = statvfs()
        guard statvfs(path, &fs) == 0 else { return 0 }
        return UInt64(fs.f_bavail) * UInt64(fs.f_frsize)
    }

    @Test("the controller's data dir on a small tmpfs fills up: the volume pauses with the cause and the space needed, the session and the other volume stay up, the workload never fails, and replication resumes by itself when space returns")
    func pausesAndResumes() async throws {
        let dir = try TestDirectory()
        let mount = dir.sub("small-disk")
        var r = try await run("/usr/bin/mount", ["-t", "tmpfs", "-o", "size=320m", "tmpfs", mount])
        try #require(r.status == 0, "\(r)")
        defer { _ = umount2(mount, Int32(MNT_DETACH)) }
        let controller = try await ControllerProcess.start(dataDir: mount + "/controller")
        let agent = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir)
        defer {
            agent.signal(SIGKILL)
            controller.process.signal(SIGKILL)
        }
        #expect(try await controller.waitFor("db", state: "online"))
        let failover = FailoverTests()
        for (name, size) in [("data", "128M"), ("idle", "16M")] {
            r = try await controller.ctl("protect", "db", "--volume", name, "--path", dir.sub("volumes") + "/\(name).img", "--create-size", size)
            #expect(r.status == 0, "\(r)")
        }
        for target in ["db/data", "db/idle"] {
            #expect(try await eventually(timeout: .seconds(60), every: .milliseconds(300)) {
                let v = try await failover.volume(controller, target)
                return v.replicaState == .protected && (v.sync?.done ?? true)
            })
        }
        let data = try await failover.volume(controller, "db/data")
        let uri = "nbd+unix:///data?socket=\(try #require(data.socketPath))"

        // Leave 48 MiB: 96 MiB of writes need twice that (journal and image).
        let filler = mount + "/filler"
        r = try await run("/usr/bin/fallocate", ["-l", "\(freeBytes(mount) - (48 << 20))", filler])
        try #require(r.status == 0, "\(r)")
        let write = try await run("/usr/bin/qemu-io", ["-f", "raw", "-t", "none", "-c", "write -P 0x5c 0 96M", "-c", "flush", uri], timeout: .seconds(120))
        #expect(write.status == 0 && !write.stdout.contains("error"), "the workload must never fail: \(write)")

        var paused: API.Volume?
        #expect(try await eventually(timeout: .seconds(30), every: .milliseconds(300)) {
            paused = try await failover.volume(controller, "db/data")
            return paused?.replicaState == .paused
        }, "\(String(describing: paused))")
        #expect(paused?.lastError?.contains("disk is full") == true && paused?.lastError?.contains("MiB free needed") == true, "\(String(describing: paused?.lastError))")
        let metrics = try await controller.ctl("metrics").stdout
        #expect(metrics.contains("ferry_volume_replication_paused") && metrics.contains("disk-full"), "\(metrics.suffix(2000))")
        // No reconnection loop: the session stays, the host online, the other volume protected.
        let sessions = controller.process.log.components(separatedBy: "agent session open").count - 1
        for _ in 0..<10 {
            #expect(try await controller.host("db")?.state == .online)
            try await Task.sleep(for: .milliseconds(300))
        }
        #expect(controller.process.log.components(separatedBy: "agent session open").count - 1 == sessions, "the session was closed and reopened")
        #expect(try await failover.volume(controller, "db/idle").replicaState == .protected)
        #expect(controller.process.isRunning && agent.isRunning)

        // Space returns: replication resumes by itself and catches up; the replica equals the source.
        try FileManager.default.removeItem(atPath: filler)
        var resumed: API.Volume?
        #expect(try await eventually(timeout: .seconds(90), every: .milliseconds(500)) {
            resumed = try await failover.volume(controller, "db/data")
            return resumed?.replicaState == .protected && resumed?.lastSequence != nil && resumed?.durableSequence == resumed?.lastSequence
        }, "\(String(describing: resumed))")
        let replica = try #require(try await failover.volume(controller, "db/data").replicaPath)
        #expect(try await eventually(timeout: .seconds(30), every: .milliseconds(500)) {
            try await run("/usr/bin/qemu-img", ["compare", "-q", "-f", "raw", "-F", "raw", dir.path + "/volumes/data.img", replica]).status == 0
        })
        #expect(controller.process.log.contains("replication resumes"))
    }
}
