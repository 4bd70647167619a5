import FerryWire
import Foundation
import Logging
import NIOCore
import NIOPosix

/// The volumes this agent protects, each served on its own NBD socket. The controller owns the
/// list; a copy in the data dir lets the agent serve its volumes from start-up on, controller or
/// not, because a workload must never wait for the controller.
public actor VolumeManager {
    struct Served {
        var spec: Ferry_V1_VolumeSpec
        let volume: BlockVolume
        let log: ChangeLog
        let socket: String
        let server: Task<Void, any Error>
    }

    let listPath: String
    let socketDirectory: String
    let pool: NIOThreadPool
    let logger: Logger
    private var served: [String: Served] = [:]
    /// Per volume, the last sequence of its current epoch the controller holds durably.
    private var resumeAfter: [String: UInt64] = [:]
    let changeLogBytes: Int
    let spillBytes: Int64

    public init(dataDir: String, socketDirectory: String, pool: NIOThreadPool, logger: Logger,
                changeLogBytes: Int = 64 << 20, spillBytes: Int64 = 1 << 30) {
        self.changeLogBytes = changeLogBytes
        self.spillBytes = spillBytes
        listPath = dataDir + "/volumes.json"
        self.socketDirectory = socketDirectory
        self.pool = pool
        self.logger = logger
    }

    /// Serves the volumes remembered from the last run. A volume that cannot be opened is logged
    /// and skipped; the others are served.
    public func start() async {
        guard let data = FileManager.default.contents(atPath: listPath) else { return }
        do {
            let specs = try JSONDecoder().decode([Remembered].self, from: data).map(\.spec)
            _ = await sync(specs)
        } catch {
            logger.error("cannot read \(listPath); volumes will be served once the controller sends them", metadata: ["error": "\(error)"])
        }
    }

    /// Starts protecting one volume, or confirms it if it is already served as asked.
    public func protect(_ spec: Ferry_V1_VolumeSpec) async throws -> Ferry_V1_VolumeStatus {
        if let existing = served[spec.name] {
            guard existing.spec.path == spec.path else {
                throw FerryError(.conflict, "volume \(spec.name) is already protected at \(existing.spec.path)")
            }
            return status(existing)
        }
        if let other = served.values.first(where: { $0.spec.path == spec.path }) {
            throw FerryError(.conflict, "\(spec.path) is already protected as volume \(other.spec.name)")
        }
        let entry = try await openVolume(spec)
        served[spec.name] = entry
        try persist()
        return status(entry)
    }

    /// Makes the served set exactly `specs`; returns the status of each (with its error, if any).
    public func sync(_ specs: [Ferry_V1_VolumeSpec]) async -> [Ferry_V1_VolumeStatus] {
        let wanted = Set(specs.map(\.name))
        for (name, entry) in served where !wanted.contains(name) {
            entry.server.cancel()
            unlink(entry.socket)
            served[name] = nil
            logger.info("volume no longer protected", metadata: ["volume": "\(name)"])
        }
        var statuses: [Ferry_V1_VolumeStatus] = []
        for spec in specs {
            if let log = served[spec.name]?.log {
                // Same epoch: resume after what the controller holds. Otherwise (this agent
                // restarted, or the replica is new) the controller takes this epoch from its start.
                resumeAfter[spec.name] = spec.epoch == log.epoch ? spec.durableSequence : 0
            } else {
                resumeAfter[spec.name] = 0
            }
            do {
                statuses.append(try await protect(spec))
            } catch {
                var failed = Ferry_V1_VolumeStatus()
                failed.name = spec.name
                failed.path = spec.path
                failed.error = (error as? FerryError)?.message ?? "\(error)"
                logger.error("cannot serve volume", metadata: ["volume": "\(spec.name)", "error": "\(failed.error)"])
                statuses.append(failed)
            }
        }
        try? persist()
        return statuses
    }

    /// What each volume's streamer sends: its log and the sequence to resume after.
    public func streams() -> [(name: String, log: ChangeLog, after: UInt64)] {
        served.keys.sorted().compactMap { name in
            served[name].map { (name, $0.log, resumeAfter[name] ?? 0) }
        }
    }

    /// The controller holds everything through `durable` of `epoch`: trim it.
    public func acked(volume: String, epoch: UInt64, durable: UInt64) {
        guard let log = served[volume]?.log, log.epoch == epoch else { return }
        log.trim(through: durable)
        resumeAfter[volume] = max(resumeAfter[volume] ?? 0, durable)
    }

    public func statuses() -> [Ferry_V1_VolumeStatus] {
        served.keys.sorted().compactMap { served[$0].map(status) }
    }

    /// Stops every export (the backing files stay as they are).
    public func stop() {
        for entry in served.values {
            entry.server.cancel()
            unlink(entry.socket)
        }
        served = [:]
    }

    private func openVolume(_ spec: Ferry_V1_VolumeSpec) async throws -> Served {
        guard VolumeName.isValid(spec.name) else {
            throw FerryError(.badRequest, "'\(spec.name)' is not a valid volume name (1-63 characters: letters, digits, '.', '-', '_')")
        }
        guard spec.path.hasPrefix("/") else { throw FerryError(.badRequest, "volume path must be absolute, not '\(spec.path)'") }
        try Self.prepare(path: spec.path, createSize: spec.createSizeBytes)
        let spillDirectory = (listPath as NSString).deletingLastPathComponent + "/spill"
        try FileManager.default.createDirectory(atPath: spillDirectory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        let log = try ChangeLog(memoryBytes: changeLogBytes, spillPath: spillDirectory + "/" + spec.name + ".spill", spillBytes: spillBytes)
        let volume = try BlockVolume(name: spec.name, path: spec.path, recorder: log, pool: pool)
        if spec.createSizeBytes > 0, volume.size != spec.createSizeBytes {
            throw FerryError(.conflict, "\(spec.path) exists with \(volume.size) bytes, not the \(spec.createSizeBytes) asked for")
        }
        if spec.sizeBytes > 0, volume.size != spec.sizeBytes {
            throw FerryError(.conflict, "\(spec.path) is now \(volume.size) bytes, but was protected with \(spec.sizeBytes); resize through Ferry, not behind it")
        }
        try FileManager.default.createDirectory(atPath: socketDirectory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        let socket = socketDirectory + "/" + spec.name + ".sock"
        let server = NBDServer(volumes: [volume], logger: logger)
        let ready = AsyncStream<Void>.makeStream()
        let task = Task { try await server.serve(unixSocket: socket, onReady: { ready.continuation.finish() }) }
        for await _ in ready.stream {}
        var recorded = spec
        recorded.sizeBytes = volume.size
        recorded.createSizeBytes = 0
        logger.info("volume exported", metadata: ["volume": "\(spec.name)", "path": "\(spec.path)", "bytes": "\(volume.size)", "socket": "\(socket)"])
        return Served(spec: recorded, volume: volume, log: log, socket: socket, server: task)
    }

    /// Checks the path, making a sparse image when asked and it does not exist yet.
    static func prepare(path: String, createSize: UInt64) throws {
        var st = stat()
        if stat(path, &st) == 0 {
            let type = st.st_mode & S_IFMT
            guard type == S_IFREG || type == S_IFBLK else {
                throw FerryError(.badRequest, "\(path) is neither an image file nor a block device")
            }
            return
        }
        guard createSize > 0 else {
            throw FerryError(.notFound, "\(path) does not exist; give a size to create a new image (ferryctl protect --create-size)")
        }
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw FerryError(.io, "cannot create \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard ftruncate(fd, off_t(createSize)) == 0 else {
            throw FerryError(.io, "cannot size \(path) to \(createSize) bytes: \(String(cString: strerror(errno)))")
        }
    }

    private func status(_ entry: Served) -> Ferry_V1_VolumeStatus {
        var s = Ferry_V1_VolumeStatus()
        s.name = entry.spec.name
        s.path = entry.spec.path
        s.sizeBytes = entry.volume.size
        s.socketPath = entry.socket
        s.lastSequence = entry.log.last
        s.epoch = entry.log.epoch
        return s
    }

    /// What the data dir remembers of a volume.
    struct Remembered: Codable {
        var name: String
        var path: String
        var sizeBytes: UInt64

        var spec: Ferry_V1_VolumeSpec {
            var s = Ferry_V1_VolumeSpec()
            s.name = name
            s.path = path
            s.sizeBytes = sizeBytes
            return s
        }
    }

    private func persist() throws {
        let list = served.values.map { Remembered(name: $0.spec.name, path: $0.spec.path, sizeBytes: $0.spec.sizeBytes) }
            .sorted { $0.name < $1.name }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        try PEMFiles.writePublic(String(decoding: try encoder.encode(list), as: UTF8.self) + "\n", to: listPath)
    }
}
