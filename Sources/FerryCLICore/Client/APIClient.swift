import AsyncHTTPClient
import FerryWire
import Foundation
import NIOCore
import NIOSSL
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A client of the controller's operator API (HTTPS + JSON, bearer token).
///
/// Create it only through ``withClient(_:isolation:_:)``: the underlying `HTTPClient` must be shut
/// down before it is released, and that function guarantees it on every path.
public struct APIClient: Sendable {
    /// Where the API is and how to trust and authenticate to it.
    public struct Settings: Sendable, Equatable {
        /// `https://host:port`, without a trailing slash.
        public var baseURL: String
        /// Bearer token; nil only for unauthenticated calls such as `/healthz`.
        public var token: String?
        /// PEM file of the cluster CA: the only trust root.
        public var caPath: String

        public init(baseURL: String, token: String?, caPath: String) {
            self.baseURL = baseURL
            self.token = token
            self.caPath = caPath
        }
    }

    /// Largest response body read; a controller never sends more, so a bigger one is a fault.
    public static let maximumResponseBytes = 64 << 20
    /// Whole-request deadline.
    public static let requestTimeout: TimeAmount = .seconds(30)
    /// Deadline for the answer's head when fetching a point's image: the controller first
    /// resolves the point and opens the image; the body then streams with no overall deadline.
    public static let imageHeadTimeout: TimeAmount = .minutes(2)

    let http: HTTPClient
    /// The settings this client was made with.
    public let settings: Settings

