import CFerrySystem
import FerryWire
import Foundation
import NIOCore
import NIOPosix

/// One volume's replica on the controller: an append-only journal of the records received,
/// each checked by CRC32C and made durable (fdatasync) before it is acked, and a replica image
/// the records are applied to, in sequence order.
///
/// On open, a torn or corrupt journal tail is cut at the last valid record and the journal is
/// replayed onto the image (idempotent, since records apply in order), so nothing acked is lost.
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

        public init() {}

        public init(from decoder: any Decoder) throws {
            // Fields added later default for state files written before them.
            let c = try decoder.container(keyedBy: CodingKeys.self)
            epoch = try c.decodeIfPresent(UInt64.self, forKey: .epoch) ?? 0
            resyncNeeded = try c.decodeIfPresent(Bool.self, forKey: .resyncNeeded) ?? false
            checkpointed = try c.decodeIfPresent(UInt64.self, forKey: .checkpointed) ?? 0
            initialSynced = try c.decodeIfPresent(Bool.self, forKey: .initialSynced) ?? false
            syncsCompleted = try c.decodeIfPresent(UInt64.self, forKey: .syncsCompleted) ?? 0
        }
    }

    /// What the agent last reported about the volume, and when.
    public private(set) var report: Ferry_V1_VolumeReport?
    public private(set) var reportedAt: Date?
    /// The last error applying the stream (cleared by the next batch applied).
    public private(set) var lastError: String?
    /// Bytes of data applied since the replica was opened.
    public private(set) var bytesApplied: UInt64 = 0
    /// Applied bytes per second, smoothed over about ten seconds.
    private var throughput = Throughput()
    /// A sync the agent reported finished, complete once this sequence is durable.
    private var completion: (through: UInt64, full: Bool)?

    public let directory: String
    public let size: UInt64
    public private(set) var state: State
    /// Last sequence of `state.epoch` on disk in the journal.
    public private(set) var durable: UInt64 = 0
    private let image: Int32
    private let journal: Int32
    private var journalBytes: Int64 = 0
    private let pool: NIOThreadPool

    static let recordMagic: UInt32 = 0x464A_5231 // "FJR1"
    static let headerSize = 4 + 4 + 8 + 8 + 8 + 8 + 4 // magic, crc, epoch, sequence, offset, length, kind
    /// Once the journal holds this much, the image is synced and the journal restarted.
    static let journalLimit: Int64 = 256 << 20

    public var imagePath: String { directory + "/replica.img" }

    /// Opens (or creates, sparse) the replica of a volume of `size` bytes in `directory`.
    public init(directory: String, size: UInt64, pool: NIOThreadPool) throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        self.directory = directory
        self.size = size
        self.pool = pool
        let image = open(directory + "/replica.img", O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        let journal = open(directory + "/journal.log", O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        guard image >= 0, journal >= 0 else {
            throw FerryError(.io, "cannot open the replica in \(directory): \(String(cString: strerror(errno)))")
        }
        self.image = image
        self.journal = journal
        var st = stat()
        fstat(image, &st)
        if UInt64(st.st_size) != size { ftruncate(image, off_t(size)) }
        state = (try? JSONDecoder().decode(State.self, from: Data(contentsOf: URL(fileURLWithPath: directory + "/state.json")))) ?? State()
        let recovered = try Self.recover(journal: journal, image: image, epoch: state.epoch, after: state.checkpointed, size: size)
        durable = recovered.durable
        journalBytes = recovered.validBytes
    }

    deinit {
        close(image)
        close(journal)
    }

    /// Appends a batch durably and applies it; returns the durable sequence to ack.
    /// Duplicates (at or below the durable sequence) are ignored; a gap is refused.
    public func apply(_ batch: Ferry_V1_ReplicationBatch) async throws -> UInt64 {
        do {
            let durable = try await applyChecked(batch)
            lastError = nil
            return durable
        } catch {
            lastError = (error as? FerryError)?.message ?? "\(error)"
            throw error
        }
    }

    private func applyChecked(_ batch: Ferry_V1_ReplicationBatch) async throws -> UInt64 {
        if batch.epoch != state.epoch { try await startEpoch(batch.epoch) }
        let fresh = batch.records.filter { $0.sequence > durable }
        guard let first = fresh.first else { return durable }
        guard first.sequence == durable + 1 else {
            throw FerryError(.protocolViolation, "replication gap: the replica holds \(durable), the next record is \(first.sequence)")
        }
        var entry = ByteBuffer()
        var expected = durable + 1
        for r in fresh {
            guard r.sequence == expected else {
                throw FerryError(.protocolViolation, "replication records out of order: expected \(expected), got \(r.sequence)")
            }
            expected += 1
            let length = r.data.isEmpty ? r.zeroLength : UInt64(r.data.count)
            let (end, overflow) = r.offset.addingReportingOverflow(length)
            let wellFormed = r.data.isEmpty ? r.zeroLength > 0 : (r.zeroLength == 0 && r.data.count <= NBDLimit.maxRecord)
            guard wellFormed, !overflow, end <= size else {
                throw FerryError(.protocolViolation, "replication record \(r.sequence) lies outside the \(size)-byte volume")
            }
            Self.encode(r, epoch: state.epoch, into: &entry)
        }
        let journal = self.journal, image = self.image
        let bytes = entry
        try await pool.runIfActive {
            try Self.writeAll(journal, bytes)
            guard fdatasync(journal) == 0 else { throw FerryError(.io, "journal fdatasync failed: \(String(cString: strerror(errno)))") }
            for r in fresh { try Self.applyToImage(image, r) }
        }
        journalBytes += Int64(bytes.readableBytes)
        durable = fresh.last!.sequence
        let dataBytes = fresh.reduce(UInt64(0)) { $0 + UInt64($1.data.count) }
        bytesApplied += dataBytes
        throughput.add(dataBytes)
        if journalBytes > Self.journalLimit { try await checkpoint() }
        try completeSyncIfDurable()
        return durable
    }

    /// The agent's periodic report. A sync it reports finished (nothing pending in this epoch)
    /// completes once everything it captured up to then is durable here.
    public func note(_ report: Ferry_V1_VolumeReport) throws {
        self.report = report
        reportedAt = Date()
        guard report.epoch == state.epoch || state.epoch == 0 else {
            completion = nil
            return
        }
        if report.sync.pendingExtents == 0, !report.overflowed {
            if completion == nil, state.resyncNeeded || !state.initialSynced {
                completion = (report.lastSequence, report.sync.kind == .full || report.sync.kind == .scan)
            }
        } else {
            completion = nil
        }
        try completeSyncIfDurable()
    }

    private func completeSyncIfDurable() throws {
        guard let c = completion, durable >= c.through, state.epoch != 0 || c.through == 0 else { return }
        completion = nil
        let wasInitial = !state.initialSynced
        guard state.resyncNeeded || (wasInitial && c.full) else { return }
        state.resyncNeeded = false
        if c.full { state.initialSynced = true }
        state.syncsCompleted += 1
        try saveState()
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
        guard request.offset % UInt64(block) == 0, request.offset < size,
              request.offset + UInt64(request.hashes.count - 1) * UInt64(block) < size else {
            throw FerryError(.badRequest, "resync range at \(request.offset) lies outside the \(size)-byte volume")
        }
        guard request.hashes.allSatisfy({ $0.isEmpty || $0.count == BlockHashing.hashBytes }) else {
            throw FerryError(.badRequest, "resync hashes must be empty or \(BlockHashing.hashBytes) bytes")
        }
        let image = self.image, size = self.size
        let ours = try await pool.runIfActive {
            try BlockHashing.hashes(fd: image, size: size, offset: request.offset, blockBytes: Int(block), count: request.hashes.count)
        }
        return zip(request.hashes, ours.hashes).enumerated().compactMap { i, pair in pair.0 == pair.1 ? nil : UInt32(i) }
    }

    /// A new capture epoch: the agent restarted and numbers from 1 again. If the replica held
    /// anything, writes made between the last ack and the restart may be missing.
    private func startEpoch(_ epoch: UInt64) async throws {
        try await checkpoint()
        state.resyncNeeded = state.resyncNeeded || state.epoch != 0
        state.epoch = epoch
        state.checkpointed = 0
        durable = 0
        // A completion reported in the old epoch names sequences that mean nothing now.
        completion = nil
        try saveState()
    }

    /// Makes the image durable, records how far it goes, then empties the journal. A crash
    /// between the two leaves records the image already has: recovery skips them.
    private func checkpoint() async throws {
        let journal = self.journal, image = self.image
        try await pool.runIfActive {
            guard fdatasync(image) == 0 else { throw FerryError(.io, "replica image fdatasync failed: \(String(cString: strerror(errno)))") }
        }
        state.checkpointed = durable
        try saveState()
        try await pool.runIfActive {
            guard ftruncate(journal, 0) == 0, fdatasync(journal) == 0 else {
                throw FerryError(.io, "replica journal truncate failed: \(String(cString: strerror(errno)))")
            }
        }
        journalBytes = 0
    }

    private func saveState() throws {
        let data = try JSONEncoder().encode(state)
        try PEMFiles.writePublic(String(decoding: data, as: UTF8.self), to: directory + "/state.json")
    }

    // MARK: Journal format

    static func encode(_ r: Ferry_V1_ReplicationRecord, epoch: UInt64, into buffer: inout ByteBuffer) {
        let start = buffer.writerIndex
        buffer.writeInteger(recordMagic)
        buffer.writeInteger(UInt32(0)) // CRC, filled below
        buffer.writeInteger(epoch)
        buffer.writeInteger(r.sequence)
        buffer.writeInteger(r.offset)
        buffer.writeInteger(r.data.isEmpty ? r.zeroLength : UInt64(r.data.count))
        buffer.writeInteger(UInt32(r.data.isEmpty ? 1 : 0))
        buffer.writeBytes(r.data)
        let crc = buffer.withUnsafeReadableBytes { all in
            ferry_crc32c(0, all.baseAddress! + (start - buffer.readerIndex) + 8, buffer.writerIndex - start - 8)
        }
        buffer.setInteger(crc, at: start + 4)
    }

    /// Scans the journal, cuts a torn or corrupt tail and replays the valid records of `epoch`
    /// that follow the checkpoint.
    static func recover(journal: Int32, image: Int32, epoch: UInt64, after checkpointed: UInt64, size: UInt64) throws -> (durable: UInt64, validBytes: Int64) {
        var st = stat()
        fstat(journal, &st)
        let total = Int(st.st_size)
        var data = [UInt8](repeating: 0, count: total)
        if total > 0 { _ = data.withUnsafeMutableBytes { pread(journal, $0.baseAddress, total, 0) } }
        var at = 0
        var durable = checkpointed
        var buffer = ByteBuffer(bytes: data)
        while buffer.readableBytes >= headerSize {
            let start = buffer.readerIndex
            guard let magic = buffer.readInteger(as: UInt32.self), magic == recordMagic,
                  let crc = buffer.readInteger(as: UInt32.self), let recordEpoch = buffer.readInteger(as: UInt64.self),
                  let sequence = buffer.readInteger(as: UInt64.self), let offset = buffer.readInteger(as: UInt64.self),
                  let length = buffer.readInteger(as: UInt64.self), let kind = buffer.readInteger(as: UInt32.self)
            else { break }
            let payload = kind == 0 ? Int(length) : 0
            guard length <= UInt64(NBDLimit.maxRecord), buffer.readableBytes >= payload else { break }
            let check = data.withUnsafeBytes { ferry_crc32c(0, $0.baseAddress! + start + 8, headerSize - 8 + payload) }
            guard check == crc, recordEpoch == epoch, offset + length <= size else { break }
            if sequence <= durable {
                // Already in the image (a crash came between checkpoint and truncation).
                buffer.moveReaderIndex(forwardBy: payload)
                at = buffer.readerIndex
                continue
            }
            guard sequence == durable + 1 else { break }
            var record = Ferry_V1_ReplicationRecord()
            record.sequence = sequence
            record.offset = offset
            if kind == 0 { record.data = Data(buffer.readBytes(length: payload)!) } else { record.zeroLength = length }
            try applyToImage(image, record)
            durable = sequence
            at = buffer.readerIndex
        }
        if at < total {
            // A torn or corrupt tail: what follows the last valid record was never acked.
            ftruncate(journal, off_t(at))
            fdatasync(journal)
        }
        return (durable, Int64(at))
    }

    static func applyToImage(_ image: Int32, _ r: Ferry_V1_ReplicationRecord) throws {
        if r.data.isEmpty {
            if ferry_punch_hole(image, off_t(r.offset), off_t(r.zeroLength)) != 0 {
                throw FerryError(.io, "cannot zero replica range: \(String(cString: strerror(errno)))")
            }
            return
        }
        let failed = r.data.withUnsafeBytes { FileIO.writeAll(image, $0, at: r.offset) }
        if failed != 0 { throw FerryError(.io, "replica write failed: \(String(cString: strerror(failed)))") }
    }

    static func writeAll(_ fd: Int32, _ buffer: ByteBuffer) throws {
        let failed = buffer.withUnsafeReadableBytes { FileIO.writeAll(fd, $0, at: nil) }
        if failed != 0 { throw FerryError(.io, "journal write failed: \(String(cString: strerror(failed)))") }
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
