import CFerrySystem
import FerryNBD
import FerryWire
import Foundation
import NIOCore
import NIOPosix
import Synchronization

/// A protected volume's backing store (an image file or a block device), with every mutation
/// captured. File I/O runs on a thread pool of its own, never on an event loop.
public final class BlockVolume: NBDExport {
    public let name: String
    public let path: String
    /// The export's size: it grows with an online resize (new connections see the new size).
    public var size: UInt64 { sizeValue.load(ordering: .acquiring) }
    private let sizeValue: Atomic<UInt64>
    /// A block device, or a volume only scanned (opened read-only): its owner grows it and a
    /// resize follows, where an image file of an exported volume is grown here.
    public let followsBacking: Bool
    private let fd: Int32
    private let pool: NIOThreadPool
    private let recorder: any ChangeRecorder
    /// Held while a mutation is applied and recorded, so the capture order is the disk order
    /// even when writes to the same bytes are in flight on several connections.
    private let mutation = Mutex<Void>(())
    /// Stops writes from completing while a consistency cut holds the volume.
    private let gate = WriteGate()
    /// The other site owns this volume (a failover fenced it): the workload's writes are
    /// refused with EPERM, and only a sink's applied blocks change it.
    private let fencedFlag = Atomic<Bool>(false)
    public var isReadOnly: Bool { fencedFlag.load(ordering: .acquiring) }
    public var isFenced: Bool { fencedFlag.load(ordering: .acquiring) }
    /// The volume's generation as the controller last gave it: replication batches carry it,
    /// so the controller can refuse what an out-of-date source sends.
    private let generationValue = Atomic<UInt64>(0)
    public var generation: UInt64 {
        get { generationValue.load(ordering: .relaxed) }
        set { generationValue.store(newValue, ordering: .relaxed) }
    }
    public var holdsWrites: Bool { gate.isHeld }
    /// A recovered volume still filling from its failover point (nil for any other): a read
    /// fetches the blocks not local yet first, a write marks its blocks local, a flush saves
    /// the map so a restart never fetches a block over a write it acknowledged.
    let hydration: HydratingVolume?

    /// Opens `path` read-write (read-only for a volume only scanned). The file must exist; its
    /// size is the export size.
    init(name: String, path: String, recorder: any ChangeRecorder, pool: NIOThreadPool, readOnly: Bool = false,
         hydration: HydratingVolume?) throws {
        let fd = open(path, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
        guard fd >= 0 else {
            throw FerryError(.notFound, "cannot open volume \(name) at \(path): \(String(cString: strerror(errno)))")
        }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            close(fd)
            throw FerryError(.io, "cannot stat \(path): \(String(cString: strerror(errno)))")
        }
        var size = UInt64(st.st_size)
        if (st.st_mode & S_IFMT) == S_IFBLK {
            let end = lseek(fd, 0, SEEK_END)
            size = end > 0 ? UInt64(end) : 0
        }
        self.name = name
        self.path = path
        sizeValue = Atomic(size)
        followsBacking = readOnly || (st.st_mode & S_IFMT) == S_IFBLK
        self.fd = fd
        self.pool = pool
        self.recorder = recorder
        self.hydration = hydration
    }

    public convenience init(name: String, path: String, recorder: any ChangeRecorder, pool: NIOThreadPool, readOnly: Bool = false) throws {
        try self.init(name: name, path: path, recorder: recorder, pool: pool, readOnly: readOnly, hydration: nil)
    }

    deinit { close(fd) }

