import Crypto
import Foundation
import SwiftASN1
import X509

/// Reading and writing keys and certificates as PEM files.
public enum PEMFiles {
    public static func readCertificate(at path: String) throws -> Certificate {
        try readCertificates(at: path)[0]
    }

    /// All certificates in a PEM bundle, in file order.
    public static func readCertificates(at path: String) throws -> [Certificate] {
        let text = try readText(at: path, what: "certificate")
        do {
            let documents = try PEMDocument.parseMultiple(pemString: text)
            let certificates = try documents.filter { $0.discriminator == "CERTIFICATE" }.map { try Certificate(pemDocument: $0) }
            guard !certificates.isEmpty else { throw FerryError(.pki, "no CERTIFICATE block") }
            return certificates
        } catch let error as FerryError {
            throw FerryError(.pki, "\(path): \(error.message)")
        } catch {
            throw FerryError(.pki, "\(path) is not a PEM certificate: \(error)")
        }
    }

    public static func readPrivateKey(at path: String) throws -> Certificate.PrivateKey {
        let text = try readText(at: path, what: "private key")
        do {
            return try Certificate.PrivateKey(pemEncoded: text)
        } catch {
            throw FerryError(.pki, "\(path) is not a PEM private key (PKCS#8, SEC1 EC or PKCS#1 RSA): \(error)")
        }
    }

    public static func pem(_ certificate: Certificate) throws -> String {
        try certificate.serializeAsPEM().pemString + "\n"
    }

    public static func pem(_ key: Certificate.PrivateKey) throws -> String {
        try key.serializeAsPEM().pemString + "\n"
    }

    public static func der(_ certificate: Certificate) throws -> [UInt8] {
        var serializer = DER.Serializer()
        try serializer.serialize(certificate)
        return serializer.serializedBytes
    }

    /// Writes a secret (key, token) readable by its owner only, atomically.
    public static func writeSecret(_ text: String, to path: String) throws {
        try write(text, to: path, mode: 0o600)
    }

    public static func writePublic(_ text: String, to path: String) throws {
        try write(text, to: path, mode: 0o644)
    }

    /// Writes through a new temporary file created with the final mode (never an existing file or
    /// a symlink someone planted), so a secret is never readable by others even for a moment;
    /// then renames it into place and syncs the directory, so the rename survives a power loss.
    static func write(_ text: String, to path: String, mode: mode_t) throws {
        let tmp = path + ".tmp-\(getpid())"
        unlink(tmp)
        let fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode)
        guard fd >= 0 else { throw FerryError(.io, "cannot create \(tmp): \(String(cString: strerror(errno)))") }
        // The umask may have narrowed the mode; never widen a secret's, only set it exactly.
        fchmod(fd, mode)
        let bytes = Array(text.utf8)
        let failed = bytes.withUnsafeBytes { FileIO.writeAll(fd, $0, at: 0) }
        if failed != 0 {
            close(fd)
            unlink(tmp)
            throw FerryError(.io, "cannot write \(tmp): \(String(cString: strerror(failed)))")
        }
        let synced = fsync(fd) == 0
        let closed = close(fd) == 0
        guard synced, closed else {
            unlink(tmp)
            throw FerryError(.io, "cannot write \(tmp): \(String(cString: strerror(errno)))")
        }
        guard rename(tmp, path) == 0 else {
            throw FerryError(.io, "cannot rename \(tmp) to \(path): \(String(cString: strerror(errno)))")
        }
        let dir = open((path as NSString).deletingLastPathComponent.isEmpty ? "." : (path as NSString).deletingLastPathComponent, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dir >= 0 {
            fsync(dir)
            close(dir)
        }
    }

    static func readText(at path: String, what: String) throws -> String {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw FerryError(.io, "cannot read \(what) file \(path)")
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw FerryError(.pki, "\(path) is not a text PEM file")
        }
        return text
    }
}
