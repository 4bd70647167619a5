import FerryWire
import Foundation
import GRDB

/// Alerts and their webhook deliveries.
extension StateStore {
    static func registerAlertMigration(_ m: inout DatabaseMigrator) {
        m.registerMigration("v10-alerts") { db in
            try db.create(table: "alert") { t in
                t.primaryKey("id", .text)
                t.column("rule", .text).notNull()
                t.column("severity", .text).notNull()
                t.column("subject", .text).notNull()
                t.column("message", .text).notNull()
                t.column("state", .text).notNull().indexed()
                t.column("openedAt", .datetime).notNull()
                t.column("resolvedAt", .datetime)
            }
            try db.create(table: "alertDelivery") { t in
                t.autoIncrementedPrimaryKey("id")
                t.column("alertID", .text).notNull().indexed().references("alert", onDelete: .cascade)
                t.column("url", .text).notNull()
                t.column("event", .text).notNull()
                t.column("attempt", .integer).notNull()
                t.column("at", .datetime).notNull()
                t.column("status", .integer)
                t.column("error", .text)
                t.column("delivered", .boolean).notNull()
            }
        }
    }

    /// Resolved alerts kept for the history.
    static let resolvedAlertsKept = 1000

    private static func alert(_ row: Row) -> API.Alert? {
        guard let rule = API.AlertRule(rawValue: row["rule"]), let severity = API.AlertSeverity(rawValue: row["severity"]),
              let state = API.AlertState(rawValue: row["state"]) else { return nil }
        return API.Alert(id: row["id"], rule: rule, severity: severity, subject: row["subject"], message: row["message"], state: state,
                         openedAt: row["openedAt"], resolvedAt: row["resolvedAt"])
    }

    /// Alerts still firing (a restarted controller resolves them when their condition is gone).
    func firingAlerts() async throws -> [(id: String, condition: AlertCondition)] {
        try await pool.read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM alert WHERE state = 'firing'").compactMap { row in
                Self.alert(row).map { ($0.id, AlertCondition(rule: $0.rule, severity: $0.severity, subject: $0.subject, message: $0.message)) }
            }
        }
    }

    /// Applies a reconciliation: opened, updated and resolved alerts, audited.
    func apply(_ actions: [AlertReconciler.Action], now: Date) async throws {
        guard !actions.isEmpty else { return }
        try await pool.write { db in
            for action in actions {
                switch action {
                case .open(let id, let c):
                    try db.execute(sql: "INSERT INTO alert (id, rule, severity, subject, message, state, openedAt) VALUES (?, ?, ?, ?, ?, 'firing', ?)",
                                   arguments: [id, c.rule.rawValue, c.severity.rawValue, c.subject, c.message, now])
                    try Self.audit(db, actor: "controller", action: "alert.open", target: c.subject, detail: "\(id) \(c.rule.rawValue): \(c.message)")
                case .update(let id, let c):
                    try db.execute(sql: "UPDATE alert SET message = ?, severity = ? WHERE id = ?", arguments: [c.message, c.severity.rawValue, id])
                case .resolve(let id, let c):
                    try db.execute(sql: "UPDATE alert SET state = 'resolved', resolvedAt = ? WHERE id = ?", arguments: [now, id])
                    try Self.audit(db, actor: "controller", action: "alert.resolve", target: c.subject, detail: "\(id) \(c.rule.rawValue)")
                }
            }
            try db.execute(sql: """
                DELETE FROM alert WHERE state = 'resolved' AND id NOT IN
                  (SELECT id FROM alert WHERE state = 'resolved' ORDER BY resolvedAt DESC LIMIT ?)
                """, arguments: [Self.resolvedAlertsKept])
        }
    }

    /// Firing alerts (and, with `all`, the resolved ones kept), newest first, with their deliveries.
    public func alerts(all: Bool) async throws -> [API.Alert] {
        try await pool.read { db in
            let rows = try Row.fetchAll(db, sql: "SELECT * FROM alert \(all ? "" : "WHERE state = 'firing'") ORDER BY openedAt DESC, id")
            var deliveries: [String: [API.AlertDelivery]] = [:]
            for d in try Row.fetchAll(db, sql: "SELECT * FROM alertDelivery ORDER BY id") {
                guard let event = API.AlertState(rawValue: d["event"]) else { continue }
                deliveries[d["alertID"], default: []].append(API.AlertDelivery(
                    url: d["url"], event: event, attempt: d["attempt"], at: d["at"], status: d["status"], error: d["error"], delivered: d["delivered"]))
            }
            return rows.compactMap { row in
                guard var a = Self.alert(row) else { return nil }
                a.deliveries = deliveries[a.id] ?? []
                return a
            }
        }
    }

    func alert(id: String) async throws -> API.Alert? {
        try await alerts(all: true).first { $0.id == id }
    }

    /// Records one delivery attempt.
    func recordDelivery(alertID: String, _ d: API.AlertDelivery) async throws {
        try await pool.write { db in
            // The alert may have been pruned from the history meanwhile.
            guard try Bool.fetchOne(db, sql: "SELECT 1 FROM alert WHERE id = ?", arguments: [alertID]) != nil else { return }
            try db.execute(sql: """
                INSERT INTO alertDelivery (alertID, url, event, attempt, at, status, error, delivered) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                """, arguments: [alertID, d.url, d.event.rawValue, d.attempt, d.at, d.status, d.error, d.delivered])
        }
    }
}
