import FerryWire
import Foundation
import Logging

/// The recovery point catalogue's logic over the state store and the replicas: which points
/// are complete, how an operator's choice of point resolves, and retention (pruning by the
/// group's tiers, and pinning each replica's journal for the points kept).
public struct PointCatalogue: Sendable {
    let store: StateStore
    let replicas: ReplicaManager

    public init(store: StateStore, replicas: ReplicaManager) {
        self.store = store
        self.replicas = replicas
    }

    /// The words every command uses for a point.
    public static let choices = ["latest", "latest-processed", "latest-crash", "latest-app", "latest-group"]

    /// A member's position in its replica.
    static func position(_ m: PointMemberRecord) -> ReplicaPosition { ReplicaPosition(epoch: m.epoch, sequence: m.sequence) }

    /// Every member's writes up to the point are durable on the controller.
    func isComplete(_ point: PointRecord) async -> Bool {
        for m in point.decodedMembers {
            guard let replica = await replicas.opened(hostID: m.hostID, volume: m.volume) else { return false }
            guard await replica.holds(Self.position(m)) else { return false }
        }
        return true
    }

    /// Resolves a point choice for one volume of host `hostID`: an id, a `latest…` word, or the
    /// newest point at or before `asOf`. Returns the position and a name for it.
    public func resolve(hostID: String, hostName: String, volume: String, choice: String?, asOf: Date?) async throws
        -> (position: ReplicaPosition, point: String) {
        let label = "\(hostName)/\(volume)"
        guard let replica = await replicas.opened(hostID: hostID, volume: volume) else {
            throw FerryError(.notFound, "\(label) has no replica on this controller")
        }
        let word = choice ?? (asOf == nil ? "latest" : nil)
        if word == "latest" {
            return (await replica.latestPosition, "latest")
        }
        let candidates: [PointRecord]
        if let word, !Self.choices.contains(word) {
            // A point id.
            guard let point = try await store.point(id: word) else {
                throw FerryError(.notFound, "no recovery point '\(word)'; 'ferryctl points GROUP' lists them (or use \(Self.choices.joined(separator: ", ")))")
            }
            if let pruned = point.prunedAt {
                throw FerryError(.notFound, "recovery point '\(word)' was pruned at \(ISO8601DateFormatter().string(from: pruned)) (\(point.prunedReason ?? "retention")); pick a newer one")
            }
            guard let m = point.decodedMembers.first(where: { $0.hostID == hostID && $0.volume == volume }) else {
                throw FerryError(.badRequest, "recovery point '\(word)' of group '\(point.groupName)' does not include \(label)")
            }
            guard await isComplete(point) else {
                throw FerryError(.unavailable, "recovery point '\(word)' is not complete yet: its writes are still arriving")
            }
            return (Self.position(m), point.id)
        } else {
            guard let group = try await store.groupOf(hostID: hostID, volume: volume) else {
                throw FerryError(.notFound, "\(label) is in no consistency group, so it has no recovery points; use 'latest' or add it to a group")
            }
            candidates = try await store.points(group: group)
        }
        let filtered: [PointRecord]
        switch word {
        case "latest-crash"?: filtered = candidates.filter { [PointRecord.Kind.crash, PointRecord.Kind.groupCrash].contains($0.kind) }
        case "latest-app"?: filtered = candidates.filter { $0.consistency == "app" }
        case "latest-group"?: filtered = candidates.filter { $0.decodedMembers.count > 1 }
        default: filtered = candidates
        }
        var ordered = filtered.sorted { $0.createdAt > $1.createdAt }
        if let asOf {
            guard let oldest = candidates.min(by: { $0.createdAt < $1.createdAt }) else {
                throw FerryError(.notFound, "\(label)'s group has no recovery points yet")
            }
            // Times are given to the second (as `ferryctl points` shows them): a point counts
            // as at or before `asOf` if its second is.
            func second(_ d: Date) -> Double { d.timeIntervalSince1970.rounded(.down) }
            guard second(asOf) >= second(oldest.createdAt) else {
                let f = ISO8601DateFormatter()
                throw FerryError(.notFound, "\(f.string(from: asOf)) is outside retention: the oldest point of \(label)'s group is from \(f.string(from: oldest.createdAt))")
            }
            ordered = ordered.filter { second($0.createdAt) <= second(asOf) }
        }
        for point in ordered {
            guard let m = point.decodedMembers.first(where: { $0.hostID == hostID && $0.volume == volume }) else { continue }
            if await isComplete(point) { return (Self.position(m), point.id) }
        }
        throw FerryError(.notFound, "no complete recovery point of \(label) matches '\(word ?? "as-of")' yet")
    }

    /// Prunes points the tiers no longer keep and points whose history the journal's size cap
    /// folded away; then pins each member replica's journal at its oldest point kept.
    public func applyRetention(logger: Logger) async {
        do {
            var pinned: [String: ReplicaPosition] = [:]
            let sizes = Dictionary(try await store.volumes().map { ($0.hostID + "/" + $0.name, UInt64($0.sizeBytes)) }, uniquingKeysWith: { a, _ in a })
            for (group, members) in try await store.groups() {
                // Every member's replica is opened (and so pinned below), not only those of
                // connected hosts: an unpinned replica would fold a retained point's history.
                for m in members {
                    // (A recovered volume's replica still being built is skipped: it holds no history yet.)
                    if let size = sizes[m.hostID + "/" + m.volume], await !replicas.isSeeding(hostID: m.hostID, volume: m.volume) {
                        _ = try await replicas.replica(hostID: m.hostID, volume: m.volume, size: size)
                    }
                }
                let points = try await store.points(group: group.name)
                let expired = Set(Retention.expired(points, policy: group.decodedPolicy))
                var lost: [String] = []
                var kept: [PointRecord] = []
                for p in points where !expired.contains(p.id) {
                    var gone = false
                    for m in p.decodedMembers {
                        guard let replica = await replicas.opened(hostID: m.hostID, volume: m.volume) else { continue }
                        guard let base = await replica.basePosition else { continue }
                        let order = await replica.compare(Self.position(m), base)
                        // Before the base (folded away), or of an epoch the replica no longer knows.
                        if order == .orderedAscending { gone = true }
                    }
                    if gone { lost.append(p.id) } else { kept.append(p) }
                }
                try await store.prunePoints(Array(expired), reason: "retention")
                if !lost.isEmpty {
                    logger.warning("recovery points lost: the journal reached its size cap and was folded past them",
                                   metadata: ["group": "\(group.name)", "points": "\(lost.count)"])
                    try await store.prunePoints(lost, reason: "journal size cap reached; folded into the base")
                }
                // Pinned: every volume a kept point holds, members or not any more (a volume
                // taken out of the group keeps the history its old points need).
                for p in kept {
                    for pm in p.decodedMembers {
                        let key = pm.hostID + "/" + pm.volume
                        var replica = await replicas.opened(hostID: pm.hostID, volume: pm.volume)
                        if replica == nil, let size = sizes[key], await !replicas.isSeeding(hostID: pm.hostID, volume: pm.volume) {
                            replica = try? await replicas.replica(hostID: pm.hostID, volume: pm.volume, size: size)
                        }
                        guard let replica else { continue }
                        let position = Self.position(pm)
                        if let current = pinned[key] {
                            if await replica.compare(position, current) == .orderedAscending { pinned[key] = position }
                        } else {
                            pinned[key] = position
                        }
                    }
                }
            }
            await replicas.pinAll(pinned)
        } catch {
            logger.error("retention of recovery points failed", metadata: ["error": "\(error)"])
        }
    }
}
