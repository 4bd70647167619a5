import FerryWire
import Foundation
import Synchronization

/// Runs the hooks defined in the agent's own configuration, by name only: the controller can
/// ask for `fsfreeze-data`, never send a command line.
public struct HookRunner: Sendable {
    public let hooks: [String: String]
    /// Most bytes of a hook's output kept for its error message.
    static let outputTail = 2048

    public init(hooks: [String: String]) { self.hooks = hooks }

    /// Runs hook `name` with `/bin/sh -c`, killing it (and its process group) after `timeout`.
    /// Returns nil when it exited 0, otherwise why it failed, with the end of its output.
    public func run(_ name: String, timeout: Duration, environment: [String: String] = [:]) async -> String? {
        guard let command = hooks[name] else {
            return "no hook named '\(name)' is defined in this agent's configuration (hooks: \(hooks.keys.sorted().joined(separator: ", ")))"
        }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", command]
        var env = ProcessInfo.processInfo.environment
        for (key, value) in Self.allowed(environment) { env[key] = value }
        env["FERRY_HOOK"] = name
        process.environment = env
        let output = Pipe()
        process.standardOutput = output
        process.standardError = output
        process.standardInput = FileHandle.nullDevice
        let collected = OutputTail(limit: Self.outputTail)
        output.fileHandleForReading.readabilityHandler = { handle in
            let data = handle.availableData
            if !data.isEmpty { collected.append(data) }
        }
        let exited: AsyncStream<Int32> = AsyncStream { continuation in
            process.terminationHandler = { p in
                continuation.yield(p.terminationStatus)
                continuation.finish()
            }
        }
        do {
            try process.run()
        } catch {
            output.fileHandleForReading.readabilityHandler = nil
            return "hook '\(name)' could not start: \(error)"
        }
        let pid = process.processIdentifier
        let killed = Atomic<Bool>(false)
        let timer = Task {
            try await Task.sleep(for: timeout)
            killed.store(true, ordering: .relaxed)
            // Its process group too (Foundation starts it in one of its own): a child left
            // holding the output pipe would keep the hook from ever being seen to end.
            if getpgid(pid) == pid { kill(-pid, SIGKILL) }
            kill(pid, SIGKILL)
        }
        var status: Int32 = -1
        for await s in exited { status = s }
        timer.cancel()
        let timedOut = killed.load(ordering: .relaxed)
        output.fileHandleForReading.readabilityHandler = nil
        // What the hook wrote just before it exited may not have reached the handler yet: take
        // it without blocking (a child it left behind may still hold the pipe open).
        // (poll, so the descriptor's flags stay as Foundation set them; at most 64 KiB.)
        var pending = pollfd(fd: output.fileHandleForReading.fileDescriptor, events: Int16(POLLIN), revents: 0)
        var chunk = [UInt8](repeating: 0, count: 4096)
        var drained = 0
        while drained < 64 << 10, poll(&pending, 1, 0) > 0, pending.revents & Int16(POLLIN) != 0 {
            let n = read(pending.fd, &chunk, chunk.count)
            guard n > 0 else { break }
            collected.append(Data(chunk[0..<n]))
            drained += n
        }
        let tail = collected.text
        if timedOut {
            return "hook '\(name)' timed out after \(timeout) and was killed" + (tail.isEmpty ? "" : ": \(tail)")
        }
        guard status == 0, process.terminationReason == .exit else {
            let how = process.terminationReason == .exit ? "exited with status \(status)" : "was killed by signal \(status)"
            return "hook '\(name)' \(how)" + (tail.isEmpty ? "" : ": \(tail)")
        }
        return nil
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

/// The last bytes a hook wrote, for its error message: appended from the pipe's reader
/// thread, read once the hook ended.
final class OutputTail: Sendable {
    private let data = Mutex(Data())
    private let limit: Int

    init(limit: Int) { self.limit = limit }

    func append(_ more: Data) {
        data.withLock { d in
            d.append(more)
            if d.count > limit { d = d.suffix(limit) }
        }
    }

    var text: String {
        String(decoding: data.withLock { $0 }, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }
}
