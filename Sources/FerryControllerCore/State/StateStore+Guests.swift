import FerryWire
import Foundation
import GRDB

/// Virtual machines seen on hosts (their inventory's guests), kept after they stop: a failover
/// of a host whose guest is down (or the host itself) boots the guest with the shape it had.
extension StateStore {
    static func registerGuestMigration(_ m: inout DatabaseMigrator) {
        m.registerMigration("v11-guests") { db in
            try db.create(table: "guest") { t in
                t.column("hostID", .text).notNull().references("host", onDelete: .cascade)
                t.column("name", .text).notNull()
                /// A `Ferry_V1_Guest`, serialized.
                t.column("shape", .blob).notNull()
                t.column("seenAt", .datetime).notNull()
                t.primaryKey(["hostID", "name"])
            }
        }
    }

    /// Records the guests an inventory lists (a guest of the same name is replaced; guests not
    /// listed stay recorded: stopped is not gone). Within `db`, as part of recording the inventory.
    static func recordGuests(_ db: Database, hostID: String, inventory: Data) throws {
        guard let parsed = try? Ferry_V1_Inventory(serializedBytes: [UInt8](inventory)) else { return }
        for guest in parsed.guests.prefix(256) where !guest.name.isEmpty && guest.name.utf8.count <= 256 {
            try db.execute(sql: "INSERT OR REPLACE INTO guest (hostID, name, shape, seenAt) VALUES (?, ?, ?, ?)",
                           arguments: [hostID, guest.name, Data(try guest.serializedBytes() as [UInt8]), Date()])
        }
    }

    /// The guests recorded on a host, the most recently seen first.
    public func guests(hostID: String) async throws -> [Ferry_V1_Guest] {
        try await pool.read { db in
            try Row.fetchAll(db, sql: "SELECT shape FROM guest WHERE hostID = ? ORDER BY seenAt DESC, name", arguments: [hostID]).compactMap { row in
                let shape: Data = row["shape"]
                return try? Ferry_V1_Guest(serializedBytes: [UInt8](shape))
            }
        }
    }
}
