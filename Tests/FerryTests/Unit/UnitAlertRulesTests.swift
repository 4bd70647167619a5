import Crypto
import FerryWire
import Foundation
import Testing
@testable import FerryControllerCore

/// The alert rules and the open/resolve state machine, without a controller.
@Suite("alert rules and their state machine")
struct UnitAlertRulesTests {
    let now = Date(timeIntervalSince1970: 1_800_000_000)

    func volume(_ name: String, state: API.VolumeState = .exported, replica: API.ReplicaState, lag: Double? = nil, error: String? = nil,
                journal: UInt64? = nil) -> API.Volume {
        var v = API.Volume(host: "db", name: name, path: "/v/\(name)", sizeBytes: 1 << 30, state: state, socketPath: nil, lastSequence: 1, protectedAt: now)
        v.replicaState = replica
        v.lagSeconds = lag
        v.lastError = error
        v.journalBytes = journal
        v.journalLimitBytes = journal == nil ? nil : 1000 << 20
        return v
    }

    func plan(_ name: String, state: API.PlanState = .protected, updated: Date) -> API.Plan {
        API.Plan(plan: RecoveryPlan(name: name, description: "", groups: []), state: state, updatedAt: updated, lastJob: nil, source: "")
    }

    func job(_ plan: String, _ op: API.JobOperation, _ state: API.JobState, at: Date) -> API.Job {
        var j = API.Job(id: "j-\(plan)-\(at.timeIntervalSince1970)", plan: plan, operation: op, state: state, createdAt: at, steps: [],
                        request: API.JobCreateRequest(operation: op))
        j.endedAt = at.addingTimeInterval(5)
        if state == .failed { j.error = "start hook exited 3" }
        return j
    }

