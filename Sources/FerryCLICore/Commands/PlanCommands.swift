import ArgumentParser
import FerryWire
import Foundation

/// `ferryctl plans`.
struct PlansCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "plans", abstract: "List recovery plans and where each stands.")
    @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
    @OptionGroup var output: OutputOptions

    func run() async throws {
        try await CLI.guarded {
            let plans = try await connection.withClient { try await $0.plans() }
            if output.json { try Console.json(plans); return }
            var table = TextTable("plan", "state", "groups", "volumes", "last job", "updated")
            for p in plans {
                table.add(p.plan.name, p.state.rawValue, p.plan.groups.map(\.name).joined(separator: " → "), "\(p.plan.volumeKeys.count)",
                          p.lastJob ?? "", Format.relative(p.updatedAt))
            }
            print(table.render())
        }
    }
}

/// `ferryctl plan apply|show|delete`.
struct PlanCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "plan",
        abstract: "Apply, show or delete a recovery plan (ordered groups of hosts recovered together).",
        subcommands: [Apply.self, Show.self, Delete.self]
    )

    struct Apply: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Add or replace a recovery plan from a YAML file (see deploy/config/plan.yaml).",
            discussion: "The controller validates it: every problem is printed as FILE:LINE: message. Needs an operator token.")
        @Option(name: [.customShort("f"), .customLong("file")], help: ArgumentHelp("The plan file ('-' for standard input).", valueName: "FILE"))
        var file: String
        @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
        @OptionGroup var output: OutputOptions

        func run() async throws {
            try await CLI.guarded {
                let text: String
                if file == "-" {
                    text = String(decoding: FileHandle.standardInput.readDataToEndOfFile(), as: UTF8.self)
                } else {
                    guard let data = FileManager.default.contents(atPath: file) else {
                        throw FerryError(.notFound, "cannot read \(file)")
                    }
                    text = String(decoding: data, as: UTF8.self)
                }
                let name = file == "-" ? "stdin" : (file as NSString).lastPathComponent
                let plan = try await connection.withClient { try await $0.applyPlan(file: name, text: text) }
                if output.json { try Console.json(plan); return }
                print("applied plan \(Text.printable(plan.plan.name)): \(plan.plan.groups.count) groups (\(plan.plan.groups.map(\.name).joined(separator: " → "))), \(plan.plan.volumeKeys.count) volumes")
            }
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show a recovery plan.")
        @Argument(help: "The plan.") var name: String
        @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
        @OptionGroup var output: OutputOptions

        func run() async throws {
            try await CLI.guarded {
                let p = try await connection.withClient { try await $0.plan(named: name) }
                if output.json { try Console.json(p); return }
                var kv = KeyValueList()
                kv.add("plan", p.plan.name)
                kv.add("description", p.plan.description)
                kv.add("state", p.state.rawValue)
                kv.add("last job", p.lastJob ?? "")
                print(kv.render())
                for (i, g) in p.plan.groups.enumerated() {
                    print("\n\(i + 1). group \(Text.printable(g.name))")
                    for step in g.pre { print("   before: \(PlanFormat.step(step))") }
                    for item in g.items {
                        print("   \(Text.printable(item.host)) → \(Text.printable(item.recoveryHost)): \(item.volumes.joined(separator: ", "))"
                              + (item.startHook.map { "; start \($0)" } ?? "") + (item.stopHook.map { "; stop \($0)" } ?? ""))
                    }
                    for step in g.post { print("   after: \(PlanFormat.step(step))") }
                }
                if let hydration = p.hydration, !hydration.isEmpty {
                    print("\nhydration")
                    var table = TextTable(["VOLUME", "ON", "TARGET", "LOCAL", "FETCHED", "RATE", "ETA", "STATE"])
                    for h in hydration {
                        let eta = h.etaSeconds.map { String(format: "%.0fs", $0) } ?? "-"
                        let state = h.released ? "complete, export released" : h.complete ? "complete" : "hydrating"
                        table.add([h.volume, h.recoveryHost, h.target,
                                   "\(Format.bytes(h.localBytes)) / \(Format.bytes(h.sizeBytes))", Format.bytes(h.fetchedBytes),
                                   "\(Format.bytes(UInt64(max(0, h.bytesPerSecond))))/s", eta, state])
                    }
                    print(table.render())
                }
            }
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Delete a recovery plan (only while protected or migrated).")
        @Argument(help: "The plan.") var name: String
        @OptionGroup(title: "Connection Options") var connection: ConnectionOptions

        func run() async throws {
            try await CLI.guarded {
                try await connection.withClient { try await $0.removePlan(named: name) }
                print("deleted plan \(Text.printable(name))")
            }
        }
    }
}

