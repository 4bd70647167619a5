import FerryWire
import Foundation

/// Which alerts are open, as a state machine: each rule-and-subject key is pending (its
/// condition holds, not yet for long enough) or firing. `reconcile` turns one evaluation's
/// conditions into actions for the store and the webhooks; it does no I/O.
struct AlertReconciler: Sendable {
    enum Tracked: Sendable, Equatable {
        case pending(since: Date, AlertCondition)
        case firing(id: String, AlertCondition)
    }

    enum Action: Sendable, Equatable {
        case open(id: String, AlertCondition)
        /// Still firing; what it says changed (a lag that grew): stored, not notified.
        case update(id: String, AlertCondition)
        case resolve(id: String, AlertCondition)
    }

    private(set) var tracked: [String: Tracked] = [:]

    /// Starts from the alerts a previous run left firing.
    init(firing: [(id: String, condition: AlertCondition)] = []) {
        for f in firing { tracked[f.condition.key] = .firing(id: f.id, f.condition) }
    }

    mutating func reconcile(_ conditions: [AlertCondition], now: Date, newID: () -> String) -> [Action] {
        var actions: [Action] = []
        var seen = Set<String>()
        for c in conditions where seen.insert(c.key).inserted {
            switch tracked[c.key] {
            case nil:
                if c.holdSeconds <= 0 {
                    let id = newID()
                    tracked[c.key] = .firing(id: id, c)
                    actions.append(.open(id: id, c))
                } else {
                    tracked[c.key] = .pending(since: now, c)
                }
            case .pending(let since, _)?:
                if now.timeIntervalSince(since) >= c.holdSeconds {
                    let id = newID()
                    tracked[c.key] = .firing(id: id, c)
                    actions.append(.open(id: id, c))
                } else {
                    tracked[c.key] = .pending(since: since, c)
                }
            case .firing(let id, let old)?:
                if old.message != c.message || old.severity != c.severity {
                    tracked[c.key] = .firing(id: id, c)
                    actions.append(.update(id: id, c))
                }
            }
        }
        for (key, state) in tracked where !seen.contains(key) {
            tracked[key] = nil
            if case .firing(let id, let c) = state { actions.append(.resolve(id: id, c)) }
        }
        return actions
    }
}
