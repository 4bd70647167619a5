import CFerrySystem
import FerryNBD
import FerryWire
import Foundation
import NIOCore
import Synchronization

/// A place in a replica's journal: every record up to and including (`epoch`, `sequence`).
/// Epochs are random numbers the agent picks, so positions are ordered by the journal (see
/// `ReplicaStore.compare`), never by value. `sequence` 0 names the point just before the
/// epoch's first record; (0, 0) is the volume before anything was received.
public struct ReplicaPosition: Codable, Sendable, Hashable, CustomStringConvertible {
    public var epoch: UInt64
    public var sequence: UInt64

    public init(epoch: UInt64, sequence: UInt64) {
        self.epoch = epoch
        self.sequence = sequence
    }

    public var description: String { "epoch \(String(epoch, radix: 16)) sequence \(sequence)" }
}

/// close(2), named apart from the images' own `close()`.
private func closeDescriptor(_ fd: Int32) { _ = close(fd) }

/// Counts a replica's open point images: while any is open the base image they read must not
/// change, so the replica does not fold.
final class ImageLeases: Sendable {
    private let count = Mutex(0)
    func acquire() { count.withLock { $0 += 1 } }
    func release() { count.withLock { $0 -= 1 } }
    var open: Int { count.withLock { $0 } }
}

/// A journal segment a point image is built from.
struct PointSource: Sendable {
    var path: String
    /// The segment's id.
    var segment: UInt64
    /// Bytes of records the replica knows to be durable: the active segment grows past it.
    var bytes: Int
    /// Records after this sequence are not part of the point (the position's own epoch).
    var through: UInt64?
}

/// A segment mapped read-only for as long as the image lives.
struct SegmentMapping: @unchecked Sendable {
    let base: UnsafeRawPointer
    let count: Int
    let path: String
    let segment: UInt64
}

/// A run of the volume whose point-in-time bytes come from one journal record, or are zeroes.
struct PointExtent: Sendable {
    var start: UInt64
    var end: UInt64
    /// Index into the mappings; -1 for a zeroed range.
    var mapping: Int32
    /// Offset in the mapped segment of the byte at `start`.
    var data: Int
    /// The record's index in the image's record table (its CRC is checked on first read).
    var record: Int32
}

/// Where a record of a point image lies: its segment's mapping and its header's offset there.
struct ImageRecord: Sendable {
    var mapping: Int32
    var header: Int
}

/// Which record last wrote each byte of the volume at a position, as a sorted array of
/// non-overlapping extents; bytes in no extent read from the base image.
///
/// Built by a sweep over the records' start and end points, with a max-heap of the records
/// covering the current point keyed by journal order: the newest covering record wins, so
/// any offset and length (partial overlaps included) is exact, and the cost is
/// O(records · log records) whatever the volume's size.
enum PointIndex {
    struct Record {
        var start: UInt64
        var end: UInt64
        /// -1 for a zeroed range.
        var mapping: Int32
        var payload: Int
        /// The segment's mapping, and the header's offset there.
        var segment: Int32
        var header: Int
    }

    /// What `build` returns: the caller owns the mappings.
    struct Built {
        var mappings: [SegmentMapping]
        var extents: [PointExtent]
        var records: [ImageRecord]
        /// The checkpoint made at the end of the segment asked for, if the walk got there.
        var made: PointCheckpoint?
        /// Segments whose records were walked (the rest came from the checkpoint).
        var walked: Int
    }

