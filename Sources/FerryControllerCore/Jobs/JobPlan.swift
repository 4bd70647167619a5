import FerryWire
import Foundation

/// What one step of a job does. Steps are persisted with the job, so a restarted controller
/// knows exactly where a job stood; every step can run again after a crash (idempotent).
struct JobStepSpec: Codable, Sendable, Equatable {
    enum Kind: String, Codable, Sendable {
        /// Chooses the point of every volume (drill, unplanned failover).
        case resolvePoint
        /// A failover that lands on the recovery hosts (hydrate): each checks its targets (allowed,
        /// big enough, room for the point's data) before anything is fenced.
        case preflight
        /// Runs an item's stop hook on its source host (planned failover).
        case stopSource
        /// New generation for every volume of the plan; sources refuse writes from now on.
        case fenceSources
        /// Waits until the replicas hold every write the fenced sources captured: zero data loss.
        case drain
        /// A group's pre or post step: a hook on a host, or a manual gate.
        case pre, post
        /// Serves an item's volumes to its recovery host and runs its start hook there.
        case recover
        /// Runs an item's stop hook on its recovery host and withdraws its local exports.
        case stopRecovery
        /// Drops the recovered volumes' exports and overlays.
        case releaseRecovered
        /// Reprotect: the original host becomes a sink; delta resync by block hashes, then a
        /// continuous reverse stream.
        case reverse
        /// Failback: stops the reverse streams after a last pass that proves every block equal.
        case finalReverse
        /// Failback: sources own their volumes again (new generation) and resync the replica.
        case unfenceSources
        /// Runs an item's start hook on its source host (failback).
        case startSource
        case commit
        case unprotectSources
        /// Sets the plan's state and writes the report.
        case settle
        /// A failover that landed: each source consistency group gets a twin over the recovered
        /// volumes, with the same policy.
        case mirrorGroups
        /// Failback of a failover that landed: the recovered volumes are fenced (new generation)
        /// and drained into their replicas here, as the sources are for a planned failover.
        case fenceRecovered, drainRecovered
        /// Failback of a failover that landed: the recovered volumes are no longer protected on
        /// their recovery hosts (their disks stay there), their mirrored groups go.
        case releaseLanded
        /// Failback to another host (`--to HOST=NEWHOST`): NEWHOST's volumes are protected (or
        /// found), fenced and made equal to the recovered ones; then NEWHOST takes HOST's place
        /// in the plan and its groups (`rehome`).
        case prepareAlternate, rehome
    }
    var kind: Kind
    var group: String?
    var host: String?
    var index: Int?
    /// For settle: the plan's state afterwards.
    var state: API.PlanState?

    /// Steps of the same kind in the same group run in parallel (items of a group start together).
    func runsWith(_ other: JobStepSpec) -> Bool {
        kind == other.kind && group == other.group && host != nil && other.host != nil
            && [.recover, .stopRecovery, .stopSource, .startSource, .reverse].contains(kind)
    }
}

/// The state of a job that outlives a controller restart: the API view plus what its steps
/// decided (points, fence results).
struct JobSnapshot: Codable, Sendable {
    var job: API.Job
    var specs: [JobStepSpec]
    var context: JobContext
}

struct JobContext: Codable, Sendable {
    struct Position: Codable, Sendable, Equatable {
        var epoch: UInt64
        var sequence: UInt64
        var point: String
        var pointTime: Date?
    }
    struct Fenced: Codable, Sendable {
        var epoch: UInt64
        var lastSequence: UInt64
        var at: Date
    }
    /// "HOST/VOLUME" → where it is recovered from.
    var positions: [String: Position] = [:]
    var fenced: [String: Fenced] = [:]
    /// Indices of gate steps an operator resumed.
    var resumedGates: Set<Int> = []
    /// When each recovery's start hook finished ("HOST" → time), for the RTO.
    var started: [String: Date] = [:]
    var bytesCompared: UInt64 = 0
    var bytesSent: UInt64 = 0
}

