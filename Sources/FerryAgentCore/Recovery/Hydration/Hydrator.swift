import FerryNBD
import FerryWire
import Foundation
import Logging
import NIOCore
import NIOPosix

/// The background copy of a hydrating volume: walks the point's allocation map (NBD block
/// status) from the first block not local yet, marks zero ranges local without moving them, and
/// fetches the data ranges in pipelined reads, installing each block unless the workload wrote it
/// meanwhile. Saves the map (target synced first) about once a second, so a restart of either
/// side resumes where it was. Runs until the volume is complete or the task is cancelled.
struct Hydrator: Sendable {
    let volume: HydratingVolume
    /// A connection to the point's export that asks for block status (`allocation: true`).
    let connect: @Sendable () async throws -> NBDClient
    let pool: NIOThreadPool
    let logger: Logger
    /// Most bytes per second fetched from the point (0: as fast as the link goes), so a
    /// hydration can leave room on a shared link.
    var rateLimit: UInt64 = 0
    /// Told of progress about once a second and at the end.
    let report: @Sendable (HydratingVolume.Progress, _ bytesPerSecond: Double) -> Void

    /// Bytes asked of block status at a time, and fetched per read.
    static let statusWindow: UInt64 = 1 << 30
    static let fetchBytes = 256 << 10
    /// Connections to the point's export (its server gives each a thread, as nbdcopy's four
    /// connections get), and reads in flight over all of them.
    static let connections = 4
    static let readsInFlight = 64

    func run() async {
        let begun = ContinuousClock.now
        let startBytes = volume.progress.localBytes
        var lastSave = ContinuousClock.now
        var delay = Duration.milliseconds(200)
        var clients: [NBDClient] = []
        while !Task.isCancelled, !volume.isComplete {
            do {
                if clients.isEmpty || clients.contains(where: { !$0.isConnected }) {
                    for old in clients { await old.close() }
                    clients = []
                    for _ in 0..<Self.connections { clients.append(try await connect()) }
                    delay = .milliseconds(200)
                }
                guard let first = volume.firstMissing(from: 0) else { break }
                try await copyWindow(from: first, clients: clients)
                if ContinuousClock.now - lastSave >= .seconds(1) {
                    let volume = self.volume
                    try await pool.runIfActive { try volume.saveMap() }
                    lastSave = .now
                    let r = rate(since: begun, from: startBytes)
                    volume.noteRate(r, seconds: (ContinuousClock.now - begun).seconds)
                    report(volume.progress, r)
                }
            } catch is CancellationError {
                break
            } catch {
                // The controller restarting, the link down: keep what is local and retry.
                logger.warning("hydration paused; retrying", metadata: ["volume": "\(volume.name)", "error": "\(error)", "retry-in": "\(delay)"])
                for old in clients { await old.close() }
                clients = []
                try? await Task.sleep(for: delay)
                delay = min(delay * 2, .seconds(5))
            }
        }
        // Saved even when cancelled (a stop, not a crash): a restart then fetches nothing twice.
        let volume = self.volume, pool = self.pool, open = clients
        await Task {
            try? await pool.runIfActive { try volume.saveMap() }
            for c in open { await c.close() }
        }.value
        let r = rate(since: begun, from: startBytes)
        volume.noteRate(r, seconds: (ContinuousClock.now - begun).seconds)
        report(volume.progress, r)
    }

    /// Spaces fetches so they average at most `rate` bytes per second.
    struct Pace {
        let rate: UInt64
        let begun = ContinuousClock.now
        var sent: UInt64 = 0

        mutating func take(_ bytes: UInt64) async throws {
            guard rate > 0 else { return }
            let due = begun + .seconds(Double(sent) / Double(rate))
            sent += bytes
            if due > .now { try await Task.sleep(until: due, clock: .continuous) }
        }
    }

    private func rate(since begun: ContinuousClock.Instant, from startBytes: UInt64) -> Double {
        let elapsed = (ContinuousClock.now - begun).seconds
        let gained = volume.progress.localBytes &- startBytes
        return elapsed > 0 && gained < 1 << 62 ? Double(gained) / elapsed : 0
    }

    /// One block status window from block `first`: zero blocks marked, data blocks fetched.
    private func copyWindow(from first: Int, clients: [NBDClient]) async throws {
        let client = clients[0]
        var pace = Pace(rate: rateLimit)
        let blockBytes = UInt64(volume.blockBytes)
        let start = UInt64(first) * blockBytes
        let window = min(Self.statusWindow, volume.size - start)
        let extents = client.canBlockStatus
            ? try await client.blockStatus(offset: start, length: window)
            : [NBDExtent(length: window, flags: 0)]
        // Whole blocks the answer covers (at least the first: a short answer counts as data).
        var covered: UInt64 = 0
        var dataBlocks = Set<Int>()
        for e in extents {
            if !e.isZero {
                for b in volume.blocks(offset: start + covered, length: e.length) { dataBlocks.insert(b) }
            }
            covered += e.length
        }
        var end = start + covered
        if end < volume.size { end = max(start + blockBytes, end / blockBytes * blockBytes) }
        if end - start < blockBytes { dataBlocks.insert(first) }
        let blocks = volume.blocks(offset: start, length: min(end, volume.size) - start)
        let maxBlocks = max(1, Self.fetchBytes / Int(blockBytes))
        var zeroRuns: [Range<Int>] = [], dataRuns: [Range<Int>] = []
        for run in volume.missingRuns(in: blocks, maxBlocks: .max) {
            var i = run.lowerBound
            while i < run.upperBound {
                let isData = dataBlocks.contains(i)
                var j = i + 1
                while j < run.upperBound, dataBlocks.contains(j) == isData, !isData || j - i < maxBlocks { j += 1 }
                if isData { dataRuns.append(i..<j) } else { zeroRuns.append(i..<j) }
                i = j
            }
        }
        let volume = self.volume
        if !zeroRuns.isEmpty {
            let zeroes = zeroRuns
            try await pool.runIfActive { for run in zeroes { try volume.installZero(run) } }
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            var running = 0, sent = 0
            for run in dataRuns {
                try Task.checkCancellation()
                if running == Self.readsInFlight {
                    try await group.next()
                    running -= 1
                }
                // Skipped if the workload made it all local meanwhile.
                let still = volume.missingRuns(in: run, maxBlocks: .max)
                guard !still.isEmpty else { continue }
                let span = still.first!.lowerBound..<still.last!.upperBound
                let offset = UInt64(span.lowerBound) * blockBytes
                let length = Int(min(volume.size, UInt64(span.upperBound) * blockBytes) - offset)
                try await pace.take(UInt64(length))
                running += 1
                let client = clients[sent % clients.count]
                sent += 1
                group.addTask {
                    let data = try await client.read(offset: offset, length: length)
                    try await pool.runIfActive { try volume.install(span, data: data) }
                    volume.noteFetched(UInt64(length))
                }
            }
            try await group.waitForAll()
        }
    }
}