enum PlanFormat {
    static func step(_ step: RecoveryPlanStep) -> String {
        switch step {
        case .hook(let host, let name, let timeout): return "hook \(name) on \(host) (timeout \(timeout) s)"
        case .gate(let message, let timeout): return "gate \"\(message)\" (timeout \(timeout) s)"
        }
    }
}

/// What every operation command shares: the plan, waiting, connection and output.
struct PlanJobOptions: ParsableArguments {
    @Argument(help: "The recovery plan.") var plan: String
    @Flag(help: "Start the job and print its id; do not wait for it.") var noWait = false
    @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
    @OptionGroup var output: OutputOptions

    /// Starts the job and, unless --no-wait, follows it to its end; exits 1 if it failed.
    func run(_ request: API.JobCreateRequest) async throws {
        try await CLI.guarded {
            let job = try await connection.withClient { try await $0.startJob(plan: plan, request) }
            if noWait {
                if output.json { try Console.json(job) } else { print("started job \(job.id) (\(job.operation.rawValue) of plan \(plan))") }
                return
            }
            try await JobWatcher(connection: connection, json: output.json).watch(job.id)
        }
    }
}

struct DrillCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "drill",
        abstract: "Test failover: recover the plan at a point into writable overlays on the recovery hosts, in the test network.",
        discussion: "Production and replication go on untouched. 'ferryctl drill cleanup PLAN' ends it and prints the drill report.",
        subcommands: [Run.self, Cleanup.self], defaultSubcommand: Run.self)

    struct Run: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "run", abstract: "Start a drill.")
        @Option(help: ArgumentHelp("A point id, or latest, latest-crash, latest-app, latest-group (default latest).", valueName: "POINT"))
        var point: String?
        @Option(help: ArgumentHelp("The newest point at or before this time (ISO 8601 or YYYY-MM-DD HH:MM:SS).", valueName: "TIME"))
        var asOf: String?
        @Flag(help: "Land each volume on the recovery host's own storage (the plan's targets, or a file in its data dir), copied in the background while it is served; the controller's export goes once a volume is complete.")
        var hydrate = false
        @OptionGroup var job: PlanJobOptions

        func run() async throws {
            try await CLI.guarded {
                if point != nil, asOf != nil { throw FerryError(.badRequest, "give --point or --as-of, not both") }
                try await job.run(API.JobCreateRequest(operation: .drill, point: point, asOf: try asOf.map(PointFormat.parse(asOf:)),
                                                       hydrate: hydrate ? true : nil))
            }
        }
    }

    struct Cleanup: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "End a drill: stop hooks, drop the overlays, print the drill report.")
        @OptionGroup var job: PlanJobOptions
        func run() async throws { try await job.run(API.JobCreateRequest(operation: .drillCleanup)) }
    }
}

struct FailoverCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "failover",
        abstract: "Fail a plan over to the recovery site.",
        discussion: """
            --planned: stop hooks on the sources, fence them, drain their change logs and prove every captured write \
            durable (zero data loss), then recover. Otherwise (sources unreachable) --point or --as-of says which \
            point to recover at, e.g. --point latest-group. Either way the sources are fenced: a source that comes \
            back refuses writes until reprotect and failback.
            """)
    @Flag(help: "Planned failover: sources reachable, zero data loss.") var planned = false
    @Option(help: ArgumentHelp("Unplanned: a point id or latest, latest-crash, latest-app, latest-group.", valueName: "POINT"))
    var point: String?
    @Option(help: ArgumentHelp("Unplanned: the newest point at or before this time.", valueName: "TIME")) var asOf: String?
    @Flag(help: "Land on the recovery hosts' own storage (the plan's targets, or files in their data dirs): each volume is copied in the background while it is served, protected there from its first write (its replica starts from the point), and the source groups get twins over the recovered volumes. Targets are checked before anything is fenced.")
    var hydrate = false
    @OptionGroup var job: PlanJobOptions

    func run() async throws {
        try await CLI.guarded {
            if planned, point != nil || asOf != nil { throw FerryError(.badRequest, "a planned failover recovers at the drained state: no --point or --as-of") }
            if point != nil, asOf != nil { throw FerryError(.badRequest, "give --point or --as-of, not both") }
            try await job.run(API.JobCreateRequest(operation: .failover, point: point, asOf: try asOf.map(PointFormat.parse(asOf:)), planned: planned,
                                                   hydrate: hydrate ? true : nil))
        }
    }
}

