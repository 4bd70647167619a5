@testable import FerryControllerCore
import FerryWire
import Foundation
import Testing

@Suite("recovery point retention tiers")
struct UnitRetentionTests {
    func point(_ id: String, _ age: TimeInterval, kind: String = "group-crash", now: Date) -> PointRecord {
        PointRecord(id: id, groupName: "g", createdAt: now.addingTimeInterval(-age), kind: kind, consistency: "crash", label: nil,
                    hookError: nil, members: Data("[]".utf8), pauseMicros: nil, prunedAt: nil, prunedReason: nil)
    }

    @Test("every point for keep-all, the newest of each hour and of each day after, nothing past daily; the newest of each kind always stays")
    func tiers() {
        // On an hour boundary, so the hour and day buckets below are known.
        let now = Date(timeIntervalSince1970: 1_800_000_000 - 1_800_000_000.truncatingRemainder(dividingBy: 86_400) + 86_400 * 10)
        var points: [PointRecord] = []
        // Every 15 s for 10 days.
        var age: TimeInterval = 10 * 86_400
        var n = 0
        while age > 0 {
            points.append(point("p\(n)", age, now: now))
            n += 1
            age -= 15
        }
        points.append(point("old-app", 9 * 86_400, kind: "group-app", now: now))
        let policy = API.GroupPolicy()
        let expired = Set(Retention.expired(points, policy: policy, now: now))
        let kept = points.filter { !expired.contains($0.id) }
        let ages = kept.map { now.timeIntervalSince($0.createdAt) }
        // All of the last 2 h: 480 points.
        #expect(ages.filter { $0 <= 7200 }.count == 480)
        // One per hour between 2 h and 24 h: 22 hours.
        #expect(ages.filter { $0 > 7200 && $0 <= 86_400 }.count == 22)
        // One per day between 1 and 7 days: 6 or 7 day buckets.
        let daily = ages.filter { $0 > 86_400 && $0 <= 7 * 86_400 }.count
        #expect((6...7).contains(daily), "\(daily)")
        // Past 7 days only the newest of a kind survives: the lone app point.
        #expect(kept.filter { now.timeIntervalSince($0.createdAt) > 7 * 86_400 }.map(\.id) == ["old-app"])
        // Within each hour bucket it is the newest that stays.
        let hourly = kept.filter { now.timeIntervalSince($0.createdAt) > 7200 && now.timeIntervalSince($0.createdAt) <= 86_400 }
        #expect(hourly.allSatisfy { Int($0.createdAt.timeIntervalSince1970) % 3600 == 3600 - 15 })
    }

    @Test("a policy with shrinking tiers, a zero budget or a bad hook name is refused")
    func validation() {
        var p = API.GroupPolicy()
        p.hourlySeconds = 60
        #expect(throws: FerryError.self) { try Retention.validate(p) }
        p = API.GroupPolicy()
        p.holdBudgetMilliseconds = 0
        #expect(throws: FerryError.self) { try Retention.validate(p) }
        p = API.GroupPolicy()
        p.quiesceHook = "rm -rf /"
        #expect(throws: FerryError.self) { try Retention.validate(p) }
        #expect(throws: Never.self) { try Retention.validate(API.GroupPolicy()) }
    }
}
