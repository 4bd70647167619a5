import FerryWire
import Foundation

/// When each rule fires; from the controller's configuration (`alert-*` keys).
public struct AlertThresholds: Sendable, Equatable {
    public var lagSeconds: Double = 60
    public var resyncSeconds: Double = 3600
    public var hostOfflineSeconds: Double = 60
    public var journalPercent: Double = 90
    public var certificateExpirySeconds: Double = 14 * 86_400
    public var drillOverdueSeconds: Double = 30 * 86_400
    public init() {}
}

/// What the controller sees at one moment, as the API shows it.
struct AlertSnapshot: Sendable {
    var now: Date
    var hosts: [API.Host]
    var volumes: [API.Volume]
    var groups: [API.Group]
    var plans: [API.Plan]
    /// Newest first, as the API lists them.
    var jobs: [API.Job]
}

/// A rule's condition holding for one subject now.
struct AlertCondition: Sendable, Equatable {
    var rule: API.AlertRule
    var severity: API.AlertSeverity
    var subject: String
    var message: String
    /// How long it must hold before the alert opens (a host that reconnects within a minute
    /// is not worth a page).
    var holdSeconds: Double = 0

    /// One alert per rule and subject.
    var key: String { rule.rawValue + " " + subject }
}

/// The alert rules: a pure function of a snapshot, unit-tested without a controller.
enum AlertRules {
    static func evaluate(_ s: AlertSnapshot, _ t: AlertThresholds) -> [AlertCondition] {
        var found: [AlertCondition] = []
        for g in s.groups where g.rpoAlert {
            let age = g.rpoSeconds.map { "\(seconds($0)) old" } ?? "missing"
            found.append(AlertCondition(rule: .rpo, severity: .critical, subject: g.name,
                                        message: "group \(g.name): the newest complete recovery point is \(age), over its RPO alert of \(g.policy.rpoAlertSeconds) s"
                                            + (g.lastRoundError.map { "; last round: \($0)" } ?? "")))
        }
        for v in s.volumes {
            let name = "\(v.host)/\(v.name)"
            if let lag = v.lagSeconds, lag > t.lagSeconds {
                found.append(AlertCondition(rule: .lag, severity: .warning, subject: name,
                                            message: "\(name): replication lag \(seconds(lag)) (\(v.lagBytes ?? 0) bytes), over \(seconds(t.lagSeconds))"))
            }
            switch v.replicaState {
            case .error?:
                found.append(AlertCondition(rule: .volumeError, severity: .critical, subject: name,
                                            message: "\(name): replication failed: \(v.lastError ?? "no reason recorded")"))
            case .paused?:
                let reason = v.state == .hostOffline ? "its host is offline" : (v.lastError ?? "paused")
                // An offline host alerts on its own; the volume's pause follows once the host alert would.
                found.append(AlertCondition(rule: .volumePaused, severity: .critical, subject: name,
                                            message: "\(name): replication paused: \(reason)",
                                            holdSeconds: v.state == .hostOffline ? t.hostOfflineSeconds : 0))
            case .resyncing?, .initialSync?:
                let progress = v.sync.map { " (\($0.doneBytes) of \($0.totalBytes) bytes compared)" } ?? ""
                found.append(AlertCondition(rule: .resyncLong, severity: .warning, subject: name,
                                            message: "\(name): \(v.replicaState?.rawValue ?? "sync") for over \(seconds(t.resyncSeconds))\(progress)",
                                            holdSeconds: t.resyncSeconds))
            default:
                break
            }
            if let bytes = v.journalBytes, let cap = v.journalLimitBytes, cap > 0, Double(bytes) >= Double(cap) * t.journalPercent / 100 {
                found.append(AlertCondition(rule: .journalNearCap, severity: .warning, subject: name,
                                            message: "\(name): replica journal holds \(bytes >> 20) MiB of its \(cap >> 20) MiB cap; older points fold away early"))
            }
        }
        for h in s.hosts {
            if h.state == .offline {
                let since = h.lastSeen.map { " since \(ISO8601DateFormatter().string(from: $0))" } ?? ""
                found.append(AlertCondition(rule: .hostOffline, severity: .critical, subject: h.name,
                                            message: "host \(h.name) is offline\(since)", holdSeconds: t.hostOfflineSeconds))
            }
            if let expiry = h.certificateExpiry, expiry.timeIntervalSince(s.now) < t.certificateExpirySeconds {
                let left = expiry.timeIntervalSince(s.now)
                found.append(AlertCondition(rule: .certificateExpiring, severity: left <= 0 ? .critical : .warning, subject: h.name,
                                            message: left <= 0 ? "host \(h.name)'s certificate expired; it cannot reconnect until re-enrolled"
                                                : "host \(h.name)'s certificate expires in \(seconds(left)); its agent renews it when online"))
            }
        }
        for p in s.plans {
            let name = p.plan.name
            let mine = s.jobs.filter { $0.plan == name }
            if let newest = mine.max(by: { $0.createdAt < $1.createdAt }), newest.state == .failed {
                found.append(AlertCondition(rule: .jobFailed, severity: .critical, subject: name,
                                            message: "plan \(name): \(newest.operation.rawValue) job \(newest.id) failed: \(newest.error ?? "see the job")"))
            }
            guard p.state == .protected else { continue }
            let lastDrill = mine.filter { $0.operation == .drill && $0.state == .succeeded }.compactMap(\.endedAt).max()
            let since = lastDrill ?? p.updatedAt
            if s.now.timeIntervalSince(since) > t.drillOverdueSeconds {
                found.append(AlertCondition(rule: .drillOverdue, severity: .warning, subject: name,
                                            message: "plan \(name): " + (lastDrill == nil ? "never drilled" : "last drilled \(seconds(s.now.timeIntervalSince(since))) ago")
                                                + "; a drill is due every \(seconds(t.drillOverdueSeconds))"))
            }
        }
        return found
    }

    static func seconds(_ s: Double) -> String {
        switch s {
        case ..<120: "\(Int(s.rounded())) s"
        case ..<7200: "\(Int((s / 60).rounded())) min"
        case ..<172_800: "\(Int((s / 3600).rounded())) h"
        default: "\(Int((s / 86_400).rounded())) d"
        }
    }
}
