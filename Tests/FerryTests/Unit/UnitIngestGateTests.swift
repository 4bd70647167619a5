@testable import FerryControllerCore
import FerryWire
import NIOCore
import Testing

@Suite("Unit IngestGate")
struct UnitIngestGateTests {
    func isRefused(_ d: IngestGate.Decision, _ code: FerryError.Code) -> Bool {
        if case .refuse(let e) = d { return e.code == code }
        return false
    }

    @Test("an owned volume takes its own generation only")
    func open() {
        let gate = IngestGate.open(generation: 3)
        #expect(gate.decide(generation: 3, epoch: 7, sequences: [1, 2]) == .all)
        #expect(isRefused(gate.decide(generation: 2, epoch: 7, sequences: [1]), .fenced), "an agent that missed a failover")
        #expect(isRefused(gate.decide(generation: 4, epoch: 7, sequences: [1]), .protocolViolation), "a generation that never existed")
        #expect(isRefused(gate.decide(generation: 0, epoch: 7, sequences: [1]), .fenced))
        #expect(isRefused(gate.decide(generation: .max, epoch: 7, sequences: [1]), .protocolViolation))
    }

    @Test("a fenced volume takes what was captured before its fence, up to its position, in its epoch")
    func fenced() {
        let gate = IngestGate.fenced(generation: 4, through: ReplicaPosition(epoch: 9, sequence: 100))
        #expect(gate.decide(generation: 3, epoch: 9, sequences: [98, 99, 100]) == .all, "the drain of a planned failover")
        #expect(gate.decide(generation: 4, epoch: 9, sequences: [99, 100]) == .all, "the agent learned the fence")
        #expect(gate.decide(generation: 3, epoch: 9, sequences: [99, 100, 101, 102]) == .prefix(count: 2, refused: 2))
        #expect(gate.decide(generation: 3, epoch: 9, sequences: [101]) == .prefix(count: 0, refused: 1))
        #expect(isRefused(gate.decide(generation: 3, epoch: 10, sequences: [1]), .fenced), "a new epoch began after the fence")
        #expect(isRefused(gate.decide(generation: 2, epoch: 9, sequences: [1]), .fenced))
        #expect(isRefused(gate.decide(generation: 5, epoch: 9, sequences: [1]), .fenced))
        #expect(isRefused(gate.decide(generation: .max, epoch: 9, sequences: [1]), .fenced))
        // Generation 0 fenced (a record from before generations): nothing underflows.
        let zero = IngestGate.fenced(generation: 0, through: ReplicaPosition(epoch: 0, sequence: 0))
        #expect(zero.decide(generation: 0, epoch: 0, sequences: [1]) == .prefix(count: 0, refused: 1))
    }

    @Test("a batch cut at the fence keeps only the attached bytes its records take")
    func prefix() {
        var batch = Ferry_V1_ReplicationBatch()
        let shapes: [(UInt64, Int)] = [(1, 4), (2, 0), (3, 8), (4, 4)]
        batch.records = shapes.map { seq, attached in
            var r = Ferry_V1_ReplicationRecord()
            r.sequence = seq
            if attached > 0 { r.attachedLength = UInt32(attached) } else { r.zeroLength = 512 }
            return r
        }
        let frames = [ByteBuffer(bytes: [1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3]), ByteBuffer(bytes: [4, 4, 4, 4])]
        let (cut, kept) = batch.prefix(3, attachments: frames)
        #expect(cut.records.map(\.sequence) == [1, 2, 3])
        #expect(kept.flatMap { Array($0.readableBytesView) } == [1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3])
        let (none, nothing) = batch.prefix(0, attachments: frames)
        #expect(none.records.isEmpty && nothing.isEmpty)
    }
}
