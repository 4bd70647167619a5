// Recovery plans as YAML. Operators write a plan in this format; `PlanParser.parse` checks it
// against what the controller knows (enrolled hosts, protected volumes, volumes other plans
// already own) and turns it into a `RecoveryPlan`. Every problem is reported, each as
// `FILE:LINE: message`, in one error.
//
//   name: shop                 # required, [a-z0-9][a-z0-9-]{0,62}, unique among plans
//   description: three-tier web shop   # optional (default: empty)
//   groups:                    # required, at least one; recovered one after the other, in order
//     - name: db               # required, same rule as the plan name, unique within the plan
//       pre:                   # optional: steps run in order before the group's items start
//         - hook: check-dr-dns   # a hook NAME defined in that host's agent config (hooks:)
//           host: rec1           # required for hook steps: an enrolled host
//           timeout: 60s         # optional, default 600s
//         - gate: "confirm the storage team is ready"   # manual gate: waits for `ferryctl job resume`
//           timeout: 24h         # optional, default 24h
//       post: []               # optional: same shape as pre, run after every item of the group started
//       items:                 # required, at least one; the items of a group start in parallel
//         - host: db           # required: a protected (enrolled) host; once per plan
//           recovery-host: rec1  # required: an enrolled agent in the secondary site, not `host`
//           volumes: [data, log] # optional (default: every protected volume of the host); each
//                                # a protected volume of `host`, once per plan, not in another plan
//           start-hook: start-db # optional hook names in the recovery host's agent config
//           stop-hook: stop-db
//           timeout: 300s        # optional start/stop hook timeout, default 600s
//           targets:             # optional: where each volume lands on the recovery host when
//             data: /dev/vdb     #   it is hydrated (an absolute path: a file or block device in
//                                #   that host's protect-allow); default a file in its data dir
//           networks:            # optional network mapping handed to the start hook
//             - source: prod     # required, once per item
//               recovery: dr     # required
//               test: drill      # optional, default "test"
//
// Keys are kebab-case; an unknown key is an error (a typo is never silently ignored). A key
// given with no value is an error: leave the key out for its default. Durations are a number
// with a unit (500ms, 15s, 10m, 1h, 1d; a bare number is seconds), a whole number of seconds,
// more than 0 and at most 7 days. Hook names follow the agent's rule: 1-64 letters, digits,
// '-', '_' or '.'. YAML syntax errors (including a key given twice in one mapping) stop the
// parse and are reported alone, with their line.

import FerryWire
import Foundation
import Yams

/// Reads and validates recovery plans written in YAML (format at the top of this file).
public enum PlanParser {
    /// What a plan is checked against.
    public struct Known: Sendable {
        /// Enrolled hosts (protected hosts and recovery agents alike).
        public var hosts: Set<String>
        /// Host name to the names of its protected volumes.
        public var volumes: [String: [String]]
        /// `HOST/VOLUME` to the name of the plan that already recovers it. An entry naming the plan
        /// being parsed (a plan being replaced) is not a conflict.
        public var taken: [String: String]

        public init(hosts: Set<String>, volumes: [String: [String]], taken: [String: String] = [:]) {
            self.hosts = hosts; self.volumes = volumes; self.taken = taken
        }
    }

    /// Default timeout of a hook step and of an item's start and stop hooks.
    public static let defaultHookTimeoutSeconds = 600
    /// Default timeout of a manual gate.
    public static let defaultGateTimeoutSeconds = 86_400
    /// Longest timeout a plan may give.
    public static let maxTimeoutSeconds = 7 * 86_400

