import FerryWire
import Foundation
import Logging
import NIOCore
import NIOPosix

/// Delta sync from a recovered volume (a point image with its overlay, served here) to its
/// original host, which is a sink now: the sink hashes its blocks, the controller hashes the
/// image's, and only the blocks that differ travel.
enum SinkSync {
    static let blockBytes = 64 << 10
    /// Blocks per hash request (64 MiB) and per apply message (4 MiB).
    static let blocksPerHash = 1024
    static let blocksPerApply = 64

    /// One pass over the whole volume. With `applying` false nothing is written: `sent` is
    /// then the bytes that would have been.
    static func pass(image: PointImage, sink: PeerSession, volume: String, applying: Bool = true) async throws
        -> (compared: UInt64, sent: UInt64) {
        let size = image.size
        var compared: UInt64 = 0, sent: UInt64 = 0
        var offset: UInt64 = 0
        if applying {
            // The source may have grown (an online resize): the sink grows first (a no-op when
            // it is that large already), so every block below lies within it.
            _ = try await sink.command("apply blocks", timeout: .seconds(120)) { c in
                c.applyBlocks.volume = volume
                var grow = Ferry_V1_AppliedBlock()
                grow.resizeBytes = size
                c.applyBlocks.blocks = [grow]
            }
        }
        while offset < size {
            let count = Int(min(UInt64(blocksPerHash), (size - offset + UInt64(blockBytes) - 1) / UInt64(blockBytes)))
            let result = try await sink.command("hash blocks", timeout: .seconds(120)) {
                $0.hashBlocks.volume = volume
                $0.hashBlocks.offset = offset
                $0.hashBlocks.blockBytes = UInt32(blockBytes)
                $0.hashBlocks.count = UInt32(count)
            }
            guard case .blockHashes(let theirs)? = result.outcome, theirs.hashes.count == count else {
                throw FerryError(.protocolViolation, "the sink answered hash blocks without \(count) hashes")
            }
            let start = offset
            let differing = try await NIOThreadPool.singleton.runIfActive { () throws -> [(UInt64, ByteBuffer)] in
                var out: [(UInt64, ByteBuffer)] = []
                for i in 0..<count {
                    let at = start + UInt64(i * blockBytes)
                    let length = Int(min(UInt64(blockBytes), size - at))
                    var buffer = ByteBuffer()
                    buffer.reserveCapacity(length)
                    try image.read(offset: at, length: length, into: &buffer)
                    let ours = buffer.withUnsafeReadableBytes { BlockHashing.hash($0) }
                    if ours != theirs.hashes[i] { out.append((at, buffer)) }
                }
                return out
            }
            compared += min(UInt64(count * blockBytes), size - offset)
            for b in differing { sent += UInt64(b.1.readableBytes) }
            if applying {
                for chunk in stride(from: 0, to: differing.count, by: blocksPerApply) {
                    try await apply(Array(differing[chunk..<min(differing.count, chunk + blocksPerApply)]), sink: sink, volume: volume)
                }
            }
            offset += UInt64(count * blockBytes)
        }
        if applying, sent > 0 { try await apply([], sink: sink, volume: volume, flush: true) }
        return (compared, sent)
    }

    static func apply(_ blocks: [(UInt64, ByteBuffer)], sink: PeerSession, volume: String, flush: Bool = false) async throws {
        _ = try await sink.command("apply blocks", timeout: .seconds(120)) { c in
            c.applyBlocks.volume = volume
            c.applyBlocks.flush = flush
            c.applyBlocks.blocks = blocks.map { offset, data in
                var b = Ferry_V1_AppliedBlock()
                b.offset = offset
                if data.withUnsafeReadableBytes({ BlockHashing.isZero($0) }) {
                    b.zeroLength = UInt64(data.readableBytes)
                } else {
                    b.data = Data(data.readableBytesView)
                }
                return b
            }
        }
    }

    /// Reads the given blocks from the image and applies them to the sink.
    static func push(blocks: [UInt64], image: PointImage, sink: PeerSession, volume: String) async throws -> UInt64 {
        let size = image.size
        var sent: UInt64 = 0
        for chunk in stride(from: 0, to: blocks.count, by: blocksPerApply) {
            let indices = Array(blocks[chunk..<min(blocks.count, chunk + blocksPerApply)])
            let data = try await NIOThreadPool.singleton.runIfActive { () throws -> [(UInt64, ByteBuffer)] in
                try indices.compactMap { index in
                    let at = index * UInt64(blockBytes)
                    guard at < size else { return nil }
                    var buffer = ByteBuffer()
                    let length = Int(min(UInt64(blockBytes), size - at))
                    buffer.reserveCapacity(length)
                    try image.read(offset: at, length: length, into: &buffer)
                    return (at, buffer)
                }
            }
            try await apply(data, sink: sink, volume: volume, flush: chunk + blocksPerApply >= blocks.count)
            sent += data.reduce(0) { $0 + UInt64($1.1.readableBytes) }
        }
        return sent
    }
}

