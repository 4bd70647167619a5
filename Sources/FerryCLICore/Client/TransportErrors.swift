import AsyncHTTPClient
import FerryWire
import Foundation
import NIOCore
import NIOPosix
import NIOSSL

/// Turns NIO / TLS / HTTP client failures into one line an operator can act on:
/// `cannot reach URL: why`. The libraries' own descriptions are multi-line or name internal types.
enum TransportErrors {
    static func describe(_ error: any Error, url: String, caPath: String) -> FerryError {
        if let error = error as? FerryError { return error }
        let host = URL(string: url)?.host ?? url
        return FerryError(.unavailable, "cannot reach \(url): \(reason(error, host: host, caPath: caPath, depth: 0))")
    }

    static func reason(_ error: any Error, host: String, caPath: String, depth: Int) -> String {
        switch error {
        case let error as IOError:
            return errnoText(error.errnoCode)
        case let error as NIOSSLExtraError where error == .failedToValidateHostname:
            return "its certificate is not valid for '\(host)' (use localhost, 127.0.0.1, ::1 or ferry-controller)"
        case let error as NIOSSLError:
            return tlsReason(error, caPath: caPath)
        case is NIOTooManyBytesError:
            return "answer larger than \(APIClient.maximumResponseBytes >> 20) MiB"
        case let error as HTTPClientError:
            return httpClientReason(error)
        case is CancellationError:
            return "cancelled"
        case let error as NIOConnectionError:
            // Per-address connect failures say more than the resolver's.
            if let first = error.connectionErrors.first, depth < 4 {
                return reason(first.error, host: host, caPath: caPath, depth: depth + 1)
            }
            return "cannot resolve '\(host)'"
        case is SocketAddressError:
            return "cannot resolve '\(host)'"
        default:
            break
        }
        return firstLine(String(describing: error))
    }

    static func tlsReason(_ error: NIOSSLError, caPath: String) -> String {
        switch error {
        case .handshakeFailed(let inner):
            let codes = boringSSLReasons(inner)
            if codes.contains("CERTIFICATE_VERIFY_FAILED") {
                return "TLS: the server's certificate is not signed by the CA in \(caPath), or has expired"
            }
            if codes.contains(where: { $0.contains("PROTOCOL_VERSION") || $0.contains("UNSUPPORTED_PROTOCOL") }) {
                return "TLS: the server does not speak TLS 1.3"
            }
            if codes.contains("WRONG_VERSION_NUMBER") {
                return "the server did not answer with TLS; is this the controller's API address?"
            }
            return "TLS handshake failed" + (codes.isEmpty ? "" : ": " + codes.map(readable).joined(separator: ", "))
        case .uncleanShutdown:
            return "the server closed the TLS connection abruptly"
        default:
            return "TLS: \(firstLine(String(describing: error)))"
        }
    }

    /// The reason names (e.g. `CERTIFICATE_VERIFY_FAILED`) in BoringSSL's error strings, which
    /// look like `Error: 1234 error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED at file:line`.
    static func boringSSLReasons(_ error: BoringSSLError) -> [String] {
        let stack: [BoringSSLInternalError]
        switch error {
        case .sslError(let s), .unknownError(let s), .invalidSNIName(let s), .failedToSetALPN(let s): stack = s
        default: return [String(describing: error)]
        }
        return stack.compactMap { entry in
            let text = entry.description
            let head = text.range(of: " at ").map { String(text[..<$0.lowerBound]) } ?? text
            return head.split(separator: ":").last.map(String.init)
        }
    }

    static func readable(_ code: String) -> String { code.lowercased().replacingOccurrences(of: "_", with: " ") }

    static func httpClientReason(_ error: HTTPClientError) -> String {
        switch error {
        case .connectTimeout: return "connection timed out"
        case .tlsHandshakeTimeout: return "TLS handshake timed out"
        case .deadlineExceeded, .readTimeout: return "no answer within \(APIClient.requestTimeout.nanoseconds / 1_000_000_000)s"
        case .remoteConnectionClosed: return "the server closed the connection"
        case .invalidURL, .emptyHost, .emptyScheme: return "not a valid URL"
        default: return firstLine(error.shortDescription)
        }
    }

    static func errnoText(_ code: Int32) -> String {
        guard let text = strerror(code) else { return "error \(code)" }
        return String(cString: text).lowercased()
    }

    static func firstLine(_ text: String) -> String {
        let line = text.split(whereSeparator: \.isNewline).first.map(String.init) ?? text
        return line.count > 200 ? String(line.prefix(200)) + "…" : line
    }
}
