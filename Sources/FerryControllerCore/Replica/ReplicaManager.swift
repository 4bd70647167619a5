import FerryWire
import Foundation
import Logging
import NIOPosix
import ServiceLifecycle

/// Folds replica journals into their base images every few seconds, and asks the agents of
/// replicas whose journal is damaged for the full resync that repairs them.
struct RetentionFolder: Service {
    let replicas: ReplicaManager
    let registry: SessionRegistry
    let logger: Logger

    func run() async throws {
        while !Task.isShuttingDownGracefully {
            try? await cancelWhenGracefulShutdown { try await Task.sleep(for: .seconds(5)) }
            if Task.isShuttingDownGracefully { break }
            await replicas.foldAll(logger: logger)
            await requestRepairs()
        }
    }

    private func requestRepairs() async {
        for (hostID, volume, store) in await replicas.repairsDue() {
            guard let entry = await registry.entry(hostID: hostID) else { continue }
            do {
                _ = try await entry.session.command("resync", timeout: .seconds(30)) { $0.resyncVolume.name = volume }
                await store.noteRepairResyncRequested()
                let damage = await store.lastError ?? ""
                logger.warning("replica journal damaged: full resync requested from the agent", metadata: [
                    "host": "\(entry.hostName)", "volume": "\(volume)", "error": "\(damage)",
                ])
            } catch {
                logger.error("cannot request the resync of a damaged replica", metadata: ["host": "\(entry.hostName)", "volume": "\(volume)", "error": "\(error)"])
            }
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
    /// Replicas by `HOST-ID/VOLUME`: opened, or being opened (its journal replayed) on the pool.
    var slots: [String: Slot] = [:]

    enum Slot {
        /// Opening on the thread pool; lookups for it wait on the task, others go on.
        case opening(Task<ReplicaStore, any Error>)
        case open(ReplicaStore)
    }

    /// Whether the replica `HOST-ID/VOLUME` is being opened now.
    func isOpening(_ key: String) -> Bool {
        if case .opening = slots[key] { true } else { false }
    }

    /// The replicas open now.
    var open: [String: ReplicaStore] {
        slots.compactMapValues { if case .open(let store) = $0 { store } else { nil } }
    }
    /// The oldest position a retained point needs, per replica; nil until the catalogue has
    /// pinned once (no fold runs before that, or it could fold away a point's history).
    private var pins: [String: ReplicaPosition]?
    /// Replicas being built from a failover point (see `seed`), by key.
    var seeding: [String: Task<Void, Never>] = [:]
    /// Told when a replica's volume grew (a resize record durable in its journal): host id,
    /// volume, new size.
    private var growth: (@Sendable (String, String, UInt64) async -> Void)?

    /// Sets who hears of volumes that grew (the state store's volume records follow).
    public func onGrowth(_ handler: @escaping @Sendable (String, String, UInt64) async -> Void) {
        growth = handler
    }

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
            // Keeps opening a point image (a failover's) from walking the whole journal.
            do {
                try await store.refreshCheckpoint()
            } catch {
                logger.warning("cannot index the journal for point images", metadata: ["replica": "\(key)", "error": "\(error)"])
            }
        }
    }

    /// Replicas whose damaged journal needs a full resync asked of their agent's session.
    func repairsDue() async -> [(hostID: String, volume: String, store: ReplicaStore)] {
        var due: [(hostID: String, volume: String, store: ReplicaStore)] = []
        for (key, store) in open where await store.repairResyncDue {
            guard let slash = key.firstIndex(of: "/") else { continue }
            due.append((String(key[..<slash]), String(key[key.index(after: slash)...]), store))
        }
        return due
    }

    /// The replica of `volume`, opened (and recovered) on first use. Opening replays the
    /// journal after the checkpoint (up to 256 MiB): it runs on the thread pool, so lookups of
    /// other replicas (every session's batches) never wait behind it.
    public func replica(hostID: String, volume: String, size: UInt64) async throws -> ReplicaStore {
        let key = hostID + "/" + volume
        switch slots[key] {
        case .open(let store): return store
        case .opening(let task): return try await task.value
        case nil: break
        }
        // Being built from a failover point (or its build was cut short by a restart: the next
        // volume list for its host builds it again): never opened, or created empty, meanwhile.
        guard seeding[key] == nil, !FileManager.default.fileExists(atPath: root + "/" + key + ".seeding") else {
            throw FerryError(.unavailable, "the replica of \(volume) is still being built from its failover point; replication starts when it is")
        }
        // Pinned from the start: a fold may run as soon as the store is open.
        let directory = root + "/" + key, pool = self.pool, retention = self.retention, journalLimit = self.journalLimit, pin = pins?[key]
        let task = Task {
            try await pool.runIfActive {
                try ReplicaStore(directory: directory, size: size, pool: pool, retention: retention, journalLimit: journalLimit, pinned: pin)
            }
        }
        slots[key] = .opening(task)
        do {
            let store = try await task.value
            // Pinned at open; a pin set while it opened is applied now.
            if let pins, pins[key] != pin { await store.pin(pins[key]) }
            if let growth {
                await store.setGrowthHandler { await growth(hostID, volume, $0) }
                // A resize the caller's record predates (a restart before the record followed).
                let known = await store.size
                if known > size { await growth(hostID, volume, known) }
            }
            slots[key] = .open(store)
            return store
        } catch {
            slots[key] = nil
            throw error
        }
    }

    /// Pins each replica's journal at the oldest position a retained point needs.
    public func pinAll(_ positions: [String: ReplicaPosition]) async {
        pins = positions
        for (key, store) in open { await store.pin(positions[key]) }
    }

    /// An already opened replica, if any.
    public func opened(hostID: String, volume: String) -> ReplicaStore? {
        if case .open(let store) = slots[hostID + "/" + volume] { store } else { nil }
    }

    /// No replica of this volume exists, opened or on disk (nor one being built): a new one
    /// will start empty.
    func absent(hostID: String, volume: String) -> Bool {
        let key = hostID + "/" + volume
        let fm = FileManager.default
        return slots[key] == nil && seeding[key] == nil && !fm.fileExists(atPath: root + "/" + key) && !fm.fileExists(atPath: root + "/" + key + ".seeding")
    }
}
