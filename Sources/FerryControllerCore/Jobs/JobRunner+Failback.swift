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
    func finalLandedReverse(_ id: String, plan: RecoveryPlan, sinks all: [ReverseStreams.LandedSink]) async throws -> String {
        // Items going home to another host were made equal there (prepareAlternate): their
        // original hosts' sinks are left as they are (a host failed back around may be gone).
        let alternates = current(id)?.job.request.failbackTo ?? [:]
        let sinks = all.filter { alternates[$0.sinkHost] == nil }
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

/// Failback to another host than the original (`ferryctl failback PLAN --to HOST=NEWHOST`).
extension JobRunner {
    /// The host an item goes home to in this job.
    func homeHost(_ id: String, _ item: RecoveryPlanItem) -> String {
        current(id)?.job.request.failbackTo?[item.host] ?? item.host
    }

    /// Checks a failback's alternates before the job starts: only after a failover that landed,
    /// each for an item of the plan, to another enrolled host than its own and its recovery host.
    func checkAlternates(_ alternates: [String: String], plan: RecoveryPlan, landed: Bool) async throws {
        guard !alternates.isEmpty else { return }
        guard landed else {
            throw FerryError(.badRequest, "failback to another host (--to) needs a failover that landed (--hydrate): the recovered volumes' replicas are what the new host is made equal to")
        }
        let items = plan.groups.flatMap(\.items)
        for (from, to) in alternates.sorted(by: { $0.key < $1.key }) {
            guard let item = items.first(where: { $0.host == from }) else {
                throw FerryError(.badRequest, "plan \(plan.name) has no item for host \(from); its items: \(items.map(\.host).joined(separator: ", "))")
            }
            guard to != from, to != item.recoveryHost, !items.contains(where: { $0.host == to }) else {
                throw FerryError(.badRequest, "\(from) cannot fail back to \(to): pick an enrolled host that is neither its recovery host nor another item of the plan")
            }
            _ = try await hostID(to)
        }
    }

    /// The new host's volumes of the item's names are protected there (at the original paths,
    /// created at the original sizes, within its protect-allow) or found, fenced, and made equal
    /// to the recovered volumes' replicas at their last record: only differing blocks travel
    /// (an older copy), all data otherwise. A second comparison must find every block equal.
    func prepareAlternate(_ id: String, plan: RecoveryPlan, item: RecoveryPlanItem) async throws -> String {
        let to = homeHost(id, item)
        let hostID = try await hostID(to)
        guard let host = try await store.host(named: to) else { throw FerryError(.notFound, "host '\(to)' is not enrolled") }
        let session = try await session(to)
        let originals = try await store.volumes(hostID: try await self.hostID(item.host))
        let rid = RecoveryRecord.id(plan: plan.name, host: item.host)
        guard let record = try await store.recoveries(plan: plan.name).first(where: { $0.id == rid }) else {
            throw FerryError(.notFound, "\(item.host) is not recovered in plan \(plan.name)")
        }
        let recoveryHostID = try await self.hostID(record.recoveryHost)
        var mine = try await store.volumes(hostID: hostID)
        var made: [String] = [], found: [String] = []
        for v in record.volumes where v.hydrate == true {
            // The recovered volume may have grown since the failover (an online resize there).
            let sourceSize = try await replicas.replica(hostID: recoveryHostID, volume: v.localName, size: v.size).size
            if let existing = mine.first(where: { $0.name == v.volume }) {
                // A smaller one grows as the sink's first step; a larger one would keep a stale end.
                guard UInt64(existing.sizeBytes) <= sourceSize else {
                    throw FerryError(.conflict, "\(to)/\(v.volume) has \(existing.sizeBytes) bytes, more than the \(sourceSize) of \(record.recoveryHost)/\(v.localName) (volumes only grow): grow that one first ('ferryctl volume resize \(record.recoveryHost)/\(v.localName) --size \(existing.sizeBytes)'), or fail back to another host")
                }
                found.append(v.volume)
                continue
            }
            var spec = Ferry_V1_VolumeSpec()
            spec.name = v.volume
            spec.path = originals.first { $0.name == v.volume }?.path ?? VolumeHydration.defaultPath(v.volume)
            spec.createSizeBytes = sourceSize
            spec.initialSyncRequired = true
            spec.captureMode = .export
            let (protected, created) = try await agents.protectVolume(spec, host: host, session: session, captureMode: "export",
                                                                     scanIntervalSeconds: 0, actor: "job \(id)")
            mine.append(protected)
            if created { made.append(v.volume) } else { found.append(v.volume + " at " + protected.path) }
        }
        let volumes = record.volumes.filter { $0.hydrate == true }.map { SourceVolume(hostID: hostID, host: to, volume: $0.volume, size: $0.size) }
        // Fenced only once their replicas hold what they captured (a new one: its initial sync):
        // a fence holds the replica where it is, and refuses what comes after.
        let since = Date()
        for v in volumes {
            while await caughtUp(v, since: since) == nil { try await Task.sleep(for: .milliseconds(250)) }
        }
        _ = try await fenceSources(id, plan: plan, planned: true, volumes: volumes)
        var sent: UInt64 = 0, compared: UInt64 = 0
        for v in record.volumes where v.hydrate == true {
            let replica = try await replicas.replica(hostID: recoveryHostID, volume: v.localName, size: v.size)
            let image = try await replica.openImage(at: await replica.latestPosition)
            do {
                let pass = try await SinkSync.pass(image: image, sink: session, volume: v.volume)
                let check = try await SinkSync.pass(image: image, sink: session, volume: v.volume, applying: false)
                try image.close()
                guard check.sent == 0 else {
                    throw FerryError(.conflict, "\(to)/\(v.volume) still differs in \(check.sent) bytes after its pass; resume the job to compare again")
                }
                sent += pass.sent
                compared += pass.compared
            } catch {
                try? image.close()
                throw error
            }
        }
        await update(id) { s in
            s.context.bytesCompared += compared
            s.context.bytesSent += sent
        }
        let how = (made.isEmpty ? "" : "created \(made.joined(separator: ", ")) empty (full copy)") + (made.isEmpty || found.isEmpty ? "" : "; ")
            + (found.isEmpty ? "" : "found an older copy of \(found.joined(separator: ", ")) (delta)")
        return "\(to): \(how); \(sent) bytes moved of \(compared) compared; every block equal to \(record.recoveryHost)'s"
    }

    /// The new hosts take the items' places: in the plan (its text too), and in every group the
    /// old volumes were in. The old hosts' volumes of those items stop being protected (fenced,
    /// left as they were on their disks; their replicas stay here).
    func rehome(_ id: String, plan: RecoveryPlan) async throws -> String {
        let alternates = current(id)?.job.request.failbackTo ?? [:]
        var moved: [String] = []
        for g in plan.groups {
            for item in g.items {
                guard let to = alternates[item.host] else { continue }
                let oldID = try await hostID(item.host), newID = try await hostID(to)
                try await store.moveGroupMembers(from: oldID, to: newID, volumes: item.volumes, actor: "job \(id)")
                try await store.unprotect(item.volumes.map { (oldID, $0) }, plan: plan.name, actor: "job \(id)")
                if let session = try? await session(item.host, wait: .seconds(2)) { await agents.syncVolumes(hostID: oldID, session: session, log: logger) }
                moved.append("\(item.host) → \(to)")
            }
        }
        try await store.rehomePlan(plan.name, hosts: alternates, actor: "job \(id)")
        return "plan \(plan.name) and its groups: \(moved.joined(separator: ", ")); the old hosts' volumes of those items are no longer protected"
    }
}
