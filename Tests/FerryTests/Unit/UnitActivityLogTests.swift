@testable import FerryAgentCore
import FerryWire
import Foundation
import NIOCore
import Testing

@Suite("activity log and change log")
struct UnitActivityLogTests {
    @Test("marks reach the file before the write; a reopened log has them all pending")
    func marksSurviveARestart() async throws {
        try await withUnitTempDir { dir in
            let path = dir + "/v.fal"
            do {
                let activity = try ActivityLog(path: path, volumeBytes: 64 << 20)
                #expect(!activity.existed && activity.extentCount == 16)
                try activity.mark(offset: 5 << 20, length: 4 << 20) // extents 1 and 2
                try activity.mark(offset: 63 << 20, length: 1) // the last one
                #expect(activity.markedCount == 3 && activity.pendingCount == 0)
            }
            // As after kill -9: nothing but the file is left.
            let reopened = try ActivityLog(path: path, volumeBytes: 64 << 20)
            #expect(reopened.existed && reopened.markedCount == 3 && reopened.pendingCount == 3)
            // A volume grown since (an online resize a crash cut short): the saved extents keep
            // their marks, the new ones start clear; nothing else becomes pending.
            let grown = try ActivityLog(path: path, volumeBytes: 128 << 20)
            #expect(grown.existed && grown.extentCount == 32 && grown.markedCount == 3 && grown.pendingCount == 3 && !grown.fullInProgress)
            // A smaller one (or another extent size) trusts nothing: everything is pending.
            let shrunk = try ActivityLog(path: path, volumeBytes: 32 << 20)
            #expect(shrunk.pendingCount == 8 && shrunk.fullInProgress)
        }
    }

    @Test("an online resize grows the log durably before anything is written past the old end: marks there survive a restart; the old marks stay")
    func growsWithTheVolume() async throws {
        try await withUnitTempDir { dir in
            let path = dir + "/v.fal"
            do {
                let activity = try ActivityLog(path: path, volumeBytes: 10 << 20) // 3 extents, the last one short
                try activity.mark(offset: 9 << 20, length: 1 << 20) // extent 2
                try activity.grow(volumeBytes: 40 << 20)
                #expect(activity.extentCount == 10 && activity.markedCount == 1)
                try activity.mark(offset: 37 << 20, length: 1) // extent 9, past the old end
                try activity.grow(volumeBytes: 20 << 20) // never shrinks
                #expect(activity.extentCount == 10 && activity.markedCount == 2)
                activity.completed(offset: 37 << 20, length: 1)
            }
            let reopened = try ActivityLog(path: path, volumeBytes: 40 << 20)
            #expect(reopened.existed && !reopened.fullInProgress && reopened.pendingCount == 2)
            #expect(reopened.nextPending(from: 0)?.index == 2 && reopened.nextPending(from: 3)?.index == 9)
        }
    }

