import CFerrySystem
import FerryWire
import Foundation
import NIOCore

/// One append-only file of a replica's journal, `journal/ID.seg`, holding records of one
/// capture epoch in sequence order. Once full it is sealed: a `ID.meta` file beside it records
/// its range, so a restart need not read it again.
struct JournalSegment: Codable, Sendable {
    var id: UInt64
    var epoch: UInt64
    /// First and last sequence held (0, 0 while empty).
    var first: UInt64 = 0
    var last: UInt64 = 0
    var bytes: Int64 = 0
    /// Capture time (Unix nanoseconds) of the newest record: retention is measured from here.
    var newest: Int64 = 0

    static func name(_ id: UInt64) -> String { String(format: "%016llx", id) }
    func path(in directory: String) -> String { directory + "/" + Self.name(id) + ".seg" }
    func metaPath(in directory: String) -> String { directory + "/" + Self.name(id) + ".meta" }
}

/// The journal's on-disk record format: a header checked by CRC32C together with the payload.
enum JournalRecord {
    static let magic: UInt32 = 0x464A_5232 // "FJR2"
    /// magic, crc, epoch, sequence, offset, length, kind, captured
    static let headerSize = 4 + 4 + 8 + 8 + 8 + 8 + 4 + 8

    /// Writes a record's header; its CRC covers the header after the CRC field and the payload,
    /// which follows the header in the segment.
    static func encodeHeader(_ r: IncomingRecord, epoch: UInt64, into buffer: inout ByteBuffer) {
        let start = buffer.writerIndex
        buffer.writeInteger(magic)
        buffer.writeInteger(UInt32(0)) // CRC, filled below
        buffer.writeInteger(epoch)
        buffer.writeInteger(r.sequence)
        buffer.writeInteger(r.offset)
        buffer.writeInteger(r.length)
        buffer.writeInteger(UInt32(r.data == nil ? 1 : 0))
        buffer.writeInteger(r.captured)
        var crc = buffer.withUnsafeReadableBytes { all in
            ferry_crc32c(0, all.baseAddress! + (start - buffer.readerIndex) + 8, headerSize - 8)
        }
        if let data = r.data {
            crc = data.withUnsafeReadableBytes { ferry_crc32c(crc, $0.baseAddress, $0.count) }
        }
        buffer.setInteger(crc, at: start + 4)
    }

    /// A record read back from a segment.
    struct Decoded {
        var epoch: UInt64
        var record: Ferry_V1_ReplicationRecord
        /// Where the next record starts.
        var end: Int
    }

    /// Reads every valid record of `bytes` in order, calling `body` for each; stops at the
    /// first torn or corrupt one (or one outside a `size`-byte volume). Returns the length of
    /// the valid prefix.
    static func scan(_ bytes: [UInt8], size: UInt64, _ body: (Decoded) throws -> Void) rethrows -> Int {
        var buffer = ByteBuffer(bytes: bytes)
        var valid = 0
        while buffer.readableBytes >= headerSize {
            let start = buffer.readerIndex
            guard let magic = buffer.readInteger(as: UInt32.self), magic == Self.magic,
                  let crc = buffer.readInteger(as: UInt32.self), let epoch = buffer.readInteger(as: UInt64.self),
                  let sequence = buffer.readInteger(as: UInt64.self), let offset = buffer.readInteger(as: UInt64.self),
                  let length = buffer.readInteger(as: UInt64.self), let kind = buffer.readInteger(as: UInt32.self),
                  let captured = buffer.readInteger(as: Int64.self), kind <= 1
            else { break }
            guard length <= UInt64(NBDLimit.maxRecord) || kind == 1 else { break }
            let payload = kind == 0 ? Int(length) : 0
            guard buffer.readableBytes >= payload else { break }
            let check = bytes.withUnsafeBytes { ferry_crc32c(0, $0.baseAddress! + start + 8, headerSize - 8 + payload) }
            let (end, overflow) = offset.addingReportingOverflow(length)
            guard check == crc, !overflow, end <= size else { break }
            var record = Ferry_V1_ReplicationRecord()
            record.sequence = sequence
            record.offset = offset
            record.capturedUnixNanos = captured
            if kind == 0 { record.data = Data(buffer.readBytes(length: payload)!) } else { record.zeroLength = length }
            valid = buffer.readerIndex
            try body(Decoded(epoch: epoch, record: record, end: valid))
        }
        return valid
    }

