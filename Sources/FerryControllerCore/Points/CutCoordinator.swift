import FerryWire
import Foundation
import Logging
import Synchronization

/// Takes recovery points of consistency groups by a two-phase cut across the members' agents.
///
/// PREPARE goes to every member host at once; each holds its members' writes (new ones wait,
/// those in flight finish) and answers with each volume's epoch and last sequence. When every
/// answer is in within the hold budget, counted from before the first PREPARE left, every
/// member was holding at that instant, so no write inside the cut can depend on one outside
/// it: the point is recorded and FINISH lets the writes go on. Any error, an offline member or
/// a late answer aborts the round; every member resumes, and no point is recorded.
///
/// App-consistent points run the policy's quiesce hook on every member host first and the
/// thaw hook after the cut (also after an abort). A hook that fails or times out leaves the
/// point crash-consistent, with the hook's error recorded.
public actor CutCoordinator {
    let store: StateStore
    let registry: SessionRegistry
    let replicas: ReplicaManager
    let metrics: ControllerMetrics
    let logger: Logger
    /// Groups with a round running: rounds of one group never overlap.
    private var running: Set<String> = []
    /// Manual points waiting for a group's round in progress to end.
    private var roundWaiters: [String: [CheckedContinuation<Void, Never>]] = [:]
    /// Why each group's last round failed (cleared by the next success).
    public private(set) var lastError: [String: String] = [:]

    public init(store: StateStore, registry: SessionRegistry, replicas: ReplicaManager, metrics: ControllerMetrics, logger: Logger) {
        self.store = store
        self.registry = registry
        self.replicas = replicas
        self.metrics = metrics
        self.logger = logger
    }

    /// Takes a point of `group` now. `manual` points are the operator's; the others come from
    /// the group's schedule. Throws (and records nothing) when the round aborts.
    public func takePoint(group name: String, app: Bool, manual: Bool, label: String? = nil, actor: String = "system") async throws -> PointRecord {
        guard let (group, members) = try await store.group(named: name) else {
            throw FerryError(.notFound, "no consistency group named '\(name)'; 'ferryctl groups' lists them")
        }
        guard !members.isEmpty else { throw FerryError(.badRequest, "group '\(name)' has no volumes") }
        // The operator's point waits for a round in progress (its own point follows); a
        // scheduled round finding one running skips its turn.
        while manual, running.contains(name) {
            await withCheckedContinuation { roundWaiters[name, default: []].append($0) }
        }
        guard running.insert(name).inserted else {
            throw FerryError(.conflict, "group '\(name)' is already taking a point; try again in a moment")
        }
        defer {
            running.remove(name)
            for waiter in roundWaiters.removeValue(forKey: name) ?? [] { waiter.resume() }
        }
        do {
            let point = try await round(group: group, members: members, app: app, manual: manual, label: label, actor: actor)
            lastError[name] = nil
            return point
        } catch {
            let message = (error as? FerryError)?.message ?? "\(error)"
            lastError[name] = message
            metrics.cutRound(group: name, outcome: "aborted")
            throw error
        }
    }

    private struct Member: Sendable {
        var hostID: String
        var hostName: String
        var session: PeerSession
        /// Where the cut's messages go: the host's control lane, or its session when it has
        /// none (an older agent, or the lane is reconnecting).
        var cuts: PeerSession
        var volumes: [String]
    }

    private func round(group: GroupRecord, members: [GroupMemberRecord], app: Bool, manual: Bool, label: String?, actor: String) async throws -> PointRecord {
        let policy = group.decodedPolicy
        let hosts = Dictionary(uniqueKeysWithValues: try await store.hosts().map { ($0.id, $0.name) })
        // Every member must be online and its replica whole: a point of a replica still
        // catching up on a resync would not be a prefix of the source's writes.
        var byHost: [String: Member] = [:]
        for m in members {
            let hostName = hosts[m.hostID] ?? m.hostID
            guard let entry = await registry.entry(hostID: m.hostID) else {
                throw FerryError(.unavailable, "host \(hostName) (volume \(m.volume)) is not connected: no point of group '\(group.name)' can be cut")
            }
            if let replica = await replicas.opened(hostID: m.hostID, volume: m.volume) {
                let state = await replica.state
                guard state.initialSynced, !state.resyncNeeded else {
                    throw FerryError(.unavailable, "\(hostName)/\(m.volume) is \(state.initialSynced ? "resyncing" : "in its initial sync"): its replica is not yet a consistent copy, so no point can be cut")
                }
            } else {
                throw FerryError(.unavailable, "\(hostName)/\(m.volume) has no replica yet")
            }
            let lane = await registry.lane(hostID: m.hostID)
            byHost[m.hostID, default: Member(hostID: m.hostID, hostName: hostName, session: entry.session,
                                           cuts: lane ?? entry.session, volumes: [])].volumes.append(m.volume)
        }
        let hostList = byHost.values.sorted { $0.hostName < $1.hostName }

        var hookError: String?
        // Names this round to its hooks: a thaw releases only the freeze of its own round.
        let round = String(UInt64.random(in: 1...UInt64.max), radix: 16)
        if app {
            if let quiesce = policy.quiesceHook, !quiesce.isEmpty {
                hookError = await runHooks(quiesce, phase: "quiesce", round: round, on: hostList, timeout: .seconds(policy.hookTimeoutSeconds))
            } else {
                hookError = "group '\(group.name)' has no quiesce hook in its policy"
            }
        }
        let outcome: Result<PointRecord, any Error>
        do {
            let point = try await cut(group: group, members: hostList, policy: policy, app: app && hookError == nil, manual: manual,
                                      label: label, hookError: hookError, actor: actor)
            outcome = .success(point)
        } catch {
            outcome = .failure(error)
        }
        if app, let thaw = policy.thawHook, !thaw.isEmpty {
            // Always thawed, even when the cut aborted: a frozen file system must not stay frozen.
            if let thawError = await runHooks(thaw, phase: "thaw", round: round, on: hostList, timeout: .seconds(policy.hookTimeoutSeconds)) {
                logger.warning("thaw hook failed", metadata: ["group": "\(group.name)", "error": "\(thawError)"])
                if case .success(var point) = outcome {
                    point.hookError = [point.hookError, thawError].compactMap { $0 }.joined(separator: "; ")
                    try? await store.updateHookError(pointID: point.id, error: point.hookError)
                    return point
                }
            }
        }
        return try outcome.get()
    }

    /// Runs a hook on every host at once; returns the errors, or nil when all succeeded.
    /// Runs hook `name` on every host; `phase` (quiesce or thaw) and `round` go to it as
    /// FERRY_HOOK_PHASE and FERRY_HOOK_ROUND: a built-in fsfreeze hook freezes or thaws by them
    /// (a thaw releases only its own round's freeze), a command may read them.
    private func runHooks(_ name: String, phase: String, round: String, on hosts: [Member], timeout: Duration) async -> String? {
        let errors = await withTaskGroup(of: String?.self) { tasks in
            for host in hosts {
                tasks.addTask {
                    do {
                        let result = try await host.session.command("hook \(name)", timeout: timeout + .seconds(5)) {
                            $0.runHook.name = name
                            $0.runHook.timeoutMs = UInt32(clamping: timeout.components.seconds * 1000)
                            $0.runHook.environment = ["FERRY_HOOK_PHASE": phase, "FERRY_HOOK_ROUND": round]
                        }
                        guard case .hookResult(let r)? = result.outcome else { return "\(host.hostName): unexpected reply to hook \(name)" }
                        return r.error.isEmpty ? nil : "\(host.hostName): \(r.error)"
                    } catch {
                        return "\(host.hostName): hook \(name) failed: \((error as? FerryError)?.message ?? "\(error)")"
                    }
                }
            }
            var all: [String] = []
            for await e in tasks { if let e { all.append(e) } }
            return all.sorted()
        }
        return errors.isEmpty ? nil : errors.joined(separator: "; ")
    }

    private func cut(group: GroupRecord, members: [Member], policy: API.GroupPolicy, app: Bool, manual: Bool, label: String?,
                     hookError: String?, actor: String) async throws -> PointRecord {
        let cutID = UInt64.random(in: 1...UInt64.max)
        let budget = Duration.milliseconds(policy.holdBudgetMilliseconds)
        let started = ContinuousClock.now
        // Phase one, to every member at once.
        let answers = await withTaskGroup(of: (Member, Result<Ferry_V1_CutPrepared, any Error>).self) { tasks in
            for member in members {
                tasks.addTask {
                    do {
                        let result = try await member.cuts.command("a cut", timeout: budget) {
                            $0.prepareCut.cutID = cutID
                            $0.prepareCut.volumes = member.volumes
                            $0.prepareCut.holdMs = UInt32(clamping: policy.holdBudgetMilliseconds)
                        }
                        guard case .cutPrepared(let p)? = result.outcome else {
                            throw FerryError(.protocolViolation, "\(member.hostName) answered a cut without its sequences")
                        }
                        return (member, .success(p))
                    } catch {
                        return (member, .failure(error))
                    }
                }
            }
            var all: [(Member, Result<Ferry_V1_CutPrepared, any Error>)] = []
            for await a in tasks { all.append(a) }
            return all
        }
        let elapsed = started.duration(to: .now)
        // The point's time is the cut's: when the last answer came in.
        let cutAt = Date()
        // The answers alone say whether the holds made a cut: the members resume at once, and
        // the replicas are checked while they do (a replica actor busy with a batch must not
        // lengthen every member's pause; the agents do not act on `committed`).
        var failure: String?
        var prepared: [(Member, Ferry_V1_CutPrepared)] = []
        for (member, answer) in answers.sorted(by: { $0.0.hostName < $1.0.hostName }) {
            switch answer {
            case .failure(let error):
                let why = (error as? FerryError)?.message ?? "\(error)"
                failure = failure ?? "\(member.hostName): \(why)"
            case .success(let p):
                guard p.cutID == cutID, Set(p.members.map(\.volume)) == Set(member.volumes) else {
                    failure = failure ?? "\(member.hostName) answered for other volumes than asked"
                    continue
                }
                prepared.append((member, p))
            }
        }
        if failure == nil, elapsed > budget {
            failure = "the members answered in \(elapsed), past the \(policy.holdBudgetMilliseconds) ms hold budget"
        }
        // Phase two: everyone resumes, whatever the outcome. Not awaited in line: the point is
        // recorded meanwhile, and the pauses come back for the metrics.
        let finishing = Task { [metrics, held = failure == nil] in
            await withTaskGroup(of: UInt64.self) { tasks in
                for member in members {
                    tasks.addTask {
                        guard let result = try? await member.cuts.command("the end of a cut", timeout: .seconds(5), {
                            $0.finishCut.cutID = cutID
                            $0.finishCut.committed = held
                        }), case .cutFinished(let f)? = result.outcome else { return 0 }
                        let pause = AgentInputChecks.pauseMicros(f)
                        metrics.cutPause(group: group.name, host: member.hostName, micros: pause)
                        return pause
                    }
                }
                var longest: UInt64 = 0
                for await p in tasks { longest = max(longest, p) }
                return longest
            }
        }
        var recorded: [PointMemberRecord] = []
        for (member, p) in prepared {
            for m in p.members {
                if m.overflowed {
                    failure = failure ?? "\(member.hostName)/\(m.volume): its change log overflowed; the volume resyncs before it can be in a point"
                }
                // The replica must still be a whole copy in the epoch the agent cut: an agent
                // that restarted since the checks above starts a new epoch and resyncs.
                if let replica = await replicas.opened(hostID: member.hostID, volume: m.volume) {
                    let state = await replica.state
                    if state.epoch != m.epoch && state.epoch != 0 || state.resyncNeeded {
                        failure = failure ?? "\(member.hostName)/\(m.volume) started a new capture epoch (its agent restarted): it resyncs before it can be in a point"
                    }
                } else {
                    failure = failure ?? "\(member.hostName)/\(m.volume) has no replica on this controller"
                }
                recorded.append(PointMemberRecord(hostID: member.hostID, volume: m.volume, epoch: m.epoch, sequence: m.sequence))
            }
        }
        let committed = failure == nil
        guard committed else {
            _ = await finishing.value
            throw FerryError(.unavailable, "cut of group '\(group.name)' aborted, no point recorded: \(failure!)")
        }
        let volumeCount = recorded.count
        let kind = manual ? PointRecord.Kind.manual
            : volumeCount > 1 ? (app ? PointRecord.Kind.groupApp : PointRecord.Kind.groupCrash)
            : (app ? PointRecord.Kind.app : PointRecord.Kind.crash)
        var point = PointRecord(
            id: Self.newID(), groupName: group.name, createdAt: cutAt, kind: kind, consistency: app ? "app" : "crash",
            label: label, hookError: hookError, members: try JSONEncoder().encode(recorded.sorted { ($0.hostID, $0.volume) < ($1.hostID, $1.volume) }),
            pauseMicros: nil, prunedAt: nil, prunedReason: nil)
        let longest = await finishing.value
        point.pauseMicros = Int64(clamping: longest)
        try await store.addPoint(point, actor: actor)
        metrics.cutRound(group: group.name, outcome: "committed")
        return point
    }

    /// Point ids sort by creation time: `p-` + milliseconds since 1970 in hex + random suffix.
    static func newID() -> String {
        let ms = UInt64(Date().timeIntervalSince1970 * 1000)
        return "p-" + String(ms, radix: 16) + "-" + String(UInt16.random(in: 0...UInt16.max), radix: 16)
    }
}