    @Test("the sync worker's wait for a pending extent: at once when one is, woken by the extent that becomes pending, or by cancellation")
    func waitForPending() async throws {
        try await withUnitTempDir { dir in
            let activity = try ActivityLog(path: dir + "/v.fal", volumeBytes: 64 << 20)
            #expect(activity.pendingCount == 0)
            // Woken by a full comparison starting.
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { await activity.waitForPending() }
                group.addTask { try await Task.sleep(for: .milliseconds(50)); try activity.markAllPending() }
                try await group.waitForAll()
            }
            #expect(activity.pendingCount == 16)
            // Pending already: at once.
            await activity.waitForPending()
            // Nothing pending: a cancelled wait returns.
            for i in 0..<16 { activity.finishPending(i, generation: activity.nextPending(from: i)!.generation, through: 0) }
            #expect(activity.pendingCount == 0)
            let waiting = Task { await activity.waitForPending() }
            waiting.cancel()
            await waiting.value
        }
    }

    @Test("a mark clears once every write into the extent is acked, and stays while one is not")
    func marksClearOnAck() async throws {
        try await withUnitTempDir { dir in
            let activity = try ActivityLog(path: dir + "/v.fal", volumeBytes: 16 << 20)
            let log = try ChangeLog(memoryBytes: 1 << 20, epoch: 7, activity: activity)
            for (offset, byte) in [(UInt64(0), UInt8(1)), (4 << 20, 2), (4 << 20, 3)] {
                try log.prepare(offset: offset, length: 4096)
                _ = log.append(offset: offset, kind: .write(ByteBuffer(repeating: byte, count: 4096)))
                log.completed(offset: offset, length: 4096)
            }
            #expect(activity.markedCount == 2)
            // A write marked but not yet recorded holds its extent's mark, whatever is acked.
            try log.prepare(offset: 8 << 20, length: 4096)
            log.trim(through: 3, epoch: 7)
            try log.clearAcked()
            #expect(activity.markedCount == 1, "extent 2 has a write in flight")
            _ = log.append(offset: 8 << 20, kind: .write(ByteBuffer(repeating: 4, count: 4096)))
            log.completed(offset: 8 << 20, length: 4096)
            try log.clearAcked()
            #expect(activity.markedCount == 1, "write 4 is not acked")
            log.trim(through: 4, epoch: 7)
            try log.clearAcked()
            #expect(activity.markedCount == 0)
            // Writes 1-3 again, to check acks clear extent by extent.
            for (offset, byte) in [(UInt64(0), UInt8(1)), (4 << 20, 2), (4 << 20, 3)] {
                try log.prepare(offset: offset, length: 4096)
                _ = log.append(offset: offset, kind: .write(ByteBuffer(repeating: byte, count: 4096)))
                log.completed(offset: offset, length: 4096)
            }
            log.trim(through: 6, epoch: 7)
            try log.clearAcked()
            #expect(activity.markedCount == 1, "extent 1 still has write 7 unacked")
            log.trim(through: 7, epoch: 99) // an ack of another epoch changes nothing
            try log.clearAcked()
            #expect(activity.markedCount == 1)
            log.trim(through: 7, epoch: 7)
            try log.clearAcked()
            #expect(activity.markedCount == 0)
            #expect(try ActivityLog(path: dir + "/v.fal", volumeBytes: 16 << 20).pendingCount == 0)
        }
    }

    @Test("past both caps the change log drops records, the written extents become pending, and a restart starts a new epoch at 1")
    func overflowLeavesPendingExtents() async throws {
        try await withUnitTempDir { dir in
            let activity = try ActivityLog(path: dir + "/v.fal", volumeBytes: 64 << 20)
            let log = try ChangeLog(memoryBytes: 1 << 20, spillPath: dir + "/v.spill", spillBytes: 1 << 20, epoch: 1, activity: activity)
            let chunk = ByteBuffer(repeating: 9, count: 256 << 10)
            for i in 0..<12 { // 3 MiB > 1 MiB memory + 1 MiB spill, spread over extents 0..11
                let offset = UInt64(i) << 22
                try log.prepare(offset: offset, length: 256 << 10)
                _ = log.append(offset: offset, kind: .write(chunk))
            }
            #expect(log.overflowed && log.last == 12)
            #expect(activity.pendingCount == 12 && activity.markedCount == 12)
            let epoch = log.restartEpoch()
            #expect(epoch != 1 && log.epoch == epoch && !log.overflowed && log.last == 0 && log.firstHeld == nil)
            // Pending extents never clear by acks alone: only a finished comparison releases them.
            try log.clearAcked()
            #expect(activity.markedCount == 12)
            // A comparison that started before the extent became pending again does not release it.
            let first = try #require(activity.nextPending(from: 0))
            activity.markedBecomePending()
            activity.finishPending(first.index, generation: first.generation, through: 0)
            #expect(activity.pendingCount == 12)
            let again = try #require(activity.nextPending(from: 0))
            activity.finishPending(again.index, generation: again.generation, through: 0)
            #expect(activity.pendingCount == 11)
        }
    }

    @Test("block hashes: holes and zero bytes hash as empty, data by SHA-256, the short last block stops at the end")
    func blockHashes() async throws {
        try await withUnitTempDir { dir in
            let path = dir + "/img"
            let fd = open(path, O_RDWR | O_CREAT, 0o600)
            defer { close(fd) }
            ftruncate(fd, (1 << 20) + 1000)
            let data = [UInt8](repeating: 0xAB, count: 4096)
            _ = data.withUnsafeBytes { pwrite(fd, $0.baseAddress, 4096, 65536 * 3) }
            let zeroes = [UInt8](repeating: 0, count: 65536)
            _ = zeroes.withUnsafeBytes { pwrite(fd, $0.baseAddress, 65536, 65536 * 5) } // allocated, but zero
            _ = data.withUnsafeBytes { pwrite(fd, $0.baseAddress, 100, off_t(1 << 20) + 900) } // in the short last block
            let result = try BlockHashing.hashes(fd: fd, size: (1 << 20) + 1000, offset: 0, blockBytes: 65536, count: 17)
            #expect(result.hashes.count == 17)
            #expect(result.hashes.enumerated().filter { !$0.element.isEmpty }.map(\.offset) == [3, 16])
            #expect(result.hashes[3].count == BlockHashing.hashBytes)
            #expect(result.bytesRead < 1 << 20, "holes are skipped, not read")
            // Allocation alone (nothing read), for an initial sync into an empty replica: the
            // written zeroes count as data; from an offset, indices count from it.
            let allocated = BlockHashing.allocatedBlocks(fd: fd, size: (1 << 20) + 1000, offset: 0, blockBytes: 65536, count: 17)
            #expect(allocated == [3, 5, 16], "\(allocated)")
            let tail = BlockHashing.allocatedBlocks(fd: fd, size: (1 << 20) + 1000, offset: 65536 * 4, blockBytes: 65536, count: 4)
            #expect(tail == [1], "\(tail)")
            #expect(BlockHashing.allocatedBlocks(fd: fd, size: (1 << 20) + 1000, offset: 65536 * 6, blockBytes: 65536, count: 8).isEmpty)
        }
    }

    @Test("the spill file is a ring within its cap: a log that is never drained but keeps being acked spills far more than the cap, reads back exactly, and the file never grows past the cap")
    func spillRing() async throws {
        try await withUnitTempDir { dir in
            let cap: Int64 = 1 << 20
            // Memory for a few small records only: most writes spill, some stay in memory
            // between spilled ones.
            let log = try ChangeLog(memoryBytes: 3000, spillPath: dir + "/v.spill", spillBytes: cap, epoch: 1)
            var sizes: [Int] = []
            var acked: UInt64 = 0
            // Thousands of records, so the ring of entries wraps and grows many times.
            for i in 0..<6000 {
                // Uneven sizes, so wrapping happens at every position.
                let size = i % 5 == 0 ? 512 : 4096 * (1 + (i * 7) % 23)
                sizes.append(size)
                let sequence = log.append(offset: UInt64(i) * 4096, kind: .write(ByteBuffer(repeating: UInt8(i % 251), count: size)))
                #expect(!log.overflowed, "write \(i) overflowed with \(log.snapshot.pendingBytes) bytes pending")
                // Every record still held reads back as written.
                let held = try log.records(after: acked, maxBytes: .max)
                #expect(held.first?.sequence == acked + 1 && held.last?.sequence == sequence)
                for change in held {
                    guard case .write(let data) = change.kind else { Issue.record("not a write"); continue }
                    let n = Int(change.sequence - 1)
                    #expect(data == ByteBuffer(repeating: UInt8(n % 251), count: sizes[n]))
                }
                // The controller acks all but the newest few: the log is never empty.
                if sequence > 3 {
                    acked = sequence - 3
                    log.trim(through: acked)
                }
                var st = stat()
                stat(dir + "/v.spill", &st)
                #expect(Int64(st.st_size) <= cap)
            }
            #expect(sizes.reduce(0, +) > 100 * Int(cap))
            // Unacked past the cap: overflow, never a file past the cap.
            for i in 0..<40 { _ = log.append(offset: UInt64(i % 4) * 65536, kind: .write(ByteBuffer(repeating: 1, count: 65536))) }
            #expect(log.overflowed)
        }
    }
}
