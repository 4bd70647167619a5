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
        public var state: PlanState
        public var updatedAt: Date
        /// The newest job of this plan.
        public var lastJob: String?
        /// The YAML as applied.
        public var source: String
        /// Recovered volumes of this plan being copied onto their recovery hosts' storage.
        public var hydration: [Hydration]?
        public init(plan: RecoveryPlan, state: PlanState, updatedAt: Date, lastJob: String?, source: String) {
            self.plan = plan
            self.state = state
            self.updatedAt = updatedAt
            self.lastJob = lastJob
            self.source = source
        }
    }

    /// Where a recovery plan stands (its JSON value is the raw value).
    public enum PlanState: String, Codable, Sendable, CaseIterable, CustomStringConvertible {
        /// The sources replicate to this site.
        case protected
        /// A drill is up.
        case drill
        case failedOver = "failed-over"
        case committed
        /// Reprotected: the recovered hosts are the sources, the original hosts sinks.
        case reversed
        /// The sources are unprotected; the plan runs in this site.
        case migrated

        public var description: String { rawValue }
    }

    /// Where a job stands.
    public enum JobState: String, Codable, Sendable, CaseIterable, CustomStringConvertible {
        case running
        /// At a manual gate: `ferryctl job resume` goes on.
        case waiting
        case succeeded, failed, cancelled

        /// It ended (and may be resumed only if it failed or was cancelled).
        public var isFinished: Bool { self == .succeeded || self == .failed || self == .cancelled }
        public var description: String { rawValue }
    }

    /// Where one step of a job stands.
    public enum StepState: String, Codable, Sendable, CaseIterable, CustomStringConvertible {
        case pending, running
        /// A manual gate waiting for `ferryctl job resume`.
        case waiting
        case done, failed, skipped

        public var description: String { rawValue }
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
        /// Drills: each recovered volume lands on the recovery host's own storage (hydration),
        /// as the plan's `targets` say; the controller's point export goes once it is complete.
        public var hydrate: Bool?
        /// Failback of a failover that landed: items that go home to another enrolled host than
        /// their original one (item host → new host). The new host's volumes of the same names
        /// are made equal (a delta when it holds an older copy, a full copy otherwise) and take
        /// the item's place in the plan and its groups.
        public var failbackTo: [String: String]?
        public init(operation: JobOperation, point: String? = nil, asOf: Date? = nil, planned: Bool? = nil, hydrate: Bool? = nil,
                    failbackTo: [String: String]? = nil) {
            self.operation = operation
            self.point = point
            self.asOf = asOf
            self.planned = planned
            self.hydrate = hydrate
            self.failbackTo = failbackTo
        }
    }

    /// One step of a job.
    public struct JobStep: Codable, Sendable, Equatable {
        public var state: StepState
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
        public init(state: StepState, name: String, group: String?, timeoutSeconds: Int) {
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
        public var state: JobState
        public var createdAt: Date
        public var endedAt: Date?
        public var error: String?
        public var steps: [JobStep]
        /// Point chosen, RPO/RTO, data verified, bytes moved: the job's report lines.
        public var report: [String: String]
        /// The options it was started with.
        public var request: JobCreateRequest
        public init(id: String, plan: String, operation: JobOperation, state: JobState, createdAt: Date, steps: [JobStep],
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

        public var isFinished: Bool { state.isFinished }
    }
}

extension API {
    /// A recovered volume being copied onto its recovery host's own storage.
    public struct Hydration: Codable, Sendable, Equatable {
        public var plan: String
        /// The protected volume it recovers, `HOST/VOLUME`.
        public var volume: String
        public var recoveryHost: String
        /// Its name (and socket) on the recovery host.
        public var localName: String
        /// The file or block device it lands on.
        public var target: String
        public var sizeBytes: UInt64
        /// Bytes on the target so far (holes and zero ranges count without being moved).
        public var localBytes: UInt64
        /// Bytes fetched over the network so far.
        public var fetchedBytes: UInt64
        public var bytesPerSecond: Double
        /// Seconds the recovery host's background copy has run (to completion, once complete).
        public var copySeconds: Double?
        /// Every block is local.
        public var complete: Bool
        /// The controller's point export for it is gone: it is off the controller's data path.
        public var released: Bool
        public var updatedAt: Date

        public init(plan: String, volume: String, recoveryHost: String, localName: String, target: String, sizeBytes: UInt64,
                    localBytes: UInt64, fetchedBytes: UInt64, bytesPerSecond: Double, complete: Bool, released: Bool, updatedAt: Date) {
            self.plan = plan; self.volume = volume; self.recoveryHost = recoveryHost; self.localName = localName
            self.target = target; self.sizeBytes = sizeBytes; self.localBytes = localBytes; self.fetchedBytes = fetchedBytes
            self.bytesPerSecond = bytesPerSecond; self.complete = complete; self.released = released; self.updatedAt = updatedAt
        }

        /// Seconds until complete at the current rate; nil when unknown (no rate yet).
        public var etaSeconds: Double? {
            guard !complete else { return 0 }
            guard bytesPerSecond > 0 else { return nil }
            return Double(sizeBytes - min(localBytes, sizeBytes)) / bytesPerSecond
        }
    }
}
