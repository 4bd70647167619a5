import Foundation

extension API {
    /// `POST /v1/plans`: a plan file as the operator wrote it; the controller parses and
    /// validates it, so errors name the file's lines.
    public struct PlanApplyRequest: Codable, Sendable {
        public var file: String
        public var text: String
        public init(file: String, text: String) {
            self.file = file
            self.text = text
        }
    }

    /// A recovery plan and where it stands.
    public struct Plan: Codable, Sendable {
        public var plan: RecoveryPlan
        /// `protected` (sources replicate to this site), `drill` (a drill is up), `failed-over`,
        /// `committed`, `reversed` (reprotected: the recovered hosts are the sources),
        /// `migrated` (sources unprotected, the plan runs in this site).
        public var state: String
        public var updatedAt: Date
        /// The newest job of this plan.
        public var lastJob: String?
        /// The YAML as applied.
        public var source: String
        public init(plan: RecoveryPlan, state: String, updatedAt: Date, lastJob: String?, source: String) {
            self.plan = plan
            self.state = state
            self.updatedAt = updatedAt
            self.lastJob = lastJob
            self.source = source
        }
    }

    /// Operations on a plan, each run as a job.
    public enum JobOperation: String, Codable, Sendable, CaseIterable {
        case drill
        case drillCleanup = "drill-cleanup"
        case failover
        case commit
        case reprotect
        case failback
        case migrate
        /// Back to the sources after a failover that has not been reprotected: the recovered
        /// hosts stop, their overlays (and what they wrote) are dropped, the sources own their
        /// volumes again. For a failover that went wrong or was a mistake.
        case rollback
    }

    /// `POST /v1/plans/:name/jobs`.
    public struct JobCreateRequest: Codable, Sendable {
        public var operation: JobOperation
        /// A point id or word (latest, latest-group, ...); drills and unplanned failovers.
        public var point: String?
        public var asOf: Date?
        /// Failover: planned (sources reachable, drained: zero data loss) or unplanned.
        public var planned: Bool?
        public init(operation: JobOperation, point: String? = nil, asOf: Date? = nil, planned: Bool? = nil) {
            self.operation = operation
            self.point = point
            self.asOf = asOf
            self.planned = planned
        }
    }

    /// One step of a job.
    public struct JobStep: Codable, Sendable, Equatable {
        /// `pending`, `running`, `waiting` (a manual gate), `done`, `failed`, `skipped`.
        public var state: String
        public var name: String
        /// The plan group it belongs to, if any.
        public var group: String?
        public var startedAt: Date?
        public var endedAt: Date?
        /// 0...1 while running, for progress bars.
        public var progress: Double?
        /// What it did or is doing, in a line.
        public var detail: String?
        public var error: String?
        /// Longest the step may take.
        public var timeoutSeconds: Int
        public init(state: String, name: String, group: String?, timeoutSeconds: Int) {
            self.state = state
            self.name = name
            self.group = group
            self.timeoutSeconds = timeoutSeconds
        }

        public var seconds: Double? {
            guard let startedAt else { return nil }
            return (endedAt ?? Date()).timeIntervalSince(startedAt)
        }
    }

    /// A persisted run of an operation on a plan.
    public struct Job: Codable, Sendable {
        public var id: String
        public var plan: String
        public var operation: JobOperation
        /// `running`, `waiting` (a gate), `succeeded`, `failed`, `cancelled`.
        public var state: String
        public var createdAt: Date
        public var endedAt: Date?
        public var error: String?
        public var steps: [JobStep]
        /// Point chosen, RPO/RTO, data verified, bytes moved: the job's report lines.
        public var report: [String: String]
        /// The options it was started with.
        public var request: JobCreateRequest
        public init(id: String, plan: String, operation: JobOperation, state: String, createdAt: Date, steps: [JobStep],
                    request: JobCreateRequest) {
            self.id = id
            self.plan = plan
            self.operation = operation
            self.state = state
            self.createdAt = createdAt
            self.steps = steps
            self.report = [:]
            self.request = request
        }

        public var isFinished: Bool { ["succeeded", "failed", "cancelled"].contains(state) }
    }
}
