import FerryAgentCore
import Foundation
import NIOCore
import Synchronization
import Testing

/// The streamer's full window waits for the ack itself, not for a timer.
@Suite("Unit change log: waiting for acks")
struct UnitChangeLogAckTests {
    final class Woken: Sendable {
        let value = Atomic<Bool>(false)
        var isSet: Bool { value.load(ordering: .relaxed) }
    }

    @Test("a waiter is woken by the ack through its sequence (not by an earlier one, nor one of another epoch), at once if acked already, and by cancellation")
    func ackWakes() async throws {
        let log = try ChangeLog(memoryBytes: 1 << 20, epoch: 7)
        for i in 0..<4 { _ = log.append(offset: UInt64(i) * 4096, kind: .write(ByteBuffer(repeating: 1, count: 4096))) }
        let woken = Woken()
        let waiter = Task {
            await log.waitForAck(through: 3, epoch: 7)
            woken.value.store(true, ordering: .relaxed)
        }
        // Not before the ack through 3: an earlier ack, and one of another epoch, leave it waiting.
        log.trim(through: 2, epoch: 7)
        log.trim(through: 4, epoch: 8)
        try await Task.sleep(for: .milliseconds(200))
        #expect(!woken.isSet)
        log.trim(through: 3, epoch: 7)
        await waiter.value
        #expect(woken.isSet)
        #expect(log.ackedThrough == 3)
        // Acked already: returns at once.
        await log.waitForAck(through: 3, epoch: 7)
        // The session ends (its streamers are cancelled): the waiter goes.
        let cancelled = Task { await log.waitForAck(through: 4, epoch: 7) }
        cancelled.cancel()
        await cancelled.value
    }

    @Test("the sync worker's wait for room is woken by the ack that trims enough (not by one that trims too little), at once if there is room, by an overflow and by cancellation")
    func roomWakes() async throws {
        let log = try ChangeLog(memoryBytes: 2 << 20, epoch: 7)
        for i in 0..<4 { _ = log.append(offset: UInt64(i) << 18, kind: .write(ByteBuffer(repeating: 1, count: 256 << 10))) }
        let woken = Woken()
        let waiter = Task {
            await log.waitForRoom(atMost: 300 << 10)
            woken.value.store(true, ordering: .relaxed)
        }
        log.trim(through: 2, epoch: 7) // two records still held: ~512 KiB
        try await Task.sleep(for: .milliseconds(200))
        #expect(!woken.isSet)
        log.trim(through: 3, epoch: 7)
        await waiter.value
        #expect(woken.isSet && log.memoryUsed <= 300 << 10)
        await log.waitForRoom(atMost: 300 << 10) // room already: returns at once
        // Past its caps the log drops what it held: a waiter is woken by that too.
        let small = try ChangeLog(memoryBytes: 1 << 20, epoch: 1)
        _ = small.append(offset: 0, kind: .write(ByteBuffer(repeating: 2, count: 512 << 10)))
        let dropped = Task { await small.waitForRoom(atMost: 0) }
        try await Task.sleep(for: .milliseconds(100))
        _ = small.append(offset: 0, kind: .write(ByteBuffer(repeating: 2, count: 512 << 10)))
        await dropped.value
        #expect(small.overflowed)
        let cancelled = Task { await log.waitForRoom(atMost: 0) }
        cancelled.cancel()
        await cancelled.value
    }
}
