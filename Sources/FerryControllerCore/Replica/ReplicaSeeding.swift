import FerryWire
import Foundation
import Logging
import NIOCore
import NIOPosix

/// A recovered volume's replica starts as a copy of the failover point, made here from the
/// source replica (nothing crosses the network): its journal then takes the recovered host's
/// writes like any replica's. The copy is built in a directory of its own and renamed into
/// place when complete, so a restart finds either no replica (and builds it again) or a whole one.
extension ReplicaManager {
    /// Whether the replica of `volume` exists (complete). If not, starts building it from the
    /// source replica's image at `position` (unless that runs already) and calls `done` when
    /// it is there. A build that fails (the point is gone, the disk is full) is not retried
    /// forever with the volume unprotected meanwhile: the replica starts empty instead, and the
    /// agent's full initial sync fills it (`done` gets the error that caused that).
    func ensureSeeded(hostID: String, volume: String, size: UInt64, from source: ReplicaStore, at position: ReplicaPosition,
                      logger: Logger, done: @escaping @Sendable (_ inPlace: Bool, _ error: (any Error)?) async -> Void) -> Bool {
        let key = hostID + "/" + volume
        let directory = root + "/" + key
        if slots[key] != nil || FileManager.default.fileExists(atPath: directory + "/state.json") { return true }
        guard seeding[key] == nil else { return false }
        // The marker first: from here on the replica is not opened (or made empty) until built.
        do {
            try FileManager.default.createDirectory(atPath: directory + ".seeding/journal", withIntermediateDirectories: true,
                                                    attributes: [.posixPermissions: 0o700])
        } catch {
            logger.error("cannot start building a recovered volume's replica", metadata: ["replica": "\(key)", "error": "\(error)"])
            return false
        }
        let pool = self.pool
        seeding[key] = Task {
            let began = ContinuousClock.now
            var failure: (any Error)?
            var inPlace = true
            do {
                let bytes = try await Self.seed(directory: directory, size: size, source: source, position: position, pool: pool)
                logger.info("recovered volume's replica built from its failover point", metadata: [
                    "replica": "\(key)", "data-bytes": "\(bytes)", "seconds": "\(began.duration(to: .now))"])
            } catch {
                failure = error
                do {
                    try Self.startEmpty(directory: directory)
                    logger.error("cannot build a recovered volume's replica from its failover point; it starts empty and the agent's full initial sync fills it",
                                 metadata: ["replica": "\(key)", "error": "\(error)"])
                } catch let fallback {
                    inPlace = false
                    logger.error("cannot build a recovered volume's replica, nor start it empty; retried at the host's next volume list",
                                 metadata: ["replica": "\(key)", "error": "\(error)", "fallback-error": "\(fallback)"])
                }
            }
            self.seeded(key)
            await done(inPlace, failure)
        }
        return false
    }

    private func seeded(_ key: String) { seeding[key] = nil }

    /// Whether the replica of `volume` is being built from a failover point now.
    func isSeeding(hostID: String, volume: String) -> Bool {
        seeding[hostID + "/" + volume] != nil || FileManager.default.fileExists(atPath: root + "/" + hostID + "/" + volume + ".seeding")
    }

    /// An empty replica (never synced) in place of one that could not be built.
    static func startEmpty(directory: String) throws {
        let fm = FileManager.default
        try? fm.removeItem(atPath: directory)
        try fm.createDirectory(atPath: directory + "/journal", withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        try ReplicaStore.writeState(ReplicaStore.State(), in: directory)
        try fm.removeItem(atPath: directory + ".seeding")
    }

    /// Copies the point's data (not its holes and zero ranges) into a new replica's image and
    /// base, records it as synced, and moves it into place. Returns the data bytes copied.
    static func seed(directory: String, size: UInt64, source: ReplicaStore, position: ReplicaPosition, pool: NIOThreadPool) async throws -> UInt64 {
        let building = directory + ".seeding"
        let image = try await source.openImage(at: position)
        defer { try? image.close() }
        guard image.size == size else {
            throw FerryError(.conflict, "the failover point is \(image.size) bytes, the recovered volume \(size)")
        }
        return try await pool.runIfActive {
            let fm = FileManager.default
            // Whatever an interrupted build left is overwritten (the files are truncated).
            try fm.createDirectory(atPath: building + "/journal", withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            var fds: [Int32] = []
            defer { for fd in fds { close(fd) } }
            for name in ["replica.img", "base.img"] {
                let fd = Glibc.open(building + "/" + name, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
                guard fd >= 0 else { throw FerryError.system(errno, "create \(building)/\(name)") }
                fds.append(fd)
                guard ftruncate(fd, off_t(size)) == 0 else { throw FerryError.system(errno, "size \(building)/\(name)") }
            }
            var copied: UInt64 = 0
            var at: UInt64 = 0
            var buffer = ByteBuffer()
            let chunk: UInt64 = 4 << 20
            while at < size {
                let extents = try image.allocation(offset: at, length: min(size - at, 1 << 30), limit: 1024)
                guard !extents.isEmpty else { break }
                for e in extents {
                    var from = at
                    let end = at + e.length
                    while !e.isZero, from < end {
                        let n = Int(min(chunk, end - from))
                        buffer.clear()
                        try image.read(offset: from, length: n, into: &buffer)
                        for fd in fds {
                            let failed = buffer.withUnsafeReadableBytes { FileIO.writeAll(fd, $0, at: from) }
                            if failed != 0 { throw FerryError.system(failed, "write \(building)") }
                        }
                        copied += UInt64(n)
                        from += UInt64(n)
                    }
                    at = end
                }
            }
            for fd in fds where fdatasync(fd) != 0 { throw FerryError.system(errno, "sync \(building)") }
            try ReplicaStore.writeSeededState(in: building, size: size)
            try? fm.createDirectory(atPath: (directory as NSString).deletingLastPathComponent, withIntermediateDirectories: true,
                                    attributes: [.posixPermissions: 0o700])
            guard rename(building, directory) == 0 else { throw FerryError.system(errno, "rename \(building) to \(directory)") }
            return copied
        }
    }
}
