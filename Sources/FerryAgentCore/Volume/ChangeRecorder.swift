import NIOCore
import Synchronization

/// One captured mutation of a volume, in the order it reached the backing store.
public struct VolumeChange: Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        /// Bytes written at `offset`.
        case write(ByteBuffer)
        /// `length` bytes from `offset` now read as zeroes (WRITE_ZEROES or TRIM).
        case zero(length: UInt64)
        /// The volume grew to `size` bytes here (`offset` 0): later changes may lie past its
        /// earlier end.
        case resize(size: UInt64)
    }

    /// Strictly increasing per volume, in completion order.
    public var sequence: UInt64
    public var offset: UInt64
    public var kind: Kind
    /// Wall-clock capture time, Unix nanoseconds (replication lag is measured from it).
    public var captured: Int64 = 0
}

/// Where a volume's captured mutations go. `append` is called with the volume's mutation lock
/// held, after the change reached the backing store and before the client is answered, so the
/// order of sequences is exactly the order of the writes on disk. It must not block for long.
public protocol ChangeRecorder: Sendable {
    /// Records `change` and returns the sequence it was given.
    func append(offset: UInt64, kind: VolumeChange.Kind) -> UInt64
    /// Called before a mutation of these bytes is applied, without the mutation lock: the
    /// activity log marks their extents durably here.
    func prepare(offset: UInt64, length: UInt64) throws
    /// Called once the mutation `prepare` announced is recorded, or failed.
    func completed(offset: UInt64, length: UInt64)
    /// Called before the volume grows to `size` bytes (with the mutation lock held): whatever
    /// tracks the volume's extents covers the new ones durably here.
    func willGrow(to size: UInt64) throws
}

extension ChangeRecorder {
    public func prepare(offset: UInt64, length: UInt64) throws {}
    public func completed(offset: UInt64, length: UInt64) {}
    public func willGrow(to size: UInt64) throws {}
}

/// Keeps every change in memory: for tests and for tools that replay a capture.
public final class InMemoryChangeRecorder: ChangeRecorder {
    private let state = Mutex<(next: UInt64, changes: [VolumeChange])>((1, []))

    public init() {}

    public func append(offset: UInt64, kind: VolumeChange.Kind) -> UInt64 {
        state.withLock { s in
            let sequence = s.next
            s.next += 1
            s.changes.append(VolumeChange(sequence: sequence, offset: offset, kind: kind))
            return sequence
        }
    }

    public var changes: [VolumeChange] { state.withLock { $0.changes } }
}