    /// Applies one record to an image file: its bytes, or a hole for a zeroed range.
    static func apply(_ r: IncomingRecord, to image: Int32) throws {
        guard let data = r.data else {
            if ferry_punch_hole(image, off_t(r.offset), off_t(r.length)) != 0 {
                throw FerryError(.io, "cannot zero replica range: \(String(cString: strerror(errno)))")
            }
            return
        }
        let failed = data.withUnsafeReadableBytes { FileIO.writeAll(image, $0, at: r.offset) }
        if failed != 0 { throw FerryError(.io, "replica write failed: \(String(cString: strerror(failed)))") }
    }

    /// Applies a record read back from the journal.
    static func apply(_ r: Ferry_V1_ReplicationRecord, to image: Int32) throws {
        if r.data.isEmpty {
            if ferry_punch_hole(image, off_t(r.offset), off_t(r.zeroLength)) != 0 {
                throw FerryError(.io, "cannot zero replica range: \(String(cString: strerror(errno)))")
            }
            return
        }
        let failed = r.data.withUnsafeBytes { FileIO.writeAll(image, $0, at: r.offset) }
        if failed != 0 { throw FerryError(.io, "replica write failed: \(String(cString: strerror(failed)))") }
    }

    static func readWhole(_ path: String) throws -> [UInt8] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw FerryError(.io, "cannot read journal segment \(path)")
        }
        return [UInt8](data)
    }
}

/// A replication record as received, checked against the volume: a write with its bytes
/// (an attachment of the batch, not copied) or a zeroed range.
struct IncomingRecord: Sendable {
    var sequence: UInt64
    var offset: UInt64
    /// Bytes written or zeroed.
    var length: UInt64
    var captured: Int64
    /// The bytes of a write; nil for a zeroed range.
    var data: ByteBuffer?

    /// The records of a batch. A write's bytes are in the record, or, when its `data` is empty,
    /// in the batch's next attachment (large writes travel that way, uncopied).
    static func of(_ batch: Ferry_V1_ReplicationBatch, attachments: [ByteBuffer], volumeSize size: UInt64) throws -> [IncomingRecord] {
        var next = attachments.makeIterator()
        let out = try batch.records.map { r -> IncomingRecord in
            var record = IncomingRecord(sequence: r.sequence, offset: r.offset, length: r.zeroLength, captured: r.capturedUnixNanos)
            if r.zeroLength == 0 {
                if !r.data.isEmpty {
                    record.data = ByteBuffer(bytes: r.data)
                } else {
                    guard let data = next.next() else {
                        throw FerryError(.protocolViolation, "replication record \(r.sequence) has no bytes: neither in the record nor attached")
                    }
                    record.data = data
                }
                record.length = UInt64(record.data!.readableBytes)
            } else if !r.data.isEmpty {
                throw FerryError(.protocolViolation, "replication record \(r.sequence) is both a write and a zeroed range")
            }
            let (end, overflow) = record.offset.addingReportingOverflow(record.length)
            guard record.length > 0, record.length <= UInt64(NBDLimit.maxRecord) || record.data == nil, !overflow, end <= size else {
                throw FerryError(.protocolViolation, "replication record \(r.sequence) is empty, too large or outside the \(size)-byte volume")
            }
            return record
        }
        guard next.next() == nil else {
            throw FerryError(.protocolViolation, "a replication batch carries more attachments than write records")
        }
        return out
    }
}
