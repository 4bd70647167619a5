import ArgumentParser
import FerryWire
import Foundation

/// `ferryctl host …`: one host.
struct HostCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "host",
        abstract: "Show, refresh or remove one host.",
        subcommands: [Show.self, Refresh.self, Remove.self]
    )
}

extension HostCommand {
    /// `ferryctl host show NAME`.
    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show a host: identity, session, certificate, and its last reported inventory.",
            discussion: "The inventory is what the agent last reported; 'ferryctl host refresh' asks it again."
        )

        @Argument(help: "Host name, as listed by 'ferryctl hosts'.")
        var name: String
        @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
        @OptionGroup var output: OutputOptions

        func run() async throws {
            try await CLI.guarded {
                let host = try await connection.withClient { try await $0.host(named: name) }
                if output.json {
                    try Console.json(host)
                } else {
                    print(Self.render(host, now: Date()))
                }
            }
        }

        static func render(_ host: API.Host, now: Date) -> String {
            var fields = KeyValueList()
            fields.add("id", host.id)
            fields.add("name", host.name)
            fields.add("state", host.state.rawValue)
            fields.add("address", host.address ?? "")
            fields.add("agent version", host.agentVersion ?? "")
            fields.add("enrolled", Format.moment(host.enrolledAt, now: now))
            fields.add("last seen", Format.moment(host.lastSeen, now: now))
            fields.add("certificate serial", host.certificateSerial ?? "")
            fields.add("certificate expires", host.certificateExpiry.map { "\(Format.timestamp($0)) (\(Format.relative($0, now: now)))" } ?? "")
            guard let inventory = host.inventory else {
                fields.add("inventory", "not reported yet")
                return fields.render()
            }
            fields.addBreak()
            InventoryView.addSummary(inventory, to: &fields)
            return fields.render() + "\n\n" + InventoryView.tables(inventory)
        }
    }

    /// `ferryctl host refresh NAME`.
    struct Refresh: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Ask a connected host's agent to re-read its inventory now.",
            discussion: "The host must be online; the agent has 10 seconds to answer."
        )

        @Argument(help: "Host name.")
        var name: String
        @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
        @OptionGroup var output: OutputOptions

        func run() async throws {
            try await CLI.guarded {
                let inventory = try await connection.withClient { try await $0.refreshInventory(host: name) }
                if output.json {
                    try Console.json(inventory)
                } else {
                    print("refreshed inventory of \(Text.printable(name)): \(InventoryView.summary(inventory))")
                }
            }
        }
    }

    /// `ferryctl host remove NAME`.
    struct Remove: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Remove a host: revoke its certificates and close its session.",
            discussion: """
                The agent can no longer connect; to protect the host again, enroll it anew with \
                a fresh token ('ferryctl token create --host NAME'). Needs an admin token.
                """
        )

        @Argument(help: "Host name.")
        var name: String
        @OptionGroup(title: "Connection Options") var connection: ConnectionOptions

        func run() async throws {
            try await CLI.guarded {
                let (wasOnline, revoked) = try await connection.withClient { client in
                    // Looked up first only to say whether a live session was cut; the removal
                    // itself is one call and reports a missing host the same way.
                    let before = try await client.host(named: name)
                    return (before.state == .online, try await client.removeHost(named: name))
                }
                print("removed host \(Text.printable(name)); revoked \(revoked) certificate(s)"
                      + (wasOnline ? "; its session was closed" : ""))
            }
        }
    }
}

/// Text for an inventory, shared by `host show` and `host refresh`.
enum InventoryView {
    static func addSummary(_ inventory: API.Inventory, to fields: inout KeyValueList) {
        fields.add("hostname", inventory.hostname)
        fields.add("os", inventory.os)
        fields.add("kernel", inventory.kernel)
        fields.add("architecture", inventory.architecture)
        fields.add("cpus", "\(inventory.cpus)")
        fields.add("memory", Format.bytes(inventory.memoryBytes))
        fields.add("boot id", inventory.bootID)
    }

    static func summary(_ inventory: API.Inventory) -> String {
        [
            inventory.os, "kernel \(inventory.kernel)", inventory.architecture,
            "\(inventory.cpus) CPU(s)", "\(Format.bytes(inventory.memoryBytes)) memory",
            "\(inventory.interfaces.count) interface(s)", "\(inventory.blockDevices.count) block device(s)",
        ].map(Text.printable).joined(separator: ", ")
    }

    static func tables(_ inventory: API.Inventory) -> String {
        var interfaces = TextTable("interface", "mac", "mtu", "up", "addresses")
        for i in inventory.interfaces {
            interfaces.add(i.name, i.macAddress, "\(i.mtu)", i.up ? "yes" : "no", i.addresses.joined(separator: ","))
        }
        var devices = TextTable("block device", "size", "model", "rotational", "ro")
        for d in inventory.blockDevices {
            devices.add(d.name, Format.bytes(d.sizeBytes), d.model,
                        d.rotational ? "yes" : "no", d.readOnly ? "yes" : "no")
        }
        return [
            inventory.interfaces.isEmpty ? "no network interfaces reported" : interfaces.render(),
            inventory.blockDevices.isEmpty ? "no block devices reported" : devices.render(),
        ].joined(separator: "\n\n")
    }
}
