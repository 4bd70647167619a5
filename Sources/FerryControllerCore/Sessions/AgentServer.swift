import FerryWire
import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import ServiceLifecycle
import SwiftProtobuf
import Synchronization
import X509

/// Accepts agent connections: enrollment for agents without a certificate, sessions for
/// enrolled ones. Each connection is its own child task; a bad one closes only itself.
public final class AgentServer: Service, Sendable {
    let config: ControllerConfig
    let pki: ControllerPKI
    let store: StateStore
    let registry: SessionRegistry
    let metrics: ControllerMetrics
    let logger: Logger
    let group: any EventLoopGroup
    let replicas: ReplicaManager
    let onBound: @Sendable (SocketAddress) -> Void
    /// Every open connection, authenticated or not, so shutdown can close them all at once.
    let connections = Mutex<[ObjectIdentifier: any Channel]>([:])
    /// Which replication records each volume takes (generation and fence).
    let gates = IngestGates()
    /// Connections held at once, in all and per source address (before authentication too).
    let caps: ConnectionCaps
    /// Failed enrollments per source address.
    let enrollmentFailures: FailureLimiter

    /// The hosts' NBD+TLS connections: revoking a host's certificates ends them too.
    let exportConnections: ExportConnections
    /// Told of recovery hosts' hydration reports.
    let hydrations: Hydrations?
    /// Volumes (host id, name, path) an agent serves outside its protect-allow list that this
    /// controller run has audited already: once per run, not at every reconnection.
    let auditedOutsideAllowlist = Mutex<Set<String>>([])
    /// Bandwidth limits and compression for the hosts' streams (`ferryctl wan`).
    let wan: WANLimiter

    init(config: ControllerConfig, pki: ControllerPKI, store: StateStore, registry: SessionRegistry, metrics: ControllerMetrics,
         logger: Logger, group: any EventLoopGroup, replicas: ReplicaManager, exportConnections: ExportConnections = ExportConnections(),
         hydrations: Hydrations? = nil, onBound: @escaping @Sendable (SocketAddress) -> Void) {
        self.replicas = replicas
        self.hydrations = hydrations
        wan = WANLimiter(metrics: metrics)
        self.exportConnections = exportConnections
        caps = ConnectionCaps(total: config.maxConnections, perAddress: config.maxConnectionsPerAddress)
        enrollmentFailures = FailureLimiter(limit: config.enrollmentFailuresPerMinute, window: .seconds(60))
        self.config = config
        self.pki = pki
        self.store = store
        self.registry = registry
        self.metrics = metrics
        self.logger = logger
        self.group = group
        self.onBound = onBound
    }