    /// The size of an image file or block device, without opening it for writing.
    public static func size(of path: String) throws -> UInt64 {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw FerryError(.notFound, "cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw FerryError(.io, "cannot stat \(path): \(String(cString: strerror(errno)))") }
        if (st.st_mode & S_IFMT) == S_IFBLK {
            let end = lseek(fd, 0, SEEK_END)
            return end > 0 ? UInt64(end) : 0
        }
        return UInt64(st.st_size)
    }

    public typealias Operation = NBDOperation

    /// Runs one operation now, blocking: on a thread of the caller's own (the NBD export's
    /// connection threads), never an event loop. Reads return their data, the others nil.
    public func performNow(_ op: Operation, allocator: ByteBufferAllocator) -> Result<ByteBuffer?, VolumeIOError> {
        do {
            switch op {
            case .read(let offset, let length): return .success(try readNow(offset: offset, length: length, allocator: allocator))
            case .write(let offset, let data, let fua): _ = try writeNow(offset: offset, data: data, fua: fua)
            case .zero(let offset, let length, let fua): _ = try zeroNow(offset: offset, length: length, fua: fua)
            case .flush:
                try hydration?.saveMap(force: true)
                try Self.sync(fd)
            }
            return .success(nil)
        } catch let error as VolumeIOError {
            return .failure(error)
        } catch {
            return .failure(VolumeIOError(operation: "request", errno: EIO))
        }
    }

    /// Holes of the backing file are unallocated zeroes; a block device is data throughout.
    public func allocation(offset: UInt64, length: UInt64, limit: Int) -> Result<[NBDExtent], VolumeIOError> {
        // Not local yet: the target's holes say nothing about the point's.
        if let hydration, !hydration.isComplete { return .success([NBDExtent(length: length, flags: 0)]) }
        var list = NBDExtentList(limit: limit)
        FileAllocation.append(fd: fd, from: offset, to: offset + length, into: &list)
        return .success(list.extents)
    }

    // MARK: Blocking: on the I/O threads or an NBD connection's thread

    func readNow(offset: UInt64, length: Int, allocator: ByteBufferAllocator) throws -> ByteBuffer {
        try hydration?.ensureLocal(offset: offset, length: UInt64(length))
        var buffer = allocator.buffer(capacity: length)
        // Past the end of a file that shrank under us, the rest reads as zeroes.
        let failed = FileIO.read(fd, count: length, at: offset, into: &buffer, zeroFillPastEnd: true)
        if failed != 0 { throw Self.ioError("read", failed) }
        return buffer
    }

    func writeNow(offset: UInt64, data: ByteBuffer, fua: Bool) throws -> UInt64 {
        try recorder.prepare(offset: offset, length: UInt64(data.readableBytes))
        defer { recorder.completed(offset: offset, length: UInt64(data.readableBytes)) }
        let fd = self.fd
        gate.enter()
        defer { gate.leave() }
        let sequence = try hydrating(offset: offset, length: UInt64(data.readableBytes)) {
            try mutation.withLock { _ in
                if fencedFlag.load(ordering: .acquiring) { throw Self.ioError("write (volume fenced)", EPERM) }
                let failed = data.withUnsafeReadableBytes { FileIO.writeAll(fd, $0, at: offset) }
                if failed != 0 { throw Self.ioError("write", failed) }
                return recorder.append(offset: offset, kind: .write(data))
            }
        }
        if fua { try durable() }
        return sequence
    }

    func zeroNow(offset: UInt64, length: UInt64, fua: Bool) throws -> UInt64 {
        try recorder.prepare(offset: offset, length: length)
        defer { recorder.completed(offset: offset, length: length) }
        let fd = self.fd
        gate.enter()
        defer { gate.leave() }
        let sequence = try hydrating(offset: offset, length: length) {
            try mutation.withLock { _ in
                if fencedFlag.load(ordering: .acquiring) { throw Self.ioError("zero (volume fenced)", EPERM) }
                if ferry_punch_hole(fd, off_t(offset), off_t(length)) != 0 {
                    guard errno == EOPNOTSUPP || errno == EINVAL else { throw Self.ioError("zero", errno) }
                    try Self.writeZeroes(fd, offset: offset, length: length)
                }
                return recorder.append(offset: offset, kind: .zero(length: length))
            }
        }
        if fua { try durable() }
        return sequence
    }

    /// A change of a hydrating volume goes through its map (see `HydratingVolume.change`).
    private func hydrating<T>(offset: UInt64, length: UInt64, _ body: () throws -> T) throws -> T {
        guard let hydration else { return try body() }
        return try hydration.change(offset: offset, length: length, body)
    }

    /// FUA: the write is on disk, and so is the map that says its blocks are local.
    private func durable() throws {
        if let hydration { try hydration.saveMap(force: true) } else { try Self.sync(fd) }
    }

    /// Block hashes of `count` blocks from `offset` (see `BlockHashing`), read without the
    /// mutation lock: a write racing with the read is captured anyway and follows in the stream.
    public func hashes(offset: UInt64, blockBytes: Int, count: Int) async throws -> BlockHashing.Result {
        let fd = self.fd, size = self.size, hydration = self.hydration
        return try await pool.runIfActive {
            try hydration?.ensureLocal(offset: offset, length: UInt64(blockBytes) * UInt64(count))
            return try BlockHashing.hashes(fd: fd, size: size, offset: offset, blockBytes: blockBytes, count: count)
        }
    }

    /// The indices of the blocks that hold allocated data (not holes), without reading them.
    public func dataBlocks(offset: UInt64, blockBytes: Int, count: Int) async throws -> [UInt32] {
        let fd = self.fd, size = self.size, hydration = self.hydration
        return try await pool.runIfActive {
            try hydration?.ensureLocal(offset: offset, length: UInt64(blockBytes) * UInt64(count))
            // Allocation only, nothing read: the capture that follows reads each block once, and
            // a run of written zeroes travels as a zeroed range.
            return BlockHashing.allocatedBlocks(fd: fd, size: size, offset: offset, blockBytes: blockBytes, count: count)
        }
    }

    /// Captures the current content of a range as if it had just been written (a zeroed range
    /// if it reads as zeroes), under the mutation lock so it takes its place in the write order.
    /// Returns the sequence and the bytes of data captured.
    public func captureCurrent(offset: UInt64, length: Int) async throws -> (sequence: UInt64, dataBytes: Int) {
        let fd = self.fd
        let length = Int(min(UInt64(length), size - min(size, offset)))
        return try await pool.runIfActive {
            try self.hydration?.ensureLocal(offset: offset, length: UInt64(length))
            self.gate.enter()
            defer { self.gate.leave() }
            return try self.mutation.withLock { _ in
                var buffer = ByteBuffer()
                buffer.reserveCapacity(length)
                let failed = FileIO.read(fd, count: length, at: offset, into: &buffer, zeroFillPastEnd: true)
                if failed != 0 { throw Self.ioError("read", failed) }
                if buffer.withUnsafeReadableBytes({ BlockHashing.isZero($0) }) {
                    return (self.recorder.append(offset: offset, kind: .zero(length: UInt64(length))), 0)
                }
                return (self.recorder.append(offset: offset, kind: .write(buffer)), length)
            }
        }
    }

    /// Makes every completed write durable. Blocking: call it on an I/O thread.
    func flushNow() throws { try Self.sync(fd) }

    // MARK: Online resize

    /// Grows the volume to `newSize` bytes and records the resize in the capture stream, in
    /// order with the writes (a cut's hold delays it like a write): an image file is extended
    /// (sparse), a block device must already be that large (its owner grew it). Writes past
    /// the old end are accepted only from here on, so each comes after the resize record.
    /// Returns the resize record's sequence, or nil if the volume has that size already.
    /// Blocking: an I/O thread.
    func resize(to newSize: UInt64) throws -> UInt64? {
        gate.enter()
        defer { gate.leave() }
        return try mutation.withLock { _ -> UInt64? in
            let current = size
            if newSize == current { return nil }
            guard newSize > current else {
                throw FerryError(.badRequest, "volume \(name) is \(current) bytes: shrinking it to \(newSize) is refused (a file system or guest on it would lose its end)")
            }
            if fencedFlag.load(ordering: .acquiring) {
                throw FerryError(.conflict, "volume \(name) is fenced (the other site owns it since a failover): resize it where it is served")
            }
            if followsBacking {
                let end = lseek(fd, 0, SEEK_END)
                guard end >= 0, UInt64(end) >= newSize else {
                    throw FerryError(.badRequest, "\(path) is \(max(0, end)) bytes and is grown by its owner (a block device, or a volume captured by scanning): grow it to \(newSize) first (lvextend, or the storage's own tool), then resize the volume")
                }
                guard UInt64(end) == newSize else {
                    throw FerryError(.badRequest, "\(path) is \(end) bytes: the volume follows its whole size, so resize it to \(end)")
                }
            }
            try growBacking(to: newSize)
            let sequence = recorder.append(offset: 0, kind: .resize(size: newSize))
            sizeValue.store(newSize, ordering: .releasing)
            return sequence
        }
    }

    // MARK: Fencing and the sink role

    /// Refuses the workload's writes from now on; returns once no write is being applied, so
    /// the change log's last sequence afterwards is final. Blocking (briefly): an I/O thread.
    func fence() {
        fencedFlag.store(true, ordering: .releasing)
        mutation.withLock { _ in }
    }

    func unfence() {
        fencedFlag.store(false, ordering: .releasing)
    }

    /// Writes blocks a reverse stream sends (the sink role): only while fenced, nothing
    /// captured. Blocking: an I/O thread.
    func applyAsSink(_ blocks: [SinkChange], flush: Bool) throws {
        let fd = self.fd
        try mutation.withLock { _ in
            guard fencedFlag.load(ordering: .acquiring) else {
                throw FerryError(.conflict, "volume \(name) is not fenced: it takes blocks as a sink only after a failover")
            }
            for block in blocks {
                let size = self.size
                let offset: UInt64, length: UInt64
                switch block {
                case .grow(let newSize):
                    try growAsSink(to: newSize)
                    continue
                case .write(let at, let data): (offset, length) = (at, UInt64(data.readableBytes))
                case .zero(let at, let count): (offset, length) = (at, count)
                }
                guard offset <= size, length <= size - offset else {
                    throw FerryError(.badRequest, "block at \(offset) of \(length) bytes lies outside the \(size)-byte volume \(name)")
                }
                if case .write(_, let data) = block {
                    let failed = data.withUnsafeReadableBytes { FileIO.writeAll(fd, $0, at: offset) }
                    if failed != 0 { throw FerryError(.io, "sink write to \(name) failed: \(String(cString: strerror(failed)))") }
                } else if length > 0 {
                    if ferry_punch_hole(fd, off_t(offset), off_t(length)) != 0 {
                        try Self.writeZeroes(fd, offset: offset, length: length)
                    }
                }
            }
        }
        if flush { try Self.sync(fd) }
    }

    /// Records the current size in the capture stream (a volume that grew as a sink, before
    /// it is unfenced): its replica learns it before any write past the old end.
    func announceSize() {
        mutation.withLock { _ in _ = recorder.append(offset: 0, kind: .resize(size: size)) }
    }

    /// A sink's volume grows as its source did (the mutation lock is held): never shrinks, and
    /// a volume whose owner grows it (a block device) must be that large already.
    private func growAsSink(to newSize: UInt64) throws {
        guard newSize > size else { return }
        if followsBacking {
            let end = lseek(fd, 0, SEEK_END)
            guard end >= 0, UInt64(end) >= newSize else {
                throw FerryError(.noSpace, "the source of \(name) grew to \(newSize) bytes, and \(path) is \(max(0, end)): grow it to at least that (lvextend, or the storage's own tool)")
            }
        }
        try growBacking(to: newSize)
        sizeValue.store(newSize, ordering: .releasing)
    }

    /// The file grown first, durably (a failure leaves everything as it was; a block device is
    /// grown by its owner), then the extents past the old end tracked durably: nothing can be
    /// written there before the caller changes the size. The mutation lock is held.
    private func growBacking(to newSize: UInt64) throws {
        if !followsBacking {
            while ftruncate(fd, off_t(newSize)) != 0 {
                if errno == EINTR { continue }
                throw FerryError.system(errno, "cannot grow \(path) to \(newSize) bytes")
            }
            try Self.sync(fd)
        }
        try recorder.willGrow(to: newSize)
    }

    static func writeZeroes(_ fd: Int32, offset: UInt64, length: UInt64) throws {
        let zeroes = [UInt8](repeating: 0, count: 1 << 20)
        var done: UInt64 = 0
        while done < length {
            let count = Int(min(UInt64(zeroes.count), length - done))
            let failed = zeroes.withUnsafeBytes { FileIO.writeAll(fd, UnsafeRawBufferPointer(rebasing: $0[..<count]), at: offset + done) }
            if failed != 0 { throw ioError("zero", failed) }
            done += UInt64(count)
        }
    }

    static func sync(_ fd: Int32) throws {
        while fdatasync(fd) != 0 {
            if errno != EINTR { throw ioError("flush", errno) }
        }
    }

    static func ioError(_ what: String, _ code: Int32) -> VolumeIOError {
        VolumeIOError(operation: what, errno: code)
    }
}

// MARK: Consistency cuts

extension BlockVolume {
    /// Stops writes from completing (new ones wait, those already applying finish) and
    /// returns once none is in flight, or false if some were still in flight at `deadline`
    /// (the hold stays on until `releaseWrites`).
    public func holdWrites(until deadline: ContinuousClock.Instant) -> Bool {
        gate.hold(until: deadline)
    }

