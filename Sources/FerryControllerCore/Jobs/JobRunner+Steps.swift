import FerryWire
import Foundation
import NIOCore
import NIOPosix

/// What each kind of step does.
extension JobRunner {
    struct SourceVolume: Sendable {
        var hostID: String
        var host: String
        var volume: String
        var size: UInt64
        var key: String { host + "/" + volume }
    }

    func hostID(_ name: String) async throws -> String {
        guard let host = try await store.host(named: name), host.state != "removed" else {
            throw FerryError(.notFound, "host '\(name)' is not enrolled")
        }
        return host.id
    }

    /// The live session of a host; one that is reconnecting (e.g. after a controller restart,
    /// or its agent's) gets `wait` to come back. A session that has just ended is not live,
    /// though its entry may linger until its loop unregisters it.
    func session(_ name: String, wait: Duration = .seconds(30)) async throws -> PeerSession {
        let id = try await hostID(name)
        let deadline = ContinuousClock.now + wait
        while true {
            if let entry = await registry.entry(hostID: id), !entry.session.isClosed { return entry.session }
            guard ContinuousClock.now < deadline else { break }
            try await Task.sleep(for: .milliseconds(250))
        }
        throw FerryError(.unavailable, "host '\(name)' is not connected")
    }

    /// An item's volumes on its host (or on `host`: where it goes home to after `failback --to`).
    func sourceVolumes(_ item: RecoveryPlanItem, on host: String? = nil) async throws -> [SourceVolume] {
        let name = host ?? item.host
        let id = try await hostID(name)
        let records = try await store.volumes(hostID: id)
        return try item.volumes.map { volume in
            guard let r = records.first(where: { $0.name == volume }) else {
                throw FerryError(.notFound, "\(name)/\(volume) is no longer protected")
            }
            return SourceVolume(hostID: id, host: name, volume: volume, size: UInt64(r.sizeBytes))
        }
    }

    func allSourceVolumes(_ plan: RecoveryPlan) async throws -> [SourceVolume] {
        var out: [SourceVolume] = []
        for g in plan.groups { for item in g.items { out += try await sourceVolumes(item) } }
        return out
    }

    /// The plan's item for `host`; after a failback to another host (`alternates`, old → new)
    /// rewrote the plan, the item now under the new host's name.
    func item(_ plan: RecoveryPlan, host: String?, alternates: [String: String] = [:]) throws -> RecoveryPlanItem {
        let items = plan.groups.flatMap(\.items)
        guard let host, let item = items.first(where: { $0.host == host }) ?? alternates[host].flatMap({ to in items.first { $0.host == to } }) else {
            throw FerryError(.internalError, "the plan has no item for host \(host ?? "?")")
        }
        return item
    }

