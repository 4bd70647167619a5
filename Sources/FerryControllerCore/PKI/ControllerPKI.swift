import Crypto
import FerryWire
import Foundation
import X509

/// The controller's key material: the CA (its own, made on first start, or the operator's), the
/// server certificate both listeners present, and helpers to sign agent certificates.
public struct ControllerPKI: Sendable {
    public let ca: CertificateAuthority
    public let caPath: String
    public let serverChain: [Certificate]
    public let serverKey: Certificate.PrivateKey

    /// Loads or creates everything under `config.dataDir`.
    public static func prepare(config: ControllerConfig) throws -> Self {
        let dir = config.dataDir
        let ca: CertificateAuthority
        let caPath: String
        if let certPath = config.caCert, let keyPath = config.caKey {
            ca = try CertificateAuthority.load(certificatePath: certPath, keyPath: keyPath)
            caPath = certPath
        } else {
            caPath = dir + "/ca.pem"
            let keyPath = dir + "/ca.key"
            if FileManager.default.fileExists(atPath: caPath) {
                ca = try CertificateAuthority.load(certificatePath: caPath, keyPath: keyPath)
            } else {
                ca = try CertificateAuthority.create()
                try PEMFiles.writeSecret(try PEMFiles.pem(ca.privateKey), to: keyPath)
                try PEMFiles.writePublic(try PEMFiles.pem(ca.certificate), to: caPath)
            }
        }

        if let certPath = config.serverCert, let keyPath = config.serverKey {
            let chain = try PEMFiles.readCertificates(at: certPath)
            let key = try PEMFiles.readPrivateKey(at: keyPath)
            guard chain[0].publicKey == key.publicKey else {
                throw FerryError(.pki, "\(keyPath) does not match the certificate in \(certPath)")
            }
            guard ca.verifyIssued(chain[0]) else {
                throw FerryError(.pki, "\(certPath) is not issued by the CA \(caPath) or is not valid now")
            }
            let names = (try? chain[0].extensions.subjectAlternativeNames) ?? SubjectAlternativeNames([])
            guard names.contains(.dnsName(ControllerIdentity.serverName)) else {
                throw FerryError(.pki, "\(certPath) lacks the DNS name '\(ControllerIdentity.serverName)' that agents check; reissue it with subjectAltName DNS:\(ControllerIdentity.serverName)")
            }
            return Self(ca: ca, caPath: caPath, serverChain: chain + [ca.certificate], serverKey: key)
        }

        // Our own server certificate: reissued on every start, so names and expiry are always current.
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        var dns = [ControllerIdentity.serverName, "localhost"]
        if let h = ProcessInfo.processInfo.hostName.split(separator: ".").first, !h.isEmpty { dns.append(String(h)) }
        dns += config.tlsNames
        var ips = ["127.0.0.1", "::1"] + config.tlsAddresses
        for listen in [config.listen, config.apiListen] {
            if let host = try? ConfigText.hostPort(listen).host, host != "0.0.0.0", host != "::", !ips.contains(host) {
                if IPAddressBytes.parse(host) != nil { ips.append(host) } else if !dns.contains(host) { dns.append(host) }
            }
        }
        let server = try ca.issueServerCertificate(publicKey: key.publicKey, dnsNames: dns, ipAddresses: ips, validity: 365 * 86_400)
        try PEMFiles.writeSecret(try PEMFiles.pem(key), to: dir + "/server.key")
        try PEMFiles.writePublic(try PEMFiles.pem(server), to: dir + "/server.pem")
        return Self(ca: ca, caPath: caPath, serverChain: [server, ca.certificate], serverKey: key)
    }

    /// Signs an agent certificate for a key proven by `csrDER`.
    public func issueAgentCertificate(csrDER: [UInt8], hostID: String, hostName: String, validity: Duration) throws -> IssuedCertificate {
        let publicKey = try HostKeyRequest.verifiedPublicKey(csrDER: csrDER)
        return IssuedCertificate(try ca.issueHostCertificate(publicKey: publicKey, hostID: hostID, hostName: hostName, validity: validity.seconds))
    }
}
