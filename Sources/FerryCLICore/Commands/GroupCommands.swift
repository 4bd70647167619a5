import ArgumentParser
import FerryWire
import Foundation

/// `ferryctl group create|show|delete`: consistency groups.
struct GroupCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "group",
        abstract: "Create, show or delete a consistency group: volumes whose points are cut together.",
        subcommands: [Create.self, Show.self, Delete.self]
    )
}

extension GroupCommand {
    /// `ferryctl group create NAME --volume HOST/VOL ...`.
    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a consistency group of protected volumes and its point schedule.",
            discussion: """
                Every --crash-interval the controller cuts a crash-consistent point across all \
                members at once; every --app-interval it first runs each member agent's \
                --quiesce-hook, cuts, then runs --thaw-hook (an interval of 0 turns that schedule \
                off). Points are kept by tier: all for --keep-all, one an hour up to --keep-hourly, \
                one a day up to --keep-daily. Options left out keep the controller's defaults. \
                Needs an operator token.
                """
        )

        @Argument(help: "Name of the group (letters, digits, '.', '-', '_').")
        var name: String
        @Option(name: .customLong("volume"), help: ArgumentHelp("A member, as HOST/VOLUME; repeat for each.", valueName: "HOST/VOLUME"))
        var volumes: [String] = []
        @Option(help: ArgumentHelp("Time between crash-consistent points; 0 for none (default 15s).", valueName: "DURATION"))
        var crashInterval: String?
        @Option(help: ArgumentHelp("Time between app-consistent points; 0 for none (default 1h).", valueName: "DURATION"))
        var appInterval: String?
        @Option(help: ArgumentHelp("Hook each member's agent runs to quiesce its workload (defined in the agent's config).", valueName: "NAME"))
        var quiesceHook: String?
        @Option(help: ArgumentHelp("Hook each member's agent runs to resume its workload.", valueName: "NAME"))
        var thawHook: String?
        @Option(help: ArgumentHelp("Longest a quiesce or thaw hook may run (default 30s).", valueName: "DURATION"))
        var hookTimeout: String?
        @Option(help: ArgumentHelp("Longest a member may hold its writes during a cut (default 50ms).", valueName: "DURATION"))
        var holdBudget: String?
        @Option(help: ArgumentHelp("Keep every point this long (default 2h).", valueName: "DURATION"))
        var keepAll: String?
        @Option(help: ArgumentHelp("Then keep one point an hour up to this age (default 24h).", valueName: "DURATION"))
        var keepHourly: String?
        @Option(help: ArgumentHelp("Then keep one point a day up to this age (default 7d).", valueName: "DURATION"))
        var keepDaily: String?
        @Option(help: ArgumentHelp("Alert when the newest point is older than this (default 60s).", valueName: "DURATION"))
        var rpoAlert: String?
        @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
        @OptionGroup var output: OutputOptions

        func run() async throws {
            try await CLI.guarded {
                guard !volumes.isEmpty else {
                    throw FerryError(.badRequest, "a group needs at least one --volume HOST/VOLUME")
                }
                for v in volumes { _ = try VolumeCommand.parse(v) }
                let request = API.GroupCreateRequest(name: name, volumes: volumes, policy: try policy())
                let group = try await connection.withClient { try await $0.createGroup(request) }
                if output.json {
                    try Console.json(group)
                    return
                }
                let p = group.policy
                print("created group \(Text.printable(group.name)): \(group.volumes.count) volume(s) (\(group.volumes.map(Text.printable).joined(separator: ", ")))")
                print("points: crash \(GroupFormat.every(p.crashIntervalSeconds)), app \(GroupFormat.every(p.appIntervalSeconds))"
                      + "; keep all \(GroupFormat.interval(p.keepAllSeconds)), hourly \(GroupFormat.interval(p.hourlySeconds)), daily \(GroupFormat.interval(p.dailySeconds))"
                      + "; RPO alert after \(GroupFormat.interval(p.rpoAlertSeconds))")
                if p.appIntervalSeconds > 0, p.quiesceHook == nil {
                    Console.note("note: no --quiesce-hook, so app points will be crash-consistent")
                }
            }
        }

        /// The defaults with the given options applied.
        func policy() throws -> API.GroupPolicy {
            var p = API.GroupPolicy()
            if let v = try GroupFormat.seconds(crashInterval, "--crash-interval", allowZero: true) { p.crashIntervalSeconds = v }
            if let v = try GroupFormat.seconds(appInterval, "--app-interval", allowZero: true) { p.appIntervalSeconds = v }
            if let v = try GroupFormat.seconds(hookTimeout, "--hook-timeout") { p.hookTimeoutSeconds = v }
            if let holdBudget {
                let d = try GroupFormat.duration(holdBudget, "--hold-budget")
                let ms = Int(d.components.seconds) * 1000 + Int(d.components.attoseconds / 1_000_000_000_000_000)
                guard ms >= 1 else { throw FerryError(.badRequest, "--hold-budget must be at least 1ms") }
                p.holdBudgetMilliseconds = ms
            }
            if let v = try GroupFormat.seconds(keepAll, "--keep-all", allowZero: true) { p.keepAllSeconds = v }
            if let v = try GroupFormat.seconds(keepHourly, "--keep-hourly", allowZero: true) { p.hourlySeconds = v }
            if let v = try GroupFormat.seconds(keepDaily, "--keep-daily", allowZero: true) { p.dailySeconds = v }
            if let v = try GroupFormat.seconds(rpoAlert, "--rpo-alert") { p.rpoAlertSeconds = v }
            p.quiesceHook = quiesceHook
            p.thawHook = thawHook
            return p
        }
    }

    /// `ferryctl group show NAME`.
    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show a consistency group: members, policy and recovery point state.")

        @Argument(help: "Name of the group.")
        var name: String
        @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
        @OptionGroup var output: OutputOptions

        func run() async throws {
            try await CLI.guarded {
                let g = try await connection.withClient { try await $0.group(named: name) }
                if output.json {
                    try Console.json(g)
                    return
                }
                let p = g.policy
                var fields = KeyValueList()
                fields.add("group", Text.printable(g.name))
                fields.add("created", Format.timestamp(g.createdAt))
                fields.add("members", "\(g.volumes.count): " + g.volumes.joined(separator: ", "))
                fields.addBreak()
                fields.add("crash points", GroupFormat.every(p.crashIntervalSeconds))
                fields.add("app points", GroupFormat.every(p.appIntervalSeconds))
                fields.add("quiesce hook", p.quiesceHook.map(Text.printable) ?? "-")
                fields.add("thaw hook", p.thawHook.map(Text.printable) ?? "-")
                fields.add("hook timeout", GroupFormat.interval(p.hookTimeoutSeconds))
                fields.add("hold budget", "\(p.holdBudgetMilliseconds)ms")
                fields.add("retention", "all for \(GroupFormat.interval(p.keepAllSeconds)), hourly to \(GroupFormat.interval(p.hourlySeconds)), daily to \(GroupFormat.interval(p.dailySeconds))")
                fields.add("RPO alert", "after \(GroupFormat.interval(p.rpoAlertSeconds))")
                fields.addBreak()
                fields.add("points", String(g.points))
                fields.add("newest point", Format.moment(g.newestPoint))
                fields.add("RPO", GroupFormat.rpo(g.rpoSeconds) + (g.rpoAlert ? " (ALERT)" : ""))
                fields.add("last error", g.lastRoundError.map(Text.printable) ?? "-")
                print(fields.render())
            }
        }
    }

    /// `ferryctl group delete NAME`.
    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Delete a consistency group and its schedule.",
            discussion: "The member volumes stay protected. Needs an operator token."
        )

        @Argument(help: "Name of the group.")
        var name: String
        @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
        @OptionGroup var output: OutputOptions

        func run() async throws {
            try await CLI.guarded {
                try await connection.withClient { try await $0.removeGroup(named: name) }
                if output.json {
                    try Console.json(["deleted": name])
                } else {
                    print("deleted group \(Text.printable(name))")
                }
            }
        }
    }
}

