import FerryWire
import Foundation
import GRDB
import X509

/// The controller's configuration state in SQLite (WAL, through a GRDB pool).
///
/// Every change goes through a method here that also appends to the audit log, in the same
/// transaction, so the log cannot miss a change.
public final class StateStore: Sendable {
    let pool: DatabasePool

    public init(path: String) throws {
        var config = Configuration()
        config.busyMode = .timeout(10)
        config.journalMode = .wal
        do {
            pool = try DatabasePool(path: path, configuration: config)
        } catch {
            throw FerryError(.io, "cannot open state database \(path): \(error)")
        }
        let migrator = Self.migrator
        let superseded = try pool.read { db in try migrator.hasBeenSuperseded(db) }
        if superseded {
            throw FerryError(.databaseTooNew, "state database \(path) was written by a newer Ferry version; run that version or restore a backup")
        }
        try migrator.migrate(pool)
    }

    /// Schema history. Never edit a migration once it has shipped: add a new one.
    static var migrator: DatabaseMigrator {
        var m = DatabaseMigrator()
        m.registerMigration("v1-hosts-tokens-audit") { db in
            try db.create(table: "host") { t in
                t.primaryKey("id", .text)
                t.column("name", .text).notNull()
                t.column("state", .text).notNull()          // enrolled | active | removed
                t.column("inventory", .blob)                 // Ferry_V1_Inventory, protobuf
                t.column("address", .text)
                t.column("agentVersion", .text)
                t.column("certSerial", .text)
                t.column("certNotAfter", .datetime)
                t.column("enrolledAt", .datetime).notNull()
                t.column("lastSeen", .datetime)
                t.column("removedAt", .datetime)
            }
            // A name is unique among hosts that have not been removed.
            try db.execute(sql: "CREATE UNIQUE INDEX host_active_name ON host(name) WHERE state != 'removed'")
            try db.create(table: "certificate") { t in
                t.primaryKey("serial", .text)
                t.column("hostID", .text).notNull().references("host")
                t.column("notAfter", .datetime).notNull()
                t.column("issuedAt", .datetime).notNull()
            }
            try db.create(table: "revokedSerial") { t in
                t.primaryKey("serial", .text)
                t.column("hostID", .text).notNull()
                t.column("revokedAt", .datetime).notNull()
            }
            try db.create(table: "enrollmentToken") { t in
                t.primaryKey("hash", .text)
                t.column("hostName", .text)
                t.column("createdAt", .datetime).notNull()
                t.column("expiresAt", .datetime).notNull()
                t.column("createdBy", .text).notNull()
                t.column("usedAt", .datetime)
                t.column("usedBy", .text)
            }
            try db.create(table: "apiToken") { t in
                t.primaryKey("hash", .text)
                t.column("name", .text).notNull().unique()
                t.column("role", .text).notNull()           // viewer | operator | admin
                t.column("createdAt", .datetime).notNull()
            }
            try db.create(table: "audit") { t in
                t.autoIncrementedPrimaryKey("id")
                t.column("at", .datetime).notNull()
                t.column("actor", .text).notNull()
                t.column("action", .text).notNull()
                t.column("target", .text).notNull()
                t.column("detail", .text).notNull()
            }
        }
        m.registerMigration("v2-volumes") { db in
            try db.create(table: "volume") { t in
                t.column("hostID", .text).notNull().references("host")
                t.column("name", .text).notNull()
                t.column("path", .text).notNull()
                t.column("sizeBytes", .integer).notNull()
                t.column("socketPath", .text)
                t.column("protectedAt", .datetime).notNull()
                t.primaryKey(["hostID", "name"])
                t.uniqueKey(["hostID", "path"])
            }
        }
        m.registerMigration("v3-volume-capture") { db in
            try db.alter(table: "volume") { t in
                t.add(column: "captureMode", .text).notNull().defaults(to: "export")
                t.add(column: "scanIntervalSeconds", .integer).notNull().defaults(to: 0)
            }
        }
        m.registerMigration("v4-groups-points") { db in
            try db.create(table: "consistencyGroup") { t in
                t.primaryKey("name", .text)
                t.column("policy", .blob).notNull()          // API.GroupPolicy, JSON
                t.column("createdAt", .datetime).notNull()
            }
            try db.create(table: "groupMember") { t in
                t.column("groupName", .text).notNull().references("consistencyGroup", onDelete: .cascade)
                t.column("hostID", .text).notNull()
                t.column("volume", .text).notNull()
                // A volume belongs to one group at most.
                t.primaryKey(["hostID", "volume"])
            }
            try db.create(table: "recoveryPoint") { t in
                t.primaryKey("id", .text)
                t.column("groupName", .text).notNull()
                t.column("createdAt", .datetime).notNull()
                t.column("kind", .text).notNull()
                t.column("consistency", .text).notNull()
                t.column("label", .text)
                t.column("hookError", .text)
                t.column("members", .blob).notNull()         // [PointMemberRecord], JSON
                t.column("pauseMicros", .integer)
                t.column("prunedAt", .datetime)
                t.column("prunedReason", .text)
            }
            try db.create(index: "recoveryPoint_group_time", on: "recoveryPoint", columns: ["groupName", "createdAt"])
        }
        registerPlanMigration(&m)
        m.registerMigration("v7-api-token-expiry") { db in
            try db.alter(table: "apiToken") { t in t.add(column: "expiresAt", .datetime) }
        }
        m.registerMigration("v8-volume-hydration") { db in
            try db.alter(table: "volume") { t in t.add(column: "hydration", .text) }
        }
        registerWANMigration(&m)
        registerAlertMigration(&m)
        registerGuestMigration(&m)
        return m
    }

