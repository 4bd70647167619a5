import FerryWire
import Foundation

/// The agent's side of consistency cuts: PREPARE holds the writes of the named volumes and
/// reports where each volume's capture stands; FINISH (commit or abort alike) lets them go on.
///
/// A hold never outlasts its budget: the agent releases on its own once `hold_ms` have passed
/// since it began, so a controller that vanished mid-round stalls no workload for longer. That
/// keeps cuts correct: the controller records a point only when every member answered within
/// the same budget, counted from before any member began to hold, so all members were holding
/// at the instant the last answer arrived.
public actor CutHolds {
    /// A volume taking part in a cut.
    public struct Target: Sendable {
        public var name: String
        public var volume: BlockVolume
        public var log: ChangeLog
        public init(name: String, volume: BlockVolume, log: ChangeLog) {
            self.name = name
            self.volume = volume
            self.log = log
        }
    }

    private struct Hold {
        var volumes: [BlockVolume]
        var started: ContinuousClock.Instant
    }

    private var holds: [UInt64: Hold] = [:]
    /// Cuts released, newest last, so a late FINISH still learns the pause.
    private var ended: [(id: UInt64, pause: Duration, own: Bool)] = []
    /// Longest hold a controller may ask for.
    public static let maxHold: Duration = .seconds(10)

    public init() {}

    /// Holds the targets' writes and returns each one's epoch and last sequence.
    public func prepare(_ request: Ferry_V1_PrepareCut, targets: [Target]) async throws -> Ferry_V1_CutPrepared {
        guard holds[request.cutID] == nil, !ended.contains(where: { $0.id == request.cutID }) else {
            throw FerryError(.conflict, "cut \(request.cutID) was already prepared on this agent")
        }
        guard request.holdMs > 0, Duration.milliseconds(request.holdMs) <= Self.maxHold else {
            throw FerryError(.badRequest, "a cut holds writes for 1 ms to \(Self.maxHold), not \(request.holdMs) ms")
        }
        // Reserved before the wait below, so a second PREPARE of the same cut is refused
        // rather than taking a hold nothing would release.
        let started = ContinuousClock.now
        let volumes = targets.map(\.volume)
        holds[request.cutID] = Hold(volumes: volumes, started: started)
        // The hold lasts a little past the budget: the controller measures the budget on its
        // own clock, and the two clocks may run at slightly different rates.
        let budget = Duration.milliseconds(request.holdMs)
        let deadline = started + budget + max(.milliseconds(2), budget / 500)
        // Waiting for writes in flight blocks a thread: one of its own, so the wait never queues
        // behind the I/O pool's hashing and reads, nor ties up Swift concurrency's threads.
        let drained = await withCheckedContinuation { (done: CheckedContinuation<Bool, Never>) in
            let thread = Thread {
                done.resume(returning: volumes.map { $0.holdWrites(until: deadline) }.allSatisfy { $0 })
            }
            thread.start()
        }
        guard drained else {
            _ = release(request.cutID)
            throw FerryError(.timeout, "writes in flight did not finish within the \(request.holdMs) ms hold budget")
        }
        var prepared = Ferry_V1_CutPrepared()
        prepared.cutID = request.cutID
        prepared.members = targets.map { target in
            let snapshot = target.log.snapshot
            var member = Ferry_V1_CutMember()
            member.volume = target.name
            member.epoch = snapshot.epoch
            member.sequence = snapshot.last
            member.overflowed = snapshot.overflowed
            return member
        }
        let id = request.cutID
        Task {
            try? await Task.sleep(until: deadline, clock: .continuous)
            self.releaseOnOwn(id)
        }
        return prepared
    }

    /// Lets the cut's writes go on; reports how long they were held.
    public func finish(_ request: Ferry_V1_FinishCut) -> Ferry_V1_CutFinished {
        var finished = Ferry_V1_CutFinished()
        finished.cutID = request.cutID
        if let pause = release(request.cutID) {
            finished.pauseMicros = Self.micros(pause)
        } else if let done = ended.first(where: { $0.id == request.cutID }) {
            finished.pauseMicros = Self.micros(done.pause)
            finished.releasedOnOwn = done.own
        }
        return finished
    }

    private func releaseOnOwn(_ id: UInt64) {
        guard release(id) != nil, let i = ended.lastIndex(where: { $0.id == id }) else { return }
        ended[i].own = true
    }

    /// Releases a held cut; returns how long it was held, nil if it was not held.
    private func release(_ id: UInt64) -> Duration? {
        guard let hold = holds.removeValue(forKey: id) else { return nil }
        for volume in hold.volumes { volume.releaseWrites() }
        let pause = hold.started.duration(to: .now)
        ended.append((id, pause, false))
        if ended.count > 256 { ended.removeFirst(ended.count - 256) }
        return pause
    }

    static func micros(_ d: Duration) -> UInt64 {
        UInt64(max(0, d.components.seconds * 1_000_000 + d.components.attoseconds / 1_000_000_000_000))
    }
}
