import ArgumentParser
import FerryWire
import Foundation
import Logging
import NIOPosix
import ServiceLifecycle

/// `ferry-agent`: enroll once, then run.
public struct AgentCommand: AsyncParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "ferry-agent",
        abstract: "Ferry agent: holds this host's mutual-TLS session with its controller.",
        subcommands: [Enroll.self, Run.self]
    )

    public init() {}

    /// Settings shared by the subcommands; flags override the config file.
    struct Common: ParsableArguments {
        @Option(help: "Configuration file (YAML); see deploy/config/agent.yaml.")
        var config: String?
        @Option(help: "Directory for this host's key, certificate and identity (default /var/lib/ferry-agent).")
        var dataDir: String?
        @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
        var logLevel: String?

        func settings() throws -> AgentConfig {
            var settings = AgentConfig(dataDir: "/var/lib/ferry-agent")
            if let config { try settings.apply(file: config) }
            if let dataDir { settings.dataDir = dataDir }
            if let logLevel { settings.logLevel = logLevel }
            return settings
        }
    }

    /// Runs `body`, turning a `FerryError` into one line on stderr and exit code `code`.
    static func reporting(_ body: () async throws -> Void) async throws {
        do {
            try await body()
        } catch let error as FerryError {
            FileHandle.standardError.write(Data("ferry-agent: \(error.message)\n".utf8))
            let revoked: Set<FerryError.Code> = [.revoked, .unauthenticated, .permissionDenied]
            throw ExitCode(revoked.contains(error.code) ? AgentSession.exitCodeRevoked : 2)
        }
    }

    struct Enroll: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Enroll this host with a controller, using a one-time token from 'ferryctl token create'."
        )

        @OptionGroup var common: Common
        @Option(help: "The controller's agent listener, HOST:PORT.")
        var controller: String
        @Option(help: "The enrollment token. Visible to other local users in the process list: prefer --token-file or FERRY_ENROLL_TOKEN.")
        var token: String?
        @Option(help: "A file holding the enrollment token (e.g. - for standard input).")
        var tokenFile: String?
        @Option(help: "Name to enroll as (default: this host's name; a token bound to a host wins).")
        var name: String?

        func run() async throws {
            try await AgentCommand.reporting {
                var settings = try common.settings()
                if let name { settings.name = name }
                _ = try ConfigText.hostPort(controller)
                let token = try resolvedToken()
                if AgentIdentity.exists(in: settings.dataDir) {
                    throw FerryError(.conflict, "\(settings.dataDir) already holds an enrollment; remove it first to enroll again")
                }
                let logger = Logging.make(label: "ferry.agent", level: settings.logLevel)
                let hostname = ProcessInfo.processInfo.hostName.split(separator: ".").first.map(String.init) ?? ""
                let identity = try await Enroller.enroll(
                    controller: controller, token: token, requestedName: settings.name, hostname: hostname,
                    dataDir: settings.dataDir, logger: logger
                )
                print("enrolled as \(identity.info.hostName) (id \(identity.info.hostID)); certificate valid until \(ISO8601DateFormatter().string(from: identity.certificate.notValidAfter))")
            }
        }

        /// The token from exactly one of --token, --token-file or FERRY_ENROLL_TOKEN.
        func resolvedToken() throws -> String {
            let env = ProcessInfo.processInfo.environment["FERRY_ENROLL_TOKEN"]
            let given = [token != nil, tokenFile != nil, env != nil].filter { $0 }.count
            guard given == 1 else {
                throw FerryError(.badConfiguration, given == 0
                    ? "no enrollment token: pass --token-file FILE, set FERRY_ENROLL_TOKEN, or --token TOKEN (create one with 'ferryctl token create')"
                    : "give the enrollment token once: --token, --token-file or FERRY_ENROLL_TOKEN")
            }
            if let token { return token }
            if let env { return env }
            let path = tokenFile ?? "-"
            let data = path == "-" ? FileHandle.standardInput.readDataToEndOfFile() : FileManager.default.contents(atPath: path)
            guard let data, let text = String(data: data, encoding: .utf8) else {
                throw FerryError(.badConfiguration, "cannot read the enrollment token from \(path)")
            }
            return text.trimmingCharacters(in: .whitespacesAndNewlines)
        }
    }

    struct Run: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run the agent: hold the session with the controller until SIGTERM."
        )

        @OptionGroup var common: Common
        @Option(help: "Override the controller address remembered at enrollment, HOST:PORT.")
        var controller: String?

        func run() async throws {
            try await AgentCommand.reporting {
                var settings = try common.settings()
                if let controller { settings.controller = controller }
                try settings.validate()
                let logger = Logging.make(label: "ferry.agent", level: settings.logLevel)
                let identity = try AgentIdentity.load(from: settings.dataDir)
                MemoryTuning.forBulkIO(keepFreedBytes: 4 << 20)
                // Volume I/O has threads of its own, never the event loops'.
                let pool = NIOThreadPool(numberOfThreads: settings.ioThreads)
                pool.start()
                let allow = try settings.protectAllow
                let volumes = VolumeManager(dataDir: settings.dataDir, socketDirectory: settings.socketDirectory, pool: pool, logger: logger,
                                            changeLogBytes: Int(settings.changeLogMemory), spillBytes: Int64(settings.changeLogSpill),
                                            tcpListen: try settings.nbdTCP.map { try ConfigText.hostPort($0) },
                                            allow: allow, hostName: identity.info.hostName, configPath: settings.configPath,
                                            socketUsers: try settings.socketUserIDs, hydrationRateLimit: settings.hydrationRateLimit)
                // The default place for images the controller asks to create.
                try? FileManager.default.createDirectory(atPath: settings.dataDir + "/volumes", withIntermediateDirectories: true,
                                                         attributes: [.posixPermissions: 0o700])
                logger.info("protect-allow", metadata: ["list": "\(allow.description)"])
                let session = AgentSession(identity: identity, config: settings, logger: logger, volumes: volumes)
                // Recovered volumes that hydrate fetch from the controller's point exports.
                await volumes.setPointConnector(session.pointConnector)
                // Serve the remembered volumes before the controller is even dialled.
                await volumes.start()
                var groupConfig = ServiceGroupConfiguration(
                    services: [.init(service: session)],
                    gracefulShutdownSignals: [.sigterm, .sigint],
                    logger: logger
                )
                // SIGTERM must end the process within 5 s even if the controller does not answer.
                groupConfig.maximumGracefulShutdownDuration = .seconds(3)
                groupConfig.maximumCancellationDuration = .seconds(1)
                logger.info("agent starting", metadata: [
                    "host": "\(identity.info.hostName)", "host-id": "\(identity.info.hostID)", "version": "\(FerryVersion.current)",
                ])
                var failure: (any Error)?
                do { try await ServiceGroup(configuration: groupConfig).run() } catch { failure = error }
                await volumes.stop()
                try? await pool.shutdownGracefully()
                if let failure { throw failure }
                logger.info("agent stopped")
            }
        }
    }
}