    static func audit(_ db: Database, actor: String, action: String, target: String, detail: String = "") throws {
        try db.execute(
            sql: "INSERT INTO audit (at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
            arguments: [Date(), actor, action, target, detail]
        )
    }
}

// MARK: - Records

public struct HostRecord: Codable, FetchableRecord, PersistableRecord, Sendable {
    public static let databaseTableName = "host"
    public var id: String
    public var name: String
    public var state: String
    public var inventory: Data?
    public var address: String?
    public var agentVersion: String?
    public var certSerial: String?
    public var certNotAfter: Date?
    public var enrolledAt: Date
    public var lastSeen: Date?
    public var removedAt: Date?

    public enum State {
        public static let enrolled = "enrolled"
        public static let active = "active"
        public static let removed = "removed"
    }
}

struct EnrollmentTokenRecord: Codable, FetchableRecord, PersistableRecord, Sendable {
    static let databaseTableName = "enrollmentToken"
    var hash: String
    var hostName: String?
    var createdAt: Date
    var expiresAt: Date
    var createdBy: String
    var usedAt: Date?
    var usedBy: String?

    var api: API.Token {
        API.Token(id: String(hash.prefix(12)), token: nil, host: hostName, createdAt: createdAt, expiresAt: expiresAt,
                  usedAt: usedAt, usedBy: usedBy, createdBy: createdBy)
    }
}

struct APITokenRecord: Codable, FetchableRecord, PersistableRecord, Sendable {
    static let databaseTableName = "apiToken"
    var hash: String
    var name: String
    var role: String
    var createdAt: Date
    /// Nil for the bootstrap admin token (its secret is a 0600 file; it is rotated instead).
    var expiresAt: Date?

    var api: API.APIToken { API.APIToken(name: name, role: role, createdAt: createdAt, token: nil, expiresAt: expiresAt) }
}

struct AuditRecord: Codable, FetchableRecord, PersistableRecord, Sendable {
    static let databaseTableName = "audit"
    var id: Int64?
    var at: Date
    var actor: String
    var action: String
    var target: String
    var detail: String
}

