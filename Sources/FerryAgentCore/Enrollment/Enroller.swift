import FerryWire
import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import X509

/// First contact with a controller: proves the controller by the CA fingerprint in the token,
/// sends a CSR for a key made here, and stores what comes back.
public enum Enroller {
    public static func enroll(
        controller: String,
        token tokenText: String,
        requestedName: String?,
        hostname: String,
        dataDir: String,
        group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        logger: Logger
    ) async throws -> AgentIdentity {
        let token = try EnrollmentToken(parsing: tokenText)
        let request = try HostKeyRequest.make(name: requestedName ?? hostname)
        let connection = try await ControllerConnection.open(
            address: controller, tls: TLSSettings.enrollment(),
            pinnedCAFingerprint: token.caFingerprint,
            group: group, frameLimit: FrameLimit(FrameSize.unauthenticated)
        )
        let reply: Ferry_V1_Envelope = try await connection.executeThenClose { inbound, outbound in
            var req = Ferry_V1_EnrollRequest()
            req.token = tokenText.trimmingCharacters(in: .whitespacesAndNewlines)
            req.csrDer = Data(request.csrDER)
            req.requestedName = requestedName ?? ""
            req.hostname = hostname
            do {
                try await outbound.write(try Ferry_V1_Envelope.with(id: 1, .enrollRequest(req)).frame())
                var it = inbound.makeAsyncIterator()
                guard let frame = try await it.next() else {
                    throw FerryError(.unavailable, "controller \(controller) closed the connection without answering")
                }
                return try Ferry_V1_Envelope(frame: frame)
            } catch let error as NIOSSLError {
                throw FerryError(.pki, "controller \(controller) failed verification against the CA fingerprint in the token (\(error)); check the address and the token")
            } catch let error as ChannelError {
                // Closed before it answered: its pre-authentication timeout or limits, or a restart.
                throw FerryError(.unavailable, "controller \(controller) closed the connection before answering the enrollment (\(error)); try again, and check its log for a connection limit or timeout")
            }
        }
        switch reply.body {
        case .enrollResponse(let response):
            let certificate = try Certificate(derEncoded: Array(response.certificateDer))
            let ca = try Certificate(derEncoded: Array(response.caCertificateDer))
            guard CertificateAuthority.fingerprint(of: ca) == token.caFingerprint,
                  CertificateAuthority.verify(certificate, issuedBy: ca),
                  certificate.publicKey == request.privateKey.publicKey,
                  HostIdentity.hostID(of: certificate) == response.hostID
            else {
                throw FerryError(.pki, "controller returned a certificate that does not match this request or the pinned CA")
            }
            let identity = AgentIdentity(
                info: .init(hostID: response.hostID, hostName: response.hostName, controller: controller),
                certificate: certificate, privateKey: request.privateKey, ca: ca
            )
            try identity.save(to: dataDir)
            logger.info("enrolled", metadata: ["host": "\(response.hostName)", "host-id": "\(response.hostID)"])
            return identity
        case .error(let e):
            throw FerryError(wire: e)
        default:
            throw FerryError(.protocolViolation, "controller answered enrollment with \(reply.bodyName)")
        }
    }
}
