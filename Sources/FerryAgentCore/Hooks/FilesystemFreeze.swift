import CFerrySystem
import FerryWire
import Foundation
import Logging
import NIOPosix
import Synchronization

/// The built-in `fsfreeze` hook: freezes a hook's mount points in order for an app-consistent
/// point and thaws them in reverse. A frozen file system never outlives its hold: before the
/// first freeze a guard process (not a thread of the agent) is armed that thaws them when the
/// agent closes its end of a pipe without disarming it (the agent died, kill -9 included) or at
/// the hold's deadline, whichever comes first. A thaw the agent did itself disarms the guard
/// (one byte before the close), so a late guard never releases a newer freeze.
///
/// Each freeze belongs to a cut round (`FERRY_HOOK_ROUND`): a thaw releases only its own
/// round's, and a thaw that arrives while its round's freeze is still being taken (a slow
/// flush) releases it as soon as it is taken.
public final class FilesystemFreeze: Sendable {
    struct Hold: Sendable {
        var mountPoints: [String]
        var fds: [Int32]
        /// The write end of the guard's wake pipe.
        var wake: Int32
        var deadline: ContinuousClock.Instant
    }

    /// One hook's freeze, by state.
    enum Entry: Sendable {
        case freezing(round: String, thawRequested: Bool)
        case frozen(round: String, Hold)
    }

    private let dataDir: String
    private let logger: Logger?
    private let holds = Mutex<[String: Entry]>([:])

    public init(dataDir: String, logger: Logger? = nil) {
        self.dataDir = dataDir
        self.logger = logger
    }

    /// Hook names holding a freeze now (for tests and logs).
    public var frozen: [String] {
        holds.withLock { $0.compactMap { if case .frozen = $0.value { $0.key } else { nil } }.sorted() }
    }

    /// Freezes `mountPoints` in order for `round`, held at most `hold`. Refuses a mount point
    /// that is not one, or whose file system holds the agent's data dir (a frozen agent could
    /// never thaw it). On any failure what it froze is thawed again.
    public func freeze(_ name: String, round: String, mountPoints: [String], hold: Duration) async throws {
        reapExpired(name)
        let busy = holds.withLock { holds -> String? in
            switch holds[name] {
            case .freezing(let r, _)?, .frozen(let r, _)?: return r
            case nil:
                holds[name] = .freezing(round: round, thawRequested: false)
                return nil
            }
        }
        if let busy {
            throw FerryError(.conflict, "fsfreeze hook '\(name)' holds a freeze for another round (\(busy)); this round's point is crash-consistent")
        }
        let dataDir = self.dataDir
        let taken: Hold
        do {
            taken = try await NIOThreadPool.singleton.runIfActive { try Self.freezeBlocking(mountPoints, dataDir: dataDir, hold: hold) }
        } catch {
            holds.withLock { _ = $0.removeValue(forKey: name) }
            throw error
        }
        let thawNow = holds.withLock { holds -> Bool in
            if case .freezing(_, true)? = holds[name] {
                holds[name] = nil
                return true
            }
            holds[name] = .frozen(round: round, taken)
            return false
        }
        if thawNow {
            _ = try? await NIOThreadPool.singleton.runIfActive { Self.release(taken) }
            logger?.warning("fsfreeze: thawed at once, its round's thaw came while it froze", metadata: ["hook": "\(name)", "mounts": "\(mountPoints)"])
            throw FerryError(.timeout, "fsfreeze hook '\(name)': the freeze took longer than the round waited; thawed again")
        }
        logger?.info("fsfreeze: frozen", metadata: ["hook": "\(name)", "round": "\(round)", "mounts": "\(mountPoints)", "hold": "\(hold)"])
    }

    /// Thaws what hook `name` froze in `round`, last first. Nothing to do when it holds no
    /// freeze of that round (the controller thaws after every round, also a failed one).
    public func thaw(_ name: String, round: String) async throws {
        let hold = holds.withLock { holds -> Hold? in
            switch holds[name] {
            case .freezing(let r, _)? where r == round:
                holds[name] = .freezing(round: r, thawRequested: true)
                return nil
            case .frozen(let r, let hold)? where r == round:
                holds[name] = nil
                return hold
            default:
                return nil
            }
        }
        guard let hold else { return }
        let failures = try await NIOThreadPool.singleton.runIfActive { Self.release(hold) }
        logger?.info("fsfreeze: thawed", metadata: ["hook": "\(name)", "round": "\(round)", "mounts": "\(hold.mountPoints)"])
        guard failures.isEmpty else {
            throw FerryError(.io, "fsfreeze hook '\(name)': thaw failed for \(failures.joined(separator: ", ")); its guard thaws them")
        }
    }

