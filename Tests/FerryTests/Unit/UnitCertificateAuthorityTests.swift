import Crypto
import FerryWire
import Foundation
import SwiftASN1
import Testing
import X509

@Suite("Unit CertificateAuthority")
struct UnitCertificateAuthorityTests {
    static func der(_ certificate: Certificate) throws -> [UInt8] {
        var serializer = DER.Serializer()
        try serializer.serialize(certificate)
        return serializer.serializedBytes
    }

    static func contains(_ haystack: [UInt8], _ needle: [UInt8]) -> Bool {
        guard !needle.isEmpty, haystack.count >= needle.count else { return false }
        for i in 0...(haystack.count - needle.count) where haystack[i..<(i + needle.count)].elementsEqual(needle) {
            return true
        }
        return false
    }

    @Test("a new CA is a self-signed CA with a 32-byte fingerprint")
    func createCA() throws {
        let ca = try CertificateAuthority.create(commonName: "Unit CA")
        #expect(ca.certificate.subject == ca.certificate.issuer)
        #expect(ca.certificate.publicKey == ca.privateKey.publicKey)
        #expect(ca.certificate.publicKey.isValidSignature(ca.certificate.signature, for: ca.certificate))
        guard case .isCertificateAuthority = try #require(try ca.certificate.extensions.basicConstraints) else {
            Issue.record("CA certificate is not CA:TRUE")
            return
        }
        #expect(ca.fingerprint.count == 32)
        #expect(ca.fingerprint == CertificateAuthority.fingerprint(of: ca.certificate))
        #expect(ca.fingerprint == Array(SHA256.hash(data: try Self.der(ca.certificate))))
        #expect(try CertificateAuthority.create().fingerprint != ca.fingerprint)
    }

    @Test("a host certificate carries the host id from the arguments, never the CSR subject")
    func hostCertificateIdentity() throws {
        let ca = try CertificateAuthority.create()
        let request = try HostKeyRequest.make(name: "evil-admin-name")
        let key = try HostKeyRequest.verifiedPublicKey(csrDER: request.csrDER)
        #expect(key == request.privateKey.publicKey)

        let now = Date()
        let cert = try ca.issueHostCertificate(publicKey: key, hostID: "3f0c6a8e-host", hostName: "web1", validity: 3_600, now: now)
        #expect(HostIdentity.hostID(of: cert) == "3f0c6a8e-host")
        #expect(cert.publicKey == request.privateKey.publicKey)
        #expect(cert.issuer == ca.certificate.subject)
        #expect(String(describing: cert.subject).contains("CN=web1"))
        #expect(!Self.contains(try Self.der(cert), Array("evil-admin-name".utf8)))
        #expect(ca.verifyIssued(cert))
        #expect(CertificateAuthority.verify(cert, issuedBy: ca.certificate))

        // Not a CA, client auth only, valid from a minute before issue.
        #expect(try cert.extensions.basicConstraints == .notCertificateAuthority)
        let eku = try #require(try cert.extensions.extendedKeyUsage)
        #expect(eku.contains(.clientAuth))
        #expect(!eku.contains(.serverAuth))
        #expect(abs(cert.notValidBefore.timeIntervalSince(now) + CertificateAuthority.clockSkewAllowance) < 2)
        #expect(abs(cert.notValidAfter.timeIntervalSince(now) - 3_600) < 2)

        // Two certificates never share a serial.
        let second = try ca.issueHostCertificate(publicKey: key, hostID: "3f0c6a8e-host", hostName: "web1", validity: 3_600)
        #expect(HostIdentity.serialString(second) != HostIdentity.serialString(cert))
        #expect(HostIdentity.serialString(cert).allSatisfy { "0123456789abcdef".contains($0) })
    }

    @Test("hostID(of:) is nil without a ferry URI SAN or with an empty id")
    func hostIDAbsent() throws {
        let ca = try CertificateAuthority.create()
        #expect(HostIdentity.hostID(of: ca.certificate) == nil)
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey()).publicKey
        let subject = try DistinguishedName { CommonName("x") }
        for uri in ["https://host/abc", HostIdentity.uriPrefix] {
            let cert = try ca.issue(
                publicKey: key, subject: subject, notBefore: Date(), notAfter: Date().addingTimeInterval(60),
                extensions: try Certificate.Extensions { SubjectAlternativeNames([.uniformResourceIdentifier(uri)]) }
            )
            #expect(HostIdentity.hostID(of: cert) == nil, "SAN \(uri)")
        }
    }

    @Test("verify is false for a certificate of another CA, even one with the same name")
    func verifyOtherCA() throws {
        let ca = try CertificateAuthority.create()
        let sameName = try CertificateAuthority.create()          // also "Ferry CA"
        let otherName = try CertificateAuthority.create(commonName: "Someone else")
        #expect(ca.certificate.subject == sameName.certificate.subject)
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey()).publicKey
        let cert = try ca.issueHostCertificate(publicKey: key, hostID: "h1", hostName: "h1", validity: 3_600)
        #expect(CertificateAuthority.verify(cert, issuedBy: ca.certificate))
        #expect(!CertificateAuthority.verify(cert, issuedBy: sameName.certificate))
        #expect(!CertificateAuthority.verify(cert, issuedBy: otherName.certificate))
        #expect(!sameName.verifyIssued(cert))

        let foreign = try sameName.issueHostCertificate(publicKey: key, hostID: "h1", hostName: "h1", validity: 3_600)
        #expect(!ca.verifyIssued(foreign))
    }

    @Test("verify is false for an expired or a not-yet-valid certificate, true inside its validity")
    func verifyValidity() throws {
        let ca = try CertificateAuthority.create()
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey()).publicKey
        let now = Date()

        let expired = try ca.issueHostCertificate(publicKey: key, hostID: "h", hostName: "h", validity: 3_600,
                                                  now: now.addingTimeInterval(-7_200))
        #expect(!ca.verifyIssued(expired, now: now))
        #expect(ca.verifyIssued(expired, now: now.addingTimeInterval(-5_000)))

        let future = try ca.issueHostCertificate(publicKey: key, hostID: "h", hostName: "h", validity: 3_600,
                                                 now: now.addingTimeInterval(86_400))
        #expect(!ca.verifyIssued(future, now: now))
        #expect(ca.verifyIssued(future, now: now.addingTimeInterval(86_400)))

        // The clock-skew allowance: valid for a peer whose clock is 30 s behind, not 5 minutes behind.
        let fresh = try ca.issueHostCertificate(publicKey: key, hostID: "h", hostName: "h", validity: 3_600, now: now)
        #expect(ca.verifyIssued(fresh, now: now.addingTimeInterval(-30)))
        #expect(!ca.verifyIssued(fresh, now: now.addingTimeInterval(-300)))
        #expect(!ca.verifyIssued(fresh, now: now.addingTimeInterval(3_700)))
    }

    @Test("a certificate whose signature was tampered with does not verify")
    func verifyTamperedCertificate() throws {
        let ca = try CertificateAuthority.create()
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey()).publicKey
        let cert = try ca.issueHostCertificate(publicKey: key, hostID: "h", hostName: "h", validity: 3_600)
        var bytes = try Self.der(cert)
        bytes[bytes.count - 1] ^= 0x01
        let tampered = try Certificate(derEncoded: bytes)
        #expect(!ca.verifyIssued(tampered))
    }

    // MARK: HostKeyRequest

    @Test("verifiedPublicKey rejects empty and garbage input", arguments: [[], [0x30], [0x30, 0x03, 0x02, 0x01, 0x00], Array("-----BEGIN CERTIFICATE REQUEST-----".utf8)] as [[UInt8]])
    func csrGarbage(bytes: [UInt8]) {
        let error = #expect(throws: FerryError.self) { _ = try HostKeyRequest.verifiedPublicKey(csrDER: bytes) }
        #expect(error?.code == .badRequest)
    }

    @Test("verifiedPublicKey rejects a well-formed, correctly signed CSR over 8 KiB")
    func csrOversized() throws {
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let csr = try CertificateSigningRequest(
            version: .v1,
            subject: try DistinguishedName { CommonName(String(repeating: "a", count: 9_000)) },
            privateKey: key,
            attributes: .init()
        )
        var serializer = DER.Serializer()
        try serializer.serialize(csr)
        let bytes = serializer.serializedBytes
        #expect(bytes.count > 8_192)
        // The CSR itself is fine: only its size can be the reason for the refusal.
        let parsed = try CertificateSigningRequest(derEncoded: bytes)
        #expect(parsed.publicKey.isValidSignature(parsed.signature, for: parsed))

        let error = #expect(throws: FerryError.self) { _ = try HostKeyRequest.verifiedPublicKey(csrDER: bytes) }
        #expect(error?.code == .badRequest)
        // Same for garbage just over the limit.
        #expect(throws: FerryError.self) { _ = try HostKeyRequest.verifiedPublicKey(csrDER: Array(repeating: 0x30, count: 8_193)) }
    }

    @Test("verifiedPublicKey rejects a CSR whose signature does not match (signature byte or signed subject tampered)")
    func csrTampered() throws {
        let request = try HostKeyRequest.make(name: "agent-zz")
        #expect(try HostKeyRequest.verifiedPublicKey(csrDER: request.csrDER) == request.privateKey.publicKey)

        var badSignature = request.csrDER
        badSignature[badSignature.count - 1] ^= 0x01

        var badSubject = request.csrDER
        let name = Array("agent-zz".utf8)
        let at = try #require((0...(badSubject.count - name.count)).first { badSubject[$0..<($0 + name.count)].elementsEqual(name) })
        badSubject[at + name.count - 1] = UInt8(ascii: "y")

        for tampered in [badSignature, badSubject] {
            // Still a parseable CSR: the refusal is the signature check.
            _ = try CertificateSigningRequest(derEncoded: tampered)
            let error = #expect(throws: FerryError.self) { _ = try HostKeyRequest.verifiedPublicKey(csrDER: tampered) }
            #expect(error?.code == .badRequest)
        }
    }

    @Test("make() with an empty name still produces a valid CSR")
    func csrEmptyName() throws {
        let request = try HostKeyRequest.make(name: "")
        #expect(try HostKeyRequest.verifiedPublicKey(csrDER: request.csrDER) == request.privateKey.publicKey)
    }

    // MARK: init

    @Test("init accepts a matching CA pair")
    func initAccepts() throws {
        let ca = try CertificateAuthority.create()
        let again = try CertificateAuthority(certificate: ca.certificate, privateKey: ca.privateKey)
        #expect(again.fingerprint == ca.fingerprint)
    }

    @Test("init rejects a key that does not match the certificate")
    func initRejectsWrongKey() throws {
        let ca = try CertificateAuthority.create()
        let error = #expect(throws: FerryError.self) {
            _ = try CertificateAuthority(certificate: ca.certificate, privateKey: Certificate.PrivateKey(P256.Signing.PrivateKey()))
        }
        #expect(error?.code == .pki)
        let other = try CertificateAuthority.create()
        #expect(throws: FerryError.self) { _ = try CertificateAuthority(certificate: ca.certificate, privateKey: other.privateKey) }
    }

    @Test("init rejects a non-CA certificate, with its own matching key")
    func initRejectsLeaf() throws {
        let ca = try CertificateAuthority.create()
        let request = try HostKeyRequest.make(name: "leaf")
        let leaf = try ca.issueHostCertificate(publicKey: request.privateKey.publicKey, hostID: "h", hostName: "leaf", validity: 3_600)
        let error = #expect(throws: FerryError.self) { _ = try CertificateAuthority(certificate: leaf, privateKey: request.privateKey) }
        #expect(error?.code == .pki)
    }

    @Test("init rejects a certificate without basicConstraints")
    func initRejectsNoBasicConstraints() throws {
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let name = try DistinguishedName { CommonName("no constraints") }
        let cert = try Certificate(
            version: .v3, serialNumber: .init(), publicKey: key.publicKey,
            notValidBefore: Date(), notValidAfter: Date().addingTimeInterval(3_600),
            issuer: name, subject: name, signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions { KeyUsage(keyCertSign: true) },
            issuerPrivateKey: key
        )
        let error = #expect(throws: FerryError.self) { _ = try CertificateAuthority(certificate: cert, privateKey: key) }
        #expect(error?.code == .pki)
    }

    @Test("a CA saved as PEM files loads back identical")
    func loadFromPEM() async throws {
        try await withUnitTempDir { dir in
            let ca = try CertificateAuthority.create()
            try PEMFiles.writePublic(try PEMFiles.pem(ca.certificate), to: dir + "/ca.pem")
            try PEMFiles.writeSecret(try PEMFiles.pem(ca.privateKey), to: dir + "/ca.key")
            #expect(unitFileMode(dir + "/ca.key") == 0o600)
            let loaded = try CertificateAuthority.load(certificatePath: dir + "/ca.pem", keyPath: dir + "/ca.key")
            #expect(loaded.certificate == ca.certificate)
            #expect(loaded.fingerprint == ca.fingerprint)
            #expect(loaded.privateKey.publicKey == ca.privateKey.publicKey)

            // A key from another CA next to this certificate is refused.
            try PEMFiles.writeSecret(try PEMFiles.pem(try CertificateAuthority.create().privateKey), to: dir + "/other.key")
            let error = #expect(throws: FerryError.self) {
                _ = try CertificateAuthority.load(certificatePath: dir + "/ca.pem", keyPath: dir + "/other.key")
            }
            #expect(error?.code == .pki)
        }
    }
}