    func execute(_ id: String, index: Int, spec: JobStepSpec, plan: RecoveryPlan) async throws -> String? {
        guard let job = current(id) else { return nil }
        let alternates = job.job.request.failbackTo ?? [:]
        switch spec.kind {
        case .resolvePoint: return try await resolvePoints(id, plan: plan, request: job.job.request)
        case .stopSource:
            let item = try item(plan, host: spec.host, alternates: alternates)
            guard let hook = item.stopHook else { return "no stop hook" }
            return try await runHook(on: item.host, hook, timeout: item.timeoutSeconds, env: ["FERRY_PLAN": plan.name, "FERRY_MODE": "stop"])
        case .fenceSources: return try await fenceSources(id, plan: plan, planned: job.job.request.planned == true || job.job.operation == .migrate)
        case .drain: return try await drain(id, index: index, plan: plan)
        case .pre, .post:
            guard let group = plan.groups.first(where: { $0.name == spec.group }), let i = spec.index else { return nil }
            let steps = spec.kind == .pre ? group.pre : group.post
            guard i < steps.count else { return nil }
            switch steps[i] {
            case .hook(let host, let name, let timeout):
                return try await runHook(on: host, name, timeout: timeout, env: ["FERRY_PLAN": plan.name, "FERRY_GROUP": group.name])
            case .gate(let message, _):
                return try await gate(id, index: index, message: message)
            }
        case .recover: return try await recover(id, plan: plan, item: try item(plan, host: spec.host, alternates: alternates), operation: job.job.operation)
        case .stopRecovery: return try await stopRecovery(plan: plan, item: try item(plan, host: spec.host, alternates: alternates))
        case .releaseRecovered: return try await releaseRecovered(plan: plan)
        case .reverse: return try await reverseItem(id, plan: plan, item: try item(plan, host: spec.host, alternates: alternates))
        case .finalReverse: return try await finalReverse(id, plan: plan)
        case .unfenceSources: return try await unfenceSources(id, index: index, plan: plan)
        case .startSource:
            let item = try item(plan, host: spec.host, alternates: alternates)
            guard let hook = item.startHook else { return "no start hook" }
            let home = homeHost(id, item)
            let volumes = try await store.volumes(hostID: try await hostID(home)).filter { item.volumes.contains($0.name) }
            let sockets = volumes.map { "\($0.name)=\($0.socketPath ?? "")" }.joined(separator: " ")
            var env = ["FERRY_PLAN": plan.name, "FERRY_MODE": "failback", "FERRY_NETWORK": "production", "FERRY_VOLUMES": sockets]
            // The guests to boot again: as recorded on this host, or else as they ran on the
            // recovery host (a host failed back to for the first time), disks named as here.
            let names = Dictionary(volumes.map { ($0.name, $0.name) }, uniquingKeysWith: { a, _ in a })
            let recovered = Dictionary(volumes.map { (item.host + "-" + $0.name, $0.name) }, uniquingKeysWith: { a, _ in a })
            var guests = try await guestsJSON(recordedOn: home, volumes: names)
            if guests == nil { guests = try await guestsJSON(recordedOn: item.recoveryHost, volumes: recovered) }
            if let guests { env["FERRY_GUESTS"] = guests }
            return try await runHook(on: home, hook, timeout: item.timeoutSeconds, env: env)
        case .commit:
            try await store.audit(actor: "job \(id)", action: "plan.commit", target: plan.name)
            return "the recovered state is final"
        case .unprotectSources:
            let volumes = try await allSourceVolumes(plan)
            try await store.unprotect(volumes.map { ($0.hostID, $0.volume) }, plan: plan.name, actor: "job \(id)")
            for host in Set(volumes.map(\.host)) {
                if let session = try? await session(host) { await agents.syncVolumes(hostID: try await hostID(host), session: session, log: logger) }
            }
            return "\(volumes.count) volumes no longer protected"
        case .settle: return try await settle(id, plan: plan, state: spec.state ?? .protected)
        case .preflight: return try await preflight(id, plan: plan, item: try item(plan, host: spec.host, alternates: alternates))
        case .mirrorGroups: return try await mirrorGroups(id, plan: plan)
        case .fenceRecovered: return try await fenceSources(id, plan: plan, planned: true, volumes: try await landedVolumes(plan))
        case .drainRecovered: return try await drain(id, index: index, plan: plan, volumes: try await landedVolumes(plan))
        case .releaseLanded: return try await releaseLanded(id, plan: plan)
        case .prepareAlternate: return try await prepareAlternate(id, plan: plan, item: try item(plan, host: spec.host, alternates: alternates))
        case .rehome: return try await rehome(id, plan: plan)
        }
    }

    // MARK: Hooks and gates

    func runHook(on host: String, _ name: String, timeout: Int, env: [String: String]) async throws -> String {
        let session = try await session(host)
        let result = try await session.command("hook \(name)", timeout: .seconds(Int64(timeout) + 10)) {
            $0.runHook.name = name
            $0.runHook.timeoutMs = UInt32(clamping: timeout * 1000)
            $0.runHook.environment = env
        }
        guard case .hookResult(let outcome)? = result.outcome else {
            throw FerryError(.protocolViolation, "\(host) answered hook \(name) without its result")
        }
        if !outcome.error.isEmpty { throw FerryError(.hookFailed, "on \(host): \(outcome.error)") }
        return "hook \(name) on \(host) took \(String(format: "%.2f", Double(outcome.durationMicros) / 1e6)) s"
    }

    func gate(_ id: String, index: Int, message: String) async throws -> String {
        await update(id) { s in
            s.job.steps[index].state = .waiting
            s.job.steps[index].detail = "waiting: \(message); 'ferryctl job resume \(id)' goes on"
            s.job.state = .waiting
        }
        while !context(id).resumedGates.contains(index) {
            try await Task.sleep(for: .milliseconds(250))
        }
        await update(id) { s in
            s.job.steps[index].state = .running
            s.job.state = .running
        }
        return "resumed by the operator"
    }

