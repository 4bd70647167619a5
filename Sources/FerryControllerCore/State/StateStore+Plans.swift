import FerryWire
import Foundation
import GRDB

// MARK: - Recovery plans, jobs, recoveries and fencing

// Stored as their raw values (the text the API shows).
extension API.PlanState: DatabaseValueConvertible {}
extension API.JobState: DatabaseValueConvertible {}

struct PlanRecord: Codable, FetchableRecord, PersistableRecord, Sendable {
    static let databaseTableName = "recoveryPlan"
    var name: String
    var plan: Data          // RecoveryPlan, JSON
    var source: String      // the YAML as applied
    var state: API.PlanState
    var updatedAt: Date
    var lastJob: String?

    var decoded: RecoveryPlan { (try? JSONDecoder().decode(RecoveryPlan.self, from: plan)) ?? RecoveryPlan(name: name, description: "", groups: []) }

    var view: API.Plan { API.Plan(plan: decoded, state: state, updatedAt: updatedAt, lastJob: lastJob, source: source) }
}

struct JobRecord: Codable, FetchableRecord, PersistableRecord, Sendable {
    static let databaseTableName = "job"
    var id: String
    var plan: String
    var operation: String
    var state: API.JobState
    var snapshot: Data      // JobSnapshot, JSON
    var createdAt: Date
    var updatedAt: Date
}

/// A recovered host's volumes: which exports serve them, so a restarted controller serves
/// them again (same ids, same overlays) and the recovery host's NBD clients reconnect.
public struct RecoveryRecord: Codable, Sendable, Equatable {
    public struct Volume: Codable, Sendable, Equatable {
        /// "HOST/VOLUME" of the protected volume.
        public var source: String
        public var sourceHostID: String
        public var volume: String
        public var exportID: String
        public var epoch: UInt64
        public var sequence: UInt64
        public var point: String
        public var size: UInt64
        /// Local name on the recovery host.
        public var localName: String
        /// Hydrated onto the recovery host's storage (at `target`, or its default): the export
        /// is a read-only point, released once `released` (every block local there).
        public var hydrate: Bool?
        public var target: String?
        public var released: Bool?
    }
    public var id: String
    public var plan: String
    public var sourceHost: String
    public var recoveryHost: String
    /// `drill` or `failover`.
    public var purpose: String
    public var network: String
    public var volumes: [Volume]
    public var startedAt: Date
    /// The job that made it: only that job (resumed) may reuse it.
    public var job: String?

    public static func id(plan: String, host: String) -> String { plan + "." + host }
}

struct RecoveryRow: Codable, FetchableRecord, PersistableRecord, Sendable {
    static let databaseTableName = "recovery"
    var id: String
    var plan: String
    var record: Data
}

extension StateStore {
    static func registerPlanMigration(_ m: inout DatabaseMigrator) {
        m.registerMigration("v5-plans-jobs-fencing") { db in
            try db.alter(table: "volume") { t in
                t.add(column: "generation", .integer).notNull().defaults(to: 0)
                t.add(column: "fenced", .boolean).notNull().defaults(to: false)
            }
            try db.create(table: "recoveryPlan") { t in
                t.primaryKey("name", .text)
                t.column("plan", .blob).notNull()
                t.column("source", .text).notNull()
                t.column("state", .text).notNull()
                t.column("updatedAt", .datetime).notNull()
                t.column("lastJob", .text)
            }
            try db.create(table: "job") { t in
                t.primaryKey("id", .text)
                t.column("plan", .text).notNull()
                t.column("operation", .text).notNull()
                t.column("state", .text).notNull()
                t.column("snapshot", .blob).notNull()
                t.column("createdAt", .datetime).notNull()
                t.column("updatedAt", .datetime).notNull()
            }
            try db.create(index: "job_plan", on: "job", columns: ["plan", "createdAt"])
            try db.create(table: "recovery") { t in
                t.primaryKey("id", .text)
                t.column("plan", .text).notNull()
                t.column("record", .blob).notNull()
            }
        }
        m.registerMigration("v6-volume-fence-position") { db in
            // Where a fenced volume's replication stops: nothing past it is taken.
            try db.alter(table: "volume") { t in
                t.add(column: "fenceEpoch", .integer)
                t.add(column: "fenceSequence", .integer)
            }
        }
    }

    // MARK: Plans

