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

    static func write(_ text: String, to path: String, mode: mode_t) throws {
        try AtomicFile.write(Array(text.utf8), to: path, mode: mode)
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
