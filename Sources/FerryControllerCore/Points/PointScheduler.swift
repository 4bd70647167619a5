import FerryWire
import Foundation
import Logging
import ServiceLifecycle

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
        let due = Schedule()
        var lastRetention = ContinuousClock.now - Self.retentionEvery
        var alerting = Set<String>()
        while !Task.isShuttingDownGracefully {
            try? await cancelWhenGracefulShutdown { try await Task.sleep(for: Self.tick) }
            if Task.isShuttingDownGracefully { break }
            guard let groups = try? await store.groups() else { continue }
            let now = Date()
            for (group, members) in groups where !members.isEmpty {
                let policy = group.decodedPolicy
                let newest = await due.newest(group.name, store: store)
                if policy.appIntervalSeconds > 0, now.timeIntervalSince(newest.app ?? group.createdAt) >= Double(policy.appIntervalSeconds),
                   due.start(group.name) {
                    due.attempted(group.name, app: true, at: now)
                    Task { await take(group.name, app: true, due: due) }
                } else if policy.crashIntervalSeconds > 0,
                          now.timeIntervalSince(max(newest.any ?? .distantPast, due.lastAttempt(group.name) ?? .distantPast)) >= Double(policy.crashIntervalSeconds),
                          due.start(group.name) {
                    due.attempted(group.name, app: false, at: now)
                    Task { await take(group.name, app: false, due: due) }
                }
                let rpo = newest.any.map { now.timeIntervalSince($0) } ?? now.timeIntervalSince(group.createdAt)
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

    private func take(_ group: String, app: Bool, due: Schedule) async {
        defer { due.finish(group) }
        do {
            let point = try await coordinator.takePoint(group: group, app: app, manual: false)
            due.taken(group, point: point)
            logger.debug("point taken", metadata: ["group": "\(group)", "point": "\(point.id)", "kind": "\(point.kind)"])
        } catch {
            logger.warning("scheduled point not taken", metadata: ["group": "\(group)", "app": "\(app)", "error": "\((error as? FerryError)?.message ?? "\(error)")"])
        }
    }
}

/// What the scheduler remembers between ticks: newest point times per group (read from the
/// catalogue once, then kept up to date), rounds running, and the last attempt, so a failing
/// group is retried at its interval rather than on every tick.
final class Schedule: @unchecked Sendable {
    // Touched by the scheduler loop and the round tasks it starts.
    private let lock = NSLock()
    private var newestAny: [String: Date] = [:]
    private var newestApp: [String: Date] = [:]
    private var loaded = Set<String>()
    private var running = Set<String>()
    private var attempts: [String: Date] = [:]
    private var appAttempts: [String: Date] = [:]

    func newest(_ group: String, store: StateStore) async -> (any: Date?, app: Date?) {
        let known = lock.withLock { loaded.contains(group) }
        if !known, let points = try? await store.points(group: group) {
            let any = points.last?.createdAt
            let app = points.last(where: { $0.consistency == "app" })?.createdAt
            lock.withLock {
                loaded.insert(group)
                newestAny[group] = any
                newestApp[group] = app
            }
        }
        return lock.withLock { (newestAny[group], max(newestApp[group] ?? .distantPast, appAttempts[group] ?? .distantPast) == .distantPast ? nil : max(newestApp[group] ?? .distantPast, appAttempts[group] ?? .distantPast)) }
    }

    func start(_ group: String) -> Bool { lock.withLock { running.insert(group).inserted } }
    func finish(_ group: String) { lock.withLock { _ = running.remove(group) } }
    func lastAttempt(_ group: String) -> Date? { lock.withLock { attempts[group] } }

    func attempted(_ group: String, app: Bool, at: Date) {
        lock.withLock {
            attempts[group] = at
            if app { appAttempts[group] = at }
        }
    }

    func taken(_ group: String, point: PointRecord) {
        lock.withLock {
            newestAny[group] = max(newestAny[group] ?? .distantPast, point.createdAt)
            if point.consistency == "app" { newestApp[group] = max(newestApp[group] ?? .distantPast, point.createdAt) }
        }
    }
}
