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

    /// What a record does.
    enum Kind: UInt32, Sendable {
        /// `length` bytes written at `offset`; the payload follows the header.
        case write = 0
        /// `length` bytes from `offset` read as zeroes; no payload.
        case zeroed = 1
        /// The volume grew to `length` bytes (`offset` 0); no payload. Later records may lie
        /// past the earlier size.
        case resize = 2
    }

    /// Whether a header's fields make a well-formed record (payload and CRC aside), given the
    /// volume's size so far; returns the size after it (a resize raises it).
    @inline(__always)
    static func checkedBound(kind raw: UInt32, offset: UInt64, length: UInt64, bound: UInt64) -> UInt64? {
        switch Kind(rawValue: raw) {
        case .write?:
            guard length <= UInt64(NBDLimit.maxRecord) else { return nil }
            fallthrough
        case .zeroed?:
            let (end, overflow) = offset.addingReportingOverflow(length)
            return !overflow && end <= bound ? bound : nil
        case .resize?:
            // Sizes only grow; a segment read with a later size as its bound may hold an
            // earlier, smaller resize.
            return offset == 0 && length > 0 && length <= WireLimits.maxVolumeBytes ? max(bound, length) : nil
        case nil:
            return nil
        }
    }

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
        buffer.writeInteger(r.kind.rawValue)
        buffer.writeInteger(r.captured)
        var crc = buffer.withUnsafeReadableBytes { all in
            ferry_crc32c(0, all.baseAddress! + (start - buffer.readerIndex) + 8, headerSize - 8)
        }
        if let data = r.data {
            crc = data.withUnsafeReadableBytes { ferry_crc32c(crc, $0.baseAddress, $0.count) }
        }
        buffer.setInteger(crc, at: start + 4)
    }

    /// A record read back from a segment, its bytes still in the segment's mapping.
    struct Scanned {
        var epoch: UInt64
        var sequence: UInt64
        var offset: UInt64
        /// Bytes written or zeroed; a resize's new size.
        var length: UInt64
        var captured: Int64
        var kind: Kind
        /// The bytes of a write; nil for a zeroed range or a resize.
        var data: UnsafeRawBufferPointer?
        /// Where the next record starts.
        var end: Int
    }

    /// Reads every valid record of `bytes` (a whole segment) in order, calling `body` for each;
    /// stops at the first torn or corrupt one (or one outside the volume: `size` bytes, or
    /// what a resize record before it grew it to). Returns the length of the valid prefix.
    static func scan(_ bytes: UnsafeRawBufferPointer, size: UInt64, _ body: (Scanned) throws -> Void) rethrows -> Int {
        func integer<T: FixedWidthInteger>(_ at: Int, _: T.Type) -> T { T(bigEndian: bytes.loadUnaligned(fromByteOffset: at, as: T.self)) }
        var at = 0
        var bound = size
        while bytes.count - at >= headerSize {
            let magic = integer(at, UInt32.self), crc = integer(at + 4, UInt32.self)
            let epoch = integer(at + 8, UInt64.self), sequence = integer(at + 16, UInt64.self)
            let offset = integer(at + 24, UInt64.self), length = integer(at + 32, UInt64.self)
            let raw = integer(at + 40, UInt32.self), captured = integer(at + 44, Int64.self)
            guard magic == Self.magic, let next = checkedBound(kind: raw, offset: offset, length: length, bound: bound),
                  let kind = Kind(rawValue: raw) else { break }
            let payload = kind == .write ? Int(length) : 0
            guard bytes.count - at - headerSize >= payload,
                  ferry_crc32c(0, bytes.baseAddress! + at + 8, headerSize - 8 + payload) == crc else { break }
            bound = next
            let data = kind == .write ? UnsafeRawBufferPointer(rebasing: bytes[(at + headerSize)..<(at + headerSize + payload)]) : nil
            at += headerSize + payload
            try body(Scanned(epoch: epoch, sequence: sequence, offset: offset, length: length, captured: captured, kind: kind, data: data, end: at))
        }
        return at
    }

    /// A record's header, with where its payload lies in the segment.
    struct Header {
        var epoch: UInt64
        var sequence: UInt64
        var offset: UInt64
        /// Bytes written or zeroed; a resize's new size.
        var length: UInt64
        var kind: Kind
        /// Offset of the payload (a write's bytes) in the segment.
        var payload: Int
        /// Where the next record starts.
        var end: Int
    }

    /// Walks the headers of `bytes` (records already checked by `scan`) without reading the
    /// payloads or their CRCs, calling `body` for each until it returns false; stops at
    /// anything that is not a well-formed record.
    @discardableResult
    static func walkHeaders(_ bytes: UnsafeRawBufferPointer, size: UInt64, _ body: (Header) -> Bool) -> Int {
        func integer<T: FixedWidthInteger>(_ at: Int, _: T.Type) -> T { T(bigEndian: bytes.loadUnaligned(fromByteOffset: at, as: T.self)) }
        var at = 0
        var bound = size
        while bytes.count - at >= headerSize {
            let magic = integer(at, UInt32.self)
            let epoch = integer(at + 8, UInt64.self), sequence = integer(at + 16, UInt64.self)
            let offset = integer(at + 24, UInt64.self), length = integer(at + 32, UInt64.self)
            let raw = integer(at + 40, UInt32.self)
            guard magic == Self.magic, let next = checkedBound(kind: raw, offset: offset, length: length, bound: bound),
                  let kind = Kind(rawValue: raw) else { return at }
            let payload = kind == .write ? Int(length) : 0
            guard bytes.count - at - headerSize >= payload else { return at }
            bound = next
            let header = Header(epoch: epoch, sequence: sequence, offset: offset, length: length, kind: kind,
                                payload: at + headerSize, end: at + headerSize + payload)
            at = header.end
            guard body(header) else { return at }
        }
        return at
    }

    /// Whether the record whose header starts at `at` in `bytes` passes its CRC (a record
    /// `walkHeaders` found well-formed; its payload lies within `bytes`).
    static func verify(_ bytes: UnsafeRawBufferPointer, header at: Int) -> Bool {
        func integer<T: FixedWidthInteger>(_ at: Int, _: T.Type) -> T { T(bigEndian: bytes.loadUnaligned(fromByteOffset: at, as: T.self)) }
        guard at >= 0, bytes.count - at >= headerSize else { return false }
        let crc = integer(at + 4, UInt32.self), length = integer(at + 32, UInt64.self), kind = integer(at + 40, UInt32.self)
        let payload = kind == Kind.write.rawValue ? Int(clamping: length) : 0
        guard bytes.count - at - headerSize >= payload else { return false }
        return ferry_crc32c(0, bytes.baseAddress! + at + 8, headerSize - 8 + payload) == crc
    }

    /// Whether a valid record follows a bad one at `at`: then the bad one is damage amid acked
    /// records, not the torn end of an append (which nothing valid can follow).
    static func recordFollows(_ bytes: UnsafeRawBufferPointer, damageAt at: Int, size: UInt64) -> Bool {
        guard at < bytes.count else { return false }
        let rest = UnsafeRawBufferPointer(rebasing: bytes[at...])
        var next = 0
        walkHeaders(rest, size: size) { next = $0.end; return false }
        guard next > 0, next < rest.count else { return false }
        return scan(UnsafeRawBufferPointer(rebasing: rest[next...]), size: size) { _ in } > 0
    }

    /// Applies every record `walkHeaders` finds in `bytes` (a segment whose CRCs were checked).
    static func applyAll(_ bytes: UnsafeRawBufferPointer, size: UInt64, to image: Int32) throws {
        var failure: (any Error)?
        walkHeaders(bytes, size: size) { h in
            do {
                guard h.kind != .resize else {
                    try grow(image, to: h.length)
                    return true
                }
                let data = h.kind == .zeroed ? nil : UnsafeRawBufferPointer(rebasing: bytes[h.payload..<h.end])
                try apply(offset: h.offset, length: h.length, data: data, to: image)
                return true
            } catch {
                failure = error
                return false
            }
        }
        if let failure { throw failure }
    }

    /// Runs `body` over a whole segment file mapped read-only: scanning and folding read it in
    /// place, with no buffer to allocate and fill. Only the controller's replica actor changes
    /// segment files, and never one being read.
    static func withSegment<T>(_ path: String, _ body: (UnsafeRawBufferPointer) throws -> T) throws -> T {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw FerryError(.io, "cannot open journal segment \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw FerryError(.io, "cannot stat journal segment \(path): \(String(cString: strerror(errno)))") }
        let size = Int(st.st_size)
        guard size > 0 else { return try body(UnsafeRawBufferPointer(start: nil, count: 0)) }
        guard let mapped = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0), mapped != MAP_FAILED else {
            throw FerryError(.io, "cannot map journal segment \(path): \(String(cString: strerror(errno)))")
        }
        defer { munmap(mapped, size) }
        return try body(UnsafeRawBufferPointer(start: mapped, count: size))
    }

    /// Applies a record read back from a segment.
    static func apply(_ r: Scanned, to image: Int32) throws {
        if r.kind == .resize { return try grow(image, to: r.length) }
        try apply(offset: r.offset, length: r.length, data: r.data, to: image)
    }

    /// Applies a record received.
    static func apply(_ r: IncomingRecord, to image: Int32) throws {
        if r.kind == .resize { return try grow(image, to: r.length) }
        guard let data = r.data else { return try apply(offset: r.offset, length: r.length, data: nil, to: image) }
        try data.withUnsafeReadableBytes { try apply(offset: r.offset, length: r.length, data: $0, to: image) }
    }

    /// Extends an image file (sparse) to `size` bytes; never shortens it.
    static func grow(_ image: Int32, to size: UInt64) throws {
        var st = stat()
        guard fstat(image, &st) == 0 else { throw FerryError.system(errno, "cannot stat a replica image") }
        guard UInt64(st.st_size) < size else { return }
        guard ftruncate(image, off_t(size)) == 0 else { throw FerryError.system(errno, "cannot grow a replica image to \(size) bytes") }
    }

    /// Writes a record's bytes to an image file, or punches a hole for a zeroed range.
    static func apply(offset: UInt64, length: UInt64, data: UnsafeRawBufferPointer?, to image: Int32) throws {
        guard let data else {
            if ferry_punch_hole(image, off_t(offset), off_t(length)) != 0 {
                throw FerryError(.io, "cannot zero replica range: \(String(cString: strerror(errno)))")
            }
            return
        }
        let failed = FileIO.writeAll(image, data, at: offset)
        if failed != 0 { throw FerryError.system(failed, "replica write failed") }
    }
}

