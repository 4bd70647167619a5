import ArgumentParser
import FerryWire
import Foundation

/// `ferryctl hosts`: every enrolled host at a glance.
struct HostsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hosts",
        abstract: "List enrolled hosts: state, address, OS, last contact, certificate expiry.",
        discussion: """
            STATE is online (session open), offline (enrolled, connected before, not now) or \
            enrolled (never connected since enrolling). With --json, prints the API's host \
            objects, including each host's full inventory.
            """
    )

    @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
    @OptionGroup var output: OutputOptions

    func run() async throws {
        try await CLI.guarded {
            let hosts = try await connection.withClient { try await $0.hosts() }
            if output.json {
                try Console.json(hosts)
            } else if hosts.isEmpty {
                print("no hosts enrolled; 'ferryctl token create' makes a token to enroll one")
            } else {
                print(Self.table(hosts, now: Date()))
            }
        }
    }

    static func table(_ hosts: [API.Host], now: Date) -> String {
        var table = TextTable("name", "state", "address", "os", "last seen", "cert expires")
        for host in hosts.sorted(by: { $0.name < $1.name }) {
            table.add(
                host.name,
                host.state.rawValue,
                host.address ?? "",
                host.os ?? host.inventory?.os ?? "",
                host.lastSeen.map { Format.relative($0, now: now) } ?? "",
                Format.expiry(host.certificateExpiry, now: now)
            )
        }
        return table.render()
    }
}
