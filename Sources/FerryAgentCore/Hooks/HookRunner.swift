import FerryWire
import Foundation
import Subprocess
#if canImport(System)
import System
#else
import SystemPackage
#endif

/// Runs the hooks defined in the agent's own configuration, by name only: the controller can
/// ask for `fsfreeze-data`, never send a command line.
public struct HookRunner: Sendable {
    public let hooks: [String: String]
    /// Built-in fsfreeze hooks: name → mount points, and what holds their freezes.
    public let fsfreeze: [String: [String]]
    let freezer: FilesystemFreeze?
    /// Most bytes of a hook's output kept for its error message.
    static let outputTail = 2048

    public init(hooks: [String: String], fsfreeze: [String: [String]] = [:], freezer: FilesystemFreeze? = nil) {
        self.hooks = hooks
        self.fsfreeze = fsfreeze
        self.freezer = freezer
    }

    /// The phase a controller names in `FERRY_HOOK_PHASE`: what an fsfreeze hook does; and the
    /// round in `FERRY_HOOK_ROUND`: a thaw releases only the freeze of its own round.
    public static let phaseVariable = "FERRY_HOOK_PHASE"
    public static let roundVariable = "FERRY_HOOK_ROUND"

    /// An fsfreeze hook: `quiesce` freezes (held at most twice the hook's timeout: the guard
    /// thaws then whatever happens), `thaw` thaws.
    func runFreeze(_ name: String, mounts: [String], timeout: Duration, phase: String?, round: String) async -> String? {
        guard let freezer else { return "fsfreeze hook '\(name)' cannot run here" }
        do {
            switch phase {
            case "quiesce"?: try await freezer.freeze(name, round: round, mountPoints: mounts, hold: timeout * 2)
            case "thaw"?: try await freezer.thaw(name, round: round)
            default:
                return "fsfreeze hook '\(name)' runs as a group's quiesce or thaw hook, not as '\(phase ?? "a plan step")'"
            }
            return nil
        } catch {
            return (error as? FerryError)?.message ?? "\(error)"
        }
    }

