import FerryNBD
import FerryWire
import Foundation
import Logging
import NIOCore
import ServiceLifecycle
import Synchronization

/// Point-in-time images the controller serves as NBD exports on a local unix socket, for
/// tools on the controller's machine (qemu-img, nbdcopy, a checker). Each is opened from the
/// replica's base and journal through the extent index: ready at once, nothing copied.
/// A writable one takes writes into a copy-on-write overlay; the point itself never changes.
public actor PointExports {
    public struct Entry: Sendable {
        public var view: API.Export
        public var image: PointImage
    }

    public let socketPath: String
    let overlayRoot: String
    let server: NBDServer
    private var entries: [String: Entry] = [:]

    public init(socketPath: String, overlayRoot: String, logger: Logger) {
        self.socketPath = socketPath
        self.overlayRoot = overlayRoot
        server = NBDServer(volumes: [], logger: logger)
    }

    /// Serves the socket until cancelled (run by the controller's service group).
    nonisolated func serve() async throws {
        try await server.serve(unixSocket: socketPath)
    }

    public func create(volume: String, replica: ReplicaStore, position: ReplicaPosition, point: String, writable: Bool) async throws -> API.Export {
        guard entries.count < 1024 else { throw FerryError(.unavailable, "1024 exports are open already; remove some ('ferryctl exports')") }
        let id = "x-" + String(UInt32.random(in: 0...UInt32.max), radix: 16)
        let started = ContinuousClock.now
        let image = try await replica.openImage(at: position, overlayDirectory: writable ? overlayRoot + "/" + id : nil)
        let opened = started.duration(to: .now)
        let view = API.Export(
            id: id, volume: volume, point: point, epoch: position.epoch, sequence: position.sequence, writable: writable,
            uri: "nbd+unix:///\(id)?socket=\(socketPath)", socketPath: socketPath, createdAt: Date(),
            openMilliseconds: opened.seconds * 1000)
        entries[id] = Entry(view: view, image: image)
        server.add(PointImageExport(name: id, image: image))
        return view
    }

    public func list() -> [API.Export] { entries.values.map(\.view).sorted { $0.createdAt < $1.createdAt } }

    public func remove(id: String) throws {
        guard let entry = entries.removeValue(forKey: id) else {
            throw FerryError(.notFound, "no export '\(id)'; 'ferryctl exports' lists them")
        }
        server.remove(name: id)
        try entry.image.close()
        // A writable export's overlay goes with it: a later export never reuses its writes.
        if entry.view.writable { try? FileManager.default.removeItem(atPath: overlayRoot + "/" + id) }
    }

    /// Closes every export (controller shutdown).
    public func closeAll() {
        for (id, entry) in entries {
            server.remove(name: id)
            try? entry.image.close()
        }
        entries = [:]
    }
}

/// A point image as an NBD export.
final class PointImageExport: NBDExport {
    let name: String
    let image: PointImage
    var size: UInt64 { image.size }
    var isReadOnly: Bool { !image.writable }

    init(name: String, image: PointImage) {
        self.name = name
        self.image = image
    }

    func performNow(_ op: NBDOperation, allocator: ByteBufferAllocator) -> Result<ByteBuffer?, VolumeIOError> {
        do {
            switch op {
            case .read(let offset, let length):
                var buffer = allocator.buffer(capacity: length)
                try image.read(offset: offset, length: length, into: &buffer)
                return .success(buffer)
            case .write(let offset, let data, let fua):
                try image.write(offset: offset, data: data)
                if fua { try image.flush() }
            case .zero(let offset, let length, let fua):
                try image.zero(offset: offset, length: length)
                if fua { try image.flush() }
            case .flush:
                if image.writable { try image.flush() }
            }
            return .success(nil)
        } catch {
            return .failure(VolumeIOError(operation: "point image \(name)", errno: EIO))
        }
    }
}

/// Serves the exports' socket as a service of the controller.
struct PointExportService: Service {
    let exports: PointExports

    func run() async throws {
        do {
            try await cancelWhenGracefulShutdown { try await exports.serve() }
        } catch is CancellationError {
            // Shutting down.
        }
        await exports.closeAll()
    }
}
