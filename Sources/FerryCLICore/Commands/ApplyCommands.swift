import ArgumentParser
import FerryWire
import Foundation

/// `ferryctl apply -f DIR|FILE`: protection, groups and plans from files.
struct ApplyCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "apply",
        abstract: "Make protection, consistency groups and recovery plans what the files say.",
        discussion: """
            Each file holds YAML documents separated by '---', each with a kind: 'volume' (host, \
            volume, path, capture, scan-interval, create-size), 'group' (name, volumes, policy: \
            crash-interval, app-interval, quiesce-hook, thaw-hook, hook-timeout, hold-budget, \
            keep-all, keep-hourly, keep-daily, rpo-alert) or 'plan' (a recovery plan, as for \
            'ferryctl plan apply'). A directory means its .yaml and .yml files, in name order. \
            Volumes are protected first, then groups made or changed in place (their points \
            stay), then plans; what the files do not name is left alone. Applying the same \
            files twice changes nothing. Errors name FILE:LINE. Needs an operator token.
            """
    )

    @Option(name: .customShort("f"), help: ArgumentHelp("A file or a directory of them.", valueName: "PATH"))
    var file: String
    @Flag(help: "Only print what would change.")
    var dryRun = false
    @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
    @OptionGroup var output: OutputOptions

    func run() async throws {
        try await CLI.guarded {
            let declarations = try DeclarationParser.load(file)
            try await connection.withClient { client in
                let plan = try DeclarativePlan.make(declarations, volumes: try await client.volumes(), groups: try await client.groups(),
                                                    plans: try await client.plans())
                if output.json, dryRun {
                    try Console.json(["changes": plan.lines, "unchanged": plan.unchanged])
                    return
                }
                if plan.changes.isEmpty {
                    if !output.json { print("no changes (\(plan.unchanged.count) declarations match)") } else { try Console.json(["changes": [String](), "unchanged": plan.unchanged]) }
                    return
                }
                for (change, line) in zip(plan.changes, plan.lines) {
                    if !dryRun { try await apply(change, client) }
                    if !output.json { print(line) }
                }
                if output.json { try Console.json(["changes": plan.lines, "unchanged": plan.unchanged]) }
                else if dryRun { print("dry run: nothing changed (\(plan.changes.count) changes, \(plan.unchanged.count) unchanged)") }
                else { print("applied \(plan.changes.count) changes; \(plan.unchanged.count) unchanged") }
            }
        }
    }

    /// One change through the API; an error carries the declaration's FILE:LINE.
    func apply(_ change: DeclarativePlan.Change, _ client: APIClient) async throws {
        do {
            switch change {
            case .protect(let v):
                var request = API.ProtectRequest(host: v.host, volume: v.volume, path: v.path, createSizeBytes: v.createSizeBytes)
                request.captureMode = v.capture
                request.scanIntervalSeconds = v.scanIntervalSeconds
                _ = try await client.protect(request)
            case .createGroup(let g):
                _ = try await client.createGroup(API.GroupCreateRequest(name: g.name, volumes: g.volumes, policy: g.policy))
            case .updateGroup(let g, _):
                _ = try await client.updateGroup(API.GroupCreateRequest(name: g.name, volumes: g.volumes, policy: g.policy))
            case .applyPlan(let p, _):
                // The controller's own errors name the file and line already.
                _ = try await client.applyPlan(file: p.location.file, text: p.text)
                return
            }
        } catch let error as FerryError {
            throw FerryError(error.code, "\(locationOf(change)): \(error.message)")
        }
    }

    private func locationOf(_ change: DeclarativePlan.Change) -> SourceLocation {
        switch change {
        case .protect(let v): v.location
        case .createGroup(let g), .updateGroup(let g, _): g.location
        case .applyPlan(let p, _): p.location
        }
    }
}

/// `ferryctl get KIND -o yaml`: the controller's state as `apply` files.
struct GetCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "get",
        abstract: "Print protection, groups and plans as 'ferryctl apply' files (-o yaml).",
        discussion: "KIND is volumes, groups, plans or all. Applying the output back changes nothing. Needs a viewer token."
    )

    enum Kind: String, ExpressibleByArgument, CaseIterable { case volumes, groups, plans, all }
    enum Format: String, ExpressibleByArgument, CaseIterable { case yaml }

    @Argument(help: "volumes, groups, plans or all")
    var kind: Kind
    @Option(name: .customShort("o"), help: "Output format: yaml.")
    var format: Format = .yaml
    @OptionGroup(title: "Connection Options") var connection: ConnectionOptions

    func run() async throws {
        try await CLI.guarded {
            try await connection.withClient { client in
                let volumes = [.volumes, .all].contains(kind) ? try await client.volumes() : []
                let groups = [.groups, .all].contains(kind) ? try await client.groups() : []
                let plans = [.plans, .all].contains(kind) ? try await client.plans() : []
                print(DeclarativeExport.yaml(volumes: volumes, groups: groups, plans: plans), terminator: "")
            }
        }
    }
}
