/// Which exports one connection may see and open, and who is told of each open and refusal.
///
/// The local sockets (unix, loopback TCP) serve every export to whoever may reach them (the
/// socket's file mode decides). A connection joined from the network carries the principal it
/// authenticated as: it sees only the exports made for that principal, has no default export,
/// and every open or refusal is reported (for the audit log).
public struct NBDAccess: Sendable {
    /// What the observer is told.
    public enum Event: Sendable, Equatable {
        case opened(export: String)
        /// A name the connection may not open (or that does not exist: the two are not told
        /// apart to the client, so a name's existence does not leak).
        case refused(export: String)
    }

    /// Export names this connection may open; nil: every export.
    public let allowed: Set<String>?
    public let observer: (@Sendable (Event) -> Void)?

    public init(allowed: Set<String>?, observer: (@Sendable (Event) -> Void)? = nil) {
        self.allowed = allowed
        self.observer = observer
    }

    /// Every export, no observer: the local sockets.
    public static let local = NBDAccess(allowed: nil)

    func permits(_ name: String) -> Bool { allowed?.contains(name) ?? true }

    /// Only an unrestricted connection may open the one export by the empty name.
    var offersDefaultExport: Bool { allowed == nil }
}
