import FerryWire
import Foundation
import NIOCore
import Synchronization

/// A volume's captured changes waiting for the controller's durable ack.
///
/// Held in memory up to `heldBytes`; past that, written data spills to a local file up to
/// `spillBytes`. Appends never block on the controller and never fail: past both caps the log
/// drops its records and marks itself overflowed, and the volume needs a resync (a workload is
/// never held up by a slow or absent controller). Acked records are trimmed.
public final class ChangeLog: ChangeRecorder {
    enum Entry {
        case memory(VolumeChange)
        /// A write whose bytes are in the spill file at `at`.
        case spilled(sequence: UInt64, offset: UInt64, length: Int, at: Int64, captured: Int64)

        var sequence: UInt64 {
            switch self {
            case .memory(let c): c.sequence
            case .spilled(let sequence, _, _, _, _): sequence
            }
        }
    }

    struct State {
        var epoch: UInt64
        var next: UInt64 = 1
        /// Held entries, oldest first. A trimmed entry leaves at once: an acked write's
        /// buffer must not outlive its ack (a lazily compacted array kept thousands of acked
        /// megabyte writes alive, most of the agent's resident memory).
        var entries = CircularBuffer<Entry>()
        var memoryUsed = 0
        var spillUsed: Int64 = 0
        /// Where the next spilled write goes. The spill file is a ring of `spillBytes`: live
        /// spilled data runs from the oldest held spilled entry's offset to here, wrapping at
        /// the cap, so the file never grows past it however long the log goes undrained.
        var spillEnd: Int64 = 0
        /// Position (from the oldest held entry) at or before the oldest held spilled entry.
        var firstSpilled = 0

        func entry(at position: Int) -> Entry { entries[entries.index(entries.startIndex, offsetBy: position)] }

        /// Position of the oldest held spilled entry, if any.
        mutating func oldestSpilled() -> Int? {
            while firstSpilled < entries.count {
                if case .spilled = entry(at: firstSpilled) { return firstSpilled }
                firstSpilled += 1
            }
            return nil
        }

        /// Where `length` bytes can be spilled without touching live spilled data, if anywhere.
        mutating func spillPosition(_ length: Int64, cap: Int64) -> Int64? {
            guard let oldest = oldestSpilled(), case .spilled(_, _, _, let tail, _) = entry(at: oldest) else {
                return length <= cap ? 0 : nil // nothing live: start over at the beginning
            }
            if spillEnd > tail {
                // Live data is [tail, spillEnd): append, or wrap to the free start.
                if spillEnd + length <= cap { return spillEnd }
                return length < tail ? 0 : nil
            }
            // Wrapped: live data is [tail, cap) and [0, spillEnd). Never let the two ends meet,
            // so "spillEnd == tail" always means "nothing wrapped".
            return spillEnd + length < tail ? spillEnd : nil
        }
        var overflowed = false
        /// The volume's size, once it was resized: every new epoch starts with a resize record
        /// of it, since the records that told the replica may be among those an epoch change
        /// drops (nil: never resized, nothing to announce).
        var announcedSize: UInt64?
        /// The highest sequence the controller has acked as durable.
        var acked: UInt64 = 0
        var waiter: CheckedContinuation<Void, Never>?
        /// The streamer, waiting with its window full for an ack through this sequence.
        var ackWaiter: (through: UInt64, continuation: CheckedContinuation<Void, Never>)?
        /// The sync worker, waiting for held memory to drop to this many bytes.
        var roomWaiter: (atMost: Int, continuation: CheckedContinuation<Void, Never>)?

        mutating func takeWaiter() -> CheckedContinuation<Void, Never>? {
            defer { waiter = nil }
            return waiter
        }

        /// Keep counting, stop keeping: the replica must be resynchronised, and every extent
        /// with a dropped write needs it. Returns the room waiter, now free to go.
        mutating func overflow(_ activity: ActivityLog?) -> CheckedContinuation<Void, Never>? {
            overflowed = true
            activity?.markedBecomePending()
            entries.removeAll()
            firstSpilled = 0
            memoryUsed = 0
            spillUsed = 0
            spillEnd = 0
            return takeRoomWaiter()
        }