/// A caller of the operator API, as identified by its bearer token.
public struct APIPrincipal: Sendable {
    public enum Role: String, Sendable, Comparable {
        case viewer, `operator`, admin
        var rank: Int { self == .viewer ? 0 : self == .operator ? 1 : 2 }
        public static func < (a: Self, b: Self) -> Bool { a.rank < b.rank }
    }
    public var name: String
    public var role: Role
    /// When the token stops working, if it ever does.
    public var expiresAt: Date? = nil
    /// How the principal appears in the audit log.
    public var actor: String { "api:\(name)" }
}

// MARK: - Operations

extension StateStore {
    // Tokens for the operator API.

    /// Stores an API token (hashed). Returns false if a token with that name exists already.
    public func ensureAPIToken(name: String, role: APIPrincipal.Role, secret: String) async throws {
        try await pool.write { db in
            let record = APITokenRecord(hash: SecretHash.of(secret), name: name, role: role.rawValue, createdAt: Date())
            try record.insert(db)
            try Self.audit(db, actor: "system", action: "api-token.create", target: name, detail: "role=\(role.rawValue)")
        }
    }

    /// How long an API token lives by default, and at most.
    public static let apiTokenLifetime: TimeInterval = 90 * 86_400
    public static let apiTokenLifetimeRange: ClosedRange<Int64> = 10...(2 * 366 * 86_400)

    /// Makes a named API token for an operator or a script, valid for `lifetime` seconds; the
    /// secret is returned once.
    public func createAPIToken(name: String, role: APIPrincipal.Role, actor: String,
                               lifetime: TimeInterval = StateStore.apiTokenLifetime) async throws -> API.APIToken {
        guard HostName.isValid(name) else {
            throw FerryError(.badRequest, "'\(name)' is not a valid token name (1-63 characters: letters, digits, '.', '-', '_'; not starting with '.')")
        }
        let secret = SecretHash.randomToken(prefix: "fat_")
        let now = Date()
        let record = APITokenRecord(hash: SecretHash.of(secret), name: name, role: role.rawValue, createdAt: now,
                                    expiresAt: now.addingTimeInterval(lifetime))
        try await pool.write { db in
            if try APITokenRecord.filter(Column("name") == name).fetchCount(db) > 0 {
                throw FerryError(.conflict, "an API token named '\(name)' exists already; remove it first or pick another name")
            }
            try record.insert(db)
            try Self.audit(db, actor: actor, action: "api-token.create", target: name,
                           detail: "role=\(role.rawValue) expires=\(ISO8601DateFormatter().string(from: now.addingTimeInterval(lifetime)))")
        }
        var view = record.api
        view.token = secret
        return view
    }

    /// A new secret for a token (same name and role); the old one stops working at once. The
    /// new one lives `lifetime` seconds, or as long as the old one was meant to (the bootstrap
    /// admin token: without expiry).
    public func rotateAPIToken(name: String, actor: String, lifetime: TimeInterval?) async throws -> API.APIToken {
        let secret = SecretHash.randomToken(prefix: "fat_")
        let record = try await pool.write { db -> APITokenRecord in
            guard let old = try APITokenRecord.filter(Column("name") == name).fetchOne(db) else {
                throw FerryError(.notFound, "no API token named '\(name)'; 'ferryctl api-tokens' lists them")
            }
            let now = Date()
            let keep = old.expiresAt.map { $0.timeIntervalSince(old.createdAt) }
            let record = APITokenRecord(hash: SecretHash.of(secret), name: name, role: old.role, createdAt: now,
                                        expiresAt: (lifetime ?? keep).map { now.addingTimeInterval($0) })
            try old.delete(db)
            try record.insert(db)
            try Self.audit(db, actor: actor, action: "api-token.rotate", target: name,
                           detail: "expires=\(record.expiresAt.map { ISO8601DateFormatter().string(from: $0) } ?? "never")")
            return record
        }
        var view = record.api
        view.token = secret
        return view
    }

    public func apiTokens() async throws -> [API.APIToken] {
        try await pool.read { db in try APITokenRecord.order(Column("name")).fetchAll(db).map(\.api) }
    }

