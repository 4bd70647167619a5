import Crypto
import Foundation
import X509

/// A key made on the host plus the CSR that carries its public key to the controller.
public struct HostKeyRequest: Sendable {
    public let privateKey: Certificate.PrivateKey
    public let csrDER: [UInt8]

    /// Makes a fresh P-256 key and a CSR for it. The subject is a hint only.
    public static func make(name: String) throws -> Self {
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let csr = try CertificateSigningRequest(
            version: .v1,
            subject: try DistinguishedName { CommonName(name.isEmpty ? "ferry-agent" : name) },
            privateKey: key,
            attributes: .init()
        )
        var serializer = DER.Serializer()
        try serializer.serialize(csr)
        return Self(privateKey: key, csrDER: serializer.serializedBytes)
    }

    /// Parses a CSR received from the network and checks its self-signature, so the requester is
    /// known to hold the key it asks a certificate for.
    public static func verifiedPublicKey(csrDER: [UInt8]) throws -> Certificate.PublicKey {
        guard !csrDER.isEmpty, csrDER.count <= 8192 else {
            throw FerryError(.badRequest, "certificate request missing or larger than 8 KiB")
        }
        let csr: CertificateSigningRequest
        do {
            csr = try CertificateSigningRequest(derEncoded: csrDER)
        } catch {
            throw FerryError(.badRequest, "certificate request is not valid DER PKCS#10: \(error)")
        }
        guard csr.publicKey.isValidSignature(csr.signature, for: csr) else {
            throw FerryError(.badRequest, "certificate request signature does not match its key")
        }
        return csr.publicKey
    }
}

import SwiftASN1
