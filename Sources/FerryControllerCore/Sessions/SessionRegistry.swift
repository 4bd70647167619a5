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

    public init() {}

    /// Registers a session, returning any older session of the same host so the caller can close
    /// it (a reconnecting agent replaces its half-dead predecessor).
    func register(_ entry: Entry) -> Entry? {
        let old = sessions[entry.hostID]
        sessions[entry.hostID] = entry
        return old
    }

    /// Removes the session if it is still the registered one.
    func unregister(hostID: String, session: PeerSession) {
        if sessions[hostID]?.session === session { sessions[hostID] = nil }
    }

    public func entry(hostID: String) -> Entry? { sessions[hostID] }

    public var count: Int { sessions.count }

    public var all: [Entry] { Array(sessions.values) }

    /// Last time each online host was heard from.
    func lastSeen() -> [String: Date] {
        let now = Date()
        return sessions.mapValues { now.addingTimeInterval(-$0.session.silence.seconds) }
    }
}
