import FerryWire
import Foundation
import Testing

/// A real `ferry-controller` process in a test's directory, and ways to reach it.
final class ControllerProcess: Sendable {
    let dataDir: String
    let process: ChildProcess
    /// `IP:PORT` of the agent listener.
    let agentAddress: String
    /// FERRY_API, FERRY_TOKEN, FERRY_CA for ferryctl.
    let apiEnvironment: [String: String]
    /// The network namespace the controller runs in (ferryctl runs there too), if not the test's own.
    let namespace: NetworkNamespace?

    private init(dataDir: String, process: ChildProcess, agentAddress: String, apiEnvironment: [String: String], namespace: NetworkNamespace?) {
        self.dataDir = dataDir
        self.process = process
        self.agentAddress = agentAddress
        self.apiEnvironment = apiEnvironment
        self.namespace = namespace
    }

    /// Starts a controller and waits until both listeners are up.
    static func start(
        dataDir: String,
        listen: String = "127.0.0.1:0",
        apiListen: String = "127.0.0.1:0",
        arguments: [String] = [],
        logName: String = "controller.log",
        namespace: NetworkNamespace? = nil
    ) async throws -> ControllerProcess {
        // Files from an earlier run of the same data dir must not be mistaken for this run's.
        for f in ["ferryctl.env", "agent-listen.addr"] { unlink(dataDir + "/" + f) }
        let logPath = (dataDir as NSString).deletingLastPathComponent + "/" + logName
        let (executable, args) = NetworkNamespace.wrap(namespace, Binaries.path("ferry-controller"),
            ["--data-dir", dataDir, "--listen", listen, "--api-listen", apiListen, "--log-level", "debug"] + arguments)
        let process = try await ChildProcess(executable, args, logPath: logPath)
        let ready = await eventually(timeout: .seconds(30)) {
            FileManager.default.fileExists(atPath: dataDir + "/ferryctl.env") && FileManager.default.fileExists(atPath: dataDir + "/agent-listen.addr")
                || !process.isRunning
        }
        guard ready, process.isRunning else {
            throw FerryError(.unavailable, "controller did not start:\n\(process.log)")
        }
        let address = try String(contentsOfFile: dataDir + "/agent-listen.addr", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        var env: [String: String] = [:]
        for line in try String(contentsOfFile: dataDir + "/ferryctl.env", encoding: .utf8).split(separator: "\n") where line.hasPrefix("export ") {
            let kv = line.dropFirst("export ".count).split(separator: "=", maxSplits: 1)
            if kv.count == 2 { env[String(kv[0])] = String(kv[1]) }
        }
        return ControllerProcess(dataDir: dataDir, process: process, agentAddress: address, apiEnvironment: env, namespace: namespace)
    }

    var port: Int { Int(agentAddress.split(separator: ":").last ?? "") ?? 0 }
    var caPath: String { apiEnvironment["FERRY_CA"] ?? dataDir + "/ca.pem" }

    /// Runs ferryctl against this controller.
    func ctl(_ arguments: String...) async throws -> CommandResult {
        try await ctl(arguments)
    }

    func ctl(_ arguments: [String], environment: [String: String] = [:]) async throws -> CommandResult {
        var env = apiEnvironment
        for (k, v) in environment { env[k] = v }
        let (executable, args) = NetworkNamespace.wrap(namespace, Binaries.path("ferryctl"), arguments)
        return try await run(executable, args, environment: env)
    }

    /// A fresh enrollment token, optionally bound to a host name.
    func token(host: String? = nil, ttl: String = "10m") async throws -> String {
        var args = ["token", "create", "--ttl", ttl]
        if let host { args += ["--host", host] }
        let r = try await ctl(args)
        guard r.status == 0 else { throw FerryError(.internalError, "token create failed: \(r)") }
        return r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    func hosts() async throws -> [API.Host] {
        let r = try await ctl("hosts", "--json")
        guard r.status == 0 else { throw FerryError(.internalError, "hosts failed: \(r)") }
        return try API.decoder().decode([API.Host].self, from: Data(r.stdout.utf8))
    }

    /// The audit log through `ferryctl audit --json`, newest first.
    func audit() async throws -> [API.AuditEntry] {
        let r = try await ctl("audit", "--json")
        guard r.status == 0 else { throw FerryError(.internalError, "audit failed: \(r)") }
        return try API.decoder().decode([API.AuditEntry].self, from: Data(r.stdout.utf8))
    }

    func host(_ name: String) async throws -> API.Host? {
        try await hosts().first { $0.name == name }
    }

    /// Waits until `name` shows `state`.
    func waitFor(_ name: String, state: String, timeout: Duration = .seconds(15)) async throws -> Bool {
        try await eventually(timeout: timeout, every: .milliseconds(100)) {
            try await host(name)?.state.rawValue == state
        }
    }
}

/// Enrolls and runs `ferry-agent` processes.
enum AgentProcess {
    static func enroll(controller: ControllerProcess, token: String, dataDir: String, name: String? = nil) async throws -> CommandResult {
        var args = ["enroll", "--controller", controller.agentAddress, "--token", token, "--data-dir", dataDir]
        if let name { args += ["--name", name] }
        let (executable, wrapped) = NetworkNamespace.wrap(controller.namespace, Binaries.path("ferry-agent"), args)
        return try await run(executable, wrapped)
    }

    /// - Parameter allowTestDirectory: let the agent protect anything in its test's directory
    ///   (tests keep their images there, outside the agent's data dir): a `--config` given gets a
    ///   `protect-allow` line unless it has one; without one, the agent gets a config of its own.
    static func start(dataDir: String, arguments: [String] = [], logPath: String? = nil, namespace: NetworkNamespace? = nil,
                      allowTestDirectory: Bool = true) async throws -> ChildProcess {
        var arguments = arguments
        if allowTestDirectory {
            let line = "\nprotect-allow: [\"\((dataDir as NSString).deletingLastPathComponent)/\"]\n"
            if let i = arguments.firstIndex(of: "--config"), i + 1 < arguments.count {
                let text = try String(contentsOfFile: arguments[i + 1], encoding: .utf8)
                if !text.contains("protect-allow") { try (text + line).write(toFile: arguments[i + 1], atomically: true, encoding: .utf8) }
            } else {
                let config = dataDir + "-test-allow.yaml"
                try line.write(toFile: config, atomically: true, encoding: .utf8)
                arguments += ["--config", config]
            }
        }
        let (executable, args) = NetworkNamespace.wrap(namespace, Binaries.path("ferry-agent"),
                                                       ["run", "--data-dir", dataDir, "--log-level", "debug"] + arguments)
        return try await ChildProcess(executable, args, logPath: logPath ?? dataDir + ".log")
    }

    /// Enrolls under `name` with a token bound to it and starts the agent (in the controller's
    /// network namespace, if it has one).
    static func enrollAndStart(_ name: String, controller: ControllerProcess, in dir: TestDirectory, arguments: [String] = [],
                               allowTestDirectory: Bool = true) async throws -> ChildProcess {
        let dataDir = dir.path + "/agent-" + name
        let token = try await controller.token(host: name)
        let r = try await enroll(controller: controller, token: token, dataDir: dataDir)
        guard r.status == 0 else { throw FerryError(.internalError, "enroll \(name) failed: \(r)") }
        return try await start(dataDir: dataDir, arguments: arguments, namespace: controller.namespace, allowTestDirectory: allowTestDirectory)
    }
}
