import Crypto
import Foundation

/// A one-time enrollment token: `ferry1.<CA fingerprint>.<secret>`, both parts base64url.
///
/// The secret authorises one enrollment; the fingerprint lets the agent authenticate the
/// controller on first contact, before it has any trust root. The controller stores only a
/// hash of the secret.
public struct EnrollmentToken: Sendable, Equatable, CustomStringConvertible {
    public static let prefix = "ferry1"

    public let caFingerprint: [UInt8]
    public let secret: [UInt8]

    public init(caFingerprint: [UInt8], secret: [UInt8]) {
        self.caFingerprint = caFingerprint
        self.secret = secret
    }

    /// A new token with 32 random bytes of secret.
    public static func generate(caFingerprint: [UInt8]) -> Self {
        var rng = SystemRandomNumberGenerator()
        return Self(caFingerprint: caFingerprint, secret: (0..<32).map { _ in UInt8.random(in: .min ... .max, using: &rng) })
    }

    public init(parsing text: String) throws {
        let parts = text.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, parts[0] == Self.prefix,
              let fingerprint = Base64URL.decode(String(parts[1])), fingerprint.count == 32,
              let secret = Base64URL.decode(String(parts[2])), secret.count >= 16, secret.count <= 64
        else {
            throw FerryError(.tokenInvalid, "not a Ferry enrollment token (expected ferry1.<fingerprint>.<secret>); create one with 'ferryctl token create'")
        }
        self.init(caFingerprint: fingerprint, secret: secret)
    }

    public var description: String {
        "\(Self.prefix).\(Base64URL.encode(caFingerprint)).\(Base64URL.encode(secret))"
    }

    /// What the controller stores and looks tokens up by.
    public var secretHash: String { Self.hash(secret: secret) }

    public static func hash(secret: [UInt8]) -> String {
        SHA256.hash(data: secret).map { String(format: "%02x", $0) }.joined()
    }
}

/// Hashing of bearer secrets (API tokens) for storage.
public enum SecretHash {
    public static func of(_ text: String) -> String {
        SHA256.hash(data: Array(text.utf8)).map { String(format: "%02x", $0) }.joined()
    }

    /// A random secret with a readable prefix, e.g. `fat_...` for API tokens.
    public static func randomToken(prefix: String, bytes: Int = 32) -> String {
        var rng = SystemRandomNumberGenerator()
        return prefix + Base64URL.encode((0..<bytes).map { _ in UInt8.random(in: .min ... .max, using: &rng) })
    }
}

public enum Base64URL {
    public static func encode(_ bytes: [UInt8]) -> String {
        Data(bytes).base64EncodedString()
            .replacingOccurrences(of: "+", with: "-")
            .replacingOccurrences(of: "/", with: "_")
            .replacingOccurrences(of: "=", with: "")
    }

    public static func decode(_ text: String) -> [UInt8]? {
        guard text.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" }), text.allSatisfy(\.isASCII) else { return nil }
        var s = text.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        while s.count % 4 != 0 { s += "=" }
        return Data(base64Encoded: s).map(Array.init)
    }
}
