import FerryNBD
import FerryWire
import NIOCore

/// A recovered volume that is a protected volume of this host (a failover that lands here):
/// the volume manager serves, captures and hydrates it on its own socket; the recovery only
/// hands that socket to the hooks and never stops or removes it (the volume outlives it).
final class ProtectedRecoveredVolume: RecoveryServedVolume {
    let source: String
    let volume: BlockVolume
    var name: String { volume.name }
    var size: UInt64 { volume.size }
    var isReadOnly: Bool { volume.isReadOnly }

    init(source: String, volume: BlockVolume) {
        self.source = source
        self.volume = volume
    }

    /// Not served through the recovery (its own socket is the volume manager's).
    func performNow(_ op: NBDOperation, allocator: ByteBufferAllocator) -> Result<ByteBuffer?, VolumeIOError> {
        volume.performNow(op, allocator: allocator)
    }

    /// Counted by its change log instead (`ferryctl volumes` of the recovery host).
    var writes: UInt64 { 0 }

    func stop() async {}

    func status(socket: String) -> Ferry_V1_RecoveredVolumeStatus {
        guard let hydrating = volume.hydration else { return baseStatus(socket: socket) }
        var s = hydrating.status(socket: socket)
        s.source = source
        s.writes = writes
        return s
    }
}
