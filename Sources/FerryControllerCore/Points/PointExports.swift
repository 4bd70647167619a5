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
        /// Serves a recovered host (a job made it): not listed, not removable through the API.
        public var managed: Bool
        public var dirty: DirtyBlocks
        /// Host ids that may open it over the network (NBD+TLS); none: the local socket only.
        public var principals: Set<String>
    }

    public let socketPath: String
    let overlayRoot: String
    let server: NBDServer
    /// Every open and refusal over the network, for the audit log.
    let accessLog: ExportAccessLog
    /// Live connections over the network, by host.
    public let connections: ExportConnections
    private var entries: [String: Entry] = [:]

    public init(socketPath: String, overlayRoot: String, accessLog: ExportAccessLog = ExportAccessLog(),
                connections: ExportConnections = ExportConnections(), logger: Logger) {
        self.socketPath = socketPath
        self.overlayRoot = overlayRoot
        self.accessLog = accessLog
        self.connections = connections
        server = NBDServer(volumes: [], logger: logger)
    }

    /// Serves the socket until cancelled (run by the controller's service group).
    nonisolated func serve() async throws {
        try await server.serve(unixSocket: socketPath)
    }

    /// Opens a point image and serves it. A managed export (a recovered host's volume) keeps
    /// the id and overlay it is given, so it can be opened again after a restart with the
    /// writes it took; its id is an unguessable capability, as hosts reach it over TLS.
    /// `principals` are the host ids that may open it over NBD+TLS (`hostNames` their names,
    /// shown in listings); none: only the controller's own local socket serves it.
    public func create(id given: String? = nil, volume: String, replica: ReplicaStore, position: ReplicaPosition, point: String,
                       writable: Bool, managed: Bool = false, principals: [String: String] = [:]) async throws -> API.Export {
        guard entries.count < 1024 else { throw FerryError(.unavailable, "1024 exports are open already; remove some ('ferryctl exports')") }
        let id = given ?? Self.newID(prefix: "x-")
        guard entries[id] == nil else { throw FerryError(.conflict, "export \(id) is open already") }
        let started = ContinuousClock.now
        let image = try await replica.openImage(at: position, overlayDirectory: writable ? overlayRoot + "/" + id : nil)
        let opened = started.duration(to: .now)
        let view = API.Export(
            id: id, volume: volume, point: point, epoch: position.epoch, sequence: position.sequence, writable: writable,
            uri: "nbd+unix:///\(id)?socket=\(socketPath)", socketPath: socketPath, createdAt: Date(),
            openMilliseconds: opened.seconds * 1000, hosts: principals.values.sorted())
        let dirty = DirtyBlocks(blockBytes: UInt64(SinkSync.blockBytes))
        entries[id] = Entry(view: view, image: image, managed: managed, dirty: dirty, principals: Set(principals.keys))
        server.add(PointImageExport(name: id, image: image, dirty: dirty))
        return view
    }

    /// Serves a connection joined from the NBD+TLS listener for an authenticated host: it sees
    /// and opens only the exports made for that host, and each open and refusal is logged.
    /// Takes the descriptor.
    func serveJoined(connection fd: Int32, hostID: String, hostName: String) {
        let allowed = Set(entries.filter { $0.value.principals.contains(hostID) }.keys)
        let volumes = entries.mapValues(\.view.volume)
        let log = accessLog
        server.serve(connection: fd, access: NBDAccess(allowed: allowed) { event in
            switch event {
            case .opened(let name): log.record(.opened, host: hostName, export: name, volume: volumes[name])
            case .refused(let name): log.record(.refused, host: hostName, export: name, volume: volumes[name])
            }
        })
    }

    /// A new export id: 128 random bits, not guessable (a host still needs to be named as a
    /// principal of the export to open it).
    public static func newID(prefix: String) -> String {
        var generator = SystemRandomNumberGenerator()
        return prefix + (0..<2).map { _ in String(format: "%016llx", generator.next() as UInt64) }.joined()
    }

    public func list() -> [API.Export] { entries.values.filter { !$0.managed }.map(\.view).sorted { $0.createdAt < $1.createdAt } }

    /// The image behind an export, if it is open.
    public func image(id: String) -> PointImage? { entries[id]?.image }

    /// The blocks written to an export since they were last taken.
    public func dirty(id: String) -> DirtyBlocks? { entries[id]?.dirty }

    public func remove(id: String, managed: Bool = false) throws {
        guard let found = entries[id], found.managed == managed else {
            throw FerryError(.notFound, "no export '\(id)'; 'ferryctl exports' lists them")
        }
        guard let entry = entries.removeValue(forKey: id) else { return }
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
    let dirty: DirtyBlocks?
    var size: UInt64 { image.size }
    var isReadOnly: Bool { !image.writable }

    init(name: String, image: PointImage, dirty: DirtyBlocks? = nil) {
        self.name = name
        self.image = image
        self.dirty = dirty
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
                dirty?.mark(offset: offset, length: UInt64(data.readableBytes))
                if fua { try image.flush() }
            case .zero(let offset, let length, let fua):
                try image.zero(offset: offset, length: length)
                dirty?.mark(offset: offset, length: length)
                if fua { try image.flush() }
            case .flush:
                if image.writable { try image.flush() }
            }
            return .success(nil)
        } catch {
            return .failure(VolumeIOError(operation: "point image \(name)", errno: EIO))
        }
    }

    func allocation(offset: UInt64, length: UInt64, limit: Int) -> Result<[NBDExtent], VolumeIOError> {
        do {
            return .success(try image.allocation(offset: offset, length: length, limit: limit))
        } catch {
            return .failure(VolumeIOError(operation: "block status of point image \(name)", errno: EIO))
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

/// Blocks written to an export since they were last taken (the reverse stream's work list).
public final class DirtyBlocks: Sendable {
    let blockBytes: UInt64
    private let blocks = Mutex<Set<UInt64>>([])

    init(blockBytes: UInt64) { self.blockBytes = blockBytes }

    func mark(offset: UInt64, length: UInt64) {
        guard length > 0 else { return }
        let first = offset / blockBytes, last = (offset + length - 1) / blockBytes
        blocks.withLock { for b in first...last { $0.insert(b) } }
    }

    /// The block indices written since the last take, sorted; the set is empty afterwards.
    func take() -> [UInt64] { blocks.withLock { b in defer { b = [] }; return b.sorted() } }
    func add(_ more: [UInt64]) { blocks.withLock { $0.formUnion(more) } }
    func reset() { blocks.withLock { $0 = [] } }
}
