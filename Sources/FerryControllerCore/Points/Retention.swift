import FerryWire
import Foundation

/// Which points a group's retention tiers keep: every point for `keepAll`, then the newest of
/// each hour until `hourly`, then the newest of each day until `daily`; nothing older. The
/// newest point of each kind is always kept, whatever its age.
public enum Retention {
    /// The ids of `points` (of one group) that the policy no longer keeps at `now`.
    public static func expired(_ points: [PointRecord], policy: API.GroupPolicy, now: Date = Date()) -> [String] {
        var keep = Set<String>()
        var newestOfKind: [String: PointRecord] = [:]
        var hourBuckets: [Int64: PointRecord] = [:]
        var dayBuckets: [Int64: PointRecord] = [:]
        for p in points {
            if let n = newestOfKind[p.kind], n.createdAt > p.createdAt {} else { newestOfKind[p.kind] = p }
            let age = now.timeIntervalSince(p.createdAt)
            let t = Int64(p.createdAt.timeIntervalSince1970.rounded(.down))
            if age <= Double(policy.keepAllSeconds) {
                keep.insert(p.id)
            } else if age <= Double(policy.hourlySeconds) {
                let bucket = t / 3600
                if let n = hourBuckets[bucket], n.createdAt > p.createdAt {} else { hourBuckets[bucket] = p }
            } else if age <= Double(policy.dailySeconds) {
                let bucket = t / 86_400
                if let n = dayBuckets[bucket], n.createdAt > p.createdAt {} else { dayBuckets[bucket] = p }
            }
        }
        for p in hourBuckets.values { keep.insert(p.id) }
        for p in dayBuckets.values { keep.insert(p.id) }
        for p in newestOfKind.values { keep.insert(p.id) }
        return points.filter { !keep.contains($0.id) }.map(\.id)
    }

    /// Checks a policy an operator sent.
    public static func validate(_ p: API.GroupPolicy) throws {
        func bad(_ m: String) -> FerryError { FerryError(.badRequest, "group policy: " + m) }
        guard p.crashIntervalSeconds == 0 || (1...86_400).contains(p.crashIntervalSeconds) else { throw bad("crash-interval must be 0 (off) or 1 s to 24 h") }
        guard p.appIntervalSeconds == 0 || (1...604_800).contains(p.appIntervalSeconds) else { throw bad("app-interval must be 0 (off) or 1 s to 7 d") }
        guard (1...3600).contains(p.hookTimeoutSeconds) else { throw bad("hook-timeout must be 1 s to 1 h") }
        guard (1...10_000).contains(p.holdBudgetMilliseconds) else { throw bad("hold-budget must be 1 ms to 10 s") }
        guard p.keepAllSeconds >= 0, p.hourlySeconds >= p.keepAllSeconds, p.dailySeconds >= p.hourlySeconds else {
            throw bad("retention tiers must grow: keep-all <= hourly <= daily")
        }
        guard p.dailySeconds <= 366 * 86_400 else { throw bad("daily retention is at most a year") }
        guard p.rpoAlertSeconds >= 1 else { throw bad("rpo-alert must be at least 1 s") }
        for hook in [p.quiesceHook, p.thawHook].compactMap({ $0 }) {
            guard !hook.isEmpty, hook.count <= 64, hook.allSatisfy({ $0.isLetter || $0.isNumber || "-_.".contains($0) }) else {
                throw bad("hook name '\(hook)' must be 1-64 letters, digits, '-', '_' or '.'")
            }
        }
    }
}
