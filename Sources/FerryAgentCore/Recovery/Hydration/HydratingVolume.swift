import CFerrySystem
import FerryNBD
import FerryWire
import Foundation
import Logging
import NIOCore
import Synchronization

/// A recovered volume that lives on the recovery host's own target (a file or block device)
/// while it is being filled from the controller's point: a read of a block not local yet fetches
/// it from the point and keeps it; a write goes to the target only; the copier (`Hydrator`)
/// fills the rest in the background. Once every block is local the point is not needed: the
/// controller's export can go and the workload does not notice.
///
/// Ordering: a block's bit is set only after its bytes are written, under the block's stripe
/// lock, and the copier installs a fetched block only while its bit is clear (under the same
/// lock), so a fetched copy never lands over a workload write. The map is saved with the target
/// synced after the snapshot is taken, so a bit on disk always means its block is on disk.
final class HydratingVolume: NBDExport {
    let name: String
    let source: String
    let size: UInt64
    let target: String
    let mapPath: String
    var isReadOnly: Bool { false }

    private let fd: Int32
    private let map: Mutex<HydrationMap>
    private let stripes: [NSLock]
    private let mapChanged = Atomic<Bool>(false)
    private let saving = NSLock()
    private let completed = Atomic<Bool>(false)
    /// The point, through the controller's export (reads only). Not used once complete.
    let remote: any NBDExport
    private let fetchedBytes = Atomic<UInt64>(0)
    private let writeCount = Atomic<UInt64>(0)
    private let logger: Logger
    /// Called once, when the last block becomes local (on the thread that made it so).
    let onComplete: @Sendable () -> Void

    static let stripeCount = 256
    /// Largest read-through fetch: misses in one request are fetched together up to this.
    static let maxFetchBlocks = 64

    private init(name: String, source: String, target: String, mapPath: String, fd: Int32, map: HydrationMap,
                 remote: any NBDExport, logger: Logger, onComplete: @escaping @Sendable () -> Void) {
        self.name = name
        self.source = source
        self.size = map.size
        self.target = target
        self.mapPath = mapPath
        self.fd = fd
        self.map = Mutex(map)
        self.stripes = (0..<Self.stripeCount).map { _ in NSLock() }
        self.remote = remote
        self.logger = logger
        self.onComplete = onComplete
        if map.isComplete { completed.store(true, ordering: .relaxed) }
    }

    deinit { close(fd) }

