import FerryAgentCore
import FerryWire
import Foundation
import Testing

/// The agent's built-in fsfreeze hook on real ext4 file systems: over a Ferry export (nbdfuse +
/// loop) under a writing workload, and on a loop-mounted image for the guard's tests.
@Suite("built-in fsfreeze hook", .serialized)
struct FsfreezeTests {
    /// A command that must succeed.
    @discardableResult
    func must(_ path: String, _ args: [String], timeout: Duration = .seconds(60)) async throws -> CommandResult {
        let r = try await run(path, args, timeout: timeout)
        guard r.status == 0 else { throw FerryError(.internalError, "\(path) \(args.joined(separator: " ")): \(r)") }
        return r
    }

    /// A 64 MiB ext4 image mounted at `dir/NAME` through a loop device.
    func loopExt4(_ dir: TestDirectory, _ name: String) async throws -> String {
        let image = dir.file(name + ".ext4"), mount = dir.sub(name)
        try await must("/usr/bin/truncate", ["-s", "64M", image])
        try await must("/usr/sbin/mkfs.ext4", ["-q", "-F", image])
        try await must("/usr/bin/mount", ["-o", "loop", image, mount])
        return mount
    }

    /// Thawed (in case) and unmounted, synchronously so a `defer` can do it (also on failure);
    /// a loop device set up by `mount -o loop` goes with its mount.
    func release(_ mount: String) {
        let fd = open(mount, O_RDONLY | O_DIRECTORY)
        if fd >= 0 {
            _ = ioctl(fd, UInt(0xC004_5878), 0)  // FITHAW; EINVAL when not frozen
            close(fd)
        }
        if umount2(mount, 0) != 0 { _ = umount2(mount, Int32(MNT_DETACH)) }
    }

    /// Detaches a loop device `losetup -f` set up (LOOP_CLR_FD).
    func detach(loop device: String) {
        let fd = open(device, O_RDONLY)
        guard fd >= 0 else { return }
        _ = ioctl(fd, UInt(0x4C01), 0)
        close(fd)
    }

    /// Whether `mount` is frozen now: a second FIFREEZE says EBUSY (if it was not frozen, this
    /// froze it: thawed again at once, and false).
    func isFrozen(_ mount: String) async throws -> Bool {
        let r = try await run("/usr/sbin/fsfreeze", ["-f", mount], timeout: .seconds(10))
        if r.status == 0 { _ = try await run("/usr/sbin/fsfreeze", ["-u", mount], timeout: .seconds(10)); return false }
        return r.stderr.contains("busy")
    }