    /// Maps the sources and indexes their records. With a checkpoint (at the end of one of the
    /// sources), the sources up to it are mapped but not walked: the index starts from it.
    /// With `checkpointAt`, a new checkpoint is made at the end of that source (a sealed
    /// segment wholly in the point, after `checkpoint`).
    static func build(_ sources: [PointSource], size: UInt64, from checkpoint: PointCheckpoint? = nil,
                      checkpointAt: UInt64? = nil) throws -> Built {
        var mappings: [SegmentMapping] = []
        var records: [Record] = []
        var made: PointCheckpoint?
        var walkedSegments = 0
        do {
            var mappingOf: [UInt64: Int32] = [:]
            for source in sources where source.bytes > 0 {
                mappings.append(try map(source))
                mappingOf[source.segment] = Int32(mappings.count - 1)
            }
            var lastEpoch: UInt64 = 0, lastSequence: UInt64 = 0
            if let checkpoint {
                records = Self.records(of: checkpoint, mappingOf: mappingOf)
                lastEpoch = checkpoint.lastEpoch
                lastSequence = checkpoint.lastSequence
            }
            scanning: for source in sources where source.bytes > 0 {
                if let checkpoint, source.segment <= checkpoint.segment { continue }
                guard let index = mappingOf[source.segment] else { continue }
                let mapping = mappings[Int(index)]
                var stopped = false
                walkedSegments += 1
                // Headers only: reading each payload to check its CRC would make opening cost
                // the journal's size. A record's CRC is checked when a read first needs it.
                let walked = JournalRecord.walkHeaders(UnsafeRawBufferPointer(start: mapping.base, count: mapping.count), size: size) { h in
                    if let through = source.through, h.sequence > through { stopped = true; return false }
                    // A duplicate of a record already read (never appended, but recovery
                    // tolerates them) would bring old bytes back.
                    if h.epoch == lastEpoch, h.sequence <= lastSequence, lastEpoch != 0 { return true }
                    lastEpoch = h.epoch
                    lastSequence = h.sequence
                    // A resize changes no byte: the image's size is the point's own.
                    if h.kind == .resize { return true }
                    records.append(Record(start: h.offset, end: h.offset + h.length, mapping: h.kind == .zeroed ? -1 : index, payload: h.payload,
                                          segment: index, header: h.payload - JournalRecord.headerSize))
                    return true
                }
                // The walk touched (nearly) every page of the segment: drop them from this
                // mapping (the page cache keeps them), so an open image holds only what is read
                // through it, not every segment it spans, in its resident size.
                _ = madvise(UnsafeMutableRawPointer(mutating: mapping.base), mapping.count, MADV_DONTNEED)
                if stopped { break scanning }
                // Its durable part is whole records: anything else is damage, and an image
                // built past it would silently miss writes.
                guard walked == mapping.count else {
                    throw FerryError(.io, "journal segment \(source.path) has an unreadable record at byte \(walked) of \(mapping.count); the replica needs a resync")
                }
                if source.segment == checkpointAt {
                    // The records so far collapse to their extents: the checkpoint, and the
                    // start of what the rest of the walk adds to.
                    let extents = sweep(records).map { e in
                        let r = records[Int(e.record)]
                        return PointCheckpoint.Extent(start: e.start, end: e.end, segment: mappings[Int(r.segment)].segment,
                                                      header: r.header, data: e.data, zeroed: e.mapping < 0)
                    }
                    let checkpoint = PointCheckpoint(segment: source.segment, bytes: source.bytes, lastEpoch: lastEpoch,
                                                     lastSequence: lastSequence, extents: extents)
                    records = Self.records(of: checkpoint, mappingOf: mappingOf)
                    made = checkpoint
                }
            }
        } catch {
            unmap(mappings)
            throw error
        }
        return Built(mappings: mappings, extents: sweep(records), records: records.map { ImageRecord(mapping: $0.segment, header: $0.header) },
                     made: made, walked: walkedSegments)
    }

    /// A checkpoint's extents as records, oldest first (they do not overlap); those of a
    /// segment not mapped (folded into the base since) are left to the base.
    private static func records(of checkpoint: PointCheckpoint, mappingOf: [UInt64: Int32]) -> [Record] {
        var records: [Record] = []
        records.reserveCapacity(checkpoint.extents.count)
        for e in checkpoint.extents {
            guard let index = mappingOf[e.segment] else { continue }
            records.append(Record(start: e.start, end: e.end, mapping: e.zeroed ? -1 : index, payload: e.zeroed ? 0 : e.data,
                                  segment: index, header: e.header))
        }
        return records
    }

