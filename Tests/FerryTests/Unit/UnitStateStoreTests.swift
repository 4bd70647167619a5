import Crypto
@testable import FerryControllerCore
import FerryWire
import Foundation
import GRDB
import Synchronization
import Testing
import X509

@Suite("Unit StateStore")
struct UnitStateStoreTests {
    /// A CA and a host key for the `issue` closure that `enroll` takes.
    struct Issuer: Sendable {
        let ca: CertificateAuthority
        let key: Certificate.PublicKey
        let calls = CallCounter()

        init() throws {
            ca = try CertificateAuthority.create()
            key = Certificate.PrivateKey(P256.Signing.PrivateKey()).publicKey
        }

        var issue: @Sendable (String, String) throws -> IssuedCertificate {
            { [ca, key, calls] hostID, hostName in
                calls.value.add(1, ordering: .relaxed)
                return IssuedCertificate(try ca.issueHostCertificate(publicKey: key, hostID: hostID, hostName: hostName, validity: 3_600))
            }
        }

        func certificate(hostID: String, name: String) throws -> IssuedCertificate {
            IssuedCertificate(try ca.issueHostCertificate(publicKey: key, hostID: hostID, hostName: name, validity: 7_200))
        }
    }

    final class CallCounter: Sendable {
        let value = Atomic<Int>(0)
    }

    static func newToken(_ store: StateStore, _ issuer: Issuer, host: String? = nil, ttl: TimeInterval = 600, actor: String = "api:unit") async throws -> EnrollmentToken {
        let token = EnrollmentToken.generate(caFingerprint: issuer.ca.fingerprint)
        let api = try await store.createEnrollmentToken(token, hostName: host, ttl: ttl, actor: actor)
        #expect(api.token == token.description)
        #expect(api.host == host)
        return token
    }

    static func enroll(_ store: StateStore, _ token: EnrollmentToken, _ issuer: Issuer, name: String, hostname: String = "machine") async throws -> (HostRecord, IssuedCertificate) {
        try await store.enroll(tokenSecretHash: token.secretHash, requestedName: name, hostname: hostname, issue: issuer.issue, peer: "192.0.2.1:50000")
    }

    // MARK: opening

    @Test("a new database is in WAL mode, and opening it again works")
    func walMode() async throws {
        try await withUnitTempDir { dir in
            let path = dir + "/state.db"
            do { _ = try StateStore(path: path) }
            #expect(FileManager.default.fileExists(atPath: path))
            let queue = try DatabaseQueue(path: path)
            let mode = try await queue.read { db in try String.fetchOne(db, sql: "PRAGMA journal_mode") }
            #expect(mode?.lowercased() == "wal")
            let migrations = try await queue.read { db in try String.fetchAll(db, sql: "SELECT identifier FROM grdb_migrations") }
            // Every migration this build knows, applied in order.
            #expect(migrations == StateStore.migrator.migrations)
            #expect(migrations.first == "v1-hosts-tokens-audit")
            try queue.close()

            let reopened = try StateStore(path: path)
            #expect(try await reopened.hosts().isEmpty)
        }
    }