    /// Plan and group names: `[a-z0-9][a-z0-9-]{0,62}`.
    public static func isValidName(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        guard let first = bytes.first, bytes.count <= 63 else { return false }
        func alnum(_ b: UInt8) -> Bool { (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(b) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(b) }
        return alnum(first) && bytes.dropFirst().allSatisfy { alnum($0) || $0 == UInt8(ascii: "-") }
    }

    /// Hook names, as the agent accepts them in its config: 1-64 letters, digits, '-', '_', '.'.
    public static func isValidHookName(_ name: String) -> Bool {
        !name.isEmpty && name.count <= 64 && name.allSatisfy { $0.isLetter || $0.isNumber || "-_.".contains($0) }
    }

    /// Parses and validates a plan. `file` names the source in messages (`FILE:LINE: message`).
    /// Throws one `FerryError` with code `.badRequest` whose message lists every problem found,
    /// one per line, in line order.
    public static func parse(_ text: String, file: String, known: Known) throws -> RecoveryPlan {
        let root: Node?
        do {
            root = try Yams.compose(yaml: text)
        } catch let error as YamlError {
            let (line, message) = describe(error, text: text)
            throw FerryError(.badRequest, "\(file):\(line): \(message)")
        } catch {
            throw FerryError(.badRequest, "\(file):1: invalid YAML: \(error)")
        }
        guard let root, root.null == nil else {
            throw FerryError(.badRequest, "\(file):1: the plan is empty")
        }
        var checker = PlanChecker(known: known)
        let plan = checker.plan(root)
        guard checker.problems.isEmpty else {
            let ordered = checker.problems.enumerated().sorted { ($0.element.line, $0.offset) < ($1.element.line, $1.offset) }
            throw FerryError(.badRequest, ordered.map { "\(file):\($0.element.line): \($0.element.message)" }.joined(separator: "\n"))
        }
        return plan
    }

    /// The line and text of a YAML syntax error.
    static func describe(_ error: YamlError, text: String) -> (Int, String) {
        func withContext(_ problem: String, _ context: YamlError.Context?) -> String {
            guard let context, !context.text.isEmpty else { return "invalid YAML: \(problem)" }
            return "invalid YAML: \(problem) (\(context.text) at line \(context.mark.line))"
        }
        switch error {
        case .scanner(let context, let problem, let mark, _), .parser(let context, let problem, let mark, _),
             .composer(let context, let problem, let mark, _):
            return (max(mark.line, 1), withContext(problem, context))
        case .reader(let problem, let offset, _, _):
            let line = offset.map { o in text.utf8.prefix(max(o, 0)).lazy.filter { $0 == UInt8(ascii: "\n") }.count + 1 } ?? 1
            return (line, "invalid YAML: \(problem)")
        case .duplicatedKeysInMapping(let duplicates, let context):
            let key = duplicates.first ?? "?"
            let first = context.mark
            let line = duplicateLine(in: text, key: key, after: first)
            return (line, line == first.line ? "duplicate key '\(key)'" : "duplicate key '\(key)' (first at line \(first.line))")
        default:
            return (1, "invalid YAML: \(error)")
        }
    }

    /// Yams reports a duplicated key at its first occurrence; find the second one: the next line
    /// holding the same key at the same column (block mappings). Falls back to the first.
    static func duplicateLine(in text: String, key: String, after mark: Mark) -> Int {
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        let column = mark.column - 1
        guard mark.line >= 1, column >= 0, mark.line < lines.count else { return max(mark.line, 1) }
        for index in mark.line..<lines.count {
            let scalars = Array(lines[index].unicodeScalars)
            guard scalars.count > column, scalars[..<column].allSatisfy({ $0 == " " || $0 == "-" }) else { continue }
            var rest = String(String.UnicodeScalarView(scalars[column...]))[...]
            guard rest.hasPrefix(key) else { continue }
            rest = rest.dropFirst(key.count).drop { $0 == " " }
            if rest.first == ":" { return index + 1 }
        }
        return mark.line
    }
}

/// Walks the YAML tree, collecting problems and building the plan from what is valid.
private struct PlanChecker {
    let known: PlanParser.Known
    private(set) var problems: [(line: Int, message: String)] = []
    private var planName: String?
    private var groupLines: [String: Int] = [:]
    private var hostLines: [String: Int] = [:]
    private var volumeLines: [String: Int] = [:]

    init(known: PlanParser.Known) { self.known = known }

    /// A mapping's entries by key, with the line of each key.
    struct Fields {
        var line: Int
        var entries: [String: (line: Int, node: Node)] = [:]
        subscript(_ key: String) -> (line: Int, node: Node)? { entries[key] }
    }

    mutating func fail(_ line: Int, _ message: String) { problems.append((line, message)) }

    static func line(_ node: Node) -> Int { max(node.mark?.line ?? 1, 1) }

    static func kind(_ node: Node) -> String {
        switch node {
        case .mapping: return "a mapping"
        case .sequence: return "a list"
        case .alias: return "an alias"
        case .scalar: return node.null != nil ? "empty" : "a string"
        }
    }

    // MARK: Shapes

    /// The entries of a mapping; reports a non-mapping and every unknown key.
    mutating func fields(_ node: Node, what: String, keys: [String]) -> Fields? {
        guard case .mapping(let mapping) = node else {
            fail(Self.line(node), "\(what) must be a mapping (keys: \(keys.joined(separator: ", "))), not \(Self.kind(node))")
            return nil
        }
        var fields = Fields(line: Self.line(node))
        for (key, value) in mapping {
            guard case .scalar(let scalar) = key else {
                fail(Self.line(key), "\(what) has a key that is \(Self.kind(key)); keys are plain names")
                continue
            }
            guard keys.contains(scalar.string) else {
                fail(Self.line(key), "unknown key '\(scalar.string)' in \(what) (known keys: \(keys.joined(separator: ", ")))")
                continue
            }
            fields.entries[scalar.string] = (Self.line(key), value)
        }
        return fields
    }