struct CommitCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "commit", abstract: "Make a failover final.")
    @OptionGroup var job: PlanJobOptions
    func run() async throws { try await job.run(API.JobCreateRequest(operation: .commit)) }
}

struct ReprotectCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reprotect",
        abstract: "After a failover: the recovered hosts become sources, the original hosts sinks (delta resync by block hashes).")
    @OptionGroup var job: PlanJobOptions
    func run() async throws { try await job.run(API.JobCreateRequest(operation: .reprotect)) }
}

struct FailbackCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "failback",
        abstract: "Planned failover home after reprotect: stop the recovered hosts, prove the originals equal, protect them again, start them.",
        discussion: "With --to HOST=NEWHOST (after a failover that landed) an item goes home to another enrolled host: its volumes there are made equal to the recovered ones (a delta when NEWHOST holds an older copy, a full copy otherwise) and NEWHOST takes HOST's place in the plan and its groups.")
    @Option(name: .customLong("to"), help: ArgumentHelp("Fail an item back to another host (repeatable).", valueName: "HOST=NEWHOST"))
    var to: [String] = []
    @OptionGroup var job: PlanJobOptions
    func run() async throws {
        var targets: [String: String] = [:]
        for pair in to {
            let parts = pair.split(separator: "=", omittingEmptySubsequences: false)
            guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty, targets[String(parts[0])] == nil else {
                throw ValidationError("--to takes HOST=NEWHOST, once per host, not '\(pair)'")
            }
            targets[String(parts[0])] = String(parts[1])
        }
        try await job.run(API.JobCreateRequest(operation: .failback, failbackTo: targets.isEmpty ? nil : targets))
    }
}

struct RollbackCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rollback",
        abstract: "Undo a failover that was not reprotected: stop the recovered hosts, drop what they wrote, give the sources their volumes back.")
    @OptionGroup var job: PlanJobOptions
    func run() async throws { try await job.run(API.JobCreateRequest(operation: .rollback)) }
}

struct MigrateCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrate", abstract: "Move a plan to the recovery site for good: planned failover, commit, unprotect the sources.",
        discussion: "With --hydrate the workload ends on the recovery hosts' own storage, protected as their volumes: once each volume is copied, nothing of it is on the controller's data path.")
    @Flag(help: "Land on the recovery hosts' own storage, protected there (see 'ferryctl failover --hydrate').") var hydrate = false
    @OptionGroup var job: PlanJobOptions
    func run() async throws { try await job.run(API.JobCreateRequest(operation: .migrate, hydrate: hydrate ? true : nil)) }
}

struct JobsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "jobs", abstract: "List jobs, newest first.")
    @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
    @OptionGroup var output: OutputOptions

    func run() async throws {
        try await CLI.guarded {
            let jobs = try await connection.withClient { try await $0.jobs() }
            if output.json { try Console.json(jobs); return }
            var table = TextTable("job", "plan", "operation", "state", "steps", "started", "took")
            for j in jobs {
                let done = j.steps.filter { $0.state == .done }.count
                table.add(j.id, j.plan, j.operation.rawValue, j.state.rawValue, "\(done)/\(j.steps.count)", Format.relative(j.createdAt),
                          String(format: "%.1f s", (j.endedAt ?? Date()).timeIntervalSince(j.createdAt)))
            }
            print(table.render())
        }
    }
}