    /// Runs hook `name` with `/bin/sh -c` in a process group of its own, killing the group
    /// after `timeout`. Returns nil when it exited 0, otherwise why it failed, with the end of
    /// its output.
    ///
    /// Spawned with swift-subprocess (posix_spawn, descriptors above stderr closed, exit seen
    /// through a pidfd), not Foundation's `Process`: on this toolchain that reads past a
    /// directory entry of /proc/self/fd and its pipe's readability handler races libdispatch,
    /// and either crashed the agent mid-cut. Output goes to an unlinked file rather than a
    /// pipe, so a child the hook leaves behind holding it never delays the result.
    public func run(_ name: String, timeout: Duration, environment: [String: String] = [:]) async -> String? {
        if let mounts = fsfreeze[name] {
            return await runFreeze(name, mounts: mounts, timeout: timeout, phase: environment[Self.phaseVariable],
                                   round: String((environment[Self.roundVariable] ?? "").prefix(64)))
        }
        guard let command = hooks[name] else {
            return "no hook named '\(name)' is defined in this agent's configuration (hooks: \((Array(hooks.keys) + Array(fsfreeze.keys)).sorted().joined(separator: ", ")))"
        }
        let output: Int32
        do { output = try Self.anonymousFile() } catch {
            return "hook '\(name)' could not start: \((error as? FerryError)?.message ?? "\(error)")"
        }
        defer { close(output) }
        var overrides: [Environment.Key: String?] = ["FERRY_HOOK": name]
        for (key, value) in Self.allowed(environment) { overrides[Environment.Key(stringLiteral: key)] = value }
        var options = PlatformOptions()
        options.processGroupID = 0
        let configuration = Configuration(executable: .path("/bin/sh"), arguments: ["-c", command], environment: .inherit.updating(overrides),
                                          platformOptions: options)
        let deadline = ContinuousClock.now + timeout
        // The hook's process id, once spawned (or nothing, if it never was), for the timer.
        let (spawned, spawnedContinuation) = AsyncStream.makeStream(of: pid_t.self)
        let outcome = await withTaskGroup(of: HookOutcome?.self) { group in
            group.addTask {
                defer { spawnedContinuation.finish() }
                do {
                    let result = try await Subprocess.run(configuration, input: .none,
                                                          output: .fileDescriptor(FileDescriptor(rawValue: output), closeAfterSpawningProcess: false),
                                                          error: .fileDescriptor(FileDescriptor(rawValue: output), closeAfterSpawningProcess: false)) { execution in
                        spawnedContinuation.yield(execution.processIdentifier.value)
                    }
                    return .ended(result.terminationStatus)
                } catch {
                    return .failedToStart("\(error)")
                }
            }
            group.addTask {
                var pid: pid_t?
                for await p in spawned { pid = p; break }
                guard let pid else { return nil }
                do { try await Task.sleep(until: deadline, clock: .continuous) } catch { return nil }
                // The whole group: a child left running would outlive the kill of its shell.
                kill(-pid, SIGKILL)
                kill(pid, SIGKILL)
                return .timedOut
            }
            var timedOut = false
            var ended: HookOutcome = .timedOut
            for await next in group {
                switch next {
                case .timedOut: timedOut = true
                case .ended, .failedToStart:
                    ended = next!
                    group.cancelAll()
                case nil: break
                }
            }
            return timedOut ? .timedOut : ended
        }
        let tail = Self.tail(of: output, limit: Self.outputTail)
        switch outcome {
        case .timedOut:
            return "hook '\(name)' timed out after \(timeout) and was killed" + (tail.isEmpty ? "" : ": \(tail)")
        case .failedToStart(let why):
            return "hook '\(name)' could not start: \(why)"
        case .ended(.exited(0)):
            return nil
        case .ended(.exited(let status)):
            return "hook '\(name)' exited with status \(status)" + (tail.isEmpty ? "" : ": \(tail)")
        case .ended(.signaled(let signal)):
            return "hook '\(name)' was killed by signal \(signal)" + (tail.isEmpty ? "" : ": \(tail)")
        }
    }

    private enum HookOutcome: Sendable {
        case ended(TerminationStatus)
        case failedToStart(String)
        case timedOut
    }

    /// A temporary file already unlinked: it vanishes with its last descriptor.
    static func anonymousFile() throws -> Int32 {
        var template = Array((FileManager.default.temporaryDirectory.path + "/ferry-hook-XXXXXX").utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { throw FerryError(.io, "cannot create a file for the hook's output in \(FileManager.default.temporaryDirectory.path): \(String(cString: strerror(errno)))") }
        template.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) }
        // Not inherited by other children; the hook gets it as stdout and stderr only.
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        return fd
    }

    /// The last `limit` bytes written to `fd`, as trimmed text.
    static func tail(of fd: Int32, limit: Int) -> String {
        var status = stat()
        guard fstat(fd, &status) == 0, status.st_size > 0 else { return "" }
        let count = Int(min(Int64(limit), Int64(status.st_size)))
        var bytes = [UInt8](repeating: 0, count: count)
        let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(status.st_size) - off_t(count)) }
        guard n > 0 else { return "" }
        return String(decoding: bytes[0..<n], as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }
}

extension HookRunner {
    /// What of a controller's environment a hook gets: FERRY_* names only (never PATH or
    /// LD_PRELOAD), at most 32 of them and 64 KiB in all (a recovery of many volumes lists them all).
    static func allowed(_ environment: [String: String]) -> [String: String] {
        var out: [String: String] = [:]
        var bytes = 0
        for key in environment.keys.sorted() {
            guard out.count < 32, key.hasPrefix("FERRY_"), key.count <= 64,
                  key.allSatisfy({ $0.isASCII && ($0.isUppercase || $0.isNumber || $0 == "_") }),
                  let value = environment[key], !value.contains("\0") else { continue }
            bytes += key.utf8.count + value.utf8.count
            guard bytes <= 64 << 10 else { break }
            out[key] = value
        }
        return out
    }
}
