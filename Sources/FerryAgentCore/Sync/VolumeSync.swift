import FerryWire
import Foundation
import Logging
import Synchronization

/// Where a volume's sync job (initial sync, crash or overflow resync, resync on demand) stands,
/// shared by the worker and the reports.
public final class SyncTracker: Sendable {
    struct State {
        var kind: Ferry_V1_SyncKind = .none
        var doneBytes: UInt64 = 0
        var sentBytes: UInt64 = 0
        var started: Int64 = 0
        var startedAt = ContinuousClock.now
        var finished = false
        /// A full (or scan) job finished during this run.
        var fullCompleted = false
    }

    private let state = Mutex(State())

    /// A new job of `kind` starts (or a running one grows: a full job stays full).
    func begin(_ kind: Ferry_V1_SyncKind) {
        state.withLock { s in
            if s.finished || s.kind == .none {
                s = State(kind: kind, started: ChangeLog.now(), startedAt: .now, fullCompleted: s.fullCompleted)
            } else if kind == .full || (kind == .scan && s.kind == .marked) {
                s.kind = kind
            }
        }
    }

    func advance(done: UInt64, sent: UInt64) {
        state.withLock { s in
            if s.kind == .none { s = State(kind: .marked, started: ChangeLog.now(), startedAt: .now, fullCompleted: s.fullCompleted) }
            s.finished = false
            s.doneBytes += done
            s.sentBytes += sent
        }
    }

    /// The volume was created empty by this agent, as its replica was: a full comparison would
    /// find nothing, so it counts as done.
    func completedEmpty() {
        state.withLock { s in
            s = State(kind: .full, started: ChangeLog.now(), startedAt: .now, finished: true, fullCompleted: true)
        }
    }

    func finish() {
        state.withLock { s in
            s.finished = true
            if s.kind == .full || s.kind == .scan { s.fullCompleted = true }
        }
    }

    /// The job's progress; `pendingExtents` and `extentBytes` come from the activity log.
    func progress(pendingExtents: Int, extentBytes: UInt64) -> Ferry_V1_SyncProgress {
        state.withLock { s in
            var p = Ferry_V1_SyncProgress()
            p.kind = s.kind
            p.doneBytes = s.doneBytes
            p.totalBytes = s.doneBytes + UInt64(pendingExtents) * extentBytes
            p.sentBytes = s.sentBytes
            p.pendingExtents = UInt64(pendingExtents)
            p.startedUnixNanos = s.started
            p.fullCompleted = s.fullCompleted
            let elapsed = ContinuousClock.now - s.startedAt
            let seconds = elapsed.seconds
            p.rateBytesPerSecond = seconds > 0.05 ? UInt64(Double(s.doneBytes) / seconds) : 0
            return p
        }
    }
}

/// Compares a volume's pending extents with the controller's replica, block hash by block hash,
/// and captures the blocks that differ into the change log, where they stream like writes. The
/// activity log keeps what is still pending, so the job resumes after a disconnect or a restart
/// of either side.
struct VolumeSyncWorker {
    static let blockBytes = 64 << 10

    let name: String
    let volume: BlockVolume
    let log: ChangeLog
    let activity: ActivityLog
    let tracker: SyncTracker
    let session: PeerSession
    let logger: Logger
    /// The capture epoch in which the controller's replica was empty, if it said so.
    var emptyReplicaEpoch: UInt64? = nil

