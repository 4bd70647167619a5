import ArgumentParser
import FerryWire
import Foundation

/// `ferryctl audit`.
struct AuditCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "audit",
        abstract: "Show the audit log of changes (enrollments, removals, tokens), newest first."
    )

    @Option(help: "How many of the newest entries to show (1 to 10000).")
    var limit: Int = 50
    @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
    @OptionGroup var output: OutputOptions

    func run() async throws {
        try await CLI.guarded {
            guard (1...10_000).contains(limit) else {
                throw FerryError(.badRequest, "--limit must be between 1 and 10000")
            }
            let entries = try await connection.withClient { try await $0.audit(limit: limit) }
            if output.json {
                try Console.json(entries)
            } else if entries.isEmpty {
                print("the audit log is empty")
            } else {
                print(Self.table(entries))
            }
        }
    }

    static func table(_ entries: [API.AuditEntry]) -> String {
        var table = TextTable("time", "actor", "action", "target", "detail")
        for e in entries {
            table.add(Format.timestamp(e.at), e.actor, e.action, e.target, e.detail)
        }
        return table.render()
    }
}
