/// Replication lag of single records in fixed buckets, kept by the agent as its records are
/// acked and rendered by the controller as a Prometheus histogram. Both sides use `bounds`, so a
/// report carries counts only.
public struct LagHistogram: Sendable, Equatable {
    /// Upper bounds in seconds: fine below a second, where the target is.
    public static let bounds: [Double] = [
        0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60,
    ]

    /// Records per bucket (not cumulative): `counts[i]` in (bounds[i-1], bounds[i]]; the last past every bound.
    public private(set) var counts: [UInt64]
    public private(set) var sumSeconds: Double = 0

    public init() { counts = Array(repeating: 0, count: Self.bounds.count + 1) }

    /// Restores a histogram from a report, if its shape is ours (nil for a malformed one).
    public init?(counts: [UInt64], sumSeconds: Double) {
        guard counts.count == Self.bounds.count + 1, sumSeconds.isFinite, sumSeconds >= 0 else { return nil }
        self.counts = counts
        self.sumSeconds = sumSeconds
    }

    public var count: UInt64 { counts.reduce(0, &+) }

    /// Adds one record that took `seconds` (negative, as a stepped clock can give, counts as 0).
    public mutating func record(seconds: Double) {
        let s = seconds.isFinite ? Swift.max(0, seconds) : 0
        // Binary search for the first bound >= s.
        var low = 0, high = Self.bounds.count
        while low < high {
            let mid = (low + high) / 2
            if Self.bounds[mid] < s { low = mid + 1 } else { high = mid }
        }
        counts[low] &+= 1
        sumSeconds += s
    }

    /// The value under which a fraction `q` of the records fall, interpolated linearly inside
    /// its bucket (as Prometheus's histogram_quantile does); nil without records. Past the last
    /// bound it answers that bound.
    public func quantile(_ q: Double) -> Double? {
        let total = count
        guard total > 0 else { return nil }
        let rank = q * Double(total)
        var seen: Double = 0
        for (i, c) in counts.enumerated() {
            let next = seen + Double(c)
            if next >= rank, c > 0 {
                guard i < Self.bounds.count else { return Self.bounds.last }
                let low = i == 0 ? 0 : Self.bounds[i - 1]
                return low + (Self.bounds[i] - low) * (rank - seen) / Double(c)
            }
            seen = next
        }
        return Self.bounds.last
    }

    /// The records of `self` not in `earlier` (an earlier state of the same histogram).
    public func since(_ earlier: LagHistogram) -> LagHistogram {
        var out = self
        for i in counts.indices { out.counts[i] = counts[i] >= earlier.counts[i] ? counts[i] - earlier.counts[i] : counts[i] }
        out.sumSeconds = Swift.max(0, sumSeconds - earlier.sumSeconds)
        return out
    }
}
