import ArgumentParser
import FerryWire
import Foundation
import NIOCore

/// `ferryctl points GROUP`.
struct PointsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "points",
        abstract: "List a group's recovery points, oldest first.",
        discussion: """
            KIND is crash, app, group-crash, group-app or manual; CONSISTENCY is app only when \
            every member's quiesce hook ran. COMPLETE means every member's data up to the point \
            has reached the controller's disk. PAUSE is the longest member write hold of the cut. \
            Restore or inspect a point with 'ferryctl volume export HOST/VOLUME --point ID'.
            """
    )

    @Argument(help: "Name of the group.")
    var group: String
    @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
    @OptionGroup var output: OutputOptions

    func run() async throws {
        try await CLI.guarded {
            let points = try await connection.withClient { try await $0.points(group: group) }
            if output.json {
                try Console.json(points)
            } else if points.isEmpty {
                print("no points in \(Text.printable(group)) yet; 'ferryctl point create \(Text.printable(group))' takes one now")
            } else {
                var table = TextTable("id", "time (UTC)", "kind", "consistency", "complete", "pause ms", "label", "hook error")
                for p in points {
                    table.add(Text.printable(p.id), PointFormat.iso(p.createdAt), p.kind, p.consistency, p.complete ? "yes" : "no",
                              p.pauseMicros.map { String(format: "%.1f", Double($0) / 1000) } ?? "-",
                              p.label.map(Text.printable) ?? "-", p.hookError.map { GroupFormat.excerpt($0) } ?? "-")
                }
                print(table.render())
            }
        }
    }
}

/// `ferryctl point create GROUP`.
struct PointCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "point",
        abstract: "Take a recovery point of a group now.",
        subcommands: [Create.self]
    )
}

extension PointCommand {
    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Cut a manual point across all members of a group now.",
            discussion: """
                Prints the point's id alone on stdout, so P=$(ferryctl point create GROUP) works. \
                With --app the members' quiesce hooks run first and their thaw hooks after, so \
                this can take up to twice the group's hook timeout; if a hook fails the point is \
                still taken, crash-consistent, and the hook error is shown. Needs an operator token.
                """
        )

        @Argument(help: "Name of the group.")
        var group: String
        @Flag(help: "Make it app-consistent: run the quiesce and thaw hooks around the cut.")
        var app = false
        @Option(help: ArgumentHelp("Free text kept with the point, e.g. 'before upgrade'.", valueName: "TEXT"))
        var label: String?
        @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
        @OptionGroup var output: OutputOptions

        func run() async throws {
            try await CLI.guarded {
                let settings = try connection.settings()
                // The answer comes after the hooks ran: wait for both hooks plus a margin.
                var seconds: Int64 = 120
                if app {
                    let g = try await APIClient.withClient(settings) { try await $0.group(named: group) }
                    seconds = max(seconds, Int64(2 * g.policy.hookTimeoutSeconds) + 60)
                }
                let timeout = TimeAmount.seconds(seconds)
                let request = API.PointCreateRequest(app: app ? true : nil, label: label)
                let point = try await APIClient.withClient(settings, readTimeout: timeout) { [group] in
                    try await $0.createPoint(group: group, request, timeout: timeout)
                }
                if output.json {
                    try Console.json(point)
                    return
                }
                print(point.id)
                var note = "point \(Text.printable(point.id)) of \(Text.printable(point.group)): \(point.consistency)-consistent, "
                    + "\(point.members.count) member(s), \(point.complete ? "complete" : "not yet complete")"
                if let pause = point.pauseMicros { note += String(format: ", paused %.1f ms", Double(pause) / 1000) }
                Console.note(note)
                if let e = point.hookError { Console.note("hook error: \(Text.printable(e))") }
            }
        }
    }
}

enum PointFormat {
    /// `2026-11-24T10:42:07Z`.
    static func iso(_ date: Date) -> String {
        let f = ISO8601DateFormatter()
        f.timeZone = TimeZone(identifier: "UTC")
        return f.string(from: date)
    }

    /// `--as-of`: an ISO 8601 time, with or without fractional seconds.
    static func parse(asOf text: String) throws -> Date {
        let f = ISO8601DateFormatter()
        if let d = f.date(from: text) { return d }
        f.formatOptions.insert(.withFractionalSeconds)
        if let d = f.date(from: text) { return d }
        throw FerryError(.badRequest, "--as-of: '\(text)' is not an ISO 8601 time (example: 2026-11-24T10:42:07Z)")
    }

    /// Help text shared by --point options.
    static let choices = "latest (everything received, the default), latest-processed, latest-crash, latest-app, latest-group, or a point id from 'ferryctl points GROUP'"
}