    /// What a plan file is checked against: enrolled hosts, their protected volumes, and the
    /// volumes other plans already hold.
    public func planKnowledge() async throws -> PlanParser.Known {
        try await pool.read { db in
            let hosts = try HostRecord.filter(Column("state") != "removed").fetchAll(db)
            let names = Dictionary(hosts.map { ($0.id, $0.name) }, uniquingKeysWith: { a, _ in a })
            var volumes: [String: [String]] = [:]
            for v in try VolumeRecord.fetchAll(db) {
                guard let host = names[v.hostID] else { continue }
                volumes[host, default: []].append(v.name)
            }
            var taken: [String: String] = [:]
            for p in try PlanRecord.fetchAll(db) {
                for key in p.decoded.volumeKeys { taken[key] = p.name }
            }
            return PlanParser.Known(hosts: Set(hosts.map(\.name)), volumes: volumes.mapValues { $0.sorted() }, taken: taken)
        }
    }

    /// Adds a plan, or replaces one that is not in the middle of anything.
    public func applyPlan(_ plan: RecoveryPlan, source: String, actor: String) async throws -> API.Plan {
        try await pool.write { db in
            var record = PlanRecord(name: plan.name, plan: try JSONEncoder().encode(plan), source: source, state: .protected,
                                    updatedAt: Date(), lastJob: nil)
            if let old = try PlanRecord.fetchOne(db, key: plan.name) {
                guard old.state == .protected else {
                    throw FerryError(.conflict, "plan '\(plan.name)' is \(old.state); it can change only while protected")
                }
                try Self.requireNoRunningJob(db, plan: plan.name)
                record.lastJob = old.lastJob
            }
            try record.save(db)
            try Self.audit(db, actor: actor, action: "plan.apply", target: plan.name,
                           detail: "groups=\(plan.groups.map(\.name).joined(separator: ",")) volumes=\(plan.volumeKeys.count)")
            return record.view
        }
    }

    static func requireNoRunningJob(_ db: Database, plan: String) throws {
        if let job = try JobRecord.filter(Column("plan") == plan && !API.JobState.allCases.filter(\.isFinished).contains(Column("state"))).fetchOne(db) {
            throw FerryError(.conflict, "plan '\(plan)' has job \(job.id) (\(job.operation)) \(job.state); wait for it, or 'ferryctl job cancel \(job.id)'")
        }
    }

    public func plans() async throws -> [API.Plan] {
        try await pool.read { db in try PlanRecord.order(Column("name")).fetchAll(db).map(\.view) }
    }

    public func plan(named name: String) async throws -> API.Plan {
        try await pool.read { db in
            guard let record = try PlanRecord.fetchOne(db, key: name) else {
                throw FerryError(.notFound, "no recovery plan named '\(name)'; 'ferryctl plans' lists them")
            }
            return record.view
        }
    }

    public func deletePlan(named name: String, actor: String) async throws {
        try await pool.write { db in
            guard let record = try PlanRecord.fetchOne(db, key: name) else {
                throw FerryError(.notFound, "no recovery plan named '\(name)'; 'ferryctl plans' lists them")
            }
            guard record.state == .protected || record.state == .migrated else {
                throw FerryError(.conflict, "plan '\(name)' is \(record.state); bring it back to protected (drill cleanup, failback) before deleting it")
            }
            try Self.requireNoRunningJob(db, plan: name)
            try record.delete(db)
            try Self.audit(db, actor: actor, action: "plan.delete", target: name)
        }
    }

    func setPlanState(_ name: String, _ state: API.PlanState, job: String? = nil) async throws {
        try await pool.write { db in
            try db.execute(sql: "UPDATE recoveryPlan SET state = ?, updatedAt = ?, lastJob = COALESCE(?, lastJob) WHERE name = ?",
                           arguments: [state, Date(), job, name])
        }
    }

    // MARK: Jobs

    /// Records a new job, refusing it while another job of the plan is unfinished.
    func insertJob(_ job: JobSnapshot, actor: String) async throws {
        try await pool.write { db in
            try Self.requireNoRunningJob(db, plan: job.job.plan)
            try JobRecord(id: job.job.id, plan: job.job.plan, operation: job.job.operation.rawValue, state: job.job.state,
                          snapshot: try JSONEncoder().encode(job), createdAt: job.job.createdAt, updatedAt: Date()).insert(db)
            try db.execute(sql: "UPDATE recoveryPlan SET lastJob = ? WHERE name = ?", arguments: [job.job.id, job.job.plan])
            try Self.audit(db, actor: actor, action: "job.start", target: job.job.plan,
                           detail: "\(job.job.id) \(job.job.operation.rawValue)\(job.job.request.point.map { " point=\($0)" } ?? "")")
        }
    }