    // MARK: Points, fencing, drain

    func resolvePoints(_ id: String, plan: RecoveryPlan, request: API.JobCreateRequest) async throws -> String {
        let word = request.point ?? (request.asOf == nil ? (request.operation == .drill ? "latest" : "latest-group") : nil)
        var positions: [String: JobContext.Position] = [:]
        var points = Set<String>()
        let volumes = try await allSourceVolumes(plan)
        // Every replica open first: a point is complete only if all its members' replicas hold it.
        for v in volumes {
            _ = try await replicas.replica(hostID: v.hostID, volume: v.volume, size: v.size)
        }
        // One point per consistency group, chosen once: resolving each volume on its own could
        // pick a newer point for the later ones (the scheduler cuts meanwhile), and the images
        // would not be one consistent point.
        var chosen: [String: String] = [:]
        let byWord = word.map { PointCatalogue.choices.contains($0) && $0 != "latest" } ?? true
        for v in volumes {
            let group = byWord ? try await store.groupOf(hostID: v.hostID, volume: v.volume) : nil
            let fixed = group.flatMap { chosen[$0] }
            let (position, point) = try await catalogue.resolve(hostID: v.hostID, hostName: v.host, volume: v.volume, choice: fixed ?? word,
                                                                asOf: fixed == nil ? request.asOf : nil)
            if let group, fixed == nil { chosen[group] = point }
            var time: Date?
            if point == "latest" {
                time = await replicas.opened(hostID: v.hostID, volume: v.volume)?.reportedAt ?? Date()
            } else {
                time = try await store.point(id: point)?.createdAt
            }
            positions[v.key] = JobContext.Position(epoch: position.epoch, sequence: position.sequence, point: point, pointTime: time)
            points.insert(point)
        }
        await update(id) { $0.context.positions = positions }
        return "\(positions.count) volumes at \(points.sorted().joined(separator: ", "))"
    }

    /// Fences the plan's source volumes, or the given ones (the recovered volumes, for the
    /// failback of a failover that landed).
    func fenceSources(_ id: String, plan: RecoveryPlan, planned: Bool, volumes given: [SourceVolume]? = nil) async throws -> String {
        let volumes: [SourceVolume]
        if let given { volumes = given } else { volumes = try await allSourceVolumes(plan) }
        // Until a source answers, its replication stops at what the replica holds now.
        var held: [String: ReplicaPosition] = [:]
        for v in volumes {
            if let replica = await replicas.opened(hostID: v.hostID, volume: v.volume) { held[v.hostID + "/" + v.volume] = await replica.latestPosition }
        }
        let records = try await store.fence(volumes.map { ($0.hostID, $0.volume) }, held: held, plan: plan.name, actor: "job \(id)")
        for record in records.values { agents.gates.set(record.ingestGate, hostID: record.hostID, volume: record.name) }
        let generations = records.mapValues { UInt64(max(0, $0.generation)) }
        var fenced: [String: JobContext.Fenced] = [:]
        var unreachable: [String] = []
        // Every host at once; an unplanned failover does not wait long for sources that may be
        // cut off (their sessions can look alive until heartbeats say otherwise): the state
        // fences them anyway when they reconnect.
        let outcomes = await withTaskGroup(of: (String, Result<[Ferry_V1_FencedVolume], any Error>).self) { group in
            for host in Set(volumes.map(\.host)).sorted() {
                let mine = volumes.filter { $0.host == host }
                group.addTask {
                    do {
                        let session = try await self.session(host, wait: planned ? .seconds(30) : .seconds(2))
                        let result = try await session.command("fence", timeout: planned ? .seconds(60) : .seconds(2)) {
                            $0.fenceVolumes.volumes = mine.map(\.volume)
                            $0.fenceVolumes.generation = mine.compactMap { generations[$0.hostID + "/" + $0.volume] }.max() ?? 0
                        }
                        guard case .volumesFenced(let answer)? = result.outcome else {
                            throw FerryError(.protocolViolation, "\(host) answered fence without its volumes")
                        }
                        return (host, .success(answer.volumes))
                    } catch {
                        return (host, .failure(error))
                    }
                }
            }
            var all: [(String, Result<[Ferry_V1_FencedVolume], any Error>)] = []
            for await outcome in group { all.append(outcome) }
            return all
        }
        let at = Date()
        for (host, outcome) in outcomes.sorted(by: { $0.0 < $1.0 }) {
            switch outcome {
            case .success(let answer):
                for f in answer {
                    fenced[host + "/" + f.volume] = JobContext.Fenced(epoch: f.epoch, lastSequence: f.lastSequence, at: at)
                    // What the source captured before its fence may still land; nothing after.
                    guard let v = volumes.first(where: { $0.host == host && $0.volume == f.volume }),
                          let record = try await store.recordFenceAnswer(hostID: v.hostID, name: v.volume,
                                                                          position: ReplicaPosition(epoch: f.epoch, sequence: f.lastSequence))
                    else { continue }
                    agents.gates.set(record.ingestGate, hostID: v.hostID, volume: v.volume)
                }
            case .failure(let error):
                if planned { throw FerryError(.unavailable, "cannot fence \(host): \((error as? FerryError)?.message ?? "\(error)"); a planned failover needs every source reachable") }
                unreachable.append(host)
            }
        }
        await update(id) { $0.context.fenced = fenced }
        let gens = Set(generations.values).sorted().map(String.init).joined(separator: ",")
        return "\(volumes.count) volumes fenced at generation \(gens)"
            + (unreachable.isEmpty ? "" : "; unreachable (fenced when they reconnect): \(unreachable.joined(separator: ", "))")
    }

