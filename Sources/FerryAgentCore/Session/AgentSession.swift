import FerryNBD
import FerryWire
import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import ServiceLifecycle
import Synchronization
import X509

/// The agent's one outbound session to its controller: connect, hello, heartbeats, commands,
/// inventory updates and certificate renewal; reconnects by itself with backoff and jitter.
public final class AgentSession: Service, Sendable {
    /// Why the agent stopped trying: the controller no longer accepts this host.
    public static let exitCodeRevoked: Int32 = 3

    let dataDir: String
    let config: AgentConfig
    let logger: Logger
    let group: any EventLoopGroup
    let identity: Mutex<AgentIdentity>
    let inventory: @Sendable () -> Ferry_V1_Inventory
    /// The protected volumes and their exports (nil for simulated agents that protect nothing).
    let volumes: VolumeManager?
    /// Volumes this host serves as a recovery host (failover, drills).
    let recovery: RecoveryManager
    /// The connection being set up or held, so graceful shutdown can end it at any stage.
    private let current = Mutex<(channel: (any Channel)?, session: PeerSession?)>((nil, nil))
    private let connectedCount = Atomic<Int>(0)
    private let heartbeatMilliseconds = Atomic<Int64>(0)
    /// This connection's replication streamers, one per volume; cancelled when it ends.
    private let streamers = Mutex<[Task<Void, Never>]>([])
    /// Commands answered when done (hooks, recoveries, block hashes) run as children of the
    /// agent's service: a lost session does not kill a hook half way (a plan step's hook that
    /// promotes a database finishes), and none outlives the agent.
    /// Freezes held by fsfreeze hooks, across reconnects (a thaw may come on the next session).
    let freezer: FilesystemFreeze
    private let laterWork: AsyncStream<Later>
    private let later: AsyncStream<Later>.Continuation
    /// Largest batch sent at once (the window is the change log's: see `ChangeLog.windowBytes`).
    static let batchBytes = 1 << 20
    /// While a volume is busy the streamer polls this often rather than being woken per write;
    /// it adds at most this much to replication lag.
    static let gatherDelay = Duration.microseconds(500)

    /// - Parameter inventory: what this host is; the simulated agents of the load test pass their own.
    public init(
        identity: AgentIdentity,
        config: AgentConfig,
        logger: Logger,
        group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        volumes: VolumeManager? = nil,
        inventory: (@Sendable () -> Ferry_V1_Inventory)? = nil
    ) {
        self.volumes = volumes
        (laterWork, later) = AsyncStream.makeStream(of: Later.self)
        self.recovery = RecoveryManager(socketDirectory: config.socketDirectory, dataDir: config.dataDir,
                                        hooks: HookRunner(hooks: config.hooks), logger: logger,
                                        socketUsers: (try? config.socketUserIDs) ?? [],
                                        allow: (try? config.protectAllow) ?? .defaults(dataDir: config.dataDir),
                                        hydrationRateLimit: config.hydrationRateLimit, volumes: volumes)
        self.dataDir = config.dataDir
        self.freezer = FilesystemFreeze(dataDir: config.dataDir, logger: logger)
        self.config = config
        self.logger = logger
        self.group = group
        self.identity = Mutex(identity)
        let sockets = config.socketDirectory, users = (try? config.socketUserIDs) ?? []
        self.inventory = inventory ?? { InventoryCollector.collect(guestSockets: sockets, guestUsers: users) }
    }

    /// How many sessions have been welcomed so far (for tests and logs).
    public var sessionsOpened: Int { connectedCount.load(ordering: .relaxed) }

    /// The heartbeat interval of the latest session, as the controller's welcome set it; nil
    /// before the first (for tests and logs).
    public var heartbeatInterval: Duration? {
        let ms = heartbeatMilliseconds.load(ordering: .relaxed)
        return ms > 0 ? .milliseconds(ms) : nil
    }