enum JobPlanner {
    /// The steps of an operation on a plan in a given state; refuses what the state does not allow.
    /// `landed`: the plan's failover landed on its recovery hosts (hydrate).
    static func steps(for request: API.JobCreateRequest, plan: RecoveryPlan, state: API.PlanState, landed: Bool = false) throws
        -> [(JobStepSpec, API.JobStep)] {
        var out: [(JobStepSpec, API.JobStep)] = []
        func add(_ kind: JobStepSpec.Kind, _ name: String, group: String? = nil, host: String? = nil, index: Int? = nil,
                 state: API.PlanState? = nil, timeout: Int = 600) {
            out.append((JobStepSpec(kind: kind, group: group, host: host, index: index, state: state),
                        API.JobStep(state: .pending, name: name, group: group, timeoutSeconds: timeout)))
        }
        func need(_ allowed: [API.PlanState], _ what: String) throws {
            guard allowed.contains(state) else {
                throw FerryError(.conflict, "plan '\(plan.name)' is \(state.rawValue); \(what) needs it \(allowed.map(\.rawValue).joined(separator: " or "))")
            }
        }
        func recoverGroups() {
            for g in plan.groups {
                for (i, step) in g.pre.enumerated() { add(.pre, describe(step, "before \(g.name)"), group: g.name, index: i, timeout: step.timeoutSeconds) }
                for item in g.items {
                    add(.recover, "recover \(item.host) on \(item.recoveryHost)", group: g.name, host: item.host, timeout: item.timeoutSeconds + 60)
                }
                for (i, step) in g.post.enumerated() { add(.post, describe(step, "after \(g.name)"), group: g.name, index: i, timeout: step.timeoutSeconds) }
            }
        }
        /// Stop hooks on the recovery hosts and the recovered volumes withdrawn, last group first.
        func stopRecovered() {
            for g in plan.groups.reversed() {
                for item in g.items {
                    add(.stopRecovery, "stop \(item.host) on \(item.recoveryHost)", group: g.name, host: item.host, timeout: item.timeoutSeconds + 60)
                }
            }
        }
        /// The sources started again in plan order, with each group's pre and post steps.
        func startSources() {
            for g in plan.groups {
                for (i, step) in g.pre.enumerated() { add(.pre, describe(step, "before \(g.name)"), group: g.name, index: i, timeout: step.timeoutSeconds) }
                for item in g.items { add(.startSource, "start \(item.host)", group: g.name, host: item.host, timeout: item.timeoutSeconds) }
                for (i, step) in g.post.enumerated() { add(.post, describe(step, "after \(g.name)"), group: g.name, index: i, timeout: step.timeoutSeconds) }
            }
        }
        func preflight() {
            guard request.hydrate == true else { return }
            for g in plan.groups {
                for item in g.items {
                    add(.preflight, "pre-flight on \(item.recoveryHost): targets for \(item.host)", group: g.name, host: item.host, timeout: 300)
                }
            }
        }
        func mirrorGroups() {
            guard request.hydrate == true else { return }
            add(.mirrorGroups, "groups over the recovered volumes, as over the sources", timeout: 60)
        }
        func plannedFailover() {
            preflight()
            for g in plan.groups.reversed() {
                for item in g.items { add(.stopSource, "stop \(item.host)", group: g.name, host: item.host, timeout: item.timeoutSeconds) }
            }
            add(.fenceSources, "fence sources (new generation)", timeout: 120)
            add(.drain, "drain: every captured write durable", timeout: 300)
            recoverGroups()
        }
        switch request.operation {
        case .drill:
            try need([.protected], "a drill")
            add(.resolvePoint, "choose point \(request.point ?? (request.asOf == nil ? "latest" : "as of"))", timeout: 60)
            recoverGroups()
            add(.settle, "drill up", state: .drill, timeout: 60)
        case .drillCleanup:
            try need([.drill], "drill cleanup")
            stopRecovered()
            add(.releaseRecovered, "drop overlays", timeout: 120)
            add(.settle, "drill report", state: .protected, timeout: 60)
        case .failover:
            try need([.protected], "a failover")
            if request.planned == true {
                plannedFailover()
            } else {
                add(.resolvePoint, "choose point \(request.point ?? (request.asOf == nil ? "latest-group" : "as of"))", timeout: 60)
                preflight()
                add(.fenceSources, "fence sources (new generation)", timeout: 120)
                recoverGroups()
            }
            mirrorGroups()
            add(.settle, "failed over", state: .failedOver, timeout: 60)
        case .commit:
            try need([.failedOver], "commit")
            add(.commit, "commit", timeout: 60)
            add(.settle, "committed", state: .committed, timeout: 60)
        case .reprotect:
            try need([.failedOver, .committed], "reprotect")
            for g in plan.groups {
                for item in g.items {
                    add(.reverse, "reverse \(item.recoveryHost) → \(item.host) (delta by block hashes" + (landed ? ", then its journal in write order)" : ")"),
                        group: g.name, host: item.host, timeout: 3600)
                }
            }
            add(.settle, "reprotected", state: .reversed, timeout: 60)
        case .failback where landed:
            // A planned failover in reverse: nothing the recovered site wrote is lost.
            try need([.reversed], "failback")
            stopRecovered()
            add(.fenceRecovered, "fence the recovered volumes (new generation)", timeout: 120)
            add(.drainRecovered, "drain: every write of the recovered volumes durable here", timeout: 300)
            let alternates = request.failbackTo ?? [:]
            for g in plan.groups {
                for item in g.items {
                    guard let to = alternates[item.host] else { continue }
                    add(.prepareAlternate, "make \(to)'s volumes equal to \(item.recoveryHost)'s (delta if it holds an older copy, full copy otherwise)",
                        group: g.name, host: item.host, timeout: 3600)
                }
            }
            add(.finalReverse, "sinks hold the last record; every block equal", timeout: 3600)
            if !alternates.isEmpty {
                add(.rehome, "plan and groups: " + alternates.sorted { $0.key < $1.key }.map { "\($0.key) → \($0.value)" }.joined(separator: ", "), timeout: 120)
            }
            add(.unfenceSources, "sources own their volumes (new generation), replicas resync", timeout: 3600)
            startSources()
            add(.releaseLanded, "recovered volumes no longer protected on the recovery hosts", timeout: 120)
            add(.releaseRecovered, "drop exports", timeout: 120)
            add(.settle, "failed back", state: .protected, timeout: 60)
        case .failback:
            try need([.reversed], "failback")
            stopRecovered()
            add(.finalReverse, "last reverse pass: every block equal", timeout: 3600)
            add(.unfenceSources, "sources own their volumes (new generation), replicas resync", timeout: 3600)
            startSources()
            add(.releaseRecovered, "drop overlays", timeout: 120)
            add(.settle, "failed back", state: .protected, timeout: 60)
        case .rollback:
            try need([.failedOver], "a rollback")
            stopRecovered()
            add(.releaseRecovered, "drop overlays (the recovered hosts' writes)", timeout: 120)
            add(.unfenceSources, "sources own their volumes (new generation), replicas resync", timeout: 3600)
            startSources()
            add(.settle, "rolled back", state: .protected, timeout: 60)
        case .migrate:
            try need([.protected], "a migration")
            plannedFailover()
            mirrorGroups()
            add(.commit, "commit", timeout: 60)
            add(.unprotectSources, "unprotect sources", timeout: 120)
            add(.settle, "migrated", state: .migrated, timeout: 60)
        }
        return out
    }

    static func describe(_ step: RecoveryPlanStep, _ when: String) -> String {
        switch step {
        case .hook(let host, let name, _): return "hook \(name) on \(host) \(when)"
        case .gate(let message, _): return "gate \(when): \(message)"
        }
    }
}
