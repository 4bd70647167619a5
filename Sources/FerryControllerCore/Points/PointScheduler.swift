import FerryWire
import Foundation
import Logging
import ServiceLifecycle
import Synchronization

/// Takes each group's scheduled points (crash-consistent every N seconds, app-consistent every
/// M), applies retention, keeps the replicas' journals for the points kept, and watches RPO.
struct PointScheduler: Service {
    let coordinator: CutCoordinator
    let catalogue: PointCatalogue
    let store: StateStore
    let metrics: ControllerMetrics
    let logger: Logger
    /// How often schedules are checked.
    static let tick: Duration = .milliseconds(250)
    /// How often retention runs.
    static let retentionEvery: Duration = .seconds(10)

    func run() async throws {
        let rounds = Rounds()
        var lastRetention = ContinuousClock.now - Self.retentionEvery
        var alerting = Set<String>()
        while !Task.isShuttingDownGracefully {
            try? await cancelWhenGracefulShutdown { try await Task.sleep(for: Self.tick) }
            if Task.isShuttingDownGracefully { break }
            guard let groups = try? await store.groups(), let newest = try? await store.newestPoints() else { continue }
            let now = Date()
            for (group, members) in groups where !members.isEmpty {
                let policy = group.decodedPolicy
                let times = newest[group.name] ?? (nil, nil)
                // An interval counts from the newest point of that kind (manual ones too), or from
                // the last attempt, so a failing group is retried at its interval, not every tick.
                func due(_ interval: Int, since point: Date?, app: Bool) -> Bool {
                    let last = max(point ?? group.createdAt, rounds.lastAttempt(group.name, app: app) ?? .distantPast)
                    return interval > 0 && now.timeIntervalSince(last) >= Double(interval)
                }
                let app = due(policy.appIntervalSeconds, since: times.app, app: true)
                if app || due(policy.crashIntervalSeconds, since: times.any, app: false), rounds.start(group.name, app: app, at: now) {
                    Task { await take(group.name, app: app, rounds: rounds) }
                }
                let rpo = now.timeIntervalSince(times.any ?? group.createdAt)
                let alert = rpo > Double(policy.rpoAlertSeconds)
                metrics.groupRPO(group: group.name, seconds: rpo, alert: alert)
                if alert, alerting.insert(group.name).inserted {
                    logger.warning("group RPO above its alert threshold", metadata: ["group": "\(group.name)", "rpo-seconds": "\(Int(rpo))",
                                                                                       "threshold": "\(policy.rpoAlertSeconds)"])
                } else if !alert, alerting.remove(group.name) != nil {
                    logger.info("group RPO back under its alert threshold", metadata: ["group": "\(group.name)"])
                }
            }
            if lastRetention.duration(to: .now) >= Self.retentionEvery {
                lastRetention = .now
                await catalogue.applyRetention(logger: logger)
            }
        }
    }

    private func take(_ group: String, app: Bool, rounds: Rounds) async {
        defer { rounds.finish(group) }
        do {
            let point = try await coordinator.takePoint(group: group, app: app, manual: false)
            logger.debug("point taken", metadata: ["group": "\(group)", "point": "\(point.id)", "kind": "\(point.kind)"])
        } catch {
            logger.warning("scheduled point not taken", metadata: ["group": "\(group)", "app": "\(app)", "error": "\((error as? FerryError)?.message ?? "\(error)")"])
        }
    }
}

/// The scheduler's rounds: which groups have one running, and when each kind was last tried.
final class Rounds: Sendable {
    private struct State {
        var running = Set<String>()
        var attempts: [String: Date] = [:]
        var appAttempts: [String: Date] = [:]
    }
    // Touched by the scheduler loop and the round tasks it starts.
    private let state = Mutex(State())

    /// Starts a round unless one of this group is running.
    func start(_ group: String, app: Bool, at: Date) -> Bool {
        state.withLock { s in
            guard s.running.insert(group).inserted else { return false }
            s.attempts[group] = at
            if app { s.appAttempts[group] = at }
            return true
        }
    }

    func finish(_ group: String) { state.withLock { _ = $0.running.remove(group) } }

    func lastAttempt(_ group: String, app: Bool) -> Date? { state.withLock { app ? $0.appAttempts[group] : $0.attempts[group] } }
}
