import ArgumentParser
import FerryWire
import Foundation

/// `ferryctl exports`.
struct ExportsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "exports",
        abstract: "List point-in-time NBD exports served by the controller."
    )

    @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
    @OptionGroup var output: OutputOptions

    func run() async throws {
        try await CLI.guarded {
            let exports = try await connection.withClient { try await $0.exports() }
            if output.json {
                try Console.json(exports)
            } else if exports.isEmpty {
                print("no exports; 'ferryctl volume export HOST/VOLUME' serves one")
            } else {
                var table = TextTable("id", "volume", "point", "writable", "for", "uri")
                for e in exports {
                    table.add(Text.printable(e.id), Text.printable(e.volume), Text.printable(e.point), e.writable ? "yes" : "no",
                              e.hosts.isEmpty ? "local only" : Text.printable(e.hosts.joined(separator: ",")), Text.printable(e.uri))
                }
                print(table.render())
            }
        }
    }
}

/// `ferryctl export remove ID`.
struct ExportCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "Remove a point-in-time export.",
        subcommands: [Remove.self]
    )

    struct Remove: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Stop serving an export; a writable export's overlay is discarded.",
            discussion: "The point itself is never changed. Needs an operator token."
        )

        @Argument(help: "The export's id, as listed by 'ferryctl exports'.")
        var id: String
        @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
        @OptionGroup var output: OutputOptions

        func run() async throws {
            try await CLI.guarded {
                try await connection.withClient { try await $0.removeExport(id: id) }
                if output.json {
                    try Console.json(["removed": id])
                } else {
                    print("removed export \(Text.printable(id))")
                }
            }
        }
    }
}
