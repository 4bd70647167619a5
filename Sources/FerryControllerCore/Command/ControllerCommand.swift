import ArgumentParser
import FerryWire
import Foundation
import Logging

/// `ferry-controller`: flags override the config file, which overrides defaults.
public struct ControllerCommand: AsyncParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "ferry-controller",
        abstract: "Ferry controller: CA and enrollment, agent sessions, operator API."
    )

    @Option(help: "Configuration file (YAML); see deploy/config/controller.yaml.")
    var config: String?
    @Option(help: "Directory for state, keys and tokens.")
    var dataDir: String?
    @Option(help: "Agent listener, HOST:PORT (default 0.0.0.0:7443).")
    var listen: String?
    @Option(help: "Operator API listener, HOST:PORT (default 127.0.0.1:7444).")
    var apiListen: String?
    @Option(name: .customLong("nbd-tls-listen"), help: "Point-in-time exports for agents over NBD with TLS, HOST:PORT (default off).")
    var nbdTLSListen: String?
    @Option(help: "Operator's CA certificate (PEM); with --ca-key.")
    var caCert: String?
    @Option(help: "Operator's CA private key (PEM).")
    var caKey: String?
    @Option(help: "Heartbeat interval, e.g. 5s.")
    var heartbeatInterval: String?
    @Option(help: "Lifetime of agent certificates, e.g. 30d.")
    var certificateValidity: String?
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String?

    public init() {}

    public func run() async throws {
        MemoryTuning.forBulkIO(keepFreedBytes: 256 << 20)
        var settings = ControllerConfig(dataDir: "/var/lib/ferry-controller")
        do {
            if let config { try settings.apply(file: config) }
            if let dataDir { settings.dataDir = dataDir }
            if let listen { settings.listen = listen }
            if let apiListen { settings.apiListen = apiListen }
            if let nbdTLSListen { settings.nbdTLSListen = nbdTLSListen }
            if let caCert { settings.caCert = caCert }
            if let caKey { settings.caKey = caKey }
            if let heartbeatInterval { settings.heartbeatInterval = try ConfigText.duration(heartbeatInterval) }
            if let certificateValidity { settings.certificateValidity = try ConfigText.duration(certificateValidity) }
            if let logLevel { settings.logLevel = logLevel }
            let logger = Logging.make(label: "ferry.controller", level: settings.logLevel)
            try await Controller(config: settings, logger: logger).run()
        } catch let error as FerryError {
            // Configuration and state problems: restarting will not help (systemd: RestartPreventExitStatus=2).
            FileHandle.standardError.write(Data("ferry-controller: \(error.message)\n".utf8))
            throw ExitCode(2)
        } catch {
            // Anything else (a port in use, a disk error) may pass: exit 1 and let systemd retry.
            FileHandle.standardError.write(Data("ferry-controller: \(error)\n".utf8))
            throw ExitCode(1)
        }
    }
}
