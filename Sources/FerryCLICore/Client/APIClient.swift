import AsyncHTTPClient
import FerryWire
import Foundation
import NIOCore
import NIOSSL

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

    let http: HTTPClient
    /// The settings this client was made with.
    public let settings: Settings

    /// Runs `body` with a client for `settings` and shuts the client down afterwards, whether
    /// `body` returns or throws. Transport failures come out as one-line `FerryError`s.
    public static func withClient<Result>(
        _ settings: Settings,
        isolation: isolated (any Actor)? = #isolation,
        _ body: (APIClient) async throws -> Result
    ) async throws -> Result {
        // Everything that can fail is done before the HTTPClient exists, so no path leaks it.
        let tls = try tlsConfiguration(caPath: settings.caPath)
        var configuration = HTTPClient.Configuration(
            tlsConfiguration: tls,
            redirectConfiguration: .disallow, // never replay the bearer token to another origin
            timeout: .init(connect: .seconds(10), read: requestTimeout)
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

    /// `GET /v1/audit?limit=N`: newest first.
    public func audit(limit: Int) async throws -> [API.AuditEntry] {
        try await decode([API.AuditEntry].self, from: send(.get, "\(API.prefix)/audit?limit=\(limit)"))
    }

    // MARK: - Transport

    /// HTTP methods the API uses.
    enum Method: String, Sendable { case get = "GET", post = "POST", delete = "DELETE" }

    /// Sends one request and returns the body of a 2xx answer; any other status becomes the
    /// server's `FerryError`.
    func send(_ method: Method, _ path: String, body: Data? = nil, authenticated: Bool = true) async throws -> ByteBuffer {
        let url = settings.baseURL + path
        var request = HTTPClientRequest(url: url)
        switch method {
        case .get: request.method = .GET
        case .post: request.method = .POST
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
        let status: UInt
        let buffer: ByteBuffer
        do {
            let response = try await http.execute(request, timeout: Self.requestTimeout)
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
}