    /// Planned failover: every write a fenced source captured is durable here. The proof per
    /// volume: after the fence, the agent reports nothing pending and its last sequence, and
    /// the replica's durable sequence of that epoch has reached it.
    func drain(_ id: String, index: Int, plan: RecoveryPlan, volumes given: [SourceVolume]? = nil) async throws -> String {
        let volumes: [SourceVolume]
        if let given { volumes = given } else { volumes = try await allSourceVolumes(plan) }
        let fenced = context(id).fenced
        var positions: [String: JobContext.Position] = [:]
        var proofs: [String] = []
        try await waitForEach(id, index: index, volumes, done: "drained") { v in
            guard let f = fenced[v.key] else { throw FerryError(.internalError, "\(v.key) was not fenced") }
            guard await registry.entry(hostID: v.hostID) != nil else {
                throw FerryError(.unavailable, "\(v.host) went away during the drain; retry with 'ferryctl job resume \(id)' once it is back, or fail over unplanned")
            }
            guard let (report, durable) = await caughtUp(v, since: f.at),
                  report.epoch == f.epoch || f.epoch == 0, report.lastSequence >= f.lastSequence else { return false }
            positions[v.key] = JobContext.Position(epoch: durable.epoch, sequence: report.lastSequence, point: "planned", pointTime: Date())
            proofs.append("\(v.key) \(report.lastSequence)/\(durable.sequence)")
            return true
        }
        await update(id) { $0.context.positions = positions }
        return "zero data loss: every captured write is durable (captured/durable: \(proofs.sorted().joined(separator: ", ")))"
    }

    /// The replica's newest report, if its agent made it after `since` (reports come every
    /// second; the margin covers one in flight) and it says the replica holds every write the
    /// agent captured: nothing pending, no overflow, durable through its last sequence.
    func caughtUp(_ v: SourceVolume, since: Date) async -> (report: Ferry_V1_VolumeReport, durable: ReplicaPosition)? {
        guard let replica = await replicas.opened(hostID: v.hostID, volume: v.volume),
              let report = await replica.report, let at = await replica.reportedAt, at.timeIntervalSince(since) > 1.2 else { return nil }
        let durable = await replica.latestPosition
        guard report.sync.pendingExtents == 0, !report.overflowed, durable.epoch == report.epoch,
              durable.sequence >= report.lastSequence else { return nil }
        return (report, durable)
    }