    /// A string value; reports an empty value or a list or mapping.
    mutating func string(_ entry: (line: Int, node: Node), key: String) -> String? {
        switch entry.node {
        case .scalar(let scalar) where entry.node.null == nil:
            return scalar.string
        case .scalar:
            fail(entry.line, "'\(key)' has no value; give one or leave the key out")
        default:
            fail(entry.line, "'\(key)' must be a string, not \(Self.kind(entry.node))")
        }
        return nil
    }

    mutating func required(_ fields: Fields, _ key: String, what: String) -> (line: Int, node: Node)? {
        guard let entry = fields[key] else {
            fail(fields.line, "\(what) is missing '\(key)'")
            return nil
        }
        return entry
    }

    mutating func requiredString(_ fields: Fields, _ key: String, what: String) -> (line: Int, value: String)? {
        guard let entry = required(fields, key, what: what), let value = string(entry, key: key) else { return nil }
        guard !value.trimmingCharacters(in: .whitespaces).isEmpty else {
            fail(entry.line, "'\(key)' must not be empty")
            return nil
        }
        return (entry.line, value)
    }

    /// The elements of a list; reports a value that is not a list.
    mutating func list(_ entry: (line: Int, node: Node), key: String) -> [Node]? {
        guard case .sequence(let sequence) = entry.node else {
            let hint = entry.node.null != nil ? "has no value; give a list or leave the key out" : "must be a list, not \(Self.kind(entry.node))"
            fail(entry.line, "'\(key)' \(hint)")
            return nil
        }
        return Array(sequence)
    }

    /// A hook name; reports a name the agent would not accept.
    mutating func hookName(_ entry: (line: Int, node: Node), key: String) -> String? {
        guard let name = string(entry, key: key) else { return nil }
        guard PlanParser.isValidHookName(name) else {
            fail(entry.line, "'\(key)': '\(name)' is not a valid hook name (1-64 letters, digits, '-', '_' or '.')")
            return nil
        }
        return name
    }

    /// A timeout in whole seconds, more than 0 and at most 7 days; `defaultSeconds` when absent.
    mutating func timeout(_ fields: Fields, default defaultSeconds: Int) -> Int {
        guard let entry = fields["timeout"], let text = string(entry, key: "timeout") else { return defaultSeconds }
        let duration: Duration
        do {
            duration = try ConfigText.duration(text)
        } catch {
            fail(entry.line, "timeout: \((error as? FerryError)?.message ?? "\(error)")")
            return defaultSeconds
        }
        let c = duration.components
        let milliseconds = c.seconds * 1000 + c.attoseconds / 1_000_000_000_000_000
        if milliseconds <= 0 {
            fail(entry.line, "timeout '\(text)' must be more than 0")
        } else if milliseconds > Int64(PlanParser.maxTimeoutSeconds) * 1000 {
            fail(entry.line, "timeout '\(text)' is longer than 7 days")
        } else if milliseconds % 1000 != 0 {
            fail(entry.line, "timeout '\(text)' must be a whole number of seconds")
        } else {
            return Int(milliseconds / 1000)
        }
        return defaultSeconds
    }

    /// Reports a host that is not enrolled.
    mutating func checkKnown(host: String, line: Int, key: String) -> Bool {
        guard known.hosts.contains(host) else {
            fail(line, "'\(key)': unknown host '\(host)' (not an enrolled host)")
            return false
        }
        return true
    }

    // MARK: Plan

    mutating func plan(_ root: Node) -> RecoveryPlan {
        let what = "the plan"
        guard let f = fields(root, what: what, keys: ["name", "description", "groups"]) else {
            return RecoveryPlan(name: "", description: "", groups: [])
        }
        var name = ""
        if case let (line, value)? = requiredString(f, "name", what: what) {
            name = value
            if PlanParser.isValidName(value) {
                planName = value
            } else {
                fail(line, "plan name '\(value)' is not valid: 1-63 characters, lowercase letters, digits and '-', starting with a letter or digit")
            }
        }
        var description = ""
        if let entry = f["description"], let value = string(entry, key: "description") { description = value }
        var groups: [RecoveryPlanGroup] = []
        if let entry = required(f, "groups", what: what), let nodes = list(entry, key: "groups") {
            if nodes.isEmpty { fail(entry.line, "'groups' is empty: a plan has at least one group") }
            for node in nodes {
                if let group = group(node) { groups.append(group) }
            }
        }
        return RecoveryPlan(name: name, description: description, groups: groups)
    }

