import FerryWire
import Foundation
import Hummingbird
import HummingbirdTLS
import Logging
import NIOCore
import NIOSSL
import SwiftProtobuf

/// Request context of the operator API: who is calling.
public struct APIContext: RequestContext {
    public var coreContext: CoreRequestContextStorage
    public var principal: APIPrincipal?
    /// The caller's IP address, for refusals' audit entries and their rate limit.
    public var peer: String

    public init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        principal = nil
        peer = source.channel.remoteAddress?.ipAddress ?? "unknown"
    }
}

/// An API failure rendered as `{"error": {"code", "message"}}` with a fitting HTTP status.
struct APIError: HTTPResponseError {
    let error: FerryError

    var status: HTTPResponse.Status {
        switch error.code {
        case .badRequest, .badConfiguration: .badRequest
        case .unauthenticated: .unauthorized
        case .permissionDenied: .forbidden
        case .notFound: .notFound
        case .conflict: .conflict
        case .unavailable: .serviceUnavailable
        case .timeout: .gatewayTimeout
        case .rateLimited: .tooManyRequests
        default: .internalServerError
        }
    }

    func response(from request: Request, context: some RequestContext) throws -> Response {
        let body = try API.encoder().encode(API.ErrorBody(code: error.code.rawValue, message: error.message))
        return Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(data: body)))
    }
}

/// Checks the bearer token on every request (`/healthz` answers without one, with less; the
/// console's files and the OpenAPI document need none).
/// Every failed attempt is audited; an address with too many in a minute is refused, without
/// a lookup or an audit entry each, until the minute is over.
struct BearerAuthMiddleware: RouterMiddleware {
    typealias Context = APIContext
    let store: StateStore
    let metrics: ControllerMetrics
    let failures: FailureLimiter

    func handle(_ request: Request, context: APIContext, next: (Request, APIContext) async throws -> Response) async throws -> Response {
        metrics.apiRequests.increment()
        let health = request.uri.path == "/healthz"
        if APIRoutes.isPublic(request.uri.path), !health { return try await next(request, context) }
        if let wait = failures.blocked(context.peer) {
            throw APIError(error: FerryError(.rateLimited, "too many failed token attempts from \(context.peer); retry in \(Int(wait.seconds.rounded(.up))) s"))
        }
        guard let header = request.headers[.authorization], header.hasPrefix("Bearer ") else {
            if health { return try await next(request, context) }
            throw try await refuse(FerryError(.unauthenticated, "missing bearer token; set FERRY_TOKEN (see ferryctl.env in the controller's data dir)"), request, context)
        }
        let principal: APIPrincipal
        do {
            guard let found = try await store.principal(forBearer: String(header.dropFirst("Bearer ".count))) else {
                throw FerryError(.unauthenticated, "bearer token not recognised by this controller")
            }
            principal = found
        } catch let error as FerryError where error.code == .unauthenticated {
            throw try await refuse(error, request, context)
        }
        var context = context
        context.principal = principal
        return try await next(request, context)
    }

    /// Audits a failed attempt (until its address is limited) and returns the error to throw.
    private func refuse(_ error: FerryError, _ request: Request, _ context: APIContext) async throws -> APIError {
        let target = String(request.uri.path.prefix(200))
        switch failures.fail(context.peer) {
        case .counted:
            try? await store.audit(actor: "address:\(context.peer)", action: "api.auth-failed", target: target, detail: error.message)
        case .limited:
            try? await store.audit(actor: "address:\(context.peer)", action: "api.auth-rate-limited", target: target,
                                   detail: "\(failures.limit) failed token attempts within \(failures.window); refused until the window ends")
        case .alreadyLimited:
            break
        }
        return APIError(error: error)
    }
}

extension APIContext {
    /// The caller, if its role is at least `role`.
    func require(_ role: APIPrincipal.Role) throws -> APIPrincipal {
        guard let principal else { throw APIError(error: FerryError(.unauthenticated, "not authenticated")) }
        guard principal.role >= role else {
            throw APIError(error: FerryError(.permissionDenied, "token '\(principal.name)' has role \(principal.role.rawValue); this needs \(role.rawValue)"))
        }
        return principal
    }
}