    /// Polls `check` for each volume until every one has passed, showing progress.
    func waitForEach(_ id: String, index: Int, _ volumes: [SourceVolume], done what: String,
                     _ check: (SourceVolume) async throws -> Bool) async throws {
        var passed = Set<String>()
        while true {
            for v in volumes where !passed.contains(v.key) {
                if try await check(v) { passed.insert(v.key) }
            }
            await setProgress(id, index: index, Double(passed.count) / Double(max(1, volumes.count)),
                              detail: "\(passed.count) of \(volumes.count) volumes \(what)")
            if passed.count == volumes.count { return }
            try await Task.sleep(for: .milliseconds(250))
        }
    }

    // MARK: Recovery

    func recoveryRecord(_ job: String, plan: RecoveryPlan, item: RecoveryPlanItem, purpose: String,
                        positions: [String: JobContext.Position]) async throws -> RecoveryRecord {
        let rid = RecoveryRecord.id(plan: plan.name, host: item.host)
        if let existing = try await store.recoveries(plan: plan.name).first(where: { $0.id == rid }) {
            // Only the job that made it goes on with it (after a restart or a resume): another
            // job must never take over a drill's overlay, or a failover's.
            guard existing.job == job else {
                throw FerryError(.conflict, "\(item.host) of plan \(plan.name) is recovered already (\(existing.purpose), job \(existing.job ?? "?")); clean that up first")
            }
            return existing
        }
        var volumes: [RecoveryRecord.Volume] = []
        // Hydration lands the volumes on the recovery host's storage; a failover's are then
        // protected there, a drill's are disposable.
        let hydrate = (try? await view(id: job))?.request.hydrate == true
        for v in try await sourceVolumes(item) {
            guard let p = positions[v.key] else { throw FerryError(.internalError, "no point chosen for \(v.key)") }
            let exportID = PointExports.newID(prefix: "r-")
            // The point's own size: the volume may have grown since (an online resize).
            let replica = try await replicas.replica(hostID: v.hostID, volume: v.volume, size: v.size)
            let size = await replica.size(at: ReplicaPosition(epoch: p.epoch, sequence: p.sequence))
            var volume = RecoveryRecord.Volume(source: v.key, sourceHostID: v.hostID, volume: v.volume, exportID: exportID,
                                               epoch: p.epoch, sequence: p.sequence, point: p.point, size: size,
                                               localName: item.host + "-" + v.volume)
            if hydrate {
                volume.hydrate = true
                volume.target = item.targets?[v.volume]
            }
            volumes.append(volume)
        }
        let record = RecoveryRecord(id: rid, plan: plan.name, sourceHost: item.host, recoveryHost: item.recoveryHost, purpose: purpose,
                                    network: purpose == "drill" ? "test" : "production", volumes: volumes, startedAt: Date(), job: job)
        try await store.saveRecovery(record)
        return record
    }

    /// Serves a recovery's volumes (point image plus its overlay), again after a restart.
    /// Only the recovery host the job chose may open them over the network.
    func ensureExports(_ record: RecoveryRecord) async throws {
        var principals: [String: String] = [:]
        if let host = try await store.host(named: record.recoveryHost) {
            principals[host.id] = host.name
        }
        for v in record.volumes where v.released != true {
            guard await exports.image(id: v.exportID) == nil else { continue }
            let replica = try await replicas.replica(hostID: v.sourceHostID, volume: v.volume, size: v.size)
            // A hydrating volume's writes stay on its recovery host: its export is the point only.
            _ = try await exports.create(id: v.exportID, volume: v.source, replica: replica,
                                         position: ReplicaPosition(epoch: v.epoch, sequence: v.sequence), point: v.point,
                                         writable: v.hydrate != true, managed: true, principals: principals)
        }
    }