    @Test("a database with a migration this build does not know is refused with database-too-new, and left untouched")
    func refusesNewerDatabase() async throws {
        try await withUnitTempDir { dir in
            let path = dir + "/state.db"
            do {
                let store = try StateStore(path: path)
                try await store.ensureAPIToken(name: "admin", role: .admin, secret: "fat_secret")
            }
            do {
                let queue = try DatabaseQueue(path: path)
                try await queue.write { db in
                    try db.execute(sql: "INSERT INTO grdb_migrations (identifier) VALUES (?)", arguments: ["v999-future"])
                }
                try queue.close()
            }
            let error = #expect(throws: FerryError.self) { _ = try StateStore(path: path) }
            #expect(error?.code == .databaseTooNew)

            let queue = try DatabaseQueue(path: path)
            let (migrations, tokens) = try await queue.read { db in
                (try String.fetchAll(db, sql: "SELECT identifier FROM grdb_migrations ORDER BY identifier"),
                 try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM apiToken") ?? -1)
            }
            #expect(migrations == (StateStore.migrator.migrations + ["v999-future"]).sorted())
            #expect(tokens == 1)
            try queue.close()
        }
    }

    @Test("a path that cannot be opened is an io error")
    func unopenable() async throws {
        try await withUnitTempDir { dir in
            let error = #expect(throws: FerryError.self) { _ = try StateStore(path: dir + "/no/such/dir/state.db") }
            #expect(error?.code == .io)
        }
    }

    // MARK: enrollment

    @Test("8 concurrent enrollments with one token: exactly one succeeds, the others get token-used", .timeLimit(.minutes(1)))
    func oneTimeTokenUnderRace() async throws {
        try await withUnitTempDir { dir in
            let store = try StateStore(path: dir + "/state.db")
            let issuer = try Issuer()
            let token = try await Self.newToken(store, issuer)
            let hash = token.secretHash
            let issue = issuer.issue

            enum Outcome: Sendable { case enrolled(String), failed(FerryError.Code?) }
            let outcomes = await withTaskGroup(of: Outcome.self) { group in
                for i in 0..<8 {
                    group.addTask {
                        do {
                            let (host, _) = try await store.enroll(tokenSecretHash: hash, requestedName: "racer-\(i)", hostname: "m\(i)",
                                                                   issue: issue, peer: "192.0.2.\(i):1")
                            return .enrolled(host.name)
                        } catch let error as FerryError {
                            return .failed(error.code)
                        } catch {
                            return .failed(nil)
                        }
                    }
                }
                var all: [Outcome] = []
                for await o in group { all.append(o) }
                return all
            }

            let winners = outcomes.compactMap { if case .enrolled(let n) = $0 { n } else { nil } }
            let failures = outcomes.compactMap { if case .failed(let c) = $0 { c } else { nil } }
            #expect(winners.count == 1)
            #expect(failures.count == 7)
            #expect(failures.allSatisfy { $0 == .tokenUsed }, "failures: \(failures)")
            #expect(issuer.calls.value.load(ordering: .relaxed) == 1, "a certificate was issued for a losing enrollment")

            let hosts = try await store.hosts()
            #expect(hosts.map(\.name) == winners)
            let record = try #require(try await store.enrollmentTokens().first)
            #expect(record.usedBy == winners.first)
            #expect(record.usedAt != nil)
            let enrolls = try await store.auditLog(limit: 100).filter { $0.action == "host.enroll" }
            #expect(enrolls.count == 1)
        }
    }

    @Test("the race holds across two StateStore instances (separate SQLite connections) on one file", .timeLimit(.minutes(1)))
    func oneTimeTokenAcrossConnections() async throws {
        try await withUnitTempDir { dir in
            let stores = [try StateStore(path: dir + "/state.db"), try StateStore(path: dir + "/state.db")]
            let issuer = try Issuer()
            let issue = issuer.issue
            for round in 0..<3 {
                let token = try await Self.newToken(stores[0], issuer)
                let hash = token.secretHash
                let codes = await withTaskGroup(of: FerryError.Code?.self) { group in
                    for i in 0..<8 {
                        let store = stores[i % 2]
                        group.addTask {
                            do {
                                _ = try await store.enroll(tokenSecretHash: hash, requestedName: "r\(round)-\(i)", hostname: "m",
                                                           issue: issue, peer: "192.0.2.1:1")
                                return nil
                            } catch {
                                return (error as? FerryError)?.code ?? FerryError.Code("non-ferry-error: \(error)")
                            }
                        }
                    }
                    var all: [FerryError.Code?] = []
                    for await c in group { all.append(c) }
                    return all
                }
                #expect(codes.filter { $0 == nil }.count == 1, "round \(round): \(codes)")
                #expect(codes.compactMap { $0 }.allSatisfy { $0 == .tokenUsed }, "round \(round): \(codes)")
            }
            #expect(try await stores[1].hosts().count == 3)
        }
    }

    @Test("enrolling records the host with the issued certificate's serial")
    func enrollRecordsHost() async throws {
        try await withUnitTempDir { dir in
            let store = try StateStore(path: dir + "/state.db")
            let issuer = try Issuer()
            let token = try await Self.newToken(store, issuer)
            let (host, cert) = try await Self.enroll(store, token, issuer, name: "", hostname: "machine-7")
            #expect(host.name == "machine-7")            // unbound token, no requested name: the hostname
            #expect(host.state == HostRecord.State.enrolled)
            #expect(host.certSerial == cert.serial)
            #expect(HostIdentity.hostID(of: cert.certificate) == host.id)
            #expect(host.address == "192.0.2.1:50000")
            let admitted = try await store.admit(hostID: host.id, serial: cert.serial)
            #expect(admitted.name == "machine-7")
            #expect(try await store.host(named: "machine-7")?.id == host.id)
        }
    }

    @Test("an unknown token is token-invalid")
    func unknownToken() async throws {
        try await withUnitTempDir { dir in
            let store = try StateStore(path: dir + "/state.db")
            let issuer = try Issuer()
            let token = EnrollmentToken.generate(caFingerprint: issuer.ca.fingerprint)
            let error = await #expect(throws: FerryError.self) { _ = try await Self.enroll(store, token, issuer, name: "x") }
            #expect(error?.code == .tokenInvalid)
        }
    }

    @Test("an expired token is token-expired, and neither consumes it nor creates a host")
    func expiredToken() async throws {
        try await withUnitTempDir { dir in
            let store = try StateStore(path: dir + "/state.db")
            let issuer = try Issuer()
            let token = try await Self.newToken(store, issuer, ttl: -1)
            let error = await #expect(throws: FerryError.self) { _ = try await Self.enroll(store, token, issuer, name: "late") }
            #expect(error?.code == .tokenExpired)
            #expect(try await store.hosts().isEmpty)
            #expect(try await store.enrollmentTokens().first?.usedAt == nil)
            #expect(issuer.calls.value.load(ordering: .relaxed) == 0)
        }
    }

    @Test("a token bound to a host: another explicit name is token-wrong-host; an empty name gets the bound name")
    func boundToken() async throws {
        try await withUnitTempDir { dir in
            let store = try StateStore(path: dir + "/state.db")
            let issuer = try Issuer()
            let token = try await Self.newToken(store, issuer, host: "db1")

            let error = await #expect(throws: FerryError.self) { _ = try await Self.enroll(store, token, issuer, name: "db2") }
            #expect(error?.code == .tokenWrongHost)
            #expect(try await store.hosts().isEmpty)
            #expect(try await store.enrollmentTokens().first?.usedAt == nil, "a refused attempt must not use up the token")

            let (host, _) = try await Self.enroll(store, token, issuer, name: "", hostname: "ip-10-0-0-7")
            #expect(host.name == "db1")

            // The same name given explicitly is fine too.
            let explicit = try await Self.newToken(store, issuer, host: "db3")
            #expect(try await Self.enroll(store, explicit, issuer, name: "db3").0.name == "db3")
        }
    }

    @Test("a token cannot be bound to the name of an enrolled host, nor a second host enrolled under it")
    func nameConflicts() async throws {
        try await withUnitTempDir { dir in
            let store = try StateStore(path: dir + "/state.db")
            let issuer = try Issuer()
            _ = try await Self.enroll(store, try await Self.newToken(store, issuer), issuer, name: "web1")
            let bindError = await #expect(throws: FerryError.self) { _ = try await Self.newToken(store, issuer, host: "web1") }
            #expect(bindError?.code == .conflict)
            let second = try await Self.newToken(store, issuer)
            let enrollError = await #expect(throws: FerryError.self) { _ = try await Self.enroll(store, second, issuer, name: "web1") }
            #expect(enrollError?.code == .conflict)
            #expect(try await store.enrollmentTokens().contains { $0.usedAt == nil }, "the refused token stays usable")
        }
    }

    @Test("an invalid host name is bad-request", arguments: ["bad name", "a/b", String(repeating: "x", count: 64), "naïve"])
    func invalidName(name: String) async throws {
        try await withUnitTempDir { dir in
            let store = try StateStore(path: dir + "/state.db")
            let issuer = try Issuer()
            let token = try await Self.newToken(store, issuer)
            let error = await #expect(throws: FerryError.self) { _ = try await Self.enroll(store, token, issuer, name: name) }
            #expect(error?.code == .badRequest)
        }
    }

    // MARK: removal

    @Test("removeHost revokes every serial the host ever had; admit then throws revoked")
    func removeRevokesAll() async throws {
        try await withUnitTempDir { dir in
            let store = try StateStore(path: dir + "/state.db")
            let issuer = try Issuer()
            let (host, first) = try await Self.enroll(store, try await Self.newToken(store, issuer), issuer, name: "web1")
            let renewed = try issuer.certificate(hostID: host.id, name: "web1")
            try await store.recordRenewal(hostID: host.id, serial: renewed.serial, notAfter: renewed.notAfter)
            #expect(try await store.host(named: "web1")?.certSerial == renewed.serial)
            _ = try await store.admit(hostID: host.id, serial: first.serial)
            _ = try await store.admit(hostID: host.id, serial: renewed.serial)

            let (removed, serials) = try await store.removeHost(named: "web1", actor: "api:ops")
            #expect(removed.state == HostRecord.State.removed)
            #expect(removed.removedAt != nil)
            #expect(Set(serials) == [first.serial, renewed.serial])
            // Checked in the table itself, not only in what removeHost says it did.
            let queue = try DatabaseQueue(path: dir + "/state.db")
            let stored = try await queue.read { db in
                try Row.fetchAll(db, sql: "SELECT serial, hostID FROM revokedSerial").map { ($0["serial"] as String, $0["hostID"] as String) }
            }
            try queue.close()
            #expect(Set(stored.map(\.0)) == [first.serial, renewed.serial])
            #expect(stored.allSatisfy { $0.1 == host.id })

            for serial in [first.serial, renewed.serial] {
                let error = await #expect(throws: FerryError.self) { _ = try await store.admit(hostID: host.id, serial: serial) }
                #expect(error?.code == .revoked)
            }
            // Even a serial the store never saw: the host itself is removed.
            let unseen = try issuer.certificate(hostID: host.id, name: "web1")
            let error = await #expect(throws: FerryError.self) { _ = try await store.admit(hostID: host.id, serial: unseen.serial) }
            #expect(error?.code == .revoked)

            // A removed host cannot renew, is hidden by default, and cannot be removed twice.
            let renewError = await #expect(throws: FerryError.self) {
                try await store.recordRenewal(hostID: host.id, serial: unseen.serial, notAfter: unseen.notAfter)
            }
            #expect(renewError?.code == .revoked)
            #expect(try await store.hosts().isEmpty)
            #expect(try await store.hosts(includeRemoved: true).map(\.id) == [host.id])
            let again = await #expect(throws: FerryError.self) { _ = try await store.removeHost(named: "web1", actor: "api:ops") }
            #expect(again?.code == .notFound)

            // The name is free again; the new host is admitted, the old serials stay revoked.
            let (newHost, newCert) = try await Self.enroll(store, try await Self.newToken(store, issuer), issuer, name: "web1")
            #expect(newHost.id != host.id)
            #expect(try await store.admit(hostID: newHost.id, serial: newCert.serial).name == "web1")
            await #expect(throws: FerryError.self) { _ = try await store.admit(hostID: host.id, serial: first.serial) }
        }
    }