    private static func map(_ source: PointSource) throws -> SegmentMapping {
        let fd = open(source.path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw FerryError(.io, "cannot open journal segment \(source.path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw FerryError(.io, "cannot stat journal segment \(source.path): \(String(cString: strerror(errno)))") }
        guard Int(st.st_size) >= source.bytes else {
            throw FerryError(.io, "journal segment \(source.path) holds \(st.st_size) bytes, fewer than the \(source.bytes) recorded as durable")
        }
        // Only the durable prefix: an append in progress, or cut back after a failure, lies past it.
        guard let mapped = mmap(nil, source.bytes, PROT_READ, MAP_SHARED, fd, 0), mapped != MAP_FAILED else {
            throw FerryError(.io, "cannot map journal segment \(source.path): \(String(cString: strerror(errno)))")
        }
        return SegmentMapping(base: UnsafeRawPointer(mapped), count: source.bytes, path: source.path, segment: source.segment)
    }

    static func unmap(_ mappings: [SegmentMapping]) {
        for m in mappings { munmap(UnsafeMutableRawPointer(mutating: m.base), m.count) }
    }

    /// The extents of the newest record covering each byte, from records in journal order.
    static func sweep(_ records: [Record]) -> [PointExtent] {
        guard !records.isEmpty else { return [] }
        // Start and end points; a record's index is its journal order (its priority).
        var events: [(at: UInt64, record: Int32, start: Bool)] = []
        events.reserveCapacity(records.count * 2)
        for (i, r) in records.enumerated() where r.end > r.start {
            events.append((r.start, Int32(i), true))
            events.append((r.end, Int32(i), false))
        }
        events.sort { $0.at < $1.at }
        var ended = [Bool](repeating: false, count: records.count)
        var heap = MaxHeap()
        var extents: [PointExtent] = []
        var e = 0
        while e < events.count {
            let at = events[e].at
            while e < events.count, events[e].at == at {
                if events[e].start { heap.push(events[e].record) } else { ended[Int(events[e].record)] = true }
                e += 1
            }
            while let top = heap.top, ended[Int(top)] { heap.pop() }
            guard e < events.count, let top = heap.top else { continue }
            let next = events[e].at
            let r = records[Int(top)]
            let data = r.mapping < 0 ? 0 : r.payload + Int(at - r.start)
            // Runs of one record merge; different records stay apart (each has its own CRC).
            if var last = extents.last, last.end == at, last.record == top {
                last.end = next
                extents[extents.count - 1] = last
            } else {
                extents.append(PointExtent(start: at, end: next, mapping: r.mapping, data: data, record: top))
            }
        }
        return extents
    }

    struct MaxHeap {
        private var items: [Int32] = []
        var top: Int32? { items.first }

        mutating func push(_ x: Int32) {
            items.append(x)
            var i = items.count - 1
            while i > 0 {
                let parent = (i - 1) / 2
                guard items[parent] < items[i] else { break }
                items.swapAt(parent, i)
                i = parent
            }
        }

        mutating func pop() {
            guard !items.isEmpty else { return }
            items.swapAt(0, items.count - 1)
            items.removeLast()
            var i = 0
            while true {
                let l = 2 * i + 1, r = l + 1
                var largest = i
                if l < items.count, items[l] > items[largest] { largest = l }
                if r < items.count, items[r] > items[largest] { largest = r }
                guard largest != i else { return }
                items.swapAt(i, largest)
                i = largest
            }
        }
    }
}

/// A volume as it was at a position of its replica's journal, read in place from the base
/// image and the journal segments (nothing is copied), optionally with a copy-on-write
/// overlay that takes writes (drills, failover) and leaves the point itself unchanged.
///
/// Its methods block (file I/O): call them from threads of their own, never an event loop.
/// While it is open the replica does not fold; `close()` (or the last reference going)
/// releases it.
public final class PointImage: Sendable {
    /// The volume's size in bytes.
    public let size: UInt64
    /// The journal position the image shows.
    public let position: ReplicaPosition
    /// Whether the image takes writes (it was opened with an overlay directory).
    public var writable: Bool { overlay != nil }

    private let extents: [PointExtent]
    private let mappings: [SegmentMapping]
    private let records: [ImageRecord]
    /// Records whose CRC was checked, a bit each: opening reads only headers, so a record is
    /// checked the first time a read needs its bytes, and once.
    private let verified: Mutex<[UInt64]>
    /// Told of a record found damaged (the segment, the record's offset in it, its path).
    private let onDamage: (@Sendable (UInt64, Int, String) -> Void)?
    private let base: Int32
    private let overlay: Overlay?
    private let leases: ImageLeases
    private let made: Mutex<PointCheckpoint?>
    private let life = Mutex(Life())

    private struct Life {
        var closed = false
        /// Calls in progress: resources are released when the last one ends after `close()`.
        var users = 0
        var released = false
    }

    /// Maps and indexes `sources` over `basePath`. Blocking; the caller has taken a lease,
    /// which the image gives back when released (the caller keeps it if this throws).
    init(size: UInt64, position: ReplicaPosition, basePath: String, sources: [PointSource],
         from checkpoint: PointCheckpoint? = nil, checkpointAt: UInt64? = nil,
         overlayDirectory: String?, leases: ImageLeases, onDamage: (@Sendable (UInt64, Int, String) -> Void)? = nil) throws {
        let base = open(basePath, O_RDONLY | O_CLOEXEC)
        guard base >= 0 else { throw FerryError(.io, "cannot open the base image \(basePath): \(String(cString: strerror(errno)))") }
        let index: PointIndex.Built
        do {
            index = try PointIndex.build(sources, size: size, from: checkpoint, checkpointAt: checkpointAt)
        } catch {
            closeDescriptor(base)
            throw error
        }
        var overlay: Overlay?
        if let overlayDirectory {
            do {
                overlay = try Overlay(directory: overlayDirectory, size: size, position: position)
            } catch {
                closeDescriptor(base)
                PointIndex.unmap(index.mappings)
                throw error
            }
        }
        self.size = size
        self.position = position
        self.base = base
        self.extents = index.extents
        self.mappings = index.mappings
        self.records = index.records
        self.verified = Mutex([UInt64](repeating: 0, count: (index.records.count + 63) / 64))
        self.onDamage = onDamage
        self.overlay = overlay
        self.leases = leases
        self.made = Mutex(index.made)
        self.walkedSegments = index.walked
    }

    /// The checkpoint opening made, once: the replica keeps it for the images after it.
    func takeCheckpoint() -> PointCheckpoint? { made.withLock { c in defer { c = nil }; return c } }

    deinit {
        _ = try? releaseResources()
    }

    /// Extents of the point (journal records and zeroed ranges); the rest reads from the base.
    var extentCount: Int { extents.count }
    /// Journal segments mapped, and those whose records opening walked (not from a checkpoint).
    var segmentCount: Int { mappings.count }
    let walkedSegments: Int

    /// Closes the image: later calls fail; calls in progress finish first. A writable image's
    /// overlay is flushed and its block map saved, so it can be opened again.
    public func close() throws {
        let release = life.withLock { life -> Bool in
            guard !life.closed else { return false }
            life.closed = true
            return life.users == 0
        }
        if release { try releaseResources() }
    }

    private func releaseResources() throws {
        let first = life.withLock { life -> Bool in
            defer { life.released = true }
            return !life.released
        }
        guard first else { return }
        defer {
            PointIndex.unmap(mappings)
            closeDescriptor(base)
            overlay?.closeFile()
            leases.release()
        }
        try overlay?.flush()
    }

    /// Runs `body` unless the image is closed, keeping its resources alive meanwhile.
    private func use<T>(_ body: () throws -> T) throws -> T {
        try life.withLock { life in
            guard !life.closed else { throw FerryError(.conflict, "the point image at \(position) is closed") }
            life.users += 1
        }
        defer {
            let release = life.withLock { life -> Bool in
                life.users -= 1
                return life.closed && life.users == 0
            }
            if release { _ = try? releaseResources() }
        }
        return try body()
    }

    private func check(_ offset: UInt64, _ length: UInt64, _ what: String) throws {
        let (end, overflow) = offset.addingReportingOverflow(length)
        guard !overflow, end <= size else {
            throw FerryError(.badRequest, "\(what) of \(length) bytes at \(offset) lies outside the \(size)-byte volume")
        }
    }

    private func writableOverlay() throws -> Overlay {
        guard let overlay else {
            throw FerryError(.conflict, "the point image at \(position) is read-only: open it with an overlay directory to write to it")
        }
        return overlay
    }

    /// Appends exactly `length` bytes of the image at `offset` to `buffer`.
    public func read(offset: UInt64, length: Int, into buffer: inout ByteBuffer) throws {
        guard length >= 0 else { throw FerryError(.badRequest, "a read of \(length) bytes") }
        try check(offset, UInt64(length), "a read")
        try use {
            _ = try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { out in
                try fill(UnsafeMutableRawBufferPointer(rebasing: out[0..<length]), at: offset)
                return length
            }
        }
    }

    /// Writes `data` at `offset` into the overlay (writable images only).
    public func write(offset: UInt64, data: ByteBuffer) throws {
        let overlay = try writableOverlay()
        try check(offset, UInt64(data.readableBytes), "a write")
        guard data.readableBytes > 0 else { return }
        try use {
            try overlay.exclusive {
                try copyPartialBlocks(offset: offset, length: UInt64(data.readableBytes), overlay: overlay)
                let failed = data.withUnsafeReadableBytes { FileIO.writeAll(overlay.fd, $0, at: offset) }
                if failed != 0 { throw FerryError(.io, "overlay write failed: \(String(cString: strerror(failed)))") }
                overlay.hold(offset: offset, length: UInt64(data.readableBytes))
            }
        }
    }

    /// Makes `length` bytes at `offset` read as zeroes, in the overlay (writable images only).
    public func zero(offset: UInt64, length: UInt64) throws {
        let overlay = try writableOverlay()
        try check(offset, length, "a zeroing")
        guard length > 0 else { return }
        try use {
            try overlay.exclusive {
                try copyPartialBlocks(offset: offset, length: length, overlay: overlay)
                try overlay.zeroFile(offset: offset, length: length)
                overlay.hold(offset: offset, length: length)
            }
        }
    }

    /// Makes the overlay's writes durable, with its block map (writable images only).
    public func flush() throws {
        let overlay = try writableOverlay()
        try use { try overlay.exclusive { try overlay.flushLocked() } }
    }

    /// Writes the image (the overlay's writes included) to `path` as a plain raw image of
    /// `size` bytes, sparse: all-zero MiB chunks are skipped, not written.
    public func copy(toFile path: String) throws {
        try use {
            let out = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            guard out >= 0 else { throw FerryError(.io, "cannot create \(path): \(String(cString: strerror(errno)))") }
            defer { closeDescriptor(out) }
            let chunk = 1 << 20
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
            defer { buffer.deallocate() }
            let zeroes = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
            defer { zeroes.deallocate() }
            zeroes.initializeMemory(as: UInt8.self, repeating: 0)
            var at: UInt64 = 0
            while at < size {
                let n = Int(min(UInt64(chunk), size - at))
                if !mayHoldData(offset: at, length: UInt64(n)) { at += UInt64(n); continue }
                let view = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n])
                try fill(view, at: at)
                if memcmp(view.baseAddress!, zeroes.baseAddress!, n) != 0 {
                    let failed = FileIO.writeAll(out, UnsafeRawBufferPointer(view), at: at)
                    if failed != 0 { throw FerryError(.io, "cannot write \(path): \(String(cString: strerror(failed)))") }
                }
                at += UInt64(n)
            }
            guard ftruncate(out, off_t(size)) == 0, fsync(out) == 0 else {
                throw FerryError(.io, "cannot finish \(path): \(String(cString: strerror(errno)))")
            }
        }
    }