    /// Removes an API token; it stops working at once. The bootstrap admin token stays, so the
    /// controller can never be left without an administrator.
    public func removeAPIToken(name: String, actor: String) async throws {
        guard name != "admin" else {
            throw FerryError(.conflict, "the bootstrap 'admin' token cannot be removed; its secret is in the controller's data dir")
        }
        try await pool.write { db in
            guard try APITokenRecord.filter(Column("name") == name).deleteAll(db) > 0 else {
                throw FerryError(.notFound, "no API token named '\(name)'; 'ferryctl api-tokens' lists them")
            }
            try Self.audit(db, actor: actor, action: "api-token.remove", target: name)
        }
    }

    public func hasAPIToken(name: String) async throws -> Bool {
        try await pool.read { db in try APITokenRecord.filter(Column("name") == name).fetchCount(db) > 0 }
    }

    /// The caller a bearer secret names; nil for an unknown secret. An expired token is an
    /// error that says so.
    public func principal(forBearer secret: String) async throws -> APIPrincipal? {
        let hash = SecretHash.of(secret)
        return try await pool.read { db in
            guard let r = try APITokenRecord.fetchOne(db, key: hash), let role = APIPrincipal.Role(rawValue: r.role) else { return nil }
            if let expiry = r.expiresAt, expiry < Date() {
                throw FerryError(.unauthenticated, "API token '\(r.name)' expired at \(ISO8601DateFormatter().string(from: expiry)); an admin can rotate it ('ferryctl api-token rotate \(r.name)')")
            }
            return APIPrincipal(name: r.name, role: role, expiresAt: r.expiresAt)
        }
    }

    // Enrollment tokens.

    public func createEnrollmentToken(_ token: EnrollmentToken, hostName: String?, ttl: TimeInterval, actor: String) async throws -> API.Token {
        let now = Date()
        let record = EnrollmentTokenRecord(hash: token.secretHash, hostName: hostName, createdAt: now,
                                           expiresAt: now.addingTimeInterval(ttl), createdBy: actor, usedAt: nil, usedBy: nil)
        try await pool.write { db in
            if let hostName, try HostRecord.filter(Column("name") == hostName && Column("state") != HostRecord.State.removed).fetchCount(db) > 0 {
                throw FerryError(.conflict, "a host named '\(hostName)' is already enrolled; remove it first with 'ferryctl host remove \(hostName)'")
            }
            try record.insert(db)
            try Self.audit(db, actor: actor, action: "token.create", target: record.api.id,
                           detail: "host=\(hostName ?? "any") expires=\(ISO8601DateFormatter().string(from: record.expiresAt))")
        }
        var api = record.api
        api.token = token.description
        return api
    }

    public func enrollmentTokens() async throws -> [API.Token] {
        try await pool.read { db in try EnrollmentTokenRecord.order(Column("createdAt").desc).fetchAll(db).map(\.api) }
    }

