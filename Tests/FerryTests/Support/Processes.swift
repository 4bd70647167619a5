import FerryWire
import Foundation
import Synchronization

/// Where the built executables are: next to the test bundle (SwiftPM puts every product of the
/// package in one directory), or `FERRY_BIN_DIR`.
enum Binaries {
    static let directory: String = {
        if let dir = ProcessInfo.processInfo.environment["FERRY_BIN_DIR"] { return dir }
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        return URL(fileURLWithPath: exe).deletingLastPathComponent().path
    }()

    static func path(_ name: String) -> String { directory + "/" + name }
}

/// A temporary directory owned by one test, removed when the test ends.
final class TestDirectory: Sendable {
    let path: String

    init(_ label: String = "ferry-test") throws {
        let template = FileManager.default.temporaryDirectory.path + "/\(label)-XXXXXX"
        var bytes = Array(template.utf8CString)
        guard let made = mkdtemp(&bytes) else { throw FerryError(.io, "mkdtemp failed") }
        path = String(cString: made)
    }

    func sub(_ name: String) -> String {
        let p = path + "/" + name
        try? FileManager.default.createDirectory(atPath: p, withIntermediateDirectories: true)
        return p
    }

    func file(_ name: String) -> String { path + "/" + name }

    /// FERRY_KEEP_TEST_DIRS=1 keeps it (logs, images) to look into a failure.
    deinit {
        if ProcessInfo.processInfo.environment["FERRY_KEEP_TEST_DIRS"] == nil { try? FileManager.default.removeItem(atPath: path) }
    }
}

/// A process started by a test: output goes to a log file, it can be signalled, and its exit is
/// awaited by polling, so no thread of the cooperative pool is ever blocked.
final class ChildProcess: Sendable {
    let name: String
    let logPath: String
    private let process: Process
    private let exitStatus = Mutex<Int32?>(nil)

    init(_ executable: String, _ arguments: [String], environment: [String: String] = [:], logPath: String) throws {
        name = (executable as NSString).lastPathComponent
        self.logPath = logPath
        process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        var env = ProcessInfo.processInfo.environment
        for (k, v) in environment { env[k] = v }
        process.environment = env
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath))
        log.seekToEndOfFile()
        process.standardOutput = log
        process.standardError = log
        process.standardInput = FileHandle.nullDevice
        process.terminationHandler = { [weak self] p in self?.exitStatus.withLock { $0 = p.terminationStatus } }
        try process.run()
    }

    var pid: Int32 { process.processIdentifier }
    var isRunning: Bool { exitStatus.withLock { $0 } == nil }

    func signal(_ sig: Int32) { if isRunning { kill(pid, sig) } }

    /// Resident memory now (VmRSS) and at its peak (VmHWM), from /proc.
    func residentBytes() throws -> UInt64 { try statusKilobytes("VmRSS:") << 10 }
    func peakResidentBytes() throws -> UInt64 { try statusKilobytes("VmHWM:") << 10 }

    private func statusKilobytes(_ key: String) throws -> UInt64 {
        let status = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
        guard let line = status.split(separator: "\n").first(where: { $0.hasPrefix(key) }),
              let kb = UInt64(line.dropFirst(key.count).trimmingCharacters(in: .whitespaces).split(separator: " ").first ?? "") else {
            throw FerryError(.internalError, "no \(key) in /proc/\(pid)/status")
        }
        return kb
    }

    /// The exit status (or signal number for a signalled process), or nil if it is still running
    /// after `timeout`.
    func waitForExit(timeout: Duration) async -> Int32? {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if let status = exitStatus.withLock({ $0 }) { return status }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return exitStatus.withLock { $0 }
    }

/// SIGTERM, then the time it took to exit and its status.
    func terminate(timeout: Duration = .seconds(10)) async -> (status: Int32?, took: Duration) {
        let start = ContinuousClock.now
        signal(SIGTERM)
        let status = await waitForExit(timeout: timeout)
        return (status, ContinuousClock.now - start)
    }

    func kill9() async {
        signal(SIGKILL)
        _ = await waitForExit(timeout: .seconds(10))
    }

    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    deinit { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }
}

/// Runs a command to completion and returns its status and output.
struct CommandResult: CustomStringConvertible {
    var status: Int32
    var stdout: String
    var stderr: String
    var stdoutBytes: [UInt8] = []
    var description: String { "exit \(status)\nstdout: \(stdout)\nstderr: \(stderr)" }
}

func run(
    _ executable: String, _ arguments: [String], environment: [String: String] = [:], stdin: [UInt8]? = nil,
    timeout: Duration = .seconds(60)
) async throws -> CommandResult {
    let dir = try TestDirectory("ferry-cmd")
    let outPath = dir.file("out"), errPath = dir.file("err")
    _ = FileManager.default.createFile(atPath: outPath, contents: nil)
    _ = FileManager.default.createFile(atPath: errPath, contents: nil)
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    var env = ProcessInfo.processInfo.environment
    for (k, v) in environment { env[k] = v }
    process.environment = env
    process.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: outPath))
    process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: errPath))
    if let stdin {
        let inPath = dir.file("in")
        _ = FileManager.default.createFile(atPath: inPath, contents: Data(stdin))
        process.standardInput = FileHandle(forReadingAtPath: inPath)
    } else {
        process.standardInput = FileHandle.nullDevice
    }
    let killer = Task {
        try await Task.sleep(for: timeout)
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
    }
    defer { killer.cancel() }
    let status: Int32 = try await withCheckedThrowingContinuation { c in
        process.terminationHandler = { c.resume(returning: $0.terminationStatus) }
        do { try process.run() } catch { c.resume(throwing: error) }
    }
    return CommandResult(
        status: status,
        stdout: (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? "",
        stderr: (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? "",
        stdoutBytes: FileManager.default.contents(atPath: outPath).map { Array($0) } ?? []
    )
}

/// Polls `condition` until it holds or `timeout` passes.
func eventually(timeout: Duration, every: Duration = .milliseconds(100), _ condition: () async throws -> Bool) async rethrows -> Bool {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if try await condition() { return true }
        try? await Task.sleep(for: every)
    }
    return try await condition()
}