/// `ferryctl groups`.
struct GroupsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "groups",
        abstract: "List consistency groups with their schedules and recovery point age.",
        discussion: "RPO is the age of the newest point; ALERT means it is past the group's --rpo-alert."
    )

    @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
    @OptionGroup var output: OutputOptions

    func run() async throws {
        try await CLI.guarded {
            let groups = try await connection.withClient { try await $0.groups() }
            if output.json {
                try Console.json(groups)
            } else if groups.isEmpty {
                print("no groups; 'ferryctl group create NAME --volume HOST/VOLUME' adds one")
            } else {
                var table = TextTable("name", "volumes", "crash every", "app every", "points", "newest", "RPO", "alert", "last error")
                for g in groups {
                    table.add(Text.printable(g.name), String(g.volumes.count),
                              GroupFormat.every(g.policy.crashIntervalSeconds), GroupFormat.every(g.policy.appIntervalSeconds),
                              String(g.points), g.newestPoint.map { Format.relative($0) } ?? "-",
                              GroupFormat.rpo(g.rpoSeconds), g.rpoAlert ? "ALERT" : "ok",
                              g.lastRoundError.map { GroupFormat.excerpt($0) } ?? "-")
                }
                print(table.render())
            }
        }
    }
}

/// Parsing and showing policy durations.
enum GroupFormat {
    /// `--option`: a duration, or a one-line error naming the option.
    static func duration(_ text: String, _ option: String) throws -> Duration {
        do {
            return try ConfigText.duration(text)
        } catch {
            throw FerryError(.badRequest, "\(option): '\(text)' is not a duration (examples: 50ms, 15s, 10m, 1h, 7d)")
        }
    }

    /// Whole seconds of an optional duration option; nil when it was not given.
    static func seconds(_ text: String?, _ option: String, allowZero: Bool = false) throws -> Int? {
        guard let text else { return nil }
        let seconds = Int(try duration(text, option).components.seconds)
        if seconds == 0, !allowZero { throw FerryError(.badRequest, "\(option) must be at least 1s") }
        return seconds
    }

    /// An exact interval in its largest whole unit: `15s`, `90s`, `5m`, `1h`, `7d`.
    static func interval(_ seconds: Int) -> String {
        switch seconds {
        case 0: return "0s"
        case _ where seconds % 86_400 == 0: return "\(seconds / 86_400)d"
        case _ where seconds % 3600 == 0: return "\(seconds / 3600)h"
        case _ where seconds % 60 == 0: return "\(seconds / 60)m"
        default: return "\(seconds)s"
        }
    }

    /// An interval, or `off` for 0.
    static func every(_ seconds: Int) -> String {
        seconds == 0 ? "off" : interval(seconds)
    }

    /// `4.2s`, `3m`, or `-` before the first point.
    static func rpo(_ seconds: Double?) -> String {
        guard let seconds else { return "-" }
        return seconds < 60 ? String(format: "%.1fs", max(0, seconds)) : Format.span(seconds)
    }

    /// One printable line of at most 60 characters.
    static func excerpt(_ text: String) -> String {
        let line = Text.printable(text)
        return line.count > 60 ? String(line.prefix(59)) + "…" : line
    }
}
