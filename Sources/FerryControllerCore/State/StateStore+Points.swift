import FerryWire
import Foundation
import GRDB

/// A consistency group: volumes of one or several hosts whose points are cut together.
public struct GroupRecord: Codable, FetchableRecord, PersistableRecord, Sendable {
    public static let databaseTableName = "consistencyGroup"
    public var name: String
    public var policy: Data
    public var createdAt: Date

    public var decodedPolicy: API.GroupPolicy { (try? JSONDecoder().decode(API.GroupPolicy.self, from: policy)) ?? API.GroupPolicy() }
}

public struct GroupMemberRecord: Codable, FetchableRecord, PersistableRecord, Sendable, Hashable {
    public static let databaseTableName = "groupMember"
    public var groupName: String
    public var hostID: String
    public var volume: String
}

/// One member volume's place in a point: every write of `epoch` through `sequence`.
public struct PointMemberRecord: Codable, Sendable, Hashable {
    public var hostID: String
    public var volume: String
    public var epoch: UInt64
    public var sequence: UInt64
}

/// A recovery point in the catalogue. Pruned points stay as tombstones, so asking for one
/// says it was pruned rather than that it never existed.
public struct PointRecord: Codable, FetchableRecord, PersistableRecord, Sendable {
    public static let databaseTableName = "recoveryPoint"
    public var id: String
    public var groupName: String
    public var createdAt: Date
    public var kind: String
    public var consistency: String
    public var label: String?
    public var hookError: String?
    public var members: Data
    public var pauseMicros: Int64?
    public var prunedAt: Date?
    public var prunedReason: String?

    public var decodedMembers: [PointMemberRecord] { (try? JSONDecoder().decode([PointMemberRecord].self, from: members)) ?? [] }

    /// Point kinds.
    public enum Kind {
        public static let crash = "crash", app = "app", groupCrash = "group-crash", groupApp = "group-app", manual = "manual"
    }
}

extension StateStore {
    public func createGroup(name: String, policy: API.GroupPolicy, members: [GroupMemberRecord], actor: String) async throws {
        let encoded = try JSONEncoder().encode(policy)
        try await pool.write { db in
            if try GroupRecord.fetchOne(db, key: name) != nil {
                throw FerryError(.conflict, "a consistency group named '\(name)' exists already")
            }
            for m in members {
                if let other = try GroupMemberRecord.fetchOne(db, key: ["hostID": m.hostID, "volume": m.volume]) {
                    throw FerryError(.conflict, "volume \(m.volume) of that host is already in group '\(other.groupName)'; a volume belongs to one group")
                }
            }
            try GroupRecord(name: name, policy: encoded, createdAt: Date()).insert(db)
            for m in members { try m.insert(db) }
            try Self.audit(db, actor: actor, action: "group.create", target: name, detail: "\(members.count) volumes")
        }
    }

    /// Replaces a group's policy and members; audited with what changed.
    public func updateGroup(name: String, policy: API.GroupPolicy, members: [GroupMemberRecord], actor: String) async throws {
        let encoded = try JSONEncoder().encode(policy)
        try await pool.write { db in
            guard var group = try GroupRecord.fetchOne(db, key: name) else {
                throw FerryError(.notFound, "no consistency group named '\(name)'; 'ferryctl groups' lists them")
            }
            for m in members {
                if let other = try GroupMemberRecord.fetchOne(db, key: ["hostID": m.hostID, "volume": m.volume]), other.groupName != name {
                    throw FerryError(.conflict, "volume \(m.volume) of that host is already in group '\(other.groupName)'; a volume belongs to one group")
                }
            }
            let before = Set(try GroupMemberRecord.filter(Column("groupName") == name).fetchAll(db))
            let after = Set(members)
            let policyChanged = group.decodedPolicy != policy
            guard policyChanged || before != after else { return }
            group.policy = encoded
            try group.update(db)
            try GroupMemberRecord.filter(Column("groupName") == name).deleteAll(db)
            for m in members { try m.insert(db) }
            var detail: [String] = []
            if policyChanged { detail.append("policy") }
            if !after.subtracting(before).isEmpty { detail.append("+\(after.subtracting(before).count) volumes") }
            if !before.subtracting(after).isEmpty { detail.append("-\(before.subtracting(after).count) volumes") }
            try Self.audit(db, actor: actor, action: "group.update", target: name, detail: detail.joined(separator: ", "))
        }
    }