    /// Lets held writes go on.
    public func releaseWrites() {
        gate.release()
    }
}

/// Counts writes in flight and, during a hold, makes new ones wait. Writes take it from
/// their own threads (NBD connections, I/O pool), which may block here for the hold's
/// duration, bounded by the cut's budget.
final class WriteGate: @unchecked Sendable {
    // NSCondition: the writers' threads must sleep until a hold ends; every field below is
    // guarded by it.
    private let condition = NSCondition()
    /// Holds in force: two cuts may overlap (one of a controller that died mid-round and one of
    /// its successor), and the first to end must not release the other's.
    private var holders = 0
    private var inFlight = 0
    private let heldFlag = Atomic<Bool>(false)

    var isHeld: Bool { heldFlag.load(ordering: .relaxed) }

    func enter() {
        condition.lock()
        while holders > 0 { condition.wait() }
        inFlight += 1
        condition.unlock()
    }

    func leave() {
        condition.lock()
        inFlight -= 1
        if inFlight == 0 { condition.broadcast() }
        condition.unlock()
    }

    func hold(until deadline: ContinuousClock.Instant) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        holders += 1
        heldFlag.store(true, ordering: .relaxed)
        while inFlight > 0 {
            let left = ContinuousClock.now.duration(to: deadline)
            guard left > .zero else { break }
            _ = condition.wait(until: Date(timeIntervalSinceNow: left.seconds))
        }
        return inFlight == 0
    }

    func release() {
        condition.lock()
        holders = max(0, holders - 1)
        if holders == 0 {
            heldFlag.store(false, ordering: .relaxed)
            condition.broadcast()
        }
        condition.unlock()
    }
}
