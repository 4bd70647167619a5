@testable import FerryControllerCore
import Testing

@Suite("Unit replica store state machine: one writer at a time in order, folds beside writers, images wait for folds, the ingest queue")
struct UnitReplicaStoreStateMachineTests {
    typealias Machine = ReplicaStoreStateMachine<Int>

    @Test("writers hold the journal's end one at a time, handed on in the order they asked")
    func writersInOrder() {
        var m = Machine()
        #expect(m.writerIsFree)
        guard case .proceed = m.acquire(.commit, waiter: 1) else { Issue.record("a free end must be taken at once"); return }
        #expect(m.writer == .commit && !m.writerIsFree)
        guard case .wait = m.acquire(.report, waiter: 2), case .wait = m.acquire(.rebase, waiter: 3) else {
            Issue.record("a held end must queue"); return
        }
        #expect(m.release() == 2)
        #expect(m.writer == .report)
        #expect(m.release() == 3)
        #expect(m.writer == .rebase)
        #expect(m.release() == nil)
        #expect(m.writer == nil && m.writerIsFree)
        guard case .idle = m.state else { Issue.record("\(m.state)"); return }
    }

    @Test("a fold runs beside a writer (and sees it, so it leaves the active segment alone), never beside another fold; images wait for it, not for writers")
    func foldBesideWriter() {
        var m = Machine()
        guard case .proceed = m.waitForFold(9) else { Issue.record("no fold: an image proceeds"); return }
        _ = m.acquire(.commit, waiter: 1)
        guard case .proceed = m.waitForFold(9) else { Issue.record("a writer does not hold images back"); return }
        let started = m.startFold(), again = m.startFold()
        #expect(started && !again)
        #expect(m.isFolding && m.writer == .commit)
        guard case .wait = m.waitForFold(10), case .wait = m.acquire(.report, waiter: 2) else {
            Issue.record("an image waits for the fold, a report for the commit"); return
        }
        #expect(m.release() == 2)
        #expect(m.release() == nil)
        #expect(m.isFolding && m.writer == nil)
        // A writer may start while the fold runs.
        guard case .proceed = m.acquire(.rebase, waiter: 3) else { Issue.record("the end is free during a fold"); return }
        guard case .wait = m.waitForFold(11) else { Issue.record("still folding"); return }
        #expect(m.finishFold() == [10, 11])
        #expect(!m.isFolding && m.writer == .rebase)
        #expect(m.release() == nil)
        guard case .idle = m.state else { Issue.record("\(m.state)"); return }
    }

    struct Batch: Equatable { var epoch: UInt64; var id: Int }

    @Test("the ingest queue starts one drainer, takes runs of one epoch within the byte budget, and wakes submitters for room and reports for their batches")
    func ingestQueue() {
        var q = IngestQueue<Batch, Int>(maxBytes: 100)
        let starts = [q.submit(Batch(epoch: 1, id: 1), bytes: 40), q.submit(Batch(epoch: 1, id: 2), bytes: 40),
                      q.submit(Batch(epoch: 1, id: 3), bytes: 40), q.submit(Batch(epoch: 2, id: 4), bytes: 10)]
        #expect(starts == [true, false, false, false])   // the first starts the drainer
        #expect(q.queuedBytes == 130 && q.submitted == 4)
        // Full: a submitter waits; a report waits for the four batches before it.
        let waits = [q.waitForRoom(100), q.waitForFinished(through: 4, 200), q.waitForFinished(through: 0, 201)]
        #expect(waits == [true, true, false])

        let epoch = q.next?.epoch
        let run = q.take(maxBytes: 80) { $0.epoch == epoch }
        #expect(run.map(\.item.id) == [1, 2])
        #expect(q.committed(count: 2, bytes: 80) == [100])   // room now; the report still waits
        let second = q.take(maxBytes: 80) { [e = q.next?.epoch] in $0.epoch == e }
        #expect(second.map(\.item.id) == [3])                // one epoch per run
        #expect(q.committed(count: 1, bytes: 40).isEmpty)
        let third = q.take(maxBytes: 80) { [e = q.next?.epoch] in $0.epoch == e }
        #expect(third.map(\.item.id) == [4])
        #expect(q.committed(count: 1, bytes: 10) == [200])
        #expect(q.finished == 4 && q.queuedBytes == 0)
        // Empty: the drainer stops, and the next batch starts one again.
        let none = q.take(maxBytes: 80) { _ in true }
        #expect(none.isEmpty)
        guard case .idle = q.drainer else { Issue.record("the drainer must stop on an empty queue"); return }
        let restart = q.submit(Batch(epoch: 2, id: 5), bytes: 10)
        // A batch bigger than the budget still goes, alone.
        let running = q.submit(Batch(epoch: 2, id: 6), bytes: 500)
        #expect(restart && !running)
        let fifth = q.take(maxBytes: 80) { _ in true }, sixth = q.take(maxBytes: 80) { _ in true }
        #expect(fifth.map(\.item.id) == [5] && sixth.map(\.item.id) == [6])
    }
}
