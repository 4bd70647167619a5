import Foundation
import NIOCore

/// What an NBD export serves: the agent's write-capturing volumes, and the controller's
/// point-in-time images. The server calls it from connection threads of its own (blocking
/// calls are expected there), never from an event loop.
public protocol NBDExport: AnyObject, Sendable {
    /// The export name clients ask for.
    var name: String { get }
    var size: UInt64 { get }
    /// Advertised to clients (NBD_FLAG_READ_ONLY); writes, trims and zeroes are refused with EPERM.
    var isReadOnly: Bool { get }
    /// Writes would wait right now (a consistency cut holds them): the server sends the replies
    /// it has queued before it blocks on one, so no completed request waits for the hold.
    var holdsWrites: Bool { get }
    /// Runs one operation, blocking. Reads return their data, the others nil.
    func performNow(_ op: NBDOperation, allocator: ByteBufferAllocator) -> Result<ByteBuffer?, VolumeIOError>
    /// The `base:allocation` map of `[offset, offset + length)` (in bounds, length > 0), blocking:
    /// at least one extent, from `offset`, covering the range or a prefix of it.
    func allocation(offset: UInt64, length: UInt64, limit: Int) -> Result<[NBDExtent], VolumeIOError>
}

extension NBDExport {
    public var holdsWrites: Bool { false }

    /// Without a map of its own, an export is data throughout.
    public func allocation(offset: UInt64, length: UInt64, limit: Int) -> Result<[NBDExtent], VolumeIOError> {
        .success([NBDExtent(length: length, flags: 0)])
    }
}

/// One operation on an export.
public enum NBDOperation: Sendable {
    case read(offset: UInt64, length: Int)
    case write(offset: UInt64, data: ByteBuffer, fua: Bool)
    case zero(offset: UInt64, length: UInt64, fua: Bool)
    case flush
}

/// A failed read or write on an export's backing store, with the errno the NBD client is told.
public struct VolumeIOError: Error, CustomStringConvertible, Sendable {
    public let operation: String
    public let errno: Int32
    public init(operation: String, errno: Int32) {
        self.operation = operation
        self.errno = errno
    }
    public var description: String {
        operation + " failed: " + String(cString: strerror(errno))
    }
}
