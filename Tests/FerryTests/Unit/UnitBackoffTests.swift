import FerryAgentCore
import Testing

@Suite("Unit Backoff")
struct UnitBackoffTests {
    static let initial = Duration.milliseconds(100)
    static let maximum = Duration.seconds(2)

    /// The step the n-th draw (from 0) comes from: initial * 2^n, capped.
    static func step(_ n: Int) -> Duration {
        var s = initial
        for _ in 0..<n { s = min(s * 2, maximum) }
        return s
    }

    @Test("each delay is within the upper half of its step, steps double up to the maximum")
    func delaysWithinSteps() {
        for _ in 0..<20 {
            var backoff = Backoff(initial: Self.initial, maximum: Self.maximum)
            for n in 0..<12 {
                let delay = backoff.next()
                let step = Self.step(n)
                #expect(delay >= step / 2 && delay <= step, "draw \(n): \(delay) not in [\(step / 2), \(step)]")
            }
        }
    }

    @Test("delays grow: while the step doubles, no delay is shorter than the one before")
    func delaysGrow() {
        for _ in 0..<50 {
            var backoff = Backoff(initial: Self.initial, maximum: Self.maximum)
            // Steps 100, 200, 400, 800, 1600 ms: each draw's lower bound is the previous draw's upper bound.
            let delays = (0..<5).map { _ in backoff.next() }
            #expect(zip(delays, delays.dropFirst()).allSatisfy { $0 <= $1 }, "\(delays)")
            #expect(delays[4] >= .milliseconds(800))
            #expect(delays[0] <= .milliseconds(100))
        }
    }

    @Test("a delay never exceeds the maximum, however many failures")
    func neverAboveMaximum() {
        var backoff = Backoff(initial: .milliseconds(250), maximum: .seconds(5))
        for _ in 0..<500 {
            #expect(backoff.next() <= .seconds(5))
        }
        // The agent's defaults too.
        let config = AgentConfig(dataDir: "/nonexistent")
        var fromConfig = Backoff(initial: config.reconnectInitialDelay, maximum: config.reconnectMaxDelay)
        for _ in 0..<100 {
            #expect(fromConfig.next() <= config.reconnectMaxDelay)
        }
    }

    @Test("delays are jittered: 50 draws at the same step are not all equal")
    func jittered() {
        // At the first step (fresh backoff each time).
        let first = (0..<50).map { _ in
            var b = Backoff(initial: Self.initial, maximum: Self.maximum)
            return b.next()
        }
        #expect(Set(first).count > 1, "\(first)")

        // At the capped step.
        var capped = Backoff(initial: Self.initial, maximum: Self.maximum)
        for _ in 0..<10 { _ = capped.next() }
        let atMax = (0..<50).map { _ in capped.next() }
        #expect(Set(atMax).count > 1, "\(atMax)")
        #expect(atMax.allSatisfy { $0 >= Self.maximum / 2 && $0 <= Self.maximum })
    }

    @Test("reset() returns to the initial step")
    func reset() {
        for _ in 0..<20 {
            var backoff = Backoff(initial: Self.initial, maximum: Self.maximum)
            for _ in 0..<8 { _ = backoff.next() }
            #expect(backoff.next() >= Self.maximum / 2)
            backoff.reset()
            let afterReset = backoff.next()
            #expect(afterReset >= Self.initial / 2 && afterReset <= Self.initial, "\(afterReset)")
            let second = backoff.next()
            #expect(second >= Self.initial && second <= Self.initial * 2, "\(second)")
        }
    }
}