    /// Opens (or starts) the hydration of `target` from the point behind `remote`. A map saved
    /// at `mapPath` for the same point resumes it; without one the target is prepared afresh: a
    /// missing file is created empty (its holes read as zeroes), an existing file or block
    /// device must be at least `size` bytes and is overwritten block by block. Blocking.
    static func open(name: String, source: String, size: UInt64, target: String, mapPath: String, point: String,
                     remote: any NBDExport, logger: Logger, onComplete: @escaping @Sendable () -> Void) throws -> HydratingVolume {
        var map: HydrationMap?
        if let bytes = FileManager.default.contents(atPath: mapPath) {
            // A complete map of a smaller volume: the volume grew (an online resize) once it was
            // all local; its new end was never part of the point.
            guard let saved = HydrationMap.decode(Array(bytes)), saved.source == point,
                  saved.size == size || (saved.size < size && saved.isComplete) else {
                throw FerryError(.conflict, "the hydration map \(mapPath) is damaged or belongs to another point or size; remove it and the target \(target) to start over")
            }
            map = saved
        }
        var created = false
        var fd = Glibc.open(target, O_RDWR | O_CLOEXEC | O_NOFOLLOW)
        if fd < 0, errno == ENOENT, map == nil {
            try FileManager.default.createDirectory(atPath: (target as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            fd = Glibc.open(target, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
            guard fd >= 0 else { throw FerryError(.io, "cannot create the target \(target): \(String(cString: strerror(errno)))") }
            guard ftruncate(fd, off_t(size)) == 0 else {
                let code = errno
                Glibc.close(fd)
                unlink(target)
                throw FerryError(.io, "cannot size the target \(target) to \(size) bytes: \(String(cString: strerror(code)))")
            }
            created = true
        }
        guard fd >= 0 else {
            throw FerryError(.io, "cannot open the target \(target): \(String(cString: strerror(errno)))"
                + (map != nil ? " (a hydration map exists for it: it was removed under us)" : ""))
        }
        var st = stat()
        fstat(fd, &st)
        let isBlock = (st.st_mode & S_IFMT) == S_IFBLK
        let capacity = isBlock ? UInt64(max(0, lseek(fd, 0, SEEK_END))) : UInt64(st.st_size)
        guard capacity >= size else {
            Glibc.close(fd)
            throw FerryError(.badRequest, "the target \(target) holds \(capacity) bytes; the volume needs \(size)")
        }
        let fresh = map ?? HydrationMap(size: size, source: point, targetZeroed: created)
        let volume = HydratingVolume(name: name, source: source, target: target, mapPath: mapPath, fd: fd, map: fresh,
                                     remote: remote, logger: logger, onComplete: onComplete)
        if map == nil {
            // Saved before anything is served: no map on disk means nothing was hydrated yet.
            do {
                try volume.saveMap(force: true)
            } catch {
                if created { unlink(target) }
                throw error
            }
        }
        return volume
    }

    // MARK: Progress

    struct Progress: Sendable {
        var localBytes: UInt64
        var size: UInt64
        var fetchedBytes: UInt64
        var complete: Bool
    }

    var progress: Progress {
        let (local, complete) = map.withLock { ($0.localBytes, $0.isComplete) }
        return Progress(localBytes: local, size: size, fetchedBytes: fetchedBytes.load(ordering: .relaxed), complete: complete)
    }

    var isComplete: Bool { completed.load(ordering: .relaxed) }
    private let copyRate = Mutex<(rate: Double, seconds: Double)>((0, 0))
    /// The copier's bytes per second over its run so far, and how long it has run.
    var rate: Double { copyRate.withLock { $0.rate } }
    var copySeconds: Double { copyRate.withLock { $0.seconds } }
    func noteRate(_ bytesPerSecond: Double, seconds: Double) { copyRate.withLock { $0 = (bytesPerSecond, seconds) } }
    /// Bytes the copier moved over the network (read-through fetches count themselves).
    func noteFetched(_ bytes: UInt64) { fetchedBytes.add(bytes, ordering: .relaxed) }
    var writes: UInt64 { writeCount.load(ordering: .relaxed) }
    var blockBytes: UInt32 { map.withLock { $0.blockBytes } }
    var targetZeroed: Bool { map.withLock { $0.targetZeroed } }

    func firstMissing(from block: Int) -> Int? { map.withLock { $0.firstMissing(from: block) } }
    func missingRuns(in blocks: Range<Int>, maxBlocks: Int) -> [Range<Int>] { map.withLock { $0.missingRuns(in: blocks, maxBlocks: maxBlocks) } }
    func blocks(offset: UInt64, length: UInt64) -> Range<Int> { map.withLock { $0.blocks(offset: offset, length: length) } }

    // MARK: Serving

    func performNow(_ op: NBDOperation, allocator: ByteBufferAllocator) -> Result<ByteBuffer?, VolumeIOError> {
        do {
            switch op {
            case .read(let offset, let length):
                try ensureLocal(offset: offset, length: UInt64(length))
                var buffer = allocator.buffer(capacity: length)
                let failed = FileIO.read(fd, count: length, at: offset, into: &buffer, zeroFillPastEnd: true)
                if failed != 0 { throw VolumeIOError(operation: "read of \(target)", errno: failed) }
                return .success(buffer)
            case .write(let offset, let data, let fua):
                try change(offset: offset, length: UInt64(data.readableBytes)) {
                    let failed = data.withUnsafeReadableBytes { FileIO.writeAll(fd, $0, at: offset) }
                    if failed != 0 { throw VolumeIOError(operation: "write to \(target)", errno: failed) }
                }
                writeCount.add(1, ordering: .relaxed)
                if fua { try saveMap(force: true) }
            case .zero(let offset, let length, let fua):
                try change(offset: offset, length: length) { try Self.zero(fd, offset: offset, length: length) }
                writeCount.add(1, ordering: .relaxed)
                if fua { try saveMap(force: true) }
            case .flush:
                try saveMap(force: true)
            }
            return .success(nil)
        } catch let error as VolumeIOError {
            return .failure(error)
        } catch {
            logger.error("recovered volume request failed", metadata: ["volume": "\(name)", "error": "\(error)"])
            return .failure(VolumeIOError(operation: "recovered volume \(name)", errno: EIO))
        }
    }

    /// Unlike a plain file's, the map here is the point's where blocks are not local yet; a
    /// hydrated volume maps its target.
    func allocation(offset: UInt64, length: UInt64, limit: Int) -> Result<[NBDExtent], VolumeIOError> {
        guard isComplete else { return .success([NBDExtent(length: length, flags: 0)]) }
        var list = NBDExtentList(limit: limit)
        FileAllocation.append(fd: fd, from: offset, to: offset + length, into: &list)
        return .success(list.extents)
    }

    /// Makes every block of the range local, fetching the missing ones from the point.
    func ensureLocal(offset: UInt64, length: UInt64) throws {
        guard !isComplete, length > 0 else { return }
        for run in missingRuns(in: blocks(offset: offset, length: length), maxBlocks: Self.maxFetchBlocks) {
            let (start, _) = map.withLock { $0.range(of: run.lowerBound) }
            let end = min(size, UInt64(run.upperBound) * UInt64(blockBytes))
            let fetched: ByteBuffer
            switch remote.performNow(.read(offset: start, length: Int(end - start)), allocator: ByteBufferAllocator()) {
            case .success(let data?): fetched = data
            case .success(nil): throw VolumeIOError(operation: "read of the point for \(name)", errno: EIO)
            case .failure(let error): throw error
            }
            fetchedBytes.add(UInt64(fetched.readableBytes), ordering: .relaxed)
            try install(run, data: fetched)
        }
    }

    /// Writes fetched point data for `run` (its bytes, from the run's first block) into the
    /// blocks still missing, and marks them local.
    func install(_ run: Range<Int>, data: ByteBuffer) throws {
        let first = map.withLock { $0.range(of: run.lowerBound).offset }
        for block in run {
            let (offset, length) = map.withLock { $0.range(of: block) }
            let at = Int(offset - first)
            guard at + length <= data.readableBytes else { throw VolumeIOError(operation: "short read of the point for \(name)", errno: EIO) }
            try withStripe(block) {
                guard !map.withLock({ $0.isLocal(block) }) else { return }
                let failed = data.withUnsafeReadableBytes { FileIO.writeAll(fd, UnsafeRawBufferPointer(rebasing: $0[at..<(at + length)]), at: offset) }
                if failed != 0 { throw VolumeIOError(operation: "write to \(target)", errno: failed) }
                map.withLock { _ = $0.setLocal(block) }
                mapChanged.store(true, ordering: .relaxed)
            }
        }
        noteIfComplete()
    }

    /// Marks blocks of a zero range of the point local without fetching them: nothing to write
    /// on a target the agent made empty, zeroes written (or holes punched) otherwise.
    func installZero(_ run: Range<Int>) throws {
        let zeroed = targetZeroed
        for block in run {
            let (offset, length) = map.withLock { $0.range(of: block) }
            try withStripe(block) {
                guard !map.withLock({ $0.isLocal(block) }) else { return }
                if !zeroed { try Self.zero(fd, offset: offset, length: UInt64(length)) }
                map.withLock { _ = $0.setLocal(block) }
                mapChanged.store(true, ordering: .relaxed)
            }
        }
        noteIfComplete()
    }

    /// A workload write or zero of the range: blocks it covers only in part are made local
    /// first; blocks not local yet are written under their stripe locks (so the copier cannot
    /// install the point's copy over it) and marked local after.
    func change<T>(offset: UInt64, length: UInt64, _ body: () throws -> T) throws -> T {
        guard length > 0 else { return try body() }
        guard !isComplete else { return try body() }
        let range = blocks(offset: offset, length: length)
        let bb = UInt64(blockBytes)
        var partial: [Int] = []
        if offset % bb != 0 { partial.append(range.lowerBound) }
        let end = offset + length
        if end % bb != 0, end < size { partial.append(range.upperBound - 1) }
        for block in Set(partial) {
            let (o, l) = map.withLock { $0.range(of: block) }
            try ensureLocal(offset: o, length: UInt64(l))
        }
        let missing = missingRuns(in: range, maxBlocks: .max).flatMap { Array($0) }
        guard !missing.isEmpty else { return try body() }
        let locks = Array(Set(missing.map { $0 % Self.stripeCount })).sorted()
        for i in locks { stripes[i].lock() }
        defer { for i in locks.reversed() { stripes[i].unlock() } }
        let result = try body()
        map.withLock { m in for block in missing { m.setLocal(block) } }
        mapChanged.store(true, ordering: .relaxed)
        noteIfComplete()
        return result
    }

    private func withStripe<T>(_ block: Int, _ body: () throws -> T) rethrows -> T {
        let lock = stripes[block % Self.stripeCount]
        lock.lock()
        defer { lock.unlock() }
        return try body()
    }

    private func noteIfComplete() {
        guard map.withLock({ $0.isComplete }), !completed.exchange(true, ordering: .relaxed) else { return }
        do {
            try saveMap(force: true)
        } catch {
            logger.error("cannot save the hydration map", metadata: ["volume": "\(name)", "error": "\(error)"])
        }
        logger.info("recovered volume hydrated: every block is local", metadata: ["volume": "\(name)", "target": "\(target)"])
        onComplete()
    }

    /// Syncs the target, then saves the map as it was before the sync (so each bit saved is a
    /// block synced). Without `force`, only if bits were set since the last save.
    func saveMap(force: Bool = false) throws {
        saving.lock()
        defer { saving.unlock() }
        let changed = mapChanged.exchange(false, ordering: .relaxed)
        guard changed || force else { return }
        let snapshot = map.withLock { $0 }
        while fdatasync(fd) != 0 {
            if errno != EINTR {
                mapChanged.store(true, ordering: .relaxed)
                throw VolumeIOError(operation: "flush of \(target)", errno: errno)
            }
        }
        guard changed || !FileManager.default.fileExists(atPath: mapPath) else { return }
        do {
            try AtomicFile.write(snapshot.encoded(), to: mapPath, mode: 0o600)
        } catch {
            mapChanged.store(true, ordering: .relaxed)
            throw VolumeIOError(operation: "save of the hydration map \(mapPath)", errno: EIO)
        }
    }

    static func zero(_ fd: Int32, offset: UInt64, length: UInt64) throws {
        if ferry_punch_hole(fd, off_t(offset), off_t(length)) != 0 {
            guard errno == EOPNOTSUPP || errno == EINVAL else { throw VolumeIOError(operation: "zero", errno: errno) }
            try BlockVolume.writeZeroes(fd, offset: offset, length: length)
        }
    }
}