    public func run() async throws {
        let tls = try NIOSSLContext(configuration: TLSSettings.agentListener(chain: pki.serverChain, key: pki.serverKey, ca: pki.ca.certificate))
        let (host, port) = try ConfigText.hostPort(config.listen)
        let server = try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 512)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            // Bounded, like the agent's send buffer: an agent's answer to a consistency cut
            // waits behind whatever is buffered ahead of it in the stream.
            .childChannelOption(.socketOption(.so_rcvbuf), value: 512 << 10)
            .bind(host: host, port: port) { [caps] channel in
                channel.eventLoop.makeCompletedFuture {
                    let limit = FrameLimit(FrameSize.unauthenticated)
                    // Over a cap: closed before any TLS work (still handed on, to be ended).
                    let admitted = caps.admit(channel)
                    if admitted {
                        try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls))
                    } else {
                        channel.close(promise: nil)
                    }
                    try FramedPipeline.configure(channel, limit: limit)
                    return (try FramedPipeline.asyncChannel(channel), limit)
                }
            }
        if let address = server.channel.localAddress {
            onBound(address)
            logger.info("agent listener ready", metadata: ["address": "\(PeerSession.describe(address))"])
        }
        try await withGracefulShutdownHandler {
            try await server.executeThenClose { connections in
                try await withThrowingDiscardingTaskGroup { group in
                    for try await (connection, limit) in connections {
                        group.addTask { await self.serve(connection, limit: limit) }
                    }
                }
            }
        } onGracefulShutdown: {
            server.channel.close(promise: nil)
            Task { await self.closeAll(reason: "controller shutting down") }
        }
    }

    /// Says goodbye to every session at once, then closes every other connection (enrollments,
    /// handshakes in progress, silent peers), so shutdown does not wait for their deadlines.
    func closeAll(reason: String) async {
        await withTaskGroup(of: Void.self) { group in
            for entry in await registry.all {
                group.addTask { await entry.session.close(reason: reason) }
            }
        }
        for channel in connections.withLock({ Array($0.values) }) {
            channel.close(promise: nil)
        }
    }

    /// One connection from start to close. Errors end here, logged, never beyond.
    func serve(_ connection: NIOAsyncChannel<(ByteBuffer), ByteBuffer>, limit: FrameLimit) async {
        let remote = connection.channel.remoteAddress.map(PeerSession.describe) ?? "unknown"
        var log = logger
        log[metadataKey: "peer"] = "\(remote)"
        let key = ObjectIdentifier(connection.channel)
        connections.withLock { $0[key] = connection.channel }
        defer { _ = connections.withLock { $0.removeValue(forKey: key) } }
        do {
            try await connection.executeThenClose { inbound, outbound in
                let session = PeerSession(channel: connection.channel, outbound: outbound)
                var messages = inbound.makeAsyncIterator()
                // Until the peer has authenticated it gets a short deadline and a small frame cap.
                let firstFrame: ByteBuffer?
                do {
                    firstFrame = try await session.withDeadline(config.enrollmentTimeout) { try await messages.next() }
                } catch let error as FerryError where error.code == .frameTooLarge {
                    // Tell the peer why before closing; the oversized body was never buffered.
                    await reject(session, error, reason: "frame-too-large", log: log)
                    return
                }
                guard let firstFrame else { return }
                let first: Ferry_V1_Envelope
                do {
                    first = try Ferry_V1_Envelope(frame: firstFrame)
                } catch let error as FerryError {
                    await reject(session, error, reason: "malformed", log: log)
                    return
                }
                guard let certificate = try await TLSSettings.peerCertificate(of: connection.channel) else {
                    await enroll(first, session: session, log: log)
                    return
                }
                try await runSession(first, certificate: certificate, session: session, messages: &messages, limit: limit, log: log)
            }
        } catch where error is NIOSSLError || error is BoringSSLError {
            metrics.connectionRejected("tls")
            log.info("connection refused at TLS", metadata: ["error": "\(error)"])
        } catch let error as FerryError {
            if error.code == .frameTooLarge { metrics.connectionRejected("frame-too-large") }
            log.info("connection closed", metadata: ["reason": "\(error.message)"])
        } catch {
            log.info("connection closed", metadata: ["error": "\(error)"])
        }
    }

    /// Sends a session-fatal error; the caller returns, which closes the connection.
    func reject(_ session: PeerSession, _ error: FerryError, inReplyTo: UInt64 = 0, reason: String, log: Logger) async {
        metrics.connectionRejected(reason)
        log.warning("refused", metadata: ["reason": "\(error.message)"])
        try? await session.send(.error(error.wire), inReplyTo: inReplyTo)
    }

    // MARK: Enrollment

    func enroll(_ request: Ferry_V1_Envelope, session: PeerSession, log: Logger) async {
        guard case .enrollRequest(let req) = request.body else {
            await reject(session, FerryError(.unauthenticated, "no client certificate: enroll first with 'ferry-agent enroll'"),
                         inReplyTo: request.id, reason: "no-certificate", log: log)
            return
        }
        let address = session.channel.remoteAddress?.ipAddress ?? "unknown"
        if let wait = enrollmentFailures.blocked(address) {
            metrics.enrollmentsRejected.increment()
            await reject(session, FerryError(.rateLimited, "too many failed enrollments from \(address); retry in \(Int(wait.seconds.rounded(.up))) s"),
                         inReplyTo: request.id, reason: "enrollment-rate-limited", log: log)
            return
        }
        do {
            let token: EnrollmentToken
            do { token = try EnrollmentToken(parsing: req.token) } catch {
                throw FerryError(.tokenInvalid, "enrollment token is malformed")
            }
            guard token.caFingerprint == pki.ca.fingerprint else {
                throw FerryError(.tokenInvalid, "enrollment token was made for a different controller CA")
            }
            _ = try HostKeyRequest.verifiedPublicKey(csrDER: Array(req.csrDer))
            let pki = self.pki
            let validity = config.certificateValidity
            let csr = Array(req.csrDer)
            let (host, issued) = try await store.enroll(
                tokenSecretHash: token.secretHash,
                requestedName: req.requestedName,
                hostname: req.hostname,
                issue: { id, name in try pki.issueAgentCertificate(csrDER: csr, hostID: id, hostName: name, validity: validity) },
                peer: session.remoteDescription
            )
            var response = Ferry_V1_EnrollResponse()
            response.hostID = host.id
            response.hostName = host.name
            response.certificateDer = Data(try PEMFiles.der(issued.certificate))
            response.caCertificateDer = Data(try PEMFiles.der(pki.ca.certificate))
            response.notAfterUnix = Int64(issued.notAfter.timeIntervalSince1970)
            try await session.send(.enrollResponse(response), inReplyTo: request.id)
            metrics.enrollments.increment()
            log.info("host enrolled", metadata: ["host": "\(host.name)", "host-id": "\(host.id)"])
        } catch let error as FerryError {
            metrics.enrollmentsRejected.increment()
            if enrollmentFailures.fail(address) == .limited {
                log.warning("enrollments from this address refused for a minute: too many failed", metadata: ["address": "\(address)"])
                try? await store.audit(actor: "address:\(address)", action: "enroll.rate-limited", target: "-",
                                       detail: "\(enrollmentFailures.limit) failed enrollments within a minute")
            }
            await reject(session, error, inReplyTo: request.id, reason: "enrollment", log: log)
        } catch {
            metrics.enrollmentsRejected.increment()
            await reject(session, FerryError(.internalError, "enrollment failed: \(error)"), inReplyTo: request.id, reason: "enrollment", log: log)
        }
    }

    // MARK: Sessions

    func runSession(
        _ first: Ferry_V1_Envelope,
        certificate: Certificate,
        session: PeerSession,
        messages: inout NIOAsyncChannelInboundStream<ByteBuffer>.AsyncIterator,
        limit: FrameLimit,
        log: Logger
    ) async throws {
        let serial = HostIdentity.serialString(certificate)
        guard let hostID = HostIdentity.hostID(of: certificate) else {
            await reject(session, FerryError(.unauthenticated, "client certificate carries no Ferry host identity"), reason: "no-identity", log: log)
            return
        }
        let host: HostRecord
        do {
            host = try await store.admit(hostID: hostID, serial: serial)
        } catch let error as FerryError {
            await reject(session, error, reason: error.code == .revoked ? "revoked" : "unknown-host", log: log)
            return
        }
        guard case .hello(let hello) = first.body else {
            await reject(session, FerryError(.protocolViolation, "expected hello as the first message, got \(first.bodyName)"),
                         inReplyTo: first.id, reason: "protocol", log: log)
            return
        }
        guard hello.protocolVersion == .protocolVersion1 else {
            await reject(session, FerryError(.unsupported, "protocol version \(hello.protocolVersion.rawValue) not supported; this controller speaks 1"),
                         inReplyTo: first.id, reason: "protocol", log: log)
            return
        }
        guard hello.hostID == hostID else {
            await reject(session, FerryError(.permissionDenied, "hello claims host \(hello.hostID) but the certificate belongs to \(hostID) (\(host.name)); an agent speaks only for itself"),
                         inReplyTo: first.id, reason: "wrong-host", log: log)
            return
        }
        let log = { var l = log; l[metadataKey: "host"] = "\(host.name)"; return l }()
        if hello.controlLane {
            return try await runControlLane(first, hostID: hostID, hostName: host.name, serial: serial, session: session, messages: &messages, log: log)
        }
        do {
            try InventoryLimits.check(hello.inventory)
            guard hello.agentVersion.utf8.count <= InventoryLimits.maxString else {
                throw FerryError(.badRequest, "agent version longer than \(InventoryLimits.maxString) bytes")
            }
            let inventory = Data(try hello.inventory.serializedBytes() as [UInt8])
            _ = try await store.recordSessionStart(hostID: hostID, serial: serial, address: session.remoteDescription,
                                                   agentVersion: hello.agentVersion, inventory: inventory)
            // Older certificates of this host are revoked now: what they still hold ends.
            let closed = exportConnections.close(hostID: hostID, keeping: serial)
            if closed > 0 { log.info("NBD+TLS connections of superseded certificates closed", metadata: ["count": "\(closed)"]) }
        } catch let error as FerryError {
            await reject(session, error, inReplyTo: first.id, reason: error.code == .revoked ? "revoked" : "bad-hello", log: log)
            return
        }
        limit.set(config.maxFrameBytes)

        var welcome = Ferry_V1_Welcome()
        welcome.controllerVersion = FerryVersion.current
        welcome.hostID = hostID
        welcome.hostName = host.name
        welcome.heartbeatIntervalMs = UInt32(config.heartbeatInterval.seconds * 1000)
        welcome.maxFrameBytes = UInt32(config.maxFrameBytes)
        welcome.acceptsAttachments = true
        welcome.acceptsControlLane = true
        try await session.send(.welcome(welcome), inReplyTo: first.id)

        // Replication in and reverse streams out pass the host's and all hosts' WAN limits.
        session.throttle(inbound: wan.throttle(hostID: hostID, hostName: host.name, .inbound),
                         outbound: wan.throttle(hostID: hostID, hostName: host.name, .outbound))
        let entry = SessionRegistry.Entry(hostID: hostID, hostName: host.name, session: session)
        if let old = await registry.register(entry) {
            await old.session.close(reason: "replaced by a newer session of the same host")
        }
        metrics.sessionsOpened.increment()
        metrics.agentsConnected.record(await registry.count)
        // A removal that committed after the admission above found no session to close: look again.
        if let refused = await admissionWithdrawn(hostID: hostID, serial: serial) {
            await registry.unregister(hostID: hostID, session: session)
        await replicas.sessionEnded(hostID: hostID)
            await session.close(reason: refused.message)
            return
        }
        log.info("agent session open", metadata: ["address": "\(session.remoteDescription)", "agent-version": "\(hello.agentVersion)"])
        let state = SessionState(certificate: certificate)
        // The controller owns the volume list: every session starts by handing it over.
        let sync = Task { await self.syncVolumes(hostID: hostID, session: session, log: log) }
        defer { sync.cancel() }
        // A session lives no longer than its certificate (the agent reconnects with its
        // renewed one, which supersedes this one).
        let notAfter = certificate.notValidAfter
        let expiry = Task {
            try await Task.sleep(for: .seconds(max(0, min(notAfter.timeIntervalSinceNow, 400 * 86_400))))
            log.info("session ends: its certificate expired")
            await session.close(reason: "the host's certificate expired; reconnect with the renewed one")
        }
        defer { expiry.cancel() }
        do {
            try await session.run(inbound: &messages, heartbeatInterval: config.heartbeatInterval, logger: log) { envelope, attachments in
                try await self.handle(envelope, attachments: attachments, hostID: hostID, hostName: host.name, session: session, state: state, log: log)
            }
        } catch let error as FerryError where error.code == .timeout {
            metrics.heartbeatsMissed.increment()
            log.warning("agent presumed dead", metadata: ["reason": "\(error.message)"])
        } catch let error as FerryError {
            log.info("agent session closed", metadata: ["reason": "\(error.message)"])
            if error.code == .protocolViolation || error.code == .frameTooLarge {
                await reject(session, error, reason: error.code == .frameTooLarge ? "frame-too-large" : "malformed", log: log)
            }
        } catch {
            // An established session ending badly (e.g. an agent killed without a TLS close).
            log.info("agent session ended", metadata: ["error": "\(error)"])
        }
        await registry.unregister(hostID: hostID, session: session)
        await replicas.sessionEnded(hostID: hostID)
        metrics.agentsConnected.record(await registry.count)
        try? await store.recordLastSeen([hostID: Date().addingTimeInterval(-session.silence.seconds)])
    }

    /// Sends the host's complete volume list and records where the agent exports each.
    func syncVolumes(hostID: String, session: PeerSession, log: Logger) async {
        do {
            var sync = Ferry_V1_SyncVolumes()
            let records = try await store.volumes(hostID: hostID)
            // Before the list goes out: the agent streams once it has it.
            gates.load(hostID: hostID, records)
            for record in records {
                var spec = record.spec
                if let h = record.hydration, try await !replicaReady(hostID: hostID, record: record, hydration: h, log: log) {
                    // Served and captured at once; streamed once its replica is built.
                    spec.replicaSeeding = true
                    sync.volumes.append(spec)
                    continue
                }
                // Where the replica stands, so the agent resumes right after it.
                let replica = try await replicas.replica(hostID: hostID, volume: record.name, size: UInt64(record.sizeBytes))
                let state = await replica.state
                spec.epoch = state.epoch
                spec.durableSequence = await replica.durable
                spec.sizeBytes = max(spec.sizeBytes, await replica.size)
                spec.initialSyncRequired = !state.initialSynced
                spec.compression = wan.compression(hostID: hostID)
                // A replica that has never held a record of any epoch is still all zeroes.
                spec.replicaEmpty = spec.captureMode == .export && !state.initialSynced && state.epoch == 0 && state.epochs.isEmpty
                    && spec.durableSequence == 0
                sync.volumes.append(spec)
            }
            var command = Ferry_V1_Command()
            command.timeoutMs = 30_000
            command.syncVolumes = sync
            let reply = try await session.request(.command(command), timeout: .seconds(30))
            guard case .commandResult(let result) = reply.body, case .volumeStatuses(let statuses)? = result.outcome else {
                throw FerryError(.protocolViolation, "agent answered the volume list with \(reply.bodyName)")
            }
            for failed in statuses.volumes where !failed.error.isEmpty {
                log.error("agent cannot serve a protected volume", metadata: ["volume": "\(failed.name)", "error": "\(failed.error)"])
            }
            for outside in statuses.volumes where !outside.outsideAllowlist.isEmpty {
                log.warning("agent serves a volume outside its protect-allow list", metadata: ["volume": "\(outside.name)", "reason": "\(outside.outsideAllowlist)"])
                guard auditedOutsideAllowlist.withLock({ $0.insert("\(hostID)/\(outside.name)/\(outside.path)").inserted }),
                      let host = try await store.hosts().first(where: { $0.id == hostID }) else { continue }
                try await store.audit(actor: "agent:\(host.name)", action: "volume.outside-protect-allow", target: "\(host.name)/\(outside.name)",
                                      detail: outside.outsideAllowlist)
            }
            try await store.recordVolumeSockets(hostID: hostID, statuses.volumes)
        } catch {
            log.warning("volume list not delivered", metadata: ["error": "\(error)"])
        }
    }

    /// Whether a recovered volume's replica is built from its failover point; if not, starts
    /// building it, and sends the host its volume list again once it is.
    func replicaReady(hostID: String, record: VolumeRecord, hydration h: VolumeHydration, log: Logger) async throws -> Bool {
        if await replicas.opened(hostID: hostID, volume: record.name) != nil { return true }
        let source = try await replicas.replica(hostID: h.sourceHostID, volume: h.sourceVolume, size: UInt64(record.sizeBytes))
        // The point's own size: the recovered volume may have grown since (an online resize),
        // and its stream brings that resize to the replica built here.
        let position = ReplicaPosition(epoch: h.epoch, sequence: h.sequence)
        let size = await source.size(at: position)
        return await replicas.ensureSeeded(hostID: hostID, volume: record.name, size: size, from: source,
                                           at: position, logger: log) { inPlace, _ in
            // Built, or started empty for a full initial sync: the agent streams to it now.
            guard inPlace, let entry = await self.registry.entry(hostID: hostID) else { return }
            await self.syncVolumes(hostID: hostID, session: entry.session, log: log)
        }
    }

    func admissionWithdrawn(hostID: String, serial: String) async -> FerryError? {
        do {
            _ = try await store.admit(hostID: hostID, serial: serial)
            return nil
        } catch let error as FerryError {
            return error.code == .revoked ? error : nil
        } catch {
            return nil
        }
    }

    /// Per-session bookkeeping for messages that must be rate-limited or checked against the
    /// session's certificate.
    final class SessionState: Sendable {
        let certificate: Certificate
        let lastInventoryUpdate = Mutex<ContinuousClock.Instant?>(nil)
        /// Recovery reports in the current second (an agent sends one per recovery a second).
        let recoveryReports = Mutex<(second: ContinuousClock.Instant, count: Int)>((.now, 0))
        /// Volumes whose records past their fence were refused in this session (told once).
        let refusedPastFence = Mutex<Set<String>>([])
        /// Volumes whose replication waits for the controller's disk (logged once a pause).
        let pausedForSpace = Mutex<Set<String>>([])
        init(certificate: Certificate) { self.certificate = certificate }
    }

    /// Messages an agent sends on its own initiative.
    func handle(_ envelope: Ferry_V1_Envelope, attachments: [ByteBuffer] = [], hostID: String, hostName: String,
                session: PeerSession, state: SessionState, log: Logger) async throws {
        metrics.framesReceived.increment()
        switch envelope.body {
        case .inventoryUpdate(let update):
            let now = ContinuousClock.now
            let tooSoon = state.lastInventoryUpdate.withLock { last in
                defer { last = now }
                // Updates an agent sends a second apart can arrive a little closer together.
                return last.map { now - $0 < InventoryLimits.minUpdateInterval - InventoryLimits.arrivalJitter } ?? false
            }
            do {
                if tooSoon { throw FerryError(.badRequest, "inventory updates more often than every \(InventoryLimits.minUpdateInterval) are ignored") }
                try InventoryLimits.check(update.inventory)
                let bytes = Data(try update.inventory.serializedBytes() as [UInt8])
                if try await store.recordInventory(hostID: hostID, inventory: bytes) {
                    log.info("inventory changed")
                }
            } catch let error as FerryError {
                log.warning("inventory update refused", metadata: ["reason": "\(error.message)"])
                try await session.send(.error(error.wire), inReplyTo: envelope.id)
            }
        case .renewRequest(let req):
            do {
                // Renewal only in the second half of the certificate's life: a stolen key cannot
                // keep minting itself fresh certificates at will.
                let lifetime = state.certificate.notValidAfter.timeIntervalSince(state.certificate.notValidBefore)
                guard state.certificate.notValidAfter.timeIntervalSinceNow < lifetime / 2 else {
                    throw FerryError(.badRequest, "certificate renewal is allowed once half of the certificate's lifetime has passed")
                }
                let issued = try pki.issueAgentCertificate(csrDER: Array(req.csrDer), hostID: hostID, hostName: hostName, validity: config.certificateValidity)
                try await store.recordRenewal(hostID: hostID, serial: issued.serial, notAfter: issued.notAfter)
                var response = Ferry_V1_RenewResponse()
                response.certificateDer = Data(try PEMFiles.der(issued.certificate))
                response.notAfterUnix = Int64(issued.notAfter.timeIntervalSince1970)
                try await session.send(.renewResponse(response), inReplyTo: envelope.id)
                metrics.certificatesRenewed.increment()
                log.info("certificate renewed", metadata: ["serial": "\(issued.serial)"])
            } catch let error as FerryError {
                try await session.send(.error(error.wire), inReplyTo: envelope.id)
            }
        case .replicationBatch(var batch):
            let replica = try await protectedReplica(hostID: hostID, volume: batch.volume)
            do {
                try AgentInputChecks.check(batch)
            } catch let error as FerryError {
                // As for a batch the replica refuses: the agent resumes from what is durable.
                log.warning("replication batch refused; closing the session", metadata: ["volume": "\(batch.volume)", "error": "\(error.message)"])
                await session.close(reason: "replication batch refused: \(error.message)")
                return
            }
            let wire = attachments.reduce(0) { $0 + $1.readableBytes }
            var attachments = attachments
            var decompressSeconds: Double?
            if !batch.attachedSizes.isEmpty {
                do {
                    let started = ContinuousClock.now
                    attachments = try AttachedFrameCompression.decompress(attachments, sizes: batch.attachedSizes, maxFrameBytes: config.maxFrameBytes,
                                                                          allocator: session.channel.allocator)
                    let took = started.duration(to: .now)
                    decompressSeconds = Double(took.components.seconds) + Double(took.components.attoseconds) / 1e18
                } catch let error as FerryError {
                    log.warning("replication batch refused; closing the session", metadata: ["volume": "\(batch.volume)", "error": "\(error.message)"])
                    await session.close(reason: "replication batch refused: \(error.message)")
                    return
                }
            }
            metrics.replicationBytes(host: hostName, wire: wire, data: attachments.reduce(0) { $0 + $1.readableBytes },
                                     decompressSeconds: decompressSeconds)
            switch try await ingestGate(hostID: hostID, volume: batch.volume).decide(
                generation: batch.generation, epoch: batch.epoch, sequences: batch.records.map(\.sequence)) {
            case .all:
                break
            case .prefix(let count, let refused):
                (batch, attachments) = batch.prefix(count, attachments: attachments)
                await refusedPastFence(batch.volume, refused: refused, hostName: hostName, session: session, state: state, log: log)
                if count == 0 { return }
            case .refuse(let error):
                log.warning("replication batch refused", metadata: ["volume": "\(batch.volume)", "reason": "\(error.message)"])
                // The agent reconnects and is handed the current volume list first.
                await session.close(reason: error.message)
                return
            }
            // The session reads on while the batch is made durable (batches queued meanwhile
            // share one fdatasync); the ack follows once it is. A gap or a bad record ends the
            // session: the agent reconnects and resumes from the durable sequence it is told at
            // the next session start.
            let metrics = self.metrics
            let count = batch.records.count
            let newest = batch.records.last?.capturedUnixNanos ?? 0
            let (volume, epoch) = (batch.volume, batch.epoch)
            await replica.submit(batch, attachments: attachments) { result in
                switch result {
                case .success(let durable):
                    metrics.replicatedRecords.increment(by: count)
                    if newest > 0 {
                        metrics.replicationLag.recordNanoseconds(max(0, Int64(Date().timeIntervalSince1970 * 1e9) - newest))
                    }
                    var ack = Ferry_V1_ReplicationAck()
                    ack.volume = volume
                    ack.epoch = epoch
                    ack.durableSequence = durable
                    try? await session.send(.replicationAck(ack))
                case .failure(let error as FerryError) where error.code == .noSpace:
                    // A state, not a fault of the agent: its session and other volumes go on;
                    // the volume's next report after the space returns resumes it.
                    if state.pausedForSpace.withLock({ $0.insert(volume).inserted }) {
                        log.warning("replication paused: the controller's disk is full", metadata: ["volume": "\(volume)", "reason": "\(error.message)"])
                        metrics.replicationPaused(host: hostName, volume: volume, paused: true)
                    }
                case .failure(let error):
                    log.warning("replication batch refused; closing the session", metadata: ["volume": "\(volume)", "error": "\(error)"])
                    await session.close(reason: "replication batch refused: \((error as? FerryError)?.message ?? "\(error)")")
                }
            }
        case .resyncHashes(let request):
            do {
                let replica = try await protectedReplica(hostID: hostID, volume: request.volume)
                var diff = Ferry_V1_ResyncDiff()
                diff.differing = try await replica.differing(request)
                try await session.send(.resyncDiff(diff), inReplyTo: envelope.id)
            } catch let error as FerryError {
                try await session.send(.error(error.wire), inReplyTo: envelope.id)
            }
        case .recoveryReport(let report):
            let now = ContinuousClock.now
            let allowed = state.recoveryReports.withLock { window in
                if now - window.second >= .seconds(1) { window = (now, 0) }
                window.count += 1
                return window.count <= 64
            }
            guard allowed else { return } // past 64 a second: dropped (the next one says the same, newer)
            do {
                try await hydrations?.record(report, from: hostName)
            } catch let error as FerryError {
                log.warning("recovery report refused", metadata: ["recovery": "\(report.recoveryID.prefix(200))", "reason": "\(error.message)"])
                if error.code == .permissionDenied {
                    try? await store.audit(actor: "host:\(hostName)", action: "recovery.report-refused", target: String(report.recoveryID.prefix(200)),
                                           detail: error.message)
                }
            }
        case .volumeReport(let report):
            if report.hasHydration {
                do {
                    try await hydrations?.record(volume: report.volume, progress: report.hydration, from: hostName)
                } catch {
                    // Whatever failed (the state database too), the session and its replication go on.
                    log.warning("hydration report not recorded", metadata: ["volume": "\(report.volume.prefix(200))",
                                                                           "reason": "\((error as? FerryError)?.message ?? "\(error)")"])
                }
            }
            guard let replica = try? await protectedReplica(hostID: hostID, volume: report.volume) else {
                // A recovered volume whose replica is still being built reports before it exists.
                if await replicas.isSeeding(hostID: hostID, volume: report.volume) { return }
                log.warning("report about a volume this host does not protect", metadata: ["volume": "\(report.volume)"])
                return
            }
            if await replica.spaceReturned() {
                state.pausedForSpace.withLock { _ = $0.remove(report.volume) }
                metrics.replicationPaused(host: hostName, volume: report.volume, paused: false)
                log.info("replication resumes: the controller's disk has space again", metadata: ["volume": "\(report.volume)"])
                // The volume list tells the agent where the replica stands: it resends from there.
                // Not awaited here: its answer comes through this very message loop (bounded by
                // the request's timeout, it ends with the session).
                Task { await self.syncVolumes(hostID: hostID, session: session, log: log) }
            }
            let before = await replica.state.syncsCompleted
            try await replica.note(report)
            metrics.noteVolume(host: hostName, report: report, throughput: await replica.throughputBytesPerSecond)
            if await replica.state.syncsCompleted > before {
                metrics.syncCompleted(host: hostName, volume: report.volume)
                log.info("volume sync complete: the replica matches the source", metadata: [
                    "volume": "\(report.volume)", "compared-bytes": "\(report.sync.doneBytes)", "sent-bytes": "\(report.sync.sentBytes)",
                ])
            }
        case .error(let e):
            log.warning("agent reported an error", metadata: ["code": "\(e.code)", "message": "\(e.message)"])
        default:
            let error = FerryError(.protocolViolation, "\(envelope.bodyName) is not valid from an agent")
            if envelope.id != 0 {
                try await session.send(.error(error.wire), inReplyTo: envelope.id)
            } else {
                log.warning("unexpected message", metadata: ["kind": "\(envelope.bodyName)"])
            }
        }
    }

    /// A volume's gate; loaded when the host's session starts, from the store if the volume
    /// came later.
    func ingestGate(hostID: String, volume: String) async throws -> IngestGate {
        if let gate = gates.gate(hostID: hostID, volume: volume) { return gate }
        guard let record = try await store.volumes(hostID: hostID).first(where: { $0.name == volume }) else {
            throw FerryError(.protocolViolation, "replication for volume '\(volume)', which this host does not protect")
        }
        gates.set(record.ingestGate, hostID: hostID, volume: volume)
        return record.ingestGate
    }

    /// Records a fenced source captured after its fence (while it was cut off): never applied,
    /// never acked. Told to the agent, logged and audited once per session and volume.
    func refusedPastFence(_ volume: String, refused: Int, hostName: String, session: PeerSession, state: SessionState, log: Logger) async {
        let first = state.refusedPastFence.withLock { $0.insert(volume).inserted }
        guard first else { return }
        let error = FerryError(.fenced, "volume \(volume) is fenced for a failover: the \(refused) records it captured after its fence are refused; reprotect makes it a copy of the recovered site")
        log.warning("replication records past a fence refused", metadata: ["volume": "\(volume)", "records": "\(refused)"])
        try? await store.audit(actor: "agent:\(hostName)", action: "replication.refused", target: "\(hostName)/\(volume)", detail: error.message)
        try? await session.send(.error(error.wire))
    }

    /// The replica of a volume this host protects; a volume it does not protect is a
    /// protocol violation.
    func protectedReplica(hostID: String, volume: String) async throws -> ReplicaStore {
        if let opened = await replicas.opened(hostID: hostID, volume: volume) { return opened }
        guard let record = try await store.volumes(hostID: hostID).first(where: { $0.name == volume }) else {
            throw FerryError(.protocolViolation, "replication for volume '\(volume)', which this host does not protect")
        }
        return try await replicas.replica(hostID: hostID, volume: record.name, size: UInt64(record.sizeBytes))
    }

    /// Closes the live session and NBD+TLS connections of a host (used on revocation).
    func disconnect(hostID: String, reason: String) async {
        exportConnections.close(hostID: hostID)
        if let entry = await registry.entry(hostID: hostID) {
            await entry.session.close(reason: reason)
        }
        if let lane = await registry.lane(hostID: hostID) {
            await lane.close(reason: reason)
        }
    }
}
