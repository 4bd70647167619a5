import CFerrySystem
import Crypto
import Foundation

/// Block hashes for delta resync, computed the same way on the agent (source) and on the
/// controller (replica): per block, the first 16 bytes of its SHA-256, or empty when the block
/// reads as zeroes. Holes found with SEEK_DATA/SEEK_HOLE are not read at all; data that happens
/// to be all zeroes is recognised by content.
public enum BlockHashing {
    /// Length of one hash on the wire.
    public static let hashBytes = 16
    /// Block sizes accepted on the wire.
    public static let blockBytesRange: ClosedRange<UInt32> = 4096...(1 << 20)
    /// Most blocks in one request.
    public static let maxBlocks = 1024

    /// What one pass over a range found.
    public struct Result: Sendable {
        public var hashes: [Data]
        /// Bytes actually read (the rest were holes).
        public var bytesRead: Int
    }

    /// Hashes `count` blocks of `blockBytes` from `offset` of the file `fd` whose logical size
    /// is `size` (the last block stops there). Blocking: call it from a thread pool.
    ///
    /// `digest` makes each block's entry (by default its wire hash).
    public static func hashes(fd: Int32, size: UInt64, offset: UInt64, blockBytes: Int, count: Int,
                              digest: (UnsafeRawBufferPointer) -> Data = hash) throws -> Result {
        var hashes: [Data] = []
        hashes.reserveCapacity(count)
        var buffer = [UInt8](repeating: 0, count: blockBytes)
        var read = 0
        let end = min(size, offset + UInt64(blockBytes * count))
        // Where the next data starts, for skipping holes; re-asked only once passed.
        var nextData: UInt64 = offset
        var dataEnd: UInt64 = offset
        var block = offset
        while block < end {
            let length = Int(min(UInt64(blockBytes), end - block))
            defer { block += UInt64(length) }
            if block >= dataEnd {
                let d = ferry_seek_data(fd, off_t(block))
                if d < 0 {
                    // ENXIO: no data after here. Anything else (no SEEK_DATA support): read it all.
                    if errno == ENXIO { nextData = UInt64.max; dataEnd = UInt64.max } else { nextData = block; dataEnd = end }
                } else {
                    nextData = UInt64(d)
                    let h = ferry_seek_hole(fd, d)
                    dataEnd = h < 0 ? end : UInt64(h)
                }
            }
            if nextData >= block + UInt64(length) {
                hashes.append(Data()) // a hole
                continue
            }
            let n = try buffer.withUnsafeMutableBytes { raw -> Int in
                var done = 0
                while done < length {
                    let r = pread(fd, raw.baseAddress! + done, length - done, off_t(block) + off_t(done))
                    if r < 0 { if errno == EINTR { continue }; throw FerryError(.io, "read for hashing failed: \(String(cString: strerror(errno)))") }
                    if r == 0 { break }
                    done += r
                }
                // Past the end of a file that is shorter than the device it stands for: zeroes.
                if done < length { memset(raw.baseAddress! + done, 0, length - done) }
                return done
            }
            read += n
            hashes.append(buffer.withUnsafeBytes { digest(UnsafeRawBufferPointer(rebasing: $0[..<length])) })
        }
        return Result(hashes: hashes, bytesRead: read)
    }

    /// Indices of the blocks of the range that hold allocated data, by SEEK_DATA/SEEK_HOLE
    /// alone: nothing is read, so a block of written zeroes counts as data (whoever reads it
    /// next finds them). Where the file system cannot say, every block counts. Blocking.
    public static func allocatedBlocks(fd: Int32, size: UInt64, offset: UInt64, blockBytes: Int, count: Int) -> [UInt32] {
        let end = min(size, offset + UInt64(blockBytes) * UInt64(count))
        var blocks: [UInt32] = []
        var at = offset
        while at < end {
            let d = ferry_seek_data(fd, off_t(at))
            guard d >= 0 else {
                // ENXIO: no data from here on. Anything else (no SEEK_DATA): count the rest as data.
                if errno != ENXIO { blocks += (UInt32((at - offset) / UInt64(blockBytes))..<UInt32(count)).map { $0 } }
                break
            }
            guard UInt64(d) < end else { break }
            let h = ferry_seek_hole(fd, d)
            let dataEnd = h < 0 ? end : min(end, UInt64(h))
            let first = (UInt64(d) - offset) / UInt64(blockBytes)
            let last = (dataEnd - offset + UInt64(blockBytes) - 1) / UInt64(blockBytes)
            for b in first..<last where blocks.last.map({ UInt64($0) < b }) ?? true { blocks.append(UInt32(b)) }
            at = max(dataEnd, at + 1)
        }
        return blocks
    }

    /// The wire hash of one block: empty for zeroes.
    public static func hash(_ bytes: UnsafeRawBufferPointer) -> Data {
        if isZero(bytes) { return Data() }
        return Data(SHA256.hash(data: bytes).prefix(hashBytes))
    }

    public static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        var i = 0
        let n = bytes.count
        while i + 8 <= n {
            if bytes.loadUnaligned(fromByteOffset: i, as: UInt64.self) != 0 { return false }
            i += 8
        }
        while i < n {
            if bytes[i] != 0 { return false }
            i += 1
        }
        return true
    }
}