    @Test("each rule fires on its condition and not otherwise")
    func rules() throws {
        var t = AlertThresholds()
        t.lagSeconds = 30
        t.certificateExpirySeconds = 7 * 86_400
        t.drillOverdueSeconds = 30 * 86_400
        var group = API.Group(name: "shop", volumes: ["db/a"], policy: API.GroupPolicy(), createdAt: now, points: 3, newestPoint: now.addingTimeInterval(-90),
                              rpoSeconds: 90, rpoAlert: true, lastRoundError: nil)
        let calm = API.Group(name: "calm", volumes: [], policy: API.GroupPolicy(), createdAt: now, points: 1, newestPoint: now, rpoSeconds: 1, rpoAlert: false, lastRoundError: nil)
        let hosts = [
            API.Host(id: "h1", name: "db", state: .offline, address: nil, os: nil, kernel: nil, agentVersion: nil, enrolledAt: now,
                     lastSeen: now.addingTimeInterval(-120), certificateSerial: nil, certificateExpiry: now.addingTimeInterval(3 * 86_400), inventory: nil),
            API.Host(id: "h2", name: "app", state: .online, address: nil, os: nil, kernel: nil, agentVersion: nil, enrolledAt: now,
                     lastSeen: now, certificateSerial: nil, certificateExpiry: now.addingTimeInterval(20 * 86_400), inventory: nil),
        ]
        let volumes = [
            volume("a", replica: .protected, lag: 45),
            volume("b", replica: .protected, lag: 10, journal: 950 << 20),
            volume("c", replica: .error, error: "journal damaged"),
            volume("d", state: .hostOffline, replica: .paused),
            volume("e", replica: .paused, error: "the controller's disk is full"),
            volume("f", replica: .resyncing),
            volume("g", replica: .protected, lag: 0, journal: 10 << 20),
        ]
        let plans = [plan("never", updated: now.addingTimeInterval(-40 * 86_400)), plan("fresh", updated: now.addingTimeInterval(-86_400)),
                     plan("drilled", updated: now.addingTimeInterval(-90 * 86_400)), plan("away", state: .failedOver, updated: now.addingTimeInterval(-90 * 86_400))]
        let jobs = [job("drilled", .drill, .succeeded, at: now.addingTimeInterval(-3 * 86_400)),
                    job("fresh", .drill, .failed, at: now.addingTimeInterval(-3600)),
                    job("never", .drill, .failed, at: now.addingTimeInterval(-7200)), job("never", .drillCleanup, .succeeded, at: now.addingTimeInterval(-3600))]
        let found = AlertRules.evaluate(AlertSnapshot(now: now, hosts: hosts, volumes: volumes, groups: [group, calm], plans: plans, jobs: jobs), t)
        let keys = Set(found.map(\.key))
        #expect(keys == ["rpo shop", "lag db/a", "journal-near-cap db/b", "volume-error db/c", "volume-paused db/d", "volume-paused db/e",
                         "resync-long db/f", "host-offline db", "certificate-expiring db", "job-failed fresh", "drill-overdue never"], "\(keys.sorted())")
        let byKey = Dictionary(uniqueKeysWithValues: found.map { ($0.key, $0) })
        #expect(byKey["volume-paused db/d"]?.message.contains("host is offline") == true && byKey["volume-paused db/d"]?.holdSeconds == t.hostOfflineSeconds)
        #expect(byKey["volume-paused db/e"]?.message.contains("disk is full") == true && byKey["volume-paused db/e"]?.holdSeconds == 0)
        #expect(byKey["resync-long db/f"]?.holdSeconds == t.resyncSeconds)
        #expect(byKey["host-offline db"]?.severity == .critical && byKey["certificate-expiring db"]?.severity == .warning)
        #expect(byKey["volume-error db/c"]?.message.contains("journal damaged") == true)
        group.lastRoundError = "host db is offline"
        let again = AlertRules.evaluate(AlertSnapshot(now: now, hosts: [], volumes: [], groups: [group], plans: [], jobs: []), t)
        #expect(again.first?.message.contains("last round: host db is offline") == true)
    }

    @Test("an alert opens once its condition held long enough, updates without a new notification, and resolves when gone")
    func reconciler() {
        var r = AlertReconciler()
        var n = 0
        let newID = { () -> String in n += 1; return "al-\(n)" }
        let offline = AlertCondition(rule: .hostOffline, severity: .critical, subject: "db", message: "db offline", holdSeconds: 60)
        let rpo = AlertCondition(rule: .rpo, severity: .critical, subject: "shop", message: "90 s")
        #expect(r.reconcile([offline, rpo], now: now, newID: newID) == [.open(id: "al-1", rpo)])
        #expect(r.reconcile([offline, rpo], now: now.addingTimeInterval(59), newID: newID) == [])
        var later = rpo
        later.message = "120 s"
        #expect(r.reconcile([offline, later], now: now.addingTimeInterval(60), newID: newID) == [.open(id: "al-2", offline), .update(id: "al-1", later)])
        // Gone: both resolve; a pending condition that goes away never opens.
        let flap = AlertCondition(rule: .hostOffline, severity: .critical, subject: "app", message: "app offline", holdSeconds: 60)
        let actions = r.reconcile([flap], now: now.addingTimeInterval(61), newID: newID)
        #expect(Set(actions.map { "\($0)" }) == Set([AlertReconciler.Action.resolve(id: "al-2", offline), .resolve(id: "al-1", later)].map { "\($0)" }))
        #expect(r.reconcile([], now: now.addingTimeInterval(62), newID: newID) == [])
        // A restart starts from what was firing: still firing is no news; gone resolves.
        var restarted = AlertReconciler(firing: [(id: "al-9", condition: rpo)])
        #expect(restarted.reconcile([rpo], now: now, newID: newID) == [])
        #expect(restarted.reconcile([], now: now, newID: newID) == [.resolve(id: "al-9", rpo)])
    }

    @Test("webhook signatures: HMAC-SHA256 over TIMESTAMP.BODY, as a receiver recomputes it")
    func signature() {
        // Known answer from openssl: printf '1800000000.{"a":1}' | openssl dgst -sha256 -hmac 'whs_secret-0123456789'
        let s = WebhookDispatcher.signature(key: .init(data: Data("whs_secret-0123456789".utf8)), timestamp: "1800000000", body: Data(#"{"a":1}"#.utf8))
        #expect(s == "sha256=" + expectedHMAC)
    }

    let expectedHMAC = "e014caec113698c109ebe1d9bcb1bb91a195a75515c5d82c1927f573a6b4d16e"
}