    func saveJob(_ job: JobSnapshot) async throws {
        let data = try JSONEncoder().encode(job)
        try await pool.write { db in
            try db.execute(sql: "UPDATE job SET state = ?, snapshot = ?, updatedAt = ? WHERE id = ?",
                           arguments: [job.job.state, data, Date(), job.job.id])
        }
    }

    func job(id: String) async throws -> JobSnapshot? {
        try await pool.read { db in
            try JobRecord.fetchOne(db, key: id).map { try JSONDecoder().decode(JobSnapshot.self, from: $0.snapshot) }
        }
    }

    func jobs(plan: String? = nil, unfinishedOnly: Bool = false, limit: Int = 200) async throws -> [JobSnapshot] {
        try await pool.read { db in
            var q = JobRecord.order(Column("createdAt").desc).limit(limit)
            if let plan { q = q.filter(Column("plan") == plan) }
            if unfinishedOnly { q = q.filter(!API.JobState.allCases.filter(\.isFinished).contains(Column("state"))) }
            return try q.fetchAll(db).map { try JSONDecoder().decode(JobSnapshot.self, from: $0.snapshot) }
        }
    }

    // MARK: Recoveries

    func saveRecovery(_ record: RecoveryRecord) async throws {
        let data = try JSONEncoder().encode(record)
        try await pool.write { db in try RecoveryRow(id: record.id, plan: record.plan, record: data).save(db) }
    }

    func recoveries(plan: String? = nil) async throws -> [RecoveryRecord] {
        try await pool.read { db in
            var q = RecoveryRow.order(Column("id"))
            if let plan { q = q.filter(Column("plan") == plan) }
            return try q.fetchAll(db).map { try JSONDecoder().decode(RecoveryRecord.self, from: $0.record) }
        }
    }

    func deleteRecovery(id: String) async throws {
        try await pool.write { db in _ = try RecoveryRow.deleteOne(db, key: id) }
    }

    // MARK: Fencing

    /// Fences volumes for a failover: a new generation, and the other site owns them now.
    /// `held` is where each replica stands (by `HOST-ID/VOLUME`): no record past it is taken
    /// unless the source's fence answer reports more (`recordFenceAnswer`). Returns each
    /// volume's record as it is now.
    func fence(_ volumes: [(hostID: String, name: String)], held: [String: ReplicaPosition], plan: String, actor: String) async throws -> [String: VolumeRecord] {
        try await pool.write { db in
            var records: [String: VolumeRecord] = [:]
            for v in volumes {
                guard var record = try VolumeRecord.filter(Column("hostID") == v.hostID && Column("name") == v.name).fetchOne(db) else { continue }
                if !record.fenced {
                    record.generation += 1
                    record.fenced = true
                    let position = held[v.hostID + "/" + v.name] ?? ReplicaPosition(epoch: 0, sequence: 0)
                    record.fenceEpoch = Int64(bitPattern: position.epoch)
                    record.fenceSequence = Int64(clamping: position.sequence)
                    try record.update(db)
                    try Self.audit(db, actor: actor, action: "volume.fence", target: v.name,
                                   detail: "plan=\(plan) generation=\(record.generation) holds=\(position.sequence)")
                }
                records[v.hostID + "/" + v.name] = record
            }
            return records
        }
    }

    /// A fenced source answered: it captured up to `position`, and those records may still
    /// land (a planned failover drains them). Returns the record as it is now.
    func recordFenceAnswer(hostID: String, name: String, position: ReplicaPosition) async throws -> VolumeRecord? {
        try await pool.write { db in
            guard var record = try VolumeRecord.filter(Column("hostID") == hostID && Column("name") == name).fetchOne(db),
                  record.fenced else { return nil }
            record.fenceEpoch = Int64(bitPattern: position.epoch)
            record.fenceSequence = Int64(clamping: position.sequence)
            try record.update(db)
            return record
        }
    }

