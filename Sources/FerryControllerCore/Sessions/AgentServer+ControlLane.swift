import FerryWire
import Foundation
import Logging
import NIOCore

extension AgentServer {
    /// A host's control lane: a second connection of an admitted host that carries only
    /// consistency cuts. Its own socket buffers mean a cut's PREPARE and its answer never wait
    /// behind megabytes of replication data queued on the session (a saturated stream used to
    /// make cuts miss their hold budget). It keeps the small pre-authentication frame limit:
    /// cut messages are a few hundred bytes.
    func runControlLane(
        _ first: Ferry_V1_Envelope,
        hostID: String,
        hostName: String,
        serial: String,
        session: PeerSession,
        messages: inout NIOAsyncChannelInboundStream<ByteBuffer>.AsyncIterator,
        log: Logger
    ) async throws {
        let log = { var l = log; l[metadataKey: "lane"] = "control"; return l }()
        var welcome = Ferry_V1_Welcome()
        welcome.controllerVersion = FerryVersion.current
        welcome.hostID = hostID
        welcome.hostName = hostName
        welcome.heartbeatIntervalMs = UInt32(config.heartbeatInterval.seconds * 1000)
        welcome.maxFrameBytes = UInt32(FrameSize.unauthenticated)
        welcome.acceptsControlLane = true
        try await session.send(.welcome(welcome), inReplyTo: first.id)
        if let old = await registry.registerLane(hostID: hostID, session: session) {
            await old.close(reason: "replaced by a newer control lane of the same host")
        }
        // Revoked between the admission and the registration: the revocation found no lane to close.
        if let refused = await admissionWithdrawn(hostID: hostID, serial: serial) {
            await registry.unregisterLane(hostID: hostID, session: session)
            await session.close(reason: refused.message)
            return
        }
        log.debug("control lane open")
        do {
            try await session.run(inbound: &messages, heartbeatInterval: config.heartbeatInterval, logger: log) { envelope, _ in
                // Replies (the cut answers) are taken by the session itself; nothing else belongs here.
                throw FerryError(.protocolViolation, "a control lane carries only answers to cuts, not \(envelope.bodyName)")
            }
        } catch let error as FerryError {
            log.debug("control lane closed", metadata: ["reason": "\(error.message)"])
            if error.code == .protocolViolation || error.code == .frameTooLarge {
                await reject(session, error, reason: error.code == .frameTooLarge ? "frame-too-large" : "malformed", log: log)
            }
        } catch {
            log.debug("control lane ended", metadata: ["error": "\(error)"])
        }
        await registry.unregisterLane(hostID: hostID, session: session)
    }
}