    /// Runs `body` with a client for `settings` and shuts the client down afterwards, whether
    /// `body` returns or throws. Transport failures come out as one-line `FerryError`s.
    /// - Parameter readTimeout: longest wait for data from the server; raise it (with a matching
    ///   per-call timeout) for calls that may legitimately answer late, such as an app-consistent point.
    public static func withClient<Result>(
        _ settings: Settings,
        readTimeout: TimeAmount = requestTimeout,
        isolation: isolated (any Actor)? = #isolation,
        _ body: (APIClient) async throws -> Result
    ) async throws -> Result {
        // Everything that can fail is done before the HTTPClient exists, so no path leaks it.
        let tls = try tlsConfiguration(caPath: settings.caPath)
        var configuration = HTTPClient.Configuration(
            tlsConfiguration: tls,
            redirectConfiguration: .disallow, // never replay the bearer token to another origin
            timeout: .init(connect: .seconds(10), read: max(readTimeout, requestTimeout))
        )
        // Fail at once on a refused connection or an untrusted certificate instead of
        // retrying quietly until the deadline.
        configuration.connectionPool.retryConnectionEstablishment = false
        configuration.httpVersion = .http1Only
        let http = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup, configuration: configuration)
        let client = APIClient(http: http, settings: settings)
        let result: Result
        do {
            result = try await body(client)
        } catch {
            try? await http.shutdown()
            throw error
        }
        try await http.shutdown()
        return result
    }

    /// TLS 1.3, full verification (chain and host name), the cluster CA as the only root.
    static func tlsConfiguration(caPath: String) throws -> TLSConfiguration {
        guard let data = FileManager.default.contents(atPath: caPath) else {
            throw FerryError(.badConfiguration, "cannot read CA certificate \(caPath) (--ca / FERRY_CA)")
        }
        let certificates: [NIOSSLCertificate]
        do {
            certificates = try NIOSSLCertificate.fromPEMBytes(Array(data))
        } catch {
            throw FerryError(.badConfiguration, "\(caPath) is not a PEM certificate (--ca / FERRY_CA)")
        }
        guard !certificates.isEmpty else {
            throw FerryError(.badConfiguration, "\(caPath) holds no PEM certificate (--ca / FERRY_CA)")
        }
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.trustRoots = .certificates(certificates)
        tls.additionalTrustRoots = []
        tls.certificateVerification = .fullVerification
        tls.minimumTLSVersion = .tlsv13
        return tls
    }

    // MARK: - Operations

    /// `GET /healthz` (no token needed).
    public func health() async throws -> API.Health {
        try await decode(API.Health.self, from: send(.get, "/healthz", authenticated: false))
    }

    /// `GET /metrics`: Prometheus text exposition.
    public func metrics() async throws -> String {
        String(buffer: try await send(.get, "/metrics"))
    }

    /// `GET /v1/hosts`.
    public func hosts() async throws -> [API.Host] {
        try await decode([API.Host].self, from: send(.get, "\(API.prefix)/hosts"))
    }

    /// `GET /v1/hosts/:name`.
    public func host(named name: String) async throws -> API.Host {
        try await decode(API.Host.self, from: send(.get, "\(API.prefix)/hosts/\(Self.escape(name))"))
    }

    /// `DELETE /v1/hosts/:name`: revokes the host's certificates and closes its session.
    /// - Returns: how many certificates were revoked.
    public func removeHost(named name: String) async throws -> Int {
        let answer = try await decode([String: String].self, from: send(.delete, "\(API.prefix)/hosts/\(Self.escape(name))"))
        guard let text = answer["revokedCertificates"], let count = Int(text) else {
            throw FerryError(.protocolViolation, "unexpected answer from \(settings.baseURL): no revokedCertificates count")
        }
        return count
    }

    /// `POST /v1/hosts/:name/inventory/refresh`: the agent re-reads its inventory.
    public func refreshInventory(host name: String) async throws -> API.Inventory {
        try await decode(API.Inventory.self, from: send(.post, "\(API.prefix)/hosts/\(Self.escape(name))/inventory/refresh"))
    }

    /// `GET /v1/wan`: bandwidth limits and compression in force.
    public func wanSettings() async throws -> API.WANSettings {
        try await decode(API.WANSettings.self, from: send(.get, "\(API.prefix)/wan"))
    }

    /// `PUT /v1/wan`: changes one scope's WAN settings; answers with all of them.
    public func updateWAN(_ update: API.WANUpdate) async throws -> API.WANSettings {
        let body = try API.encoder().encode(update)
        return try await decode(API.WANSettings.self, from: send(.put, "\(API.prefix)/wan", body: body))
    }

    /// `POST /v1/tokens`: a new enrollment token; its secret is in `token`.
    public func createToken(_ request: API.TokenCreateRequest) async throws -> API.Token {
        let body = try API.encoder().encode(request)
        return try await decode(API.Token.self, from: send(.post, "\(API.prefix)/tokens", body: body))
    }

    /// `GET /v1/tokens`: enrollment tokens, without their secrets.
    public func tokens() async throws -> [API.Token] {
        try await decode([API.Token].self, from: send(.get, "\(API.prefix)/tokens"))
    }

    /// `POST /v1/api-tokens`: a new operator API token; its secret is in `token`.
    public func createAPIToken(_ request: API.APITokenCreateRequest) async throws -> API.APIToken {
        let body = try API.encoder().encode(request)
        return try await decode(API.APIToken.self, from: send(.post, "\(API.prefix)/api-tokens", body: body))
    }

    /// `GET /v1/api-tokens`: names and roles, never secrets.
    public func apiTokens() async throws -> [API.APIToken] {
        try await decode([API.APIToken].self, from: send(.get, "\(API.prefix)/api-tokens"))
    }

    /// `DELETE /v1/api-tokens/:name`.
    /// `POST /v1/api-tokens/NAME/rotate`: a new secret, returned once.
    public func rotateAPIToken(named name: String, _ request: API.APITokenRotateRequest) async throws -> API.APIToken {
        let body = try API.encoder().encode(request)
        return try await decode(API.APIToken.self, from: send(.post, "\(API.prefix)/api-tokens/\(Self.escape(name))/rotate", body: body))
    }

    public func removeAPIToken(named name: String) async throws {
        _ = try await send(.delete, "\(API.prefix)/api-tokens/\(Self.escape(name))")
    }

    /// `POST /v1/volumes`: protect a volume of a connected host.
    public func protect(_ request: API.ProtectRequest) async throws -> API.Volume {
        let body = try API.encoder().encode(request)
        return try await decode(API.Volume.self, from: send(.post, "\(API.prefix)/volumes", body: body))
    }

    /// `GET /v1/volumes`.
    public func volumes() async throws -> [API.Volume] {
        try await decode([API.Volume].self, from: send(.get, "\(API.prefix)/volumes"))
    }

    /// `GET /v1/volumes/:host/:name`.
    public func volume(host: String, name: String) async throws -> API.Volume {
        try await decode(API.Volume.self, from: send(.get, "\(API.prefix)/volumes/\(Self.escape(host))/\(Self.escape(name))"))
    }

    /// `POST /v1/volumes/:host/:name/resync`.
    public func resync(host: String, name: String) async throws -> API.Volume {
        try await decode(API.Volume.self, from: send(.post, "\(API.prefix)/volumes/\(Self.escape(host))/\(Self.escape(name))/resync"))
    }

    /// `POST /v1/volumes/:host/:name/resize`.
    public func resize(host: String, name: String, sizeBytes: UInt64) async throws -> API.ResizeResult {
        let body = try API.encoder().encode(API.ResizeRequest(sizeBytes: sizeBytes))
        return try await decode(API.ResizeResult.self,
                                from: send(.post, "\(API.prefix)/volumes/\(Self.escape(host))/\(Self.escape(name))/resize", body: body))
    }

    /// `GET /v1/alerts`: firing alerts (all: resolved ones too), newest first.
    public func alerts(all: Bool) async throws -> [API.Alert] {
        try await decode([API.Alert].self, from: send(.get, "\(API.prefix)/alerts\(all ? "?all=true" : "")"))
    }

    /// `GET /v1/audit?limit=N`: newest first.
    public func audit(limit: Int) async throws -> [API.AuditEntry] {
        try await decode([API.AuditEntry].self, from: send(.get, "\(API.prefix)/audit?limit=\(limit)"))
    }

    // MARK: - Groups and points

    /// `POST /v1/groups`: a consistency group of volumes.
    public func createGroup(_ request: API.GroupCreateRequest) async throws -> API.Group {
        let body = try API.encoder().encode(request)
        return try await decode(API.Group.self, from: send(.post, "\(API.prefix)/groups", body: body))
    }

    /// `PUT /v1/groups/:name`: members and policy changed in place.
    public func updateGroup(_ request: API.GroupCreateRequest) async throws -> API.Group {
        let body = try API.encoder().encode(request)
        return try await decode(API.Group.self, from: send(.put, "\(API.prefix)/groups/\(Self.escape(request.name))", body: body))
    }

    /// `GET /v1/groups`.
    public func groups() async throws -> [API.Group] {
        try await decode([API.Group].self, from: send(.get, "\(API.prefix)/groups"))
    }

    /// `GET /v1/groups/:name`.
    public func group(named name: String) async throws -> API.Group {
        try await decode(API.Group.self, from: send(.get, "\(API.prefix)/groups/\(Self.escape(name))"))
    }

    /// `DELETE /v1/groups/:name`.
    public func removeGroup(named name: String) async throws {
        _ = try await send(.delete, "\(API.prefix)/groups/\(Self.escape(name))")
    }

    /// `GET /v1/groups/:name/points`: oldest first.
    public func points(group name: String) async throws -> [API.Point] {
        try await decode([API.Point].self, from: send(.get, "\(API.prefix)/groups/\(Self.escape(name))/points"))
    }

    /// `POST /v1/groups/:name/points`: a manual point. An app-consistent one runs the members'
    /// quiesce and thaw hooks first, so pass a `timeout` above twice the group's hook timeout
    /// (and make the client with a matching `readTimeout`).
    public func createPoint(group name: String, _ request: API.PointCreateRequest,
                            timeout: TimeAmount = requestTimeout) async throws -> API.Point {
        let body = try API.encoder().encode(request)
        return try await decode(API.Point.self, from: send(.post, "\(API.prefix)/groups/\(Self.escape(name))/points",
                                                           body: body, timeout: timeout))
    }

    // MARK: - Recovery plans and jobs

    /// `POST /v1/plans`: add or replace a plan from its YAML (validated by the controller).
    public func applyPlan(file: String, text: String) async throws -> API.Plan {
        let body = try API.encoder().encode(API.PlanApplyRequest(file: file, text: text))
        return try await decode(API.Plan.self, from: send(.post, "\(API.prefix)/plans", body: body))
    }

    /// `GET /v1/plans`.
    public func plans() async throws -> [API.Plan] {
        try await decode([API.Plan].self, from: send(.get, "\(API.prefix)/plans"))
    }

    /// `GET /v1/plans/:name`.
    public func plan(named name: String) async throws -> API.Plan {
        try await decode(API.Plan.self, from: send(.get, "\(API.prefix)/plans/\(Self.escape(name))"))
    }

    /// `DELETE /v1/plans/:name`.
    public func removePlan(named name: String) async throws {
        _ = try await send(.delete, "\(API.prefix)/plans/\(Self.escape(name))")
    }

    /// `POST /v1/plans/:name/jobs`: start an operation on a plan.
    public func startJob(plan name: String, _ request: API.JobCreateRequest) async throws -> API.Job {
        let body = try API.encoder().encode(request)
        return try await decode(API.Job.self, from: send(.post, "\(API.prefix)/plans/\(Self.escape(name))/jobs", body: body))
    }

    /// `GET /v1/jobs`: newest first.
    public func jobs() async throws -> [API.Job] {
        try await decode([API.Job].self, from: send(.get, "\(API.prefix)/jobs"))
    }

    /// `GET /v1/jobs/:id`.
    public func job(id: String) async throws -> API.Job {
        try await decode(API.Job.self, from: send(.get, "\(API.prefix)/jobs/\(Self.escape(id))"))
    }

    /// `POST /v1/jobs/:id/resume`.
    public func resumeJob(id: String) async throws -> API.Job {
        try await decode(API.Job.self, from: send(.post, "\(API.prefix)/jobs/\(Self.escape(id))/resume"))
    }

    /// `POST /v1/jobs/:id/cancel`.
    public func cancelJob(id: String) async throws -> API.Job {
        try await decode(API.Job.self, from: send(.post, "\(API.prefix)/jobs/\(Self.escape(id))/cancel"))
    }

    // MARK: - Exports and images

    /// `POST /v1/volumes/:host/:name/exports`: serve a point of the volume over NBD.
    public func createExport(host: String, name: String, _ request: API.ExportCreateRequest) async throws -> API.Export {
        let body = try API.encoder().encode(request)
        return try await decode(API.Export.self, from: send(
            .post, "\(API.prefix)/volumes/\(Self.escape(host))/\(Self.escape(name))/exports", body: body))
    }

    /// `GET /v1/exports`.
    public func exports() async throws -> [API.Export] {
        try await decode([API.Export].self, from: send(.get, "\(API.prefix)/exports"))
    }

    /// `DELETE /v1/exports/:id`.
    public func removeExport(id: String) async throws {
        _ = try await send(.delete, "\(API.prefix)/exports/\(Self.escape(id))")
    }

    /// What ``downloadImage(host:name:point:asOf:to:overwrite:)`` wrote.
    public struct ImageDownload: Sendable {
        /// Bytes received (the image's size).
        public var bytes: UInt64
        /// Bytes actually written; all-zero MiB chunks of a regular file are left as holes.
        public var writtenBytes: UInt64
        /// The point the controller resolved the choice to (`X-Ferry-Point`), if it said.
        public var point: String?
    }

    /// `GET /v1/volumes/:host/:name/image?point=P` (or `?as-of=TIME`): streams the raw image
    /// into `path` without holding it in memory. A regular file is written sparsely (all-zero
    /// MiB chunks are skipped) and truncated to the image's size; a block device is written in full.
    public func downloadImage(host: String, name: String, point: String?, asOf: Date?, to path: String,
                              overwrite: Bool) async throws -> ImageDownload {
        var query: [String] = []
        if let point { query.append("point=\(Self.escapeQuery(point))") }
        if let asOf {
            let formatter = ISO8601DateFormatter()
            formatter.timeZone = TimeZone(identifier: "UTC")
            query.append("as-of=\(Self.escapeQuery(formatter.string(from: asOf)))")
        }
        let route = "\(API.prefix)/volumes/\(Self.escape(host))/\(Self.escape(name))/image"
            + (query.isEmpty ? "" : "?" + query.joined(separator: "&"))
        let url = settings.baseURL + route
        var request = makeRequest(.get, route, body: nil, authenticated: true)
        request.headers.replaceOrAdd(name: "Accept", value: "application/octet-stream")

        // Open (or refuse) the target before asking for many GiB.
        let file = try ImageFile(path: path, overwrite: overwrite)
        do {
            let response: HTTPClientResponse
            do {
                response = try await http.execute(request, timeout: Self.imageHeadTimeout)
            } catch {
                throw TransportErrors.describe(error, url: settings.baseURL, caPath: settings.caPath)
            }
            guard (200..<300).contains(response.status.code) else {
                let buffer: ByteBuffer
                do {
                    buffer = try await response.body.collect(upTo: 1 << 20)
                } catch {
                    throw FerryError(.protocolViolation, "HTTP \(response.status.code) from \(url)")
                }
                throw Self.apiError(status: response.status.code, body: buffer, url: url)
            }
            let resolved = response.headers.first(name: "X-Ferry-Point")
            let expected = response.headers.first(name: "Content-Length").flatMap { UInt64($0) }
            do {
                for try await chunk in response.body {
                    try file.append(chunk)
                }
            } catch let error as FerryError {
                throw error
            } catch {
                throw TransportErrors.describe(error, url: settings.baseURL, caPath: settings.caPath)
            }
            let total = file.received + UInt64(file.pending)
            if let expected, expected != total {
                throw FerryError(.protocolViolation, "the image ended after \(total) of \(expected) bytes")
            }
            try file.finish()
            return ImageDownload(bytes: file.received, writtenBytes: file.written, point: resolved)
        } catch {
            file.abandon()
            throw error
        }
    }

    // MARK: - Transport

    /// HTTP methods the API uses.
    enum Method: String, Sendable { case get = "GET", post = "POST", put = "PUT", delete = "DELETE" }

    /// Sends one request and returns the body of a 2xx answer; any other status becomes the
    /// server's `FerryError`.
    func send(_ method: Method, _ path: String, body: Data? = nil, authenticated: Bool = true,
              timeout: TimeAmount = requestTimeout) async throws -> ByteBuffer {
        let url = settings.baseURL + path
        let request = makeRequest(method, path, body: body, authenticated: authenticated)
        let status: UInt
        let buffer: ByteBuffer
        do {
            let response = try await http.execute(request, timeout: timeout)
            status = response.status.code
            buffer = try await response.body.collect(upTo: Self.maximumResponseBytes)
        } catch {
            throw TransportErrors.describe(error, url: settings.baseURL, caPath: settings.caPath)
        }
        guard (200..<300).contains(status) else {
            throw Self.apiError(status: status, body: buffer, url: url)
        }
        return buffer
    }

    /// The request for `path` with the usual headers and, if `authenticated`, the bearer token.
    func makeRequest(_ method: Method, _ path: String, body: Data?, authenticated: Bool) -> HTTPClientRequest {
        var request = HTTPClientRequest(url: settings.baseURL + path)
        switch method {
        case .get: request.method = .GET
        case .post: request.method = .POST
        case .put: request.method = .PUT
        case .delete: request.method = .DELETE
        }
        request.headers.add(name: "Accept", value: "application/json")
        request.headers.add(name: "User-Agent", value: "ferryctl/\(FerryVersion.current)")
        if authenticated, let token = settings.token {
            request.headers.add(name: "Authorization", value: "Bearer \(token)")
        }
        if let body {
            request.headers.add(name: "Content-Type", value: "application/json")
            request.body = .bytes(ByteBuffer(bytes: body))
        }
        return request
    }

    /// The server's `{"error": {"code", "message"}}`, or a short summary when the body is not one
    /// (e.g. a proxy's HTML page).
    static func apiError(status: UInt, body: ByteBuffer, url: String) -> FerryError {
        if let decoded = try? API.decoder().decode(API.ErrorBody.self, from: Data(body.readableBytesView)) {
            return FerryError(FerryError.Code(decoded.error.code), decoded.error.message)
        }
        let text = String(buffer: body).split(whereSeparator: \.isNewline).first.map(String.init) ?? ""
        let excerpt = text.count > 120 ? String(text.prefix(120)) + "…" : text
        return FerryError(.protocolViolation, "HTTP \(status) from \(url)\(excerpt.isEmpty ? "" : ": \(excerpt)")")
    }

    func decode<T: Decodable>(_ type: T.Type, from buffer: ByteBuffer) throws -> T {
        do {
            return try API.decoder().decode(T.self, from: Data(buffer.readableBytesView))
        } catch let error as DecodingError {
            throw FerryError(.protocolViolation, "unexpected answer from \(settings.baseURL): \(Self.describe(error))")
        }
    }

    static func describe(_ error: DecodingError) -> String {
        func path(_ keys: [any CodingKey]) -> String {
            keys.isEmpty ? "body" : keys.map { $0.intValue.map { "[\($0)]" } ?? $0.stringValue }.joined(separator: ".")
        }
        switch error {
        case .keyNotFound(let key, let context): return "missing '\(path(context.codingPath + [key]))'"
        case .typeMismatch(_, let context), .valueNotFound(_, let context): return "bad value at '\(path(context.codingPath))'"
        case .dataCorrupted(let context): return "\(path(context.codingPath)) is not valid JSON for this version of ferryctl"
        @unknown default: return "undecodable JSON"
        }
    }

    /// Percent-encodes one path segment, so a name can never add path segments or a query.
    static func escape(_ segment: String) -> String {
        var allowed = CharacterSet.urlPathAllowed
        allowed.remove(charactersIn: "/?#%")
        return segment.addingPercentEncoding(withAllowedCharacters: allowed) ?? segment
    }

    /// Percent-encodes one query value, so it cannot add parameters.
    static func escapeQuery(_ value: String) -> String {
        var allowed = CharacterSet.urlQueryAllowed
        allowed.remove(charactersIn: "&=+#%?/")
        return value.addingPercentEncoding(withAllowedCharacters: allowed) ?? value
    }
}