    public func deleteGroup(name: String, actor: String) async throws {
        try await pool.write { db in
            guard try GroupRecord.deleteOne(db, key: name) else {
                throw FerryError(.notFound, "no consistency group named '\(name)'; 'ferryctl groups' lists them")
            }
            try GroupMemberRecord.filter(Column("groupName") == name).deleteAll(db)
            try db.execute(sql: "UPDATE recoveryPoint SET prunedAt = ?, prunedReason = 'group deleted' WHERE groupName = ? AND prunedAt IS NULL",
                           arguments: [Date(), name])
            try Self.audit(db, actor: actor, action: "group.delete", target: name)
        }
    }

    public func groups() async throws -> [(GroupRecord, [GroupMemberRecord])] {
        try await pool.read { db in
            let members = try GroupMemberRecord.fetchAll(db)
            return try GroupRecord.order(Column("name")).fetchAll(db).map { g in
                (g, members.filter { $0.groupName == g.name }.sorted { ($0.hostID, $0.volume) < ($1.hostID, $1.volume) })
            }
        }
    }

    public func group(named name: String) async throws -> (GroupRecord, [GroupMemberRecord])? {
        try await pool.read { db in
            guard let g = try GroupRecord.fetchOne(db, key: name) else { return nil }
            return (g, try GroupMemberRecord.filter(Column("groupName") == name).order(Column("hostID"), Column("volume")).fetchAll(db))
        }
    }

    public func groupOf(hostID: String, volume: String) async throws -> String? {
        try await pool.read { db in try GroupMemberRecord.fetchOne(db, key: ["hostID": hostID, "volume": volume])?.groupName }
    }

    public func addPoint(_ point: PointRecord, actor: String) async throws {
        try await pool.write { db in
            try point.insert(db)
            if point.kind == PointRecord.Kind.manual {
                try Self.audit(db, actor: actor, action: "point.create", target: point.groupName, detail: point.id)
            }
        }
    }

    /// Points of a group, oldest first; pruned ones only if asked.
    public func points(group: String, includePruned: Bool = false) async throws -> [PointRecord] {
        try await pool.read { db in
            var q = PointRecord.filter(Column("groupName") == group)
            if !includePruned { q = q.filter(Column("prunedAt") == nil) }
            return try q.order(Column("createdAt"), Column("id")).fetchAll(db)
        }
    }

    /// Per group, the time of its newest retained point, and of its newest app-consistent one.
    public func newestPoints() async throws -> [String: (any: Date?, app: Date?)] {
        try await pool.read { db in
            let rows = try Row.fetchAll(db, sql: """
                SELECT groupName, MAX(createdAt) AS newest, MAX(CASE WHEN consistency = 'app' THEN createdAt END) AS app
                FROM recoveryPoint WHERE prunedAt IS NULL GROUP BY groupName
                """)
            return Dictionary(uniqueKeysWithValues: rows.map { ($0["groupName"], (any: $0["newest"] as Date?, app: $0["app"] as Date?)) })
        }
    }

    public func point(id: String) async throws -> PointRecord? {
        try await pool.read { db in try PointRecord.fetchOne(db, key: id) }
    }

    public func prunePoints(_ ids: [String], reason: String) async throws {
        guard !ids.isEmpty else { return }
        try await pool.write { db in
            for id in ids {
                try db.execute(sql: "UPDATE recoveryPoint SET prunedAt = ?, prunedReason = ? WHERE id = ? AND prunedAt IS NULL",
                               arguments: [Date(), reason, id])
            }
        }
    }
}

extension StateStore {
    func updateHookError(pointID: String, error: String?) async throws {
        try await pool.write { db in
            try db.execute(sql: "UPDATE recoveryPoint SET hookError = ? WHERE id = ?", arguments: [error, pointID])
        }
    }
}
