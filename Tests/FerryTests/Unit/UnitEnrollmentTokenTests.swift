import Crypto
import FerryWire
import Foundation
import Testing

@Suite("Unit EnrollmentToken")
struct UnitEnrollmentTokenTests {
    static let fingerprint: [UInt8] = Array(SHA256.hash(data: Array("a CA certificate".utf8)))

    static func text(prefix: String = EnrollmentToken.prefix, fingerprint: [UInt8] = fingerprint, secret: [UInt8]) -> String {
        "\(prefix).\(Base64URL.encode(fingerprint)).\(Base64URL.encode(secret))"
    }

    @Test("generate -> description -> parse round-trips")
    func roundTrip() throws {
        for _ in 0..<20 {
            let token = EnrollmentToken.generate(caFingerprint: Self.fingerprint)
            #expect(token.secret.count == 32)
            let text = token.description
            #expect(text.hasPrefix("ferry1."))
            #expect(text.split(separator: ".", omittingEmptySubsequences: false).count == 3)
            #expect(!text.contains("=") && !text.contains("+") && !text.contains("/"))
            let parsed = try EnrollmentToken(parsing: text)
            #expect(parsed == token)
            #expect(parsed.caFingerprint == Self.fingerprint)
        }
    }

    @Test("two generated tokens differ")
    func generatedSecretsDiffer() {
        let a = EnrollmentToken.generate(caFingerprint: Self.fingerprint)
        let b = EnrollmentToken.generate(caFingerprint: Self.fingerprint)
        #expect(a.secret != b.secret)
        #expect(a.secretHash != b.secretHash)
    }

    @Test("surrounding whitespace and a trailing newline (token pasted or read from a file) are accepted")
    func whitespaceTolerated() throws {
        let token = EnrollmentToken.generate(caFingerprint: Self.fingerprint)
        #expect(try EnrollmentToken(parsing: "  \(token)\n") == token)
    }

    @Test("secret lengths 16 and 64 are the accepted bounds")
    func secretLengthBounds() throws {
        for n in [16, 17, 63, 64] {
            let secret = (0..<n).map { UInt8($0) }
            #expect(try EnrollmentToken(parsing: Self.text(secret: secret)).secret == secret)
        }
    }

    static let rejected: [String] = {
        let secret = (0..<32).map { UInt8($0 &* 7) }
        let good = text(secret: secret)
        let fp = Base64URL.encode(fingerprint)
        let sec = Base64URL.encode(secret)
        return [
            "",
            "ferry1",
            text(prefix: "ferry2", secret: secret),              // wrong prefix
            text(prefix: "FERRY1", secret: secret),              // prefix is case-sensitive
            text(prefix: "", secret: secret),                    // no prefix
            "ferry1.\(fp)",                                      // no secret
            good + ".extra",                                     // four parts
            "ferry1.\(fp).",                                     // empty secret
            "ferry1..\(sec)",                                    // empty fingerprint
            "ferry1.\(fp).!!!!!!!!!!!!!!!!!!!!!!!!",             // not base64 at all
            "ferry1.\(fp).\(Data(secret).base64EncodedString())+/=", // standard base64 alphabet and padding
            "ferry1.\(fp).AAAAAAAAAAAAAAAAAAAAAAAAA",            // 25 chars: no valid base64 length
            "ferry1.\(fp).\(sec.dropLast(2))é",                  // non-ASCII letter
            text(fingerprint: Array(fingerprint.dropLast()), secret: secret), // 31-byte fingerprint
            text(fingerprint: fingerprint + [0], secret: secret),           // 33-byte fingerprint
            text(fingerprint: [], secret: secret),
            text(secret: Array(secret.prefix(15))),              // secret too short
            text(secret: []),
            text(secret: Array(repeating: 1, count: 65)),        // secret too long
            good.replacingOccurrences(of: ".", with: ":"),
        ]
    }()

    @Test("malformed tokens are rejected with token-invalid", arguments: rejected)
    func rejects(text: String) {
        let error = #expect(throws: FerryError.self) { _ = try EnrollmentToken(parsing: text) }
        #expect(error?.code == .tokenInvalid)
    }

    @Test("secretHash is stable, hex SHA-256 of the secret, and never the secret itself")
    func secretHash() throws {
        let token = EnrollmentToken.generate(caFingerprint: Self.fingerprint)
        let hash = token.secretHash
        #expect(hash.count == 64)
        #expect(hash.allSatisfy { "0123456789abcdef".contains($0) })
        #expect(hash == token.secretHash)
        #expect(hash == (try EnrollmentToken(parsing: token.description)).secretHash)
        #expect(hash == EnrollmentToken.hash(secret: token.secret))
        #expect(hash == SHA256.hash(data: token.secret).map { String(format: "%02x", $0) }.joined())

        let secretHex = token.secret.map { String(format: "%02x", $0) }.joined()
        #expect(hash != secretHex)
        #expect(!hash.contains(secretHex))
        #expect(!hash.contains(Base64URL.encode(token.secret)))
        #expect(!token.description.contains(hash))

        // Looked up by secret only: the fingerprint does not change it.
        let other = EnrollmentToken(caFingerprint: Array(repeating: 0, count: 32), secret: token.secret)
        #expect(other.secretHash == hash)
    }

    @Test("known-answer secretHash")
    func secretHashKnownAnswer() {
        // SHA-256 of the empty string.
        #expect(EnrollmentToken.hash(secret: []) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(SecretHash.of("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    }

    @Test("Base64URL round-trips every length from 0 to 70")
    func base64URLRoundTrip() throws {
        for n in 0...70 {
            let bytes = (0..<n).map { _ in UInt8.random(in: .min ... .max) }
            let text = Base64URL.encode(bytes)
            #expect(!text.contains("=") && !text.contains("+") && !text.contains("/"))
            #expect(Base64URL.decode(text) == bytes)
        }
    }
}
