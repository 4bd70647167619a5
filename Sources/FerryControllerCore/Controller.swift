import FerryWire
import Foundation
import Hummingbird
import HummingbirdTLS
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import ServiceLifecycle

/// The controller process: state, PKI, agent listener, operator API, run as one service group.
public struct Controller: Sendable {
    public let config: ControllerConfig
    public let logger: Logger

    public init(config: ControllerConfig, logger: Logger) {
        self.config = config
        self.logger = logger
    }

    /// What a controller is made of: built, listening nowhere yet.
    struct Assembly {
        let store: StateStore
        let pki: ControllerPKI
        let adminToken: String
        let registry: SessionRegistry
        let metrics: ControllerMetrics
        /// Replica file I/O gets threads of its own, never the event loops'; shut down after the run.
        let replicaPool: NIOThreadPool
        let replicas: ReplicaManager
        let exports: PointExports
        let agents: AgentServer
        let coordinator: CutCoordinator
        let catalogue: PointCatalogue
        let exportPort: BoundPort
        let jobs: JobRunner
        let routes: APIRoutes
    }

    /// Opens the state, the PKI and the replicas and wires the services together.
    func assemble() async throws -> Assembly {
        try config.validate()
        try FileManager.default.createDirectory(atPath: config.dataDir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        // Keys, tokens and the database live here: owner only, even if it existed already.
        chmod(config.dataDir, 0o700)
        let store = try StateStore(path: config.databasePath)
        chmod(config.databasePath, 0o600)
        let pki = try ControllerPKI.prepare(config: config)
        let adminToken = try await ensureAdminToken(store: store)
        let registry = SessionRegistry()
        let metrics = ControllerMetrics()
        let group = MultiThreadedEventLoopGroup.singleton
        let dataDir = config.dataDir

        let replicaPool = NIOThreadPool(numberOfThreads: 4)
        replicaPool.start()
        let replicas = ReplicaManager(root: config.dataDir + "/replicas", pool: replicaPool,
                                      retention: config.replicaRetention, journalLimit: Int64(config.replicaJournalMax))
        await replicas.onGrowth { [logger] hostID, volume, size in
            do {
                try await store.growVolume(hostID: hostID, name: volume, to: size)
            } catch {
                logger.error("cannot record a volume's new size", metadata: ["volume": "\(volume)", "bytes": "\(size)", "error": "\(error)"])
            }
        }
        let exportConnections = ExportConnections()
        let exports = PointExports(socketPath: config.dataDir + "/exports.sock", overlayRoot: config.dataDir + "/overlays",
                                   connections: exportConnections, logger: logger)
        let hydrations = Hydrations(store: store, exports: exports, metrics: metrics, logger: logger)
        let agents = AgentServer(config: config, pki: pki, store: store, registry: registry, metrics: metrics, logger: logger, group: group,
                                 replicas: replicas, exportConnections: exportConnections, hydrations: hydrations) { address in
            // Tests and scripts read the bound port from here (the configured port may be 0).
            try? PEMFiles.writePublic(PeerSession.describe(address) + "\n", to: dataDir + "/agent-listen.addr")
        }
        try await agents.loadWAN()
        let coordinator = CutCoordinator(store: store, registry: registry, replicas: replicas, metrics: metrics, logger: logger)
        let catalogue = PointCatalogue(store: store, replicas: replicas)
        let exportPort = BoundPort()
        let reverse = ReverseStreams(exports: exports, registry: registry, store: store, replicas: replicas, logger: logger)
        let jobs = JobRunner(store: store, registry: registry, replicas: replicas, catalogue: catalogue, exports: exports, agents: agents,
                             reverse: reverse, logger: logger, exportPort: { exportPort.value })
        await hydrations.attach(jobs: jobs)
        let routes = APIRoutes(store: store, registry: registry, metrics: metrics, pki: pki, agents: agents, replicas: replicas,
                               coordinator: coordinator, catalogue: catalogue, exports: exports, jobs: jobs, hydrations: hydrations,
                               dataDir: config.dataDir)
        return Assembly(store: store, pki: pki, adminToken: adminToken, registry: registry, metrics: metrics, replicaPool: replicaPool,
                        replicas: replicas, exports: exports, agents: agents, coordinator: coordinator, catalogue: catalogue,
                        exportPort: exportPort, jobs: jobs, routes: routes)
    }

    /// Runs until SIGTERM or SIGINT, then drains: sessions get a goodbye, listeners close.
    public func run() async throws {
        let parts = try await assemble()
        let (store, pki, adminToken, registry, metrics) = (parts.store, parts.pki, parts.adminToken, parts.registry, parts.metrics)
        let (replicaPool, replicas, exports, agents) = (parts.replicaPool, parts.replicas, parts.exports, parts.agents)
        let (coordinator, catalogue, exportPort, jobs, routes) = (parts.coordinator, parts.catalogue, parts.exportPort, parts.jobs, parts.routes)
        let group = MultiThreadedEventLoopGroup.singleton
        let dataDir = config.dataDir
        let (apiHost, apiPort) = try ConfigText.hostPort(config.apiListen)
        let caPath = pki.caPath
        let logger = self.logger
        let api = Application(
            router: routes.router(),
            server: try .tls(.http1(), tlsConfiguration: TLSSettings.apiListener(chain: pki.serverChain, key: pki.serverKey)),
            configuration: .init(address: .hostname(apiHost, port: apiPort), serverName: "ferry-controller"),
            onServerRunning: { channel in
                guard let address = channel.localAddress else { return }
                let host = (apiHost == "0.0.0.0" || apiHost == "::") ? "127.0.0.1" : apiHost
                let url = "https://\(host.contains(":") ? "[\(host)]" : host):\(address.port ?? apiPort)"
                let env = "# Source this file to point ferryctl at this controller.\nexport FERRY_API=\(url)\nexport FERRY_TOKEN=\(adminToken)\nexport FERRY_CA=\(caPath)\n"
                try? PEMFiles.writeSecret(env, to: dataDir + "/ferryctl.env")
                logger.info("operator API ready", metadata: ["url": "\(url)"])
            },
            eventLoopGroupProvider: .shared(group),
            logger: logger
        )
        var exportTLS: [ServiceGroupConfiguration.ServiceConfiguration] = []
        if !config.nbdTLSListen.isEmpty {
            var tls = TLSConfiguration.makeServerConfiguration(
                certificateChain: try pki.serverChain.map { .certificate(try TLSSettings.nio($0)) },
                privateKey: .privateKey(try TLSSettings.nio(pki.serverKey)))
            tls.minimumTLSVersion = .tlsv13
            tls.shutdownTimeout = TLSSettings.closeNotifyTimeout
            // Only enrolled hosts: a client certificate chaining to the cluster CA is required.
            tls.certificateVerification = .noHostnameVerification
            tls.trustRoots = .certificates([try TLSSettings.nio(pki.ca.certificate)])
            exportTLS.append(.init(service: PointExportTLSService(
                listen: config.nbdTLSListen, exports: exports, tls: try NIOSSLContext(configuration: tls),
                store: store, group: group, logger: logger,
                caps: ConnectionCaps(total: config.maxConnections, perAddress: config.maxConnectionsPerAddress)) { address in
                    exportPort.set(address.port)
                    try? PEMFiles.writePublic(PeerSession.describe(address) + "\n", to: dataDir + "/nbd-tls-listen.addr")
                }))
        }
        let webhooks = WebhookDispatcher(urls: config.alertWebhooks, secret: try webhookSecret(), store: store, logger: logger)
        let alerting = AlertService(store: store, thresholds: config.alertThresholds, interval: config.alertInterval, webhooks: webhooks,
                                    metrics: metrics, controllerName: ProcessInfo.processInfo.hostName, logger: logger) {
            try await routes.alertSnapshot()
        }
        let lastSeen = LastSeenRecorder(store: store, registry: registry)
        var groupConfig = ServiceGroupConfiguration(
            services: [
                .init(service: lastSeen),
                .init(service: RetentionFolder(replicas: replicas, registry: registry, logger: logger)),
                .init(service: PointScheduler(coordinator: coordinator, catalogue: catalogue, store: store, metrics: metrics, logger: logger)),
                .init(service: PointExportService(exports: exports)),
                .init(service: ExportAccessAuditor(log: exports.accessLog, store: store, logger: logger)),
            ] + exportTLS + [
                .init(service: agents),
                // After the agent listener: stopped before it, so a job does not see its hosts
                // go away and fail; it resumes at the next start instead.
                .init(service: JobService(jobs: jobs)),
                .init(service: webhooks),
                .init(service: alerting),
                .init(service: api),
            ],
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger
        )
        // SIGTERM must end the process within 5 s even if a peer does not cooperate.
        groupConfig.maximumGracefulShutdownDuration = .seconds(3)
        groupConfig.maximumCancellationDuration = .seconds(1)
        let services = ServiceGroup(configuration: groupConfig)
        logger.info("controller starting", metadata: ["data-dir": "\(config.dataDir)", "version": "\(FerryVersion.current)"])
        try await services.run()
        try? await replicaPool.shutdownGracefully()
        logger.info("controller stopped")
    }

    /// The alert webhooks' HMAC secret: the configured file's text, or one made at the first
    /// start in the data dir (0600) for the operator to give the receivers.
    func webhookSecret() throws -> Data {
        let path = config.alertWebhookSecretFile ?? config.dataDir + "/alert-webhook.secret"
        if config.alertWebhookSecretFile == nil, !FileManager.default.fileExists(atPath: path) {
            try PEMFiles.writeSecret(SecretHash.randomToken(prefix: "whs_") + "\n", to: path)
        }
        guard let data = FileManager.default.contents(atPath: path),
              let text = String(data: data, encoding: .utf8)?.trimmingCharacters(in: .whitespacesAndNewlines), text.utf8.count >= 16 else {
            throw FerryError(.badConfiguration, "alert webhook secret \(path) is missing, unreadable or shorter than 16 bytes")
        }
        return Data(text.utf8)
    }

    /// The first start makes an admin API token, written 0600 in the data dir.
    func ensureAdminToken(store: StateStore) async throws -> String {
        let path = config.dataDir + "/admin.token"
        if try await store.hasAPIToken(name: "admin") {
            guard let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8) else {
                throw FerryError(.badConfiguration, "the admin API token exists in the database but \(path) is missing; restore it from backup")
            }
            let secret = text.trimmingCharacters(in: .whitespacesAndNewlines)
            guard try await store.principal(forBearer: secret)?.role == .admin else {
                throw FerryError(.badConfiguration, "\(path) does not hold the admin API token this database knows; restore it from the backup made with the database")
            }
            return secret
        }
        let secret = SecretHash.randomToken(prefix: "fat_")
        try PEMFiles.writeSecret(secret + "\n", to: path)
        try await store.ensureAPIToken(name: "admin", role: .admin, secret: secret)
        return secret
    }
}

/// Persists online hosts' last-seen times now and then, so a restart shows a recent value
/// without a database write per heartbeat.
struct LastSeenRecorder: Service {
    let store: StateStore
    let registry: SessionRegistry

    func run() async throws {
        while !Task.isShuttingDownGracefully {
            try? await cancelWhenGracefulShutdown { try await Task.sleep(for: .seconds(30)) }
            try? await store.recordLastSeen(await registry.lastSeen())
        }
    }
}
