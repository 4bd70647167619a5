import FerryWire
import Foundation
import X509

/// What enrollment leaves in the agent's data dir: who the host is, where its controller is, its
/// key (0600), certificate and the CA it trusts.
public struct AgentIdentity: Sendable {
    public struct Info: Codable, Sendable {
        public var hostID: String
        public var hostName: String
        public var controller: String
    }

    public var info: Info
    public var certificate: Certificate
    public var privateKey: Certificate.PrivateKey
    public var ca: Certificate

    static func paths(_ dir: String) -> (info: String, cert: String, key: String, ca: String) {
        (dir + "/identity.json", dir + "/agent.pem", dir + "/agent.key", dir + "/ca.pem")
    }

    public static func exists(in dir: String) -> Bool {
        FileManager.default.fileExists(atPath: paths(dir).info)
    }

    public static func load(from dir: String) throws -> Self {
        let p = paths(dir)
        guard let data = FileManager.default.contents(atPath: p.info) else {
            throw FerryError(.badConfiguration, "\(dir) holds no enrollment; run 'ferry-agent enroll --controller HOST:PORT --token TOKEN --data-dir \(dir)' first")
        }
        let info = try JSONDecoder().decode(Info.self, from: data)
        try recoverInterruptedRenewal(p)
        let certificate = try PEMFiles.readCertificate(at: p.cert)
        let key = try PEMFiles.readPrivateKey(at: p.key)
        guard certificate.publicKey == key.publicKey else {
            throw FerryError(.pki, "\(p.key) does not match \(p.cert); re-enroll this host")
        }
        return Self(info: info, certificate: certificate, privateKey: key, ca: try PEMFiles.readCertificate(at: p.ca))
    }

    /// Writes everything; the key is never readable by anyone else.
    public func save(to dir: String) throws {
        let p = Self.paths(dir)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        try PEMFiles.writePublic(try PEMFiles.pem(ca), to: p.ca)
        try PEMFiles.writeSecret(try PEMFiles.pem(privateKey), to: p.key)
        try PEMFiles.writePublic(try PEMFiles.pem(certificate), to: p.cert)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        try PEMFiles.writePublic(String(decoding: try encoder.encode(info), as: UTF8.self) + "\n", to: p.info)
    }

    /// Stores a renewed certificate and its key. Both are written as `.new` first, then renamed
    /// certificate-first; `load` finishes an interrupted swap, so a crash never leaves a key that
    /// does not match its certificate.
    public func saveRenewal(to dir: String) throws {
        let p = Self.paths(dir)
        try PEMFiles.writeSecret(try PEMFiles.pem(privateKey), to: p.key + ".new")
        try PEMFiles.writePublic(try PEMFiles.pem(certificate), to: p.cert)
        guard rename(p.key + ".new", p.key) == 0 else {
            throw FerryError(.io, "cannot install renewed key \(p.key): \(String(cString: strerror(errno)))")
        }
    }

    static func recoverInterruptedRenewal(_ p: (info: String, cert: String, key: String, ca: String)) throws {
        guard FileManager.default.fileExists(atPath: p.key + ".new") else { return }
        let cert = try PEMFiles.readCertificate(at: p.cert)
        if let newKey = try? PEMFiles.readPrivateKey(at: p.key + ".new"), newKey.publicKey == cert.publicKey {
            rename(p.key + ".new", p.key)
        } else {
            unlink(p.key + ".new")
        }
    }

    /// When to ask for a new certificate: after two thirds of its lifetime.
    public var renewAt: Date {
        let start = certificate.notValidBefore.addingTimeInterval(CertificateAuthority.clockSkewAllowance)
        return start.addingTimeInterval(certificate.notValidAfter.timeIntervalSince(start) * 2 / 3)
    }
}
