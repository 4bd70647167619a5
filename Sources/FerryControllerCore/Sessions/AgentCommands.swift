import FerryWire

extension PeerSession {
    /// Sends a command to the agent and waits up to `timeout` for its result; an error the
    /// agent answers with is thrown. `what` names the command in messages.
    func command(_ what: String, timeout: Duration, _ fill: (inout Ferry_V1_Command) -> Void) async throws -> Ferry_V1_CommandResult {
        var command = Ferry_V1_Command()
        command.timeoutMs = UInt32(clamping: Int64(timeout.components.seconds) * 1000 + timeout.components.attoseconds / 1_000_000_000_000_000)
        fill(&command)
        let reply = try await request(.command(command), timeout: timeout)
        guard case .commandResult(let result) = reply.body else {
            throw FerryError(.protocolViolation, "\(remoteDescription) answered \(what) with \(reply.bodyName)")
        }
        if case .error(let e)? = result.outcome { throw FerryError(wire: e) }
        return result
    }
}