    mutating func group(_ node: Node) -> RecoveryPlanGroup? {
        guard let f = fields(node, what: "a group", keys: ["name", "pre", "post", "items"]) else { return nil }
        var what = "a group"
        var name = ""
        if case let (line, value)? = requiredString(f, "name", what: what) {
            name = value
            what = "group '\(value)'"
            if !PlanParser.isValidName(value) {
                fail(line, "group name '\(value)' is not valid: 1-63 characters, lowercase letters, digits and '-', starting with a letter or digit")
            } else if let first = groupLines[value] {
                fail(line, "group name '\(value)' is used twice (first at line \(first))")
            } else {
                groupLines[value] = line
            }
        }
        var pre: [RecoveryPlanStep] = []
        var post: [RecoveryPlanStep] = []
        for key in ["pre", "post"] {
            guard let entry = f[key], let nodes = list(entry, key: key) else { continue }
            let steps = nodes.compactMap { step($0, list: key) }
            if key == "pre" { pre = steps } else { post = steps }
        }
        var items: [RecoveryPlanItem] = []
        if let entry = required(f, "items", what: what), let nodes = list(entry, key: "items") {
            if nodes.isEmpty { fail(entry.line, "'items' of \(what) is empty: a group has at least one item") }
            items = nodes.compactMap { item($0) }
        }
        return RecoveryPlanGroup(name: name, pre: pre, post: post, items: items)
    }

    mutating func step(_ node: Node, list key: String) -> RecoveryPlanStep? {
        let what = "a '\(key)' step"
        guard let f = fields(node, what: what, keys: ["hook", "gate", "host", "timeout"]) else { return nil }
        switch (f["hook"], f["gate"]) {
        case (nil, nil):
            fail(f.line, "\(what) needs either 'hook' (a hook name) or 'gate' (a message for the operator)")
            return nil
        case (.some, .some):
            fail(f.line, "\(what) has both 'hook' and 'gate'; make them two steps")
            return nil
        case (.some(let hookEntry), nil):
            let name = hookName(hookEntry, key: "hook")
            var host: String?
            if let hostEntry = f["host"] {
                if let value = string(hostEntry, key: "host"), checkKnown(host: value, line: hostEntry.line, key: "host") {
                    host = value
                }
            } else {
                fail(f.line, "hook step '\(name ?? "?")' needs 'host' (the agent that runs the hook)")
            }
            let timeout = timeout(f, default: PlanParser.defaultHookTimeoutSeconds)
            guard let name, let host else { return nil }
            return .hook(host: host, name: name, timeoutSeconds: timeout)
        case (nil, .some(let gateEntry)):
            var message = string(gateEntry, key: "gate")
            if let m = message, m.trimmingCharacters(in: .whitespaces).isEmpty {
                fail(gateEntry.line, "'gate' needs a message for the operator")
                message = nil
            }
            if let hostEntry = f["host"] {
                fail(hostEntry.line, "a gate step takes no 'host' (only hook steps run on a host)")
            }
            let timeout = timeout(f, default: PlanParser.defaultGateTimeoutSeconds)
            guard let message else { return nil }
            return .gate(message: message, timeoutSeconds: timeout)
        }
    }