        /// Starts an epoch (sequence 1, nothing held) with the resize record of a resized volume.
        mutating func announceSize(at captured: Int64) {
            guard let size = announcedSize, next == 1, entries.isEmpty else { return }
            let change = VolumeChange(sequence: 1, offset: 0, kind: .resize(size: size), captured: captured)
            entries.append(.memory(change))
            memoryUsed += ChangeLog.cost(change)
            next = 2
        }

        /// Takes the room waiter if there is room for it now.
        mutating func takeRoomWaiter() -> CheckedContinuation<Void, Never>? {
            guard let waiting = roomWaiter, memoryUsed <= waiting.atMost else { return nil }
            roomWaiter = nil
            return waiting.continuation
        }
        /// Each acked record's lag, from its capture here to its ack arriving (one clock).
        var writeLag = LagHistogram()
    }

    /// The volume's whole memory budget for written data: held entries plus the streamer's
    /// window, whose copies (encrypted, and read back from the spill file) are made outside the
    /// held entries. So this is the only large buffer of a volume, and it is bounded.
    public let memoryBytes: Int
    /// Most bytes the streamer keeps sent and not yet acked.
    public let windowBytes: Int
    /// What held entries may use: `memoryBytes` less room for two copies of the window.
    public let heldBytes: Int
    public let spillBytes: Int64
    /// The streamer's compression of this volume's written bytes.
    public let compression = CompressionCounters()
    /// Which extents may hold writes the controller lacks (nil: not tracked, as in tests).
    public let activity: ActivityLog?
    private let spill: Int32
    private let state: Mutex<State>
    private let appending = Mutex(())

