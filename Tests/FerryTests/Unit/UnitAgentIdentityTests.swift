import Crypto
@testable import FerryAgentCore
import FerryWire
import Foundation
import Testing
import X509

@Suite("Unit AgentIdentity")
struct UnitAgentIdentityTests {
    static func makeIdentity(ca: CertificateAuthority, hostID: String = "0d9c2f54-unit", name: String = "web1") throws -> AgentIdentity {
        let request = try HostKeyRequest.make(name: name)
        let cert = try ca.issueHostCertificate(publicKey: request.privateKey.publicKey, hostID: hostID, hostName: name, validity: 3_000)
        return AgentIdentity(
            info: .init(hostID: hostID, hostName: name, controller: "127.0.0.1:7443"),
            certificate: cert,
            privateKey: request.privateKey,
            ca: ca.certificate
        )
    }

    /// The same host with a new key and certificate, as a renewal produces.
    static func renewed(_ identity: AgentIdentity, ca: CertificateAuthority) throws -> AgentIdentity {
        let request = try HostKeyRequest.make(name: identity.info.hostName)
        var next = identity
        next.privateKey = request.privateKey
        next.certificate = try ca.issueHostCertificate(publicKey: request.privateKey.publicKey, hostID: identity.info.hostID,
                                                       hostName: identity.info.hostName, validity: 3_000)
        return next
    }