    /// False when the range certainly reads as zeroes: no record or overlay block in it, and
    /// only holes of the base image (a sparse volume exports without reading its holes).
    private func mayHoldData(offset: UInt64, length: UInt64) -> Bool {
        let end = offset + length
        let i = firstExtent(endingAfter: offset)
        if i < extents.count, extents[i].start < end { return true }
        if let overlay, overlay.holdsAny(offset: offset, length: length) { return true }
        let data = ferry_seek_data(base, off_t(offset))
        if data < 0 { return errno != ENXIO } // past the last data: all holes
        return UInt64(data) < end
    }

    /// The `base:allocation` map of `[offset, offset + length)` (NBD block status): overlay
    /// blocks are data; journal records data, zeroed records unallocated zeroes; elsewhere the
    /// base image's own holes and data. At most `limit` runs, covering a prefix if more.
    public func allocation(offset: UInt64, length: UInt64, limit: Int) throws -> [NBDExtent] {
        try check(offset, length, "a block status")
        return try use {
            var list = NBDExtentList(limit: limit)
            let end = offset + length
            if let overlay {
                for run in overlay.runs(offset: offset, length: length) {
                    let more = run.held ? list.append(run.end - run.start, flags: 0) : pointAllocation(from: run.start, to: run.end, into: &list)
                    if !more { break }
                }
            } else {
                pointAllocation(from: offset, to: end, into: &list)
            }
            return list.extents
        }
    }