    func recover(_ id: String, plan: RecoveryPlan, item: RecoveryPlanItem, operation: API.JobOperation) async throws -> String {
        guard let port = exportPort() else {
            throw FerryError(.badConfiguration, "recovery needs the controller's nbd-tls-listen setting: recovery hosts reach the volumes there")
        }
        let purpose = operation == .drill ? "drill" : "failover"
        let record = try await recoveryRecord(id, plan: plan, item: item, purpose: purpose, positions: context(id).positions)
        try await ensureExports(record)
        let protected = purpose == "failover" && record.volumes.contains { $0.hydrate == true }
        if protected { try await protectRecovered(record, port: port) }
        let session = try await session(item.recoveryHost)
        var description: [String: Any] = [
            "plan": plan.name, "source_host": item.host, "recovery_host": item.recoveryHost, "network": record.network,
            "networks": item.networks.map { ["source": $0.source, "recovery": $0.recovery, "test": $0.test] },
            "points": Dictionary(record.volumes.map { ($0.source, $0.point) }, uniquingKeysWith: { a, _ in a }),
        ]
        if let host = try await store.host(named: item.host), let blob = host.inventory,
           let inventory = try? Ferry_V1_Inventory(serializedBytes: [UInt8](blob)),
           let json = try? JSONEncoder().encode(API.Inventory(inventory)),
           let object = try? JSONSerialization.jsonObject(with: json) {
            description["source_inventory"] = object
        }
        // The source host's guests on these volumes, with the shape they were recorded with
        // (the host may be down, or its guest stopped by the stop hook), disks named as here.
        if let guests = try await guestsJSON(recordedOn: item.host, volumes: Dictionary(record.volumes.map { ($0.volume, $0.localName) },
                                                                                          uniquingKeysWith: { a, _ in a })),
           let object = try? JSONSerialization.jsonObject(with: Data(guests.utf8)) {
            description["guests"] = object
        }
        let descriptionJSON = String(decoding: try JSONSerialization.data(withJSONObject: description, options: [.sortedKeys]), as: UTF8.self)
        let result: Ferry_V1_CommandResult
        do {
            result = try await session.command("recover", timeout: .seconds(Int64(item.timeoutSeconds) + 60)) { c in
            c.recoverVolumes.recoveryID = record.id
            c.recoverVolumes.plan = plan.name
            c.recoverVolumes.sourceHost = item.host
            c.recoverVolumes.network = record.network
            c.recoverVolumes.startHook = item.startHook ?? ""
            c.recoverVolumes.hookTimeoutMs = UInt32(clamping: item.timeoutSeconds * 1000)
            c.recoverVolumes.descriptionJson = descriptionJSON
            c.recoverVolumes.volumes = record.volumes.map { v in
                var s = Ferry_V1_RecoveredVolumeSpec()
                s.name = v.localName
                s.source = v.source
                s.exportPort = UInt32(port)
                s.exportName = v.exportID
                s.sizeBytes = v.size
                s.hydrate = v.hydrate == true
                s.targetPath = v.target ?? ""
                s.protected = protected
                return s
            }
            }
        } catch let error as FerryError where ![.timeout, .unavailable].contains(error.code) {
            // The recovery host refused (a target not allowed, no room, ...): it serves nothing,
            // so nothing of this recovery stays here either, and the plan is as it was.
            for v in record.volumes where await exports.image(id: v.exportID) != nil {
                try? await exports.remove(id: v.exportID, managed: true)
            }
            try? await store.deleteRecovery(id: record.id)
            if protected, let rid = try? await hostID(item.recoveryHost) {
                try? await store.unprotect(record.volumes.map { (rid, $0.localName) }, plan: plan.name, actor: "job \(id)")
                if let session = try? await self.session(item.recoveryHost, wait: .zero) {
                    await agents.syncVolumes(hostID: rid, session: session, log: logger)
                }
            }
            throw error
        }
        guard case .recoveryStarted(let started)? = result.outcome else {
            throw FerryError(.protocolViolation, "\(item.recoveryHost) answered recover without its volumes")
        }
        if !started.hook.error.isEmpty {
            throw FerryError(.hookFailed, "start hook on \(item.recoveryHost): \(started.hook.error)")
        }
        let now = Date()
        await update(id) { $0.context.started[item.host] = now }
        let hook = started.hook.name.isEmpty ? "no start hook" :
            "start hook \(started.hook.name) \(String(format: "%.2f", Double(started.hook.durationMicros) / 1e6)) s"
        return "\(started.volumes.count) volumes on \(item.recoveryHost) (\(started.volumes.map(\.name).joined(separator: ", "))), \(record.network) network; \(hook)"
    }