    /// Consumes a token and creates the host in one transaction, so a token can never enroll twice
    /// even when two agents race with it.
    public func enroll(
        tokenSecretHash: String,
        requestedName: String,
        hostname: String,
        issue: @escaping @Sendable (_ hostID: String, _ hostName: String) throws -> IssuedCertificate,
        peer: String
    ) async throws -> (HostRecord, IssuedCertificate) {
        // A token that does not exist is refused on a read: a flood of bogus enrollments never
        // queues for the write lock that sessions, points and jobs need.
        guard try await pool.read({ db in try EnrollmentTokenRecord.fetchOne(db, key: tokenSecretHash) }) != nil else {
            throw FerryError(.tokenInvalid, "enrollment token not recognised by this controller; create one with 'ferryctl token create'")
        }
        return try await pool.write { db in
            let now = Date()
            guard var token = try EnrollmentTokenRecord.fetchOne(db, key: tokenSecretHash) else {
                throw FerryError(.tokenInvalid, "enrollment token not recognised by this controller; create one with 'ferryctl token create'")
            }
            if let usedAt = token.usedAt {
                throw FerryError(.tokenUsed, "enrollment token \(token.api.id) was already used at \(ISO8601DateFormatter().string(from: usedAt)) by \(token.usedBy ?? "?"); tokens are one-time, create a new one")
            }
            if token.expiresAt < now {
                throw FerryError(.tokenExpired, "enrollment token \(token.api.id) expired at \(ISO8601DateFormatter().string(from: token.expiresAt)); create a new one")
            }
            let name: String
            if let bound = token.hostName {
                guard requestedName.isEmpty || requestedName == bound else {
                    throw FerryError(.tokenWrongHost, "enrollment token \(token.api.id) is for host '\(bound)', not '\(requestedName)'")
                }
                name = bound
            } else {
                name = requestedName.isEmpty ? hostname : requestedName
            }
            guard HostName.isValid(name) else {
                throw FerryError(.badRequest, "'\(name)' is not a valid host name (1-63 characters: letters, digits, '.', '-', '_'; not starting with '.')")
            }
            if try HostRecord.filter(Column("name") == name && Column("state") != HostRecord.State.removed).fetchCount(db) > 0 {
                throw FerryError(.conflict, "a host named '\(name)' is already enrolled; remove it first with 'ferryctl host remove \(name)' or enroll under another name")
            }
            let hostID = UUID().uuidString.lowercased()
            let cert = try issue(hostID, name)
            let host = HostRecord(id: hostID, name: name, state: HostRecord.State.enrolled, inventory: nil, address: peer,
                                  agentVersion: nil, certSerial: cert.serial, certNotAfter: cert.notAfter, enrolledAt: now,
                                  lastSeen: nil, removedAt: nil)
            try host.insert(db)
            try db.execute(sql: "INSERT INTO certificate (serial, hostID, notAfter, issuedAt) VALUES (?, ?, ?, ?)",
                           arguments: [cert.serial, hostID, cert.notAfter, now])
            token.usedAt = now
            token.usedBy = name
            try token.update(db)
            try Self.audit(db, actor: "token:\(token.api.id)", action: "host.enroll", target: name,
                           detail: "id=\(hostID) serial=\(cert.serial) from=\(peer)")
            return (host, cert)
        }
    }

    /// Records a renewed certificate for a host.
    public func recordRenewal(hostID: String, serial: String, notAfter: Date) async throws {
        try await pool.write { db in
            guard var host = try HostRecord.fetchOne(db, key: hostID), host.state != HostRecord.State.removed else {
                throw FerryError(.revoked, "host \(hostID) has been removed")
            }
            try db.execute(sql: "INSERT INTO certificate (serial, hostID, notAfter, issuedAt) VALUES (?, ?, ?, ?)",
                           arguments: [serial, hostID, notAfter, Date()])
            host.certSerial = serial
            host.certNotAfter = notAfter
            try host.update(db)
            try Self.audit(db, actor: "agent:\(host.name)", action: "host.renew-certificate", target: host.name, detail: "serial=\(serial)")
        }
    }

    /// Admission check for a session: the host exists and is not removed, and the certificate is
    /// one this controller issued to that host and has not revoked. (An operator CA could sign
    /// other certificates naming a host; only the ones issued here count.)
    public func admit(hostID: String, serial: String) async throws -> HostRecord {
        try await pool.read { db in try Self.admit(db, hostID: hostID, serial: serial) }
    }