    func run() async {
        var cursor = 0
        var idle = true
        // Blocks are sent without comparing while the replica is known to be what an empty
        // start plus this epoch's captured writes make it: until the first pass ends (a later
        // resync is asked for because something may differ) or the epoch changes.
        var replicaEmptyIn = emptyReplicaEpoch
        if replicaEmptyIn != nil {
            logger.info("the controller's replica is empty: its initial sync sends the blocks that hold data, without comparing hashes",
                        metadata: ["volume": "\(name)"])
        }
        while !Task.isCancelled {
            guard let (extent, generation) = activity.nextPending(from: cursor) else {
                if !idle {
                    replicaEmptyIn = nil
                    tracker.finish()
                    logger.info("volume sync compared everything pending", metadata: ["volume": "\(name)"])
                    idle = true
                }
                // Woken when an extent becomes pending (a lost write, an overflow, a resync).
                await activity.waitForPending()
                continue
            }
            idle = false
            // What is captured streams through the change log: leave room for the workload
            // (woken by the acks that make it).
            await log.waitForRoom(atMost: log.heldBytes / 2)
            if Task.isCancelled { return }
            do {
                let (done, sent) = try await sync(extent: extent, replicaEmpty: replicaEmptyIn.map { $0 == log.epoch } ?? false)
                activity.finishPending(extent, generation: generation, through: log.last)
                tracker.advance(done: done, sent: sent)
                cursor = extent + 1
            } catch {
                // The session ending cancels this worker; anything else (the controller not
                // ready for the volume yet, a timeout, an I/O error) is retried.
                if Task.isCancelled { return }
                logger.warning("volume sync step failed; retrying", metadata: ["volume": "\(name)", "extent": "\(extent)", "error": "\((error as? FerryError)?.message ?? "\(error)")"])
                try? await Task.sleep(for: .seconds(1))
            }
        }
    }

    /// One extent: hash, ask, capture what differs; or, into a replica known to be empty,
    /// capture what holds data. Returns the bytes compared and sent.
    func sync(extent: Int, replicaEmpty: Bool = false) async throws -> (UInt64, UInt64) {
        let offset = UInt64(extent) * activity.extentBytes
        // (An extent past the end, of an activity log grown for a resize that then failed, is empty.)
        let length = min(activity.extentBytes, volume.size - min(volume.size, offset))
        guard length > 0 else { return (0, 0) }
        let count = Int((length + UInt64(Self.blockBytes) - 1) / UInt64(Self.blockBytes))
        if replicaEmpty {
            return (length, try await capture(Self.runs(try await volume.dataBlocks(offset: offset, blockBytes: Self.blockBytes, count: count),
                                                        count: count), at: offset))
        }
        let result = try await volume.hashes(offset: offset, blockBytes: Self.blockBytes, count: count)
        var request = Ferry_V1_ResyncHashes()
        request.volume = name
        request.epoch = log.epoch
        request.offset = offset
        request.blockBytes = UInt32(Self.blockBytes)
        request.hashes = result.hashes
        let reply = try await session.request(.resyncHashes(request), timeout: .seconds(60))
        let diff: Ferry_V1_ResyncDiff
        switch reply.body {
        case .resyncDiff(let d): diff = d
        case .error(let e): throw FerryError(wire: e)
        default: throw FerryError(.protocolViolation, "controller answered resync hashes with \(reply.bodyName)")
        }
        return (length, try await capture(try Self.runs(diff.differing, count: count), at: offset))
    }

    /// Captures each run of blocks of the extent at `offset` as one record; returns the data
    /// bytes. Consecutive blocks travel together (an initial sync differs almost everywhere):
    /// per-record work on both sides is paid per run.
    func capture(_ runs: [Range<Int>], at offset: UInt64) async throws -> UInt64 {
        var sent: UInt64 = 0
        for run in runs {
            let captured = try await volume.captureCurrent(offset: offset + UInt64(run.lowerBound) * UInt64(Self.blockBytes),
                                                           length: run.count * Self.blockBytes)
            sent += UInt64(captured.dataBytes)
        }
        return sent
    }

    /// Most blocks captured as one record (1 MiB).
    static let maxRunBlocks = 16

    /// The differing block indices as runs of consecutive blocks, each at most `maxRunBlocks`
    /// long. Indices must name blocks of the extent, in increasing order.
    static func runs(_ indices: [UInt32], count: Int) throws -> [Range<Int>] {
        var runs: [Range<Int>] = []
        var previous = -1
        for index in indices.map(Int.init) {
            guard index < count, index > previous else {
                throw FerryError(.protocolViolation, "controller named block \(index) of an extent of \(count) blocks (after block \(previous))")
            }
            if let last = runs.last, last.upperBound == index, last.count < maxRunBlocks {
                runs[runs.count - 1] = last.lowerBound..<index + 1
            } else {
                runs.append(index..<index + 1)
            }
            previous = index
        }
        return runs
    }
}