/// After reprotect, the recovered volumes' writes stream on to the original hosts (sinks).
///
/// A failover served from here (not landed): every half second, the blocks written since the
/// last round are read from the image and applied there, unordered. A failover that landed:
/// each sink follows its recovered volume's replica journal here record by record, in write
/// order (`followLanded`), so it is crash-consistent at every instant. A sink that is away
/// keeps what is due until it is back.
public actor ReverseStreams {
    let exports: PointExports
    let registry: SessionRegistry
    let store: StateStore
    let replicas: ReplicaManager
    let logger: Logger
    var tasks: [String: Task<Void, Never>] = [:]
    /// Per plan, the exports whose sink has had its full pass: only these stream (another
    /// item's blocks wait for its own reverse step, which counts what it sends).
    private var enabled: [String: Set<String>] = [:]
    /// Sinks following a landed volume's journal, by "SOURCEHOSTID/VOLUME": where each stands.
    var sinks: [String: API.SinkProgress] = [:]
    /// The replica each of those sinks follows.
    var replicaOf: [String: ReplicaStore] = [:]
    /// The follower of each such sink, by the same key, with its plan.
    var followers: [String: (plan: String, id: UInt64, task: Task<Void, Never>)] = [:]
    var nextFollower: UInt64 = 0

    init(exports: PointExports, registry: SessionRegistry, store: StateStore, replicas: ReplicaManager, logger: Logger) {
        self.exports = exports
        self.registry = registry
        self.store = store
        self.replicas = replicas
        self.logger = logger
    }

    /// Starts streaming a plan's recovered volumes to their original hosts (no-op if running).
    /// After a controller restart the blocks written meanwhile are unknown: a full hash pass first
    /// (a landed plan's sinks know their journal position instead).
    func start(plan: RecoveryPlan, fullPassFirst: Bool = true) {
        guard tasks[plan.name] == nil else { return }
        let exports = self.exports, registry = self.registry, store = self.store, logger = self.logger
        tasks[plan.name] = Task {
            let records = (try? await store.recoveries(plan: plan.name)) ?? []
            if records.contains(where: { $0.volumes.contains { $0.hydrate == true } }) {
                // One follower per sink, each a task of its own; the next start (another item's
                // reverse step) starts those not running.
                await self.followLanded(plan: plan.name, records)
                return
            }
            var needsFullPass = Set<String>()
            if fullPassFirst {
                for record in (try? await store.recoveries(plan: plan.name)) ?? [] { for v in record.volumes { needsFullPass.insert(v.exportID) } }
            }
            while !Task.isCancelled {
                let streaming = self.enabled(plan.name)
                for record in (try? await store.recoveries(plan: plan.name)) ?? [] {
                    guard let host = try? await store.host(named: record.sourceHost),
                          let sink = await registry.entry(hostID: host.id)?.session else { continue }
                    for v in record.volumes where streaming.contains(v.exportID) || needsFullPass.contains(v.exportID) {
                        guard let image = await exports.image(id: v.exportID), let dirty = await exports.dirty(id: v.exportID) else { continue }
                        do {
                            if needsFullPass.contains(v.exportID) {
                                dirty.reset()
                                _ = try await SinkSync.pass(image: image, sink: sink, volume: v.volume)
                                needsFullPass.remove(v.exportID)
                                self.enable(plan: plan.name, exportIDs: [v.exportID])
                                continue
                            }
                            let blocks = dirty.take()
                            guard !blocks.isEmpty else { continue }
                            do {
                                _ = try await SinkSync.push(blocks: blocks, image: image, sink: sink, volume: v.volume)
                            } catch {
                                dirty.add(blocks)
                                throw error
                            }
                        } catch {
                            logger.warning("reverse stream round failed; retrying", metadata: ["volume": "\(v.source)", "error": "\(error)"])
                        }
                    }
                }
                try? await Task.sleep(for: .milliseconds(500))
            }
        }
    }

    /// Lets these exports stream: their sinks have had their full pass.
    func enable(plan: String, exportIDs: [String]) {
        enabled[plan, default: []].formUnion(exportIDs)
    }

    private func enabled(_ plan: String) -> Set<String> { enabled[plan] ?? [] }

    /// Stops a plan's reverse streams (failback, release); waits for the round in progress.
    func stop(plan: String) async {
        enabled[plan] = nil
        let mine = followers.filter { $0.value.plan == plan }
        for (key, follower) in mine {
            followers[key] = nil
            follower.task.cancel()
        }
        for follower in mine.values { await follower.task.value }
        guard let task = tasks.removeValue(forKey: plan) else { return }
        task.cancel()
        await task.value
        for record in (try? await store.recoveries(plan: plan)) ?? [] {
            for v in record.volumes {
                sinks[v.sourceHostID + "/" + v.volume] = nil
                replicaOf[v.sourceHostID + "/" + v.volume] = nil
            }
        }
    }
}