    @Test("admit of an unknown host is unauthenticated")
    func admitUnknown() async throws {
        try await withUnitTempDir { dir in
            let store = try StateStore(path: dir + "/state.db")
            let error = await #expect(throws: FerryError.self) { _ = try await store.admit(hostID: "nope", serial: "00ff") }
            #expect(error?.code == .unauthenticated)
        }
    }

    // MARK: audit

    @Test("every change appends to the audit log, naming its actor; failed changes append nothing")
    func auditLog() async throws {
        try await withUnitTempDir { dir in
            let store = try StateStore(path: dir + "/state.db")
            let issuer = try Issuer()
            var expectedCount = 0

            func expectLatest(action: String, actor: String, target: String, sourceLocation: SourceLocation = #_sourceLocation) async throws {
                expectedCount += 1
                let log = try await store.auditLog(limit: 1_000)
                #expect(log.count == expectedCount, sourceLocation: sourceLocation)
                let latest = try #require(log.first, sourceLocation: sourceLocation)
                #expect(latest.action == action, sourceLocation: sourceLocation)
                #expect(latest.actor == actor, sourceLocation: sourceLocation)
                #expect(latest.target == target, sourceLocation: sourceLocation)
                #expect(abs(latest.at.timeIntervalSinceNow) < 60, sourceLocation: sourceLocation)
            }

            try await store.ensureAPIToken(name: "alice", role: .operator, secret: "fat_alice")
            try await expectLatest(action: "api-token.create", actor: "system", target: "alice")
            #expect(try await store.principal(forBearer: "fat_alice")?.actor == "api:alice")

            let token = try await Self.newToken(store, issuer, host: "web1", actor: "api:alice")
            let tokenID = String(token.secretHash.prefix(12))
            try await expectLatest(action: "token.create", actor: "api:alice", target: tokenID)

            _ = await #expect(throws: FerryError.self) { _ = try await Self.enroll(store, token, issuer, name: "other") }
            #expect(try await store.auditLog(limit: 1_000).count == expectedCount, "a refused enrollment changed nothing")

            let (host, cert) = try await Self.enroll(store, token, issuer, name: "web1")
            try await expectLatest(action: "host.enroll", actor: "token:\(tokenID)", target: "web1")

            // A session start may record several things (inventory, agent version, ...): at least
            // the new inventory, and every entry is the agent's.
            _ = try await store.recordSessionStart(hostID: host.id, serial: cert.serial, address: "192.0.2.9:1",
                                                   agentVersion: "1.0", inventory: Data([1, 2, 3]))
            let afterSession = try await store.auditLog(limit: 1_000)
            let sessionEntries = afterSession.prefix(afterSession.count - expectedCount)
            #expect(sessionEntries.contains { $0.action == "host.inventory" })
            #expect(sessionEntries.allSatisfy { $0.actor == "agent:web1" && $0.target == "web1" }, "\(sessionEntries.map { ($0.action, $0.actor) })")
            expectedCount = afterSession.count

            let renewed = try issuer.certificate(hostID: host.id, name: "web1")
            try await store.recordRenewal(hostID: host.id, serial: renewed.serial, notAfter: renewed.notAfter)
            try await expectLatest(action: "host.renew-certificate", actor: "agent:web1", target: "web1")
            #expect(try await store.auditLog(limit: 1).first?.detail.contains(renewed.serial) == true)

            #expect(try await store.recordInventory(hostID: host.id, inventory: Data([1, 2, 3])) == false)
            #expect(try await store.auditLog(limit: 1_000).count == expectedCount, "an unchanged inventory is not a change")
            #expect(try await store.recordInventory(hostID: host.id, inventory: Data([4])) == true)
            try await expectLatest(action: "host.inventory", actor: "agent:web1", target: "web1")

            _ = try await store.removeHost(named: "web1", actor: "api:bob")
            try await expectLatest(action: "host.remove", actor: "api:bob", target: "web1")

            // Newest first, ids strictly decreasing, limit honoured.
            let log = try await store.auditLog(limit: 1_000)
            #expect(zip(log, log.dropFirst()).allSatisfy { $0.id > $1.id })
            #expect(try await store.auditLog(limit: 3).map(\.id) == Array(log.prefix(3)).map(\.id))
        }
    }
}