    @discardableResult
    private func pointAllocation(from: UInt64, to: UInt64, into list: inout NBDExtentList) -> Bool {
        var i = firstExtent(endingAfter: from)
        var at = from
        while at < to {
            if i < extents.count, extents[i].start <= at {
                let e = extents[i]
                let n = min(e.end, to)
                guard list.append(n - at, flags: e.mapping < 0 ? NBDExtent.unallocated : 0) else { return false }
                at = n
                i += 1
            } else {
                let gapEnd = i < extents.count ? min(extents[i].start, to) : to
                guard FileAllocation.append(fd: base, from: at, to: gapEnd, into: &list) else { return false }
                at = gapEnd
            }
        }
        return true
    }

    /// Index of the first extent ending after `offset` (extents are sorted and disjoint).
    private func firstExtent(endingAfter offset: UInt64) -> Int {
        var lo = 0, hi = extents.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if extents[mid].end <= offset { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    /// Fills `out` with the image at `offset`: overlay blocks first, the point elsewhere.
    private func fill(_ out: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        guard let overlay, out.count > 0 else { return try fillPoint(out, at: offset) }
        for run in overlay.runs(offset: offset, length: UInt64(out.count)) {
            let piece = UnsafeMutableRawBufferPointer(rebasing: out[Int(run.start - offset)..<Int(run.end - offset)])
            if run.held {
                try Self.readFully(overlay.fd, into: piece, at: run.start, what: "the overlay")
            } else {
                try fillPoint(piece, at: run.start)
            }
        }
    }

    /// Fills `out` with the point's bytes at `offset`: journal records, zeroes, the base.
    private func fillPoint(_ out: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        let stop = offset + UInt64(out.count)
        var i = firstExtent(endingAfter: offset)
        var at = offset
        while at < stop {
            let into = out.baseAddress! + Int(at - offset)
            if i < extents.count, extents[i].start <= at {
                let e = extents[i]
                try verify(e.record)
                let n = Int(min(e.end, stop) - at)
                if e.mapping < 0 {
                    into.initializeMemory(as: UInt8.self, repeating: 0, count: n)
                } else {
                    into.copyMemory(from: mappings[Int(e.mapping)].base + e.data + Int(at - e.start), byteCount: n)
                }
                at += UInt64(n)
                i += 1
            } else {
                let gapEnd = i < extents.count ? min(extents[i].start, stop) : stop
                try Self.readFully(base, into: UnsafeMutableRawBufferPointer(start: into, count: Int(gapEnd - at)), at: at, what: "the base image")
                at = gapEnd
            }
        }
    }

    /// Checks a record's CRC the first time a read needs it: a damaged record fails the read
    /// rather than return wrong bytes.
    private func verify(_ record: Int32) throws {
        let word = Int(record) / 64, bit = UInt64(1) << (UInt64(record) % 64)
        if verified.withLock({ $0[word] & bit != 0 }) { return }
        let r = records[Int(record)]
        let mapping = mappings[Int(r.mapping)]
        guard JournalRecord.verify(UnsafeRawBufferPointer(start: mapping.base, count: mapping.count), header: r.header) else {
            onDamage?(mapping.segment, r.header, mapping.path)
            throw FerryError(.io, "journal segment \(mapping.path) is damaged: the record at byte \(r.header) fails its CRC check, so the point at \(position) cannot be read there; the replica needs a full resync (`ferryctl volume resync HOST/VOLUME`)")
        }
        verified.withLock { $0[word] |= bit }
    }

    /// pread until `out` is full; past the end of the file it reads as zeroes.
    static func readFully(_ fd: Int32, into out: UnsafeMutableRawBufferPointer, at offset: UInt64, what: String) throws {
        var done = 0
        while done < out.count {
            let n = pread(fd, out.baseAddress! + done, out.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw FerryError(.io, "cannot read \(what) at \(offset + UInt64(done)): \(String(cString: strerror(errno)))")
            }
            if n == 0 {
                (out.baseAddress! + done).initializeMemory(as: UInt8.self, repeating: 0, count: out.count - done)
                return
            }
            done += n
        }
    }

    /// Copy-on-write: the first and last blocks of a write that covers them only in part get
    /// the point's bytes in the overlay first, since the overlay holds whole blocks.
    private func copyPartialBlocks(offset: UInt64, length: UInt64, overlay: Overlay) throws {
        let bs = Overlay.blockBytes
        let end = offset + length
        var blocks = [offset / bs]
        if (end - 1) / bs != offset / bs { blocks.append((end - 1) / bs) }
        for block in blocks {
            let start = block * bs, blockEnd = min(start + bs, size)
            guard offset > start || end < blockEnd, !overlay.holds(block: block) else { continue }
            var copy = [UInt8](repeating: 0, count: Int(blockEnd - start))
            try copy.withUnsafeMutableBytes { try fillPoint($0, at: start) }
            let failed = copy.withUnsafeBytes { FileIO.writeAll(overlay.fd, $0, at: start) }
            if failed != 0 { throw FerryError(.io, "overlay write failed: \(String(cString: strerror(failed)))") }
        }
    }
}

/// A writable image's overlay in its directory: `overlay.img` (sparse, the volume's size)
/// holds whole 4 KiB blocks written through the image, `overlay.map` which blocks it holds,
/// saved on flush and close (written blocks not yet flushed may be lost in a crash).
final class Overlay: Sendable {
    static let blockBytes: UInt64 = 4096
    static let magic: UInt32 = 0x464F_5631 // "FOV1"

    let fd: Int32
    let directory: String
    let size: UInt64
    let position: ReplicaPosition
    /// Held blocks, 64 to a word, by word index: sparse, so a huge volume costs nothing.
    private let map = Mutex(Blocks())
    /// Writes, zeroings and flushes run one at a time: copy-on-write reads a block and writes
    /// it back, which a concurrent write to the same block must not interleave with.
    private let writer = Mutex(())

    struct Blocks {
        var words: [UInt64: UInt64] = [:]
        var dirty = false
    }

    var mapPath: String { directory + "/overlay.map" }

    init(directory: String, size: UInt64, position: ReplicaPosition) throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        self.directory = directory
        self.size = size
        self.position = position
        var blocks = Blocks()
        if let saved = FileManager.default.contents(atPath: directory + "/overlay.map") {
            blocks.words = try Self.decode(saved, size: size, position: position, directory: directory)
        }
        let fd = open(directory + "/overlay.img", O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw FerryError(.io, "cannot open the overlay in \(directory): \(String(cString: strerror(errno)))") }
        var st = stat()
        guard fstat(fd, &st) == 0, UInt64(st.st_size) == size || ftruncate(fd, off_t(size)) == 0 else {
            let message = String(cString: strerror(errno))
            closeDescriptor(fd)
            throw FerryError(.io, "cannot size the overlay in \(directory): \(message)")
        }
        self.fd = fd
        map.withLock { $0 = blocks }
    }

    func closeFile() { closeDescriptor(fd) }

    func exclusive(_ body: () throws -> Void) throws {
        try writer.withLock { _ in try body() }
    }

    func holds(block: UInt64) -> Bool {
        map.withLock { ($0.words[block / 64] ?? 0) & (1 << (block % 64)) != 0 }
    }

    func holdsAny(offset: UInt64, length: UInt64) -> Bool {
        let first = offset / Self.blockBytes, last = (offset + length - 1) / Self.blockBytes
        return map.withLock { blocks in
            var word = first / 64
            while word <= last / 64 {
                if let bits = blocks.words[word], bits != 0 {
                    for b in max(first, word * 64)...min(last, word * 64 + 63) where bits & (1 << (b % 64)) != 0 { return true }
                }
                word += 1
            }
            return false
        }
    }

    /// Marks the blocks of a range written (after their bytes are in the overlay file, so a
    /// concurrent read sees either the point's bytes or the new ones).
    func hold(offset: UInt64, length: UInt64) {
        let first = offset / Self.blockBytes, last = (offset + length - 1) / Self.blockBytes
        map.withLock { blocks in
            var b = first
            while b <= last {
                let word = b / 64, bit = b % 64
                let count = min(64 - bit, last - b + 1)
                let mask: UInt64 = count == 64 ? ~0 : ((1 << count) - 1) << bit
                blocks.words[word, default: 0] |= mask
                b += count
            }
            blocks.dirty = true
        }
    }

    /// Runs of a range that are all held by the overlay, or all not.
    func runs(offset: UInt64, length: UInt64) -> [(start: UInt64, end: UInt64, held: Bool)] {
        let end = offset + length
        return map.withLock { blocks in
            var runs: [(start: UInt64, end: UInt64, held: Bool)] = []
            var at = offset
            while at < end {
                let block = at / Self.blockBytes
                let held = (blocks.words[block / 64] ?? 0) & (1 << (block % 64)) != 0
                let next = min((block + 1) * Self.blockBytes, end)
                if let last = runs.last, last.held == held {
                    runs[runs.count - 1].end = next
                } else {
                    runs.append((at, next, held))
                }
                at = next
            }
            return runs
        }
    }

    /// Zeroes a range of the overlay file: a hole where the file system can punch one.
    func zeroFile(offset: UInt64, length: UInt64) throws {
        if ferry_punch_hole(fd, off_t(offset), off_t(length)) == 0 { return }
        let chunk = 1 << 20
        let zeroes = [UInt8](repeating: 0, count: chunk)
        var at = offset
        while at < offset + length {
            let n = Int(min(UInt64(chunk), offset + length - at))
            let failed = zeroes.withUnsafeBytes { FileIO.writeAll(fd, UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: at) }
            if failed != 0 { throw FerryError(.io, "overlay zeroing failed: \(String(cString: strerror(failed)))") }
            at += UInt64(n)
        }
    }

    func flush() throws {
        try exclusive { try flushLocked() }
    }

    /// The overlay's bytes are made durable before the map that points at them.
    func flushLocked() throws {
        guard fdatasync(fd) == 0 else { throw FerryError(.io, "overlay fdatasync failed: \(String(cString: strerror(errno)))") }
        let snapshot = map.withLock { blocks -> [UInt64: UInt64]? in
            guard blocks.dirty else { return nil }
            blocks.dirty = false
            return blocks.words
        }
        guard let words = snapshot else { return }
        do {
            try save(words)
        } catch {
            map.withLock { $0.dirty = true }
            throw error
        }
    }

    private func save(_ words: [UInt64: UInt64]) throws {
        var out = ByteBuffer()
        out.writeInteger(Self.magic)
        out.writeInteger(UInt32(Self.blockBytes))
        out.writeInteger(size)
        out.writeInteger(position.epoch)
        out.writeInteger(position.sequence)
        let held = words.filter { $0.value != 0 }.sorted { $0.key < $1.key }
        out.writeInteger(UInt64(held.count))
        for (word, bits) in held {
            out.writeInteger(word)
            out.writeInteger(bits)
        }
        let crc = out.withUnsafeReadableBytes { ferry_crc32c(0, $0.baseAddress, $0.count) }
        out.writeInteger(crc)
        let temporary = mapPath + ".tmp"
        let file = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard file >= 0 else { throw FerryError(.io, "cannot write \(temporary): \(String(cString: strerror(errno)))") }
        let failed = out.withUnsafeReadableBytes { FileIO.writeAll(file, $0, at: 0) }
        let synced = failed == 0 && fsync(file) == 0
        closeDescriptor(file)
        guard synced, rename(temporary, mapPath) == 0 else {
            throw FerryError(.io, "cannot save the overlay map \(mapPath): \(String(cString: strerror(failed != 0 ? failed : errno)))")
        }
        let dir = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dir >= 0 { fsync(dir); closeDescriptor(dir) }
    }

    private static func decode(_ data: Data, size: UInt64, position: ReplicaPosition, directory: String) throws -> [UInt64: UInt64] {
        var buffer = ByteBuffer(bytes: data)
        let bad = FerryError(.io, "the overlay map in \(directory) is damaged: remove the directory to start the overlay afresh")
        guard buffer.readableBytes >= 44 else { throw bad }
        let crc = buffer.getInteger(at: buffer.writerIndex - 4, as: UInt32.self)!
        guard data.withUnsafeBytes({ ferry_crc32c(0, $0.baseAddress, $0.count - 4) }) == crc else { throw bad }
        guard buffer.readInteger(as: UInt32.self) == magic, buffer.readInteger(as: UInt32.self) == UInt32(blockBytes) else { throw bad }
        let savedSize = buffer.readInteger(as: UInt64.self)!
        let saved = ReplicaPosition(epoch: buffer.readInteger(as: UInt64.self)!, sequence: buffer.readInteger(as: UInt64.self)!)
        guard saved == position, savedSize == size else {
            throw FerryError(.conflict, "the overlay in \(directory) belongs to the point at \(saved) (\(savedSize) bytes), not \(position) (\(size) bytes): use another directory")
        }
        let count = buffer.readInteger(as: UInt64.self)!
        guard UInt64(buffer.readableBytes - 4) == count * 16 else { throw bad }
        var words: [UInt64: UInt64] = [:]
        words.reserveCapacity(Int(count))
        for _ in 0..<count {
            let word = buffer.readInteger(as: UInt64.self)!, bits = buffer.readInteger(as: UInt64.self)!
            words[word] = bits
        }
        return words
    }
}
