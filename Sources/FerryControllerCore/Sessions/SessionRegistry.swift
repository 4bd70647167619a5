import FerryWire
import Foundation

/// Live agent sessions by host id: who is online, from where, and a handle to talk to them.
public actor SessionRegistry {
    public struct Entry: Sendable {
        public let hostID: String
        public let hostName: String
        public let session: PeerSession
    }

    private var sessions: [String: Entry] = [:]
    /// Each host's control lane: a second connection that carries only consistency cuts, so
    /// they never queue behind the session's replication data.
    private var lanes: [String: PeerSession] = [:]
    /// Tasks waiting for a host to connect, by host id and waiter.
    private var waiters: [String: [UInt64: CheckedContinuation<Entry?, Never>]] = [:]
    private var nextWaiter: UInt64 = 0

    public init() {}

    /// Registers a session, returning any older session of the same host so the caller can close
    /// it (a reconnecting agent replaces its half-dead predecessor).
    func register(_ entry: Entry) -> Entry? {
        let old = sessions[entry.hostID]
        sessions[entry.hostID] = entry
        for waiter in (waiters.removeValue(forKey: entry.hostID) ?? [:]).values { waiter.resume(returning: entry) }
        return old
    }

    /// The host's session once it has one (at once if it is online); nil if the calling task is
    /// cancelled first. Woken by the registration itself.
    func waitForEntry(hostID: String) async -> Entry? {
        if let entry = sessions[hostID] { return entry }
        let id = nextWaiter
        nextWaiter += 1
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (c: CheckedContinuation<Entry?, Never>) in
                if Task.isCancelled { c.resume(returning: nil) } else { waiters[hostID, default: [:]][id] = c }
            }
        } onCancel: {
            Task { await self.cancelWaiter(hostID: hostID, id: id) }
        }
    }

    private func cancelWaiter(hostID: String, id: UInt64) {
        waiters[hostID]?.removeValue(forKey: id)?.resume(returning: nil)
    }

    /// Removes the session if it is still the registered one.
    func unregister(hostID: String, session: PeerSession) {
        if sessions[hostID]?.session === session { sessions[hostID] = nil }
    }

    public func entry(hostID: String) -> Entry? { sessions[hostID] }

    /// Registers a host's control lane, returning the one it replaces (to be closed).
    func registerLane(hostID: String, session: PeerSession) -> PeerSession? {
        defer { lanes[hostID] = session }
        return lanes[hostID]
    }

    /// Removes the lane if it is still the registered one.
    func unregisterLane(hostID: String, session: PeerSession) {
        if lanes[hostID] === session { lanes[hostID] = nil }
    }

    /// The host's control lane, if it has one open.
    func lane(hostID: String) -> PeerSession? { lanes[hostID] }

    public var count: Int { sessions.count }

    public var all: [Entry] { Array(sessions.values) }

    /// Last time each online host was heard from.
    func lastSeen() -> [String: Date] {
        let now = Date()
        return sessions.mapValues { now.addingTimeInterval(-$0.session.silence.seconds) }
    }
}
