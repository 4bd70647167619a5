import CFerrySystem
import FerryWire
import Foundation
import NIOCore

/// A sink's write-ahead journal (reprotect of a failover that landed). Ordered records from its
/// source's replica journal are written to `NAME.wal` and made durable before they touch the
/// volume; the position they bring the volume to is recorded in `NAME.position` only once the
/// volume is durable too. A crash at any step is finished from the journal (redo) before the
/// sink does anything else, so the volume is always at one of its source's journal positions,
/// never between two: crash-consistent like a replica point.
struct SinkJournal {
    struct Position: Codable, Equatable, Sendable {
        var source: String
        var epoch: UInt64
        var sequence: UInt64

        init(source: String, epoch: UInt64, sequence: UInt64) {
            self.source = source
            self.epoch = epoch
            self.sequence = sequence
        }

        init(_ wire: Ferry_V1_SinkPosition) {
            self.init(source: wire.source, epoch: wire.epoch, sequence: wire.sequence)
        }

        var wire: Ferry_V1_SinkPosition {
            var p = Ferry_V1_SinkPosition()
            p.source = source
            p.epoch = epoch
            p.sequence = sequence
            return p
        }
    }


    let walPath: String
    let positionPath: String

    init(directory: String, volume: String) {
        walPath = directory + "/" + volume + ".wal"
        positionPath = directory + "/" + volume + ".position"
    }

    static let magic: UInt32 = 0x4653_5731 // "FSW1"
    /// Most bytes one journaled batch may hold (the controller sends about 4 MiB).
    static let maxBatchBytes = 64 << 20

    /// Where the volume stands, or nil when it follows no source.
    func position() throws -> Position? {
        guard let data = FileManager.default.contents(atPath: positionPath) else { return nil }
        do {
            return try JSONDecoder().decode(Position.self, from: data)
        } catch {
            throw FerryError(.io, "the sink position file \(positionPath) is unreadable (\(error)); a reprotect makes the volume equal again")
        }
    }

    /// Records `position` durably (a new file renamed into place, its directory synced).
    func record(_ position: Position?) throws {
        guard let position else {
            unlink(positionPath)
            return
        }
        try AtomicFile.write(Array(JSONEncoder().encode(position)), to: positionPath, mode: 0o600)
    }

    /// Applies `blocks` in order, journaled first, and records `through` once they are durable.
    func apply(_ blocks: [SinkChange], through: Position, to volume: BlockVolume) throws {
        // Written whole and renamed into place: a crash leaves the journal whole or absent (its
        // CRC is checked again when it is read back all the same).
        try AtomicFile.write(Self.encode(blocks, through: through), to: walPath, mode: 0o600)
        try finish(blocks, through: through, volume: volume)
    }

    /// A journal file: magic, the position, the blocks (offset, kind, length, bytes), CRC32C.
    /// Kinds: 0 bytes, 1 a zeroed range, 2 a growth (offset 0, length the new size).
    static func encode(_ blocks: [SinkChange], through: Position) -> [UInt8] {
        var wal = ByteBuffer()
        wal.writeInteger(magic)
        let source = Array(through.source.utf8)
        wal.writeInteger(UInt32(source.count))
        wal.writeBytes(source)
        wal.writeInteger(through.epoch)
        wal.writeInteger(through.sequence)
        wal.writeInteger(UInt32(blocks.count))
        for b in blocks {
            switch b {
            case .write(let offset, var data):
                wal.writeMultipleIntegers(offset, UInt8(0), UInt64(data.readableBytes))
                wal.writeBuffer(&data)
            case .zero(let offset, let length):
                wal.writeMultipleIntegers(offset, UInt8(1), length)
            case .grow(let size):
                wal.writeMultipleIntegers(UInt64(0), UInt8(2), size)
            }
        }
        let crc = wal.withUnsafeReadableBytes { ferry_crc32c(0, $0.baseAddress, $0.count) }
        wal.writeInteger(crc)
        return Array(wal.readableBytesView)
    }

    /// Finishes a batch a crash interrupted: a whole journal is applied again (the same records
    /// in the same order end at the same state); a torn one was never applied and is dropped.
    func recover(volume: BlockVolume) throws {
        guard let data = FileManager.default.contents(atPath: walPath) else { return }
        guard let (blocks, through) = Self.decode(data, volumeSize: volume.size) else {
            unlink(walPath)
            return
        }
        try finish(blocks, through: through, volume: volume)
    }

    private func finish(_ blocks: [SinkChange], through: Position, volume: BlockVolume) throws {
        try volume.applyAsSink(blocks, flush: true)
        try record(through)
        unlink(walPath)
    }

    /// A journal file's batch, or nil when it is torn or not one (checked whole by its CRC,
    /// every block within the volume, as grown by the batch's growths before it).
    static func decode(_ data: Data, volumeSize: UInt64) -> ([SinkChange], Position)? {
        guard data.count >= 4 + 4 + 8 + 8 + 4 + 4, data.count <= maxBatchBytes + (1 << 20) else { return nil }
        var buffer = ByteBuffer(bytes: data)
        let body = buffer.readableBytes - 4
        let crc = buffer.withUnsafeReadableBytes { ferry_crc32c(0, $0.baseAddress, body) }
        guard buffer.getInteger(at: buffer.readerIndex + body, as: UInt32.self) == crc,
              buffer.readInteger(as: UInt32.self) == magic,
              let sourceLength = buffer.readInteger(as: UInt32.self), sourceLength <= 1024,
              let source = buffer.readString(length: Int(sourceLength)),
              let epoch = buffer.readInteger(as: UInt64.self), let sequence = buffer.readInteger(as: UInt64.self),
              let count = buffer.readInteger(as: UInt32.self) else { return nil }
        var blocks: [SinkChange] = []
        var size = volumeSize
        for _ in 0..<count {
            guard let offset = buffer.readInteger(as: UInt64.self), let kind = buffer.readInteger(as: UInt8.self),
                  let length = buffer.readInteger(as: UInt64.self) else { return nil }
            if kind == 2 {
                guard offset == 0, length <= WireLimits.maxVolumeBytes else { return nil }
                size = max(size, length)
                blocks.append(.grow(size: length))
                continue
            }
            guard offset <= size, length <= size - offset else { return nil }
            if kind == 0 {
                guard length <= UInt64(buffer.readableBytes), let bytes = buffer.readSlice(length: Int(length)) else { return nil }
                blocks.append(.write(offset: offset, data: bytes))
            } else if kind == 1 {
                blocks.append(.zero(offset: offset, length: length))
            } else {
                return nil
            }
        }
        guard buffer.readableBytes == 4 else { return nil }
        return (blocks, Position(source: source, epoch: epoch, sequence: sequence))
    }
}
