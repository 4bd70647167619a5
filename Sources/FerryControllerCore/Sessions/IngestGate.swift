import FerryWire
import NIOCore
import Synchronization

/// Which replication records of a volume the controller takes from the volume's host: the
/// data path's half of fencing. The other half, the agent's read-only export, cannot protect a
/// replica from records an old primary captured while it was cut off and sends once it heals.
public enum IngestGate: Sendable, Equatable {
    /// The host owns the volume: records of this generation.
    case open(generation: UInt64)
    /// Fenced for a failover, which made `generation`: records captured before the fence (the
    /// generation before it, or this one once the agent has learned it) up to and including
    /// `through` (what the fence reported, or what the replica held when the source did not
    /// answer) and none after.
    case fenced(generation: UInt64, through: ReplicaPosition)

    /// What to do with a batch.
    enum Decision: Equatable {
        /// Every record.
        case all
        /// The first `count` records; the rest lie past the fence.
        case prefix(count: Int, refused: Int)
        case refuse(FerryError)
    }

    func decide(generation: UInt64, epoch: UInt64, sequences: [UInt64]) -> Decision {
        switch self {
        case .open(let current):
            if generation == current { return .all }
            if generation > current {
                return .refuse(FerryError(.protocolViolation, "replication batch of generation \(generation); the volume is at generation \(current)"))
            }
            return .refuse(FerryError(.fenced, "replication batch of generation \(generation) refused: the volume is at generation \(current) since a failover or failback; the agent takes the current volume list at its next session"))
        case .fenced(let current, let through):
            guard generation == current || (current > 0 && generation == current - 1) else {
                return .refuse(FerryError(.fenced, "replication batch of generation \(generation) refused: the volume was fenced at generation \(current) for a failover"))
            }
            guard epoch == through.epoch else {
                return .refuse(FerryError(.fenced, "replication batch of capture epoch \(String(epoch, radix: 16)) refused: the volume is fenced, and its fence holds \(through)"))
            }
            let kept = sequences.prefix { $0 <= through.sequence }.count
            return kept == sequences.count ? .all : .prefix(count: kept, refused: sequences.count - kept)
        }
    }
}

/// The gates of every volume, by `HOST-ID/VOLUME`: loaded from the state store when a host's
/// session starts, changed by fencing and unfencing. Read on every replication batch, without
/// an actor hop.
public final class IngestGates: Sendable {
    private let gates = Mutex<[String: IngestGate]>([:])

    public init() {}

    static func key(_ hostID: String, _ volume: String) -> String { hostID + "/" + volume }

    func gate(hostID: String, volume: String) -> IngestGate? { gates.withLock { $0[Self.key(hostID, volume)] } }

    func set(_ gate: IngestGate, hostID: String, volume: String) { gates.withLock { $0[Self.key(hostID, volume)] = gate } }

    func load(hostID: String, _ records: [VolumeRecord]) {
        gates.withLock { g in
            for r in records { g[Self.key(hostID, r.name)] = r.ingestGate }
        }
    }
}

extension VolumeRecord {
    var ingestGate: IngestGate {
        let generation = UInt64(max(0, generation))
        guard fenced else { return .open(generation: generation) }
        // A fence recorded before fences kept their position holds nothing past the start.
        return .fenced(generation: generation, through: ReplicaPosition(epoch: UInt64(bitPattern: fenceEpoch ?? 0), sequence: UInt64(max(0, fenceSequence ?? 0))))
    }
}

extension Ferry_V1_ReplicationBatch {
    /// The first `count` records, with the attached bytes only they take (a record's attached
    /// bytes never straddle two attached frames, so frames are cut at record boundaries).
    func prefix(_ count: Int, attachments: [ByteBuffer]) -> (Ferry_V1_ReplicationBatch, [ByteBuffer]) {
        var cut = self
        cut.records = Array(records.prefix(count))
        var wanted = cut.records.reduce(0) { $0 + Int($1.attachedLength) }
        var kept: [ByteBuffer] = []
        for var frame in attachments where wanted > 0 {
            let take = min(wanted, frame.readableBytes)
            if let slice = frame.readSlice(length: take) { kept.append(slice) }
            wanted -= take
        }
        return (cut, kept)
    }
}
