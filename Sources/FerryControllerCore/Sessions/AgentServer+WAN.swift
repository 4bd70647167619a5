import FerryWire
import Foundation

extension AgentServer {
    /// The WAN settings from the store, in force from the start.
    func loadWAN() async throws {
        let (all, byID) = try await store.wanSettings()
        let names = Dictionary(uniqueKeysWithValues: try await store.hosts().map { ($0.id, $0.name) })
        wan.load(all: all, hosts: byID.map { (id: $0.key, name: names[$0.key] ?? $0.key, rule: $0.value) })
    }

    /// The settings in force, hosts by name.
    func wanSettings() async throws -> API.WANSettings {
        let names = Dictionary(uniqueKeysWithValues: try await store.hosts().map { ($0.id, $0.name) })
        let hosts = wan.hostRules.compactMap { id, rule in names[id].map { API.WANHostRule(host: $0, rule: rule) } }
        return API.WANSettings(all: wan.rule(hostID: nil), hosts: hosts.sorted { $0.host < $1.host })
    }

    /// Changes one scope's settings: recorded (audited), in force at once for the streams
    /// running, and a changed compression sent to the agents concerned with their volume list.
    func updateWAN(_ update: API.WANUpdate, actor: String) async throws -> API.WANSettings {
        var hostID: String?
        if let name = update.host {
            guard let host = try await store.host(named: name) else {
                throw FerryError(.notFound, "no host named '\(name)'; 'ferryctl hosts' lists them")
            }
            hostID = host.id
        }
        var rule = wan.rule(hostID: hostID)
        if let limit = update.limitBytesPerSecond {
            guard limit == 0 || (WANLimiter.minimumBytesPerSecond...WANLimiter.maximumBytesPerSecond).contains(limit) else {
                throw FerryError(.badRequest, "a bandwidth limit is 1 Mbit/s (\(WANLimiter.minimumBytesPerSecond) bytes/s) to 10 Tbit/s, or 0 for none; not \(limit) bytes/s")
            }
            rule.limitBytesPerSecond = limit == 0 ? nil : limit
        }
        let compressionBefore = rule.compression
        if let text = update.compression {
            if text == "inherit", hostID != nil {
                rule.compression = nil
            } else if let c = API.StreamCompression(rawValue: text) {
                rule.compression = c
            } else {
                throw FerryError(.badRequest, "compression is one of none, lz4\(hostID == nil ? "" : ", inherit (what all hosts have)"); not '\(text)'")
            }
        }
        try await store.setWAN(hostID: hostID, target: update.host ?? "all hosts", rule, actor: actor)
        wan.set(hostID: hostID, name: update.host, rule)
        if rule.compression != compressionBefore {
            let entries = await registry.all.filter { hostID == nil || $0.hostID == hostID }
            for entry in entries {
                var log = logger
                log[metadataKey: "host"] = "\(entry.hostName)"
                await syncVolumes(hostID: entry.hostID, session: entry.session, log: log)
            }
        }
        return try await wanSettings()
    }
}