    func stopRecovery(plan: RecoveryPlan, item: RecoveryPlanItem) async throws -> String {
        let rid = RecoveryRecord.id(plan: plan.name, host: item.host)
        let session = try await session(item.recoveryHost)
        let result = try await session.command("stop recovery", timeout: .seconds(Int64(item.timeoutSeconds) + 60)) {
            $0.stopRecovery.recoveryID = rid
            $0.stopRecovery.stopHook = item.stopHook ?? ""
            $0.stopRecovery.hookTimeoutMs = UInt32(clamping: item.timeoutSeconds * 1000)
        }
        guard case .recoveryStopped(let stopped)? = result.outcome else {
            throw FerryError(.protocolViolation, "\(item.recoveryHost) answered stop without its result")
        }
        if !stopped.hook.error.isEmpty { throw FerryError(.hookFailed, "stop hook on \(item.recoveryHost): \(stopped.hook.error)") }
        return stopped.wasRunning ? "stopped on \(item.recoveryHost)" + (stopped.hook.name.isEmpty ? "" : " after hook \(stopped.hook.name)") : "was not running"
    }

    func releaseRecovered(plan: RecoveryPlan) async throws -> String {
        await reverse.stop(plan: plan.name)
        var dropped = 0
        for record in try await store.recoveries(plan: plan.name) {
            for v in record.volumes {
                if await exports.image(id: v.exportID) != nil {
                    try await exports.remove(id: v.exportID, managed: true)
                    dropped += 1
                }
            }
            try await store.deleteRecovery(id: record.id)
        }
        return "\(dropped) overlays dropped"
    }

    // MARK: Reprotect and failback

    func recoveryVolumes(plan: RecoveryPlan, item: RecoveryPlanItem) async throws -> [RecoveryRecord.Volume] {
        let rid = RecoveryRecord.id(plan: plan.name, host: item.host)
        guard let record = try await store.recoveries(plan: plan.name).first(where: { $0.id == rid }) else {
            throw FerryError(.notFound, "\(item.host) is not recovered in plan \(plan.name)")
        }
        try await ensureExports(record)
        return record.volumes
    }

    func reverseItem(_ id: String, plan: RecoveryPlan, item: RecoveryPlanItem) async throws -> String {
        let sink = try await session(item.host)
        var compared: UInt64 = 0, sent: UInt64 = 0
        let volumes = try await recoveryVolumes(plan: plan, item: item)
        if volumes.contains(where: { $0.hydrate == true }) {
            // Landed: each sink is made equal to its recovered volume's replica here, then
            // follows that replica's journal in write order.
            let rid = RecoveryRecord.id(plan: plan.name, host: item.host)
            let records = try await store.recoveries(plan: plan.name).filter { $0.id == rid }
            for s in await reverse.landedSinks(records) {
                let result = try await reverse.pass(s)
                compared += result.compared
                sent += result.sent
            }
            await reverse.start(plan: plan, fullPassFirst: false)
            await update(id) { s in
                s.context.bytesCompared += compared
                s.context.bytesSent += sent
            }
            return "\(item.host) is a sink now, following \(item.recoveryHost)'s journal in write order: compared \(compared) bytes, sent \(sent) bytes"
        }
        for v in volumes {
            guard let image = await exports.image(id: v.exportID) else { continue }
            // Writes from now on are streamed by the reverse stream; the pass below covers the rest.
            await exports.dirty(id: v.exportID)?.reset()
            let result = try await SinkSync.pass(image: image, sink: sink, volume: v.volume)
            compared += result.compared
            sent += result.sent
        }
        await reverse.enable(plan: plan.name, exportIDs: volumes.map(\.exportID))
        await reverse.start(plan: plan, fullPassFirst: false)
        await update(id) { s in
            s.context.bytesCompared += compared
            s.context.bytesSent += sent
        }
        return "\(item.host) is a sink now: compared \(compared) bytes, sent \(sent) bytes"
    }

    func finalReverse(_ id: String, plan: RecoveryPlan) async throws -> String {
        let landed = await reverse.landedSinks(try await store.recoveries(plan: plan.name))
        if !landed.isEmpty { return try await finalLandedReverse(id, plan: plan, sinks: landed) }
        await reverse.stop(plan: plan.name)
        var compared: UInt64 = 0, sent: UInt64 = 0, verified = 0
        for g in plan.groups {
            for item in g.items {
                let sink = try await session(item.host)
                for v in try await recoveryVolumes(plan: plan, item: item) {
                    guard let image = await exports.image(id: v.exportID) else { continue }
                    let result = try await SinkSync.pass(image: image, sink: sink, volume: v.volume)
                    compared += result.compared
                    sent += result.sent
                    // The proof: a second pass finds every block equal.
                    let check = try await SinkSync.pass(image: image, sink: sink, volume: v.volume, applying: false)
                    guard check.sent == 0 else {
                        throw FerryError(.conflict, "\(v.source) still differs in \(check.sent) bytes after the last pass; is \(item.recoveryHost) still writing?")
                    }
                    verified += 1
                }
            }
        }
        await update(id) { s in
            s.context.bytesCompared += compared
            s.context.bytesSent += sent
        }
        return "\(verified) volumes equal on their original hosts (compared \(compared) bytes, sent \(sent))"
    }

