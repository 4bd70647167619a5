import Foundation

/// A volume's replication lag over the last hour, for the console's chart: one sample per
/// 10 s bucket, holding the worst lag reported in it (a spike must not vanish between
/// samples). In memory only; at most 360 samples.
struct LagHistory: Sendable {
    struct Sample: Sendable, Equatable {
        var at: Date
        var lagSeconds: Double
        var lagBytes: UInt64
    }

    static let bucketSeconds: Double = 10
    static let spanSeconds: Double = 3600

    private(set) var samples: [Sample] = []

    /// Adds a report's lag at `now`.
    mutating func record(lagSeconds: Double, lagBytes: UInt64, now: Date) {
        let bucket = (now.timeIntervalSince1970 / Self.bucketSeconds).rounded(.down)
        let lag = lagSeconds.isFinite ? max(0, lagSeconds) : 0
        if let last = samples.last, (last.at.timeIntervalSince1970 / Self.bucketSeconds).rounded(.down) == bucket {
            samples[samples.count - 1].lagSeconds = max(last.lagSeconds, lag)
            samples[samples.count - 1].lagBytes = max(last.lagBytes, lagBytes)
        } else {
            samples.append(Sample(at: now, lagSeconds: lag, lagBytes: lagBytes))
        }
        let oldest = now.addingTimeInterval(-Self.spanSeconds)
        if let keep = samples.firstIndex(where: { $0.at >= oldest }), keep > 0 {
            samples.removeFirst(keep)
        }
    }
}
