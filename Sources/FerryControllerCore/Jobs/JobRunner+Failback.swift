import FerryWire
import Foundation

/// Failback of a failover that landed: a planned failover in reverse. The recovered volumes are
/// stopped, fenced and drained into their replicas here; each original volume (a sink that has
/// followed its recovered volume's journal in write order) catches up to the last record and is
/// proved equal block by block; then the sources own their volumes again.
extension JobRunner {
    /// The plan's recovered volumes that landed, as volumes of their recovery hosts.
    func landedVolumes(_ plan: RecoveryPlan) async throws -> [SourceVolume] {
        var out: [SourceVolume] = []
        for record in try await store.recoveries(plan: plan.name) where record.purpose == "failover" {
            let id = try await hostID(record.recoveryHost)
            for v in record.volumes where v.hydrate == true {
                out.append(SourceVolume(hostID: id, host: record.recoveryHost, volume: v.localName, size: v.size))
            }
        }
        return out
    }

    /// The recovered volumes are fenced and drained: their replicas hold every write they took.
    /// Each sink follows on to the replica's last record; the proof is then a comparison of every
    /// block of the sink with the replica at that record that finds none differing.
    func finalLandedReverse(_ id: String, plan: RecoveryPlan, sinks: [ReverseStreams.LandedSink]) async throws -> String {
        // Running already, unless the controller restarted meanwhile.
        await reverse.start(plan: plan, fullPassFirst: false)
        var last: [String: ReplicaPosition] = [:]
        for s in sinks {
            let replica = try await replicas.replica(hostID: s.replicaHostID, volume: s.replicaVolume, size: s.size)
            last[s.key] = await replica.latestPosition
        }
        while true {
            var behind: [String] = []
            for s in sinks {
                let p = await reverse.sinkProgress(hostID: s.sinkHostID, volume: s.sinkVolume)
                if p?.epoch != last[s.key]?.epoch || p?.sequence != last[s.key]?.sequence { behind.append("\(s.sinkHost)/\(s.sinkVolume)") }
            }
            if behind.isEmpty { break }
            try await Task.sleep(for: .milliseconds(250))
        }
        await reverse.stop(plan: plan.name)
        var compared: UInt64 = 0
        var proofs: [String] = []
        for s in sinks {
            guard let position = last[s.key] else { continue }
            let sink = try await session(s.sinkHost)
            let replica = try await replicas.replica(hostID: s.replicaHostID, volume: s.replicaVolume, size: s.size)
            let image = try await replica.openImage(at: position)
            let check: (compared: UInt64, sent: UInt64)
            do {
                check = try await SinkSync.pass(image: image, sink: sink, volume: s.sinkVolume, applying: false)
                try image.close()
            } catch {
                try? image.close()
                throw error
            }
            guard check.sent == 0 else {
                throw FerryError(.conflict, "\(s.sinkHost)/\(s.sinkVolume) differs from \(s.replicaHost)/\(s.replicaVolume) in \(check.sent) bytes at its last record; resume the job to compare again")
            }
            await replica.pinForSink(s.key, at: nil)
            compared += check.compared
            proofs.append("\(s.sinkHost)/\(s.sinkVolume) at \(position.sequence)")
        }
        await update(id) { $0.context.bytesCompared += compared }
        return "zero data loss: each sink holds its recovered volume's last record, every block equal (\(proofs.sorted().joined(separator: ", ")); compared \(compared) bytes)"
    }

    /// The recovered volumes stop being protected on their recovery hosts (their disks stay
    /// there, their replicas here); the groups mirrored over them go.
    func releaseLanded(_ id: String, plan: RecoveryPlan) async throws -> String {
        let landed = try await landedVolumes(plan)
        let keys = Set(landed.map { $0.hostID + "/" + $0.volume })
        let mirrored = try await store.groups().filter { _, members in
            !members.isEmpty && members.allSatisfy { keys.contains($0.hostID + "/" + $0.volume) }
        }.map(\.0.name)
        try await store.unprotect(landed.map { ($0.hostID, $0.volume) }, plan: plan.name, actor: "job \(id)")
        for name in mirrored { try await store.deleteGroup(name: name, actor: "job \(id)") }
        for host in Set(landed.map(\.host)).sorted() {
            if let session = try? await session(host) { await agents.syncVolumes(hostID: try await hostID(host), session: session, log: logger) }
        }
        return "\(landed.count) recovered volumes no longer protected on their recovery hosts" + (mirrored.isEmpty ? "" : "; groups \(mirrored.joined(separator: ", ")) dropped")
    }
}
