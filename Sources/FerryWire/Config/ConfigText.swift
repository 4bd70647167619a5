import Foundation
import Yams

/// A configuration file's top-level mapping; its coding keys are the only keys it accepts.
public protocol ConfigFile: Decodable {
    associatedtype CodingKeys: CodingKey & CaseIterable
}

/// Parsing helpers shared by the daemons' configuration files and flags.
public enum ConfigText {
    /// Loads a YAML configuration file into `T`. Unknown keys are an error, so a typo is not
    /// silently ignored.
    public static func load<T: ConfigFile>(_ type: T.Type, path: String) throws -> T {
        guard let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8) else {
            throw FerryError(.badConfiguration, "cannot read configuration file \(path)")
        }
        do {
            // The decoder ignores keys it was not asked for: check them first.
            let document = try Yams.compose(yaml: text)
            if case .mapping(let mapping)? = document {
                let known = T.CodingKeys.allCases.map(\.stringValue)
                for key in mapping.keys {
                    let name = key.string ?? "\(key)"
                    guard known.contains(name) else {
                        throw FerryError(.badConfiguration, "\(path): unknown key '\(name)' (known keys: \(known.joined(separator: ", ")))")
                    }
                }
            }
            // A file of comments only (or a bare `---`) is an empty document: all defaults.
            return try YAMLDecoder().decode(T.self, from: document == nil || document?.null != nil ? "{}" : text)
        } catch let error as FerryError {
            throw error
        } catch let error as DecodingError {
            throw FerryError(.badConfiguration, "\(path): \(describe(error))")
        } catch {
            throw FerryError(.badConfiguration, "\(path): \(error)")
        }
    }

    static func describe(_ error: DecodingError) -> String {
        func path(_ c: [any CodingKey]) -> String { c.map(\.stringValue).joined(separator: ".") }
        switch error {
        case .keyNotFound(let key, let ctx): return "missing key '\(path(ctx.codingPath + [key]))'"
        case .typeMismatch(_, let ctx), .valueNotFound(_, let ctx), .dataCorrupted(let ctx):
            return "'\(path(ctx.codingPath))': \(ctx.debugDescription)"
        @unknown default: return "\(error)"
        }
    }

    /// Parses a duration: a number of seconds, or a number with unit `ms`, `s`, `m`, `h` or `d`
    /// (e.g. `500ms`, `15s`, `1h`, `30d`).
    public static func duration(_ text: String) throws -> Duration {
        let t = text.trimmingCharacters(in: .whitespaces)
        let units: [(String, Double)] = [("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600), ("d", 86_400)]
        for (unit, factor) in units where t.hasSuffix(unit) {
            let number = t.dropLast(unit.count)
            // "ms" ends in "s": make sure "5ms" is not read as "5m" + "s".
            if unit == "s", number.hasSuffix("m") { continue }
            if let v = Double(number), let d = milliseconds(v * factor) { return d }
        }
        if let v = Double(t), let d = milliseconds(v) { return d }
        throw FerryError(.badConfiguration, "'\(text)' is not a duration (examples: 500ms, 15s, 10m, 1h, 30d)")
    }

    /// Up to 100 years; anything longer (or negative, or not a number) is a typo.
    static func milliseconds(_ seconds: Double) -> Duration? {
        guard seconds.isFinite, seconds >= 0, seconds <= 100 * 365 * 86_400 else { return nil }
        return .milliseconds(Int64((seconds * 1000).rounded()))
    }

    /// Splits `HOST:PORT` (IPv6 as `[::1]:PORT`).
    public static func hostPort(_ text: String, defaultPort: Int? = nil) throws -> (host: String, port: Int) {
        var host = text
        var portText: Substring?
        if text.hasPrefix("["), let close = text.firstIndex(of: "]") {
            host = String(text[text.index(after: text.startIndex)..<close])
            let rest = text[text.index(after: close)...]
            if rest.hasPrefix(":") { portText = rest.dropFirst() } else if !rest.isEmpty { portText = "x" }
        } else if let colon = text.lastIndex(of: ":"), text.filter({ $0 == ":" }).count == 1 {
            host = String(text[..<colon])
            portText = text[text.index(after: colon)...]
        }
        let port: Int
        if let portText {
            guard let p = Int(portText), (0...65535).contains(p) else {
                throw FerryError(.badConfiguration, "'\(text)' is not HOST:PORT")
            }
            port = p
        } else if let defaultPort {
            port = defaultPort
        } else {
            throw FerryError(.badConfiguration, "'\(text)' has no port; expected HOST:PORT")
        }
        guard !host.isEmpty else { throw FerryError(.badConfiguration, "'\(text)' has no host; expected HOST:PORT") }
        return (host, port)
    }
}

extension Duration {
    public var seconds: Double {
        let c = components
        return Double(c.seconds) + Double(c.attoseconds) / 1e18
    }
}

extension ConfigText {
    /// A size such as `64M`, `1G`, `512K` or plain bytes.
    public static func byteSize(_ text: String) throws -> UInt64 {
        let t = text.trimmingCharacters(in: .whitespaces).uppercased()
        let units: [(String, UInt64)] = [("TIB", 1 << 40), ("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10),
                                          ("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10), ("B", 1)]
        for (suffix, factor) in units where t.hasSuffix(suffix) {
            if let n = UInt64(t.dropLast(suffix.count)), n <= UInt64.max / factor { return n * factor }
        }
        if let n = UInt64(t) { return n }
        throw FerryError(.badConfiguration, "'\(text)' is not a size (examples: 64M, 1G)")
    }
}