/// JSON responses with the API's encoder (ISO 8601 dates, sorted keys).
struct JSONBody<T: Encodable & Sendable>: ResponseGenerator {
    let value: T
    var status: HTTPResponse.Status = .ok

    func response(from request: Request, context: some RequestContext) throws -> Response {
        let data = try API.encoder().encode(value)
        return Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(data: data)))
    }
}

/// The operator API: HTTPS + JSON.
struct APIRoutes {
    let store: StateStore
    let registry: SessionRegistry
    let metrics: ControllerMetrics
    let pki: ControllerPKI
    let agents: AgentServer
    let replicas: ReplicaManager
    let coordinator: CutCoordinator
    let catalogue: PointCatalogue
    let exports: PointExports
    let jobs: JobRunner
    let hydrations: Hydrations
    /// Where the bootstrap admin token's secret lives (rewritten when it is rotated).
    let dataDir: String
    /// Failed token attempts per address: 20 a minute.
    let authFailures = FailureLimiter(limit: 20, window: .seconds(60))

    func router() -> Router<APIContext> {
        let router = Router(context: APIContext.self)
        router.add(middleware: BearerAuthMiddleware(store: store, metrics: metrics, failures: authFailures))
        router.get("/healthz") { _, context in
            // Without a token: that it answers, nothing about what it runs or holds.
            guard context.principal != nil else { return JSONBody(value: API.Health(status: "ok", version: nil, agentsOnline: nil)) }
            return JSONBody(value: API.Health(status: "ok", version: FerryVersion.current, agentsOnline: await registry.count))
        }
        router.get("/metrics") { _, context in
            _ = try context.require(.viewer)
            return Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4"],
                            body: .init(byteBuffer: ByteBuffer(string: metrics.render())))
        }
        addConsoleRoutes(router)
        let v1 = router.group("v1")
        v1.get("whoami") { _, context in
            let who = try context.require(.viewer)
            return JSONBody(value: API.Principal(name: who.name, role: who.role.rawValue, expiresAt: who.expiresAt))
        }
        v1.get("hosts") { _, context in
            _ = try context.require(.viewer)
            return JSONBody(value: try await hostViews())
        }
        v1.get("hosts/:name") { _, context in
            _ = try context.require(.viewer)
            let name = try context.parameters.require("name")
            guard let view = try await hostViews().first(where: { $0.name == name }) else {
                throw APIError(error: FerryError(.notFound, "no host named '\(name)'; 'ferryctl hosts' lists them"))
            }
            return JSONBody(value: view)
        }
        v1.delete("hosts/:name") { _, context in
            let who = try context.require(.admin)
            let name = try context.parameters.require("name")
            let (host, serials) = try await wrap { try await store.removeHost(named: name, actor: who.actor) }
            await agents.disconnect(hostID: host.id, reason: "host removed and its certificates revoked")
            return JSONBody(value: ["removed": name, "revokedCertificates": "\(serials.count)"])
        }
        v1.post("hosts/:name/inventory/refresh") { _, context in
            let who = try context.require(.operator)
            let name = try context.parameters.require("name")
            guard let host = try await store.host(named: name) else {
                throw APIError(error: FerryError(.notFound, "no host named '\(name)'"))
            }
            guard let entry = await registry.entry(hostID: host.id) else {
                throw APIError(error: FerryError(.unavailable, "host '\(name)' is not connected"))
            }
            var command = Ferry_V1_Command()
            command.timeoutMs = 10_000
            command.refreshInventory = Ferry_V1_RefreshInventory()
            let reply = try await wrap { try await entry.session.request(.command(command), timeout: .seconds(10)) }
            guard case .commandResult(let result) = reply.body, case .inventory(let inventory)? = result.outcome else {
                throw APIError(error: FerryError(.protocolViolation, "agent answered refresh with \(reply.bodyName)"))
            }
            try await wrap { try InventoryLimits.check(inventory) }
            try await store.recordInventory(hostID: host.id, inventory: Data(try inventory.serializedBytes() as [UInt8]), actor: who.actor)
            return JSONBody(value: API.Inventory(inventory))
        }
        v1.post("tokens") { request, context in
            let who = try context.require(.admin)
            let body = try await request.decode(as: API.TokenCreateRequest.self, context: context)
            let ttl = body.ttlSeconds ?? 3600
            guard (1...30 * 86_400).contains(ttl) else {
                throw APIError(error: FerryError(.badRequest, "ttl must be between 1 second and 30 days"))
            }
            if let host = body.host, !HostName.isValid(host) {
                throw APIError(error: FerryError(.badRequest, "'\(host)' is not a valid host name"))
            }
            let token = EnrollmentToken.generate(caFingerprint: pki.ca.fingerprint)
            let created = try await wrap {
                try await store.createEnrollmentToken(token, hostName: body.host, ttl: TimeInterval(ttl), actor: who.actor)
            }
            return JSONBody(value: created, status: .created)
        }
        v1.get("tokens") { _, context in
            _ = try context.require(.admin)
            return JSONBody(value: try await store.enrollmentTokens())
        }
        v1.post("api-tokens") { request, context in
            let who = try context.require(.admin)
            let body = try await request.decode(as: API.APITokenCreateRequest.self, context: context)
            guard let role = APIPrincipal.Role(rawValue: body.role) else {
                throw APIError(error: FerryError(.badRequest, "role must be viewer, operator or admin, not '\(body.role)'"))
            }
            let lifetime = try Self.tokenLifetime(body.expiresInSeconds) ?? StateStore.apiTokenLifetime
            return JSONBody(value: try await wrap { try await store.createAPIToken(name: body.name, role: role, actor: who.actor, lifetime: lifetime) },
                            status: .created)
        }
        v1.post("api-tokens/:name/rotate") { request, context in
            let who = try context.require(.admin)
            let name = try context.parameters.require("name")
            let body = try await request.decode(as: API.APITokenRotateRequest.self, context: context)
            let lifetime = try Self.tokenLifetime(body.expiresInSeconds)
            let rotated = try await wrap {
                let rotated = try await store.rotateAPIToken(name: name, actor: who.actor, lifetime: lifetime)
                if name == "admin", let secret = rotated.token { try rewriteAdminToken(secret) }
                return rotated
            }
            return JSONBody(value: rotated)
        }
        v1.get("api-tokens") { _, context in
            _ = try context.require(.admin)
            return JSONBody(value: try await store.apiTokens())
        }
        v1.delete("api-tokens/:name") { _, context in
            let who = try context.require(.admin)
            let name = try context.parameters.require("name")
            try await wrap { try await store.removeAPIToken(name: name, actor: who.actor) }
            return JSONBody(value: ["removed": name])
        }
        v1.post("volumes") { request, context in
            let who = try context.require(.operator)
            let body = try await request.decode(as: API.ProtectRequest.self, context: context)
            return JSONBody(value: try await wrap { try await protect(body, actor: who.actor) }, status: .created)
        }
        v1.get("volumes") { _, context in
            _ = try context.require(.viewer)
            return JSONBody(value: try await wrap { try await volumeViews() })
        }
        v1.get("volumes/:host/:name") { _, context in
            _ = try context.require(.viewer)
            let host = try context.parameters.require("host"), name = try context.parameters.require("name")
            guard var view = try await wrap({ try await volumeViews() }).first(where: { $0.host == host && $0.name == name }) else {
                throw APIError(error: FerryError(.notFound, "no volume \(host)/\(name); 'ferryctl volumes' lists them"))
            }
            let hydration = await hydrations.list().filter { $0.volume == "\(host)/\(name)" }
            view.hydration = hydration.isEmpty ? nil : hydration
            return JSONBody(value: view)
        }
        v1.get("volumes/:host/:name/lag-history") { _, context in
            _ = try context.require(.viewer)
            let host = try context.parameters.require("host"), name = try context.parameters.require("name")
            let samples = try await wrap {
                let (_, replica, _) = try await volumeReplica(host: host, name: name)
                return await replica.lagSamples
            }
            return JSONBody(value: samples.map { API.LagSample(at: $0.at, lagSeconds: $0.lagSeconds, lagBytes: $0.lagBytes) })
        }
        v1.post("volumes/:host/:name/resync") { _, context in
            let who = try context.require(.operator)
            let host = try context.parameters.require("host"), name = try context.parameters.require("name")
            return JSONBody(value: try await wrap { try await resync(host: host, name: name, actor: who.actor) }, status: .accepted)
        }
        v1.post("volumes/:host/:name/resize") { request, context in
            let who = try context.require(.operator)
            let host = try context.parameters.require("host"), name = try context.parameters.require("name")
            let body = try await request.decode(as: API.ResizeRequest.self, context: context)
            return JSONBody(value: try await wrap { try await resize(host: host, name: name, to: body.sizeBytes, actor: who.actor) })
        }
        addPointRoutes(v1)
        addPlanRoutes(v1)
        addWANRoutes(v1)
        addAlertRoutes(v1)
        v1.get("audit") { request, context in
            _ = try context.require(.viewer)
            let limit = request.uri.queryParameters.get("limit", as: Int.self) ?? 100
            return JSONBody(value: try await store.auditLog(limit: max(1, min(limit, 10_000))))
        }
        return router
    }

    func wrap<T>(_ body: () async throws -> T) async throws -> T {
        do { return try await body() } catch let error as FerryError { throw APIError(error: error) }
    }

    /// Protects a volume: the agent checks (or creates) the path and exports it first; only
    /// then is it recorded, so an error leaves nothing behind.
    func protect(_ body: API.ProtectRequest, actor: String) async throws -> API.Volume {
        guard VolumeName.isValid(body.volume) else {
            throw FerryError(.badRequest, "'\(body.volume)' is not a valid volume name (1-63 characters: letters, digits, '.', '-', '_')")
        }
        guard body.path.hasPrefix("/") else { throw FerryError(.badRequest, "the path must be absolute, not '\(body.path)'") }
        let mode = body.captureMode ?? "export"
        guard mode == "export" || mode == "scan" else {
            throw FerryError(.badRequest, "capture mode must be export or scan, not '\(mode)'")
        }
        let interval = mode == "scan" ? (body.scanIntervalSeconds ?? 30) : 0
        guard mode == "export" || (5...86_400).contains(interval) else {
            throw FerryError(.badRequest, "the scan interval must be between 5 s and 24 h, not \(interval) s")
        }
        if let size = body.createSizeBytes { try WireLimits.checkVolumeSize(size, "the size to create (--create-size)") }
        guard let host = try await store.host(named: body.host) else {
            throw FerryError(.notFound, "no host named '\(body.host)'; 'ferryctl hosts' lists them")
        }
        try await store.checkNewVolume(hostID: host.id, name: body.volume, path: body.path)
        guard let entry = await registry.entry(hostID: host.id) else {
            throw FerryError(.unavailable, "host '\(body.host)' is not connected; it must be online to check the path")
        }
        var spec = Ferry_V1_VolumeSpec()
        spec.name = body.volume
        spec.path = body.path
        spec.createSizeBytes = body.createSizeBytes ?? 0
        // A new replica is empty: the agent compares (and copies) the whole volume first.
        spec.initialSyncRequired = true
        spec.captureMode = mode == "scan" ? .scan : .export
        spec.scanIntervalSeconds = UInt32(interval)
        // Nothing of this volume on the controller yet: its initial sync need not compare hashes.
        let absent = await replicas.absent(hostID: host.id, volume: body.volume)
        spec.replicaEmpty = mode == "export" && absent
        let (record, _) = try await agents.protectVolume(spec, host: host, session: entry.session, captureMode: mode, scanIntervalSeconds: interval,
                                                         actor: actor)
        return try await volumeView(record, hostName: host.name)
    }

    /// Asks the agent to compare the whole volume with the replica, block hash by block hash.
    func resync(host hostName: String, name: String, actor: String) async throws -> API.Volume {
        guard let host = try await store.host(named: hostName) else {
            throw FerryError(.notFound, "no host named '\(hostName)'; 'ferryctl hosts' lists them")
        }
        guard let record = try await store.volumes(hostID: host.id).first(where: { $0.name == name }) else {
            throw FerryError(.notFound, "no volume \(hostName)/\(name); 'ferryctl volumes' lists them")
        }
        guard let entry = await registry.entry(hostID: host.id) else {
            throw FerryError(.unavailable, "host '\(hostName)' is not connected; a resync needs its agent online")
        }
        _ = try await entry.session.command("resync", timeout: .seconds(30)) { $0.resyncVolume.name = name }
        try await store.audit(actor: actor, action: "volume.resync", target: "\(hostName)/\(name)")
        return try await volumeView(record, hostName: host.name)
    }

    /// Grows a volume online: the agent grows it and records the resize in its stream; the
    /// answer waits (up to 30 s) for the replica to hold the resize, then the record follows.
    func resize(host hostName: String, name: String, to size: UInt64, actor: String) async throws -> API.ResizeResult {
        guard let host = try await store.host(named: hostName) else {
            throw FerryError(.notFound, "no host named '\(hostName)'; 'ferryctl hosts' lists them")
        }
        guard let record = try await store.volumes(hostID: host.id).first(where: { $0.name == name }) else {
            throw FerryError(.notFound, "no volume \(hostName)/\(name); 'ferryctl volumes' lists them")
        }
        try WireLimits.checkVolumeSize(size, "the new size of \(hostName)/\(name)")
        guard size > 0, size % 512 == 0 else {
            throw FerryError(.badRequest, "the new size of \(hostName)/\(name) must be a whole number of 512-byte sectors, not \(size) bytes")
        }
        guard !record.fenced else {
            throw FerryError(.conflict, "\(hostName)/\(name) is fenced: the other site owns it since a failover; resize the volume that runs the workload")
        }
        let replica = try await replicas.replica(hostID: host.id, volume: name, size: UInt64(record.sizeBytes))
        let current = max(UInt64(record.sizeBytes), await replica.size)
        guard size >= current else {
            throw FerryError(.badRequest, "\(hostName)/\(name) is \(current) bytes: shrinking it to \(size) is refused (a file system or guest on it would lose its end)")
        }
        guard let entry = await registry.entry(hostID: host.id) else {
            throw FerryError(.unavailable, "host '\(hostName)' is not connected; a resize needs its agent online")
        }
        let result = try await entry.session.command("resize", timeout: .seconds(60)) {
            $0.resizeVolume.name = name
            $0.resizeVolume.sizeBytes = size
        }
        guard case .volumeResized(let resized)? = result.outcome, resized.sizeBytes == size else {
            throw FerryError(.protocolViolation, "\(hostName) answered the resize of \(name) without its new size")
        }
        let changed = resized.previousBytes != resized.sizeBytes
        // Event-driven: every append to the replica wakes this; the deadline bounds the wait.
        let deadline = ContinuousClock.now + .seconds(30)
        while await replica.size < size, ContinuousClock.now < deadline {
            let position = await replica.latestPosition
            await withTaskGroup(of: Void.self) { group in
                group.addTask { await replica.waitForAppend(beyond: position) }
                group.addTask { try? await Task.sleep(until: deadline) }
                await group.next()
                group.cancelAll()
            }
        }
        let replicaBytes = await replica.size
        if replicaBytes >= size { try await store.growVolume(hostID: host.id, name: name, to: size) }
        if changed {
            try await store.audit(actor: actor, action: "volume.resize", target: "\(hostName)/\(name)",
                                  detail: "from=\(resized.previousBytes) to=\(size) epoch=\(String(resized.epoch, radix: 16)) sequence=\(resized.sequence)")
        }
        return API.ResizeResult(host: hostName, name: name, previousBytes: resized.previousBytes, sizeBytes: size, changed: changed,
                                replicaBytes: replicaBytes)
    }

    func volumeViews() async throws -> [API.Volume] {
        let hosts = Dictionary(uniqueKeysWithValues: try await store.hosts().map { ($0.id, $0) })
        var views: [API.Volume] = []
        for v in try await store.volumes() {
            guard let host = hosts[v.hostID] else { continue }
            do {
                views.append(try await volumeView(v, hostName: host.name))
            } catch {
                // One replica that cannot be opened must not hide every volume (nor silence the
                // alerts, which read this list): it is listed in error, with why.
                var view = API.Volume(host: host.name, name: v.name, path: v.path, sizeBytes: UInt64(v.sizeBytes),
                                      state: await registry.entry(hostID: v.hostID) != nil ? .exported : .hostOffline,
                                      socketPath: v.socketPath, lastSequence: nil, protectedAt: v.protectedAt)
                view.captureMode = v.captureMode
                view.replicaState = .error
                view.lastError = "the replica cannot be opened: \((error as? FerryError)?.message ?? "\(error)")"
                views.append(view)
            }
        }
        return views.sorted { ($0.host, $0.name) < ($1.host, $1.name) }
    }

    func volumeView(_ v: VolumeRecord, hostName: String) async throws -> API.Volume {
        let online = await registry.entry(hostID: v.hostID) != nil
        if await replicas.isSeeding(hostID: v.hostID, volume: v.name) {
            // A failover just landed it: its replica is being built here from the failover point;
            // its host captures its writes meanwhile and streams them once that is done.
            var view = API.Volume(host: hostName, name: v.name, path: v.path, sizeBytes: UInt64(v.sizeBytes),
                                  state: online ? .exported : .hostOffline, socketPath: v.socketPath, lastSequence: nil,
                                  protectedAt: v.protectedAt)
            view.captureMode = v.captureMode
            view.replicaState = .seeding
            return view
        }
        let replica = try await replicas.replica(hostID: v.hostID, volume: v.name, size: UInt64(v.sizeBytes))
        let state = await replica.state
        var view = API.Volume(host: hostName, name: v.name, path: v.path, sizeBytes: UInt64(v.sizeBytes),
                              state: online ? .exported : .hostOffline, socketPath: v.socketPath, lastSequence: nil,
                              protectedAt: v.protectedAt)
        view.captureMode = v.captureMode
        view.scanIntervalSeconds = v.captureMode == "scan" ? Int(v.scanIntervalSeconds) : nil
        view.sink = await jobs.reverse.sinkProgress(hostID: v.hostID, volume: v.name)
        view.durableSequence = await replica.durable
        view.replicaPath = await replica.imagePath
        let report = await replica.report
        let lastError = await replica.lastError
        // A scan volume compares itself all the time: that is how it stays protected.
        let syncing = (report?.sync.pendingExtents ?? 0) > 0 && report?.sync.kind != .scan
        // Online without a report yet (the first comes a second after the session starts):
        // whether a resync is due is not known, so it is not called protected.
        let unreported = online && report == nil
        view.replicaState = await replica.spacePause != nil ? .paused
            : lastError != nil ? .error
            : !state.initialSynced ? .initialSync
            : (state.resyncNeeded || syncing || unreported) ? .resyncing
            : !online ? .paused : .protected
        view.lastError = lastError
        view.syncsCompleted = state.syncsCompleted
        view.throughputBytesPerSecond = await replica.throughputBytesPerSecond
        view.journalBytes = UInt64(clamping: await replica.journalBytes)
        view.journalLimitBytes = UInt64(clamping: replica.journalLimit)
        view.reportedAt = await replica.reportedAt
        if let report {
            view.lastSequence = report.lastSequence
            view.markedExtents = report.markedExtents
            view.tcpAddress = report.tcpAddress.isEmpty ? nil : report.tcpAddress
            view.lagBytes = report.pendingBytes
            view.lagSeconds = report.oldestPendingUnixNanos > 0
                ? max(0, Date().timeIntervalSince1970 - Double(report.oldestPendingUnixNanos) / 1e9) : 0
            let p = report.sync
            if p.kind != .none {
                let left = p.totalBytes - min(p.totalBytes, p.doneBytes)
                view.sync = API.SyncProgress(
                    kind: p.kind == .full ? "full" : p.kind == .scan ? "scan" : "marked", totalBytes: p.totalBytes, doneBytes: p.doneBytes, sentBytes: p.sentBytes,
                    rateBytesPerSecond: p.rateBytesPerSecond,
                    etaSeconds: left > 0 && p.rateBytesPerSecond > 0 ? Double(left) / Double(p.rateBytesPerSecond) : nil,
                    done: p.pendingExtents == 0)
            }
            // Synced: what the current sync has compared, of the whole volume (a marked resync
            // only had its marked extents to do; the rest was in sync already).
            let size = Double(max(1, v.sizeBytes))
            let pendingBytes = min(size, Double(p.totalBytes - min(p.totalBytes, p.doneBytes)))
            view.syncedPercent = state.initialSynced || p.kind != .none ? (100 * (size - pendingBytes) / size).rounded(toPlaces: 1) : 0
        } else {
            view.syncedPercent = state.initialSynced ? 100 : 0
        }
        return view
    }

    func hostViews() async throws -> [API.Host] {
        let records = try await store.hosts()
        var views: [API.Host] = []
        for r in records {
            let live = await registry.entry(hostID: r.id)
            let inventory = r.inventory.flatMap { try? Ferry_V1_Inventory(serializedBytes: $0) }
            let state: API.HostState = live != nil ? .online : (r.state == HostRecord.State.enrolled ? .enrolled : .offline)
            views.append(API.Host(
                id: r.id, name: r.name, state: state,
                address: r.address, os: inventory?.osName, kernel: inventory?.kernel, agentVersion: r.agentVersion,
                enrolledAt: r.enrolledAt,
                lastSeen: live.map { Date().addingTimeInterval(-$0.session.silence.seconds) } ?? r.lastSeen,
                certificateSerial: r.certSerial, certificateExpiry: r.certNotAfter,
                inventory: inventory.map(API.Inventory.init)
            ))
        }
        return views
    }
}

