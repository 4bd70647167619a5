import FerryWire
import Foundation
import Logging
import NIOCore

/// The sink side of a failover that landed: the original host's (fenced) volume follows the
/// recovered volume's replica journal here, record by record, in write order.
enum OrderedSink {
    /// Per batch: about this much data, at most this many records (the agent takes 1024 blocks).
    static let batchBytes = 4 << 20
    static let batchRecords = 1024

    /// What names the replica a sink follows: "RECOVERYHOSTID/VOLUME".
    static func source(hostID: String, volume: String) -> String { hostID + "/" + volume }

    /// Where the sink stands (it first finishes a batch a crash interrupted); nil when it
    /// follows no source.
    static func position(sink: PeerSession, volume: String) async throws -> Ferry_V1_SinkPosition? {
        try await command(sink, volume: volume) { _ in }
    }

    /// Records that the sink was just made equal to the replica at `position`.
    static func reset(sink: PeerSession, volume: String, source: String, to position: ReplicaPosition) async throws {
        let answer = try await command(sink, volume: volume) { c in
            c.reset = true
            c.through = wire(source, position)
        }
        guard answer?.source == source, answer?.epoch == position.epoch, answer?.sequence == position.sequence else {
            throw FerryError(.protocolViolation, "the sink of \(volume) did not record the position it was made equal at")
        }
    }

    /// Sends `entries` (the records right after `after`) and returns where the sink is then.
    static func send(_ entries: [JournalEntry], after: ReplicaPosition, source: String, sink: PeerSession, volume: String) async throws
        -> Ferry_V1_SinkPosition? {
        try await command(sink, volume: volume) { c in
            c.after = wire(source, after)
            c.through = wire(source, entries.last!.position)
            c.blocks = entries.map { e in
                var b = Ferry_V1_AppliedBlock()
                b.offset = e.offset
                if e.resize {
                    b.offset = 0
                    b.resizeBytes = e.length
                } else if let data = e.data {
                    b.data = Data(data.readableBytesView)
                } else {
                    b.zeroLength = e.length
                }
                return b
            }
        }
    }

    private static func command(_ sink: PeerSession, volume: String, _ fill: (inout Ferry_V1_ApplyBlocks) -> Void) async throws
        -> Ferry_V1_SinkPosition? {
        var request = Ferry_V1_ApplyBlocks()
        request.volume = volume
        request.ordered = true
        fill(&request)
        let result = try await sink.command("apply records", timeout: .seconds(120)) { $0.applyBlocks = request }
        guard case .blocksApplied(let applied)? = result.outcome else {
            throw FerryError(.protocolViolation, "the sink answered apply records without its result")
        }
        return applied.hasPosition ? applied.position : nil
    }

    static func wire(_ source: String, _ position: ReplicaPosition) -> Ferry_V1_SinkPosition {
        var p = Ferry_V1_SinkPosition()
        p.source = source
        p.epoch = position.epoch
        p.sequence = position.sequence
        return p
    }
}

extension ReverseStreams {
    /// One landed volume and its sink.
    struct LandedSink: Sendable {
        var plan: String
        var sinkHost: String
        var sinkHostID: String
        var sinkVolume: String
        var replicaHostID: String
        var replicaVolume: String
        var replicaHost: String
        var size: UInt64
        var key: String { sinkHostID + "/" + sinkVolume }
        var source: String { OrderedSink.source(hostID: replicaHostID, volume: replicaVolume) }
    }

    func landedSinks(_ records: [RecoveryRecord]) async -> [LandedSink] {
        var out: [LandedSink] = []
        for record in records where record.purpose == "failover" {
            guard let recovery = try? await store.host(named: record.recoveryHost),
                  let source = try? await store.host(named: record.sourceHost) else { continue }
            for v in record.volumes where v.hydrate == true {
                out.append(LandedSink(plan: record.plan, sinkHost: record.sourceHost, sinkHostID: source.id, sinkVolume: v.volume,
                                      replicaHostID: recovery.id, replicaVolume: v.localName, replicaHost: record.recoveryHost, size: v.size))
            }
        }
        return out
    }

    /// Makes the sink equal to its replica's latest position by block hashes (only the blocks
    /// that differ travel) and records that position there: the ordered stream goes on from it.
    func pass(_ s: LandedSink) async throws -> (compared: UInt64, sent: UInt64) {
        guard let sink = await registry.entry(hostID: s.sinkHostID)?.session else {
            throw FerryError(.unavailable, "\(s.sinkHost) is not connected; it becomes a sink once it is")
        }
        if await replicas.isSeeding(hostID: s.replicaHostID, volume: s.replicaVolume) {
            throw FerryError(.unavailable, "the replica of \(s.replicaHost)/\(s.replicaVolume) is still being built from the failover point; resume the job once 'ferryctl volumes' shows it protected")
        }
        let replica = try await replicas.replica(hostID: s.replicaHostID, volume: s.replicaVolume, size: s.size)
        let position = await replica.latestPosition
        await replica.pinForSink(s.key, at: position)
        let image = try await replica.openImage(at: position)
        let result: (compared: UInt64, sent: UInt64)
        do {
            result = try await SinkSync.pass(image: image, sink: sink, volume: s.sinkVolume)
            try image.close()
        } catch {
            try? image.close()
            throw error
        }
        try await OrderedSink.reset(sink: sink, volume: s.sinkVolume, source: s.source, to: position)
        await note(s, position: position, replica: replica, appliedBytes: result.sent)
        return result
    }