    static func admit(_ db: Database, hostID: String, serial: String) throws -> HostRecord {
        if try Row.fetchOne(db, sql: "SELECT 1 FROM revokedSerial WHERE serial = ?", arguments: [serial]) != nil {
            throw FerryError(.revoked, "certificate \(serial) has been revoked")
        }
        guard let host = try HostRecord.fetchOne(db, key: hostID) else {
            throw FerryError(.unauthenticated, "certificate names host \(hostID), which this controller does not know")
        }
        guard host.state != HostRecord.State.removed else {
            throw FerryError(.revoked, "host '\(host.name)' has been removed")
        }
        guard try Row.fetchOne(db, sql: "SELECT 1 FROM certificate WHERE serial = ? AND hostID = ?", arguments: [serial, hostID]) != nil else {
            throw FerryError(.revoked, "certificate \(serial) was not issued by this controller to host '\(host.name)'")
        }
        return host
    }

    /// Admits a session and stores what the host said, in one transaction, so a concurrent
    /// `removeHost` either happens before (and this refuses) or after (and closes the session).
    /// A host that connects with a renewed certificate supersedes its older ones: they are
    /// revoked, so a copy of an old key is worthless once the real agent has moved on.
    public func recordSessionStart(hostID: String, serial: String, address: String, agentVersion: String, inventory: Data) async throws -> HostRecord {
        try await pool.write { db in
            var host = try Self.admit(db, hostID: hostID, serial: serial)
            let older = try String.fetchAll(db, sql: """
                SELECT serial FROM certificate WHERE hostID = ? AND issuedAt < (SELECT issuedAt FROM certificate WHERE serial = ?)
                AND serial NOT IN (SELECT serial FROM revokedSerial)
                """, arguments: [hostID, serial])
            for s in older {
                try db.execute(sql: "INSERT INTO revokedSerial (serial, hostID, revokedAt) VALUES (?, ?, ?)", arguments: [s, hostID, Date()])
            }
            if !older.isEmpty {
                try Self.audit(db, actor: "agent:\(host.name)", action: "host.certificate-superseded", target: host.name,
                               detail: "revoked=\(older.joined(separator: ",")) current=\(serial)")
            }
            if host.agentVersion != agentVersion {
                try Self.audit(db, actor: "agent:\(host.name)", action: "host.agent-version", target: host.name,
                               detail: "\(host.agentVersion ?? "none") -> \(agentVersion)")
            }
            let inventoryChanged = host.inventory != inventory
            host.state = HostRecord.State.active
            host.address = address
            host.agentVersion = agentVersion
            host.inventory = inventory
            host.lastSeen = Date()
            try host.update(db)
            if inventoryChanged {
                try Self.recordGuests(db, hostID: hostID, inventory: inventory)
                try Self.audit(db, actor: "agent:\(host.name)", action: "host.inventory", target: host.name, detail: "\(inventory.count) bytes")
            }
            return host
        }
    }

    /// Stores a changed inventory. Returns whether it differed. `actor` is who caused the
    /// refresh (the agent itself, or an operator who asked for it).
    @discardableResult
    public func recordInventory(hostID: String, inventory: Data, actor: String? = nil) async throws -> Bool {
        try await pool.write { db in
            guard var host = try HostRecord.fetchOne(db, key: hostID), host.inventory != inventory else { return false }
            host.inventory = inventory
            try host.update(db)
            try Self.recordGuests(db, hostID: hostID, inventory: inventory)
            try Self.audit(db, actor: actor ?? "agent:\(host.name)", action: "host.inventory", target: host.name, detail: "\(inventory.count) bytes")
            return true
        }
    }

    public func recordLastSeen(_ seen: [String: Date]) async throws {
        guard !seen.isEmpty else { return }
        try await pool.write { db in
            for (id, at) in seen {
                try db.execute(sql: "UPDATE host SET lastSeen = ? WHERE id = ?", arguments: [at, id])
            }
        }
    }

    public func hosts(includeRemoved: Bool = false) async throws -> [HostRecord] {
        try await pool.read { db in
            var q = HostRecord.order(Column("name"))
            if !includeRemoved { q = q.filter(Column("state") != HostRecord.State.removed) }
            return try q.fetchAll(db)
        }
    }

    public func host(named name: String) async throws -> HostRecord? {
        try await pool.read { db in
            try HostRecord.filter(Column("name") == name && Column("state") != HostRecord.State.removed).fetchOne(db)
        }
    }