    /// Hands volumes back to their hosts (failback): a new generation, writes allowed again.
    func unfence(_ volumes: [(hostID: String, name: String)], plan: String, actor: String) async throws {
        try await pool.write { db in
            for v in volumes {
                guard var record = try VolumeRecord.filter(Column("hostID") == v.hostID && Column("name") == v.name).fetchOne(db) else { continue }
                guard record.fenced else { continue }
                record.generation += 1
                record.fenced = false
                record.fenceEpoch = nil
                record.fenceSequence = nil
                try record.update(db)
                try Self.audit(db, actor: actor, action: "volume.unfence", target: v.name, detail: "plan=\(plan) generation=\(record.generation)")
            }
        }
    }

    /// Failback to other hosts: `hosts` (old → new) take the items' places in the plan, its
    /// groups' hook steps, and the plan's text (each `host: OLD` line), so that what `plan show`
    /// prints is what runs.
    func rehomePlan(_ name: String, hosts: [String: String], actor: String) async throws {
        try await pool.write { db in
            guard var record = try PlanRecord.fetchOne(db, key: name) else {
                throw FerryError(.notFound, "no recovery plan named '\(name)'; 'ferryctl plans' lists them")
            }
            var plan = record.decoded
            func moved(_ step: RecoveryPlanStep) -> RecoveryPlanStep {
                guard case .hook(let host, let hook, let timeout) = step, let to = hosts[host] else { return step }
                return .hook(host: to, name: hook, timeoutSeconds: timeout)
            }
            for g in plan.groups.indices {
                for i in plan.groups[g].items.indices {
                    if let to = hosts[plan.groups[g].items[i].host] { plan.groups[g].items[i].host = to }
                }
                plan.groups[g].pre = plan.groups[g].pre.map(moved)
                plan.groups[g].post = plan.groups[g].post.map(moved)
            }
            record.plan = try JSONEncoder().encode(plan)
            record.source = Self.rehomed(record.source, hosts: hosts)
            record.updatedAt = Date()
            try record.update(db)
            try Self.audit(db, actor: actor, action: "plan.rehome", target: name,
                           detail: hosts.sorted { $0.key < $1.key }.map { "\($0.key)->\($0.value)" }.joined(separator: " "))
        }
    }

    /// A plan's text with each `host: OLD` (an item's or a hook step's, never `recovery-host:`)
    /// naming the new host.
    static func rehomed(_ source: String, hosts: [String: String]) -> String {
        source.split(separator: "\n", omittingEmptySubsequences: false).map { line -> String in
            let text = String(line)
            let trimmed = text.drop { $0 == " " || $0 == "-" }
            guard trimmed.hasPrefix("host:") else { return text }
            let value = trimmed.dropFirst(5).trimmingCharacters(in: .whitespaces)
            let bare = value.split(separator: "#").first.map { $0.trimmingCharacters(in: .whitespaces) } ?? value
            let unquoted = bare.trimmingCharacters(in: CharacterSet(charactersIn: "\"'"))
            guard let to = hosts[unquoted] else { return text }
            return String(text.dropLast(trimmed.count)) + "host: " + to
        }.joined(separator: "\n")
    }

    /// The group memberships of `volumes` of one host pass to another host's volumes of the same names.
    func moveGroupMembers(from: String, to: String, volumes: [String], actor: String) async throws {
        try await pool.write { db in
            for v in volumes {
                let members = try GroupMemberRecord.filter(Column("hostID") == from && Column("volume") == v).fetchAll(db)
                for m in members {
                    try db.execute(sql: "DELETE FROM groupMember WHERE groupName = ? AND hostID = ? AND volume = ?", arguments: [m.groupName, from, v])
                    try GroupMemberRecord(groupName: m.groupName, hostID: to, volume: v).insert(db, onConflict: .ignore)
                    try Self.audit(db, actor: actor, action: "group.member-moved", target: m.groupName, detail: "\(v): host \(from) -> \(to)")
                }
            }
        }
    }

    /// Ends protection of volumes (migration): they leave their groups; replicas stay on disk.
    func unprotect(_ volumes: [(hostID: String, name: String)], plan: String, actor: String) async throws {
        try await pool.write { db in
            for v in volumes {
                try db.execute(sql: "DELETE FROM groupMember WHERE hostID = ? AND volume = ?", arguments: [v.hostID, v.name])
                try db.execute(sql: "DELETE FROM volume WHERE hostID = ? AND name = ?", arguments: [v.hostID, v.name])
                try Self.audit(db, actor: actor, action: "volume.unprotect", target: v.name, detail: "plan=\(plan) (migrated)")
            }
        }
    }
}