    @Test("an app-consistent point of ext4 over an export, under a writer: frozen and thawed by the agent, the point's image is clean without journal recovery and holds whole records")
    func appPointOverExport() async throws {
        let dir = try TestDirectory()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"))
        defer { controller.process.signal(SIGTERM) }
        let mount = dir.sub("mnt")
        let config = dir.file("agent.yaml")
        try "hooks:\n  fs:\n    fsfreeze: [\"\(mount)\"]\n".write(toFile: config, atomically: true, encoding: .utf8)
        let agent = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir, arguments: ["--config", config])
        defer { agent.signal(SIGTERM) }
        #expect(try await controller.waitFor("db", state: "online"))
        #expect(try await controller.ctl("protect", "db", "--volume", "data", "--path", dir.sub("volumes") + "/data.img", "--create-size", "64M").status == 0)
        var socket = ""
        #expect(try await eventually(timeout: .seconds(60), every: .milliseconds(300)) {
            let r = try await controller.ctl("volume", "show", "db/data", "--json")
            guard let v = try? API.decoder().decode(API.Volume.self, from: Data(r.stdout.utf8)) else { return false }
            socket = v.socketPath ?? ""
            return v.replicaState == .protected && (v.sync?.done ?? true)
        })
        // ext4 on the export: nbdfuse gives a file, loop a block device.
        let fuse = dir.sub("fuse")
        let nbdfuse = try await ChildProcess("/usr/bin/nbdfuse", [fuse + "/disk", "--unix", socket], logPath: dir.file("nbdfuse.log"))
        defer { nbdfuse.signal(SIGTERM); _ = umount2(fuse, Int32(MNT_DETACH)) }
        #expect(await eventually(timeout: .seconds(10)) { FileManager.default.fileExists(atPath: fuse + "/disk") })
        let loop = try await must("/usr/sbin/losetup", ["-f", "--show", fuse + "/disk"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        // (Runs before the nbdfuse defer above: the file system first, then its loop device.)
        defer { release(mount); detach(loop: loop) }
        try await must("/usr/sbin/mkfs.ext4", ["-q", "-F", loop])
        try await must("/usr/bin/mount", [loop, mount])
        // A writer: each record written, fsynced, renamed into place, then logged.
        let log = dir.file("records.log")
        let writer = try await ChildProcess("/bin/sh", ["-c", """
            i=0; while :; do i=$((i+1)); printf 'record %08d\\n' $i > \(mount)/tmp; sync \(mount)/tmp; mv \(mount)/tmp \(mount)/r-$i; echo $i >> \(log); done
            """], logPath: dir.file("writer.log"))
        #expect(await eventually(timeout: .seconds(20)) { ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").split(separator: "\n").count >= 20 })

        #expect(try await controller.ctl("group", "create", "shop", "--volume", "db/data", "--crash-interval", "0", "--app-interval", "0",
                                          "--quiesce-hook", "fs", "--thaw-hook", "fs", "--hook-timeout", "20s",
                                          "--hold-budget", "2s").status == 0)
        let cut = try await controller.ctl("point", "create", "shop", "--app", "--json")
        #expect(cut.status == 0, "\(cut)")
        let point = try API.decoder().decode(API.Point.self, from: Data(cut.stdout.utf8))
        #expect(point.consistency == "app" && point.hookError == nil, "\(point)")
        let agentLog = agent.log
        #expect(agentLog.contains("fsfreeze: frozen") && agentLog.contains("fsfreeze: thawed"))
        #expect(try await !isFrozen(mount))
        // The writer went on after the thaw.
        let logged = { ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").split(separator: "\n").count }
        let afterCut = logged()
        #expect(await eventually(timeout: .seconds(20)) { logged() > afterCut + 10 })
        writer.signal(SIGKILL)
        _ = await writer.waitForExit(timeout: .seconds(10))
        release(mount)

        // The point's image: ext4 with nothing to recover, every record whole.
        #expect(await eventually(timeout: .seconds(30)) {
            ((try? await controller.ctl("points", "shop", "--json")).flatMap { try? API.decoder().decode([API.Point].self, from: Data($0.stdout.utf8)) }?
                .first { $0.id == point.id }?.complete) == true
        })
        let image = dir.file("point.img")
        let exported = try await controller.ctl("volume", "export", "db/data", "--point", point.id, "--out", image)
        #expect(exported.status == 0, "\(exported)")
        let features = try await must("/usr/sbin/dumpe2fs", ["-h", image]).stdout
        #expect(!features.contains("needs_recovery"), "the point needs journal recovery: not frozen at the cut")
        let fsck = try await run("/usr/sbin/e2fsck", ["-fn", image], timeout: .seconds(60))
        #expect(fsck.status == 0, "\(fsck)")
        let check = dir.sub("check")
        try await must("/usr/bin/mount", ["-o", "ro,loop,noload", image, check])
        defer { release(check) }
        let records = try FileManager.default.contentsOfDirectory(atPath: check).filter { $0.hasPrefix("r-") }
        #expect(records.count >= 20)
        for r in records {
            let n = Int(r.dropFirst(2)) ?? -1
            #expect(try String(contentsOfFile: check + "/" + r, encoding: .utf8) == String(format: "record %08d\n", n), "\(r)")
        }
    }

    @Test("kill -9 of the agent while it holds a freeze: the guard thaws at once; the file system holding the agent's data dir is refused")
    func guardThawsWhenTheAgentDies() async throws {
        let dir = try TestDirectory()
        let frozen = try await loopExt4(dir, "frozen")
        defer { release(frozen) }
        // The agent whose data dir is on a file system it is asked to freeze.
        let own = try await loopExt4(dir, "own")
        defer { release(own) }
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"))
        defer { controller.process.signal(SIGTERM) }
        // db freezes `frozen`; app's quiesce takes 6 s, so db holds its freeze that long.
        let dbConfig = dir.file("agent-db.yaml"), appConfig = dir.file("agent-app.yaml")
        try "hooks:\n  q:\n    fsfreeze: [\"\(frozen)\"]\n".write(toFile: dbConfig, atomically: true, encoding: .utf8)
        try "hooks:\n  q: \"[ \\\"$FERRY_HOOK_PHASE\\\" = quiesce ] && sleep 6; true\"\n".write(toFile: appConfig, atomically: true, encoding: .utf8)
        var db = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir, arguments: ["--config", dbConfig])
        let app = try await AgentProcess.enrollAndStart("app", controller: controller, in: dir, arguments: ["--config", appConfig])
        defer { db.signal(SIGTERM); app.signal(SIGTERM) }
        for host in ["db", "app"] {
            #expect(try await controller.waitFor(host, state: "online"))
            #expect(try await controller.ctl("protect", host, "--volume", "data", "--path", dir.sub("volumes-\(host)") + "/data.img", "--create-size", "8M").status == 0)
        }
        for target in ["db/data", "app/data"] {
            #expect(try await eventually(timeout: .seconds(60), every: .milliseconds(300)) {
                let r = try await controller.ctl("volume", "show", target, "--json")
                guard let v = try? API.decoder().decode(API.Volume.self, from: Data(r.stdout.utf8)) else { return false }
                return v.replicaState == .protected && (v.sync?.done ?? true)
            })
        }
        #expect(try await controller.ctl("group", "create", "shop", "--volume", "db/data", "--volume", "app/data", "--crash-interval", "0",
                                          "--app-interval", "0", "--quiesce-hook", "q", "--thaw-hook", "q", "--hook-timeout", "30s",
                                          "--hold-budget", "2s").status == 0)
        // Cut an app point without waiting for it; db freezes and holds.
        let cutter = try await ChildProcess(Binaries.path("ferryctl"), ["point", "create", "shop", "--app"], environment: controller.apiEnvironment,
                                            logPath: dir.file("cutter.log"))
        defer { cutter.signal(SIGTERM) }
        #expect(await eventually(timeout: .seconds(20)) { db.log.contains("fsfreeze: frozen") },
                "\(db.log.suffix(1500))\n\((try? String(contentsOfFile: dir.file("cutter.log"), encoding: .utf8)) ?? "")")
        #expect(try await isFrozen(frozen))
        // The agent dies holding it: the guard thaws now, not at the hold's end (60 s away).
        let killed = ContinuousClock.now
        await db.kill9()
        #expect(try await eventually(timeout: .seconds(5), every: .milliseconds(50)) { try await !isFrozen(frozen) })
        #expect(killed.duration(to: .now) < .seconds(5))
        let probe = try await run("/bin/sh", ["-c", "echo written > \(frozen)/after"], timeout: .seconds(5))
        #expect(probe.status == 0, "a write after the thaw: \(probe)")
        _ = await cutter.waitForExit(timeout: .seconds(60))

        // Restarted with a hook over the file system its own data dir lives on: refused.
        try "hooks:\n  q:\n    fsfreeze: [\"\(own)\"]\n".write(toFile: dbConfig, atomically: true, encoding: .utf8)
        let ownData = own + "/agent"
        try await must("/bin/cp", ["-a", dir.path + "/agent-db", ownData])
        db = try await AgentProcess.start(dataDir: ownData, arguments: ["--config", dbConfig], logPath: dir.file("agent-db-own.log"))
        #expect(try await controller.waitFor("db", state: "online", timeout: .seconds(30)))
        let refused = try await controller.ctl("point", "create", "shop", "--app", "--json")
        let point = try API.decoder().decode(API.Point.self, from: Data(refused.stdout.utf8))
        #expect(point.consistency != "app" && point.hookError?.contains("holds the agent's data dir") == true, "\(point)")
        #expect(try await !isFrozen(own))
    }

    @Test("a freeze belongs to its round: another round's freeze is refused and its thaw releases nothing; its own round's thaw releases it")
    func roundsOwnTheirFreeze() async throws {
        let dir = try TestDirectory()
        let mount = try await loopExt4(dir, "rounds")
        defer { release(mount) }
        let freezer = FilesystemFreeze(dataDir: dir.sub("agent"))
        try await freezer.freeze("q", round: "a", mountPoints: [mount], hold: .seconds(60))
        #expect(try await isFrozen(mount))
        await #expect(throws: FerryError.self) { try await freezer.freeze("q", round: "b", mountPoints: [mount], hold: .seconds(60)) }
        try await freezer.thaw("q", round: "b")
        #expect(try await isFrozen(mount), "another round's thaw released the freeze")
        #expect(freezer.frozen == ["q"])
        try await freezer.thaw("q", round: "a")
        #expect(try await !isFrozen(mount))
        #expect(freezer.frozen.isEmpty)
        // Again, for a new round: the first guard was disarmed by the thaw, not left to thaw this one.
        try await freezer.freeze("q", round: "c", mountPoints: [mount], hold: .seconds(60))
        #expect(try await isFrozen(mount))
        try await freezer.thaw("q", round: "c")
        #expect(try await !isFrozen(mount))
    }
}
