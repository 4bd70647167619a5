import CFerrySystem
import FerryWire
import Foundation
import Logging
import NIOPosix
import Synchronization

/// The built-in `fsfreeze` hook: freezes a hook's mount points in order for an app-consistent
/// point and thaws them in reverse. A frozen file system never outlives its hold: each freeze
/// arms a guard process (not a thread of the agent) that thaws them when the agent closes its
/// end of a pipe (a thaw, or the agent's death, kill -9 included) or at the hold's deadline,
/// whichever comes first.
public final class FilesystemFreeze: Sendable {
    struct Hold: Sendable {
        var mountPoints: [String]
        var fds: [Int32]
        /// The write end of the guard's wake pipe: closing it thaws.
        var wake: Int32
        var deadline: ContinuousClock.Instant
    }

    private let dataDir: String
    private let logger: Logger?
    private let holds = Mutex<[String: Hold]>([:])

    public init(dataDir: String, logger: Logger? = nil) {
        self.dataDir = dataDir
        self.logger = logger
    }

    /// Hook names holding a freeze now (for tests and logs).
    public var frozen: [String] { holds.withLock { Array($0.keys).sorted() } }

    /// Freezes `mountPoints` in order and arms the guard for `hold`. Refuses a mount point
    /// that is not one, or whose file system holds the agent's data dir (a frozen agent could
    /// never thaw it). On any failure what it froze is thawed again.
    public func freeze(_ name: String, mountPoints: [String], hold: Duration) async throws {
        try reap(name)
        let dataDir = self.dataDir
        let opened: Hold = try await NIOThreadPool.singleton.runIfActive {
            try Self.freezeBlocking(mountPoints, dataDir: dataDir, hold: hold)
        }
        let clash = holds.withLock { holds -> Bool in
            guard holds[name] == nil else { return true }
            holds[name] = opened
            return false
        }
        if clash {
            Self.release(opened)
            throw FerryError(.conflict, "fsfreeze hook '\(name)' holds a freeze already")
        }
        logger?.info("fsfreeze: frozen", metadata: ["hook": "\(name)", "mounts": "\(mountPoints)", "hold": "\(hold)"])
    }

    /// Thaws what hook `name` froze, last first; nothing to do when it holds no freeze (a thaw
    /// always follows a quiesce, also after an abort).
    public func thaw(_ name: String) async throws {
        guard let hold = holds.withLock({ $0.removeValue(forKey: name) }) else { return }
        let failures = try await NIOThreadPool.singleton.runIfActive { Self.release(hold) }
        logger?.info("fsfreeze: thawed", metadata: ["hook": "\(name)", "mounts": "\(hold.mountPoints)"])
        guard failures.isEmpty else {
            throw FerryError(.io, "fsfreeze hook '\(name)': thaw failed for \(failures.joined(separator: ", ")) (the guard thaws them too)")
        }
    }

    /// A hold whose deadline passed was thawed by its guard: forget it.
    private func reap(_ name: String) throws {
        let stale = holds.withLock { holds -> Hold? in
            guard let h = holds[name], h.deadline <= .now else { return nil }
            return holds.removeValue(forKey: name)
        }
        if let stale { Self.release(stale) }
    }

    /// Thaws (a file system not frozen is no error), closes the descriptors and the wake pipe.
    /// Returns the mount points whose thaw failed.
    @discardableResult
    static func release(_ hold: Hold) -> [String] {
        var failed: [String] = []
        for (fd, mount) in zip(hold.fds, hold.mountPoints).reversed() {
            if ferry_fs_thaw(fd) != 0, errno != EINVAL { failed.append("\(mount) (\(String(cString: strerror(errno))))") }
            close(fd)
        }
        close(hold.wake)
        return failed
    }

    static func freezeBlocking(_ mountPoints: [String], dataDir: String, hold: Duration) throws -> Hold {
        guard !mountPoints.isEmpty else { throw FerryError(.badConfiguration, "an fsfreeze hook needs at least one mount point") }
        var agentStat = stat()
        guard stat(dataDir, &agentStat) == 0 else { throw FerryError(.io, "cannot stat the agent's data dir \(dataDir)") }
        var fds: [Int32] = []
        func undo() { for fd in fds.reversed() { _ = ferry_fs_thaw(fd); close(fd) } }
        for mount in mountPoints {
            let fd = open(mount, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            guard fd >= 0 else {
                let reason = String(cString: strerror(errno))
                undo()
                throw FerryError(.notFound, "fsfreeze: cannot open mount point \(mount): \(reason)")
            }
            var s = stat(), parent = stat()
            let isMount = fstat(fd, &s) == 0 && stat(mount == "/" ? "/" : mount + "/..", &parent) == 0
                && (s.st_dev != parent.st_dev || s.st_ino == parent.st_ino)
            guard isMount else {
                close(fd); undo()
                throw FerryError(.badRequest, "fsfreeze: \(mount) is not a mount point; freezing it would freeze the file system above it")
            }
            guard s.st_dev != agentStat.st_dev else {
                close(fd); undo()
                throw FerryError(.badRequest, "fsfreeze: \(mount) holds the agent's data dir \(dataDir); the agent would freeze itself and could not thaw it")
            }
            guard ferry_fs_freeze(fd) == 0 else {
                let reason = String(cString: strerror(errno))
                close(fd); undo()
                throw FerryError(.io, "fsfreeze: cannot freeze \(mount): \(reason)")
            }
            fds.append(fd)
        }
        var pipe: [Int32] = [0, 0]
        // Close-on-exec: hooks spawned later never hold the write end (they close every
        // descriptor anyway); the guard's fork closes all it does not need.
        guard Glibc.pipe(&pipe) == 0, fcntl(pipe[0], F_SETFD, FD_CLOEXEC) == 0, fcntl(pipe[1], F_SETFD, FD_CLOEXEC) == 0 else {
            undo()
            throw FerryError(.io, "fsfreeze: no pipe for the thaw guard: \(String(cString: strerror(errno)))")
        }
        let milliseconds = Int32(clamping: max(1, hold.components.seconds * 1000 + hold.components.attoseconds / 1_000_000_000_000_000))
        let armed = fds.withUnsafeBufferPointer { ferry_fs_thaw_guard($0.baseAddress, Int32($0.count), pipe[0], milliseconds) }
        close(pipe[0])
        guard armed == 0 else {
            close(pipe[1]); undo()
            throw FerryError(.io, "fsfreeze: the thaw guard did not start; thawed again")
        }
        return Hold(mountPoints: mountPoints, fds: fds, wake: pipe[1], deadline: .now + hold)
    }
}
