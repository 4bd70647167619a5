import FerryWire
import Foundation

extension AgentServer {
    /// Has `host`'s agent protect a volume (creating its file when `spec.createSizeBytes` says
    /// so, within the host's protect-allow), then records it with an empty replica. A refusal of
    /// the path by the host is audited with who asked. Also says whether the agent created the
    /// file (empty) rather than finding one.
    func protectVolume(_ spec: Ferry_V1_VolumeSpec, host: HostRecord, session: PeerSession, captureMode: String, scanIntervalSeconds: Int,
                       actor: String) async throws -> (record: VolumeRecord, created: Bool) {
        let result: Ferry_V1_CommandResult
        do {
            result = try await session.command("protect", timeout: .seconds(30)) { $0.protectVolume.volume = spec }
        } catch let error as FerryError where error.code == .permissionDenied {
            // The host's protect-allow list refused the path: who tried which path is recorded.
            try await store.audit(actor: actor, action: "volume.protect-refused", target: "\(host.name)/\(spec.name)",
                                  detail: "path=\(spec.path): \(error.message)")
            throw error
        }
        switch result.outcome {
        case .volumeStatus(let status):
            try AgentInputChecks.check(status)
            let record = VolumeRecord(hostID: host.id, name: status.name, path: status.path, sizeBytes: Int64(status.sizeBytes),
                                      socketPath: status.socketPath, protectedAt: Date(), captureMode: captureMode,
                                      scanIntervalSeconds: Int64(scanIntervalSeconds))
            // The replica exists (sparse) from the start, so the first batch finds it.
            _ = try await replicas.replica(hostID: host.id, volume: record.name, size: status.sizeBytes)
            try await store.addVolume(record, hostName: host.name, actor: actor)
            // The agent holds the new volume's stream until the volume list names it: only now
            // does a batch of it find the volume recorded here.
            await syncVolumes(hostID: host.id, session: session, log: logger)
            return (record, status.createdEmpty)
        case .error(let e):
            throw FerryError(wire: e)
        default:
            throw FerryError(.protocolViolation, "agent answered protect without a volume status")
        }
    }
}
