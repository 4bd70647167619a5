import FerryWire
import Foundation

extension JobRunner {
    /// The guests recorded on `host` (see `StateStore.guests`) that have a disk among `volumes`,
    /// as JSON for a start hook, each disk named as the hook's host knows it (`volumes` maps a
    /// recorded volume name to that); nil when there is none. The shape is the guest's own:
    /// the hook boots the same machine (CPUs, memory, NIC MACs) on the recovery host.
    func guestsJSON(recordedOn host: String, volumes: [String: String]) async throws -> String? {
        guard let id = try await store.host(named: host)?.id else { return nil }
        let guests: [API.Inventory.Guest] = try await store.guests(hostID: id).compactMap { g in
            let disks = g.volumes.compactMap { volumes[$0] }
            guard !disks.isEmpty else { return nil }
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
