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
    }

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
        if journalBytes > Self.journalLimit { try await checkpoint() }
        return durable
    }

    /// A new capture epoch: the agent restarted and numbers from 1 again. If the replica held
    /// anything, writes made between the last ack and the restart may be missing.
    private func startEpoch(_ epoch: UInt64) async throws {
        try await checkpoint()
        state.resyncNeeded = state.resyncNeeded || state.epoch != 0
        state.epoch = epoch
        state.checkpointed = 0
        durable = 0
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

/// Bounds on replication records.
enum NBDLimit {
    /// The agent's NBD export takes at most 32 MiB per request, so no record is larger.
    static let maxRecord = 32 << 20
}
