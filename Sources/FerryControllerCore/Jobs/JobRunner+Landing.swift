import FerryWire
import Foundation

/// A failover that lands on the recovery hosts' storage (`hydrate`): checked before anything
/// is fenced, its recovered volumes protected volumes of their recovery hosts from the first
/// write, and the source groups mirrored over them.
extension JobRunner {
    /// The recovery host checks its targets against the point it will fill them from (the
    /// chosen one, or for a planned failover the latest: what the drain adds is small), and
    /// that none of its recovered volumes' names is taken by another volume there.
    func preflight(_ id: String, plan: RecoveryPlan, item: RecoveryPlanItem) async throws -> String {
        guard let port = exportPort() else {
            throw FerryError(.badConfiguration, "recovery needs the controller's nbd-tls-listen setting: recovery hosts reach the volumes there")
        }
        let recoveryHostID = try await hostID(item.recoveryHost)
        let rid = RecoveryRecord.id(plan: plan.name, host: item.host)
        let taken = try await store.volumes(hostID: recoveryHostID)
        let positions = context(id).positions
        let session = try await session(item.recoveryHost)
        var temporary: [String] = []
        do {
            return try await preflight(plan: plan, item: item, rid: rid, port: port, recoveryHostID: recoveryHostID, taken: taken,
                                       positions: positions, session: session, temporary: &temporary)
        } catch {
            for e in temporary { try? await exports.remove(id: e, managed: true) }
            throw error
        }
    }

    private func preflight(plan: RecoveryPlan, item: RecoveryPlanItem, rid: String, port: Int, recoveryHostID: String, taken: [VolumeRecord],
                           positions: [String: JobContext.Position], session: PeerSession, temporary: inout [String]) async throws -> String {
        var specs: [Ferry_V1_RecoveredVolumeSpec] = []
        var needed: UInt64 = 0
        for v in try await sourceVolumes(item) {
            let localName = item.host + "-" + v.volume
            if let other = taken.first(where: { $0.name == localName }), other.hydration?.recovery != rid {
                throw FerryError(.conflict, "\(item.recoveryHost) already protects a volume named \(localName); the failover would land \(v.key) there under that name")
            }
            let replica = try await replicas.replica(hostID: v.hostID, volume: v.volume, size: v.size)
            let position: ReplicaPosition
            if let p = positions[v.key] {
                position = ReplicaPosition(epoch: p.epoch, sequence: p.sequence)
            } else {
                position = ReplicaPosition(epoch: await replica.state.epoch, sequence: await replica.durable)
            }
            // The point's own size (the volume may have grown since).
            let size = await replica.size(at: position)
            let export = PointExports.newID(prefix: "p-")
            _ = try await exports.create(id: export, volume: v.key, replica: replica, position: position, point: "pre-flight",
                                         writable: false, managed: true, principals: [recoveryHostID: item.recoveryHost])
            temporary.append(export)
            var s = Ferry_V1_RecoveredVolumeSpec()
            s.name = localName
            s.source = v.key
            s.exportPort = UInt32(port)
            s.exportName = export
            s.sizeBytes = size
            s.hydrate = true
            s.targetPath = item.targets?[v.volume] ?? ""
            specs.append(s)
            needed += size
        }
        let result = try await session.command("pre-flight", timeout: .seconds(240)) { c in
            c.recoverVolumes.recoveryID = rid
            c.recoverVolumes.plan = plan.name
            c.recoverVolumes.sourceHost = item.host
            c.recoverVolumes.network = "production"
            c.recoverVolumes.volumes = specs
            c.recoverVolumes.preflight = true
        }
        guard case .recoveryStarted? = result.outcome else {
            throw FerryError(.protocolViolation, "\(item.recoveryHost) answered the pre-flight without its result")
        }
        for e in temporary { try? await exports.remove(id: e, managed: true) }
        temporary = []
        return "\(specs.count) targets on \(item.recoveryHost) allowed, big enough and with room (\(needed) bytes of volumes)"
    }

    /// Makes a hydrating failover's volumes protected volumes of the recovery host (their
    /// replicas are built here from the point) and has the host serve them before the recovery
    /// hands their sockets to the start hook.
    func protectRecovered(_ record: RecoveryRecord, port: Int) async throws {
        let recoveryHostID = try await hostID(record.recoveryHost)
        let existing = try await store.volumes(hostID: recoveryHostID)
        for v in record.volumes where v.hydrate == true {
            if let other = existing.first(where: { $0.name == v.localName }) {
                guard other.hydration?.recovery == record.id else {
                    throw FerryError(.conflict, "\(record.recoveryHost) already protects a volume named \(v.localName)")
                }
                continue
            }
            let hydration = VolumeHydration(source: v.source, sourceHostID: v.sourceHostID, sourceVolume: v.volume, epoch: v.epoch,
                                            sequence: v.sequence, point: v.point + "@" + v.exportID, exportID: v.exportID,
                                            exportPort: port, recovery: record.id)
            // Without a target in the plan: the agent's default, relative to its data dir until
            // the agent reports where that is.
            let volume = VolumeRecord(hostID: recoveryHostID, name: v.localName, path: v.target ?? VolumeHydration.defaultPath(v.localName),
                                      sizeBytes: Int64(v.size),
                                      protectedAt: Date(), hydration: hydration)
            try await store.addVolume(volume, hostName: record.recoveryHost, actor: "job \(record.job ?? "?")")
        }
        let session = try await session(record.recoveryHost)
        await agents.syncVolumes(hostID: recoveryHostID, session: session, log: logger)
    }

    /// Each consistency group with a member among the plan's recovered volumes gets a twin
    /// over those recovered volumes (same policy), named GROUP-on-RECOVERYHOST... or, when its
    /// members landed on several hosts, GROUP-recovered: crash- and app-consistent points, RPO
    /// and alerts for the recovered site as the primary had.
    func mirrorGroups(_ id: String, plan: RecoveryPlan) async throws -> String {
        var landed: [String: (hostID: String, name: String)] = [:] // "SOURCEHOSTID/VOLUME" -> recovered volume
        for record in try await store.recoveries(plan: plan.name) where record.purpose == "failover" {
            let rid = try await hostID(record.recoveryHost)
            for v in record.volumes where v.hydrate == true { landed[v.sourceHostID + "/" + v.volume] = (rid, v.localName) }
        }
        var made: [String] = []
        let groups = try await store.groups()
        for (group, members) in groups {
            let twins = members.compactMap { landed[$0.hostID + "/" + $0.volume] }
            guard !twins.isEmpty else { continue }
            let name = String((group.name + "-recovered").prefix(63))
            if let (existing, existingMembers) = groups.first(where: { $0.0.name == name }) {
                // A resumed job: the twin is there already (with exactly these members).
                guard Set(existingMembers.map { $0.hostID + "/" + $0.volume }) == Set(twins.map { $0.hostID + "/" + $0.name }) else {
                    throw FerryError(.conflict, "a consistency group named \(existing.name) exists with other members; rename it, then resume the job")
                }
                continue
            }
            try await store.createGroup(name: name, policy: group.decodedPolicy,
                                        members: twins.map { GroupMemberRecord(groupName: name, hostID: $0.hostID, volume: $0.name) },
                                        actor: "job \(id)")
            made.append("\(name) (\(twins.count) volumes)")
        }
        return made.isEmpty ? "no source group had a member in this plan" : "groups " + made.joined(separator: ", ")
    }
}