    /// - Parameter spillPath: the file to spill to (truncated now); nil keeps everything in memory.
    /// - Parameter announceSize: the volume was resized (in this run or an earlier one): the
    ///   epoch starts with a resize record of this size.
    public init(memoryBytes: Int = 64 << 20, spillPath: String? = nil, spillBytes: Int64 = 1 << 30,
                epoch: UInt64 = UInt64.random(in: 1...UInt64.max), activity: ActivityLog? = nil, announceSize: UInt64? = nil) throws {
        self.memoryBytes = memoryBytes
        // 8 MiB in flight keeps a link of 1 GB/s busy at 8 ms of commit latency, or 100 Mbit/s at 600 ms.
        windowBytes = min(8 << 20, max(memoryBytes / 8, min(64 << 10, memoryBytes / 4)))
        heldBytes = memoryBytes - 2 * windowBytes
        self.activity = activity
        var initial = State(epoch: epoch)
        initial.announcedSize = announceSize
        initial.announceSize(at: Self.now())
        state = Mutex(initial)
        activity?.startEpoch(epoch)
        if let spillPath {
            spill = open(spillPath, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            guard spill >= 0 else { throw FerryError(.io, "cannot create change-log spill file \(spillPath): \(String(cString: strerror(errno)))") }
            self.spillBytes = spillBytes
        } else {
            spill = -1
            self.spillBytes = 0
        }
    }

    deinit { if spill >= 0 { close(spill) } }

    /// Identifies this run of the capture: sequences start at 1 in each epoch. A new epoch
    /// starts with each agent run and after an overflow.
    public var epoch: UInt64 { state.withLock { $0.epoch } }

    public func prepare(offset: UInt64, length: UInt64) throws {
        try activity?.mark(offset: offset, length: length)
    }

    public func completed(offset: UInt64, length: UInt64) {
        activity?.completed(offset: offset, length: length)
    }

    public func willGrow(to size: UInt64) throws {
        try activity?.grow(volumeBytes: size)
    }

    /// Appends a change; returns its sequence. A write past the memory budget goes to the
    /// spill file: its place is reserved under the state lock, the bytes are written outside it
    /// (so acks, reads and the streamer never wait on the disk), and the entry is added after.
    public func append(offset: UInt64, kind: VolumeChange.Kind) -> UInt64 {
        // One append at a time (the volume's mutation lock already orders them): a reserved
        // spill range is then always the newest, and its entry comes before the next append's.
        appending.withLock { _ in appendInOrder(offset: offset, kind: kind) }
    }

    private enum Placement {
        /// Held (or dropped by an overflow); who to wake.
        case placed(UInt64, waiter: CheckedContinuation<Void, Never>?, room: CheckedContinuation<Void, Never>?)
        /// To be written to the spill file at `at`, then added.
        case spill(UInt64, at: Int64, epoch: UInt64)
    }

    private func appendInOrder(offset: UInt64, kind: VolumeChange.Kind) -> UInt64 {
        let captured = Self.now()
        let length: UInt64
        switch kind {
        case .write(let data): length = UInt64(data.readableBytes)
        case .zero(let n): length = n
        case .resize: length = 0
        }
        let placement = state.withLock { s -> Placement in
            let sequence = s.next
            s.next += 1
            if case .resize(let size) = kind { s.announcedSize = size }
            activity?.noteWrite(offset: offset, length: length, sequence: sequence, lost: s.overflowed)
            guard !s.overflowed else { return .placed(sequence, waiter: s.takeWaiter(), room: nil) }
            let change = VolumeChange(sequence: sequence, offset: offset, kind: kind, captured: captured)
            let size = Self.cost(change)
            if s.memoryUsed + size <= heldBytes {
                s.entries.append(.memory(change))
                s.memoryUsed += size
            } else if case .write(let data) = kind, spill >= 0, let at = s.spillPosition(Int64(data.readableBytes), cap: spillBytes) {
                s.spillEnd = at + Int64(data.readableBytes)
                s.spillUsed += Int64(data.readableBytes)
                return .spill(sequence, at: at, epoch: s.epoch)
            } else if !kind.carriesData, s.memoryUsed + size <= heldBytes + (1 << 20) {
                // Zeroed ranges and resizes carry no data: a little headroom keeps them in memory.
                s.entries.append(.memory(change))
                s.memoryUsed += size
            } else {
                return .placed(sequence, waiter: s.takeWaiter(), room: s.overflow(activity))
            }
            return .placed(sequence, waiter: s.takeWaiter(), room: nil)
        }
        switch placement {
        case .placed(let sequence, let waiter, let room):
            waiter?.resume()
            room?.resume()
            return sequence
        case .spill(let sequence, let at, let epoch):
            guard case .write(let data) = kind else { preconditionFailure("only written bytes spill") }
            let written = Self.writeSpill(spill, data, at: at)
            let (waiter, room) = state.withLock { s -> (CheckedContinuation<Void, Never>?, CheckedContinuation<Void, Never>?) in
                // A restart meanwhile (the streamer recovering from an overflow) dropped
                // everything of the old epoch, this too: its extent is pending in the activity log.
                guard s.epoch == epoch, !s.overflowed, s.next == sequence + 1 else { return (nil, nil) }
                guard written else { return (s.takeWaiter(), s.overflow(activity)) }
                s.entries.append(.spilled(sequence: sequence, offset: offset, length: data.readableBytes, at: at, captured: captured))
                return (s.takeWaiter(), nil)
            }
            waiter?.resume()
            room?.resume()
            return sequence
        }
    }

    /// Starts a new epoch at sequence 1 with nothing held: after an overflow, when the
    /// controller lacks records the log no longer holds, or when a fenced volume is unfenced.
    /// Every marked extent becomes pending in the activity log, so a resync brings over
    /// whatever was dropped. Returns the new epoch.
    /// `size` is the volume's size now: a resized volume's new epoch announces it (it may have
    /// grown since the last resize this log recorded, as a sink).
    @discardableResult
    public func restartEpoch(size: UInt64? = nil) -> UInt64 {
        let (epoch, room) = state.withLock { s in
            if let size, let announced = s.announcedSize, size > announced { s.announcedSize = size }
            s.epoch = UInt64.random(in: 1...UInt64.max)
            s.next = 1
            s.acked = 0
            s.overflowed = false
            s.entries.removeAll()
            s.firstSpilled = 0
            s.memoryUsed = 0
            s.spillUsed = 0
            s.spillEnd = 0
            activity?.markedBecomePending()
            activity?.startEpoch(s.epoch)
            s.announceSize(at: Self.now())
            return (s.epoch, s.takeRoomWaiter())
        }
        room?.resume()
        return epoch
    }

    /// Bytes held in memory (the resync waits for room here before adding more).
    public var memoryUsed: Int { state.withLock { $0.memoryUsed } }

    /// The last sequence given out, 0 if none.
    public var last: UInt64 { state.withLock { $0.next - 1 } }
    public var overflowed: Bool { state.withLock { $0.overflowed } }

    /// Records after `sequence`, up to about `maxBytes` and at most `maxCount` (at least one if any). Spilled data is
    /// read back outside the lock, so appends are not held up by it.
    /// With `epoch`, returns nothing if the log has moved to another epoch meanwhile.
    public func records(after sequence: UInt64, maxBytes: Int, maxCount: Int = .max, epoch: UInt64? = nil) throws -> [VolumeChange] {
        let picked: [Entry] = state.withLock { s in
            var out: [Entry] = []
            if let epoch, epoch != s.epoch { return out }
            var size = 0
            // Entries are dense and ordered: jump to the first one after `sequence`.
            guard let first = s.entries.first else { return out }
            let skip = sequence >= first.sequence ? sequence - first.sequence + 1 : 0
            guard skip < UInt64(s.entries.count) else { return out }
            var i = s.entries.index(s.entries.startIndex, offsetBy: Int(skip))
            while i != s.entries.endIndex, out.count < maxCount {
                let cost = Self.cost(s.entries[i])
                guard out.isEmpty || size + cost <= maxBytes else { break }
                out.append(s.entries[i])
                size += cost
                i = s.entries.index(after: i)
            }
            return out
        }
        return try picked.map { entry in
            switch entry {
            case .memory(let change):
                return change
            case .spilled(let sequence, let offset, let length, let at, let captured):
                var buffer = ByteBuffer()
                buffer.reserveCapacity(length)
                let failed = FileIO.read(spill, count: length, at: UInt64(at), into: &buffer, zeroFillPastEnd: false)
                guard failed == 0, buffer.readableBytes == length else {
                    throw FerryError(.io, "change-log spill file read failed: \(failed == 0 ? "file too short" : String(cString: strerror(failed)))")
                }
                return VolumeChange(sequence: sequence, offset: offset, kind: .write(buffer), captured: captured)
            }
        }
    }

    /// The first sequence still held, or nil if none is (all acked, or overflowed).
    public var firstHeld: UInt64? {
        state.withLock { $0.entries.first?.sequence }
    }

    /// The epoch and the highest sequence of it the controller holds durably, read together.
    public var ackedState: (epoch: UInt64, acked: UInt64) { state.withLock { ($0.epoch, $0.acked) } }

    /// Where the log stands, read at one instant.
    public struct Snapshot: Sendable {
        public var epoch: UInt64
        public var last: UInt64
        public var acked: UInt64
        public var overflowed: Bool
        public var pendingBytes: Int
        public var oldestPending: Int64?
        /// Every acked record's lag so far in this process (cumulative across epochs).
        public var writeLag: LagHistogram
    }

    public var snapshot: Snapshot {
        state.withLock { s in
            let oldest: Int64? = s.entries.first.map {
                switch $0 {
                case .memory(let c): c.captured
                case .spilled(_, _, _, _, let captured): captured
                }
            }
            return Snapshot(epoch: s.epoch, last: s.next - 1, acked: s.acked, overflowed: s.overflowed,
                            pendingBytes: s.memoryUsed + Int(s.spillUsed), oldestPending: oldest, writeLag: s.writeLag)
        }
    }

    /// Clears activity-log marks of extents whose writes are all acked. The caller has made the
    /// volume durable (fdatasync) after reading what is acked.
    public func clearAcked() throws {
        let (epoch, acked) = ackedState
        try activity?.clear(ackedThrough: acked, epoch: epoch)
    }

    /// The highest sequence the controller holds durably (0 if none acked yet).
    public var ackedThrough: UInt64 { state.withLock { $0.acked } }

    /// Drops records up to `sequence` of `epoch` once the controller holds them durably.
    public func trim(through sequence: UInt64, epoch: UInt64? = nil) {
        let (ack, room) = state.withLock { s -> (CheckedContinuation<Void, Never>?, CheckedContinuation<Void, Never>?) in
            if let epoch, epoch != s.epoch { return (nil, nil) }
            s.acked = max(s.acked, sequence)
            trimEntries(&s, through: sequence)
            let room = s.takeRoomWaiter()
            guard let waiting = s.ackWaiter, waiting.through <= s.acked else { return (nil, room) }
            s.ackWaiter = nil
            return (waiting.continuation, room)
        }
        ack?.resume()
        room?.resume()
    }

    /// Waits until the held entries use at most `atMost` bytes (acks trim them, an overflow
    /// drops them), or the task is cancelled. Woken by the trim itself, not by polling. One
    /// waiter at a time (the volume's sync worker, leaving room for the workload's writes).
    public func waitForRoom(atMost: Int) async {
        await withTaskCancellationHandler {
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                let ready = state.withLock { s -> Bool in
                    if s.memoryUsed <= atMost || Task.isCancelled { return true }
                    s.roomWaiter?.continuation.resume()
                    s.roomWaiter = (atMost, c)
                    return false
                }
                if ready { c.resume() }
            }
        } onCancel: {
            state.withLock { s in defer { s.roomWaiter = nil }; return s.roomWaiter?.continuation }?.resume()
        }
    }