/// A replication record as received, checked against the volume: a write with its bytes
/// (an attachment of the batch, not copied) or a zeroed range.
struct IncomingRecord: Sendable {
    var sequence: UInt64
    var offset: UInt64
    /// Bytes written or zeroed; a resize's new size.
    var length: UInt64
    var captured: Int64
    /// The bytes of a write; nil for a zeroed range or a resize.
    var data: ByteBuffer?
    var resize = false

    var kind: JournalRecord.Kind { resize ? .resize : data == nil ? .zeroed : .write }

    /// The records of a batch. A write's bytes are in the record, or (`attached_length`) the
    /// next bytes of the batch's attachments, sliced from them without a copy. `size` is the
    /// volume's size before the batch; a resize record in it raises the bound for the records
    /// after it, and `size` is left at the batch's end size.
    static func of(_ batch: Ferry_V1_ReplicationBatch, attachments: [ByteBuffer], volumeSize size: inout UInt64) throws -> [IncomingRecord] {
        var frames = attachments[...]
        let out = try batch.records.map { r -> IncomingRecord in
            var record = IncomingRecord(sequence: r.sequence, offset: r.offset, length: r.zeroLength, captured: r.capturedUnixNanos)
            let kinds = (r.zeroLength > 0 ? 1 : 0) + (r.data.isEmpty ? 0 : 1) + (r.attachedLength > 0 ? 1 : 0) + (r.resizeBytes > 0 ? 1 : 0)
            guard kinds == 1 else {
                throw FerryError(.protocolViolation, "replication record \(r.sequence) must be exactly one of: bytes, attached bytes, a zeroed range, a resize")
            }
            if r.resizeBytes > 0 {
                guard r.offset == 0, r.resizeBytes % 512 == 0, r.resizeBytes <= WireLimits.maxVolumeBytes else {
                    throw FerryError(.protocolViolation, "replication record \(r.sequence) resizes the volume to \(r.resizeBytes) bytes at offset \(r.offset): a resize has offset 0 and a size in whole 512-byte sectors")
                }
                guard r.resizeBytes >= size else {
                    throw FerryError(.protocolViolation, "replication record \(r.sequence) shrinks the volume from \(size) to \(r.resizeBytes) bytes: volumes only grow")
                }
                record.length = r.resizeBytes
                record.resize = true
                size = r.resizeBytes
                return record
            }
            if r.attachedLength > 0 {
                while frames.first?.readableBytes == 0 { frames.removeFirst() }
                guard frames.startIndex < frames.endIndex, let bytes = frames[frames.startIndex].readSlice(length: Int(r.attachedLength)) else {
                    throw FerryError(.protocolViolation, "replication record \(r.sequence): its \(r.attachedLength) attached bytes are not the rest of an attached frame")
                }
                record.data = bytes
            } else if !r.data.isEmpty {
                record.data = ByteBuffer(bytes: r.data)
            }
            if let data = record.data { record.length = UInt64(data.readableBytes) }
            let (end, overflow) = record.offset.addingReportingOverflow(record.length)
            guard record.length > 0, record.length <= UInt64(NBDLimit.maxRecord) || record.data == nil, !overflow, end <= size else {
                throw FerryError(.protocolViolation, "replication record \(r.sequence) is empty, too large or outside the \(size)-byte volume")
            }
            return record
        }
        guard frames.allSatisfy({ $0.readableBytes == 0 }) else {
            throw FerryError(.protocolViolation, "a replication batch carries attached bytes no record takes")
        }
        return out
    }
}
