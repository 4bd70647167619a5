import ArgumentParser
import FerryWire
import Foundation

/// `ferryctl health`.
struct HealthCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "health",
        abstract: "Check that the controller answers; with a token, also its version and how many agents are online.",
        discussion: "Needs no token (without one the controller says only that it is up). Exits 1 unless the controller reports status ok, so it fits scripts and probes."
    )

    @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
    @OptionGroup var output: OutputOptions

    func run() async throws {
        try await CLI.guarded {
            let health = try await connection.withClient(requireToken: false) { try await $0.health() }
            if output.json {
                try Console.json(health)
            } else {
                var fields = KeyValueList()
                fields.add("status", health.status)
                // Only for a caller with a token.
                if let version = health.version { fields.add("version", version) }
                if let online = health.agentsOnline { fields.add("agents online", "\(online)") }
                print(fields.render())
            }
            if health.status != "ok" {
                throw FerryError(.unavailable, "controller status is '\(health.status)'")
            }
        }
    }
}

/// `ferryctl metrics`.
struct MetricsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "metrics",
        abstract: "Print the controller's Prometheus metrics (text exposition format)."
    )

    @OptionGroup(title: "Connection Options") var connection: ConnectionOptions

    func run() async throws {
        try await CLI.guarded {
            let text = try await connection.withClient { try await $0.metrics() }
            print(text, terminator: text.isEmpty || text.hasSuffix("\n") ? "" : "\n")
        }
    }
}
