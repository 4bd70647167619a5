import ArgumentParser
import FerryWire
import Foundation

/// `ferryctl wan …`: bandwidth limits and stream compression.
struct WANCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "wan",
        abstract: "Show or change the WAN settings: bandwidth limits and compression of replication streams.",
        discussion: """
            A limit applies to each direction on its own: replication into the controller, and \
            reverse streams out of it (reprotect, failback). A host's limit and the limit for all \
            hosts both apply. Compression (lz4) is done by the agents on the written bytes they \
            stream; a host without its own setting uses the one for all hosts.
            """,
        subcommands: [Show.self, Set.self],
        defaultSubcommand: Show.self
    )

    /// `ferryctl wan show`.
    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show the limits and compression in force.")
        @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
        @OptionGroup var output: OutputOptions

        func run() async throws {
            try await CLI.guarded {
                let settings = try await connection.withClient { try await $0.wanSettings() }
                if output.json { return try Console.json(settings) }
                print(WANCommand.render(settings))
            }
        }
    }

    /// `ferryctl wan set [--host H] [--limit RATE] [--compression lz4|none|inherit]`.
    struct Set: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Change the limit or compression of one host, or of all hosts; in force at once.",
            discussion: """
                RATE is bits per second with kbit, mbit or gbit (100mbit), bytes per second with \
                KB/s, MB/s or GB/s (12.5MB/s, decimal), or none. At least 1 Mbit/s.
                """
        )
        @Option(help: "The host to change (default: all hosts together).") var host: String?
        @Option(help: "Bandwidth limit in each direction, or 'none'.") var limit: String?
        @Option(help: "lz4, none, or (for a host) inherit.") var compression: String?
        @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
        @OptionGroup var output: OutputOptions

        func run() async throws {
            try await CLI.guarded {
                guard limit != nil || compression != nil else {
                    throw FerryError(.badRequest, "nothing to change: give --limit, --compression or both")
                }
                let update = API.WANUpdate(host: host, limitBytesPerSecond: try limit.map(WANCommand.rate), compression: compression)
                let settings = try await connection.withClient { try await $0.updateWAN(update) }
                if output.json { return try Console.json(settings) }
                print(WANCommand.render(settings))
            }
        }
    }

    static func render(_ settings: API.WANSettings) -> String {
        var table = TextTable("scope", "limit", "compression")
        func row(_ scope: String, _ rule: API.WANRule, inherit: Bool) {
            table.add(scope, rule.limitBytesPerSecond.map(describe) ?? "none",
                      rule.compression?.rawValue ?? (inherit ? "inherit" : "none"))
        }
        row("all hosts", settings.all, inherit: false)
        for host in settings.hosts { row(host.host, host.rule, inherit: true) }
        return table.render()
    }

    /// A rate for display: in Mbit/s (and bytes per second).
    static func describe(_ bytesPerSecond: UInt64) -> String {
        let mbit = Double(bytesPerSecond) * 8 / 1e6
        return String(format: mbit >= 10 ? "%.0f Mbit/s" : "%.2f Mbit/s", mbit) + " (\(bytesPerSecond) B/s)"
    }

    /// Parses RATE into bytes per second; "none" is 0 (no limit).
    static func rate(_ text: String) throws -> UInt64 {
        let t = text.trimmingCharacters(in: .whitespaces).lowercased()
        if t == "none" || t == "off" { return 0 }
        let units: [(String, Double)] = [("kbit", 1e3 / 8), ("mbit", 1e6 / 8), ("gbit", 1e9 / 8), ("kb/s", 1e3), ("mb/s", 1e6), ("gb/s", 1e9), ("b/s", 1)]
        for (suffix, factor) in units where t.hasSuffix(suffix) {
            guard let number = Double(t.dropLast(suffix.count)), number.isFinite, number > 0, number * factor < 1e15 else { break }
            return UInt64((number * factor).rounded())
        }
        throw FerryError(.badRequest, "'\(text)' is not a rate: use e.g. 100mbit, 500kbit, 12.5MB/s or none")
    }
}
