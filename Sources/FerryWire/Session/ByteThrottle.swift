/// A bandwidth limit a session's bulk data passes through: `admit` returns once `bytes` may go
/// (at once while under the limit). The controller's WAN limits implement it per host.
public protocol ByteThrottle: Sendable {
    func admit(_ bytes: Int) async
}