extension Double {
    func rounded(toPlaces places: Int) -> Double {
        let f = Foundation.pow(10, Double(places))
        return (self * f).rounded(.down) / f
    }
}

extension APIRoutes {
    /// A token lifetime from the API, range-checked.
    static func tokenLifetime(_ seconds: Int64?) throws -> TimeInterval? {
        guard let seconds else { return nil }
        guard StateStore.apiTokenLifetimeRange.contains(seconds) else {
            throw APIError(error: FerryError(.badRequest, "a token lives \(StateStore.apiTokenLifetimeRange.lowerBound) s to \(StateStore.apiTokenLifetimeRange.upperBound / 86_400) days, not \(seconds) s"))
        }
        return TimeInterval(seconds)
    }

    /// The bootstrap admin token was rotated: its file, and the env file that names it, get the
    /// new secret (0600), so the controller starts again and local scripts keep working.
    func rewriteAdminToken(_ secret: String) throws {
        try PEMFiles.writeSecret(secret + "\n", to: dataDir + "/admin.token")
        let envPath = dataDir + "/ferryctl.env"
        guard let env = try? String(contentsOfFile: envPath, encoding: .utf8) else { return }
        let lines = env.split(separator: "\n", omittingEmptySubsequences: false).map { line in
            line.hasPrefix("export FERRY_TOKEN=") ? "export FERRY_TOKEN=\(secret)" : String(line)
        }
        try PEMFiles.writeSecret(lines.joined(separator: "\n"), to: envPath)
    }
}
