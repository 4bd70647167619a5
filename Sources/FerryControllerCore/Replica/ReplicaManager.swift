import FerryWire
import Foundation
import NIOPosix

/// The controller's replicas, one per protected volume, under `DATA-DIR/replicas/HOST-ID/VOLUME`.
/// Replica file I/O runs on a thread pool of its own.
public actor ReplicaManager {
    let root: String
    let pool: NIOThreadPool
    private var open: [String: ReplicaStore] = [:]

    public init(root: String, pool: NIOThreadPool) {
        self.root = root
        self.pool = pool
    }

    /// The replica of `volume`, opened (and recovered) on first use.
    public func replica(hostID: String, volume: String, size: UInt64) throws -> ReplicaStore {
        let key = hostID + "/" + volume
        if let store = open[key] { return store }
        let store = try ReplicaStore(directory: root + "/" + key, size: size, pool: pool)
        open[key] = store
        return store
    }

    /// An already opened replica, if any.
    public func opened(hostID: String, volume: String) -> ReplicaStore? { open[hostID + "/" + volume] }
}