    /// Removes a host: its record is kept (state removed) and every certificate ever issued to it
    /// is revoked. Returns the revoked serials.
    public func removeHost(named name: String, actor: String) async throws -> (HostRecord, [String]) {
        try await pool.write { db in
            guard var host = try HostRecord.filter(Column("name") == name && Column("state") != HostRecord.State.removed).fetchOne(db) else {
                throw FerryError(.notFound, "no host named '\(name)'; 'ferryctl hosts' lists them")
            }
            let serials = try String.fetchAll(db, sql: "SELECT serial FROM certificate WHERE hostID = ?", arguments: [host.id])
            let now = Date()
            for s in serials {
                try db.execute(sql: "INSERT OR IGNORE INTO revokedSerial (serial, hostID, revokedAt) VALUES (?, ?, ?)", arguments: [s, host.id, now])
            }
            host.state = HostRecord.State.removed
            host.removedAt = now
            try host.update(db)
            try Self.audit(db, actor: actor, action: "host.remove", target: name, detail: "id=\(host.id) revoked=\(serials.count)")
            return (host, serials)
        }
    }

    /// Records an operator action that changes no stored row (e.g. a resync request).
    public func audit(actor: String, action: String, target: String, detail: String = "") async throws {
        try await pool.write { db in try Self.audit(db, actor: actor, action: action, target: target, detail: detail) }
    }

    public func auditLog(limit: Int) async throws -> [API.AuditEntry] {
        try await pool.read { db in
            try AuditRecord.order(Column("id").desc).limit(limit).fetchAll(db).map {
                API.AuditEntry(id: $0.id ?? 0, at: $0.at, actor: $0.actor, action: $0.action, target: $0.target, detail: $0.detail)
            }
        }
    }
}

/// A certificate just signed, with the fields the store keeps.
public struct IssuedCertificate: Sendable {
    public var certificate: Certificate
    public var serial: String { HostIdentity.serialString(certificate) }
    public var notAfter: Date { certificate.notValidAfter }

    public init(_ certificate: Certificate) { self.certificate = certificate }
}

/// Host name rules: what may be used as a name in tables, paths and URLs.
public enum HostName {
    /// Names appear in paths (sockets, recovered volumes) and URLs: `.`, `..` and other
    /// names starting with a dot are refused.
    public static func isValid(_ name: String) -> Bool {
        (1...63).contains(name.count) && !name.hasPrefix(".") && name.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == "." || $0 == "_") }
    }
}

// MARK: - Volumes

public struct VolumeRecord: Codable, FetchableRecord, PersistableRecord, Sendable {
    public static let databaseTableName = "volume"
    public var hostID: String
    public var name: String
    public var path: String
    public var sizeBytes: Int64
    public var socketPath: String?
    public var protectedAt: Date
    /// `export` (through the agent's NBD export) or `scan` (periodic hash-and-diff).
    public var captureMode: String = "export"
    public var scanIntervalSeconds: Int64 = 0
    /// Bumped by every failover and failback; `fenced` while the other site owns the volume.
    public var generation: Int64 = 0
    public var fenced: Bool = false
    /// A fenced volume's replication stops here (epoch as its bit pattern): records past it are
    /// what the old primary took after the fence, and are refused.
    public var fenceEpoch: Int64?
    public var fenceSequence: Int64?
    /// A recovered volume a failover landed on this host: filled from the failover point and
    /// protected from its first write, its replica built from that point (no copy over the network).
    public var hydration: VolumeHydration?

    var spec: Ferry_V1_VolumeSpec {
        var s = Ferry_V1_VolumeSpec()
        s.name = name
        s.path = path
        s.sizeBytes = UInt64(clamping: sizeBytes)
        s.captureMode = captureMode == "scan" ? .scan : .export
        s.scanIntervalSeconds = UInt32(clamping: scanIntervalSeconds)
        s.generation = UInt64(max(0, generation))
        s.fenced = fenced
        if let hydration {
            s.hydration.exportPort = UInt32(clamping: hydration.exportPort)
            s.hydration.exportName = hydration.exportID
            s.hydration.point = hydration.point
            s.hydration.source = hydration.source
        }
        return s
    }
}

