import Foundation
import Synchronization

/// Counts failed attempts (bad API tokens, bad enrollment tokens) per source address in a fixed
/// window; past the limit that address is refused without any lookup until the window ends.
/// Bounded: at most `maxAddresses` are tracked (the oldest windows are dropped first).
public final class FailureLimiter: Sendable {
    /// What a failure did to its address.
    public enum Outcome: Sendable, Equatable {
        /// Still under the limit: `count` failures in this window.
        case counted(Int)
        /// This failure reached the limit (told once per window).
        case limited
        /// Limited already.
        case alreadyLimited
    }

    struct Window {
        var start: ContinuousClock.Instant
        var failures: Int
    }

    let limit: Int
    let window: Duration
    let maxAddresses: Int
    private let windows = Mutex<[String: Window]>([:])

    public init(limit: Int, window: Duration, maxAddresses: Int = 65_536) {
        self.limit = limit
        self.window = window
        self.maxAddresses = maxAddresses
    }

    /// How long `address` is still refused, if it is.
    public func blocked(_ address: String, now: ContinuousClock.Instant = .now) -> Duration? {
        windows.withLock { w in
            guard let entry = w[address], entry.failures >= limit else { return nil }
            let left = entry.start + window - now
            return left > .zero ? left : nil
        }
    }

    public func fail(_ address: String, now: ContinuousClock.Instant = .now) -> Outcome {
        windows.withLock { w in
            var entry = w[address].flatMap { now - $0.start < window ? $0 : nil } ?? Window(start: now, failures: 0)
            entry.failures += 1
            if w[address] == nil, w.count >= maxAddresses {
                // Forget expired windows; if none, the oldest.
                w = w.filter { now - $0.value.start < window }
                if w.count >= maxAddresses, let oldest = w.min(by: { $0.value.start < $1.value.start })?.key { w[oldest] = nil }
            }
            w[address] = entry
            if entry.failures < limit { return .counted(entry.failures) }
            return entry.failures == limit ? .limited : .alreadyLimited
        }
    }
}