    /// Starts a follower for each landed volume of a plan that has none running (they run until
    /// the plan's streams stop: failback, release), and forgets the plan's start task.
    func followLanded(plan: String, _ records: [RecoveryRecord]) async {
        for s in await landedSinks(records) where followers[s.key] == nil {
            nextFollower += 1
            let id = nextFollower
            followers[s.key] = (plan, id, Task { await self.follow(s, id: id) })
        }
        tasks[plan] = nil
    }

    /// Applies the replica's records to the sink in journal order, batch by batch, woken by
    /// each append (and by the sink's host coming back). If the journal folded past the sink
    /// (over its cap), a pass by block hashes brings the sink to the latest position and it
    /// follows on from there. A sink that follows no source yet ends its follower: the
    /// reprotect step's pass makes it equal first, then starts it again.
    private func follow(_ s: LandedSink, id: UInt64) async {
        defer { if followers[s.key]?.id == id { followers[s.key] = nil } }
        var position: ReplicaPosition?
        while !Task.isCancelled {
            do {
                guard let sink = await registry.waitForEntry(hostID: s.sinkHostID)?.session else { return }
                let replica = try await replicas.replica(hostID: s.replicaHostID, volume: s.replicaVolume, size: s.size)
                if position == nil {
                    guard let p = try await OrderedSink.position(sink: sink, volume: s.sinkVolume), p.source == s.source else {
                        logger.info("the sink follows no source yet; the reprotect step makes it equal, then it follows",
                                    metadata: ["sink": "\(s.sinkHost)/\(s.sinkVolume)"])
                        return
                    }
                    position = ReplicaPosition(epoch: p.epoch, sequence: p.sequence)
                }
                guard let at = position else { continue }
                await replica.pinForSink(s.key, at: at)
                let entries: [JournalEntry]
                do {
                    entries = try await replica.records(after: at, maxBytes: OrderedSink.batchBytes, maxCount: OrderedSink.batchRecords)
                } catch let error as FerryError where error.code == .notFound {
                    logger.warning("the sink is behind what the journal keeps; a pass by block hashes brings it up", metadata: [
                        "sink": "\(s.sinkHost)/\(s.sinkVolume)", "reason": "\(error.message)"])
                    _ = try await pass(s)
                    position = nil
                    continue
                }
                if entries.isEmpty {
                    await note(s, position: at, replica: replica, appliedBytes: 0)
                    await replica.waitForAppend(beyond: at)
                    continue
                }
                let answer = try await OrderedSink.send(entries, after: at, source: s.source, sink: sink, volume: s.sinkVolume)
                guard let answer, answer.source == s.source else {
                    position = nil
                    continue
                }
                position = ReplicaPosition(epoch: answer.epoch, sequence: answer.sequence)
                let bytes = entries.reduce(UInt64(0)) { $0 + UInt64($1.data?.readableBytes ?? 0) }
                await note(s, position: position!, replica: replica, appliedBytes: position == entries.last!.position ? bytes : 0)
            } catch is CancellationError {
                return
            } catch {
                position = nil
                logger.warning("ordered reverse stream failed; retrying", metadata: ["sink": "\(s.sinkHost)/\(s.sinkVolume)", "error": "\(error)"])
                // A back-off before the retry (the sink's session may be closing), not a poll.
                try? await Task.sleep(for: .seconds(1))
            }
        }
    }

    /// Records where a sink stands, for `ferryctl volumes` and the failback's drain.
    private func note(_ s: LandedSink, position: ReplicaPosition, replica: ReplicaStore, appliedBytes: UInt64) async {
        let latest = await replica.latestPosition
        let now = Date()
        var progress = sinks[s.key] ?? API.SinkProgress(follows: s.replicaHost + "/" + s.replicaVolume, epoch: 0, sequence: 0,
                                                        behindRecords: nil, lagSeconds: 0, appliedBytes: 0, caughtUpAt: now)
        progress.epoch = position.epoch
        progress.sequence = position.sequence
        progress.appliedBytes += appliedBytes
        progress.behindRecords = latest.epoch == position.epoch ? latest.sequence - min(latest.sequence, position.sequence) : nil
        if progress.behindRecords == 0 { progress.caughtUpAt = now }
        progress.lagSeconds = progress.behindRecords == 0 ? 0 : max(0, now.timeIntervalSince(progress.caughtUpAt ?? now))
        sinks[s.key] = progress
        replicaOf[s.key] = replica
    }

    /// Where the sink of `SOURCEHOSTID/VOLUME` stands, if it follows a landed volume: its lag
    /// against what the replica holds now (the sink may be away and not reporting).
    func sinkProgress(hostID: String, volume: String) async -> API.SinkProgress? {
        guard var progress = sinks[hostID + "/" + volume], let replica = replicaOf[hostID + "/" + volume] else { return nil }
        let latest = await replica.latestPosition
        let behind = latest.epoch == progress.epoch ? latest.sequence - min(latest.sequence, progress.sequence) : nil
        progress.behindRecords = behind
        progress.lagSeconds = behind == 0 ? 0 : max(0, Date().timeIntervalSince(progress.caughtUpAt ?? Date()))
        return progress
    }
}