    private func trimEntries(_ s: inout State, through sequence: UInt64) {
        guard let first = s.entries.first, first.sequence <= sequence else { return }
        let now = Self.now()
        while let entry = s.entries.first, entry.sequence <= sequence {
            let captured: Int64
            switch s.entries.removeFirst() {
            case .memory(let change):
                s.memoryUsed -= Self.cost(change)
                captured = change.captured
            case .spilled(_, _, let length, _, let time):
                s.spillUsed -= Int64(length)
                captured = time
            }
            s.writeLag.record(seconds: Double(now &- captured) / 1e9)
            s.firstSpilled = max(0, s.firstSpilled - 1)
        }
        if s.entries.isEmpty {
            s.firstSpilled = 0
            // Nothing spilled is needed any more: reuse the file from its start. It keeps
            // its size, so writing it again overwrites blocks it has instead of allocating
            // new ones (several times dearer on tmpfs, and on most file systems).
            s.spillEnd = 0
        }
    }

    /// Waits until the controller has acked everything through `sequence` (the streamer's
    /// window is full until then), a new epoch starts, or the task is cancelled. Woken by the
    /// ack itself (`trim`), not by polling. One waiter at a time (the volume's streamer).
    public func waitForAck(through sequence: UInt64, epoch: UInt64) async {
        await withTaskCancellationHandler {
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                let ready = state.withLock { s -> Bool in
                    if s.acked >= sequence || s.epoch != epoch || s.overflowed || Task.isCancelled { return true }
                    s.ackWaiter?.continuation.resume()
                    s.ackWaiter = (sequence, c)
                    return false
                }
                if ready { c.resume() }
            }
        } onCancel: {
            state.withLock { s in defer { s.ackWaiter = nil }; return s.ackWaiter?.continuation }?.resume()
        }
    }

    /// Waits until a change after `sequence` exists, or the task is cancelled. One waiter at a
    /// time (the volume's streamer).
    public func waitForChanges(after sequence: UInt64) async {
        await withTaskCancellationHandler {
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                let ready = state.withLock { s -> Bool in
                    if s.next - 1 > sequence || Task.isCancelled { return true }
                    s.waiter?.resume()
                    s.waiter = c
                    return false
                }
                if ready { c.resume() }
            }
        } onCancel: {
            state.withLock { s in defer { s.waiter = nil }; return s.waiter }?.resume()
        }
    }

    static func now() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
    }

    static func writeSpill(_ fd: Int32, _ data: ByteBuffer, at: Int64) -> Bool {
        data.withUnsafeReadableBytes { FileIO.writeAll(fd, $0, at: UInt64(at)) } == 0
    }

    static func cost(_ change: VolumeChange) -> Int {
        switch change.kind {
        case .write(let data): 48 + data.readableBytes
        case .zero, .resize: 48
        }
    }

    static func cost(_ entry: Entry) -> Int {
        switch entry {
        case .memory(let change): cost(change)
        case .spilled(_, _, let length, _, _): 48 + length
        }
    }
}

extension VolumeChange.Kind {
    /// Written bytes travel with it (not a zeroed range or a resize).
    var carriesData: Bool {
        if case .write = self { return true }
        return false
    }
}
