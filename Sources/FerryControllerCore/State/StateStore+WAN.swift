import FerryWire
import Foundation
import GRDB

/// The operator's WAN settings: one row per scope ("*" for all hosts, else a host id).
extension StateStore {
    static func registerWANMigration(_ m: inout DatabaseMigrator) {
        m.registerMigration("v9-wan") { db in
            try db.create(table: "wanSetting") { t in
                t.primaryKey("scope", .text)
                t.column("limitBytesPerSecond", .integer)
                t.column("compression", .text)
            }
        }
    }

    static let allHostsScope = "*"

    /// Every scope's settings: all hosts', then each host's (by id).
    public func wanSettings() async throws -> (all: API.WANRule, hosts: [String: API.WANRule]) {
        try await pool.read { db in
            var all = API.WANRule()
            var hosts: [String: API.WANRule] = [:]
            for row in try Row.fetchAll(db, sql: "SELECT scope, limitBytesPerSecond, compression FROM wanSetting") {
                let rule = API.WANRule(limitBytesPerSecond: (row["limitBytesPerSecond"] as Int64?).map { UInt64(clamping: $0) },
                                       compression: (row["compression"] as String?).flatMap(API.StreamCompression.init(rawValue:)))
                let scope: String = row["scope"]
                if scope == Self.allHostsScope { all = rule } else { hosts[scope] = rule }
            }
            return (all, hosts)
        }
    }

    /// Records one scope's settings (nil host id: all hosts), audited.
    public func setWAN(hostID: String?, target: String, _ rule: API.WANRule, actor: String) async throws {
        try await pool.write { db in
            let scope = hostID ?? Self.allHostsScope
            if rule == API.WANRule() {
                try db.execute(sql: "DELETE FROM wanSetting WHERE scope = ?", arguments: [scope])
            } else {
                try db.execute(sql: """
                    INSERT INTO wanSetting (scope, limitBytesPerSecond, compression) VALUES (?, ?, ?)
                    ON CONFLICT(scope) DO UPDATE SET limitBytesPerSecond = excluded.limitBytesPerSecond, compression = excluded.compression
                    """, arguments: [scope, rule.limitBytesPerSecond.map { Int64(clamping: $0) }, rule.compression?.rawValue])
            }
            let limit = rule.limitBytesPerSecond.map { "\($0) B/s" } ?? "none"
            try Self.audit(db, actor: actor, action: "wan.set", target: target,
                           detail: "limit \(limit), compression \(rule.compression?.rawValue ?? (hostID == nil ? "none" : "inherit"))")
        }
    }
}
