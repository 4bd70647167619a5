import FerryWire
import Foundation
import Yams

/// Where a declaration (or a key of it) is written: `FILE:LINE` in errors.
public struct SourceLocation: Sendable, Equatable, CustomStringConvertible {
    public var file: String
    public var line: Int
    public var description: String { "\(file):\(line)" }
}

/// One document of a `ferryctl apply` file: what should be protected, grouped or planned.
public enum Declaration: Sendable, Equatable {
    /// `kind: volume`: a protected volume.
    public struct Volume: Sendable, Equatable {
        public var host: String
        public var volume: String
        public var path: String
        public var capture: String = "export"
        public var scanIntervalSeconds: Int?
        public var createSizeBytes: UInt64?
        public var location: SourceLocation
        public var key: String { "\(host)/\(volume)" }
    }

    /// `kind: group`: a consistency group with its whole policy (what is not written has its default).
    public struct Group: Sendable, Equatable {
        public var name: String
        public var volumes: [String]
        public var policy: API.GroupPolicy
        public var location: SourceLocation
    }

    /// `kind: plan`: a recovery plan; the controller parses the rest of the document.
    public struct Plan: Sendable, Equatable {
        public var name: String
        /// The document as the controller gets it: the `kind` line blanked, and blank lines in
        /// front so the controller's FILE:LINE errors point into the real file.
        public var text: String
        public var location: SourceLocation
    }

    case volume(Volume)
    case group(Group)
    case plan(Plan)

    public var location: SourceLocation {
        switch self {
        case .volume(let v): v.location
        case .group(let g): g.location
        case .plan(let p): p.location
        }
    }
}

/// Reads `ferryctl apply` files: YAML documents separated by `---`, each with a `kind`.
public enum DeclarationParser {
    /// Largest file read.
    static let maxBytes = 4 << 20

    static func fail(_ at: SourceLocation, _ message: String) -> FerryError {
        FerryError(.badRequest, "\(at): \(message)")
    }

    /// The declarations of one file's text.
    public static func parse(_ text: String, file: String) throws -> [Declaration] {
        guard text.utf8.count <= maxBytes else { throw FerryError(.badRequest, "\(file): larger than \(maxBytes >> 20) MiB") }
        // Windows line ends: "\r\n" is one Character to Swift and would not split on "\n".
        let text = text.replacingOccurrences(of: "\r\n", with: "\n")
        var found: [Declaration] = []
        // Documents by `---` lines, each with the line it starts on.
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        var start = 0
        var documents: [(first: Int, lines: [Substring])] = []
        func separates(_ line: Substring) -> Bool {
            let t = line.trimmingCharacters(in: .whitespaces)
            return t == "---" || (t.hasPrefix("---") && t.dropFirst(3).trimmingCharacters(in: .whitespaces).hasPrefix("#"))
        }
        for (i, line) in lines.enumerated() where separates(line) {
            documents.append((start, Array(lines[start..<i])))
            start = i + 1
        }
        documents.append((start, Array(lines[start...])))
        for doc in documents {
            let body = doc.lines.joined(separator: "\n")
            guard !body.split(separator: "\n").allSatisfy({ $0.trimmingCharacters(in: .whitespaces).isEmpty || $0.hasPrefix("#") }) else { continue }
            // Blank lines in front: the parser's marks are the file's lines.
            let padded = String(repeating: "\n", count: doc.first) + body
            let node: Node
            do {
                guard let n = try Yams.compose(yaml: padded) else { continue }
                node = n
            } catch let error as YamlError {
                throw FerryError(.badRequest, "\(file):\(Self.line(of: error) ?? doc.first + 1): not valid YAML: \(Self.problem(of: error))")
            }
            let at = SourceLocation(file: file, line: node.mark?.line ?? doc.first + 1)
            guard let mapping = node.mapping else { throw fail(at, "a document is a mapping with a 'kind' (volume, group or plan)") }
            var fields: [String: (value: Node, at: SourceLocation)] = [:]
            for (k, v) in mapping {
                guard let key = k.string else { throw fail(at, "keys are strings") }
                let keyAt = SourceLocation(file: file, line: k.mark?.line ?? at.line)
                guard fields[key] == nil else { throw fail(keyAt, "'\(key)' is written twice") }
                fields[key] = (v, keyAt)
            }
            guard let kind = fields["kind"]?.value.string else { throw fail(at, "missing 'kind' (volume, group or plan)") }
            switch kind {
            case "volume": found.append(.volume(try volume(fields, at)))
            case "group": found.append(.group(try group(fields, at)))
            case "plan":
                guard let name = fields["name"]?.value.string else { throw fail(at, "a plan needs a 'name'") }
                let kindLine = fields["kind"]!.at.line
                var planLines = padded.split(separator: "\n", omittingEmptySubsequences: false)
                planLines[kindLine - 1] = ""
                found.append(.plan(Declaration.Plan(name: name, text: planLines.joined(separator: "\n"), location: at)))
            default:
                throw fail(fields["kind"]!.at, "unknown kind '\(kind.prefix(40))' (volume, group or plan)")
            }
        }
        return found
    }

