import NIOCore
import Synchronization

/// Caps on connections a listener holds before and after authentication: in all, and per
/// source address (many agents may share one NAT address, so both are configurable). A
/// connection over a cap is closed before any TLS work is done for it.
public final class ConnectionCaps: Sendable {
    public let total: Int
    public let perAddress: Int
    private let counts = Mutex<(total: Int, byAddress: [String: Int])>((0, [:]))

    public init(total: Int, perAddress: Int) {
        self.total = total
        self.perAddress = perAddress
    }

    /// Takes a place for a new connection from `address`; false when a cap is reached.
    public func admit(_ address: String) -> Bool {
        counts.withLock { c in
            let mine = c.byAddress[address, default: 0]
            guard c.total < total, mine < perAddress else { return false }
            c.total += 1
            c.byAddress[address] = mine + 1
            return true
        }
    }

    public func release(_ address: String) {
        counts.withLock { c in
            c.total -= 1
            let left = c.byAddress[address, default: 1] - 1
            c.byAddress[address] = left > 0 ? left : nil
        }
    }

    /// Admits `channel` (by its remote IP) and gives its place back when it closes. False when
    /// over a cap: the caller closes it.
    public func admit(_ channel: any Channel) -> Bool {
        let address = channel.remoteAddress?.ipAddress ?? "unknown"
        guard admit(address) else { return false }
        channel.closeFuture.whenComplete { _ in self.release(address) }
        return true
    }

    public var open: Int { counts.withLock { $0.total } }
}