    func unfenceSources(_ id: String, index: Int, plan: RecoveryPlan) async throws -> String {
        // Each item's volumes on the host it goes home to (another one after `failback --to`).
        var volumes: [SourceVolume] = []
        for g in plan.groups {
            for item in g.items { volumes += try await sourceVolumes(item, on: homeHost(id, item)) }
        }
        try await store.unfence(volumes.map { ($0.hostID, $0.volume) }, plan: plan.name, actor: "job \(id)")
        for hid in Set(volumes.map(\.hostID)) { agents.gates.load(hostID: hid, try await store.volumes(hostID: hid)) }
        var started: [String: Date] = [:]
        for host in Set(volumes.map(\.host)).sorted() {
            let session = try await session(host)
            let hid = try await hostID(host)
            await agents.syncVolumes(hostID: hid, session: session, log: logger)
            for v in volumes where v.host == host {
                _ = try await session.command("resync", timeout: .seconds(30)) { $0.resyncVolume.name = v.volume }
                started[v.key] = Date()
            }
        }
        // The replicas compare themselves with the sources, block hash by block hash.
        var sent: UInt64 = 0, compared: UInt64 = 0
        try await waitForEach(id, index: index, volumes, done: "resynced") { v in
            guard let t = started[v.key], let (report, _) = await caughtUp(v, since: t) else { return false }
            sent += report.sync.sentBytes
            compared += report.sync.doneBytes
            return true
        }
        return "\(volumes.count) volumes writable on their hosts again; replicas resynced (compared \(compared) bytes, sent \(sent))"
    }

    // MARK: Settle

    func settle(_ id: String, plan: RecoveryPlan, state: API.PlanState) async throws -> String {
        guard let s = current(id) else { return "" }
        var report: [String: String] = [:]
        let ctx = s.context
        if !ctx.started.isEmpty, let last = ctx.started.values.max() {
            report["rto_seconds"] = String(format: "%.3f", last.timeIntervalSince(s.job.createdAt))
        }
        if s.job.request.planned == true || s.job.operation == .migrate {
            report["rpo_seconds"] = "0"
            report["data_loss"] = "none: every captured write durable before recovery"
        } else if let oldest = ctx.positions.values.compactMap(\.pointTime).min() {
            report["rpo_seconds"] = String(format: "%.3f", max(0, s.job.createdAt.timeIntervalSince(oldest)))
            report["point"] = Set(ctx.positions.values.map(\.point)).sorted().joined(separator: ",")
        }
        if ctx.bytesCompared > 0 || ctx.bytesSent > 0 {
            report["bytes_compared"] = "\(ctx.bytesCompared)"
            report["bytes_sent"] = "\(ctx.bytesSent)"
        }
        if s.job.operation == .drillCleanup, let drill = try await store.jobs(plan: plan.name).first(where: { $0.job.operation == .drill }) {
            // The drill report: what the drill achieved, step by step.
            report["drill_job"] = drill.job.id
            for (k, v) in drill.job.report { report["drill_" + k] = v }
            for (i, step) in drill.job.steps.enumerated() {
                report[String(format: "drill_step_%02d", i + 1)] = "\(step.name): \(step.state) in \(String(format: "%.3f", step.seconds ?? 0)) s"
            }
        }
        try await store.setPlanState(plan.name, state, job: id)
        if state == .reversed { await reverse.start(plan: plan, fullPassFirst: false) }
        await update(id) { $0.job.report = report }
        return "plan \(plan.name) is \(state)" + (report["rto_seconds"].map { "; RTO \($0) s" } ?? "") + (report["rpo_seconds"].map { "; RPO \($0) s" } ?? "")
    }
}
