import FerryWire

/// Range checks on the numbers an agent sends, one per message kind, applied where the message
/// arrives: a broken or hostile agent gets an error (or only its own session closed), never a
/// trap further in. Values checked elsewhere already (resync ranges, cut members' epochs, the
/// inventory's size) are not repeated here.
enum AgentInputChecks {
    /// A replication batch: epoch 0 means "none" everywhere, and capture times are Unix
    /// nanoseconds, never before 1970 (the journal's age-based retention reads them).
    static func check(_ batch: Ferry_V1_ReplicationBatch) throws {
        guard batch.epoch != 0 else {
            throw FerryError(.protocolViolation, "replication batch for volume \(batch.volume.prefix(64)) names epoch 0; epochs start at 1")
        }
        if let bad = batch.records.first(where: { $0.capturedUnixNanos < 0 }) {
            throw FerryError(.protocolViolation, "replication record \(bad.sequence) of volume \(batch.volume.prefix(64)) claims a capture time of \(bad.capturedUnixNanos) ns, before 1970")
        }
    }

    /// A protected volume's status (the answer to protect): its size must be one a volume can have.
    static func check(_ status: Ferry_V1_VolumeStatus) throws {
        try WireLimits.checkVolumeSize(status.sizeBytes, "the agent reported volume \(status.name.prefix(64))", code: .protocolViolation)
    }

    /// Most microseconds a pause can be recorded as: the metrics record nanoseconds in an Int64.
    static let maxPauseMicros = UInt64(Int64.max / 1000)

    /// How long a member held its writes during a cut, as the agent measured it. A measurement
    /// for the point's record and the metrics, so clamped to what they can hold.
    static func pauseMicros(_ finished: Ferry_V1_CutFinished) -> UInt64 {
        min(finished.pauseMicros, maxPauseMicros)
    }
}