struct JobCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "job", abstract: "Show, watch, resume or cancel a job.", subcommands: [Show.self, Watch.self, Resume.self, Cancel.self])

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show a job's steps, timings and report.")
        @Argument(help: "The job id.") var id: String
        @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
        @OptionGroup var output: OutputOptions
        func run() async throws {
            try await CLI.guarded {
                let job = try await connection.withClient { try await $0.job(id: id) }
                if output.json { try Console.json(job); return }
                print(JobFormat.summary(job))
            }
        }
    }

    struct Watch: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Follow a job to its end, with a progress bar per step.")
        @Argument(help: "The job id.") var id: String
        @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
        @OptionGroup var output: OutputOptions
        func run() async throws {
            try await CLI.guarded { try await JobWatcher(connection: connection, json: output.json).watch(id) }
        }
    }

    struct Resume: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Let a job waiting at a manual gate go on, or retry a failed job from its failed step.")
        @Argument(help: "The job id.") var id: String
        @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
        func run() async throws {
            try await CLI.guarded {
                let job = try await connection.withClient { try await $0.resumeJob(id: id) }
                print("resumed job \(job.id) (\(job.operation.rawValue) of plan \(job.plan))")
            }
        }
    }

    struct Cancel: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Cancel a job; the step in progress is interrupted.")
        @Argument(help: "The job id.") var id: String
        @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
        func run() async throws {
            try await CLI.guarded {
                let job = try await connection.withClient { try await $0.cancelJob(id: id) }
                print("cancelling job \(job.id)")
            }
        }
    }
}

enum JobFormat {
    static func bar(_ progress: Double, width: Int = 20) -> String {
        let filled = Int((max(0, min(1, progress)) * Double(width)).rounded())
        return "[" + String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled) + "]"
    }

    static func line(_ i: Int, _ step: API.JobStep) -> String {
        let progress: Double = step.state == .done ? 1 : (step.progress ?? 0)
        let took = step.seconds.map { String(format: "%7.2f s", $0) } ?? "         "
        var line = String(format: "%2d ", i + 1) + bar(progress) + " " + step.state.rawValue.padding(toLength: 8, withPad: " ", startingAt: 0) + took + "  " + Text.printable(step.name)
        if let detail = step.detail { line += " — " + Text.printable(detail) }
        if let error = step.error { line += " — error: " + Text.printable(error) }
        return line
    }

    static func summary(_ job: API.Job) -> String {
        var out = "job \(job.id): \(job.operation.rawValue) of plan \(job.plan): \(job.state)"
        if let end = job.endedAt { out += String(format: " in %.2f s", end.timeIntervalSince(job.createdAt)) }
        out += "\n" + job.steps.enumerated().map { line($0, $1) }.joined(separator: "\n")
        if let error = job.error { out += "\nerror: " + Text.printable(error) }
        for key in job.report.keys.sorted() { out += "\n\(key): \(Text.printable(job.report[key] ?? ""))" }
        return out
    }
}

/// Follows a job: on a terminal, redraws a progress bar per step; otherwise prints each step
/// as it changes. Exits 1 when the job fails or is cancelled.
struct JobWatcher {
    let connection: ConnectionOptions
    let json: Bool

    func watch(_ id: String) async throws {
        let tty = isatty(STDOUT_FILENO) == 1 && !json
        // One connection for the whole watch, polled.
        let job = try await connection.withClient { client in
            var shown: [API.StepState] = []
            var drawn = 0
            var job = try await client.job(id: id)
            while true {
                if tty {
                    if drawn > 0 { print("\u{1B}[\(drawn)A", terminator: "") }
                    let lines = ["job \(job.id): \(job.operation.rawValue) of plan \(job.plan): \(job.state)"] + job.steps.enumerated().map { JobFormat.line($0, $1) }
                    for l in lines { print("\u{1B}[2K" + l) }
                    drawn = lines.count
                } else if !json {
                    // A line per step each time its state changes (not at every progress tick).
                    for (i, step) in job.steps.enumerated() where step.state != .pending && (i >= shown.count || shown[i] != step.state) {
                        print(JobFormat.line(i, step))
                    }
                    shown = job.steps.map(\.state)
                }
                if job.isFinished { return job }
                try await Task.sleep(for: .milliseconds(tty ? 200 : 250))
                job = try await client.job(id: id)
            }
        }
        if json {
            try Console.json(job)
        } else {
            print("job \(job.id) \(job.state)" + String(format: " in %.2f s", (job.endedAt ?? Date()).timeIntervalSince(job.createdAt)))
            if let error = job.error { print("error: " + Text.printable(error)) }
            for key in job.report.keys.sorted() { print("\(key): \(Text.printable(job.report[key] ?? ""))") }
        }
        if job.state != .succeeded { throw ExitCode(1) }
    }
}