    static func directoryEntries(_ dir: String) -> Set<String> {
        Set((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [])
    }

    @Test("save then load gives back the same identity")
    func roundTrip() async throws {
        try await withUnitTempDir { base in
            let dir = base + "/agent"
            #expect(!AgentIdentity.exists(in: dir))
            let ca = try CertificateAuthority.create()
            let identity = try Self.makeIdentity(ca: ca)
            try identity.save(to: dir)
            #expect(AgentIdentity.exists(in: dir))

            let loaded = try AgentIdentity.load(from: dir)
            #expect(loaded.info.hostID == identity.info.hostID)
            #expect(loaded.info.hostName == identity.info.hostName)
            #expect(loaded.info.controller == identity.info.controller)
            #expect(loaded.certificate == identity.certificate)
            #expect(loaded.privateKey.publicKey == identity.privateKey.publicKey)
            #expect(try PEMFiles.pem(loaded.privateKey) == PEMFiles.pem(identity.privateKey))
            #expect(loaded.ca == ca.certificate)
            #expect(Self.directoryEntries(dir) == ["identity.json", "agent.pem", "agent.key", "ca.pem"], "no temporary files left behind")
        }
    }

    @Test("the key file is 0600, the directory 0700, public files 0644")
    func fileModes() async throws {
        try await withUnitTempDir { base in
            let dir = base + "/agent"
            let identity = try Self.makeIdentity(ca: try CertificateAuthority.create())
            let saved = umask(0o022)
            defer { umask(saved) }
            try identity.save(to: dir)
            #expect(unitFileMode(dir + "/agent.key") == 0o600)
            #expect(unitFileMode(dir) == 0o700)
            #expect(unitFileMode(dir + "/agent.pem") == 0o644)
            #expect(unitFileMode(dir + "/ca.pem") == 0o644)

            // Saving again over existing files keeps the key private.
            try identity.save(to: dir)
            #expect(unitFileMode(dir + "/agent.key") == 0o600)
        }
    }

    @Test("load from a directory without an enrollment is bad-configuration")
    func loadEmptyDir() async throws {
        try await withUnitTempDir { dir in
            let error = #expect(throws: FerryError.self) { _ = try AgentIdentity.load(from: dir) }
            #expect(error?.code == .badConfiguration)
        }
    }

    @Test("load refuses a key that does not match the certificate")
    func loadMismatch() async throws {
        try await withUnitTempDir { dir in
            let identity = try Self.makeIdentity(ca: try CertificateAuthority.create())
            try identity.save(to: dir)
            try PEMFiles.writeSecret(try PEMFiles.pem(Certificate.PrivateKey(P256.Signing.PrivateKey())), to: dir + "/agent.key")
            let error = #expect(throws: FerryError.self) { _ = try AgentIdentity.load(from: dir) }
            #expect(error?.code == .pki)
        }
    }

    @Test("a completed saveRenewal loads the new pair")
    func renewalCompleted() async throws {
        try await withUnitTempDir { dir in
            let ca = try CertificateAuthority.create()
            let old = try Self.makeIdentity(ca: ca)
            try old.save(to: dir)
            let new = try Self.renewed(old, ca: ca)
            try new.saveRenewal(to: dir)
            let loaded = try AgentIdentity.load(from: dir)
            #expect(loaded.certificate == new.certificate)
            #expect(loaded.privateKey.publicKey == new.privateKey.publicKey)
            #expect(unitFileMode(dir + "/agent.key") == 0o600)
            #expect(!FileManager.default.fileExists(atPath: dir + "/agent.key.new"))
        }
    }

    @Test("crash after writing agent.key.new, before agent.pem: load drops the new key and keeps the old pair")
    func crashBeforeCertificateWritten() async throws {
        try await withUnitTempDir { dir in
            let ca = try CertificateAuthority.create()
            let old = try Self.makeIdentity(ca: ca)
            try old.save(to: dir)
            let new = try Self.renewed(old, ca: ca)
            // saveRenewal's first step only.
            try PEMFiles.writeSecret(try PEMFiles.pem(new.privateKey), to: dir + "/agent.key.new")

            let loaded = try AgentIdentity.load(from: dir)
            #expect(loaded.certificate == old.certificate)
            #expect(loaded.privateKey.publicKey == old.privateKey.publicKey)
            #expect(loaded.certificate.publicKey == loaded.privateKey.publicKey)
            #expect(!FileManager.default.fileExists(atPath: dir + "/agent.key.new"))
            // And again: recovery is done once, the second load sees a clean directory.
            #expect(try AgentIdentity.load(from: dir).certificate == old.certificate)
        }
    }

    @Test("crash after writing agent.key.new and agent.pem, before the rename: load installs the new key")
    func crashAfterCertificateWritten() async throws {
        try await withUnitTempDir { dir in
            let ca = try CertificateAuthority.create()
            let old = try Self.makeIdentity(ca: ca)
            try old.save(to: dir)
            let new = try Self.renewed(old, ca: ca)
            // saveRenewal's first two steps, not the final rename.
            try PEMFiles.writeSecret(try PEMFiles.pem(new.privateKey), to: dir + "/agent.key.new")
            try PEMFiles.writePublic(try PEMFiles.pem(new.certificate), to: dir + "/agent.pem")

            let loaded = try AgentIdentity.load(from: dir)
            #expect(loaded.certificate == new.certificate)
            #expect(loaded.privateKey.publicKey == new.privateKey.publicKey)
            #expect(!FileManager.default.fileExists(atPath: dir + "/agent.key.new"))
            #expect(unitFileMode(dir + "/agent.key") == 0o600)
            #expect(try PEMFiles.readPrivateKey(at: dir + "/agent.key").publicKey == new.privateKey.publicKey)
        }
    }

    @Test("a garbage agent.key.new left by a crash is discarded")
    func garbageNewKey() async throws {
        try await withUnitTempDir { dir in
            let ca = try CertificateAuthority.create()
            let old = try Self.makeIdentity(ca: ca)
            try old.save(to: dir)
            try PEMFiles.writeSecret("-----BEGIN PRIVATE KEY-----\ntruncated", to: dir + "/agent.key.new")
            let loaded = try AgentIdentity.load(from: dir)
            #expect(loaded.certificate == old.certificate)
            #expect(loaded.privateKey.publicKey == old.privateKey.publicKey)
            #expect(!FileManager.default.fileExists(atPath: dir + "/agent.key.new"))
        }
    }

    @Test("renewAt is two thirds into the certificate's lifetime")
    func renewAt() throws {
        let identity = try Self.makeIdentity(ca: try CertificateAuthority.create())
        // Issued now with validity 3000 s: renew 2000 s from now (certificate times have 1 s resolution).
        #expect(abs(identity.renewAt.timeIntervalSinceNow - 2_000) < 3)
    }
}