    /// A freeze whose deadline passed was thawed by its guard: forget it.
    private func reapExpired(_ name: String) {
        let stale = holds.withLock { holds -> Hold? in
            guard case .frozen(_, let h)? = holds[name], h.deadline <= .now else { return nil }
            holds[name] = nil
            return h
        }
        if let stale { Self.close(stale, disarm: false) }
    }

    /// Thaws, last first (a file system not frozen is no error). When every thaw worked the
    /// guard is disarmed; otherwise it is left to thaw them as the pipe closes. Returns the
    /// mount points whose thaw failed.
    @discardableResult
    static func release(_ hold: Hold) -> [String] {
        var failed: [String] = []
        for (fd, mount) in zip(hold.fds, hold.mountPoints).reversed() where ferry_fs_thaw(fd) != 0 && errno != EINVAL {
            failed.append("\(mount) (\(String(cString: strerror(errno))))")
        }
        close(hold, disarm: failed.isEmpty)
        return failed
    }

    private static func close(_ hold: Hold, disarm: Bool) {
        for fd in hold.fds { Glibc.close(fd) }
        if disarm {
            var byte: UInt8 = 1
            _ = write(hold.wake, &byte, 1)
        }
        Glibc.close(hold.wake)
    }

    /// Opens and checks every mount point, arms the guard over all of them, then freezes them
    /// in order: from the first freeze on, an agent that dies leaves nothing frozen.
    static func freezeBlocking(_ mountPoints: [String], dataDir: String, hold: Duration) throws -> Hold {
        guard !mountPoints.isEmpty else { throw FerryError(.badConfiguration, "an fsfreeze hook needs at least one mount point") }
        var agentStat = stat()
        guard stat(dataDir, &agentStat) == 0 else { throw FerryError(.io, "cannot stat the agent's data dir \(dataDir)") }
        var fds: [Int32] = []
        func closeAll() { for fd in fds { Glibc.close(fd) } }
        for mount in mountPoints {
            let fd = open(mount, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            guard fd >= 0 else {
                let reason = String(cString: strerror(errno))
                closeAll()
                throw FerryError(.notFound, "fsfreeze: cannot open mount point \(mount): \(reason)")
            }
            fds.append(fd)
            var s = stat(), parent = stat()
            let isMount = fstat(fd, &s) == 0 && stat(mount == "/" ? "/" : mount + "/..", &parent) == 0
                && (s.st_dev != parent.st_dev || s.st_ino == parent.st_ino)
            guard isMount else {
                closeAll()
                throw FerryError(.badRequest, "fsfreeze: \(mount) is not a mount point; freezing it would freeze the file system above it")
            }
            guard s.st_dev != agentStat.st_dev else {
                closeAll()
                throw FerryError(.badRequest, "fsfreeze: \(mount) holds the agent's data dir \(dataDir); the agent would freeze itself and could not thaw it")
            }
        }
        var pipe: [Int32] = [0, 0]
        // Close-on-exec: hooks spawned later never hold the write end (they close every
        // descriptor anyway); the guard's fork closes all it does not need.
        guard Glibc.pipe(&pipe) == 0 else {
            closeAll()
            throw FerryError(.io, "fsfreeze: no pipe for the thaw guard: \(String(cString: strerror(errno)))")
        }
        _ = fcntl(pipe[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(pipe[1], F_SETFD, FD_CLOEXEC)
        let milliseconds = Int32(clamping: max(1, hold.components.seconds * 1000 + hold.components.attoseconds / 1_000_000_000_000_000))
        let armed = fds.withUnsafeBufferPointer { ferry_fs_thaw_guard($0.baseAddress, Int32($0.count), pipe[0], milliseconds) }
        Glibc.close(pipe[0])
        guard armed == 0 else {
            Glibc.close(pipe[1])
            closeAll()
            throw FerryError(.io, "fsfreeze: the thaw guard did not start; nothing frozen")
        }
        let held = Hold(mountPoints: mountPoints, fds: fds, wake: pipe[1], deadline: .now + hold)
        for (i, fd) in fds.enumerated() where ferry_fs_freeze(fd) != 0 {
            let reason = String(cString: strerror(errno))
            // Thawed here, and the guard (not disarmed) thaws them all again as the pipe closes.
            for earlier in fds[..<i].reversed() { _ = ferry_fs_thaw(earlier) }
            close(held, disarm: false)
            throw FerryError(.io, "fsfreeze: cannot freeze \(mountPoints[i]): \(reason)")
        }
        return held
    }
}
