import FerryWire
import Foundation
import Synchronization

/// Who may touch a replica's journal end and base image, and who waits for whom: the
/// `ReplicaStore` actor is reentrant at every await (its file I/O runs on a thread pool), so
/// these rules replace what one thread holding a lock would give.
///
/// - One **writer** at a time works on the journal's end and the epoch: a group commit, an
///   agent's report, a rebase. Others queue in order.
/// - A **fold** may run beside a writer, but seals the active segment only while none holds it,
///   and point images (and sink reads) opening meanwhile wait for it to end.
///
/// Pure: methods return what to do (resume these waiters, proceed or wait) and are unit-tested
/// without I/O; the actor carries the actions out.
struct ReplicaStoreStateMachine<Waiter> {
    /// Who holds the journal's end.
    enum Writer: Equatable, Sendable {
        case commit
        case report
        case rebase
    }

    enum State {
        /// No writer, no fold.
        case idle
        /// A writer holds the journal's end; `queue` waits for it in order.
        case writing(Writer, queue: [(Writer, Waiter)])
        /// A fold runs; `imagesWaiting` open once it ends.
        case folding(imagesWaiting: [Waiter])
        /// Both: a writer holds the journal's end while a fold runs.
        case writingWhileFolding(Writer, queue: [(Writer, Waiter)], imagesWaiting: [Waiter])
    }

    private(set) var state: State = .idle

    enum AcquireAction {
        case proceed
        /// The waiter was queued: suspended until a `release` hands it the journal's end.
        case wait
    }

    /// `writer` wants the journal's end; the waiter is queued unless it is free.
    mutating func acquire(_ writer: Writer, waiter: Waiter) -> AcquireAction {
        switch state {
        case .idle:
            state = .writing(writer, queue: [])
            return .proceed
        case .folding(let images):
            state = .writingWhileFolding(writer, queue: [], imagesWaiting: images)
            return .proceed
        case .writing(let holder, var queue):
            queue.append((writer, waiter))
            state = .writing(holder, queue: queue)
            return .wait
        case .writingWhileFolding(let holder, var queue, let images):
            queue.append((writer, waiter))
            state = .writingWhileFolding(holder, queue: queue, imagesWaiting: images)
            return .wait
        }
    }

    /// Whether `acquire` would proceed now (the writer then acquires without a waiter).
    var writerIsFree: Bool {
        switch state {
        case .idle, .folding: true
        case .writing, .writingWhileFolding: false
        }
    }

    /// The holder is done: the next writer in line (resume it) holds the journal's end now.
    mutating func release() -> Waiter? {
        switch state {
        case .idle, .folding:
            preconditionFailure("release without a writer")
        case .writing(_, let queue):
            guard let (next, waiter) = queue.first else {
                state = .idle
                return nil
            }
            state = .writing(next, queue: Array(queue.dropFirst()))
            return waiter
        case .writingWhileFolding(_, let queue, let images):
            guard let (next, waiter) = queue.first else {
                state = .folding(imagesWaiting: images)
                return nil
            }
            state = .writingWhileFolding(next, queue: Array(queue.dropFirst()), imagesWaiting: images)
            return waiter
        }
    }

    /// The writer holding the journal's end, if any.
    var writer: Writer? {
        switch state {
        case .idle, .folding: nil
        case .writing(let w, _), .writingWhileFolding(let w, _, _): w
        }
    }

    var isFolding: Bool {
        switch state {
        case .idle, .writing: false
        case .folding, .writingWhileFolding: true
        }
    }

    /// A fold wants to start: false if one runs already.
    mutating func startFold() -> Bool {
        switch state {
        case .idle:
            state = .folding(imagesWaiting: [])
            return true
        case .writing(let w, let queue):
            state = .writingWhileFolding(w, queue: queue, imagesWaiting: [])
            return true
        case .folding, .writingWhileFolding:
            return false
        }
    }

    /// The fold ended: the images that waited for it (resume them).
    mutating func finishFold() -> [Waiter] {
        switch state {
        case .idle, .writing:
            preconditionFailure("finishFold without a fold")
        case .folding(let images):
            state = .idle
            return images
        case .writingWhileFolding(let w, let queue, let images):
            state = .writing(w, queue: queue)
            return images
        }
    }

