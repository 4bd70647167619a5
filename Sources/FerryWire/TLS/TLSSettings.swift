import Foundation
import NIOCore
import NIOSSL
import SwiftASN1
import X509

/// TLS settings for every Ferry connection: TLS 1.3 only, the cluster CA as the only trust root.
public enum TLSSettings {
    /// How long a close waits for the peer's close_notify. NIOSSL's default of 5 s would hold a
    /// dead peer's connection (and its registry entry) open long after it was declared dead.
    public static let closeNotifyTimeout: TimeAmount = .milliseconds(300)

    /// The controller's agent listener. Client certificates are optional at the TLS layer so an
    /// agent without one can enroll; such a connection may send nothing but an enrollment request.
    /// A presented certificate must chain to the cluster CA and be in its validity period.
    public static func agentListener(chain: [Certificate], key: Certificate.PrivateKey, ca: Certificate) throws -> TLSConfiguration {
        var config = TLSConfiguration.makeServerConfiguration(
            certificateChain: try chain.map { .certificate(try nio($0)) },
            privateKey: .privateKey(try nio(key))
        )
        config.minimumTLSVersion = .tlsv13
        config.shutdownTimeout = closeNotifyTimeout
        config.certificateVerification = .optionalVerification
        config.trustRoots = .certificates([try nio(ca)])
        return config
    }

    /// The operator API listener (server authentication only; bearer tokens authenticate callers).
    public static func apiListener(chain: [Certificate], key: Certificate.PrivateKey) throws -> TLSConfiguration {
        var config = TLSConfiguration.makeServerConfiguration(
            certificateChain: try chain.map { .certificate(try nio($0)) },
            privateKey: .privateKey(try nio(key))
        )
        config.minimumTLSVersion = .tlsv13
        config.shutdownTimeout = closeNotifyTimeout
        return config
    }

    /// An enrolled agent's session: it presents its certificate and trusts only the cluster CA.
    public static func agentSession(certificate: Certificate, key: Certificate.PrivateKey, ca: Certificate) throws -> TLSConfiguration {
        var config = TLSConfiguration.makeClientConfiguration()
        config.minimumTLSVersion = .tlsv13
        config.shutdownTimeout = closeNotifyTimeout
        config.certificateVerification = .fullVerification
        config.trustRoots = .certificates([try nio(ca)])
        config.certificateChain = [.certificate(try nio(certificate))]
        config.privateKey = .privateKey(try nio(key))
        return config
    }

    /// An agent enrolling: it has no trust root yet, only the CA fingerprint from its token. Use
    /// with `pinnedVerification(fingerprint:)` as the handler's custom verification callback.
    public static func enrollment() -> TLSConfiguration {
        var config = TLSConfiguration.makeClientConfiguration()
        config.minimumTLSVersion = .tlsv13
        config.shutdownTimeout = closeNotifyTimeout
        // Verification mode must not be none, or the custom callback is never called.
        config.certificateVerification = .fullVerification
        config.trustRoots = .certificates([])
        return config
    }

    /// Accepts the controller only if the chain it presents contains the CA whose SHA-256 matches
    /// `fingerprint`, the leaf is signed by that CA, is valid now and names the controller.
    public static func pinnedVerification(fingerprint: [UInt8]) -> NIOSSLCustomVerificationCallback {
        { presented, promise in
            promise.succeed(verifyPinned(presented: presented, fingerprint: fingerprint) ? .certificateVerified : .failed)
        }
    }

    static func verifyPinned(presented: [NIOSSLCertificate], fingerprint: [UInt8]) -> Bool {
        let parsed = presented.compactMap { try? Certificate(derEncoded: try $0.toDERBytes()) }
        guard parsed.count == presented.count, let leaf = parsed.first,
              let ca = parsed.first(where: { CertificateAuthority.fingerprint(of: $0) == fingerprint }),
              CertificateAuthority.verify(leaf, issuedBy: ca),
              let sans = try? leaf.extensions.subjectAlternativeNames,
              sans.contains(where: { if case .dnsName(ControllerIdentity.serverName) = $0 { return true } else { return false } })
        else { return false }
        return true
    }

    public static func nio(_ certificate: Certificate) throws -> NIOSSLCertificate {
        try NIOSSLCertificate(bytes: try PEMFiles.der(certificate), format: .der)
    }

    public static func nio(_ key: Certificate.PrivateKey) throws -> NIOSSLPrivateKey {
        let pem = try PEMFiles.pem(key)
        return try NIOSSLPrivateKey(bytes: Array(pem.utf8), format: .pem)
    }

    /// The peer's leaf certificate on a channel whose TLS handshake has completed (for example
    /// once a first frame has arrived).
    public static func peerCertificate(of channel: any Channel) async throws -> Certificate? {
        guard let nioCert = try await channel.nioSSL_peerCertificate().get() else { return nil }
        return try Certificate(derEncoded: try nioCert.toDERBytes())
    }
}
