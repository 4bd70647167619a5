import Foundation

/// Which blocks of a recovered volume are local on its target already (a bit each), and what the
/// map is of: its size, block size and the point it hydrates from. Pure data: the hydrating
/// volume and the copier change it under their locks, and it is saved with the target synced
/// first, so a bit on disk always means the block's bytes are on disk.
struct HydrationMap: Sendable, Equatable {
    static let magic = Array("FERRYHY1".utf8)
    /// 64 KiB: a 4 KiB read that misses fetches 16 times its size; a 10 GiB volume's map is 20 KiB.
    static let defaultBlockBytes: UInt32 = 64 << 10

    let size: UInt64
    let blockBytes: UInt32
    /// The point this is a copy of (its export): a map of another point means nothing here.
    let source: String
    /// The target was made empty by the agent: its holes read as zeroes, so a zero range of the
    /// point needs no local write either.
    let targetZeroed: Bool
    private(set) var words: [UInt64]
    private(set) var localBlocks: Int

    init(size: UInt64, blockBytes: UInt32 = Self.defaultBlockBytes, source: String, targetZeroed: Bool) {
        precondition(blockBytes > 0 && size > 0)
        self.size = size
        self.blockBytes = blockBytes
        self.source = source
        self.targetZeroed = targetZeroed
        let blocks = Int((size + UInt64(blockBytes) - 1) / UInt64(blockBytes))
        words = [UInt64](repeating: 0, count: (blocks + 63) / 64)
        localBlocks = 0
    }

    var blockCount: Int { Int((size + UInt64(blockBytes) - 1) / UInt64(blockBytes)) }
    var isComplete: Bool { localBlocks == blockCount }
    /// Bytes of the volume that are local (the last block counts its real length).
    var localBytes: UInt64 {
        guard localBlocks > 0 else { return 0 }
        let full = UInt64(localBlocks) * UInt64(blockBytes)
        return isLocal(blockCount - 1) ? full - (UInt64(blockCount) * UInt64(blockBytes) - size) : full
    }

    func isLocal(_ block: Int) -> Bool { words[block / 64] & (1 << UInt64(block % 64)) != 0 }

    /// Marks a block local; false if it was already.
    @discardableResult
    mutating func setLocal(_ block: Int) -> Bool {
        let bit: UInt64 = 1 << UInt64(block % 64)
        guard words[block / 64] & bit == 0 else { return false }
        words[block / 64] |= bit
        localBlocks += 1
        return true
    }

    /// The blocks `[offset, offset + length)` touches.
    func blocks(offset: UInt64, length: UInt64) -> Range<Int> {
        // Clamped to the volume: a range running past its end covers its last block at most.
        guard length > 0, offset < size else { return 0..<0 }
        let first = Int(offset / UInt64(blockBytes))
        let last = Int((min(size, offset &+ length) - 1) / UInt64(blockBytes))
        return first..<min(blockCount, last + 1)
    }

    /// Byte range of a block (the last one may be short).
    func range(of block: Int) -> (offset: UInt64, length: Int) {
        let offset = UInt64(block) * UInt64(blockBytes)
        return (offset, Int(min(UInt64(blockBytes), size - offset)))
    }

    /// Runs of blocks not local yet within `blocks`, each at most `maxBlocks` long.
    func missingRuns(in blocks: Range<Int>, maxBlocks: Int = .max) -> [Range<Int>] {
        var runs: [Range<Int>] = []
        var start: Int?
        for b in blocks {
            if isLocal(b) {
                if let s = start { runs.append(s..<b); start = nil }
            } else if let s = start, b - s >= maxBlocks {
                runs.append(s..<b)
                start = b
            } else if start == nil {
                start = b
            }
        }
        if let s = start { runs.append(s..<blocks.upperBound) }
        return runs
    }

    /// The first block not local at or after `block`, if any.
    func firstMissing(from block: Int) -> Int? {
        var b = max(0, block)
        while b < blockCount {
            let word = words[b / 64] | ((1 << UInt64(b % 64)) - 1)
            if word != .max {
                let candidate = (b / 64) * 64 + (~word).trailingZeroBitCount
                return candidate < blockCount ? candidate : nil
            }
            b = (b / 64 + 1) * 64
        }
        return nil
    }

    // MARK: File form

    /// Magic, size, block size, zeroed flag, source, then the words (little endian).
    func encoded() -> [UInt8] {
        var out = Self.magic
        func put<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { out += $0 } }
        put(size)
        put(blockBytes)
        put(UInt8(targetZeroed ? 1 : 0))
        let name = Array(source.utf8)
        put(UInt32(name.count))
        out += name
        for w in words { put(w) }
        return out
    }

    /// Reads a saved map; nil if it is not one, or not of this size and block size.
    static func decode(_ bytes: [UInt8]) -> HydrationMap? {
        var at = 0
        func take<T: FixedWidthInteger>(_: T.Type) -> T? {
            guard at + MemoryLayout<T>.size <= bytes.count else { return nil }
            var v: T = 0
            withUnsafeMutableBytes(of: &v) { $0.copyBytes(from: bytes[at..<(at + MemoryLayout<T>.size)]) }
            at += MemoryLayout<T>.size
            return T(littleEndian: v)
        }
        guard bytes.count >= magic.count, Array(bytes[0..<magic.count]) == magic else { return nil }
        at = magic.count
        guard let size = take(UInt64.self), size > 0, size <= 1 << 56, let blockBytes = take(UInt32.self), blockBytes >= 4096,
              let zeroed = take(UInt8.self), let nameLength = take(UInt32.self), nameLength <= 4096,
              at + Int(nameLength) <= bytes.count else { return nil }
        let source = String(decoding: bytes[at..<(at + Int(nameLength))], as: UTF8.self)
        at += Int(nameLength)
        var map = HydrationMap(size: size, blockBytes: blockBytes, source: source, targetZeroed: zeroed == 1)
        guard bytes.count - at == map.words.count * 8 else { return nil }
        for i in map.words.indices { map.words[i] = take(UInt64.self)! }
        // Bits past the last block would count as local blocks that do not exist.
        let spare = map.words.count * 64 - map.blockCount
        if spare > 0, let last = map.words.last, last >> UInt64(64 - spare) != 0 { return nil }
        map.localBlocks = map.words.reduce(0) { $0 + $1.nonzeroBitCount }
        return map
    }
}
