import FerryNBD
import FerryWire
import Foundation
import Logging
import NIOCore
import NIOPosix

/// The volumes this agent protects, each served on its own NBD socket. The controller owns the
/// list; a copy in the data dir lets the agent serve its volumes from start-up on, controller or
/// not, because a workload must never wait for the controller.
public actor VolumeManager {
    struct Served {
        var spec: Ferry_V1_VolumeSpec
        let volume: BlockVolume
        let log: ChangeLog
        let activity: ActivityLog
        let tracker: SyncTracker
        let socket: String
        let server: Task<Void, any Error>
        /// Whether the activity log knows this volume's history (it existed, or a full
        /// comparison has been started since).
        var historyKnown: Bool
        /// Made here just now, sparse: it reads as zeroes like a new replica, so the first
        /// initial sync has nothing to compare.
        var createdEmpty = false
        /// Why its path is outside `protect-allow`, for a volume served only because it was
        /// protected before the list existed (reported to the controller, which audits it).
        var outsideAllowlist: String?
        /// A recovered volume filling its target from the failover point, and its copier.
        var hydration: Hydration?
        /// Protected by a command and not named by a volume list yet: a list that predates it
        /// (another protect's, sent meanwhile) does not take it away.
        var awaitingList = false
    }

    /// The parts of a volume that hydrates (see `VolumeHydration` in the protocol).
    struct Hydration {
        let volume: HydratingVolume
        let remote: RecoveredVolume
        let copier: Task<Void, Never>?
        let mapPath: String

        func stop() async {
            copier?.cancel()
            await copier?.value
            await remote.stop()
        }
    }

    /// Connects to one of the controller's point exports (port, export name, with block
    /// status or not) with this host's current certificate.
    public typealias PointConnector = @Sendable (_ port: Int, _ export: String, _ allocation: Bool) async throws -> NBDClient
    private var pointConnector: PointConnector?
    /// Most bytes per second a hydration fetches (0: no limit).
    let hydrationRateLimit: UInt64

    let listPath: String
    let socketDirectory: String
    let pool: NIOThreadPool
    let logger: Logger
    private var served: [String: Served] = [:]
    /// Per volume, the last sequence of its current epoch the controller holds durably.
    private var resumeAfter: [String: UInt64] = [:]
    /// Volumes whose replica the controller said is empty, with the capture epoch then: their
    /// initial sync sends data blocks without comparing hashes while that epoch lasts.
    private var emptyReplicaEpoch: [String: UInt64] = [:]
    let changeLogBytes: Int
    let spillBytes: Int64
    /// The loopback TCP export shared by all volumes, if configured.
    let tcpListen: (host: String, port: Int)?
    private var tcpServer: NBDServer?
    private var tcpTask: Task<Void, any Error>?
    private var tcpAddress: String?
    /// What the controller may have this agent open and write.
    let allow: ProtectAllow
    /// Users besides root and the agent's that may use the NBD sockets.
    let socketUsers: Set<UInt32>
    /// This host's name and config file, for refusals the operator reads through ferryctl.
    let hostName: String
    let configPath: String?
    /// Volumes the data dir listed at start (name to path): served even outside `allow`, so an
    /// upgrade that brings the list takes no disk away. Anything else must be allowed.
    private var remembered: [String: String] = [:]
    /// Online resizes, per volume (kept in the data dir with the volume list).
    private var resizes: [String: ResizeNote] = [:]

    /// What the agent keeps of a volume's online resizes.
    struct ResizeNote: Sendable {
        /// Its size before the first resize: set, every capture epoch starts with a resize
        /// record (the replica may not have seen the last one).
        var grownFrom: UInt64?
        /// A resize under way: the file may be this size after a crash, before the volume list
        /// said so, and is taken as it is then.
        var growingTo: UInt64?
    }

    public init(dataDir: String, socketDirectory: String, pool: NIOThreadPool, logger: Logger,
                changeLogBytes: Int = 64 << 20, spillBytes: Int64 = 1 << 30, tcpListen: (host: String, port: Int)? = nil,
                allow: ProtectAllow, hostName: String, configPath: String?, socketUsers: Set<UInt32> = [], hydrationRateLimit: UInt64 = 0) {
        self.hydrationRateLimit = hydrationRateLimit
        self.socketUsers = socketUsers
        self.allow = allow
        self.hostName = hostName
        self.configPath = configPath
        self.tcpListen = tcpListen
        self.changeLogBytes = changeLogBytes
        self.spillBytes = spillBytes
        listPath = dataDir + "/volumes.json"
        self.socketDirectory = socketDirectory
        self.pool = pool
        self.logger = logger
        cuts = CutHolds()
    }

    /// Consistency cuts holding this agent's volumes.
    public let cuts: CutHolds

    /// The served volumes a cut names; every one must be protected and captured through the export.
    public func cutTargets(_ names: [String]) throws -> [CutHolds.Target] {
        guard !names.isEmpty, Set(names).count == names.count else {
            throw FerryError(.badRequest, "a cut names each volume once, and at least one")
        }
        return try names.map { name in
            guard let entry = served[name] else { throw FerryError(.notFound, "this agent does not protect a volume named \(name)") }
            guard entry.spec.captureMode != .scan else {
                throw FerryError(.unsupported, "volume \(name) is captured by scanning: its writes cannot be held for a cut")
            }
            return CutHolds.Target(name: name, volume: entry.volume, log: entry.log)
        }
    }

    /// How hydrating volumes reach the controller's point exports; set before `start`.
    public func setPointConnector(_ connector: @escaping PointConnector) {
        pointConnector = connector
    }

    /// Serves the volumes remembered from the last run. A volume that cannot be opened is logged
    /// and skipped; the others are served.
    public func start() async {
        guard let data = FileManager.default.contents(atPath: listPath) else { return }
        do {
            let list = try JSONDecoder().decode([Remembered].self, from: data)
            let specs = list.map(\.spec)
            remembered = Dictionary(specs.map { ($0.name, $0.path) }, uniquingKeysWith: { a, _ in a })
            for r in list where r.grownFrom != nil || r.growingTo != nil {
                resizes[r.name] = ResizeNote(grownFrom: r.grownFrom, growingTo: r.growingTo)
            }
            _ = await sync(specs)
        } catch {
            logger.error("cannot read \(listPath); volumes will be served once the controller sends them", metadata: ["error": "\(error)"])
        }
    }

    /// Starts protecting one volume, or confirms it if it is already served as asked. A volume
    /// new here and not from a volume list (`listed`: a ProtectVolume command) is served and
    /// captured at once, but streamed only once the controller's volume list names it: until
    /// the controller has recorded it, a batch of it would be one of a volume it does not know.
    public func protect(_ spec: Ferry_V1_VolumeSpec, listed: Bool = false) async throws -> Ferry_V1_VolumeStatus {
        var spec = spec
        if spec.hasHydration, !spec.path.hasPrefix("/") {
            // A recovered volume without a target named in the plan lives under the data dir
            // (the controller names that place relative to it); no other relative path is taken.
            guard spec.path.isEmpty || spec.path == "volumes/recovered/" + spec.name + ".img" else {
                throw FerryError(.badRequest, "volume \(spec.name): '\(spec.path)' is not an absolute path")
            }
            spec.path = defaultRecoveredPath(spec.name)
        }
        if let existing = served[spec.name] {
            guard existing.spec.path == spec.path else {
                throw FerryError(.conflict, "volume \(spec.name) is already protected at \(existing.spec.path)")
            }
            guard existing.spec.captureMode == spec.captureMode else {
                throw FerryError(.conflict, "volume \(spec.name) is already protected in capture mode \(existing.spec.captureMode == .scan ? "scan" : "export"); remove it to change the mode")
            }
            // The controller says when a recovered volume's replica is ready to be streamed to.
            served[spec.name]?.spec.replicaSeeding = spec.replicaSeeding
            if listed { served[spec.name]?.awaitingList = false }
            served[spec.name]?.spec.compression = spec.compression
            noteEmptyReplica(spec)
            try await applyFencing(spec)
            try await startSyncIfNeeded(spec)
            return status(served[spec.name] ?? existing)
        }
        if let other = served.values.first(where: { $0.spec.path == spec.path }) {
            throw FerryError(.conflict, "\(spec.path) is already protected as volume \(other.spec.name)")
        }
        var entry = try await openVolume(spec)
        if !listed {
            entry.spec.replicaSeeding = true
            entry.awaitingList = true
        }
        served[spec.name] = entry
        noteEmptyReplica(spec)
        try persist()
        try await startSyncIfNeeded(spec)
        return status(entry)
    }

    /// Makes the served set exactly `specs`; returns the status of each (with its error, if any).
    public func sync(_ specs: [Ferry_V1_VolumeSpec]) async -> [Ferry_V1_VolumeStatus] {
        let wanted = Set(specs.map(\.name))
        for (name, entry) in served where !wanted.contains(name) && !entry.awaitingList {
            tcpServer?.remove(name: name)
            entry.server.cancel()
            unlink(entry.socket)
            unlink(entry.activity.path)
            if let hydration = entry.hydration {
                await hydration.stop()
                unlink(hydration.mapPath)
            }
            served[name] = nil
            remembered[name] = nil
            resizes[name] = nil
            logger.info("volume no longer protected", metadata: ["volume": "\(name)"])
        }
        var statuses: [Ferry_V1_VolumeStatus] = []
        for spec in specs {
            // A replica that claims more of this epoch than was ever captured here is refused
            // (the volume is still served; its whole held stream is offered again).
            var claim: String?
            if let log = served[spec.name]?.log {
                // Same epoch: resume after what the controller holds. Otherwise (this agent
                // restarted, or the replica is new) the controller takes this epoch from its start.
                resumeAfter[spec.name] = spec.epoch == log.epoch ? spec.durableSequence : 0
                if spec.epoch == log.epoch, spec.durableSequence > log.last {
                    claim = "the controller's replica claims sequence \(spec.durableSequence) of epoch \(spec.epoch), but this agent captured only through \(log.last)"
                    resumeAfter[spec.name] = 0
                }
            } else {
                resumeAfter[spec.name] = 0
            }
            do {
                var status = try await protect(spec, listed: true)
                if let claim {
                    logger.error("volume list refused for a volume", metadata: ["volume": "\(spec.name)", "error": "\(claim)"])
                    status.error = claim
                }
                statuses.append(status)
            } catch {
                var failed = Ferry_V1_VolumeStatus()
                failed.name = spec.name
                failed.path = spec.path
                failed.error = (error as? FerryError)?.message ?? "\(error)"
                logger.error("cannot serve volume", metadata: ["volume": "\(spec.name)", "error": "\(failed.error)"])
                statuses.append(failed)
            }
        }
        try? persist()
        return statuses
    }

    /// Starts a full comparison when the controller's replica was never completely synced,
    /// or when it holds an earlier run's writes and this agent has no activity log to tell
    /// which extents may differ.
    private func startSyncIfNeeded(_ spec: Ferry_V1_VolumeSpec) async throws {
        guard var entry = served[spec.name] else { return }
        let unknownHistory = !entry.historyKnown && spec.epoch != 0 && spec.epoch != entry.log.epoch
        let alreadyEqual = spec.initialSyncRequired && entry.createdEmpty
        entry.createdEmpty = false
        // Specs remembered locally carry no epoch: only the controller's can settle this.
        if spec.epoch != 0 || spec.initialSyncRequired { entry.historyKnown = true }
        // Recorded before the await below: the actor may serve other calls meanwhile.
        served[spec.name] = entry
        if (spec.initialSyncRequired && !entry.activity.fullInProgress && !alreadyEqual) || unknownHistory {
            try await markAllPending(entry.activity)
            entry.tracker.begin(.full)
            logger.info(spec.initialSyncRequired ? "initial sync starts" : "full resync starts: no activity log from the earlier run",
                        metadata: ["volume": "\(spec.name)", "bytes": "\(entry.volume.size)"])
        }
    }

    /// Applies the controller's fencing decision. A generation older than the one this agent
    /// knows is ignored (a stale controller state cannot unfence).
    private func applyFencing(_ spec: Ferry_V1_VolumeSpec) async throws {
        guard let entry = served[spec.name] else { return }
        guard spec.generation >= entry.spec.generation else { return }
        // Unfencing always comes with a new generation: a list built before a fence (same
        // generation, not fenced) arriving after it must not undo it.
        if !spec.fenced, entry.spec.fenced || entry.volume.isFenced, spec.generation <= entry.spec.generation { return }
        let changed = spec.fenced != entry.spec.fenced || spec.generation != entry.spec.generation
        // Recorded before the await below: the actor may serve other calls meanwhile.
        served[spec.name]?.spec.generation = spec.generation
        served[spec.name]?.spec.fenced = spec.fenced
        entry.volume.generation = spec.generation
        if changed { try persist() }
        if spec.fenced && !entry.volume.isFenced {
            let volume = entry.volume
            try await pool.runIfActive { volume.fence() }
            logger.warning("volume fenced: another site owns it since a failover; its export is read-only", metadata: ["volume": "\(spec.name)", "generation": "\(spec.generation)"])
        } else if !spec.fenced && entry.volume.isFenced {
            // Its own workload writes it from now on: it follows no source any more. (A failback
            // finished any journaled batch before it let the volume go.)
            let journal = try sinkJournal(spec.name)
            try await pool.runIfActive {
                try journal.recover(volume: entry.volume)
                try journal.record(nil)
            }
            // What it captured while cut off, after its fence, was refused, and the sink has
            // overwritten it since: a new capture epoch drops it. Kept, it would stream again
            // stamped with the new generation, pass the open gate and land in the replica over
            // the blocks the unfencing resync sends. The new epoch also keeps the controller from
            // cutting a point of the volume until that resync has made its replica whole.
            entry.log.restartEpoch(size: entry.volume.size)
            entry.tracker.begin(.marked)
            resumeAfter[spec.name] = 0
            // A journaled growth the recovery just finished: the volume list remembers it.
            try noteGrown(name: spec.name)
            if spec.sizeBytes > 0, entry.volume.size > spec.sizeBytes {
                // It grew as a sink (its source was resized): its replica hears of it first.
                entry.volume.announceSize()
            }
            entry.volume.unfence()
            logger.info("volume unfenced: this host owns it again", metadata: ["volume": "\(spec.name)", "generation": "\(spec.generation)"])
        }
    }

    /// Fences volumes now (planned failover) and says where each one's capture stands.
    public func fence(_ names: [String]) async throws -> [Ferry_V1_FencedVolume] {
        guard let unknown = names.first(where: { served[$0] == nil }) else {
            return try await fenceKnown(names)
        }
        throw FerryError(.notFound, "this agent does not protect a volume named \(unknown)")
    }

    private func fenceKnown(_ names: [String]) async throws -> [Ferry_V1_FencedVolume] {
        var out: [Ferry_V1_FencedVolume] = []
        for name in names {
            guard let volume = served[name]?.volume else { throw FerryError(.notFound, "volume \(name) stopped being served while it was fenced") }
            // Only the flag (each volume's generation comes with the controller's volume list),
            // recorded before the await so nothing read meanwhile sees it unfenced.
            served[name]?.spec.fenced = true
            try persist()
            try await pool.runIfActive { volume.fence() }
            guard let entry = served[name] else { throw FerryError(.notFound, "volume \(name) stopped being served while it was fenced") }
            var f = Ferry_V1_FencedVolume()
            f.volume = name
            let log = entry.log.snapshot
            f.epoch = log.epoch
            f.lastSequence = log.last
            f.pendingExtents = UInt64(entry.activity.pendingCount)
            f.overflowed = log.overflowed
            out.append(f)
            logger.warning("volume fenced for a failover; its export is read-only", metadata: ["volume": "\(name)", "last-sequence": "\(f.lastSequence)"])
        }
        return out
    }

    /// The sink role: hashes of a range of a volume.
    public func hashBlocks(_ request: Ferry_V1_HashBlocks) async throws -> Ferry_V1_BlockHashes {
        guard let entry = served[request.volume] else { throw FerryError(.notFound, "this agent does not protect a volume named \(request.volume)") }
        let block = request.blockBytes
        guard BlockHashing.blockBytesRange.contains(block), block & (block - 1) == 0,
              (1...UInt32(BlockHashing.maxBlocks)).contains(request.count), request.offset % UInt64(block) == 0,
              request.offset < entry.volume.size else {
            throw FerryError(.badRequest, "hash request out of bounds: \(request.count) blocks of \(block) bytes at \(request.offset)")
        }
        var out = Ferry_V1_BlockHashes()
        out.hashes = try await entry.volume.hashes(offset: request.offset, blockBytes: Int(block), count: Int(request.count)).hashes
        return out
    }

    /// The sink role: writes a reverse stream's blocks into a fenced volume.
    public func applyBlocks(_ request: Ferry_V1_ApplyBlocks) async throws -> Ferry_V1_BlocksApplied {
        guard let entry = served[request.volume] else { throw FerryError(.notFound, "this agent does not protect a volume named \(request.volume)") }
        guard request.blocks.count <= 1024 else { throw FerryError(.badRequest, "at most 1024 blocks at once") }
        let blocks = try request.blocks.map(SinkChange.init)
        let volume = entry.volume
        var out = Ferry_V1_BlocksApplied()
        guard request.ordered else {
            try await noteGrowth(name: request.volume, blocks)
            try await pool.runIfActive { try volume.applyAsSink(blocks, flush: request.flush) }
            try noteGrown(name: request.volume)
            out.bytes = blocks.reduce(0) { $0 + $1.changedBytes }
            return out
        }
        let bytes = blocks.reduce(UInt64(0)) { $0 + $1.dataBytes }
        guard bytes <= UInt64(SinkJournal.maxBatchBytes) else {
            throw FerryError(.badRequest, "an ordered batch holds at most \(SinkJournal.maxBatchBytes) bytes")
        }
        let journal = try sinkJournal(request.volume)
        try await noteGrowth(name: request.volume, blocks)
        defer { try? noteGrown(name: request.volume) }
        let position = try await pool.runIfActive { () throws -> SinkJournal.Position? in
            try journal.recover(volume: volume)
            let through = request.hasThrough ? SinkJournal.Position(request.through) : nil
            if request.reset {
                guard let through, blocks.isEmpty else { throw FerryError(.badRequest, "a reset names the position and carries no blocks") }
                try journal.record(through)
                return through
            }
            let current = try journal.position()
            guard let through, current != nil, current == SinkJournal.Position(request.after) else { return current }
            guard through.source == current?.source else { throw FerryError(.badRequest, "an ordered batch cannot change the source it follows") }
            try journal.apply(blocks, through: through, to: volume)
            return through
        }
        if let position { out.position = position.wire }
        out.bytes = position.map { $0 == SinkJournal.Position(request.through) ? bytes : 0 } ?? 0
        return out
    }

    /// A sink's batch grows its volume: the intent is recorded first, as for a resize here.
    private func noteGrowth(name: String, _ blocks: [SinkChange]) async throws {
        guard let current = served[name]?.volume.size else { return }
        let target = blocks.reduce(UInt64(0)) { if case .grow(let size) = $1 { max($0, size) } else { $0 } }
        guard target > current else { return }
        var note = resizes[name] ?? ResizeNote()
        note.growingTo = target
        resizes[name] = note
        try persist()
    }

    /// After a sink's batch: the volume list remembers the size it has now.
    private func noteGrown(name: String) throws {
        guard let entry = served[name], var note = resizes[name], note.growingTo != nil || entry.volume.size != entry.spec.sizeBytes else { return }
        if entry.volume.size != entry.spec.sizeBytes, note.grownFrom == nil { note.grownFrom = entry.spec.sizeBytes }
        note.growingTo = nil
        resizes[name] = note
        served[name]?.spec.sizeBytes = entry.volume.size
        try persist()
    }

    /// The sink journal of a volume, in the agent's data dir.
    private func sinkJournal(_ name: String) throws -> SinkJournal {
        let directory = (listPath as NSString).deletingLastPathComponent + "/sinks"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        return SinkJournal(directory: directory, volume: name)
    }

    /// Starts the next scan of a volume in capture mode scan, unless one is still running.
    func startScan(name: String) async throws {
        guard let entry = served[name], entry.activity.pendingCount == 0 else { return }
        try await markAllPending(entry.activity)
        entry.tracker.begin(.scan)
    }

    /// The activity log's disk writes (fdatasync) run on the I/O threads, not the actor's.
    private func markAllPending(_ activity: ActivityLog) async throws {
        try await pool.runIfActive { try activity.markAllPending() }
    }

    /// Grows a served volume online (see `ResizeVolume` in the protocol). The intent is
    /// recorded before the file grows, so a crash in between leaves a volume the next start
    /// takes at either size.
    public func resize(name: String, to size: UInt64) async throws -> Ferry_V1_VolumeResized {
        guard let entry = served[name] else { throw FerryError(.notFound, "this agent does not protect a volume named \(name)") }
        try WireLimits.checkVolumeSize(size, "the new size of volume \(name)")
        guard size % 512 == 0 else { throw FerryError(.badRequest, "the new size of volume \(name), \(size) bytes, is not a multiple of 512") }
        // The activity log keeps a few bytes per 4 MiB extent in memory: bounded.
        guard size <= Self.maxResizeBytes else {
            throw FerryError(.badRequest, "volume \(name) cannot grow to \(size) bytes online: at most \(Self.maxResizeBytes >> 40) TiB")
        }
        guard resizes[name]?.growingTo == nil else {
            throw FerryError(.conflict, "volume \(name) is being resized already; try again once that is done")
        }
        if let hydrating = entry.hydration?.volume, !hydrating.isComplete {
            throw FerryError(.conflict, "volume \(name) is still filling from its failover point: resize it once it is hydrated")
        }
        var out = Ferry_V1_VolumeResized()
        out.name = name
        out.previousBytes = entry.volume.size
        out.sizeBytes = size
        guard size != entry.volume.size else {
            out.epoch = entry.log.epoch
            return out
        }
        var note = resizes[name] ?? ResizeNote()
        note.growingTo = size
        resizes[name] = note
        try persist()
        let volume = entry.volume
        let sequence: UInt64?
        do {
            sequence = try await pool.runIfActive { try volume.resize(to: size) }
        } catch {
            // The file may have grown before the failure: a restart then takes it at that size.
            let grown = ((try? BlockVolume.size(of: entry.spec.path)) ?? 0) == size
            if !grown { resizes[name]?.growingTo = nil }
            try? persist()
            throw error
        }
        note.grownFrom = note.grownFrom ?? out.previousBytes
        note.growingTo = nil
        resizes[name] = note
        served[name]?.spec.sizeBytes = volume.size
        try persist()
        out.epoch = entry.log.epoch
        out.sequence = sequence ?? 0
        logger.info("volume resized online", metadata: ["volume": "\(name)", "from": "\(out.previousBytes)", "to": "\(size)", "sequence": "\(out.sequence)"])
        return out
    }

    /// The largest size a volume grows to online (the activity log's extents are in memory).
    static let maxResizeBytes: UInt64 = 64 << 40

    /// Compares the whole volume with the replica (resync on demand).
    public func resync(name: String) async throws -> Ferry_V1_VolumeStatus {
        guard let entry = served[name] else { throw FerryError(.notFound, "this agent does not protect a volume named \(name)") }
        try await markAllPending(entry.activity)
        entry.tracker.begin(.full)
        logger.info("resync on demand starts", metadata: ["volume": "\(name)", "bytes": "\(entry.volume.size)"])
        return status(entry)
    }

    private func noteEmptyReplica(_ spec: Ferry_V1_VolumeSpec) {
        if spec.replicaEmpty, spec.captureMode == .export, let log = served[spec.name]?.log {
            emptyReplicaEpoch[spec.name] = log.epoch
        } else {
            emptyReplicaEpoch[spec.name] = nil
        }
    }

    /// What each volume's streamer and sync worker need, and the sequence to resume after.
    struct Stream {
        let name: String
        let volume: BlockVolume
        let log: ChangeLog
        let activity: ActivityLog
        let tracker: SyncTracker
        let after: UInt64
        /// Seconds between scans for a volume in capture mode scan; nil for an exported one.
        let scanInterval: UInt32?
        /// How the streamer compresses the written bytes it sends.
        let compression: Ferry_V1_StreamCompression
        /// The capture epoch in which the controller's replica was empty (see `emptyReplicaEpoch`).
        let emptyReplicaEpoch: UInt64?
    }

    func streams() -> [Stream] {
        // A recovered volume whose replica the controller is still building waits (its change
        // log keeps the writes meanwhile).
        served.keys.sorted().filter { served[$0]?.spec.replicaSeeding != true }.compactMap { name in
            served[name].map {
                Stream(name: name, volume: $0.volume, log: $0.log, activity: $0.activity, tracker: $0.tracker, after: resumeAfter[name] ?? 0,
                       scanInterval: $0.spec.captureMode == .scan ? max(5, $0.spec.scanIntervalSeconds) : nil,
                       compression: $0.spec.compression, emptyReplicaEpoch: emptyReplicaEpoch[name])
            }
        }
    }

    /// The change log of `name` overflowed: start a new epoch; its dropped writes' extents are
    /// pending and the sync worker brings them over. Returns the new epoch.
    func recoverFromOverflow(name: String) -> UInt64? {
        guard let entry = served[name] else { return nil }
        let epoch = entry.log.restartEpoch(size: entry.volume.size)
        entry.tracker.begin(.marked)
        resumeAfter[name] = 0
        logger.warning("change log overflowed: replication restarts with a resync of the marked extents",
                       metadata: ["volume": "\(name)", "pending-extents": "\(entry.activity.pendingCount)"])
        return epoch
    }

    /// The controller holds everything through `durable` of `epoch`: trim it. An ack past the
    /// last captured write is refused (nothing is trimmed): the controller cannot hold what
    /// was never sent.
    public func acked(volume: String, epoch: UInt64, durable: UInt64) throws {
        guard let log = served[volume]?.log, log.epoch == epoch else { return }
        guard durable <= log.last else {
            throw FerryError(.badRequest, "ack of sequence \(durable) for volume \(volume), but this agent captured only through \(log.last) in epoch \(epoch); ignored")
        }
        log.trim(through: durable, epoch: epoch)
        resumeAfter[volume] = max(resumeAfter[volume] ?? 0, durable)
    }

    /// Clears the activity marks of acked extents, and says how each volume stands.
    func maintain() async -> [Ferry_V1_VolumeReport] {
        var reports: [Ferry_V1_VolumeReport] = []
        for name in served.keys.sorted() {
            guard let entry = served[name] else { continue }
            do {
                let (epoch, acked) = entry.log.ackedState
                if entry.activity.hasClearable(ackedThrough: acked, epoch: epoch) {
                    // A mark may only go once the bytes it covers are on the source's disk: a
                    // power cut must not take back a write the replica keeps.
                    let volume = entry.volume, activity = entry.activity
                    try await pool.runIfActive {
                        try volume.flushNow()
                        try activity.clear(ackedThrough: acked, epoch: epoch)
                    }
                }
            } catch {
                logger.error("cannot update the activity log", metadata: ["volume": "\(name)", "error": "\(error)"])
            }
            var report = Ferry_V1_VolumeReport()
            report.volume = name
            // Pending extents first, then the log: a capture that finished an extent is then
            // always within the sequence reported.
            let pendingExtents = entry.activity.pendingCount
            let log = entry.log.snapshot
            report.epoch = log.epoch
            report.ackedSequence = log.acked
            report.lastSequence = log.last
            report.pendingBytes = UInt64(log.pendingBytes)
            report.oldestPendingUnixNanos = log.oldestPending ?? 0
            report.overflowed = log.overflowed
            report.writeLag.counts = log.writeLag.counts
            report.writeLag.sumSeconds = log.writeLag.sumSeconds
            let compressed = entry.log.compression.snapshot
            report.compressInBytes = compressed.inBytes
            report.compressOutBytes = compressed.outBytes
            report.compressNanos = compressed.nanoseconds
            report.markedExtents = UInt64(entry.activity.markedCount)
            if let tcpAddress { report.tcpAddress = tcpAddress }
            report.sync = entry.tracker.progress(pendingExtents: pendingExtents, extentBytes: entry.activity.extentBytes)
            if let hydrating = entry.hydration?.volume {
                let progress = hydrating.progress
                report.hydration.targetPath = entry.spec.path
                report.hydration.localBytes = progress.localBytes
                report.hydration.fetchedBytes = progress.fetchedBytes
                report.hydration.bytesPerSecond = hydrating.rate
                report.hydration.copySeconds = hydrating.copySeconds
                report.hydration.hydrated = progress.complete
            }
            reports.append(report)
        }
        return reports
    }

    /// A served volume and its socket (a failover that lands here hands it to the start hook).
    func served(_ name: String) -> (volume: BlockVolume, socket: String)? {
        served[name].map { ($0.volume, $0.socket) }
    }

    /// Where a recovered volume lives when the plan names no target.
    nonisolated func defaultRecoveredPath(_ name: String) -> String {
        (listPath as NSString).deletingLastPathComponent + "/volumes/recovered/" + name + ".img"
    }

    /// Where a hydrating volume keeps its map.
    nonisolated func hydrationMapPath(_ name: String) -> String {
        (listPath as NSString).deletingLastPathComponent + "/hydration/" + name + ".map"
    }

    public func statuses() -> [Ferry_V1_VolumeStatus] {
        served.keys.sorted().compactMap { served[$0].map(status) }
    }

    /// Stops every export (the backing files stay as they are).
    public func stop() {
        tcpTask?.cancel()
        for entry in served.values {
            entry.hydration?.copier?.cancel()
            entry.server.cancel()
            unlink(entry.socket)
        }
        served = [:]
    }

    private func openVolume(_ spec: Ferry_V1_VolumeSpec) async throws -> Served {
        guard VolumeName.isValid(spec.name) else {
            throw FerryError(.badRequest, "'\(spec.name)' is not a valid volume name (1-63 characters: letters, digits, '.', '-', '_')")
        }
        guard spec.path.hasPrefix("/") else { throw FerryError(.badRequest, "volume path must be absolute, not '\(spec.path)'") }
        // Before anything is opened or created: the host decides what may be written.
        let allow = self.allow
        let (resolved, refusal) = try await pool.runIfActive { allow.check(spec.path) }
        var outside: String?
        if let refusal {
            let shown = resolved == spec.path ? spec.path : "\(spec.path) (\(resolved))"
            guard remembered[spec.name] == spec.path, spec.createSizeBytes == 0 else {
                throw FerryError(.permissionDenied, "host \(hostName) does not allow protecting \(shown): \(refusal); add it to protect-allow in \(configPath ?? "its agent configuration (ferry-agent run --config)") on that host")
            }
            outside = "\(shown) is outside protect-allow: \(refusal); served because it was protected before; add it to protect-allow in \(configPath ?? "the agent configuration")"
            logger.warning("volume served although its path is outside protect-allow (it was protected before the list existed); add it to protect-allow",
                           metadata: ["volume": "\(spec.name)", "path": "\(spec.path)", "reason": "\(refusal)"])
        }
        var hydration: Hydration?
        var created: Bool
        if spec.hasHydration {
            (hydration, created) = try await openHydration(spec)
        } else {
            created = try Self.prepare(path: spec.path, createSize: spec.createSizeBytes)
        }
        let spillDirectory = (listPath as NSString).deletingLastPathComponent + "/spill"
        try FileManager.default.createDirectory(atPath: spillDirectory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        let dataDir = (listPath as NSString).deletingLastPathComponent
        try FileManager.default.createDirectory(atPath: dataDir + "/activity", withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        let size = try BlockVolume.size(of: spec.path)
        var note = resizes[spec.name]
        var grown = false
        if let growingTo = note?.growingTo {
            // A resize a crash interrupted: the file is either size; take it as it is.
            if size == growingTo, spec.sizeBytes > 0, spec.sizeBytes < size {
                grown = true
                if note?.grownFrom == nil { note?.grownFrom = spec.sizeBytes }
                logger.warning("volume found grown by a resize a restart interrupted; taken at its new size",
                               metadata: ["volume": "\(spec.name)", "from": "\(spec.sizeBytes)", "to": "\(size)"])
            }
            note?.growingTo = nil
            resizes[spec.name] = note
        }
        let activity = try ActivityLog(path: dataDir + "/activity/" + spec.name + ".fal", volumeBytes: size)
        let spillPath = spillDirectory + "/" + spec.name + ".spill"
        // A fresh file, never the inode an earlier log of the same name may still write to.
        unlink(spillPath)
        let log = try ChangeLog(memoryBytes: changeLogBytes, spillPath: spillPath, spillBytes: spillBytes, activity: activity,
                                announceSize: note?.grownFrom != nil ? size : nil)
        let scanned = spec.captureMode == .scan
        var opened = false
        defer {
            // Whatever fails from here on: the copier of a volume not served must not run on.
            if !opened, let hydration { Task { await hydration.stop() } }
        }
        let volume = try BlockVolume(name: spec.name, path: spec.path, recorder: log, pool: pool, readOnly: scanned, hydration: hydration?.volume)
        volume.generation = spec.generation
        // Fenced before it is served: the workload never gets a moment of writes here.
        if spec.fenced {
            volume.fence()
            logger.warning("volume fenced: another site owns it since a failover; its export is read-only", metadata: ["volume": "\(spec.name)", "generation": "\(spec.generation)"])
        }
        let tracker = SyncTracker()
        if created {
            // A new sparse image reads as zeroes, like the new replica: already in sync.
            tracker.completedEmpty()
        }
        if activity.pendingCount > 0 {
            tracker.begin(activity.fullInProgress ? .full : .marked)
            logger.info("extents marked by an earlier run will be resynced", metadata: ["volume": "\(spec.name)", "extents": "\(activity.pendingCount)"])
        }
        if spec.createSizeBytes > 0, volume.size != spec.createSizeBytes {
            throw FerryError(.conflict, "\(spec.path) exists with \(volume.size) bytes, not the \(spec.createSizeBytes) asked for")
        }
        if spec.sizeBytes > 0, volume.size != spec.sizeBytes, !grown {
            throw FerryError(.conflict, "\(spec.path) is now \(volume.size) bytes, but was protected with \(spec.sizeBytes); resize through Ferry, not behind it")
        }
        var recorded = spec
        recorded.sizeBytes = volume.size
        recorded.createSizeBytes = 0
        if scanned {
            // The workload uses the device directly; the agent only reads it, every interval.
            logger.info("volume protected by scanning", metadata: ["volume": "\(spec.name)", "path": "\(spec.path)", "interval": "\(spec.scanIntervalSeconds)s"])
            return Served(spec: recorded, volume: volume, log: log, activity: activity, tracker: tracker, socket: "",
                          server: Task {}, historyKnown: activity.existed, createdEmpty: created, outsideAllowlist: outside)
        }
        try FileManager.default.createDirectory(atPath: socketDirectory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        // Other users named in nbd-socket-users must reach the sockets (not list them).
        if !socketUsers.isEmpty { chmod(socketDirectory, 0o711) }
        let socket = socketDirectory + "/" + spec.name + ".sock"
        let server = NBDServer(volumes: [volume], logger: logger, socketUsers: socketUsers)
        let ready = AsyncStream<Void>.makeStream()
        let task = Task { try await server.serve(unixSocket: socket, onReady: { ready.continuation.finish() }) }
        for await _ in ready.stream {}
        await exportOverTCP(volume)
        logger.info("volume exported", metadata: ["volume": "\(spec.name)", "path": "\(spec.path)", "bytes": "\(volume.size)", "socket": "\(socket)"])
        opened = true
        return Served(spec: recorded, volume: volume, log: log, activity: activity, tracker: tracker, socket: socket, server: task,
                      historyKnown: activity.existed, createdEmpty: created, outsideAllowlist: outside, hydration: hydration)
    }

    /// Opens the hydration of a recovered volume's target (creating the target if it is
    /// missing) and starts its copier unless every block is local already. Returns whether the
    /// volume is new here: its replica is built from the same point, so it is in sync.
    private func openHydration(_ spec: Ferry_V1_VolumeSpec) async throws -> (Hydration, Bool) {
        guard let connector = pointConnector else {
            throw FerryError(.unavailable, "volume \(spec.name) hydrates from the controller, and this agent has no controller connection yet")
        }
        guard spec.captureMode == .export else {
            throw FerryError(.badRequest, "volume \(spec.name) hydrates: it is captured through its export, not by scanning")
        }
        guard spec.sizeBytes > 0, spec.hydration.exportPort > 0, spec.hydration.exportPort <= 65535,
              !spec.hydration.exportName.isEmpty, spec.hydration.exportName.utf8.count <= 256 else {
            throw FerryError(.badRequest, "volume \(spec.name) hydrates, but its size or point export is missing or out of range")
        }
        let mapPath = hydrationMapPath(spec.name)
        try FileManager.default.createDirectory(atPath: (mapPath as NSString).deletingLastPathComponent, withIntermediateDirectories: true,
                                                attributes: [.posixPermissions: 0o700])
        let fresh = !FileManager.default.fileExists(atPath: mapPath)
        let port = Int(spec.hydration.exportPort), export = spec.hydration.exportName
        // Reads of blocks not local yet go to the point, reconnecting as a recovered volume does.
        let remote = RecoveredVolume(name: spec.name, source: spec.hydration.source, size: spec.sizeBytes, first: nil, logger: logger,
                                     connect: { try await connector(port, export, false) })
        let logger = self.logger
        let volume: HydratingVolume
        do {
            volume = try await pool.runIfActive {
                try HydratingVolume.open(name: spec.name, source: spec.hydration.source, size: spec.sizeBytes, target: spec.path,
                                         mapPath: mapPath, point: spec.hydration.point, remote: remote, logger: logger,
                                         onComplete: { Task { await remote.stop() } })
            }
        } catch {
            await remote.stop()
            throw error
        }
        guard !volume.isComplete else {
            await remote.stop()
            return (Hydration(volume: volume, remote: remote, copier: nil, mapPath: mapPath), fresh)
        }
        logger.info("hydrating a recovered volume", metadata: ["volume": "\(spec.name)", "target": "\(spec.path)", "local": "\(volume.progress.localBytes)"])
        let copier = Hydrator(volume: volume, connect: { try await connector(port, export, true) }, pool: pool, logger: logger,
                              rateLimit: hydrationRateLimit, report: { _, _ in })
        return (Hydration(volume: volume, remote: remote, copier: Task { await copier.run() }, mapPath: mapPath), fresh)
    }

    /// Adds the volume to the loopback TCP export, starting it with the first volume. A port
    /// that cannot be bound is logged; the unix sockets serve on regardless.
    private func exportOverTCP(_ volume: BlockVolume) async {
        guard let tcpListen else { return }
        if tcpServer == nil {
            let server = NBDServer(volumes: [], logger: logger)
            let ready = AsyncStream<Int>.makeStream()
            let task = Task {
                defer { ready.continuation.finish() }
                try await server.serve(host: tcpListen.host, port: tcpListen.port, onReady: { ready.continuation.yield($0) })
            }
            var bound: Int?
            for await port in ready.stream { bound = port; break }
            guard let bound else {
                let reason = await (try? task.value).map { "\($0)" } ?? "bind failed"
                logger.error("cannot open the loopback TCP NBD export; volumes stay on their unix sockets",
                             metadata: ["address": "\(tcpListen.host):\(tcpListen.port)", "reason": "\(reason)"])
                return
            }
            tcpServer = server
            tcpTask = task
            tcpAddress = tcpListen.host.contains(":") ? "[\(tcpListen.host)]:\(bound)" : "\(tcpListen.host):\(bound)"
        }
        tcpServer?.add(volume)
    }

    /// Checks the path, making a sparse image when asked and it does not exist yet.
    /// Returns whether it made a new image.
    @discardableResult
    static func prepare(path: String, createSize: UInt64) throws -> Bool {
        var st = stat()
        if stat(path, &st) == 0 {
            let type = st.st_mode & S_IFMT
            guard type == S_IFREG || type == S_IFBLK else {
                throw FerryError(.badRequest, "\(path) is neither an image file nor a block device")
            }
            return false
        }
        guard createSize > 0 else {
            throw FerryError(.notFound, "\(path) does not exist; give a size to create a new image (ferryctl protect --create-size)")
        }
        try WireLimits.checkVolumeSize(createSize, "the size to create for \(path)")
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw FerryError(.io, "cannot create \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard ftruncate(fd, off_t(createSize)) == 0 else {
            throw FerryError(.io, "cannot size \(path) to \(createSize) bytes: \(String(cString: strerror(errno)))")
        }
        return true
    }

    private func status(_ entry: Served) -> Ferry_V1_VolumeStatus {
        var s = Ferry_V1_VolumeStatus()
        s.name = entry.spec.name
        s.path = entry.spec.path
        s.sizeBytes = entry.volume.size
        s.socketPath = entry.socket
        if let tcpAddress { s.tcpAddress = tcpAddress }
        s.lastSequence = entry.log.last
        s.epoch = entry.log.epoch
        if let outside = entry.outsideAllowlist { s.outsideAllowlist = outside }
        s.createdEmpty = entry.createdEmpty
        return s
    }

    /// What the data dir remembers of a volume.
    struct Remembered: Codable {
        var name: String
        var path: String
        var sizeBytes: UInt64
        var scanIntervalSeconds: UInt32?
        var generation: UInt64?
        var fenced: Bool?
        /// A recovered volume's hydration: its point export (port, name), point and source.
        var hydrationPort: UInt32?
        var hydrationExport: String?
        var hydrationPoint: String?
        var hydrationSource: String?
        /// Online resizes (see `ResizeNote`).
        var grownFrom: UInt64?
        var growingTo: UInt64?

        var spec: Ferry_V1_VolumeSpec {
            var s = Ferry_V1_VolumeSpec()
            s.name = name
            s.path = path
            s.sizeBytes = sizeBytes
            if let scanIntervalSeconds {
                s.captureMode = .scan
                s.scanIntervalSeconds = scanIntervalSeconds
            }
            s.generation = generation ?? 0
            s.fenced = fenced ?? false
            if let hydrationPort, let hydrationExport {
                s.hydration.exportPort = hydrationPort
                s.hydration.exportName = hydrationExport
                s.hydration.point = hydrationPoint ?? ""
                s.hydration.source = hydrationSource ?? ""
            }
            return s
        }
    }

    private func persist() throws {
        let list = served.values.map {
            Remembered(name: $0.spec.name, path: $0.spec.path, sizeBytes: $0.spec.sizeBytes,
                       scanIntervalSeconds: $0.spec.captureMode == .scan ? $0.spec.scanIntervalSeconds : nil,
                       generation: $0.spec.generation == 0 ? nil : $0.spec.generation, fenced: $0.spec.fenced ? true : nil,
                       hydrationPort: $0.spec.hasHydration ? $0.spec.hydration.exportPort : nil,
                       hydrationExport: $0.spec.hasHydration ? $0.spec.hydration.exportName : nil,
                       hydrationPoint: $0.spec.hasHydration ? $0.spec.hydration.point : nil,
                       hydrationSource: $0.spec.hasHydration ? $0.spec.hydration.source : nil,
                       grownFrom: resizes[$0.spec.name]?.grownFrom, growingTo: resizes[$0.spec.name]?.growingTo)
        }
            .sorted { $0.name < $1.name }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        try PEMFiles.writePublic(String(decoding: try encoder.encode(list), as: UTF8.self) + "\n", to: listPath)
    }
}
