/// A volume streamer's window over one epoch of its change log: what it sent, which batches the
/// controller has not acked yet, and so what to do next. No I/O: the streamer tells it about
/// acks and sends and does what `next` says, so its bookkeeping is tested on its own.
struct StreamWindow: Sendable, Equatable {
    /// What the streamer does next.
    enum Action: Equatable {
        /// Send the records after this sequence.
        case send(after: UInt64)
        /// The window is full: wait until the controller acks this sequence (the end of the
        /// oldest batch outstanding), which frees its bytes.
        case waitForAck(through: UInt64)
    }

    /// A batch sent and not acked yet: its last sequence and what it costs the window.
    struct Outstanding: Sendable, Equatable {
        var sequence: UInt64
        var bytes: Int
    }

    private(set) var epoch: UInt64
    /// The last sequence sent (or acked: acks may overtake the resume point).
    private(set) var sent: UInt64
    private(set) var outstanding: [Outstanding] = []
    private(set) var outstandingBytes = 0
    let windowBytes: Int

    /// Resuming after `start` (what the controller said it holds) in `epoch`.
    init(epoch: UInt64, after start: UInt64, windowBytes: Int) {
        self.epoch = epoch
        self.sent = start
        self.windowBytes = windowBytes
    }

    var next: Action {
        if outstandingBytes >= windowBytes, let oldest = outstanding.first { return .waitForAck(through: oldest.sequence) }
        return .send(after: sent)
    }

    /// The controller holds everything through `acked` of `ackedEpoch`. An ack of another epoch
    /// says nothing about this one. Batches of an earlier streamer may be acked past what this
    /// one sent: those records need not be sent again.
    mutating func acked(through acked: UInt64, epoch ackedEpoch: UInt64) {
        guard ackedEpoch == epoch else { return }
        sent = max(sent, acked)
        while let first = outstanding.first, first.sequence <= acked {
            outstandingBytes -= first.bytes
            outstanding.removeFirst()
        }
    }

    /// A batch ending at `sequence` and costing `bytes` went out.
    mutating func sent(through sequence: UInt64, bytes: Int) {
        precondition(sequence > sent, "batches go out in sequence order")
        outstanding.append(Outstanding(sequence: sequence, bytes: bytes))
        outstandingBytes += bytes
        sent = sequence
    }

    /// A new epoch (after the change log overflowed): nothing sent in it, nothing outstanding.
    mutating func restart(epoch: UInt64) {
        self.epoch = epoch
        sent = 0
        outstanding = []
        outstandingBytes = 0
    }
}
