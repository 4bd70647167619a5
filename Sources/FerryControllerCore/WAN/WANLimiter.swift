import FerryWire
import Synchronization

/// The operator's WAN settings in force: bandwidth limits (token buckets) per host and for all
/// hosts together, each direction on its own (replication into the controller; reverse streams
/// out of it), and the compression each host's agent is told to use. Changed at run time
/// (`ferryctl wan set`); the store keeps them across restarts.
public final class WANLimiter: Sendable {
    /// Below 1 Mbit/s a 1 MiB replication batch would take longer than a few seconds to cross.
    public static let minimumBytesPerSecond: UInt64 = 125_000
    /// 10 Tbit/s: anything above is a typo, not a limit.
    public static let maximumBytesPerSecond: UInt64 = 1_250_000_000_000

    enum Direction: Sendable { case inbound, outbound }

    private struct Key: Hashable { var scope: String?; var direction: Direction }

    private struct State {
        var all = API.WANRule()
        var hosts: [String: API.WANRule] = [:]
        /// Buckets of the scopes that have a limit (nil scope: all hosts).
        var buckets: [Key: TokenBucket] = [:]
    }

    private let state = Mutex(State())
    let metrics: ControllerMetrics?

    init(metrics: ControllerMetrics? = nil) {
        self.metrics = metrics
    }

    /// Replaces every setting (at startup, from the store).
    func load(all: API.WANRule, hosts: [(id: String, name: String, rule: API.WANRule)]) {
        state.withLock { s in
            s.all = all
            s.hosts = [:]
            s.buckets = [:]
        }
        set(hostID: nil, all)
        for host in hosts { set(hostID: host.id, name: host.name, host.rule) }
    }

    /// The rule of one scope (nil: all hosts) from now on.
    func set(hostID: String?, name: String? = nil, _ rule: API.WANRule) {
        let now = ContinuousClock.now
        state.withLock { s in
            if let hostID { s.hosts[hostID] = rule } else { s.all = rule }
            for direction in [Direction.inbound, .outbound] {
                let key = Key(scope: hostID, direction: direction)
                if let limit = rule.limitBytesPerSecond, limit > 0 {
                    if s.buckets[key] == nil {
                        s.buckets[key] = TokenBucket(bytesPerSecond: limit, now: now)
                    } else {
                        s.buckets[key]?.setRate(limit, now: now)
                    }
                } else {
                    s.buckets[key] = nil
                }
            }
        }
        metrics?.wanLimit(scope: name ?? hostID ?? "*", bytesPerSecond: rule.limitBytesPerSecond ?? 0)
    }

    func rule(hostID: String?) -> API.WANRule {
        state.withLock { s in hostID.map { s.hosts[$0] ?? API.WANRule() } ?? s.all }
    }

    var hostRules: [String: API.WANRule] { state.withLock { $0.hosts } }

    /// What a host's agent compresses with: its own setting, else all hosts'.
    func compression(hostID: String) -> Ferry_V1_StreamCompression {
        let chosen = state.withLock { s in s.hosts[hostID]?.compression ?? s.all.compression ?? API.StreamCompression.none }
        switch chosen {
        case .none: return .none
        case .lz4: return .lz4
        }
    }

    /// Takes `bytes` from the host's bucket and from the all-hosts bucket of the direction;
    /// returns how long the caller waits (the longer of the two).
    func reserve(hostID: String, _ direction: Direction, bytes: Int, now: ContinuousClock.Instant = .now) -> Duration {
        state.withLock { s in
            var wait = Duration.zero
            for key in [Key(scope: hostID, direction: direction), Key(scope: nil, direction: direction)] {
                if let d = s.buckets[key]?.reserve(bytes, now: now) { wait = max(wait, d) }
            }
            return wait
        }
    }

    /// The throttle of one host's session in one direction.
    func throttle(hostID: String, hostName: String, _ direction: Direction) -> any ByteThrottle {
        HostThrottle(limiter: self, hostID: hostID, hostName: hostName, direction: direction)
    }

    private struct HostThrottle: ByteThrottle {
        let limiter: WANLimiter
        let hostID: String
        let hostName: String
        let direction: Direction

        func admit(_ bytes: Int) async {
            let wait = limiter.reserve(hostID: hostID, direction, bytes: bytes)
            guard wait > .zero else { return }
            limiter.metrics?.wanThrottled(host: hostName, direction: direction == .inbound ? "in" : "out", wait: wait)
            // A rate limit's own wait (the bucket's debt), not a poll: cancelled with the session.
            try? await Task.sleep(for: wait)
        }
    }
}
