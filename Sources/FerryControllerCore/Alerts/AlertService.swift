import FerryWire
import Foundation
import Logging
import ServiceLifecycle

/// Evaluates the alert rules every `interval`, opens and resolves alerts in the state store
/// and hands each change to the webhooks.
struct AlertService: Service {
    let store: StateStore
    let thresholds: AlertThresholds
    let interval: Duration
    let webhooks: WebhookDispatcher
    let metrics: ControllerMetrics
    let controllerName: String
    let logger: Logger
    /// What the API shows now.
    let snapshot: @Sendable () async throws -> AlertSnapshot

    func run() async throws {
        // What a previous run left firing; read again until the store answers.
        var firing: [(id: String, condition: AlertCondition)]?
        while firing == nil, !Task.isShuttingDownGracefully {
            do { firing = try await store.firingAlerts() } catch {
                logger.warning("alerts: cannot read the firing alerts yet", metadata: ["error": "\(error)"])
                try? await cancelWhenGracefulShutdown { try await Task.sleep(for: interval) }
            }
        }
        var reconciler = AlertReconciler(firing: firing ?? [])
        while !Task.isShuttingDownGracefully {
            do {
                let s = try await snapshot()
                // On a copy: if the store refuses the changes, the next evaluation tries them again.
                var next = reconciler
                let actions = next.reconcile(AlertRules.evaluate(s, thresholds), now: s.now) {
                    "al-" + (0..<6).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined()
                }
                try await store.apply(actions, now: s.now)
                reconciler = next
                for action in actions { await notify(action, now: s.now) }
                var firing: [API.AlertRule: Int] = [:]
                for case .firing(_, let c) in reconciler.tracked.values { firing[c.rule, default: 0] += 1 }
                for rule in API.AlertRule.allCases { metrics.alertsFiring(rule: rule.rawValue, count: firing[rule] ?? 0) }
            } catch {
                logger.warning("alert evaluation failed", metadata: ["error": "\(error)"])
            }
            try? await cancelWhenGracefulShutdown { try await Task.sleep(for: interval) }
        }
    }

    private func notify(_ action: AlertReconciler.Action, now: Date) async {
        let (id, c, event): (String, AlertCondition, API.AlertState)
        switch action {
        case .open(let i, let cond): (id, c, event) = (i, cond, .firing)
        case .resolve(let i, let cond): (id, c, event) = (i, cond, .resolved)
        case .update: return
        }
        let metadata: Logger.Metadata = ["alert": "\(id)", "rule": "\(c.rule.rawValue)", "subject": "\(c.subject)"]
        if event == .firing { logger.warning("alert: \(c.message)", metadata: metadata) } else { logger.notice("alert resolved: \(c.message)", metadata: metadata) }
        var alert = API.Alert(id: id, rule: c.rule, severity: c.severity, subject: c.subject, message: c.message, state: event,
                              openedAt: now, resolvedAt: event == .resolved ? now : nil)
        if event == .resolved, let stored = try? await store.alert(id: id) { alert.openedAt = stored.openedAt }
        webhooks.enqueue(API.AlertNotification(event: event, alert: alert, controller: controllerName, sentAt: now))
    }
}
