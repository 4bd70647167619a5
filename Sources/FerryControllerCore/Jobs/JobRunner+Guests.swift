import FerryWire
import Foundation

extension JobRunner {
    /// The guests recorded on `host` (see `StateStore.guests`) whose disks are all among
    /// `volumes`, as JSON for a start hook, each disk named as the hook's host knows it
    /// (`volumes` maps a recorded volume name to that); nil when there is none. The shape is the
    /// guest's own: the hook boots the same machine (CPUs, memory, NIC MACs) on the recovery
    /// host. A disk goes to one guest only, the one seen last (a guest renamed or replaced leaves
    /// its old record behind: two kernels must never mount one disk).
    func guestsJSON(recordedOn host: String, volumes: [String: String]) async throws -> String? {
        guard let id = try await store.host(named: host)?.id else { return nil }
        var claimed = Set<String>()
        let guests: [API.Inventory.Guest] = try await store.guests(hostID: id).compactMap { g in
            // Newest first: an older guest of a disk already handed over is not booted.
            guard !g.volumes.isEmpty, g.volumes.allSatisfy({ volumes[$0] != nil }), claimed.isDisjoint(with: g.volumes) else { return nil }
            claimed.formUnion(g.volumes)
            let disks = g.volumes.compactMap { volumes[$0] }
            return API.Inventory.Guest(name: g.name, cpus: g.cpus, memoryBytes: g.memoryBytes,
                                       nics: g.nics.map { .init(macAddress: $0.macAddress, model: $0.model) }, volumes: disks,
                                       machine: g.machine.isEmpty ? nil : g.machine)
        }
        guard !guests.isEmpty else { return nil }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return String(decoding: try encoder.encode(guests), as: UTF8.self)
    }
}
