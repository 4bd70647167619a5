import FerryNBD
import FerryWire
import Foundation
import NIOCore
import Synchronization

/// Which extents of a volume may hold writes the controller's replica lacks, kept durably on
/// the agent's disk: before the first write into an extent, its mark reaches the disk; the mark
/// clears once the controller has acked every write into it. After a crash, a change-log
/// overflow or a resync request, marked extents are *pending*: they are compared with the replica
/// by block hashes and only what differs moves.
///
/// The file is a 32-byte header (magic, flags, extent size, extent count) and one bit per extent.
public final class ActivityLog: Sendable {
    public static let defaultExtentBytes: UInt64 = 4 << 20
    static let magic: UInt32 = 0x4641_4C31 // "FAL1"
    static let headerBytes = 32
    /// Header flag: a full comparison (initial sync or resync on demand) is in progress.
    static let flagFull: UInt32 = 1

    struct Extent {
        var marked = false
        var pending = false
        /// Sequence of the last write into the extent in the current epoch.
        var lastSequence: UInt64 = 0
        /// Writes marked but not yet recorded: the mark must not clear under them.
        var inFlight: Int32 = 0
        /// Bumped whenever the extent becomes pending (again): a comparison that started
        /// before may not release it.
        var generation: UInt32 = 0
        /// The bitmap generation that set the mark, to know whether it is on disk yet.
        var markedAt: UInt64 = 0
    }

    struct State {
        var extents: [Extent]
        var bitmap: [UInt8]
        var full: Bool
        var markedCount = 0
        var pendingCount = 0
        /// The change-log epoch the sequences belong to.
        var epoch: UInt64 = 0
        /// Bumped at every change of the bitmap or the full flag; `persisted` is the newest
        /// generation known to be on disk.
        var changed: UInt64 = 0
        var persisted: UInt64 = 0
        /// The sync worker, while it waits for an extent to become pending.
        var pendingWaiter: CheckedContinuation<Void, Never>?

        /// Wakes the waiting sync worker if anything is pending.
        mutating func wakeIfPending() {
            guard pendingCount > 0, let waiter = pendingWaiter else { return }
            pendingWaiter = nil
            waiter.resume()
        }
    }

    public let path: String
    public let extentBytes: UInt64
    /// Extents of the volume: it grows with the volume (`grow`).
    public var extentCount: Int { state.withLock { $0.extents.count } }
    /// Whether the file existed when opened: without it nothing is known of earlier runs.
    public let existed: Bool
    private let fd: Int32
    private let state: Mutex<State>
    /// Held while writing the file, never together with `state` waiting on disk: writers into
    /// marked extents never wait for another extent's fdatasync.
    private let disk = Mutex<Void>(())