    mutating func item(_ node: Node) -> RecoveryPlanItem? {
        let keys = ["host", "recovery-host", "volumes", "start-hook", "stop-hook", "timeout", "networks", "targets"]
        guard let f = fields(node, what: "an item", keys: keys) else { return nil }
        var host: String?
        var hostKnown = false
        if case let (line, value)? = requiredString(f, "host", what: "an item") {
            host = value
            hostKnown = checkKnown(host: value, line: line, key: "host")
            if let first = hostLines[value] {
                fail(line, "host '\(value)' is already an item at line \(first); a host is recovered once per plan")
            } else {
                hostLines[value] = line
            }
        }
        var recoveryHost: String?
        if case let (line, value)? = requiredString(f, "recovery-host", what: host.map { "the item for host '\($0)'" } ?? "an item") {
            recoveryHost = value
            _ = checkKnown(host: value, line: line, key: "recovery-host")
            if value == host {
                fail(line, "'recovery-host' must differ from 'host' ('\(value)'): recover to an agent in the secondary site")
            }
        }

        // Volumes: as listed (each checked), or every protected volume of the host.
        var volumes: [(name: String, line: Int)] = []
        if let entry = f["volumes"] {
            if let nodes = list(entry, key: "volumes") {
                if nodes.isEmpty {
                    fail(entry.line, "'volumes' is empty: list at least one volume, or leave the key out for every protected volume of the host")
                }
                for node in nodes {
                    let line = Self.line(node)
                    guard let name = string((line, node), key: "volumes") else { continue }
                    guard VolumeName.isValid(name) else {
                        fail(line, "'\(name)' is not a valid volume name (1-63 letters, digits, '.', '-', '_')")
                        continue
                    }
                    if let host, hostKnown {
                        let protected = known.volumes[host] ?? []
                        if !protected.contains(name) {
                            let list = protected.isEmpty ? "it has none" : "protected: \(protected.joined(separator: ", "))"
                            fail(line, "'\(name)' is not a protected volume of host '\(host)' (\(list))")
                            continue
                        }
                    }
                    volumes.append((name, line))
                }
            }
        } else if let host, hostKnown {
            let protected = known.volumes[host] ?? []
            if protected.isEmpty {
                fail(f["host"]?.line ?? f.line, "host '\(host)' has no protected volumes; protect its volumes first")
            }
            volumes = protected.map { ($0, f["host"]?.line ?? f.line) }
        }
        if let host {
            for (name, line) in volumes {
                let key = "\(host)/\(name)"
                if let first = volumeLines[key] {
                    fail(line, "volume \(key) is listed twice in the plan (first at line \(first))")
                } else {
                    volumeLines[key] = line
                }
                if let other = known.taken[key], other != planName {
                    fail(line, "\(key) already belongs to plan '\(other)'")
                }
            }
        }

        let startHook = f["start-hook"].flatMap { hookName($0, key: "start-hook") }
        let stopHook = f["stop-hook"].flatMap { hookName($0, key: "stop-hook") }
        let timeout = timeout(f, default: PlanParser.defaultHookTimeoutSeconds)

        var networks: [NetworkMapping] = []
        if let entry = f["networks"], let nodes = list(entry, key: "networks") {
            var sources: [String: Int] = [:]
            for node in nodes {
                guard let n = fields(node, what: "a network mapping", keys: ["source", "recovery", "test"]) else { continue }
                let source = requiredString(n, "source", what: "a network mapping")
                let recovery = requiredString(n, "recovery", what: "a network mapping")
                var test = "test"
                if let testEntry = n["test"] {
                    if let value = string(testEntry, key: "test"), !value.trimmingCharacters(in: .whitespaces).isEmpty {
                        test = value
                    } else if testEntry.node.null == nil, case .scalar = testEntry.node {
                        fail(testEntry.line, "'test' must not be empty")
                    }
                }
                if let source {
                    if let first = sources[source.value] {
                        fail(source.line, "network '\(source.value)' is mapped twice in this item (first at line \(first))")
                    } else {
                        sources[source.value] = source.line
                    }
                }
                if let source, let recovery {
                    networks.append(NetworkMapping(source: source.value, recovery: recovery.value, test: test))
                }
            }
        }
        var targets: [String: String] = [:]
        if let entry = f["targets"] {
            if case .mapping(let mapping) = entry.node {
                var paths: [String: Int] = [:]
                for (key, value) in mapping {
                    let line = Self.line(key)
                    guard let volume = key.string, volumes.contains(where: { $0.name == volume }) else {
                        fail(line, "'targets' names '\(key.string ?? "?")', which is not a volume this item recovers (\(volumes.map(\.name).joined(separator: ", ")))")
                        continue
                    }
                    guard let path = string((line, value), key: "targets.\(volume)") else { continue }
                    guard path.hasPrefix("/"), path.utf8.count <= 4096, !path.contains("\0"), !path.split(separator: "/").contains("..") else {
                        fail(line, "target '\(path)' of \(volume) must be an absolute path without '..', at most 4096 bytes")
                        continue
                    }
                    if let first = paths[path] {
                        fail(line, "target '\(path)' is given twice in this item (first at line \(first))")
                        continue
                    }
                    paths[path] = line
                    targets[volume] = path
                }
            } else {
                fail(entry.line, "'targets' must be a mapping of volume names to paths, not \(Self.kind(entry.node))")
            }
        }
        guard let host, let recoveryHost else { return nil }
        return RecoveryPlanItem(host: host, recoveryHost: recoveryHost, volumes: volumes.map(\.name), startHook: startHook,
                                stopHook: stopHook, timeoutSeconds: timeout, networks: networks, targets: targets.isEmpty ? nil : targets)
    }
}
