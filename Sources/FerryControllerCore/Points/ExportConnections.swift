import FerryWire
import NIOCore
import Synchronization

/// The live NBD+TLS connections of authenticated hosts, so that revoking a host (removal, a
/// superseded certificate) ends them at once, and one host cannot take every connection slot.
public final class ExportConnections: Sendable {
    struct Entry {
        var hostID: String
        var serial: String
        var channel: any Channel
    }

    /// Connections one host may hold at once (its recovered volumes' clients reconnect, and a
    /// recovery host holds one per volume and per qemu/nbdcopy connection).
    let maxPerHost: Int
    private let entries = Mutex<[ObjectIdentifier: Entry]>([:])

    public init(maxPerHost: Int = 64) { self.maxPerHost = maxPerHost }

    /// Registers an admitted connection; false when its host holds the most already.
    func add(_ channel: any Channel, hostID: String, serial: String) -> Bool {
        entries.withLock { e in
            guard e.values.lazy.filter({ $0.hostID == hostID }).count < maxPerHost else { return false }
            e[ObjectIdentifier(channel)] = Entry(hostID: hostID, serial: serial, channel: channel)
            return true
        }
    }

    func remove(_ channel: any Channel) {
        _ = entries.withLock { $0.removeValue(forKey: ObjectIdentifier(channel)) }
    }

    /// Ends every connection of `hostID` (but those made with `keeping`'s certificate).
    /// Returns how many were closed.
    @discardableResult
    public func close(hostID: String, keeping serial: String? = nil) -> Int {
        let doomed = entries.withLock { e in
            let found = e.filter { $0.value.hostID == hostID && $0.value.serial != serial }
            for key in found.keys { e[key] = nil }
            return found.values.map(\.channel)
        }
        for channel in doomed { channel.close(promise: nil) }
        return doomed.count
    }

    func count(hostID: String) -> Int { entries.withLock { $0.values.filter { $0.hostID == hostID }.count } }
}
