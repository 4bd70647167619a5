/// A token bucket measured in bytes: refills at `rate` bytes a second up to `burst`. A
/// reservation always succeeds and says how long its caller must wait: tokens may go negative,
/// so a message larger than the burst waits its own transmission time and delays the next.
/// Pure state, driven by the caller's clock (unit-tested without sleeping).
struct TokenBucket: Sendable, Equatable {
    private(set) var rate: Double
    private(set) var burst: Double
    private var tokens: Double
    private var updated: ContinuousClock.Instant

    /// A bucket that starts full.
    init(bytesPerSecond: UInt64, now: ContinuousClock.Instant) {
        rate = Double(bytesPerSecond)
        burst = Self.burst(for: rate)
        tokens = burst
        updated = now
    }

    /// A tenth of a second at the rate, at least 64 KiB: short enough that a limit holds over
    /// a second, long enough that small messages rarely wait.
    static func burst(for rate: Double) -> Double { max(64 * 1024, rate / 10) }

    private mutating func refill(_ now: ContinuousClock.Instant) {
        guard now > updated else { return }
        let elapsed = updated.duration(to: now)
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        tokens = min(burst, tokens + seconds * rate)
        updated = now
    }

    /// Takes `bytes`; returns how long the caller waits before sending them (zero when the
    /// bucket held enough).
    mutating func reserve(_ bytes: Int, now: ContinuousClock.Instant) -> Duration {
        refill(now)
        tokens -= Double(bytes)
        guard tokens < 0 else { return .zero }
        return .nanoseconds(Int64((-tokens / rate * 1e9).rounded(.up)))
    }

    /// A new rate from now on; what was owed stays owed, what was saved is capped by the new burst.
    mutating func setRate(_ bytesPerSecond: UInt64, now: ContinuousClock.Instant) {
        refill(now)
        rate = Double(bytesPerSecond)
        burst = Self.burst(for: rate)
        tokens = min(tokens, burst)
    }
}