/// The target of an image download: fed the body in arbitrary pieces, it writes whole MiB chunks
/// at their offsets. In a regular file an all-zero chunk is skipped (a hole) and the file is
/// truncated to the image's size at the end; a block device gets every byte.
final class ImageFile {
    static let chunkSize = 1 << 20

    let path: String
    /// Where the bytes go: for a regular file `PATH.partial`, renamed over `path` once the
    /// whole image is in, so a failed or interrupted download never leaves a truncated or
    /// half-written file at `path`; a device is written in place.
    private let target: String
    private let fd: Int32
    /// A regular file (sparse writes, final truncate), not a device.
    private let sparse: Bool
    private var staging = [UInt8](repeating: 0, count: ImageFile.chunkSize)
    private let zeros = [UInt8](repeating: 0, count: ImageFile.chunkSize)
    /// Bytes in `staging`, not yet written.
    private(set) var pending = 0
    /// Bytes written or skipped: the offset of `staging`'s first byte.
    private(set) var received: UInt64 = 0
    /// Bytes actually written.
    private(set) var written: UInt64 = 0
    private var isOpen = true

    init(path: String, overwrite: Bool) throws {
        self.path = path
        var info = stat()
        let exists = stat(path, &info) == 0
        let kind = info.st_mode & S_IFMT
        if exists, kind == S_IFDIR {
            throw FerryError(.badRequest, "\(path) is a directory; --out needs a file name")
        }
        if exists, !overwrite {
            throw FerryError(.conflict, "\(path) already exists; pass --force to overwrite it")
        }
        let regular = !exists || kind == S_IFREG
        target = regular ? path + ".partial" : path
        // A new file, never one someone else put there (a symlink planted at PATH.partial would
        // otherwise send a root-run download's bytes wherever it points). A leftover of an
        // interrupted download is removed first (unlink removes a link, not what it names).
        if regular { _ = unlink(target) }
        // 0600: the image holds the workload's data.
        let fd = open(target, O_WRONLY | O_CLOEXEC | (regular ? O_CREAT | O_EXCL | O_NOFOLLOW : 0), 0o600)
        guard fd >= 0 else {
            throw FerryError(.io, "cannot open \(target): \(String(cString: strerror(errno)))")
        }
        var opened = stat()
        guard fstat(fd, &opened) == 0 else {
            let reason = String(cString: strerror(errno))
            _ = close(fd)
            throw FerryError(.io, "cannot stat \(path): \(reason)")
        }
        self.fd = fd
        self.sparse = (opened.st_mode & S_IFMT) == S_IFREG
    }