    /// Connects and reconnects until graceful shutdown. Throws only when the controller refuses
    /// this host for good (removed, revoked or unknown): retrying cannot help then.
    public func run() async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { [laterWork] in
                await withDiscardingTaskGroup { work in
                    for await item in laterWork { work.addTask { await item() } }
                }
            }
            // Recovered volumes this host served before a restart are served again at once.
            // (Beside the sessions: a controller that is away must not hold them back.)
            if let host = try? controllerHost() {
                let recovery = self.recovery
                group.addTask { await recovery.restore(controllerHost: host, tls: { try self.exportTLS() }) }
            }
            defer { group.cancelAll() }
            try await runSessions()
        }
    }

    /// Connects and reconnects until graceful shutdown (see `run`).
    func runSessions() async throws {
        var backoff = Backoff(initial: config.reconnectInitialDelay, maximum: config.reconnectMaxDelay)
        try await withGracefulShutdownHandler {
            while !Task.isShuttingDownGracefully && !Task.isCancelled {
                do {
                    try await connectOnce { backoff.reset() }
                } catch let error as FerryError where [.revoked, .unauthenticated, .permissionDenied].contains(error.code) {
                    logger.error("controller refuses this host; re-enroll it", metadata: ["reason": "\(error.message)"])
                    // Never take a workload's disk away: keep exporting its volumes, unreplicated,
                    // until the operator stops the agent.
                    if let volumes, await !volumes.statuses().isEmpty {
                        logger.error("still exporting this host's volumes locally, without replication, until the agent is stopped")
                        try? await gracefulShutdown()
                        return
                    }
                    throw error
                } catch {
                    if Task.isShuttingDownGracefully { break }
                    logger.warning("controller session lost", metadata: ["reason": "\(Self.describe(error))"])
                }
                let delay = backoff.next()
                logger.debug("reconnecting", metadata: ["in": "\(delay)"])
                try? await cancelWhenGracefulShutdown { try await Task.sleep(for: delay) }
            }
        } onGracefulShutdown: {
            let (channel, session) = self.current.withLock { $0 }
            if let session {
                Task { await session.close(reason: "agent shutting down") }
            } else {
                // Still handshaking: nothing to say goodbye to.
                channel?.close(promise: nil)
            }
        }
    }

    static func describe(_ error: any Error) -> String {
        (error as? FerryError)?.message ?? "\(error)"
    }

    /// One connection from dial to close.
    func connectOnce(onWelcome: () -> Void) async throws {
        let id = identity.withLock { $0 }
        let address = config.controller ?? id.info.controller
        guard id.certificate.notValidAfter > Date() else {
            throw FerryError(.revoked, "this host's certificate expired at \(id.certificate.notValidAfter); re-enroll it with a new token")
        }
        let connection = try await open(address, identity: id, frameLimit: FrameSize.defaultAuthenticated)
        try await connection.executeThenClose { inbound, outbound in
            current.withLock { $0 = (connection.channel, nil) }
            defer { current.withLock { $0 = (nil, nil) } }
            if Task.isShuttingDownGracefully { return }
            let session = PeerSession(channel: connection.channel, outbound: outbound)
            var messages = inbound.makeAsyncIterator()
            var hello = Self.hello(id)
            let helloInventory = inventory()
            hello.inventory = helloInventory
            let welcome: Ferry_V1_Welcome
            do {
                try await outbound.write(try Ferry_V1_Envelope.with(id: 1, .hello(hello)).frame(allocator: connection.channel.allocator))
                // TLS 1.3 reports a refused client certificate only here, on the first read.
                let frame = try await session.withDeadline(.seconds(10)) { try await messages.next() }
                guard let frame else {
                    throw FerryError(.unavailable, "controller \(address) closed the connection before welcoming this host")
                }
                let reply = try Ferry_V1_Envelope(frame: frame)
                switch reply.body {
                case .welcome(let w): welcome = w
                case .error(let e): throw FerryError(wire: e)
                default: throw FerryError(.protocolViolation, "controller answered hello with \(reply.bodyName)")
                }
            } catch where error is NIOSSLError || error is BoringSSLError {
                throw FerryError(.unavailable, "TLS with controller \(address) failed: \(error)")
            }
            session.peerAcceptsAttachments = welcome.acceptsAttachments
            current.withLock { $0.session = session }
            defer { stopStreaming() }
            connectedCount.add(1, ordering: .relaxed)
            onWelcome()
            let heartbeat = Duration.milliseconds(Int64(max(100, welcome.heartbeatIntervalMs)))
            heartbeatMilliseconds.store(Int64(max(100, welcome.heartbeatIntervalMs)), ordering: .relaxed)
            logger.info("session open", metadata: ["controller": "\(address)", "host": "\(welcome.hostName)", "heartbeat": "\(heartbeat)"])
            if Task.isShuttingDownGracefully {
                await session.close(reason: "agent shutting down")
                return
            }

            try await withThrowingTaskGroup(of: Void.self) { tasks in
                tasks.addTask { [inventory, config] in
                    // Report inventory changes (an address added, a disk grown) without being asked.
                    var lastInventory = helloInventory
                    while true {
                        try await Task.sleep(for: config.inventoryInterval)
                        // Reading /proc (every process's command line) can block: not on the pool.
                        let now = try await NIOThreadPool.singleton.runIfActive { inventory() }
                        if now != lastInventory {
                            lastInventory = now
                            var update = Ferry_V1_InventoryUpdate()
                            update.inventory = now
                            try await session.send(.inventoryUpdate(update))
                        }
                    }
                }
                tasks.addTask { try await self.renewWhenDue(session: session) }
                tasks.addTask { [recovery] in
                    // Hydration: at once when one starts or completes, about once a second while it copies.
                    await recovery.resendReports()
                    while true {
                        for report in await recovery.changedReports() { try await session.send(.recoveryReport(report)) }
                        await recovery.waitForReportable()
                        try Task.checkCancellation()
                    }
                }
                if let volumes {
                    tasks.addTask { try await Self.reportVolumes(volumes, session: session) }
                    if welcome.acceptsControlLane {
                        tasks.addTask { await self.keepControlLane(address: address, heartbeat: heartbeat) }
                    }
                }
                defer { tasks.cancelAll() }
                try await session.run(inbound: &messages, heartbeatInterval: heartbeat, logger: logger) { envelope, _ in
                    try await self.handle(envelope, session: session, later: self.later)
                }
            }
        }
    }

    /// A TLS connection to the controller with this host's certificate (the session's or the
    /// control lane's).
    func open(_ address: String, identity id: AgentIdentity, frameLimit: Int) async throws -> NIOAsyncChannel<ByteBuffer, ByteBuffer> {
        try await ControllerConnection.open(
            address: address,
            tls: try TLSSettings.agentSession(certificate: id.certificate, key: id.privateKey, ca: id.ca),
            group: group,
            frameLimit: FrameLimit(frameLimit)
        )
    }

    /// The first message of a connection: who this host is.
    static func hello(_ id: AgentIdentity) -> Ferry_V1_Hello {
        var hello = Ferry_V1_Hello()
        hello.protocolVersion = .protocolVersion1
        hello.hostID = id.info.hostID
        hello.agentVersion = FerryVersion.current
        hello.certificateNotAfter = Int64(id.certificate.notValidAfter.timeIntervalSince1970)
        return hello
    }

    /// A consistency cut's PREPARE or FINISH, from the session or the control lane.
    func answerCut(_ command: Ferry_V1_Command) async -> Ferry_V1_CommandResult {
        var result = Ferry_V1_CommandResult()
        do {
            guard let volumes else { throw FerryError(.unsupported, "this agent does not protect volumes") }
            switch command.kind {
            case .prepareCut(let prepare):
                let targets = try await volumes.cutTargets(prepare.volumes)
                result.cutPrepared = try await volumes.cuts.prepare(prepare, targets: targets)
            case .finishCut(let finish):
                result.cutFinished = await volumes.cuts.finish(finish)
            default:
                throw FerryError(.unsupported, "the control lane carries only consistency cuts")
            }
        } catch let error as FerryError {
            result.error = error.wire
        } catch {
            result.error = FerryError(.internalError, "cut failed: \(error)").wire
        }
        return result
    }

    /// Commands from the controller, answered in arrival order.
    /// Work a command handler leaves to run after it returns, as a child of the session.
    typealias Later = @Sendable () async -> Void

    func handle(_ envelope: Ferry_V1_Envelope, session: PeerSession, later: AsyncStream<Later>.Continuation) async throws {
        switch envelope.body {
        case .command(let command):
            var result = Ferry_V1_CommandResult()
            switch command.kind {
            case .refreshInventory:
                result.inventory = inventory()
            case .echo(let echo):
                result.echo = echo
            case .protectVolume(let protect):
                do {
                    guard let volumes else { throw FerryError(.unsupported, "this agent does not protect volumes") }
                    result.volumeStatus = try await volumes.protect(protect.volume)
                    // Streams restart from what the controller acked; it ignores duplicates.
                    await startStreaming(volumes, session: session)
                } catch let error as FerryError {
                    result.error = error.wire
                }
            case .syncVolumes(let sync):
                guard let volumes else {
                    result.error = FerryError(.unsupported, "this agent does not protect volumes").wire
                    break
                }
                var statuses = Ferry_V1_VolumeStatuses()
                statuses.volumes = await volumes.sync(sync.volumes)
                result.volumeStatuses = statuses
                // The controller said where each replica stands: stream from there.
                await startStreaming(volumes, session: session)
            case .resyncVolume(let resync):
                do {
                    guard let volumes else { throw FerryError(.unsupported, "this agent does not protect volumes") }
                    result.volumeStatus = try await volumes.resync(name: resync.name)
                } catch let error as FerryError {
                    result.error = error.wire
                }
            case .resizeVolume(let resize):
                do {
                    guard let volumes else { throw FerryError(.unsupported, "this agent does not protect volumes") }
                    result.volumeResized = try await volumes.resize(name: resize.name, to: resize.sizeBytes)
                } catch let error as FerryError {
                    result.error = error.wire
                } catch {
                    result.error = FerryError(.io, "resize of \(resize.name) failed: \(error)").wire
                }
            case .prepareCut, .finishCut:
                result = await answerCut(command)
            case .runHook(let hook):
                // A hook may run for a while: acks and cuts go on meanwhile.
                let hooks = HookRunner(hooks: config.hooks, fsfreeze: config.fsfreezeHooks, freezer: freezer), id = envelope.id
                let timeout = Duration.milliseconds(max(1, min(hook.timeoutMs, 3_600_000)))
                later.yield {
                    let started = ContinuousClock.now
                    var outcome = Ferry_V1_HookResult()
                    outcome.name = hook.name
                    if let error = await hooks.run(hook.name, timeout: timeout, environment: hook.environment) { outcome.error = error }
                    outcome.durationMicros = CutHolds.micros(started.duration(to: .now))
                    var result = Ferry_V1_CommandResult()
                    result.hookResult = outcome
                    try? await session.send(.commandResult(result), inReplyTo: id)
                }
                return
            case .fenceVolumes(let fence):
                do {
                    guard let volumes else { throw FerryError(.unsupported, "this agent does not protect volumes") }
                    var fenced = Ferry_V1_VolumesFenced()
                    logger.info("fencing for a failover", metadata: ["volumes": "\(fence.volumes)", "generation": "\(fence.generation)"])
                    fenced.volumes = try await volumes.fence(fence.volumes)
                    result.volumesFenced = fenced
                } catch let error as FerryError {
                    result.error = error.wire
                }
            case .recoverVolumes, .stopRecovery, .hashBlocks, .applyBlocks:
                // These take a while (connections, hooks, disk reads): answered when done,
                // while the session goes on.
                later.yield { await self.answerLater(command, id: envelope.id, session: session) }
                return
            case .none:
                result.error = FerryError(.unsupported, "command not supported by agent \(FerryVersion.current)").wire
            }
            switch command.kind {
            case .prepareCut, .finishCut:
                // The workload's writes are held until the cut ends: its answers go ahead of the
                // replication data queued on this session.
                try await session.sendAhead(.commandResult(result), inReplyTo: envelope.id)
            default:
                try await session.send(.commandResult(result), inReplyTo: envelope.id)
            }
        case .replicationAck(let ack):
            do {
                try await volumes?.acked(volume: ack.volume, epoch: ack.epoch, durable: ack.durableSequence)
            } catch let error as FerryError {
                logger.warning("replication ack refused", metadata: ["reason": "\(error.message)"])
                try await session.send(.error(error.wire), inReplyTo: envelope.id)
            }
        case .error(let e):
            logger.warning("controller reported an error", metadata: ["code": "\(e.code)", "message": "\(e.message)"])
        default:
            if envelope.id != 0 {
                try await session.send(.error(FerryError(.protocolViolation, "\(envelope.bodyName) is not valid from a controller").wire), inReplyTo: envelope.id)
            }
        }
    }

    func answerLater(_ command: Ferry_V1_Command, id: UInt64, session: PeerSession) async {
        var result = Ferry_V1_CommandResult()
        do {
            switch command.kind {
            case .recoverVolumes(let recover):
                result.recoveryStarted = try await recovery.recover(recover, controllerHost: try controllerHost(), tls: { try self.exportTLS() })
            case .stopRecovery(let stop):
                result.recoveryStopped = await recovery.stop(stop)
            case .hashBlocks(let request):
                guard let volumes else { throw FerryError(.unsupported, "this agent does not protect volumes") }
                result.blockHashes = try await volumes.hashBlocks(request)
            case .applyBlocks(let request):
                guard let volumes else { throw FerryError(.unsupported, "this agent does not protect volumes") }
                result.blocksApplied = try await volumes.applyBlocks(request)
            default:
                throw FerryError(.unsupported, "command not supported by agent \(FerryVersion.current)")
            }
        } catch let error as FerryError {
            result.error = error.wire
        } catch {
            result.error = FerryError(.internalError, "\(error)").wire
        }
        try? await session.send(.commandResult(result), inReplyTo: id)
    }

    /// The controller's host, as this agent reaches it.
    func controllerHost() throws -> String {
        let identity = self.identity.withLock { $0 }
        return try ConfigText.hostPort(config.controller ?? identity.info.controller).0
    }

    /// TLS for the controller's NBD exports, with this host's current certificate.
    func exportTLS() throws -> NBDClientTLS {
        let identity = self.identity.withLock { $0 }
        let context = try NBDClientTLS.makeContext(
            trustRoots: [try TLSSettings.nio(identity.ca)], certificateChain: [try TLSSettings.nio(identity.certificate)],
            privateKey: try TLSSettings.nio(identity.privateKey))
        return NBDClientTLS(context: context, serverHostname: ControllerIdentity.serverName)
    }

    /// Connects to one of the controller's point exports with this host's current certificate
    /// (a hydrating volume's reads and copier).
    public var pointConnector: VolumeManager.PointConnector {
        { port, export, allocation in
            try await NBDClient.connect(host: try self.controllerHost(), port: port, export: export, tls: try self.exportTLS(),
                                        allocation: allocation)
        }
    }

    func startStreaming(_ volumes: VolumeManager, session: PeerSession) async {
        // The old streamers must be gone before the new ones send, or a batch of theirs still
        // being written could arrive after a new, earlier one.
        for old in stopStreaming() { await old.value }
        var tasks: [Task<Void, Never>] = []
        for stream in await volumes.streams() {
            tasks.append(Task {
                await self.stream(stream.name, volume: stream.volume, log: stream.log, after: stream.after, volumes: volumes, session: session,
                                  compression: stream.compression)
            })
            // A fenced volume (the other site owns it) replicates nothing it did not capture
            // before its fence: no resync of its marked extents (after a restart, a new epoch
            // the controller refuses) until the volume list that unfences it starts this again.
            guard !stream.volume.isFenced else { continue }
            let worker = VolumeSyncWorker(name: stream.name, volume: stream.volume, log: stream.log, activity: stream.activity,
                                          tracker: stream.tracker, session: session, logger: logger,
                                          emptyReplicaEpoch: stream.emptyReplicaEpoch)
            tasks.append(Task { await worker.run() })
            if let interval = stream.scanInterval {
                tasks.append(Task { await self.scan(stream.name, every: .seconds(Int64(interval)), volumes: volumes) })
            }
        }
        streamers.withLock { $0 = tasks }
    }

    @discardableResult
    func stopStreaming() -> [Task<Void, Never>] {
        let tasks = streamers.withLock { t in defer { t = [] }; return t }
        for task in tasks { task.cancel() }
        return tasks
    }

    /// Sends a volume's changes in order, in batches, keeping at most `windowBytes` unacked.
    func stream(_ volume: String, volume blockVolume: BlockVolume, log: ChangeLog, after start: UInt64, volumes: VolumeManager,
                session: PeerSession, compression: Ferry_V1_StreamCompression = .none) async {
        // Compression needs the bytes as attachments (every controller that takes them takes this).
        let compress = compression == .lz4 && session.peerAcceptsAttachments
        var window = StreamWindow(epoch: log.epoch, after: start, windowBytes: log.windowBytes)
        var lastSent = ContinuousClock.now - .seconds(1)
        while !Task.isCancelled {
            if log.overflowed || log.firstHeld.map({ $0 > window.sent + 1 }) == true {
                // Records the controller lacks are gone: a new epoch starts, and the sync worker
                // resyncs the extents whose writes were dropped (the activity log kept them).
                guard let next = await volumes.recoverFromOverflow(name: volume) else { return }
                window.restart(epoch: next)
                continue
            }
            if log.epoch != window.epoch {
                // A new epoch begun elsewhere (an unfenced volume drops what it captured while
                // fenced): it streams from its start.
                window.restart(epoch: log.epoch)
                continue
            }
            let (ackedEpoch, acked) = log.ackedState
            window.acked(through: acked, epoch: ackedEpoch)
            let after: UInt64
            switch window.next {
            case .waitForAck(let sequence):
                // Woken by the ack that frees the window (or a new epoch, or the session's end),
                // not by polling.
                await log.waitForAck(through: sequence, epoch: window.epoch)
                continue
            case .send(let from):
                after = from
            }
            let records: [VolumeChange]
            do {
                records = try log.records(after: after, maxBytes: Self.batchBytes, maxCount: Attachments.maxCount, epoch: window.epoch)
            } catch {
                logger.error("replication stopped", metadata: ["volume": "\(volume)", "error": "\(error)"])
                return
            }
            guard let last = records.last else {
                if log.overflowed || log.epoch != window.epoch { continue }
                if ContinuousClock.now - lastSent < .milliseconds(2) {
                    // Busy: let writes gather for a moment instead of being woken by each one
                    // (a thread wake-up per write costs more than the write at 100k IOPS).
                    try? await Task.sleep(for: Self.gatherDelay)
                } else {
                    await log.waitForChanges(after: after)
                }
                continue
            }
            lastSent = ContinuousClock.now
            // Written bytes travel as attachments, never copied into the protobuf message: a
            // large write as the buffer the export captured, small ones gathered into one frame.
            var batch = Ferry_V1_ReplicationBatch()
            batch.volume = volume
            batch.epoch = window.epoch
            batch.generation = blockVolume.generation
            var attachments: [ByteBuffer] = []
            var gathered = ByteBuffer()
            let attach = session.peerAcceptsAttachments
            batch.records = records.map { change in
                var r = Ferry_V1_ReplicationRecord()
                r.sequence = change.sequence
                r.offset = change.offset
                r.capturedUnixNanos = change.captured
                switch change.kind {
                case .write(var data) where attach:
                    r.attachedLength = UInt32(data.readableBytes)
                    if data.readableBytes >= FrameWriter.copyLimit {
                        if gathered.readableBytes > 0 { attachments.append(gathered); gathered = ByteBuffer() }
                        attachments.append(data)
                    } else {
                        if gathered.capacity == 0 { gathered.reserveCapacity(256 << 10) }
                        gathered.writeBuffer(&data)
                    }
                case .write(let data): r.data = Data(data.readableBytesView)
                case .zero(let length): r.zeroLength = length
                case .resize(let size): r.resizeBytes = size
                }
                return r
            }
            if gathered.readableBytes > 0 { attachments.append(gathered) }
            if compress, !attachments.isEmpty {
                let started = ContinuousClock.now
                let outcome = AttachedFrameCompression.compress(attachments, allocator: session.channel.allocator)
                let took = started.duration(to: .now)
                log.compression.add(in: outcome.inBytes, out: outcome.outBytes,
                                    nanoseconds: UInt64(took.components.seconds) * 1_000_000_000 + UInt64(took.components.attoseconds / 1_000_000_000))
                attachments = outcome.frames
                batch.attachedSizes = outcome.sizes
            }
            do {
                try await session.send(.replicationBatch(batch), attachments: attachments)
            } catch {
                return
            }
            window.sent(through: last.sequence, bytes: records.reduce(0) { $0 + ChangeLog.cost($1) })
        }
    }

    /// Capture mode scan: every interval, the whole volume is compared with the replica and what
    /// changed is sent (the sync worker does the comparing).
    func scan(_ volume: String, every interval: Duration, volumes: VolumeManager) async {
        while !Task.isCancelled {
            do {
                try await volumes.startScan(name: volume)
            } catch {
                logger.error("cannot start a scan", metadata: ["volume": "\(volume)", "error": "\(error)"])
            }
            try? await Task.sleep(for: interval)
        }
    }

    /// Every 250 ms clears the activity marks of acked extents; every second reports how each
    /// volume's replication and sync stand.
    static func reportVolumes(_ volumes: VolumeManager, session: PeerSession) async throws {
        var tick = 0
        while true {
            try await Task.sleep(for: .milliseconds(250))
            let reports = await volumes.maintain()
            tick += 1
            guard tick % 4 == 0 else { continue }
            for report in reports { try await session.send(.volumeReport(report)) }
        }
    }

    /// Renews the certificate over the session once two thirds of its lifetime have passed, with
    /// a key made here; the new certificate is used from the next connection on.
    func renewWhenDue(session: PeerSession) async throws {
        while true {
            let due = identity.withLock { $0.renewAt }
            let wait = due.timeIntervalSinceNow
            if wait > 0 {
                try await Task.sleep(for: .milliseconds(Int64(min(wait, 3600) * 1000)))
                continue
            }
            do {
                try await renew(session: session)
            } catch let error as FerryError where error.code == .unavailable {
                throw error
            } catch {
                // Keep the session and try again soon: within a tenth of the remaining life, at
                // most a minute, so several attempts fit before the certificate expires.
                logger.warning("certificate renewal failed", metadata: ["reason": "\(Self.describe(error))"])
                let remaining = identity.withLock { $0.certificate.notValidAfter.timeIntervalSinceNow }
                try await Task.sleep(for: .milliseconds(Int64(max(0.5, min(60, remaining / 10)) * 1000)))
            }
        }
    }

    func renew(session: PeerSession) async throws {
        let old = identity.withLock { $0 }
        let request = try HostKeyRequest.make(name: old.info.hostName)
        var req = Ferry_V1_RenewRequest()
        req.csrDer = Data(request.csrDER)
        let reply = try await session.request(.renewRequest(req), timeout: .seconds(30))
        guard case .renewResponse(let response) = reply.body else {
            throw FerryError(.protocolViolation, "controller answered renewal with \(reply.bodyName)")
        }
        let certificate = try Certificate(derEncoded: Array(response.certificateDer))
        guard certificate.publicKey == request.privateKey.publicKey,
              CertificateAuthority.verify(certificate, issuedBy: old.ca),
              HostIdentity.hostID(of: certificate) == old.info.hostID
        else {
            throw FerryError(.pki, "controller returned a renewed certificate that does not match this host or key")
        }
        var renewed = old
        renewed.certificate = certificate
        renewed.privateKey = request.privateKey
        try renewed.saveRenewal(to: dataDir)
        identity.withLock { $0 = renewed }
        logger.info("certificate renewed", metadata: [
            "serial": "\(HostIdentity.serialString(certificate))",
            "not-after": "\(ISO8601DateFormatter().string(from: certificate.notValidAfter))",
        ])
    }
}
