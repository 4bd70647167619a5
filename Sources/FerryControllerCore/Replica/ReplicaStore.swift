import CFerrySystem
import FerryWire
import Foundation
import NIOCore
import NIOPosix

/// One volume's replica on the controller, in `DIR`:
/// - `journal/ID.seg`: append-only journal segments of the records received, each checked by
///   CRC32C and made durable (fdatasync, one per batch) before it is acked;
/// - `replica.img`: the latest state, every record applied in sequence order;
/// - `base.img`: the state at the retention horizon: records older than the retention window
///   (or past the journal's size cap) are folded into it and their segments deleted, so the
///   journal holds the history a point-in-time image is built from;
/// - `state.json`: epoch, checkpoint, fold progress, sync status, the epochs' order.
///
/// A point-in-time image (`openImage(at:)`) is read in place from `base.img` and the journal
/// up to a position; retained points hold the journal back from folding with `pin`.
///
/// On open, a torn or corrupt journal tail is cut at the last valid record and the records
/// after the last checkpoint are replayed onto the image (idempotent, since records apply in
/// order), so nothing acked is lost.
public actor ReplicaStore {
    public struct State: Codable, Sendable {
        /// The agent's capture epoch the journal belongs to (0: nothing received yet).
        public var epoch: UInt64 = 0
        /// Writes of an earlier epoch may be missing: the replica needs a resync before it can be trusted.
        public var resyncNeeded = false
        /// Everything through this sequence is in the (synced) image; the journal holds what follows.
        public var checkpointed: UInt64 = 0
        /// A full comparison with the source has completed once: the replica can be trusted.
        public var initialSynced = false
        /// Syncs (initial, crash or overflow resync, on demand) completed.
        public var syncsCompleted: UInt64 = 0
        /// Journal segments up to this id are folded into the base image.
        public var foldedThrough: UInt64 = 0
        /// Capture time (Unix nanoseconds) of the newest record folded into the base image.
        public var baseAsOf: Int64 = 0
        /// Capture epochs in the order they started: journal positions are ordered by it, since
        /// epochs are random numbers.
        public var epochs: [UInt64] = []
        /// The last record folded into the base image (nil: nothing folded yet).
        public var baseThrough: ReplicaPosition?
        /// A fold of this segment began and has not been recorded as done: base.img may hold
        /// part of it, so it is finished (replayed, idempotently) before any image is served.
        public var folding: UInt64?
        /// Damage found in the journal (nil: none known). Set, the replica needs a full resync.
        public var corruption: JournalCorruption?
        /// The base image is being rebuilt from the resynced latest image (see `rebase`): no
        /// image is served from it until that is done.
        public var rebasing = false
        /// The volume's online resizes, in journal order: a point's size is the one in force at
        /// its position.
        public var sizes: [SizeChange] = []
        /// The volume's size when the replica began, before any of `sizes` (nil in a state file
        /// from before resizes: the size the replica is opened with).
        public var initialSize: UInt64?

        public init() {}

        public init(from decoder: any Decoder) throws {
            // Fields added later default for state files written before them.
            let c = try decoder.container(keyedBy: CodingKeys.self)
            epoch = try c.decodeIfPresent(UInt64.self, forKey: .epoch) ?? 0
            resyncNeeded = try c.decodeIfPresent(Bool.self, forKey: .resyncNeeded) ?? false
            checkpointed = try c.decodeIfPresent(UInt64.self, forKey: .checkpointed) ?? 0
            initialSynced = try c.decodeIfPresent(Bool.self, forKey: .initialSynced) ?? false
            syncsCompleted = try c.decodeIfPresent(UInt64.self, forKey: .syncsCompleted) ?? 0
            foldedThrough = try c.decodeIfPresent(UInt64.self, forKey: .foldedThrough) ?? 0
            baseAsOf = try c.decodeIfPresent(Int64.self, forKey: .baseAsOf) ?? 0
            epochs = try c.decodeIfPresent([UInt64].self, forKey: .epochs) ?? (epoch != 0 ? [epoch] : [])
            baseThrough = try c.decodeIfPresent(ReplicaPosition.self, forKey: .baseThrough)
            folding = try c.decodeIfPresent(UInt64.self, forKey: .folding)
            corruption = try c.decodeIfPresent(JournalCorruption.self, forKey: .corruption)
            rebasing = try c.decodeIfPresent(Bool.self, forKey: .rebasing) ?? false
            sizes = try c.decodeIfPresent([SizeChange].self, forKey: .sizes) ?? []
            initialSize = try c.decodeIfPresent(UInt64.self, forKey: .initialSize)
        }
    }

    /// A resize record of the journal: from `position` on the volume is `size` bytes, before
    /// it `previous`.
    public struct SizeChange: Codable, Sendable, Equatable {
        public var position: ReplicaPosition
        public var size: UInt64
        public var previous: UInt64
    }

    /// What the agent last reported about the volume, and when.
    public private(set) var report: Ferry_V1_VolumeReport?
    public private(set) var reportedAt: Date?
    private var lagHistory = LagHistory()
    /// The worst lag reported in each 10 s of the last hour, oldest first.
    var lagSamples: [LagHistory.Sample] { lagHistory.samples }
    /// The last error applying the stream (cleared by the next batch applied), or else the
    /// journal's damage until a resync repairs it.
    public var lastError: String? { spacePause?.message ?? streamError ?? state.corruption?.message }
    private var streamError: String?
    /// Replication into this replica waits for disk space (ENOSPC): batches are refused with
    /// this, not applied and not acked, until the space is there again.
    private(set) var spacePause: FerryError?
    /// Free bytes wanted before replication resumes: the batch that failed, and room to spare.
    private var spaceWanted: UInt64 = 0
    /// A resync was asked of the agent's current session for the journal's damage.
    public private(set) var repairRequested = false
    /// Bytes of data applied since the replica was opened.
    public private(set) var bytesApplied: UInt64 = 0
    /// Applied bytes per second, smoothed over about ten seconds.
    private var throughput = Throughput()
    /// A sync the agent reported finished, complete once this sequence is durable.
    private var completion: (through: UInt64, full: Bool)?

    public let directory: String
    /// The volume's size as of the journal's end (it grows with resize records).
    public private(set) var size: UInt64
    /// The size the records received so far (durable or not) allow: a batch queued behind one
    /// with a resize may lie past `size` until that one commits.
    private var ingestSize: UInt64
    /// Told the new size after a resize record is durable (the controller's volume record follows).
    private var onGrow: (@Sendable (UInt64) async -> Void)?
    public private(set) var state: State
    /// Last sequence of `state.epoch` on disk in the journal.
    public private(set) var durable: UInt64 = 0
    /// How long records stay in the journal before they are folded into the base image, and
    /// the most journal bytes kept whatever their age.
    public let retention: Duration
    public let journalLimit: Int64
    let segmentBytes: Int64
    private let image: Int32
    private let base: Int32
    /// state.json, written on the pool; `stateVersion` orders the writes.
    private let stateFile: ReplicaStateFile
    private var stateVersion: UInt64 = 0
    private let pool: NIOThreadPool
    /// Segments not folded yet, oldest first; the last one may be the active one.
    private var segments: [JournalSegment] = []
    /// The segment being appended to (its fd), if any.
    private var active: (id: UInt64, fd: Int32)?
    private var appendedSinceCheckpoint: Int64 = 0
    /// Who holds the journal's end, whether a fold runs, and who waits for either.
    private var coordination = ReplicaStoreStateMachine<CheckedContinuation<Void, Never>>()
    /// Open point images: while any is open the base image does not change (no fold).
    private let leases = ImageLeases()
    /// The oldest position a retained recovery point needs (see `pin`).
    public private(set) var pinned: ReplicaPosition?
    /// Batches, reports and a rebase change the epoch and the durable sequence across awaits:
    /// one writer at a time, even when a reconnected agent's new session overlaps its old one.
    private func acquire(_ writer: ReplicaStoreStateMachine<CheckedContinuation<Void, Never>>.Writer) async {
        await withCheckedContinuation { c in
            switch coordination.acquire(writer, waiter: c) {
            case .proceed: c.resume()
            case .wait: break
            }
        }
    }

    private func release() {
        coordination.release()?.resume()
    }

    /// Returns once no fold is changing the base image (at once when none runs).
    private func waitForFold() async {
        await withCheckedContinuation { c in
            switch coordination.waitForFold(c) {
            case .proceed: c.resume()
            case .wait: break
            }
        }
    }

    /// Every this many journal bytes the image is synced and the checkpoint advanced, which
    /// bounds what a restart replays.
    static let checkpointBytes: Int64 = 256 << 20

    public var imagePath: String { directory + "/replica.img" }
    public var basePath: String { directory + "/base.img" }
    var journalDirectory: String { directory + "/journal" }
    /// Bytes in journal segments not folded yet.
    public var journalBytes: Int64 { segments.reduce(0) { $0 + $1.bytes } }
    /// Capture time (Unix nanoseconds) of the oldest record still in the journal, 0 if none.
    public var oldestRetained: Int64 {
        guard let first = segments.first(where: { $0.bytes > 0 }) else { return 0 }
        return first.newest == 0 ? 0 : (oldestCapture[first.id] ?? first.newest)
    }
    private var oldestCapture: [UInt64: Int64] = [:]
    /// Indexes of the journal at segment ends, for opening point images (kept in memory: a
    /// restart rebuilds them in the background).
    private var checkpoints = PointCheckpoints()

    /// Opens (or creates, sparse) the replica of a volume of `size` bytes in `directory`.
    public init(directory: String, size: UInt64, pool: NIOThreadPool, retention: Duration = .seconds(3600),
                journalLimit: Int64 = 8 << 30, segmentBytes: Int64 = 64 << 20, pinned: ReplicaPosition? = nil) throws {
        self.pinned = pinned
        let fm = FileManager.default
        try fm.createDirectory(atPath: directory + "/journal", withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        self.directory = directory
        self.pool = pool
        self.retention = retention
        self.journalLimit = journalLimit
        self.segmentBytes = segmentBytes
        let image = open(directory + "/replica.img", O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        let base = open(directory + "/base.img", O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard image >= 0, base >= 0 else {
            throw FerryError(.io, "cannot open the replica in \(directory): \(String(cString: strerror(errno)))")
        }
        self.image = image
        self.base = base
        stateFile = ReplicaStateFile(path: directory + "/state.json")
        var state = try Self.loadState(directory + "/state.json")
        // The replica knows its own size: the caller's (the volume record's) may predate a
        // resize, or postdate the point a rebuilt replica starts from.
        if state.initialSize == nil { state.initialSize = size }
        var size = state.sizes.last?.size ?? state.initialSize ?? size
        // Images only grow: the base and the latest image are always the latest size (a point
        // of an earlier size reads only its own first bytes).
        for fd in [image, base] {
            var st = stat()
            fstat(fd, &st)
            if UInt64(st.st_size) < size { ftruncate(fd, off_t(size)) }
        }
        self.state = state
        let recovered = try Self.recover(journalDirectory: directory + "/journal", state: state, image: image, size: size)
        // Resize records durable in the journal whose state was not saved (a crash between the
        // two): the journal is the truth.
        for found in recovered.resizes where found.size > size {
            state.sizes.append(SizeChange(position: found.position, size: found.size, previous: size))
            size = found.size
            for fd in [image, base] { try JournalRecord.grow(fd, to: size) }
        }
        self.size = size
        ingestSize = size
        segments = recovered.segments
        durable = recovered.durable
        oldestCapture = recovered.oldestCapture
        // A state file from before positions: the journal's own epochs precede the current
        // one, and the base ends just before the first record left in the journal.
        var journalEpochs: [UInt64] = []
        for segment in segments where !journalEpochs.contains(segment.epoch) && !state.epochs.contains(segment.epoch) {
            journalEpochs.append(segment.epoch)
        }
        state.epochs = journalEpochs + state.epochs
        if state.baseThrough == nil, state.foldedThrough > 0 {
            if let first = segments.first(where: { $0.bytes > 0 && $0.first > 0 }) {
                state.baseThrough = ReplicaPosition(epoch: first.epoch, sequence: first.first - 1)
            } else {
                state.baseThrough = ReplicaPosition(epoch: state.epoch, sequence: recovered.durable)
            }
        }
        if let found = recovered.corruption, state.corruption == nil || state.corruption?.resynced == true {
            // Recorded at once: a restart must not forget it, even if nothing else is saved.
            state.corruption = found
            state.resyncNeeded = true
            try Self.save(state, in: directory)
        } else if state.sizes != self.state.sizes {
            try Self.save(state, in: directory)
        }
        self.state = state
    }

    /// The volume's size at `position`: the last resize at or before it, or the size before
    /// the first resize.
    public func size(at position: ReplicaPosition) -> UInt64 {
        var result = state.sizes.first?.previous ?? size
        for change in state.sizes {
            guard let order = compare(change.position, position), order != .orderedDescending else { break }
            result = change.size
        }
        return result
    }

    /// Sets who is told the volume's new size once a resize record is durable.
    public func setGrowthHandler(_ handler: @escaping @Sendable (UInt64) async -> Void) {
        onGrow = handler
    }

    /// The saved state; a new one only when there is no file. A file that cannot be read is
    /// an error: starting afresh would forget the epoch, the checkpoint and the fold progress,
    /// and serve a replica that is not what it claims.
    private static func loadState(_ path: String) throws -> State {
        let data: Data
        do {
            data = try Data(contentsOf: URL(fileURLWithPath: path))
        } catch {
            if !FileManager.default.fileExists(atPath: path) { return State() }
            throw FerryError(.io, "cannot read the replica state \(path): \(error.localizedDescription); fix its permissions or storage and restart the controller")
        }
        do {
            return try JSONDecoder().decode(State.self, from: data)
        } catch {
            throw FerryError(.io, "the replica state \(path) is damaged (\(data.count) bytes that are not a replica state: \(error)); restore it from a backup, or move the replica's directory away to start it afresh with a full resync")
        }
    }

    deinit {
        close(image)
        close(base)
        if let active { close(active.fd) }
    }

    /// Reads the journal back: folded segments left behind are deleted, sealed ones are known
    /// from their meta file, the active one (the last, unsealed) is scanned and its torn tail
    /// cut; records of the current epoch after the checkpoint are replayed onto the image.
    ///
    /// A sealed segment (or one before the last) with a record failing its CRC is damage, not a
    /// torn append: it and every later segment are kept whole (they hold acked history), the
    /// damage is returned, and nothing past it is replayed.
    private static func recover(journalDirectory dir: String, state: State, image: Int32, size: UInt64) throws
        -> (segments: [JournalSegment], durable: UInt64, oldestCapture: [UInt64: Int64], corruption: JournalCorruption?,
            resizes: [(position: ReplicaPosition, size: UInt64)]) {
        var segments: [JournalSegment] = []
        var resizes: [(position: ReplicaPosition, size: UInt64)] = []
        var oldestCapture: [UInt64: Int64] = [:]
        var durable: UInt64
        var corruption: JournalCorruption?
        let ids = ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [])
            .filter { $0.hasSuffix(".seg") }
            .compactMap { UInt64($0.dropLast(4), radix: 16) }
            .sorted()
        durable = state.checkpointed
        // The size the records scanned so far allow: a resize record in one segment lets the
        // records of the next ones lie past the older size.
        var bound = size
        for id in ids {
            var segment = JournalSegment(id: id, epoch: 0)
            if id <= state.foldedThrough {
                // Folded already (the crash came before the delete).
                unlink(segment.path(in: dir))
                unlink(segment.metaPath(in: dir))
                continue
            }
            let sealed = (try? JSONDecoder().decode(JournalSegment.self, from: Data(contentsOf: URL(fileURLWithPath: segment.metaPath(in: dir)))))
            // Past damage nothing is replayed: the image would skip the damaged records' writes.
            let replay = corruption == nil && (sealed.map { $0.epoch == state.epoch && $0.last > state.checkpointed } ?? true)
            if let sealed, !replay {
                segments.append(sealed)
                continue
            }
            var expected: UInt64?
            var oldest: Int64 = 0
            let (valid, total, intactAfter) = try JournalRecord.withSegment(segment.path(in: dir)) { bytes in
                let valid = try JournalRecord.scan(bytes, size: bound) { r in
                    if segment.epoch == 0 { segment.epoch = r.epoch }
                    if let expected, r.epoch == segment.epoch, r.sequence < expected {
                        return // a duplicate of a record already read: harmless, skipped
                    }
                    guard r.epoch == segment.epoch, expected.map({ r.sequence == $0 }) ?? true else {
                        throw FerryError(.io, "journal segment \(JournalSegment.name(id)) breaks sequence order at \(r.sequence)")
                    }
                    expected = r.sequence + 1
                    if r.kind == .resize {
                        resizes.append((ReplicaPosition(epoch: r.epoch, sequence: r.sequence), r.length))
                        bound = max(bound, r.length)
                    }
                    if segment.first == 0 { segment.first = r.sequence }
                    segment.last = r.sequence
                    segment.bytes = Int64(r.end)
                    segment.newest = max(segment.newest, r.captured)
                    if oldest == 0 { oldest = r.captured }
                    if replay, segment.epoch == state.epoch, r.sequence > durable {
                        guard r.sequence == durable + 1 else {
                            throw FerryError(.io, "journal segment \(JournalSegment.name(id)) skips from \(durable) to \(r.sequence)")
                        }
                        try JournalRecord.apply(r, to: image)
                        durable = r.sequence
                    }
                }
                return (valid, bytes.count, JournalRecord.recordFollows(bytes, damageAt: valid, size: bound))
            }
            let damaged = valid < total || sealed.map { Int64(valid) < $0.bytes } ?? false
            if damaged, sealed == nil, id == ids.last, !intactAfter {
                // The active segment's torn tail: what follows the last valid record was never
                // acked (an append is acked only once it is durable whole).
                let fd = open(segment.path(in: dir), O_WRONLY | O_CLOEXEC)
                if fd >= 0 { ftruncate(fd, off_t(valid)); fdatasync(fd); close(fd) }
            } else if damaged {
                if corruption == nil {
                    let lost = state.epoch == (sealed?.epoch ?? segment.epoch)
                        ? "the latest image lacks the writes after sequence \(durable) until a resync" : nil
                    corruption = .of(segment: id, offset: valid, path: segment.path(in: dir), found: "at start-up", lost: lost)
                }
                // Kept whole, as its meta file describes it: its records past the damage are
                // acked history, and images over them must fail, not miss them.
                var kept = sealed ?? segment
                kept.bytes = Int64(total)
                if kept.epoch == 0 { kept.epoch = state.epoch }
                oldestCapture[id] = oldest
                segments.append(kept)
                continue
            }
            if segment.epoch == 0 {
                // Nothing valid in it.
                unlink(segment.path(in: dir))
                unlink(segment.metaPath(in: dir))
                continue
            }
            oldestCapture[id] = oldest
            segments.append(segment)
        }
        // Appends always go to a fresh segment after a restart.
        for segment in segments where !FileManager.default.fileExists(atPath: segment.metaPath(in: dir)) {
            try writeMeta(segment, in: dir)
        }
        return (segments, durable, oldestCapture, corruption, resizes)
    }

    /// Appends a batch durably and applies it; returns the durable sequence to ack.
    /// Duplicates (at or below the durable sequence) are ignored; a gap is refused.
    public func apply(_ batch: Ferry_V1_ReplicationBatch, attachments: [ByteBuffer] = []) async throws -> UInt64 {
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<UInt64, any Error>) in
            Task { await self.submit(batch, attachments: attachments) { c.resume(with: $0) } }
        }
    }

    /// A batch waiting to be made durable.
    private struct Queued {
        var epoch: UInt64
        var records: [IncomingRecord]
        var bytes: Int
        var done: @Sendable (Result<UInt64, any Error>) async -> Void
    }

    /// Batches received and not yet durable, and who waits on them (a report waits for the
    /// batches the agent sent before it, so it never changes the epoch under them).
    private var ingest = IngestQueue<Queued, CheckedContinuation<Void, Never>>(maxBytes: ReplicaStore.maxQueuedBytes)
    /// Bytes of batches received but not yet durable. Past it `submit` waits, so a peer that
    /// ignores its window cannot make the controller buffer without bound.
    static let maxQueuedBytes = 64 << 20
    /// Most bytes of data one group commit takes.
    static let commitBytes = 8 << 20

    /// Queues a batch (with its written bytes as attachments) to be appended durably and
    /// applied, and returns without waiting for the disk unless `maxQueuedBytes` are already
    /// queued. Batches queued meanwhile are committed together: one journal write and one
    /// fdatasync (group commit). `done` gets, in queue order, the durable sequence to ack or why
    /// the batch was refused (a gap or a malformed record; the batches after it fail too).
    public func submit(_ batch: Ferry_V1_ReplicationBatch, attachments: [ByteBuffer],
                       done: @escaping @Sendable (Result<UInt64, any Error>) async -> Void) async {
        while ingest.queuedBytes >= Self.maxQueuedBytes {
            await withCheckedContinuation { c in if !ingest.waitForRoom(c) { c.resume() } }
        }
        let records: [IncomingRecord]
        do {
            var bound = ingestSize
            records = try IncomingRecord.of(batch, attachments: attachments, volumeSize: &bound)
            ingestSize = bound
        } catch {
            streamError = (error as? FerryError)?.message ?? "\(error)"
            await done(.failure(error))
            return
        }
        // A record costs its bookkeeping too, so batches of zeroed ranges are bounded as well.
        let bytes = records.reduce(0) { $0 + 48 + ($1.data?.readableBytes ?? 0) }
        if ingest.submit(Queued(epoch: batch.epoch, records: records, bytes: bytes, done: done), bytes: bytes) {
            Task { await self.drain() }
        }
    }

    /// Room beyond a failed batch before replication resumes, so it does not stop again at once.
    static let spaceMargin: UInt64 = 64 << 20

    /// After a pause for space: whether the disk has the room now (the pause then ends and the
    /// agent is to resend from the durable sequence).
    public func spaceReturned() -> Bool {
        guard spacePause != nil else { return false }
        var fs = statvfs()
        guard statvfs(directory, &fs) == 0 else { return false }
        let free = UInt64(fs.f_bavail) &* UInt64(fs.f_frsize)
        guard free >= spaceWanted else { return false }
        spacePause = nil
        streamError = nil
        return true
    }

    /// Commits queued batches, a run of one epoch at a time, until none are left.
    private func drain() async {
        while true {
            // One epoch per commit, and a few MiB at most: the image is written from the same
            // buffers just after the journal, while they are still in the CPU's cache.
            let epoch = ingest.next?.epoch
            let run = ingest.take(maxBytes: Self.commitBytes) { $0.epoch == epoch }
            guard let epoch, !run.isEmpty else { return } // the queue is empty: the drainer stops
            await acquire(.commit)
            let results = await commit(run.map(\.item), epoch: epoch)
            release()
            for waiter in ingest.committed(count: run.count, bytes: run.reduce(0) { $0 + $1.bytes }) { waiter.resume() }
            for (entry, result) in zip(run, results) { await entry.item.done(result) }
        }
    }

    /// Appends the batches' new records to the journal with one write and one fdatasync, then
    /// applies them to the image. Returns each batch's outcome.
    private func commit(_ batches: [Queued], epoch: UInt64) async -> [Result<UInt64, any Error>] {
        // Paused for space: what was queued behind the batch that failed waits for the resend.
        if let pause = spacePause { return batches.map { _ in .failure(pause) } }
        do {
            if epoch != state.epoch { try await startEpoch(epoch) }
        } catch {
            streamError = (error as? FerryError)?.message ?? "\(error)"
            return batches.map { _ in .failure(error) }
        }
        // Duplicates are skipped; the first gap refuses its batch and every one after it.
        var fresh: [IncomingRecord] = []
        var accepted = 0
        var refusal: (any Error)?
        var expected = durable + 1
        for batch in batches {
            let new = batch.records.filter { $0.sequence >= expected }
            if let first = new.first, first.sequence != expected {
                refusal = FerryError(.protocolViolation, "replication gap: the replica holds \(expected - 1), the next record is \(first.sequence)")
                break
            }
            if let bad = zip(new, new.dropFirst()).first(where: { $1.sequence != $0.sequence + 1 }) {
                refusal = FerryError(.protocolViolation, "replication records out of order: expected \(bad.0.sequence + 1), got \(bad.1.sequence)")
                break
            }
            fresh.append(contentsOf: new)
            expected = fresh.last.map { $0.sequence + 1 } ?? expected
            accepted += 1
        }
        var results: [Result<UInt64, any Error>] = []
        do {
            if !fresh.isEmpty { try await append(fresh, epoch: epoch) }
            try await completeSyncIfDurable()
            results = Array(repeating: .success(durable), count: accepted)
            streamError = nil
        } catch {
            refusal = error
            accepted = 0
        }
        if let refusal {
            if let full = refusal as? FerryError, full.code == .noSpace {
                let needed = UInt64(fresh.reduce(0) { $0 + 64 + Int($1.length) }) + Self.spaceMargin
                spaceWanted = needed
                let pause = FerryError(.noSpace, "replication paused: the controller's disk is full (\(full.message)); \(needed >> 20) MiB free needed in \(directory), and replication resumes by itself when it is there")
                spacePause = pause
                results += Array(repeating: .failure(pause), count: batches.count - accepted)
                return results
            }
            streamError = (refusal as? FerryError)?.message ?? "\(refusal)"
            results += Array(repeating: .failure(refusal), count: batches.count - accepted)
        }
        return results
    }

    /// Writes consecutive new records to the active segment, makes them durable and applies them.
    private func append(_ fresh: [IncomingRecord], epoch: UInt64) async throws {
        // Each record's header, then its bytes. The headers are all encoded before any is
        // sliced off: a write into a buffer a slice still shares would copy it whole.
        var headers = ByteBuffer()
        headers.reserveCapacity(fresh.count * JournalRecord.headerSize)
        for r in fresh { JournalRecord.encodeHeader(r, epoch: epoch, into: &headers) }
        var pieces: [ByteBuffer] = []
        pieces.reserveCapacity(fresh.count * 2)
        for (i, r) in fresh.enumerated() {
            pieces.append(headers.getSlice(at: i * JournalRecord.headerSize, length: JournalRecord.headerSize)!)
            if let data = r.data { pieces.append(data) }
        }
        if active == nil || segments.last?.epoch != state.epoch || (segments.last?.bytes ?? 0) >= segmentBytes {
            try await rotate()
        }
        guard let (activeID, journal) = active, let at = segments.lastIndex(where: { $0.id == activeID }) else {
            throw FerryError(.internalError, "no active journal segment")
        }
        let image = self.image, base = self.base
        let knownLength = segments[at].bytes
        let length = pieces.reduce(0) { $0 + $1.readableBytes }
        let grownTo = fresh.last(where: \.resize)?.length
        try await pool.runIfActive { [pieces] in
            do {
                let failed = FileIO.writeAll(journal, pieces)
                if failed != 0 { throw FerryError.system(failed, "journal write failed") }
                guard fdatasync(journal) == 0 else { throw FerryError.system(errno, "journal fdatasync failed") }
                // Only records durable in the journal reach the image: after a crash the image
                // is rebuilt by replaying the journal from the checkpoint, which must find no
                // later write already there.
                for r in fresh { try JournalRecord.apply(r, to: image) }
                // A point past the resize reads the new bytes from the base until the journal folds.
                if let grownTo { try JournalRecord.grow(base, to: grownTo) }
            } catch {
                // Not acked: take the records back out, or the agent's resend would follow
                // them and the journal would hold the sequences twice.
                ftruncate(journal, off_t(knownLength))
                fdatasync(journal)
                throw error
            }
        }
        let newest = fresh.reduce(Int64(0)) { max($0, $1.captured) }
        guard let i = segments.firstIndex(where: { $0.id == activeID }) else { throw FerryError(.internalError, "journal segment \(activeID) vanished") }
        segments[i].bytes += Int64(length)
        if segments[i].first == 0 { segments[i].first = fresh.first!.sequence }
        segments[i].last = fresh.last!.sequence
        segments[i].newest = max(segments[i].newest, newest)
        if oldestCapture[activeID] == nil { oldestCapture[activeID] = fresh.first!.captured }
        appendedSinceCheckpoint += Int64(length)
        durable = fresh.last!.sequence
        if let grownTo, grownTo > size {
            // Recorded before the ack: a restart finds the sizes here (and in the journal).
            for r in fresh where r.resize && r.length > size {
                state.sizes.append(SizeChange(position: ReplicaPosition(epoch: epoch, sequence: r.sequence), size: r.length, previous: size))
                size = r.length
            }
            try await saveState()
            await onGrow?(size)
        }
        wakeAppendWaiters()
        let dataBytes = fresh.reduce(UInt64(0)) { $0 + UInt64($1.data?.readableBytes ?? 0) }
        bytesApplied += dataBytes
        throughput.add(dataBytes)
        if appendedSinceCheckpoint > Self.checkpointBytes { try await checkpoint() }
    }

    /// Seals the active segment (if any) and starts the next one for the current epoch.
    private func rotate() async throws {
        try await seal()
        let id = (segments.last?.id ?? state.foldedThrough) + 1
        let segment = JournalSegment(id: id, epoch: state.epoch)
        let journalDirectory = self.journalDirectory, segmentBytes = self.segmentBytes
        let fd = try await pool.runIfActive {
            let fd = open(segment.path(in: journalDirectory), O_RDWR | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw FerryError.system(errno, "cannot create journal segment \(segment.path(in: journalDirectory))") }
            // Allocating the segment's blocks in one call is cheaper than one append at a time;
            // where the file system cannot, appends allocate as they go.
            _ = ferry_reserve(fd, off_t(segmentBytes))
            let dir = open(journalDirectory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            if dir >= 0 { fsync(dir); close(dir) }
            return fd
        }
        active = (id, fd)
        segments.append(segment)
    }

    /// Closes the active segment and records its range beside it.
    /// The segment's I/O (truncate, close, its meta file made durable) runs on the pool; it
    /// stops being the active one at once, so a commit meanwhile rotates to a new one.
    private func seal() async throws {
        guard let (id, fd) = active else { return }
        active = nil
        let segment = segments.last.flatMap { $0.id == id ? $0 : nil }
        let segmentBytes = self.segmentBytes, journalDirectory = self.journalDirectory
        try await pool.runIfActive {
            // Give back what was reserved past the last record (a segment sealed early: a restart,
            // a new epoch, an idle segment folded). Truncating to the current size frees blocks
            // reserved past the end on ext4, XFS and tmpfs; punching a hole there does not on ext4.
            if let segment, segment.bytes < segmentBytes { _ = ftruncate(fd, off_t(segment.bytes)) }
            close(fd)
            if let segment { try Self.writeMeta(segment, in: journalDirectory) }
        }
    }

    private static func writeMeta(_ segment: JournalSegment, in directory: String) throws {
        let data = try JSONEncoder().encode(segment)
        try PEMFiles.writePublic(String(decoding: data, as: UTF8.self), to: segment.metaPath(in: directory))
    }

    /// Folds into the base image every sealed segment whose newest record is older than the
    /// retention window, or the oldest ones while the journal is over its size cap; an active
    /// segment past the window is sealed first. Returns the segments folded.
    ///
    /// A pinned position (`pin`) keeps the segments holding records after it, unless the
    /// journal is over its size cap (the cap wins: points before `basePosition` are gone).
    /// While a point image is open nothing is folded (it reads the base image): returns 0.
    /// With `capOnly`, only what the size cap forces out is folded.
    @discardableResult
    public func fold(now: Date = Date(), capOnly: Bool = false) async throws -> Int {
        guard leases.open == 0, coordination.startFold() else { return 0 }
        defer { for waiter in coordination.finishFold() { waiter.resume() } }
        let horizon = Int64(now.timeIntervalSince1970 * 1e9) - Int64(retention.components.seconds) * 1_000_000_000
            - retention.components.attoseconds / 1_000_000_000
        if state.corruption?.resynced == true || state.rebasing { return try await rebase() }
        var folded = 0
        // An image opened meanwhile (the actor is reentrant) stops the fold between segments.
        while let oldest = segments.first, leases.open == 0 {
            // A damaged segment never folds (nor anything after it) until a resync repairs the replica.
            if let damage = state.corruption, oldest.id >= damage.segment { break }
            let needed = ([pinned] + sinkPins.values.map(Optional.some)).contains { pin in
                // Unknown order (cannot happen for a pin taken from this replica): keep it.
                pin.map { compare(ReplicaPosition(epoch: oldest.epoch, sequence: oldest.last), $0).map { $0 == .orderedDescending } ?? true } ?? false
            }
            let expired = oldest.newest <= horizon && !needed && !capOnly
            let overCap = journalBytes > journalLimit
            let interrupted = state.folding == oldest.id
            guard expired || overCap || interrupted else { break }
            if active?.id == oldest.id {
                // Only an idle active segment is sealed here (no writer holds the journal's
                // end); a busy one rotates on its own.
                guard expired || segments.count == 1, coordination.writer == nil else { break }
                try await seal()
            }
            if oldest.epoch == state.epoch, oldest.last > state.checkpointed {
                // Its records must be durable in the latest image before the journal lets
                // them go, or a crash could lose them there.
                try await checkpoint()
            }
            let path = oldest.path(in: journalDirectory)
            let base = self.base, size = self.size
            // Recorded first: a crash or an error part way leaves base.img ahead of
            // baseThrough, and images must not be served from it until the fold is finished.
            state.folding = oldest.id
            try await saveState()
            let recorded = Int(oldest.bytes)
            // Every record's CRC is checked before the first is applied: a damaged segment
            // leaves the base image as it was (and is kept), never folded up to the damage.
            let damagedAt = try await pool.runIfActive { () throws -> Int? in
                let damagedAt = try JournalRecord.withSegment(path) { bytes -> Int? in
                    let valid = JournalRecord.scan(bytes, size: size) { _ in }
                    guard valid == bytes.count, bytes.count >= recorded else { return valid }
                    try JournalRecord.applyAll(bytes, size: size, to: base)
                    return nil
                }
                guard damagedAt != nil || fdatasync(base) == 0 else { throw FerryError(.io, "base image fdatasync failed: \(String(cString: strerror(errno)))") }
                return damagedAt
            }
            if let damagedAt {
                let damage = JournalCorruption.of(segment: oldest.id, offset: damagedAt, path: path, found: "while folding it into the base image")
                state.folding = nil
                state.corruption = damage
                state.resyncNeeded = true
                try await saveState()
                throw FerryError(.io, damage.message)
            }
            // The fold is durable: record it, then the segment may go.
            state.foldedThrough = oldest.id
            state.baseAsOf = max(state.baseAsOf, oldest.newest)
            if oldest.last > 0 { state.baseThrough = ReplicaPosition(epoch: oldest.epoch, sequence: oldest.last) }
            state.folding = nil
            try await saveState()
            unlink(path)
            unlink(oldest.metaPath(in: journalDirectory))
            segments.removeAll { $0.id == oldest.id }
            checkpoints.folded(through: oldest.id)
            oldestCapture[oldest.id] = nil
            folded += 1
        }
        return folded
    }

    /// Repairs a damaged journal once a full resync has made the latest image match the source
    /// again: the base image becomes a copy of it and every journal segment goes, the damaged
    /// history with it (points before now are gone; the damage made them unreadable in part).
    /// Batches wait meanwhile, so the copy is the image at one position. Returns the segments
    /// dropped.
    private func rebase() async throws -> Int {
        await acquire(.rebase)
        defer { release() }
        // No batch is applying: batches commit under the same lock.
        try await seal()
        try await checkpoint()
        // Recorded first: a crash part way leaves base.img neither the old base nor the new
        // one, and no image may be served from it until a rebase is finished.
        state.rebasing = true
        try await saveState()
        let image = self.image, base = self.base, size = self.size
        try await pool.runIfActive { try Self.copy(image, to: base, size: size) }
        let dropped = segments
        state.baseThrough = ReplicaPosition(epoch: state.epoch, sequence: durable)
        state.baseAsOf = max(state.baseAsOf, dropped.map(\.newest).max() ?? 0)
        state.foldedThrough = max(state.foldedThrough, dropped.last?.id ?? 0)
        state.folding = nil
        state.corruption = nil
        state.rebasing = false
        try await saveState()
        for segment in dropped {
            unlink(segment.path(in: journalDirectory))
            unlink(segment.metaPath(in: journalDirectory))
        }
        segments = []
        checkpoints.removeAll()
        oldestCapture = [:]
        return dropped.count
    }

    /// Copies a whole image file to another, durably; all-zero MiB chunks become holes.
    private static func copy(_ from: Int32, to: Int32, size: UInt64) throws {
        let chunk = 1 << 20
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { buffer.deallocate() }
        var at: UInt64 = 0
        while at < size {
            let n = Int(min(UInt64(chunk), size - at))
            let view = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n])
            try PointImage.readFully(from, into: view, at: at, what: "the replica image")
            if view.allSatisfy({ $0 == 0 }) {
                if ferry_punch_hole(to, off_t(at), off_t(n)) != 0 {
                    throw FerryError(.io, "cannot zero a base image range: \(String(cString: strerror(errno)))")
                }
            } else {
                let failed = FileIO.writeAll(to, UnsafeRawBufferPointer(view), at: at)
                if failed != 0 { throw FerryError(.io, "base image write failed: \(String(cString: strerror(failed)))") }
            }
            at += UInt64(n)
        }
        guard fdatasync(to) == 0 else { throw FerryError(.io, "base image fdatasync failed: \(String(cString: strerror(errno)))") }
    }

    /// Whether to ask the agent for a full resync now: the journal is damaged, no full
    /// comparison has covered it yet, the agent's session reports, and none was asked of it.
    public var repairResyncDue: Bool {
        guard let damage = state.corruption, !damage.resynced, !repairRequested, let report else { return false }
        return !(report.sync.kind == .full && report.sync.pendingExtents > 0)
    }

    /// The agent's current session was asked for a full resync of the damaged replica.
    public func noteRepairResyncRequested() {
        repairRequested = true
    }

    // MARK: Positions and point-in-time images

    /// Everything received: the current epoch through its last durable sequence.
    public var latestPosition: ReplicaPosition { ReplicaPosition(epoch: state.epoch, sequence: durable) }

    /// The last record folded into the base image; nil while nothing is folded. No image can
    /// be opened before it.
    public var basePosition: ReplicaPosition? { state.baseThrough }

    /// Open point images (each holds off folding).
    public var openImages: Int { leases.open }

    /// A position's place in the journal: (the epoch's start order, sequence); epoch 0 (nothing
    /// received yet) comes before everything. Nil for an epoch this replica never had.
    private func ordinal(_ p: ReplicaPosition) -> (Int, UInt64)? {
        if p.epoch == 0 { return (-1, p.sequence) }
        guard let i = state.epochs.firstIndex(of: p.epoch) else { return nil }
        return (i, p.sequence)
    }

    /// Orders two positions by the journal (epochs are not ordered by value); nil when either
    /// names an epoch this replica never had.
    public func compare(_ a: ReplicaPosition, _ b: ReplicaPosition) -> ComparisonResult? {
        guard let x = ordinal(a), let y = ordinal(b) else { return nil }
        return x < y ? .orderedAscending : x == y ? .orderedSame : .orderedDescending
    }

    /// Sets the oldest position a retained recovery point needs (nil: none): folding keeps
    /// every segment holding a record after it, unless the journal is over its size cap.
    /// Kept in memory only: the catalogue pins again when the controller starts, before it
    /// lets the replica fold.
    public func pin(_ oldest: ReplicaPosition?) {
        pinned = oldest
    }

    /// Where each sink following this replica stands (reprotect of a failover that landed):
    /// folding keeps the records after it, as for a point's pin (and as that, it gives way when
    /// the journal is over its cap; the sink then gets a pass by block hashes again).
    private var sinkPins: [String: ReplicaPosition] = [:]
    /// Sink streams waiting for a record past what they read.
    private var appendWaiters: [UInt64: CheckedContinuation<Void, Never>] = [:]
    private var nextWaiter: UInt64 = 0

    public func pinForSink(_ sink: String, at position: ReplicaPosition?) {
        sinkPins[sink] = position
    }

    /// The records after `position`, in journal order, up to about `maxBytes` of data or
    /// `maxCount` records; empty when the replica holds nothing newer. Throws when the replica
    /// has no point at `position` (never had it, or folded past it: the sink needs a pass by
    /// block hashes).
    public func records(after position: ReplicaPosition, maxBytes: Int, maxCount: Int) async throws -> [JournalEntry] {
        leases.acquire()
        defer { leases.release() }
        // The lease keeps a new fold from starting; one running stops after its segment.
        await waitForFold()
        let from = try check(position)
        var sources: [JournalReader.Source] = []
        for segment in segments where segment.bytes > 0 {
            guard let at = ordinal(ReplicaPosition(epoch: segment.epoch, sequence: segment.last)) else { continue }
            // Wholly at or before the position: applied already.
            if at.0 < from.0 || (at.0 == from.0 && segment.last <= position.sequence) { continue }
            sources.append(JournalReader.Source(path: segment.path(in: journalDirectory), epoch: segment.epoch, bytes: Int(segment.bytes),
                                                skipThrough: at.0 == from.0 ? position.sequence : nil))
        }
        guard !sources.isEmpty else { return [] }
        let size = self.size, reading = sources
        return try await pool.runIfActive { try JournalReader.read(reading, size: size, maxBytes: maxBytes, maxCount: maxCount) }
    }

    /// Returns once the replica holds a record past `position` (at once if it does), or the
    /// calling task is cancelled.
    public func waitForAppend(beyond position: ReplicaPosition) async {
        guard latestPosition == position else { return }
        let id = nextWaiter
        nextWaiter += 1
        await withTaskCancellationHandler {
            await withCheckedContinuation { c in
                if Task.isCancelled { c.resume() } else { appendWaiters[id] = c }
            }
        } onCancel: {
            Task { await self.wake(id) }
        }
    }

    private func wake(_ id: UInt64) {
        appendWaiters.removeValue(forKey: id)?.resume()
    }

    private func wakeAppendWaiters() {
        let waiters = appendWaiters
        appendWaiters = [:]
        for w in waiters.values { w.resume() }
    }

    /// Opens the volume as it was at `position`, read in place from the base image and the
    /// journal (nothing is copied; the cost follows the volume's written extents and the
    /// journal's records after the newest checkpoint before the point, not the volume's size
    /// nor the whole journal). With `overlayDirectory` the image takes writes into a copy-on-write overlay
    /// kept there (reopened if the directory holds one for the same position); the point,
    /// the journal and the base are never written. Folding waits until the image is closed.
    public func openImage(at position: ReplicaPosition, overlayDirectory: String? = nil) async throws -> PointImage {
        // The lease first: a fold in progress stops after its current segment, and none starts.
        leases.acquire()
        var handedOver = false
        defer { if !handedOver { leases.release() } }
        await waitForFold()
        let sources = try pointSources(position)
        // The newest sealed segment wholly in the point: the index can start from a checkpoint
        // at or before it, and leave one at its end.
        let activeID = active?.id
        let whole = sources.last { source in
            source.segment != activeID && source.bytes > 0
                && source.through.map { through in segments.first { $0.id == source.segment }.map { $0.last <= through } ?? false } ?? true
        }?.segment
        let bytes = Dictionary(uniqueKeysWithValues: sources.map { ($0.segment, $0.bytes) })
        let checkpoint = whole.flatMap { checkpoints.best(atOrBefore: $0) { bytes[$0] } }
        let checkpointAt = whole.flatMap { $0 > (checkpoint?.segment ?? 0) ? $0 : nil }
        // The point's own size: a resize after it does not change it.
        let size = self.size(at: position), basePath = self.basePath, leases = self.leases
        // A read finding a damaged record marks the replica (the image's reads run on threads
        // of their own, so the note goes to the actor in a task).
        let onDamage: @Sendable (UInt64, Int, String) -> Void = { [weak self] segment, offset, path in
            Task { await self?.noteDamage(segment: segment, offset: offset, path: path) }
        }
        let image = try await pool.runIfActive {
            try PointImage(size: size, position: position, basePath: basePath, sources: sources, from: checkpoint,
                           checkpointAt: checkpointAt, overlayDirectory: overlayDirectory, leases: leases, onDamage: onDamage)
        }
        handedOver = true // the image gives the lease back when closed
        // Nothing folded meanwhile (the lease): the checkpoint still describes the journal.
        if let made = image.takeCheckpoint() { checkpoints.add(made) }
        return image
    }

    /// Indexes the journal up to its newest sealed segment, if no checkpoint is there yet, so
    /// the next image (a failover's, say) walks only what came after it. Run in the background.
    public func refreshCheckpoint() async throws {
        guard state.corruption == nil, !state.rebasing, state.folding == nil,
              let last = segments.last(where: { $0.id != active?.id && $0.bytes > 0 && $0.last > 0 }),
              last.id > (checkpoints.newest ?? 0) else { return }
        try await openImage(at: ReplicaPosition(epoch: last.epoch, sequence: last.last)).close()
    }

    /// The segments the kept checkpoints end with, oldest first (tests).
    var checkpointSegments: [UInt64] { checkpoints.all.map(\.segment) }

    /// A damaged record found by a point image's read: the replica needs a resync.
    private func noteDamage(segment: UInt64, offset: Int, path: String) async {
        guard state.corruption == nil, segments.contains(where: { $0.id == segment }) else { return }
        state.corruption = .of(segment: segment, offset: offset, path: path, found: "reading a point image")
        state.resyncNeeded = true
        try? await saveState()
    }

    /// Whether the replica holds everything up to `position` (received, not folded away).
    public func holds(_ position: ReplicaPosition) -> Bool {
        (try? check(position)) != nil
    }

    /// Why there is no image at `position`, if there is none; its place in the journal otherwise.
    @discardableResult
    private func check(_ position: ReplicaPosition) throws -> (Int, UInt64) {
        if state.rebasing {
            throw FerryError(.unavailable, "the replica is rebuilding its base image after a resync repaired its damaged journal; try again in a few seconds")
        }
        if let segment = state.folding {
            throw FerryError(.unavailable, "the replica is finishing an interrupted fold of journal segment \(JournalSegment.name(segment)) into its base image; try again in a few seconds")
        }
        guard let target = ordinal(position) else {
            throw FerryError(.notFound, "no point at \(position): this replica never received that epoch (the volume's agent restarts in a new one)")
        }
        let latest = latestPosition
        if let newest = ordinal(latest), target > newest {
            throw FerryError(.notFound, "no point at \(position): not received yet (the replica holds through \(latest))")
        }
        if let base = basePosition, let folded = ordinal(base), target < folded {
            throw FerryError(.notFound, "no point at \(position): folded into the base: the point was pruned (the oldest point available is \(base))")
        }
        if position.epoch != 0, position.epoch != state.epoch {
            // An earlier epoch ended where the agent restarted: sequences past it never existed.
            var last = segments.filter { $0.epoch == position.epoch }.map(\.last).max() ?? 0
            if let base = basePosition, base.epoch == position.epoch { last = max(last, base.sequence) }
            if position.sequence > last {
                throw FerryError(.notFound, "no point at \(position): that epoch ended at sequence \(last)")
            }
        }
        return target
    }

    /// The journal segments (and how far into each) that make up `position` over the base,
    /// or why there is no such point.
    private func pointSources(_ position: ReplicaPosition) throws -> [PointSource] {
        let target = try check(position)
        var sources: [PointSource] = []
        for segment in segments where segment.bytes > 0 {
            guard let at = ordinal(ReplicaPosition(epoch: segment.epoch, sequence: segment.first)) else {
                throw FerryError(.internalError, "journal segment \(JournalSegment.name(segment.id)) is of an epoch the replica has no order for")
            }
            if at.0 > target.0 || (at.0 == target.0 && segment.first > position.sequence) { break }
            sources.append(PointSource(path: segment.path(in: journalDirectory), segment: segment.id, bytes: Int(segment.bytes),
                                       through: at.0 == target.0 ? position.sequence : nil))
        }
        return sources
    }

    /// The agent's periodic report. A sync it reports finished (nothing pending in this epoch)
    /// completes once everything it captured up to then is durable here.
    public func note(_ report: Ferry_V1_VolumeReport) async throws {
        let through = ingest.submitted
        await withCheckedContinuation { c in if !ingest.waitForFinished(through: through, c) { c.resume() } }
        await acquire(.report)
        defer { release() }
        self.report = report
        let now = Date()
        reportedAt = now
        lagHistory.record(lagSeconds: report.oldestPendingUnixNanos > 0 ? now.timeIntervalSince1970 - Double(report.oldestPendingUnixNanos) / 1e9 : 0,
                          lagBytes: report.pendingBytes, now: now)
        if report.epoch != 0, report.epoch != state.epoch {
            // The agent moved to a new epoch (a restart, an overflow) before sending anything
            // in it: what it had not got acked may be missing here until it resyncs.
            try await startEpoch(report.epoch)
        }
        if report.sync.pendingExtents == 0, !report.overflowed {
            if completion == nil, state.resyncNeeded || !state.initialSynced {
                let s = report.sync
                completion = (report.lastSequence, s.kind == .full || s.kind == .scan || s.fullCompleted)
            }
        } else {
            completion = nil
        }
        try await completeSyncIfDurable()
    }

    private func completeSyncIfDurable() async throws {
        guard let c = completion, durable >= c.through, state.epoch != 0 || c.through == 0 else { return }
        completion = nil
        let wasInitial = !state.initialSynced
        guard state.resyncNeeded || (wasInitial && c.full) else { return }
        if let damage = state.corruption, !damage.resynced {
            // Only a comparison of the whole volume covers writes the damage may hide.
            guard c.full else { return }
            state.corruption?.resynced = true
        }
        state.resyncNeeded = false
        if c.full { state.initialSynced = true }
        state.syncsCompleted += 1
        try await saveState()
    }

    /// The agent's session ended: its last report no longer describes anything live.
    public func sessionEnded() {
        report = nil
        completion = nil
        repairRequested = false
    }

    /// Applied bytes per second over the last seconds.
    public var throughputBytesPerSecond: Double { throughput.rate() }

    /// Indices of the blocks whose hashes differ from the replica's (see `BlockHashing`).
    public func differing(_ request: Ferry_V1_ResyncHashes) async throws -> [UInt32] {
        let block = request.blockBytes
        guard BlockHashing.blockBytesRange.contains(block), block & (block - 1) == 0 else {
            throw FerryError(.badRequest, "resync block size \(block) is not a power of two between 4 KiB and 1 MiB")
        }
        guard !request.hashes.isEmpty, request.hashes.count <= BlockHashing.maxBlocks else {
            throw FerryError(.badRequest, "a resync request carries 1 to \(BlockHashing.maxBlocks) hashes, not \(request.hashes.count)")
        }
        // A resize the agent streamed may still be queued behind the hashes' range: the size
        // received so far bounds it, and blocks past the durable size read as zeroes here.
        let bound = max(size, ingestSize)
        guard request.offset % UInt64(block) == 0, request.offset < bound,
              request.offset + UInt64(request.hashes.count - 1) * UInt64(block) < bound else {
            throw FerryError(.badRequest, "resync range at \(request.offset) lies outside the \(bound)-byte volume")
        }
        guard request.hashes.allSatisfy({ $0.isEmpty || $0.count == BlockHashing.hashBytes }) else {
            throw FerryError(.badRequest, "resync hashes must be empty or \(BlockHashing.hashBytes) bytes")
        }
        let image = self.image, size = self.size
        let ours = try await pool.runIfActive { () throws -> [Data] in
            guard request.offset < size else { return [] }
            return try BlockHashing.hashes(fd: image, size: size, offset: request.offset, blockBytes: Int(block), count: request.hashes.count).hashes
        }
        // Past the durable size the replica holds zeroes (the empty hash).
        let padded = ours + Array(repeating: Data(), count: max(0, request.hashes.count - ours.count))
        return zip(request.hashes, padded).enumerated().compactMap { i, pair in pair.0 == pair.1 ? nil : UInt32(i) }
    }

    /// A new capture epoch: the agent restarted and numbers from 1 again. If the replica held
    /// anything, writes made between the last ack and the restart may be missing.
    private func startEpoch(_ epoch: UInt64) async throws {
        try await checkpoint()
        state.resyncNeeded = state.resyncNeeded || state.epoch != 0
        state.epoch = epoch
        // Epochs are random 64-bit numbers: one never comes back.
        if !state.epochs.contains(epoch) { state.epochs.append(epoch) }
        state.checkpointed = 0
        durable = 0
        // A completion reported in the old epoch names sequences that mean nothing now.
        completion = nil
        try await saveState()
        wakeAppendWaiters()
    }

    /// Makes the image durable and records how far it goes: a restart replays only what
    /// follows. The journal itself stays, for the retention window.
    private func checkpoint() async throws {
        // What is applied now is what the sync covers: records applied while it runs (the
        // actor is reentrant here) wait for the next checkpoint.
        let image = self.image, epoch = state.epoch, target = durable
        try await pool.runIfActive {
            guard fdatasync(image) == 0 else { throw FerryError(.io, "replica image fdatasync failed: \(String(cString: strerror(errno)))") }
        }
        guard state.epoch == epoch else { return }
        state.checkpointed = max(state.checkpointed, target)
        appendedSinceCheckpoint = 0
        try await saveState()
    }

    /// Encoded here, written and made durable on the pool (the file's versions keep a slower
    /// earlier write from landing over a later one).
    private func saveState() async throws {
        stateVersion += 1
        let data = try JSONEncoder().encode(state), version = stateVersion, file = stateFile
        try await pool.runIfActive { try file.write(data, version: version) }
    }

    /// The state of a replica built from a failover point: synced (the recovered volume starts
    /// as that point), nothing journalled yet.
    static func writeSeededState(in directory: String, size: UInt64) throws {
        var state = State()
        state.initialSynced = true
        state.initialSize = size
        try save(state, in: directory)
    }

    /// Writes a replica's state file (a replica being made outside a store).
    static func writeState(_ state: State, in directory: String) throws { try save(state, in: directory) }

    private static func save(_ state: State, in directory: String) throws {
        let data = try JSONEncoder().encode(state)
        try PEMFiles.writePublic(String(decoding: data, as: UTF8.self), to: directory + "/state.json")
    }

}

/// A smoothed rate: bytes per one-second bucket over the last ten buckets.
struct Throughput {
    private var buckets = [UInt64](repeating: 0, count: 10)
    private var current = Int64(0)

    private static func second() -> Int64 { Int64(Date().timeIntervalSince1970) }

    mutating func add(_ bytes: UInt64) {
        advance()
        buckets[Int(current % 10)] += bytes
    }

    private mutating func advance() {
        let now = Self.second()
        if now - current >= 10 {
            buckets = [UInt64](repeating: 0, count: 10)
        } else if now > current {
            for s in (current + 1)...now { buckets[Int(s % 10)] = 0 }
        }
        current = max(current, now)
    }

    func rate() -> Double {
        var copy = self
        copy.advance()
        // The current second is partial: average the nine whole ones before it.
        let whole = (1...9).reduce(UInt64(0)) { $0 + copy.buckets[Int((copy.current - Int64($1) + 10) % 10)] }
        return Double(whole) / 9
    }
}

/// Bounds on replication records.
enum NBDLimit {
    /// The agent's NBD export takes at most 32 MiB per request, so no record is larger.
    static let maxRecord = 32 << 20
}
