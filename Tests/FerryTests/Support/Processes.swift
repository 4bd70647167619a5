import FerryWire
import Foundation
import Subprocess
import Synchronization
#if canImport(System)
import System
#else
import SystemPackage
#endif

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
/// awaited (swift-subprocess watches it through a pidfd), so no thread is ever blocked.
///
/// Not Foundation's `Process`: on this toolchain it reads past an entry of /proc/self/fd and
/// crashes once the test process holds some 1,300 descriptors.
final class ChildProcess: Sendable {
    let name: String
    let logPath: String
    let pid: Int32
    private let exit: Task<Int32, Never>
    private let exitStatus: ExitStatus

    /// Set once, by the task that watched the process exit.
    final class ExitStatus: Sendable {
        private let code = Mutex<Int32?>(nil)
        func withLock<T>(_ body: (inout Int32?) -> T) -> T { code.withLock { body(&$0) } }
    }

    /// Output and errors to `logPath` (appended), no input.
    convenience init(_ executable: String, _ arguments: [String], environment: [String: String] = [:], logPath: String) async throws {
        try await self.init(executable, arguments, environment: environment, stdin: "/dev/null", stdout: logPath, stderr: nil)
    }

    /// Input from file `stdin`, output appended to file `stdout`, errors to `stderr` (or `stdout`).
    init(_ executable: String, _ arguments: [String], environment: [String: String], stdin: String, stdout: String, stderr: String?) async throws {
        name = (executable as NSString).lastPathComponent
        logPath = stdout
        func open(_ path: String, _ flags: Int32) throws -> Int32 {
            let fd = Glibc.open(path, flags | O_CLOEXEC, 0o644)
            guard fd >= 0 else { throw FerryError(.io, "cannot open \(path): \(String(cString: strerror(errno)))") }
            return fd
        }
        let input = try open(stdin, O_RDONLY), output = try open(stdout, O_WRONLY | O_CREAT | O_APPEND)
        let error = try stderr.map { try open($0, O_WRONLY | O_CREAT | O_APPEND) } ?? output
        let (started, startedContinuation) = AsyncStream.makeStream(of: Result<Int32, FerryError>.self)
        let configuration = Configuration(executable: .path(FilePath(executable)), arguments: Arguments(arguments),
                                          environment: .inherit.updating(environment.reduce(into: [:]) { $0[Environment.Key(stringLiteral: $1.key)] = $1.value }))
        let status = ExitStatus()
        exitStatus = status
        // The process's whole life is this task: it ends when the process has exited.
        exit = Task {
            defer { for fd in Set([input, output, error]) { close(fd) } }
            let code: Int32
            do {
                let result = try await Subprocess.run(configuration, input: .fileDescriptor(FileDescriptor(rawValue: input), closeAfterSpawningProcess: false),
                                                      output: .fileDescriptor(FileDescriptor(rawValue: output), closeAfterSpawningProcess: false),
                                                      error: .fileDescriptor(FileDescriptor(rawValue: error), closeAfterSpawningProcess: false)) { execution in
                    startedContinuation.yield(.success(execution.processIdentifier.value))
                }
                switch result.terminationStatus {
                case .exited(let c): code = c
                case .signaled(let signal): code = signal
                }
            } catch {
                startedContinuation.yield(.failure(FerryError(.io, "cannot start \(executable): \(error)")))
                code = -1
            }
            status.withLock { $0 = code }
            return code
        }
        var first: Result<Int32, FerryError>?
        for await r in started { first = r; break }
        pid = try first!.get()
    }

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
        let exit = self.exit
        return await withTaskGroup(of: Int32?.self) { group in
            group.addTask { await exit.value }
            group.addTask {
                try? await Task.sleep(for: timeout)
                return nil
            }
            let first = await group.next() ?? nil
            group.cancelAll()
            return first
        }
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

    deinit { if isRunning { kill(pid, SIGKILL) } }
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
    var input = "/dev/null"
    if let stdin {
        input = dir.file("in")
        _ = FileManager.default.createFile(atPath: input, contents: Data(stdin))
    }
    let child = try await ChildProcess(executable, arguments, environment: environment, stdin: input, stdout: outPath, stderr: errPath)
    var status = await child.waitForExit(timeout: timeout)
    if status == nil {
        child.signal(SIGKILL)
        status = await child.waitForExit(timeout: .seconds(10))
    }
    let out = FileManager.default.contents(atPath: outPath) ?? Data()
    return CommandResult(
        status: status ?? -1,
        stdout: String(decoding: out, as: UTF8.self),
        stderr: (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? "",
        stdoutBytes: Array(out)
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
