import CFerrySystem
import Foundation

/// One run of an export's `base:allocation` map (NBD block status): a length and whether it is a
/// hole and/or reads as zeroes. Clients (qemu-img, nbdcopy, the agent's hydration) skip those.
public struct NBDExtent: Sendable, Equatable, CustomStringConvertible {
    public var length: UInt64
    public var flags: UInt32

    /// NBD_STATE_HOLE: not allocated. NBD_STATE_ZERO: reads as zeroes.
    public static let hole: UInt32 = 1 << 0
    public static let zero: UInt32 = 1 << 1
    /// The flags of a range that is neither allocated nor anything but zeroes.
    public static let unallocated: UInt32 = hole | zero

    public init(length: UInt64, flags: UInt32) {
        self.length = length
        self.flags = flags
    }

    /// Reads as zeroes: nothing to copy.
    public var isZero: Bool { flags & Self.zero != 0 }

    public var description: String { "\(length)\(isZero ? " zero" : " data")\(flags & Self.hole != 0 ? " hole" : "")" }
}

/// The extents of one block status answer, in order from the request's offset. Adjacent runs with
/// the same flags merge; past `limit` runs the list stops (a client asks again from where it
/// ends, as the protocol lets a server answer a prefix of the range).
public struct NBDExtentList: Sendable {
    public private(set) var extents: [NBDExtent] = []
    public private(set) var covered: UInt64 = 0
    public let limit: Int

    public init(limit: Int = 1024) { self.limit = max(1, limit) }

    public var isFull: Bool { extents.count >= limit }

    /// Adds a run after what is covered. Returns false (and adds nothing) once the list is full.
    @discardableResult
    public mutating func append(_ length: UInt64, flags: UInt32) -> Bool {
        guard length > 0 else { return true }
        if var last = extents.last, last.flags == flags {
            last.length += length
            extents[extents.count - 1] = last
        } else {
            guard !isFull else { return false }
            extents.append(NBDExtent(length: length, flags: flags))
        }
        covered += length
        return true
    }
}

/// Allocation of a regular file by SEEK_DATA / SEEK_HOLE.
public enum FileAllocation {
    /// Appends the allocation of `[from, to)` of `fd`: holes (and whatever lies past the end of
    /// the file) are unallocated zeroes, data is data. Where the file system cannot tell (a block
    /// device, no SEEK_DATA), all of it is data. Returns false if the list filled up first.
    @discardableResult
    public static func append(fd: Int32, from: UInt64, to: UInt64, into list: inout NBDExtentList) -> Bool {
        var at = from
        while at < to {
            let data = ferry_seek_data(fd, off_t(clamping: at))
            if data < 0 {
                // ENXIO: no data from here to the end of the file.
                return list.append(to - at, flags: errno == ENXIO ? NBDExtent.unallocated : 0)
            }
            let dataAt = UInt64(data)
            if dataAt > at {
                let end = min(dataAt, to)
                guard list.append(end - at, flags: NBDExtent.unallocated) else { return false }
                at = end
                continue
            }
            let hole = ferry_seek_hole(fd, off_t(clamping: at))
            // A hole at or before `at` cannot be (there is data at `at`); treat it as the end.
            let end = hole > off_t(clamping: at) ? min(UInt64(hole), to) : to
            guard list.append(end - at, flags: 0) else { return false }
            at = end
        }
        return true
    }
}
