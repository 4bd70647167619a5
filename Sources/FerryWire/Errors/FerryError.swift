#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// An error an operator can act on: an opaque, stable code plus a message that says what went
/// wrong and, where it helps, what to do about it.
public struct FerryError: Error, Sendable, CustomStringConvertible, Equatable {
    /// Stable identifier of the kind of failure. Compare codes, never messages.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        public let rawValue: String
        public init(_ rawValue: String) { self.rawValue = rawValue }
        public var description: String { rawValue }

        public static let badRequest = Code("bad-request")
        public static let badConfiguration = Code("bad-configuration")
        public static let unauthenticated = Code("unauthenticated")
        public static let permissionDenied = Code("permission-denied")
        public static let notFound = Code("not-found")
        public static let conflict = Code("conflict")
        public static let unsupported = Code("unsupported")
        public static let internalError = Code("internal")
        public static let revoked = Code("revoked")
        public static let tokenInvalid = Code("token-invalid")
        public static let tokenExpired = Code("token-expired")
        public static let tokenUsed = Code("token-used")
        public static let tokenWrongHost = Code("token-wrong-host")
        public static let frameTooLarge = Code("frame-too-large")
        public static let protocolViolation = Code("protocol-violation")
        public static let timeout = Code("timeout")
        public static let pki = Code("pki")
        public static let io = Code("io")
        public static let unavailable = Code("unavailable")
        public static let databaseTooNew = Code("database-too-new")
        /// A hook an agent ran for a job failed or timed out.
        public static let hookFailed = Code("hook-failed")
        /// The volume was fenced for a failover: this host no longer owns it.
        public static let fenced = Code("fenced")
        /// Too many failed attempts from one address: refused for a while.
        public static let rateLimited = Code("rate-limited")
        /// A file system is full (ENOSPC, EDQUOT): a state that clears when space returns.
        public static let noSpace = Code("no-space")
    }

    public let code: Code
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { message }
}

extension FerryError {
    /// The protobuf error code for this error, for sending to a peer.
    public var wireCode: Ferry_V1_ErrorCode {
        switch code {
        case .badRequest, .badConfiguration: return .badRequest
        case .unauthenticated: return .unauthenticated
        case .permissionDenied, .fenced: return .permissionDenied
        case .notFound: return .notFound
        case .conflict: return .conflict
        case .unsupported: return .unsupported
        case .revoked: return .revoked
        case .tokenInvalid: return .tokenInvalid
        case .tokenExpired: return .tokenExpired
        case .tokenUsed: return .tokenUsed
        case .tokenWrongHost: return .tokenWrongHost
        case .frameTooLarge, .protocolViolation: return .protocolViolation
        case .timeout: return .timeout
        default: return .internal
        }
    }

    /// Rebuilds an error received from a peer.
    public init(wire: Ferry_V1_Error) {
        let code: Code
        switch wire.code {
        case .badRequest: code = .badRequest
        case .unauthenticated: code = .unauthenticated
        case .permissionDenied: code = .permissionDenied
        case .notFound: code = .notFound
        case .conflict: code = .conflict
        case .unsupported: code = .unsupported
        case .revoked: code = .revoked
        case .tokenInvalid: code = .tokenInvalid
        case .tokenExpired: code = .tokenExpired
        case .tokenUsed: code = .tokenUsed
        case .tokenWrongHost: code = .tokenWrongHost
        case .timeout: code = .timeout
        case .protocolViolation: code = .protocolViolation
        default: code = .internalError
        }
        self.init(code, wire.message)
    }

    /// This error as a protobuf message.
    public var wire: Ferry_V1_Error {
        var e = Ferry_V1_Error()
        e.code = wireCode
        e.message = message
        return e
    }
}

extension FerryError {
    /// A failed system call as an error: `.noSpace` for a full file system (or quota), so
    /// callers can treat it as a state to wait out; `.io` otherwise.
    public static func system(_ code: Int32, _ what: String) -> FerryError {
        let reason = String(cString: strerror(code))
        return FerryError(code == ENOSPC || code == EDQUOT ? .noSpace : .io, "\(what): \(reason)")
    }
}

/// Names of protected volumes: they appear in socket paths, URLs and tables.
public enum VolumeName {
    public static func isValid(_ name: String) -> Bool {
        (1...63).contains(name.count) && !name.hasPrefix(".")
            && name.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == "." || $0 == "_") }
    }
}