/// Where a recovered, protected volume comes from: the source replica's point it was recovered
/// at (its replica here starts as a copy of that point) and the export its host fills it from.
public struct VolumeHydration: Codable, Sendable, Equatable {
    /// "HOST/VOLUME" of the source, its host and volume, and the point.
    public var source: String
    public var sourceHostID: String
    public var sourceVolume: String
    public var epoch: UInt64
    public var sequence: UInt64
    public var point: String
    public var exportID: String
    public var exportPort: Int
    /// The recovery (plan.host) that made it.
    public var recovery: String

    /// Where a recovered volume lives when its plan names no target: relative to its agent's
    /// data dir (the agent resolves it, and reports the absolute path).
    public static func defaultPath(_ name: String) -> String { "volumes/recovered/" + name + ".img" }
}

extension StateStore {
    /// Refuses a volume name or path this host already protects.
    public func checkNewVolume(hostID: String, name: String, path: String) async throws {
        try await pool.read { db in
            if try VolumeRecord.filter(Column("hostID") == hostID && Column("name") == name).fetchOne(db) != nil {
                throw FerryError(.conflict, "this host already protects a volume named '\(name)'")
            }
            if let other = try VolumeRecord.filter(Column("hostID") == hostID && Column("path") == path).fetchOne(db) {
                throw FerryError(.conflict, "\(path) is already protected on this host, as volume '\(other.name)'")
            }
        }
    }

    public func addVolume(_ record: VolumeRecord, hostName: String, actor: String) async throws {
        try await pool.write { db in
            try record.insert(db)
            try Self.audit(db, actor: actor, action: "volume.protect", target: "\(hostName)/\(record.name)",
                           detail: "path=\(record.path) bytes=\(record.sizeBytes)")
        }
    }

    public func volumes(hostID: String? = nil) async throws -> [VolumeRecord] {
        try await pool.read { db in
            var q = VolumeRecord.order(Column("hostID"), Column("name"))
            if let hostID { q = q.filter(Column("hostID") == hostID) }
            let records = try q.fetchAll(db)
            // Ferry never writes a negative size; one read back means a damaged database, and
            // is refused here rather than trapping (or sizing a replica to 0) further in.
            if let bad = records.first(where: { $0.sizeBytes < 0 }) {
                throw FerryError(.internalError, "the state database records volume \(bad.name) of host \(bad.hostID) as \(bad.sizeBytes) bytes: it is damaged; restore it from a backup")
            }
            return records
        }
    }

    /// A volume grew (an online resize its replica has durably): the record follows. Never shrinks.
    public func growVolume(hostID: String, name: String, to size: UInt64) async throws {
        try await pool.write { db in
            try db.execute(sql: "UPDATE volume SET sizeBytes = ? WHERE hostID = ? AND name = ? AND sizeBytes < ?",
                           arguments: [Int64(clamping: size), hostID, name, Int64(clamping: size)])
        }
    }

    /// Remembers where the agent exports each volume, as it last reported.
    public func recordVolumeSockets(hostID: String, _ statuses: [Ferry_V1_VolumeStatus]) async throws {
        try await pool.write { db in
            for s in statuses where s.error.isEmpty {
                try db.execute(sql: "UPDATE volume SET socketPath = ? WHERE hostID = ? AND name = ?", arguments: [s.socketPath, hostID, s.name])
                // A recovered volume placed by its agent (no target in the plan): where it is.
                if s.path.hasPrefix("/") {
                    try db.execute(sql: "UPDATE volume SET path = ? WHERE hostID = ? AND name = ? AND path NOT LIKE '/%'", arguments: [s.path, hostID, s.name])
                }
            }
        }
    }
}
