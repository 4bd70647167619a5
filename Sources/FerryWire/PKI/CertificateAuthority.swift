import Crypto
import Foundation
import SwiftASN1
import X509

/// The cluster CA: issues agent and controller certificates.
///
/// Either created by the controller on first start (ECDSA P-256), or an operator's CA loaded from
/// PEM files (e.g. made with the `openssl` command line; EC or RSA keys).
public struct CertificateAuthority: Sendable {
    public let certificate: Certificate
    public let privateKey: Certificate.PrivateKey

    /// Certificates start this long before they are issued, so a peer whose clock runs a little
    /// behind still accepts them.
    public static let clockSkewAllowance: TimeInterval = 60

    public init(certificate: Certificate, privateKey: Certificate.PrivateKey) throws {
        guard certificate.publicKey == privateKey.publicKey else {
            throw FerryError(.pki, "the CA key does not match the CA certificate")
        }
        if let constraints = try? certificate.extensions.basicConstraints {
            guard case .isCertificateAuthority = constraints else {
                throw FerryError(.pki, "the CA certificate is not a CA (basicConstraints CA:FALSE)")
            }
        } else {
            throw FerryError(.pki, "the CA certificate has no basicConstraints extension; it must be CA:TRUE")
        }
        self.certificate = certificate
        self.privateKey = privateKey
    }

    /// Makes a new self-signed CA with a fresh P-256 key.
    public static func create(commonName: String = "Ferry CA", validity: TimeInterval = 10 * 365 * 86_400) throws -> Self {
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let name = try DistinguishedName {
            OrganizationName("Ferry")
            CommonName(commonName)
        }
        let now = Date()
        let certificate = try Certificate(
            version: .v3,
            serialNumber: .init(),
            publicKey: key.publicKey,
            notValidBefore: now.addingTimeInterval(-Self.clockSkewAllowance),
            notValidAfter: now.addingTimeInterval(validity),
            issuer: name,
            subject: name,
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 0))
                Critical(KeyUsage(keyCertSign: true, cRLSign: true))
                SubjectKeyIdentifier(hash: key.publicKey)
            },
            issuerPrivateKey: key
        )
        return try Self(certificate: certificate, privateKey: key)
    }

    /// Loads a CA from PEM files.
    public static func load(certificatePath: String, keyPath: String) throws -> Self {
        let certificate = try PEMFiles.readCertificate(at: certificatePath)
        let key = try PEMFiles.readPrivateKey(at: keyPath)
        return try Self(certificate: certificate, privateKey: key)
    }

    /// SHA-256 of the CA certificate's DER encoding: what enrollment tokens pin.
    public var fingerprint: [UInt8] { Self.fingerprint(of: certificate) }

    public static func fingerprint(of certificate: Certificate) -> [UInt8] {
        var serializer = DER.Serializer()
        // Serializing a parsed certificate cannot fail.
        try! serializer.serialize(certificate)
        return Array(SHA256.hash(data: serializer.serializedBytes))
    }

    /// Issues an agent certificate. The identity comes from the arguments, never from the CSR.
    public func issueHostCertificate(
        publicKey: Certificate.PublicKey,
        hostID: String,
        hostName: String,
        validity: TimeInterval,
        now: Date = Date()
    ) throws -> Certificate {
        let subject = try DistinguishedName {
            OrganizationName("Ferry")
            OrganizationalUnitName("agents")
            CommonName(hostName)
        }
        return try issue(
            publicKey: publicKey,
            subject: subject,
            notBefore: now.addingTimeInterval(-Self.clockSkewAllowance),
            notAfter: now.addingTimeInterval(validity),
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(digitalSignature: true))
                try ExtendedKeyUsage([.clientAuth])
                SubjectAlternativeNames([.uniformResourceIdentifier(HostIdentity.uri(hostID: hostID))])
            }
        )
    }

    /// Issues the controller's TLS server certificate.
    public func issueServerCertificate(
        publicKey: Certificate.PublicKey,
        dnsNames: [String],
        ipAddresses: [String],
        validity: TimeInterval,
        now: Date = Date()
    ) throws -> Certificate {
        var names: [GeneralName] = dnsNames.map { .dnsName($0) }
        for ip in ipAddresses {
            guard let bytes = IPAddressBytes.parse(ip) else {
                throw FerryError(.badConfiguration, "'\(ip)' is not an IP address")
            }
            names.append(.ipAddress(ASN1OctetString(contentBytes: ArraySlice(bytes))))
        }
        let subject = try DistinguishedName {
            OrganizationName("Ferry")
            CommonName(ControllerIdentity.serverName)
        }
        return try issue(
            publicKey: publicKey,
            subject: subject,
            notBefore: now.addingTimeInterval(-Self.clockSkewAllowance),
            notAfter: now.addingTimeInterval(validity),
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(digitalSignature: true))
                try ExtendedKeyUsage([.serverAuth])
                SubjectAlternativeNames(names)
            }
        )
    }

    /// Issues a certificate with arbitrary validity; tests use it for expired certificates.
    public func issue(
        publicKey: Certificate.PublicKey,
        subject: DistinguishedName,
        notBefore: Date,
        notAfter: Date,
        extensions: Certificate.Extensions
    ) throws -> Certificate {
        try Certificate(
            version: .v3,
            serialNumber: .init(),
            publicKey: publicKey,
            notValidBefore: notBefore,
            notValidAfter: notAfter,
            issuer: certificate.subject,
            subject: subject,
            extensions: extensions,
            issuerPrivateKey: privateKey
        )
    }

    /// Checks that `certificate` was signed by this CA and is within its validity period.
    public func verifyIssued(_ certificate: Certificate, now: Date = Date()) -> Bool {
        Self.verify(certificate, issuedBy: self.certificate, now: now)
    }

    public static func verify(_ certificate: Certificate, issuedBy ca: Certificate, now: Date = Date()) -> Bool {
        guard certificate.issuer == ca.subject,
              ca.publicKey.isValidSignature(certificate.signature, for: certificate),
              certificate.notValidBefore <= now, now <= certificate.notValidAfter
        else { return false }
        return true
    }
}