    /// Every `.yaml`/`.yml` file of a directory (sorted), or the one file.
    public static func load(_ path: String) throws -> [Declaration] {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
            throw FerryError(.notFound, "\(path): no such file or directory")
        }
        var files = [path]
        if isDirectory.boolValue {
            files = try FileManager.default.contentsOfDirectory(atPath: path).sorted()
                .filter { $0.hasSuffix(".yaml") || $0.hasSuffix(".yml") }.map { (path as NSString).appendingPathComponent($0) }
            guard !files.isEmpty else { throw FerryError(.badRequest, "\(path): no .yaml or .yml file in it") }
        }
        var all: [Declaration] = []
        for f in files {
            guard let data = FileManager.default.contents(atPath: f), let text = String(data: data, encoding: .utf8) else {
                throw FerryError(.io, "\(f): cannot be read as UTF-8 text")
            }
            all += try parse(text, file: f)
        }
        return all
    }

    private static func volume(_ f: [String: (value: Node, at: SourceLocation)], _ at: SourceLocation) throws -> Declaration.Volume {
        try known(f, ["kind", "host", "volume", "path", "capture", "scan-interval", "create-size"])
        var v = Declaration.Volume(host: try string(f, "host", at), volume: try string(f, "volume", at), path: try string(f, "path", at), location: at)
        if let c = f["capture"] {
            guard let mode = c.value.string, mode == "export" || mode == "scan" else { throw fail(c.at, "capture is export or scan") }
            v.capture = mode
        }
        if let s = f["scan-interval"] {
            guard v.capture == "scan" else { throw fail(s.at, "scan-interval goes with capture: scan") }
            v.scanIntervalSeconds = try seconds(s)
        }
        if let c = f["create-size"] {
            guard let text = c.value.string, let size = try? ConfigText.byteSize(text), size > 0 else {
                throw fail(c.at, "create-size is a size such as 16M or 10G")
            }
            v.createSizeBytes = size
        }
        return v
    }

    /// Policy keys that are whole-second durations (key paths are not Sendable: computed each time).
    static var policyKeys: [(String, WritableKeyPath<API.GroupPolicy, Int>)] {
        [("crash-interval", \.crashIntervalSeconds), ("app-interval", \.appIntervalSeconds), ("hook-timeout", \.hookTimeoutSeconds),
         ("keep-all", \.keepAllSeconds), ("keep-hourly", \.hourlySeconds), ("keep-daily", \.dailySeconds), ("rpo-alert", \.rpoAlertSeconds)]
    }

    private static func group(_ f: [String: (value: Node, at: SourceLocation)], _ at: SourceLocation) throws -> Declaration.Group {
        try known(f, ["kind", "name", "volumes", "policy"])
        guard let list = f["volumes"], let items = list.value.sequence else { throw fail(at, "a group needs 'volumes', a list of HOST/VOLUME") }
        var volumes: [String] = []
        for item in items {
            guard let v = item.string, v.split(separator: "/").count == 2 else {
                throw fail(SourceLocation(file: list.at.file, line: item.mark?.line ?? list.at.line), "a member is HOST/VOLUME")
            }
            volumes.append(v)
        }
        var policy = API.GroupPolicy()
        if let p = f["policy"] {
            guard let mapping = p.value.mapping else { throw fail(p.at, "policy is a mapping") }
            for (k, v) in mapping {
                let keyAt = SourceLocation(file: at.file, line: k.mark?.line ?? p.at.line)
                let key = k.string ?? ""
                if let (_, path) = policyKeys.first(where: { $0.0 == key }) {
                    policy[keyPath: path] = try seconds((v, keyAt))
                } else if key == "hold-budget" {
                    guard let text = v.string, let d = try? ConfigText.duration(text) else { throw fail(keyAt, "hold-budget is a duration such as 50ms") }
                    policy.holdBudgetMilliseconds = Int(d.components.seconds) * 1000 + Int(d.components.attoseconds / 1_000_000_000_000_000)
                } else if key == "quiesce-hook" || key == "thaw-hook" {
                    guard let name = v.string else { throw fail(keyAt, "\(key) is a hook name") }
                    if key == "quiesce-hook" { policy.quiesceHook = name } else { policy.thawHook = name }
                } else {
                    let all = policyKeys.map(\.0) + ["hold-budget", "quiesce-hook", "thaw-hook"]
                    throw fail(keyAt, "unknown policy key '\(key.prefix(40))' (\(all.joined(separator: ", ")))")
                }
            }
        }
        return Declaration.Group(name: try string(f, "name", at), volumes: volumes, policy: policy, location: at)
    }

    private static func known(_ f: [String: (value: Node, at: SourceLocation)], _ keys: [String]) throws {
        for (key, field) in f where !keys.contains(key) {
            throw fail(field.at, "unknown key '\(key.prefix(40))' (\(keys.dropFirst().joined(separator: ", ")))")
        }
    }

    private static func string(_ f: [String: (value: Node, at: SourceLocation)], _ key: String, _ at: SourceLocation) throws -> String {
        guard let field = f[key] else { throw fail(at, "missing '\(key)'") }
        guard let s = field.value.string, !s.isEmpty else { throw fail(field.at, "'\(key)' is a string") }
        return s
    }

    private static func seconds(_ field: (value: Node, at: SourceLocation)) throws -> Int {
        guard let text = field.value.string, let d = try? ConfigText.duration(text), d >= .zero, d <= .seconds(3650 * 86_400) else {
            throw fail(field.at, "a duration such as 15s, 10m, 1h or 7d (0 for none where that is allowed)")
        }
        return Int(d.components.seconds)
    }

    private static func line(of error: YamlError) -> Int? {
        switch error {
        case .scanner(_, _, let mark, _), .parser(_, _, let mark, _), .composer(_, _, let mark, _): mark.line
        default: nil
        }
    }

    private static func problem(of error: YamlError) -> String {
        switch error {
        case .scanner(_, let problem, _, _), .parser(_, let problem, _, _), .composer(_, let problem, _, _): problem
        default: String(describing: error).split(separator: "\n").first.map(String.init) ?? "syntax error"
        }
    }
}
