@testable import FerryAgentCore
import Testing

/// The streamer's window bookkeeping, without a change log or a session.
@Suite("streamer window: sends, acks, epochs")
struct UnitStreamWindowTests {
    @Test("batches go out until the window is full; then the oldest batch's ack is awaited, and each ack frees its bytes")
    func fillsAndDrains() {
        var w = StreamWindow(epoch: 7, after: 0, windowBytes: 100)
        #expect(w.next == .send(after: 0))
        w.sent(through: 10, bytes: 40)
        w.sent(through: 20, bytes: 40)
        #expect(w.next == .send(after: 20))
        w.sent(through: 30, bytes: 40)
        #expect(w.next == .waitForAck(through: 10) && w.outstandingBytes == 120)
        // An ack short of the oldest batch frees nothing.
        w.acked(through: 9, epoch: 7)
        #expect(w.next == .waitForAck(through: 10))
        w.acked(through: 10, epoch: 7)
        #expect(w.next == .send(after: 30) && w.outstandingBytes == 80)
        // One ack past several batches frees them all.
        w.acked(through: 30, epoch: 7)
        #expect(w.outstanding.isEmpty && w.outstandingBytes == 0 && w.next == .send(after: 30))
    }

    @Test("acks of another epoch change nothing; acks past the resume point skip what the controller holds; a new epoch starts empty")
    func epochs() {
        var w = StreamWindow(epoch: 7, after: 5, windowBytes: 100)
        w.sent(through: 8, bytes: 200)
        w.acked(through: 50, epoch: 3)
        #expect(w.next == .waitForAck(through: 8) && w.sent == 8)
        // An earlier streamer's batches were acked past what this one resumed from.
        w.acked(through: 12, epoch: 7)
        #expect(w.next == .send(after: 12) && w.outstanding.isEmpty)
        w.sent(through: 15, bytes: 300)
        w.restart(epoch: 9)
        #expect(w.epoch == 9 && w.next == .send(after: 0) && w.outstandingBytes == 0)
        w.acked(through: 15, epoch: 7)
        #expect(w.next == .send(after: 0), "the old epoch's ack says nothing about the new one")
    }
}
