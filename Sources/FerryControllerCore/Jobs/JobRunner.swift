import FerryWire
import Foundation
import Logging
import ServiceLifecycle

/// Runs the operations on recovery plans as persisted jobs: every step's state, timings and
/// errors are saved as they change, so a restarted controller resumes an unfinished job at the
/// step it was in (every step may run again), and `ferryctl job watch` shows live progress.
public actor JobRunner {
    let store: StateStore
    let registry: SessionRegistry
    let replicas: ReplicaManager
    let catalogue: PointCatalogue
    let exports: PointExports
    let agents: AgentServer
    let reverse: ReverseStreams
    let logger: Logger
    /// Port of the controller's NBD TLS listener, which recovery hosts reach at the address
    /// they reach the controller at.
    let exportPort: @Sendable () -> Int?
    private var running: [String: Task<Void, Never>] = [:]
    /// Bumped per launch, so a finishing run clears only its own entry in `running`.
    private var launches: [String: Int] = [:]
    private var snapshots: [String: JobSnapshot] = [:]
    /// The controller is stopping: a step that fails now because sessions close is not the
    /// job's outcome; it stays unfinished and resumes at the next start.
    private var shuttingDown = false

    init(store: StateStore, registry: SessionRegistry, replicas: ReplicaManager, catalogue: PointCatalogue, exports: PointExports,
         agents: AgentServer, reverse: ReverseStreams, logger: Logger, exportPort: @escaping @Sendable () -> Int?) {
        self.store = store
        self.registry = registry
        self.replicas = replicas
        self.catalogue = catalogue
        self.exports = exports
        self.agents = agents
        self.reverse = reverse
        self.logger = logger
        self.exportPort = exportPort
    }

    // MARK: API

    public func start(plan name: String, request: API.JobCreateRequest, actor: String) async throws -> API.Job {
        if request.hydrate == true, ![.drill, .failover, .migrate].contains(request.operation) {
            throw FerryError(.badRequest, "hydrate applies to a drill, a failover or a migration, not a \(request.operation.rawValue)")
        }
        let view = try await store.plan(named: name)
        let landed = try await store.recoveries(plan: name).contains { r in r.purpose == "failover" && r.volumes.contains { $0.hydrate == true } }
        if landed, request.operation == .rollback {
            // The recovered volumes are their hosts' own disks now, protected there: dropping what
            // they wrote is not a rollback's to do.
            throw FerryError(.unsupported, "plan \(name) failed over onto its recovery hosts' storage (hydrate): a rollback would throw away what they wrote since; reprotect and fail back instead")
        }
        if let alternates = request.failbackTo {
            guard request.operation == .failback else {
                throw FerryError(.badRequest, "--to applies to a failback, not a \(request.operation.rawValue)")
            }
            try await checkAlternates(alternates, plan: view.plan, landed: landed)
        }
        let steps = try JobPlanner.steps(for: request, plan: view.plan, state: view.state, landed: landed)
        for g in view.plan.groups where [.failover, .migrate].contains(request.operation) {
            for item in g.items {
                guard let host = try await store.host(named: item.host) else { continue }
                let scanned = try await store.volumes(hostID: host.id).filter { item.volumes.contains($0.name) && $0.captureMode == "scan" }
                if let v = scanned.first {
                    // Its workload writes the device directly: it cannot be fenced or drained.
                    throw FerryError(.badRequest, "\(item.host)/\(v.name) is captured by scanning: it cannot be fenced, so it cannot be failed over; protect it through the export")
                }
            }
        }
        if request.operation == .failover, request.planned != true, request.point == nil, request.asOf == nil {
            // Unplanned failover must name its point: the operator decides what is lost.
            throw FerryError(.badRequest, "an unplanned failover needs --point (e.g. latest-group) or --as-of; use --planned when the sources are reachable")
        }
        var id = UInt64.random(in: 0...UInt64.max)
        id >>= 16
        let job = API.Job(id: "j-" + String(id, radix: 16), plan: name, operation: request.operation, state: .running, createdAt: Date(),
                          steps: steps.map(\.1), request: request)
        let snapshot = JobSnapshot(job: job, specs: steps.map(\.0), context: JobContext())
        try await store.insertJob(snapshot, actor: actor)
        snapshots[job.id] = snapshot
        launch(job.id)
        logger.info("job started", metadata: ["job": "\(job.id)", "plan": "\(name)", "operation": "\(request.operation.rawValue)"])
        return job
    }

    public func view(id: String) async throws -> API.Job {
        if let s = snapshots[id] { return s.job }
        guard let s = try await store.job(id: id) else {
            throw FerryError(.notFound, "no job '\(id)'; 'ferryctl jobs' lists them")
        }
        return s.job
    }

    public func list() async throws -> [API.Job] {
        try await store.jobs().map { snapshots[$0.job.id]?.job ?? $0.job }
    }

    /// Lets a job waiting at a manual gate go on; or restarts a failed job at its failed step.
    public func resume(id: String, actor: String) async throws -> API.Job {
        guard let loaded = try await snapshot(id) else { throw FerryError(.notFound, "no job '\(id)'; 'ferryctl jobs' lists them") }
        let plan = try await store.plan(named: loaded.job.plan)
        // Read again after the awaits: another resume may have gone first.
        guard var s = snapshots[id] ?? (running[id] == nil ? loaded : nil) else {
            throw FerryError(.conflict, "job \(id) is running")
        }
        if let waiting = s.job.steps.firstIndex(where: { $0.state == .waiting }) {
            s.context.resumedGates.insert(waiting)
            snapshots[id] = s
            try await store.saveJob(s)
            try await store.audit(actor: actor, action: "job.resume", target: s.job.plan, detail: "\(id) gate \(waiting + 1)")
            return s.job
        }
        guard (s.job.state == .failed || s.job.state == .cancelled), running[id] == nil else {
            throw FerryError(.conflict, "job \(id) is \(s.job.state): only a job waiting at a gate, or a failed or cancelled job, can be resumed")
        }
        if let newer = plan.lastJob, newer != id {
            throw FerryError(.conflict, "job \(id) is not plan '\(s.job.plan)''s newest job (\(newer)); start a new job instead")
        }
        s.job.state = .running
        s.job.error = nil
        s.job.endedAt = nil
        for i in s.job.steps.indices where s.job.steps[i].state == .failed || s.job.steps[i].state == .running
            || (s.specs[i].kind == .reverse && s.job.steps[i].state == .done) {
            // (Reverse passes run again: the blocks written since were tracked in memory only.)
            s.job.steps[i].state = .pending
            s.job.steps[i].error = nil
        }
        snapshots[id] = s
        launch(id)
        try await store.saveJob(s)
        try await store.audit(actor: actor, action: "job.resume", target: s.job.plan, detail: "\(id) retry")
        return s.job
    }

    public func cancel(id: String, actor: String) async throws -> API.Job {
        guard var s = try await snapshot(id) else { throw FerryError(.notFound, "no job '\(id)'; 'ferryctl jobs' lists them") }
        guard !s.job.isFinished else { throw FerryError(.conflict, "job \(id) already \(s.job.state)") }
        running[id]?.cancel()
        if running[id] == nil {
            s.job.state = .cancelled
            s.job.endedAt = Date()
            snapshots[id] = s
            try await store.saveJob(s)
        }
        try await store.audit(actor: actor, action: "job.cancel", target: s.job.plan, detail: id)
        return s.job
    }

    /// After a controller restart: serve recovered volumes again, restart reverse streams, and
    /// resume every unfinished job at its first unfinished step.
    func resumeAfterRestart() async {
        do {
            for record in try await store.recoveries() {
                do {
                    try await ensureExports(record)
                } catch {
                    logger.error("cannot serve a recovered host's volumes again", metadata: ["recovery": "\(record.id)", "error": "\(error)"])
                }
            }
            for plan in try await store.plans() where plan.state == .reversed {
                await reverse.start(plan: plan.plan)
            }
            for s in try await store.jobs(unfinishedOnly: true) {
                // A job the API started since this process began (the listener opens before
                // this scan ends) runs already: launching it again would run every step twice.
                guard running[s.job.id] == nil, snapshots[s.job.id] == nil else { continue }
                var s = s
                for i in s.job.steps.indices where s.job.steps[i].state == .running {
                    s.job.steps[i].state = .pending
                    s.job.steps[i].detail = "interrupted by a controller restart; runs again"
                }
                // The blocks written since a reverse pass were tracked in memory only: every
                // pass runs again (only what differs moves), and each volume streams after its own.
                for i in s.job.steps.indices where s.specs[i].kind == .reverse && s.job.steps[i].state == .done {
                    s.job.steps[i].state = .pending
                    s.job.steps[i].detail = "runs again after a controller restart"
                }
                snapshots[s.job.id] = s
                try await store.saveJob(s)
                logger.info("job resumes after a controller restart", metadata: ["job": "\(s.job.id)", "plan": "\(s.job.plan)"])
                launch(s.job.id)
            }
        } catch {
            logger.error("cannot resume jobs", metadata: ["error": "\(error)"])
        }
    }

    private func snapshot(_ id: String) async throws -> JobSnapshot? {
        if let s = snapshots[id] { return s }
        return try await store.job(id: id)
    }

    // MARK: Running

    private func launch(_ id: String) {
        let launch = (launches[id] ?? 0) + 1
        launches[id] = launch
        running[id] = Task { await self.run(id, launch: launch) }
    }

    /// Graceful shutdown: jobs stay as they are in the database and resume at the next start.
    func shutdown() {
        shuttingDown = true
    }

    func update(_ id: String, _ change: (inout JobSnapshot) -> Void) async {
        guard var s = snapshots[id] else { return }
        change(&s)
        snapshots[id] = s
        let store = self.store
        // Saved even when the job's task is cancelled: the record must say how it ended.
        await Task { try? await store.saveJob(s) }.value
    }

    func context(_ id: String) -> JobContext { snapshots[id]?.context ?? JobContext() }

    /// Adds a line to a job's report, also to a finished job's (a drill's hydration ends after it).
    func addReport(_ id: String, key: String, value: String) async {
        if snapshots[id] != nil {
            await update(id) { $0.job.report[key] = value }
            return
        }
        guard var s = try? await store.job(id: id) else { return }
        s.job.report[key] = value
        try? await store.saveJob(s)
    }

    func current(_ id: String) -> JobSnapshot? { snapshots[id] }

    private func run(_ id: String, launch: Int) async {
        defer { if launches[id] == launch { running[id] = nil } }
        guard let first = snapshots[id] else { return }
        let plan: RecoveryPlan
        do {
            plan = try await store.plan(named: first.job.plan).plan
        } catch {
            await finish(id, state: .failed, error: "plan '\(first.job.plan)' is gone: \(error)")
            return
        }
        var i = 0
        while i < first.specs.count {
            if Task.isCancelled {
                await finish(id, state: .cancelled, error: "cancelled by the operator before step \(i + 1)")
                return
            }
            guard let s = snapshots[id] else { return }
            if s.job.steps[i].state == .done || s.job.steps[i].state == .skipped { i += 1; continue }
            // A batch: consecutive steps of the same kind and group run in parallel.
            var batch = [i]
            while let last = batch.last, last + 1 < s.specs.count, s.specs[last + 1].runsWith(s.specs[i]),
                  s.job.steps[last + 1].state != .done {
                batch.append(last + 1)
            }
            let failures = await withTaskGroup(of: String?.self) { group in
                for index in batch {
                    group.addTask { await self.runStep(id, index: index, spec: s.specs[index], plan: plan) }
                }
                var errors: [String] = []
                for await e in group { if let e { errors.append(e) } }
                return errors
            }
            if !failures.isEmpty {
                if Task.isCancelled {
                    await finish(id, state: .cancelled, error: "cancelled by the operator: " + failures.joined(separator: "; "))
                } else {
                    await finish(id, state: .failed, error: failures.joined(separator: "; "))
                }
                return
            }
            i = (batch.last ?? i) + 1
        }
        await finish(id, state: .succeeded, error: nil)
    }

    private func finish(_ id: String, state: API.JobState, error: String?) async {
        if shuttingDown, state != .succeeded {
            logger.info("job interrupted by the controller stopping; it resumes at the next start", metadata: ["job": "\(id)"])
            return
        }
        await update(id) { s in
            s.job.state = state
            s.job.error = error
            s.job.endedAt = Date()
        }
        if state != .succeeded, let s = snapshots[id], let partial = Self.stateAfterPartialRun(s) {
            // What was done stays done, and the plan's state says so: a drill that recovered
            // some hosts is cleaned up by `drill cleanup`; fenced sources mean failed over.
            // A task of its own: this one may be cancelled, and the database refuses work then.
            let store = self.store
            await Task { try? await store.setPlanState(s.job.plan, partial, job: id) }.value
        }
        logger.info("job ended", metadata: ["job": "\(id)", "state": "\(state)", "error": "\(error ?? "")"])
    }

    /// Runs one step within its timeout; returns its error, if any.
    private func runStep(_ id: String, index: Int, spec: JobStepSpec, plan: RecoveryPlan) async -> String? {
        let timeout = snapshots[id]?.job.steps[index].timeoutSeconds ?? 600
        await update(id) { s in
            s.job.steps[index].state = .running
            s.job.steps[index].startedAt = s.job.steps[index].startedAt ?? Date()
            s.job.steps[index].error = nil
        }
        do {
            let detail = try await withThrowingTaskGroup(of: String?.self) { group in
                group.addTask { try await self.execute(id, index: index, spec: spec, plan: plan) }
                group.addTask {
                    try await Task.sleep(for: .seconds(Int64(timeout)))
                    throw FerryError(.timeout, "timed out after \(timeout) s")
                }
                defer { group.cancelAll() }
                return try await group.next() ?? nil
            }
            await update(id) { s in
                s.job.steps[index].state = .done
                s.job.steps[index].endedAt = Date()
                s.job.steps[index].progress = 1
                if let detail { s.job.steps[index].detail = detail }
            }
            return nil
        } catch {
            let message = (error as? FerryError)?.message ?? (error is CancellationError ? "cancelled" : "\(error)")
            await update(id) { s in
                s.job.steps[index].state = .failed
                s.job.steps[index].endedAt = Date()
                s.job.steps[index].error = message
            }
            return "\(snapshots[id]?.job.steps[index].name ?? "step \(index + 1)"): \(message)"
        }
    }

    /// The plan's state after a job that failed or was cancelled part way, if it changed anything.
    static func stateAfterPartialRun(_ s: JobSnapshot) -> API.PlanState? {
        func done(_ kind: JobStepSpec.Kind) -> Bool {
            zip(s.specs, s.job.steps).contains { $0.kind == kind && $1.state == .done }
        }
        func started(_ kind: JobStepSpec.Kind) -> Bool {
            zip(s.specs, s.job.steps).contains { $0.kind == kind && $1.state != .pending }
        }
        switch s.job.operation {
        case .drill: return done(.recover) ? .drill : nil
        // A fence step that failed part way may have fenced some sources: `rollback` undoes it.
        case .failover, .migrate: return started(.fenceSources) ? .failedOver : nil
        // Some sinks hold recovered blocks already: only failback (its last passes) may follow.
        case .reprotect: return done(.reverse) ? .reversed : nil
        default: return nil
        }
    }

    func setProgress(_ id: String, index: Int, _ progress: Double, detail: String? = nil) async {
        await update(id) { s in
            s.job.steps[index].progress = progress
            if let detail { s.job.steps[index].detail = detail }
        }
    }
}
