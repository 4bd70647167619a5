import FerryWire
import Foundation

/// What `ferryctl apply` will do: each declaration compared with the controller's state. Pure:
/// unit-tested without a controller. Nothing is removed that the files do not name.
public struct DeclarativePlan: Sendable {
    public enum Change: Sendable, Equatable {
        case protect(Declaration.Volume)
        case createGroup(Declaration.Group)
        case updateGroup(Declaration.Group, what: [String])
        case applyPlan(Declaration.Plan, new: Bool)
    }

    public var changes: [Change] = []
    /// Declarations the controller already matches, as `kind NAME`.
    public var unchanged: [String] = []

    /// Compares declarations with the current state. Volumes first, then groups, then plans:
    /// the order they are applied in. A change the API cannot make in place is an error at
    /// its FILE:LINE.
    public static func make(_ declarations: [Declaration], volumes: [API.Volume], groups: [API.Group], plans: [API.Plan]) throws -> DeclarativePlan {
        var plan = DeclarativePlan()
        var seen: [String: SourceLocation] = [:]
        func once(_ key: String, _ at: SourceLocation) throws {
            if let first = seen[key] { throw FerryError(.badRequest, "\(at): \(key) is declared twice (first at \(first))") }
            seen[key] = at
        }
        for case .volume(let v) in declarations {
            try once("volume \(v.key)", v.location)
            guard let current = volumes.first(where: { $0.host == v.host && $0.name == v.volume }) else {
                plan.changes.append(.protect(v))
                continue
            }
            var differs: [String] = []
            if current.path != v.path { differs.append("path \(current.path) → \(v.path)") }
            if (current.captureMode ?? "export") != v.capture { differs.append("capture \(current.captureMode ?? "export") → \(v.capture)") }
            if v.capture == "scan", let want = v.scanIntervalSeconds, want != current.scanIntervalSeconds {
                differs.append("scan-interval \(current.scanIntervalSeconds.map(GroupFormat.interval) ?? "-") → \(GroupFormat.interval(want))")
            }
            guard differs.isEmpty else {
                throw FerryError(.badRequest, "\(v.location): volume \(v.key) is protected with other settings (\(differs.joined(separator: "; "))); "
                                 + "a protected volume's path and capture cannot change in place")
            }
            plan.unchanged.append("volume \(v.key)")
        }
        for case .group(let g) in declarations {
            try once("group \(g.name)", g.location)
            guard let current = groups.first(where: { $0.name == g.name }) else {
                plan.changes.append(.createGroup(g))
                continue
            }
            var what: [String] = []
            let added = Set(g.volumes).subtracting(current.volumes), removed = Set(current.volumes).subtracting(g.volumes)
            if !added.isEmpty { what.append("+ " + added.sorted().joined(separator: ", ")) }
            if !removed.isEmpty { what.append("- " + removed.sorted().joined(separator: ", ")) }
            what += policyDifferences(current.policy, g.policy)
            if what.isEmpty { plan.unchanged.append("group \(g.name)") } else { plan.changes.append(.updateGroup(g, what: what)) }
        }
        // Groups that give up members go first: a volume moving between two groups leaves the
        // one before it joins the other (a volume is in one group at most).
        let groupChanges = plan.changes.filter { if case .protect = $0 { false } else { true } }
        let releasing = groupChanges.filter { if case .updateGroup(_, let what) = $0 { what.contains { $0.hasPrefix("- ") } } else { false } }
        plan.changes = plan.changes.filter { if case .protect = $0 { true } else { false } }
            + releasing + groupChanges.filter { c in !releasing.contains(c) }
        for case .plan(let p) in declarations {
            try once("plan \(p.name)", p.location)
            if let current = plans.first(where: { $0.plan.name == p.name }) {
                if normalized(current.source) == normalized(p.text) { plan.unchanged.append("plan \(p.name)") } else { plan.changes.append(.applyPlan(p, new: false)) }
            } else {
                plan.changes.append(.applyPlan(p, new: true))
            }
        }
        return plan
    }

    /// A plan's text without blank lines and trailing spaces: what `get` exported and `apply`
    /// sends differ only in those.
    static func normalized(_ text: String) -> String {
        text.split(separator: "\n").map { $0.replacingOccurrences(of: "\\s+$", with: "", options: .regularExpression) }
            .filter { !$0.isEmpty }.joined(separator: "\n")
    }

    static func policyDifferences(_ a: API.GroupPolicy, _ b: API.GroupPolicy) -> [String] {
        var out: [String] = []
        for (name, path) in DeclarationParser.policyKeys where a[keyPath: path] != b[keyPath: path] {
            out.append("\(name) \(GroupFormat.interval(a[keyPath: path])) → \(GroupFormat.interval(b[keyPath: path]))")
        }
        if a.holdBudgetMilliseconds != b.holdBudgetMilliseconds { out.append("hold-budget \(a.holdBudgetMilliseconds)ms → \(b.holdBudgetMilliseconds)ms") }
        if a.quiesceHook != b.quiesceHook { out.append("quiesce-hook \(a.quiesceHook ?? "-") → \(b.quiesceHook ?? "-")") }
        if a.thawHook != b.thawHook { out.append("thaw-hook \(a.thawHook ?? "-") → \(b.thawHook ?? "-")") }
        return out
    }

    /// One line per change, as `--dry-run` prints them.
    public var lines: [String] {
        changes.map { change in
            switch change {
            case .protect(let v):
                "+ volume \(v.key): protect \(v.path) (capture \(v.capture)\(v.createSizeBytes.map { ", create \($0) bytes" } ?? ""))"
            case .createGroup(let g): "+ group \(g.name): \(g.volumes.joined(separator: ", "))"
            case .updateGroup(let g, let what): "~ group \(g.name): \(what.joined(separator: "; "))"
            case .applyPlan(let p, let new): (new ? "+ plan " : "~ plan ") + p.name + (new ? "" : ": its text changed")
            }
        }
    }
}

/// The controller's state as `apply` files (`ferryctl get … -o yaml`): applying them back changes nothing.
public enum DeclarativeExport {
    public static func yaml(volumes: [API.Volume], groups: [API.Group], plans: [API.Plan]) -> String {
        var docs: [String] = []
        for v in volumes {
            var lines = ["kind: volume", "host: \(quoted(v.host))", "volume: \(quoted(v.name))", "path: \(quoted(v.path))", "capture: \(v.captureMode ?? "export")"]
            if v.captureMode == "scan", let s = v.scanIntervalSeconds { lines.append("scan-interval: \(GroupFormat.interval(s))") }
            docs.append(lines.joined(separator: "\n"))
        }
        for g in groups {
            var lines = ["kind: group", "name: \(quoted(g.name))", "volumes:"] + g.volumes.map { "  - \(quoted($0))" } + ["policy:"]
            for (name, path) in DeclarationParser.policyKeys { lines.append("  \(name): \(GroupFormat.interval(g.policy[keyPath: path]))") }
            lines.append("  hold-budget: \(g.policy.holdBudgetMilliseconds)ms")
            if let h = g.policy.quiesceHook { lines.append("  quiesce-hook: \(quoted(h))") }
            if let h = g.policy.thawHook { lines.append("  thaw-hook: \(quoted(h))") }
            docs.append(lines.joined(separator: "\n"))
        }
        for p in plans {
            docs.append("kind: plan\n" + p.source.trimmingCharacters(in: .newlines))
        }
        return docs.joined(separator: "\n---\n") + "\n"
    }

    /// A YAML scalar in double quotes.
    static func quoted(_ s: String) -> String {
        "\"" + s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"") + "\""
    }
}