    /// Opens the activity log of a volume of `volumeBytes`, or creates an empty one. Marks found
    /// on disk (an earlier run did not see them acked) become pending.
    public init(path: String, volumeBytes: UInt64, extentBytes: UInt64 = ActivityLog.defaultExtentBytes) throws {
        self.path = path
        self.extentBytes = extentBytes
        let extentCount = Int((volumeBytes + extentBytes - 1) / extentBytes)
        let bitmapBytes = (extentCount + 7) / 8
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw FerryError(.io, "cannot open activity log \(path): \(String(cString: strerror(errno)))") }
        self.fd = fd
        var header = [UInt8](repeating: 0, count: Self.headerBytes)
        var bitmap = [UInt8](repeating: 0, count: bitmapBytes)
        let readHeader = header.withUnsafeMutableBytes { pread(fd, $0.baseAddress, Self.headerBytes, 0) }
        var full = false
        var existed = false
        if readHeader == Self.headerBytes {
            let h = ByteBuffer(bytes: header)
            let saved = h.getInteger(at: 16, as: UInt64.self) ?? 0
            if h.getInteger(at: 0, as: UInt32.self) == Self.magic, h.getInteger(at: 8, as: UInt64.self) == extentBytes,
               saved <= UInt64(extentCount), saved > 0 || extentCount == 0 {
                // The same volume, or one grown since (online resize, or a crash between the
                // growth and this file's update): the saved extents keep their marks, the new
                // ones start clear (they were past the end until the growth).
                let savedBytes = (Int(saved) + 7) / 8
                _ = bitmap.withUnsafeMutableBytes { pread(fd, $0.baseAddress, savedBytes, off_t(Self.headerBytes)) }
                if saved % 8 != 0, savedBytes > 0 { bitmap[savedBytes - 1] &= UInt8((1 << (saved % 8)) - 1) }
                full = (h.getInteger(at: 4, as: UInt32.self) ?? 0) & Self.flagFull != 0
                existed = true
            } else {
                // Another geometry (a smaller volume, another extent size) or garbage: nothing
                // can be trusted, so everything is pending.
                bitmap = [UInt8](repeating: 0xFF, count: bitmapBytes)
                full = true
            }
        }
        self.existed = existed
        var extents = [Extent](repeating: Extent(), count: extentCount)
        var marked = 0
        for i in 0..<extentCount where bitmap[i / 8] & (1 << (i % 8)) != 0 {
            extents[i] = Extent(marked: true, pending: true)
            marked += 1
        }
        // Trailing bits past the last extent stay clear.
        if extentCount % 8 != 0, bitmapBytes > 0 { bitmap[bitmapBytes - 1] &= UInt8((1 << (extentCount % 8)) - 1) }
        state = Mutex(State(extents: extents, bitmap: bitmap, full: full, markedCount: marked, pendingCount: marked))
        guard Self.write(fd, full: full, extentBytes: extentBytes, extentCount: extentCount, bitmap: bitmap) else {
            throw FerryError(.io, "cannot write activity log \(path): \(String(cString: strerror(errno)))")
        }
    }

    deinit { close(fd) }

    /// Durably marks the extents `offset..<offset+length` touches, before a write into them is
    /// applied, and counts the write in flight there until `completed` (so the mark cannot clear
    /// in between). Returns at once when the marks are on disk already.
    public func mark(offset: UInt64, length: UInt64) throws {
        guard length > 0 else { return }
        let needed: UInt64 = state.withLock { s in
            var needed: UInt64 = 0
            for i in Self.extents(offset: offset, length: length, extentBytes: extentBytes, count: s.extents.count) {
                s.extents[i].inFlight += 1
                if !s.extents[i].marked {
                    if needed == 0 { s.changed += 1 }
                    s.extents[i].marked = true
                    s.extents[i].markedAt = s.changed
                    s.markedCount += 1
                    s.bitmap[i / 8] |= 1 << (i % 8)
                }
                needed = max(needed, s.extents[i].markedAt)
            }
            return needed > s.persisted ? needed : 0
        }
        if needed > 0 {
            do {
                try persist(through: needed)
            } catch {
                completed(offset: offset, length: length)
                throw error
            }
        }
    }

    /// The write counted by `mark` is recorded (or failed).
    public func completed(offset: UInt64, length: UInt64) {
        guard length > 0 else { return }
        state.withLock { s in
            for i in Self.extents(offset: offset, length: length, extentBytes: extentBytes, count: s.extents.count) { s.extents[i].inFlight -= 1 }
        }
    }

    /// The volume grows to `volumeBytes`: the new extents start clear (nothing was written
    /// there), and the file says the new geometry before anything is written past the old end.
    public func grow(volumeBytes: UInt64) throws {
        let count = Int((volumeBytes + extentBytes - 1) / extentBytes)
        let generation: UInt64? = state.withLock { s in
            guard count > s.extents.count else { return nil }
            s.extents.append(contentsOf: repeatElement(Extent(), count: count - s.extents.count))
            let bytes = (count + 7) / 8
            if bytes > s.bitmap.count { s.bitmap.append(contentsOf: repeatElement(0, count: bytes - s.bitmap.count)) }
            s.changed += 1
            return s.changed
        }
        if let generation { try persist(through: generation) }
    }

    /// Writes the bitmap if generation `through` is not on disk yet. Concurrent callers wait
    /// for the one writing, then find their generation written.
    private func persist(through generation: UInt64) throws {
        try disk.withLock { _ in
            let (snapshot, full, current, done, count) = state.withLock { s in (s.bitmap, s.full, s.changed, s.persisted >= generation, s.extents.count) }
            if done { return }
            guard Self.write(fd, full: full, extentBytes: extentBytes, extentCount: count, bitmap: snapshot) else {
                throw VolumeIOError(operation: "activity log update", errno: errno)
            }
            state.withLock { $0.persisted = max($0.persisted, current) }
        }
    }

    /// Records that the write with `sequence` went into these extents. With `lost` (the change
    /// log dropped it), the extents become pending: only a resync can bring them over.
    func noteWrite(offset: UInt64, length: UInt64, sequence: UInt64, lost: Bool) {
        guard length > 0 else { return }
        state.withLock { s in
            for i in Self.extents(offset: offset, length: length, extentBytes: extentBytes, count: s.extents.count) {
                s.extents[i].lastSequence = max(s.extents[i].lastSequence, sequence)
                if lost {
                    if !s.extents[i].pending { s.pendingCount += 1 }
                    s.extents[i].pending = true
                    s.extents[i].generation &+= 1
                    if !s.extents[i].marked {
                        // A capture (no write marked it): mark it, persisted by the next flush.
                        s.extents[i].marked = true
                        s.markedCount += 1
                        s.bitmap[i / 8] |= 1 << (i % 8)
                        s.changed += 1
                        s.extents[i].markedAt = s.changed
                    }
                }
            }
            s.wakeIfPending()
        }
    }

    /// Every marked extent becomes pending (the change log lost records of this epoch); a
    /// comparison of one already under way must start over.
    func markedBecomePending() {
        state.withLock { s in
            for i in s.extents.indices where s.extents[i].marked {
                if !s.extents[i].pending { s.pendingCount += 1 }
                s.extents[i].pending = true
                s.extents[i].generation &+= 1
            }
            s.wakeIfPending()
        }
    }

    /// Starts a full comparison: every extent is marked and pending, durably.
    public func markAllPending() throws {
        let generation: UInt64 = state.withLock { s in
            for i in s.extents.indices {
                s.extents[i].marked = true
                s.extents[i].pending = true
                s.extents[i].generation &+= 1
            }
            let extentCount = s.extents.count
            s.markedCount = extentCount
            s.pendingCount = extentCount
            s.full = true
            for i in 0..<s.bitmap.count { s.bitmap[i] = 0xFF }
            if extentCount % 8 != 0, !s.bitmap.isEmpty { s.bitmap[s.bitmap.count - 1] = UInt8((1 << (extentCount % 8)) - 1) }
            s.changed += 1
            for i in s.extents.indices { s.extents[i].markedAt = s.changed }
            s.wakeIfPending()
            return s.changed
        }
        try persist(through: generation)
    }

    /// Returns once an extent is pending (at once if one is), or the calling task is cancelled:
    /// the sync worker sleeps here between comparisons, woken by whatever makes one pending.
    func waitForPending() async {
        await withTaskCancellationHandler {
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                let ready = state.withLock { s -> Bool in
                    if s.pendingCount > 0 || Task.isCancelled { return true }
                    s.pendingWaiter?.resume()
                    s.pendingWaiter = c
                    return false
                }
                if ready { c.resume() }
            }
        } onCancel: {
            state.withLock { s in defer { s.pendingWaiter = nil }; return s.pendingWaiter }?.resume()
        }
    }

    /// The first pending extent at or after `from` (wrapping around), with its generation.
    func nextPending(from: Int) -> (index: Int, generation: UInt32)? {
        state.withLock { s in
            guard s.pendingCount > 0 else { return nil }
            let extentCount = s.extents.count
            for i in min(from, extentCount)..<extentCount where s.extents[i].pending { return (i, s.extents[i].generation) }
            for i in 0..<min(from, extentCount) where s.extents[i].pending { return (i, s.extents[i].generation) }
            return nil
        }
    }

    /// The extent was compared and what differed was captured through `sequence`: it clears
    /// like any written extent once that is acked; unless it became pending again meanwhile
    /// (`generation` moved on), then it stays pending for another comparison.
    func finishPending(_ index: Int, generation: UInt32, through sequence: UInt64) {
        state.withLock { s in
            guard s.extents[index].pending, s.extents[index].generation == generation else { return }
            s.extents[index].pending = false
            s.extents[index].lastSequence = max(s.extents[index].lastSequence, sequence)
            s.pendingCount -= 1
        }
    }

    /// Whether `clear` would clear anything (cheap; lets the caller skip syncing the volume).
    func hasClearable(ackedThrough acked: UInt64, epoch: UInt64) -> Bool {
        state.withLock { s in
            guard s.epoch == epoch else { return false }
            if s.full && s.pendingCount == 0 { return true }
            return s.extents.contains { $0.marked && !$0.pending && $0.inFlight == 0 && $0.lastSequence <= acked }
        }
    }

    /// Clears the marks of extents whose every write the controller holds (`acked` of the
    /// current epoch) and none is in flight, and the full-sync flag once nothing is pending.
    /// The caller has made the volume itself durable first: a mark may only go once the source
    /// bytes it covers are on disk.
    func clear(ackedThrough acked: UInt64, epoch: UInt64) throws {
        let generation: UInt64? = state.withLock { s in
            guard s.epoch == epoch else { return nil }
            var changed = false
            for i in s.extents.indices where s.extents[i].marked && !s.extents[i].pending && s.extents[i].inFlight == 0
                && s.extents[i].lastSequence <= acked {
                s.extents[i].marked = false
                s.extents[i].lastSequence = 0
                s.markedCount -= 1
                s.bitmap[i / 8] &= ~(1 << (i % 8))
                changed = true
            }
            if s.full, s.pendingCount == 0 {
                s.full = false
                changed = true
            }
            guard changed else { return s.changed > s.persisted ? s.changed : nil }
            s.changed += 1
            return s.changed
        }
        if let generation { try persist(through: generation) }
    }

    /// A new epoch started (a new run, or overflow recovery): sequences of the old one mean
    /// nothing now.
    func startEpoch(_ epoch: UInt64) {
        state.withLock { s in
            s.epoch = epoch
            for i in s.extents.indices { s.extents[i].lastSequence = 0 }
        }
    }

    public var markedCount: Int { state.withLock { $0.markedCount } }
    public var pendingCount: Int { state.withLock { $0.pendingCount } }
    /// A full comparison was started and has not finished (it survives restarts).
    public var fullInProgress: Bool { state.withLock { $0.full } }

    /// The extents `offset..<offset+length` touches (none past the last of `count`).
    static func extents(offset: UInt64, length: UInt64, extentBytes: UInt64, count: Int) -> Range<Int> {
        guard count > 0, length > 0 else { return 0..<0 }
        let first = Int(min(offset / extentBytes, UInt64(count)))
        let last = Int(min((offset + length - 1) / extentBytes, UInt64(count - 1)))
        return first..<max(first, last + 1)
    }

    static func header(full: Bool, extentBytes: UInt64, extentCount: Int) -> ByteBuffer {
        var h = ByteBuffer()
        h.writeMultipleIntegers(magic, full ? flagFull : UInt32(0), extentBytes, UInt64(extentCount), UInt64(0))
        return h
    }

    /// Header and bitmap in one write, then fdatasync. A bitmap is a few KiB even for a large
    /// volume (one bit per 4 MiB).
    static func write(_ fd: Int32, full: Bool, extentBytes: UInt64, extentCount: Int, bitmap: [UInt8]) -> Bool {
        var all = header(full: full, extentBytes: extentBytes, extentCount: extentCount)
        all.writeBytes(bitmap)
        return all.withUnsafeReadableBytes { FileIO.writeAll(fd, $0, at: 0) } == 0 && fdatasync(fd) == 0
    }
}
