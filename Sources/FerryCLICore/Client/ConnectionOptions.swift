import ArgumentParser
import FerryWire
import Foundation

/// `--api`, `--token` and `--ca`: where the controller's operator API is and how to reach it
/// safely. Every subcommand takes them; each falls back to its `FERRY_*` environment variable,
/// which the controller's `ferryctl.env` exports.
public struct ConnectionOptions: ParsableArguments {
    @Option(name: .customLong("api"), help: ArgumentHelp(
        "Operator API of the controller, e.g. https://127.0.0.1:7444. (default: $FERRY_API)", valueName: "URL"))
    var api: String?

    @Option(help: ArgumentHelp(
        "API bearer token. Prefer $FERRY_TOKEN: a flag is visible to other users in the process list. (default: $FERRY_TOKEN)",
        valueName: "TOKEN"))
    var token: String?

    @Option(help: ArgumentHelp(
        "Cluster CA certificate (PEM); the API's certificate must chain to it and nothing else is trusted. (default: $FERRY_CA)",
        valueName: "PATH"))
    var ca: String?

    public init() {}

    /// The settings from the flags, else the environment. Fails with one line naming what is
    /// missing and how to supply it.
    /// - Parameter requireToken: false for the unauthenticated `/healthz`.
    public func settings(requireToken: Bool = true,
                         environment: [String: String] = ProcessInfo.processInfo.environment) throws -> APIClient.Settings {
        func pick(_ flag: String?, _ variable: String) -> String? {
            // An exported but empty variable counts as unset, so `FERRY_TOKEN= ferryctl …` fails clearly.
            for value in [flag, environment[variable]] {
                if let value, !value.trimmingCharacters(in: .whitespaces).isEmpty { return value.trimmingCharacters(in: .whitespaces) }
            }
            return nil
        }
        let api = pick(api, "FERRY_API")
        let token = pick(token, "FERRY_TOKEN")
        let ca = pick(ca, "FERRY_CA")

        var missing: [(flag: String, variable: String)] = []
        if api == nil { missing.append(("--api", "FERRY_API")) }
        if token == nil && requireToken { missing.append(("--token", "FERRY_TOKEN")) }
        if ca == nil { missing.append(("--ca", "FERRY_CA")) }
        if !missing.isEmpty {
            throw FerryError(.badConfiguration,
                             "\(missing.map(\.variable).joined(separator: ", ")) not set; "
                             + "source ferryctl.env from the controller's data dir or pass \(missing.map(\.flag).joined(separator: ", "))")
        }
        guard let api, let ca else { throw FerryError(.internalError, "unreachable: settings checked above") }
        return APIClient.Settings(baseURL: try Self.normalize(api: api), token: token, caPath: ca)
    }

    /// `https://host:port` without a trailing slash; a bare `host:port` gets `https://`.
    /// Plain HTTP is refused: the bearer token must never travel in the clear.
    static func normalize(api text: String) throws -> String {
        var text = text
        if !text.contains("://") { text = "https://" + text }
        guard let url = URL(string: text), let scheme = url.scheme?.lowercased(), let host = url.host, !host.isEmpty else {
            throw FerryError(.badConfiguration, "'\(text)' is not a URL; expected e.g. https://127.0.0.1:7444")
        }
        guard scheme == "https" else {
            throw FerryError(.badConfiguration, "the API is HTTPS only; '\(text)' uses \(scheme)")
        }
        guard url.query == nil, url.fragment == nil else {
            throw FerryError(.badConfiguration, "'\(text)' must not have a query or fragment")
        }
        while text.hasSuffix("/") { text.removeLast() }
        return text
    }
}

/// `--json` for commands whose output is data.
public struct OutputOptions: ParsableArguments {
    @Flag(help: "Print JSON (pretty-printed, sorted keys, ISO 8601 dates) instead of text, for scripts.")
    var json = false

    public init() {}
}
