import FerryWire
import Foundation
import Logging
import NIOCore

extension AgentSession {
    /// Holds the session's control lane open for as long as the session lives: a second TLS
    /// connection that carries only consistency cuts. The session's socket may hold megabytes
    /// of replication data queued ahead of a cut's answer (and the workload's writes wait
    /// while a cut holds them); on its own connection the answer goes at once.
    ///
    /// A lane that fails is reopened with backoff; meanwhile the controller sends cuts on the
    /// session, so losing the lane costs latency, never a cut. Returns when cancelled (the
    /// session ended).
    func keepControlLane(address: String, heartbeat: Duration) async {
        var backoff = Backoff(initial: .milliseconds(200), maximum: config.reconnectMaxDelay)
        var log = logger
        log[metadataKey: "lane"] = "control"
        while !Task.isCancelled {
            do {
                // The host's current certificate (a renewal during the session counts from now).
                let identity = self.identity.withLock { $0 }
                try await runControlLane(address: address, identity: identity, heartbeat: heartbeat, log: log) { backoff.reset() }
            } catch {
                if Task.isCancelled { return }
                log.info("control lane lost; cuts go on the session until it is back", metadata: ["reason": "\(Self.describe(error))"])
            }
            try? await Task.sleep(for: backoff.next())
        }
    }

    private func runControlLane(address: String, identity id: AgentIdentity, heartbeat: Duration, log: Logger,
                                onWelcome: () -> Void) async throws {
        let connection = try await open(address, identity: id, frameLimit: FrameSize.unauthenticated)
        try await connection.executeThenClose { inbound, outbound in
            let lane = PeerSession(channel: connection.channel, outbound: outbound)
            // The session ending cancels this task: close the connection so the read below ends.
            try await withTaskCancellationHandler {
                var messages = inbound.makeAsyncIterator()
                var hello = Self.hello(id)
                hello.controlLane = true
                try await outbound.write(try Ferry_V1_Envelope.with(id: 1, .hello(hello)).frame(allocator: connection.channel.allocator))
                let frame = try await lane.withDeadline(.seconds(10)) { try await messages.next() }
                guard let frame else { throw FerryError(.unavailable, "controller \(address) closed the control lane before welcoming it") }
                let reply = try Ferry_V1_Envelope(frame: frame)
                switch reply.body {
                case .welcome: break
                case .error(let e): throw FerryError(wire: e)
                default: throw FerryError(.protocolViolation, "controller answered the control lane's hello with \(reply.bodyName)")
                }
                onWelcome()
                log.debug("control lane open")
                try await lane.run(inbound: &messages, heartbeatInterval: heartbeat, logger: log) { envelope, _ in
                    guard case .command(let command) = envelope.body else {
                        throw FerryError(.protocolViolation, "the control lane carries only cut commands, not \(envelope.bodyName)")
                    }
                    // Answered in line, in arrival order: a FINISH never overtakes its PREPARE.
                    try await lane.send(.commandResult(await self.answerCut(command)), inReplyTo: envelope.id)
                }
            } onCancel: {
                connection.channel.close(promise: nil)
            }
        }
    }
}