    /// An image (or a sink's read) wants a base image no fold is changing: proceed, or wait
    /// (queued) for the fold to end.
    mutating func waitForFold(_ waiter: Waiter) -> AcquireAction {
        switch state {
        case .idle, .writing:
            return .proceed
        case .folding(var images):
            images.append(waiter)
            state = .folding(imagesWaiting: images)
            return .wait
        case .writingWhileFolding(let w, let queue, var images):
            images.append(waiter)
            state = .writingWhileFolding(w, queue: queue, imagesWaiting: images)
            return .wait
        }
    }
}

/// Batches received and not yet durable, in order, and who waits on them: submitters for room
/// (the queue's byte cap), reports for the batches sent before them. One drainer commits them.
/// Pure, like `ReplicaStoreStateMachine`.
struct IngestQueue<Item, Waiter> {
    enum Drainer {
        /// Nothing queued, no drainer.
        case idle
        /// A drainer commits what is queued and stops when it finds the queue empty.
        case running
    }

    private(set) var drainer: Drainer = .idle
    private(set) var items: [(item: Item, bytes: Int)] = []
    private(set) var queuedBytes = 0
    /// Batches queued so far, and committed (or refused) so far.
    private(set) var submitted: UInt64 = 0
    private(set) var finished: UInt64 = 0
    private var roomWaiters: [Waiter] = []
    private var finishWaiters: [(through: UInt64, waiter: Waiter)] = []
    let maxBytes: Int

    init(maxBytes: Int) { self.maxBytes = maxBytes }

    /// Whether a submitter must wait for room (then queued, resumed by `committed`).
    mutating func waitForRoom(_ waiter: Waiter) -> Bool {
        guard queuedBytes >= maxBytes else { return false }
        roomWaiters.append(waiter)
        return true
    }

    /// Queues an item; true when a drainer is to be started for it.
    mutating func submit(_ item: Item, bytes: Int) -> Bool {
        items.append((item, bytes))
        queuedBytes += bytes
        submitted += 1
        switch drainer {
        case .running: return false
        case .idle:
            drainer = .running
            return true
        }
    }

    /// The drainer takes the next run: the longest prefix `belongs` accepts, at most `maxBytes`
    /// of it past the first. Empty: the queue is empty and the drainer stops.
    mutating func take(maxBytes runBytes: Int, while belongs: (Item) -> Bool) -> [(item: Item, bytes: Int)] {
        var taken = 0
        let run = items.prefix { entry in
            defer { taken += entry.bytes }
            return belongs(entry.item) && (taken == 0 || taken + entry.bytes <= runBytes)
        }
        if run.isEmpty { drainer = .idle }
        items.removeFirst(run.count)
        return Array(run)
    }

    /// The first queued item, if any.
    var next: Item? { items.first?.item }

    /// A run taken is committed (or refused): returns who to resume (submitters waiting for
    /// room, reports whose batches are all through).
    mutating func committed(count: Int, bytes: Int) -> [Waiter] {
        queuedBytes -= bytes
        finished += UInt64(count)
        var ready = roomWaiters
        roomWaiters = []
        let through = finished
        ready += finishWaiters.filter { $0.through <= through }.map(\.waiter)
        finishWaiters.removeAll { $0.through <= through }
        return ready
    }

    /// A report waits for every batch submitted before it: true when it must wait (queued).
    mutating func waitForFinished(through: UInt64, _ waiter: Waiter) -> Bool {
        guard finished < through else { return false }
        finishWaiters.append((through, waiter))
        return true
    }
}

/// A replica's state.json, written on a thread pool. Writes may finish out of order there:
/// each carries the version it was encoded at, and an older one never lands over a newer one.
final class ReplicaStateFile: Sendable {
    let path: String
    private let written = Mutex<UInt64>(0)

    init(path: String) { self.path = path }

    /// Blocking (an atomic replace and its fsync): call it on an I/O thread.
    func write(_ data: Data, version: UInt64) throws {
        try written.withLock { last in
            guard version > last else { return }
            try AtomicFile.write(Array(data), to: path, mode: 0o644)
            last = version
        }
    }
}
