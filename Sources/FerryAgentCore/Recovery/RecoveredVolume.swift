import FerryNBD
import FerryWire
import Foundation
import Logging
import NIOCore
import Synchronization

/// A recovered volume as the recovery host's workload sees it: the agent's own NBD frontend
/// in front of the controller's point image (with its writable overlay), reached over NBD with
/// STARTTLS. Every write passes through here, so it is counted from the first one; the
/// controller's export records which blocks changed, for reprotect.
///
/// The connection to the controller is remade when it breaks (a controller restart, a network
/// blip): requests wait and retry for up to `retryFor` before the workload sees EIO.
final class RecoveredVolume: NBDExport {
    let name: String
    let source: String
    let size: UInt64
    var isReadOnly: Bool { false }
    private let connect: @Sendable () async throws -> NBDClient
    private let client: Mutex<NBDClient?>
    private let writeCount = Atomic<UInt64>(0)
    private let stopped = Atomic<Bool>(false)
    /// Writes acknowledged since the last flush that succeeded: the controller keeps them
    /// durable only from a flush on, so if the connection drops meanwhile they may be gone, and
    /// the next flush must say so (EIO) instead of succeeding on the new connection.
    private let unflushed = Mutex<(writes: UInt64, lost: Bool)>((0, false))
    private let logger: Logger
    let retryFor: Duration

    /// - Parameter first: a connection made already, or nil to connect at the first request.
    init(name: String, source: String, size: UInt64, first: NBDClient?, retryFor: Duration = .seconds(900), logger: Logger,
         connect: @escaping @Sendable () async throws -> NBDClient) {
        self.name = name
        self.source = source
        self.size = size
        self.client = Mutex(first)
        self.connect = connect
        self.logger = logger
        self.retryFor = retryFor
    }

    var writes: UInt64 { writeCount.load(ordering: .relaxed) }

    func stop() async {
        stopped.store(true, ordering: .relaxed)
        let c = client.withLock { c in defer { c = nil }; return c }
        await c?.close()
    }

    func performNow(_ op: NBDOperation, allocator: ByteBufferAllocator) -> Result<ByteBuffer?, VolumeIOError> {
        let deadline = ContinuousClock.now + retryFor
        var delay = Duration.milliseconds(100)
        while true {
            guard !stopped.load(ordering: .relaxed) else { return .failure(VolumeIOError(operation: "recovered volume \(name) (stopped)", errno: EIO)) }
            do {
                let c = try current()
                switch op {
                case .read(let offset, let length): return .success(try c.readBlocking(offset: offset, length: length))
                case .write(let offset, let data, let fua):
                    try c.writeBlocking(offset: offset, data: data, fua: fua)
                    writeCount.add(1, ordering: .relaxed)
                    if !fua { unflushed.withLock { $0.writes += 1 } }
                case .zero(let offset, let length, let fua):
                    try c.writeZeroesBlocking(offset: offset, length: length, fua: fua)
                    writeCount.add(1, ordering: .relaxed)
                    if !fua { unflushed.withLock { $0.writes += 1 } }
                case .flush:
                    let before = unflushed.withLock { $0 }
                    if before.lost {
                        // Said once; writes made since the reconnect stay counted for the next flush.
                        unflushed.withLock { $0.lost = false }
                        logger.error("writes acknowledged before the connection to the controller dropped were not flushed; reporting EIO on this flush",
                                     metadata: ["volume": "\(name)"])
                        return .failure(VolumeIOError(operation: "flush of recovered volume \(name) (unflushed writes lost with the connection)", errno: EIO))
                    }
                    try c.flushBlocking()
                    unflushed.withLock { u in if !u.lost { u.writes -= min(u.writes, before.writes) } }
                }
                return .success(nil)
            } catch let error as VolumeIOError {
                // The server's own answer (EIO, ENOSPC, ...): the workload gets it.
                return .failure(error)
            } catch {
                // The connection is gone: drop it, reconnect and retry the request.
                client.withLock { $0 = nil }
                guard ContinuousClock.now < deadline else {
                    logger.error("recovered volume unreachable; failing requests", metadata: ["volume": "\(name)", "error": "\(error)"])
                    return .failure(VolumeIOError(operation: "recovered volume \(name)", errno: EIO))
                }
                Thread.sleep(forTimeInterval: delay.seconds)
                delay = min(delay * 2, .seconds(2))
            }
        }
    }

    /// The live client, connecting anew if there is none. Blocking: NBD connection threads only.
    private func current() throws -> NBDClient {
        if let c = client.withLock({ $0 }), c.isConnected { return c }
        let box = Mutex<Result<NBDClient, any Error>?>(nil)
        let done = DispatchSemaphore(value: 0)
        let connect = self.connect
        Task {
            let r: Result<NBDClient, any Error>
            do { r = .success(try await connect()) } catch { r = .failure(error) }
            box.withLock { $0 = r }
            done.signal()
        }
        done.wait()
        let fresh = try box.withLock { $0! }.get()
        let replaced = client.withLock { c -> NBDClient? in
            if let c, c.isConnected { return c }
            c = fresh
            return nil
        }
        if replaced == nil {
            // A new connection: writes acknowledged on the old one and not flushed may be gone.
            unflushed.withLock { u in
                if u.writes > 0 { u.lost = true }
                u.writes = 0
            }
        }
        if let replaced {
            Task { await fresh.close() }
            return replaced
        }
        logger.info("recovered volume connected to the controller's export", metadata: ["volume": "\(name)"])
        return fresh
    }
}

/// What a recovery host serves for one recovered volume: the controller's point through a
/// proxy (`RecoveredVolume`), or a local copy being filled from it (`HydratingVolume`).
protocol RecoveryServedVolume: NBDExport {
    var source: String { get }
    var writes: UInt64 { get }
    func stop() async
    func status(socket: String) -> Ferry_V1_RecoveredVolumeStatus
}

extension RecoveryServedVolume {
    /// Name, source, socket, size and writes: what every recovered volume reports.
    func baseStatus(socket: String) -> Ferry_V1_RecoveredVolumeStatus {
        var s = Ferry_V1_RecoveredVolumeStatus()
        s.name = name
        s.source = source
        s.socketPath = socket
        s.sizeBytes = size
        s.writes = writes
        return s
    }
}

extension RecoveredVolume: RecoveryServedVolume {
    func status(socket: String) -> Ferry_V1_RecoveredVolumeStatus { baseStatus(socket: socket) }
}

extension HydratingVolume: RecoveryServedVolume {
    func stop() async {
        if let remote = remote as? RecoveredVolume { await remote.stop() }
    }

    func status(socket: String) -> Ferry_V1_RecoveredVolumeStatus {
        let p = progress
        var s = baseStatus(socket: socket)
        s.targetPath = target
        s.localBytes = p.localBytes
        s.fetchedBytes = p.fetchedBytes
        s.bytesPerSecond = rate
        s.copySeconds = copySeconds
        s.hydrated = p.complete
        s.hydrating = true
        return s
    }
}
