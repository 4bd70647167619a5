import FerryWire
import Foundation
import HTTPTypes
import Hummingbird
import NIOCore

/// The web console's static files under `/ui/` and the OpenAPI document: served without a
/// token (they hold no data; every API call the console makes carries one).
extension APIRoutes {
    /// Paths that answer without a bearer token.
    static func isPublic(_ path: String) -> Bool {
        path == "/healthz" || path == "/ui" || path.hasPrefix("/ui/") || path == "/v1/openapi.json" || path == "/v1/openapi.yaml"
    }

    /// Headers of every console file: no inline script or style runs, nothing loads from
    /// elsewhere, and no other site frames the console.
    static let consoleHeaders: HTTPFields = [
        .contentSecurityPolicy: "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        .xContentTypeOptions: "nosniff",
        HTTPField.Name("X-Frame-Options")!: "DENY",
        HTTPField.Name("Referrer-Policy")!: "no-referrer",
        .cacheControl: "no-cache",
    ]

    func addConsoleRoutes(_ router: Router<APIContext>) {
        // (The router treats /ui and /ui/ alike; the page names its files by absolute path.)
        router.get("/ui") { _, _ in try Self.asset("index.html") }
        router.get("/ui/:file") { _, context in try Self.asset(try context.parameters.require("file")) }
        router.get("/v1/openapi.yaml") { _, _ in
            Response(status: .ok, headers: [.contentType: "application/yaml; charset=utf-8"],
                     body: .init(byteBuffer: ByteBuffer(string: OpenAPIDocument.yaml)))
        }
        router.get("/v1/openapi.json") { _, _ in
            Response(status: .ok, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(data: OpenAPIDocument.json)))
        }
    }

    static func asset(_ name: String) throws -> Response {
        // The OpenAPI document is served under /v1, not as a console file.
        guard name != "openapi.yaml", let asset = EmbeddedAssets.files[name] else {
            throw APIError(error: FerryError(.notFound, "no console file '\(name.prefix(100))'"))
        }
        var headers = consoleHeaders
        headers[.contentType] = asset.contentType
        return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(string: asset.text)))
    }
}
