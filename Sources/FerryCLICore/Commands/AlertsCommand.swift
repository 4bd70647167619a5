import ArgumentParser
import FerryWire
import Foundation

/// `ferryctl alerts`: what fires now (and, with --all, what was resolved).
struct AlertsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "alerts",
        abstract: "Show firing alerts, newest first (--all: resolved ones too), with their webhook deliveries.",
        discussion: "Exits 0 whether or not alerts fire; scripts read --json. Needs a viewer token."
    )

    @Flag(help: "Also show resolved alerts (the newest 1000 are kept).")
    var all = false
    @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
    @OptionGroup var output: OutputOptions

    func run() async throws {
        try await CLI.guarded {
            let alerts = try await connection.withClient { try await $0.alerts(all: all) }
            if output.json {
                try Console.json(alerts)
            } else if alerts.isEmpty {
                print(all ? "no alerts on record" : "no alert fires")
            } else {
                var table = TextTable("opened", "state", "severity", "rule", "subject", "message", "delivered")
                for a in alerts {
                    let deliveries = a.deliveries ?? []
                    let delivered = deliveries.isEmpty ? "-" : "\(deliveries.filter(\.delivered).count)/\(Set(deliveries.map { "\($0.url) \($0.event)" }).count)"
                    table.add(Format.timestamp(a.openedAt), a.state.rawValue, a.severity.rawValue, a.rule.rawValue, a.subject, a.message, delivered)
                }
                print(table.render())
            }
        }
    }
}