/// Names that tie a certificate to a Ferry host.
public enum HostIdentity {
    public static let uriPrefix = "ferry://host/"

    public static func uri(hostID: String) -> String { uriPrefix + hostID }

    /// The host id in a certificate's URI SAN, or nil if it carries none.
    public static func hostID(of certificate: Certificate) -> String? {
        guard let sans = try? certificate.extensions.subjectAlternativeNames else { return nil }
        for name in sans {
            if case .uniformResourceIdentifier(let uri) = name, uri.hasPrefix(uriPrefix) {
                let id = String(uri.dropFirst(uriPrefix.count))
                return id.isEmpty ? nil : id
            }
        }
        return nil
    }

    /// A certificate serial as lower-case hex, the form stored and displayed.
    public static func serialString(_ certificate: Certificate) -> String {
        certificate.serialNumber.bytes.map { String(format: "%02x", $0) }.joined()
    }
}

/// The controller's identity as agents verify it.
public enum ControllerIdentity {
    /// DNS name every controller server certificate carries; agents check it whatever address
    /// they dial. An operator-supplied server certificate must include it as a DNS SAN.
    public static let serverName = "ferry-controller"
}

public enum IPAddressBytes {
    public static func parse(_ text: String) -> [UInt8]? {
        var v4 = in_addr()
        if inet_pton(AF_INET, text, &v4) == 1 {
            return withUnsafeBytes(of: &v4) { Array($0) }
        }
        var v6 = in6_addr()
        if inet_pton(AF_INET6, text, &v6) == 1 {
            return withUnsafeBytes(of: &v6) { Array($0) }
        }
        return nil
    }
}