    deinit {
        if isOpen { _ = close(fd) }
    }

    /// Takes the next bytes of the image.
    func append(_ chunk: ByteBuffer) throws {
        var chunk = chunk
        while chunk.readableBytes > 0 {
            let offset = pending
            let count = min(Self.chunkSize - offset, chunk.readableBytes)
            staging.withUnsafeMutableBytes { destination in
                chunk.withUnsafeReadableBytes { source in
                    destination.baseAddress!.advanced(by: offset).copyMemory(from: source.baseAddress!, byteCount: count)
                }
            }
            chunk.moveReaderIndex(forwardBy: count)
            pending += count
            if pending == Self.chunkSize { try flush() }
        }
    }

    /// Writes what is left, sets the size, syncs and closes.
    func finish() throws {
        try flush()
        if sparse, ftruncate(fd, off_t(received)) != 0 {
            throw FerryError(.io, "cannot set the size of \(path): \(String(cString: strerror(errno)))")
        }
        if fsync(fd) != 0 {
            throw FerryError(.io, "cannot sync \(path): \(String(cString: strerror(errno)))")
        }
        isOpen = false
        if close(fd) != 0 {
            throw FerryError(.io, "cannot close \(target): \(String(cString: strerror(errno)))")
        }
        if target != path, rename(target, path) != 0 {
            throw FerryError(.io, "cannot rename \(target) to \(path): \(String(cString: strerror(errno)))")
        }
    }

    /// After a failure: closes, and removes the partial file; `path` is left as it was.
    func abandon() {
        if isOpen {
            isOpen = false
            _ = close(fd)
        }
        if target != path { _ = unlink(target) }
    }

    private func flush() throws {
        let count = pending
        guard count > 0 else { return }
        let hole = sparse && staging.withUnsafeBytes { data in
            zeros.withUnsafeBytes { memcmp(data.baseAddress!, $0.baseAddress!, count) == 0 }
        }
        if !hole {
            try staging.withUnsafeBytes { data in
                var done = 0
                while done < count {
                    let n = pwrite(fd, data.baseAddress!.advanced(by: done), count - done, off_t(received) + off_t(done))
                    if n < 0 {
                        if errno == EINTR { continue }
                        throw FerryError(.io, "cannot write \(path): \(String(cString: strerror(errno)))")
                    }
                    done += n
                }
            }
            written += UInt64(count)
        }
        received += UInt64(count)
        pending = 0
    }
}