@Suite("Unit typed job, step and plan states")
struct UnitTypedStateTests {
    @Test("plan and job states are stored and shown as their raw text (a database and API clients from before the enums read them alike)")
    func rawText() async throws {
        let dir = try TestDirectory()
        let path = dir.file("state.db")
        let store = try StateStore(path: path)
        _ = try await store.applyPlan(RecoveryPlan(name: "shop", description: "", groups: []), source: "name: shop\n", actor: "unit")
        try await store.setPlanState("shop", .failedOver)
        let text = try await store.pool.read { db in try String.fetchOne(db, sql: "SELECT state FROM recoveryPlan WHERE name = 'shop'") }
        #expect(text == "failed-over")
        #expect(try await store.plan(named: "shop").state == .failedOver)
        // A row written as text by an earlier build reads back as the enum.
        try await store.pool.write { db in try db.execute(sql: "UPDATE recoveryPlan SET state = 'reversed' WHERE name = 'shop'") }
        #expect(try await store.plan(named: "shop").state == .reversed)
        let json = String(decoding: try JSONEncoder().encode(try await store.plan(named: "shop")), as: UTF8.self)
        #expect(json.contains(#""state":"reversed""#), "\(json)")
        // A job step persisted before the enums (settle's state as text) decodes.
        let spec = try JSONDecoder().decode(JobStepSpec.self, from: Data(#"{"kind":"settle","state":"failed-over"}"#.utf8))
        #expect(spec.state == .failedOver)
        #expect(API.JobState.allCases.filter(\.isFinished) == [.succeeded, .failed, .cancelled])
        #expect("\(API.PlanState.failedOver)" == "failed-over")
    }
}
