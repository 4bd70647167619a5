import FerryWire
import Foundation
import Logging
import NIOPosix
import ServiceLifecycle

/// Folds replica journals into their base images every few seconds.
struct RetentionFolder: Service {
    let replicas: ReplicaManager
    let logger: Logger

    func run() async throws {
        while !Task.isShuttingDownGracefully {
            try? await cancelWhenGracefulShutdown { try await Task.sleep(for: .seconds(5)) }
            if Task.isShuttingDownGracefully { break }
            await replicas.foldAll(logger: logger)
        }
    }
}

/// The controller's replicas, one per protected volume, under `DATA-DIR/replicas/HOST-ID/VOLUME`.
/// Replica file I/O runs on a thread pool of its own.
public actor ReplicaManager {
    let root: String
    let pool: NIOThreadPool
    let retention: Duration
    let journalLimit: Int64
    private var open: [String: ReplicaStore] = [:]
    /// The oldest position a retained point needs, per replica; nil until the catalogue has
    /// pinned once (no fold runs before that, or it could fold away a point's history).
    private var pins: [String: ReplicaPosition]?

    public init(root: String, pool: NIOThreadPool, retention: Duration = .seconds(3600), journalLimit: Int64 = 8 << 30) {
        self.root = root
        self.pool = pool
        self.retention = retention
        self.journalLimit = journalLimit
    }

    /// Forgets the live reports of a host's volumes once its session ends.
    public func sessionEnded(hostID: String) async {
        for (key, store) in open where key.hasPrefix(hostID + "/") { await store.sessionEnded() }
    }

    /// Folds expired journal segments of every open replica into its base image.
    /// Until the catalogue has pinned the retained points' history, only the journal's size
    /// cap folds (the cap wins over pins anyway), so a catalogue that cannot be read does not
    /// let the journal grow without bound.
    public func foldAll(logger: Logger) async {
        let pinned = pins != nil
        for (key, store) in open {
            do {
                let folded = try await store.fold(capOnly: !pinned)
                if folded > 0 { logger.debug("journal folded into the base image", metadata: ["replica": "\(key)", "segments": "\(folded)"]) }
            } catch {
                logger.error("cannot fold the journal into the base image", metadata: ["replica": "\(key)", "error": "\(error)"])
            }
        }
    }

    /// The replica of `volume`, opened (and recovered) on first use.
    public func replica(hostID: String, volume: String, size: UInt64) throws -> ReplicaStore {
        let key = hostID + "/" + volume
        if let store = open[key] { return store }
        // Pinned from the start: a fold may run as soon as the store is in `open`.
        let store = try ReplicaStore(directory: root + "/" + key, size: size, pool: pool, retention: retention, journalLimit: journalLimit,
                                     pinned: pins?[key])
        open[key] = store
        return store
    }

    /// Pins each replica's journal at the oldest position a retained point needs.
    public func pinAll(_ positions: [String: ReplicaPosition]) async {
        pins = positions
        for (key, store) in open { await store.pin(positions[key]) }
    }

    /// An already opened replica, if any.
    public func opened(hostID: String, volume: String) -> ReplicaStore? { open[hostID + "/" + volume] }
}
