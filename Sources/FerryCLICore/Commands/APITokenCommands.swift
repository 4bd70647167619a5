import ArgumentParser
import FerryWire
import Foundation

/// `ferryctl api-token …`: bearer tokens for operators and scripts.
struct APITokenCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "api-token",
        abstract: "Create or remove operator API tokens (needs an admin token).",
        subcommands: [Create.self, Rotate.self, Remove.self]
    )
}

extension APITokenCommand {
    /// `ferryctl api-token create NAME --role ROLE`.
    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a named API token with a role.",
            discussion: """
                Roles nest: viewer reads everything; operator also runs operations (inventory \
                refresh, and later drills and failovers); admin also manages hosts, enrollment \
                tokens and API tokens. Prints the secret alone on stdout; it is shown only now.
                """
        )

        @Argument(help: "Name of the token, e.g. the person or script that uses it.")
        var name: String
        @Option(help: "viewer, operator or admin.")
        var role: String = "viewer"
        @Option(help: ArgumentHelp("How long it works, e.g. 30d, 12h (default 90d, at most 2 years).", valueName: "DURATION"))
        var expiresIn: String?
        @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
        @OptionGroup var output: OutputOptions

        func run() async throws {
            try await CLI.guarded {
                let lifetime = try expiresIn.map(APITokenCommand.seconds)
                let token = try await connection.withClient { try await $0.createAPIToken(.init(name: name, role: role, expiresInSeconds: lifetime)) }
                try APITokenCommand.show(token, output: output, note: "has role \(token.role); use it as FERRY_TOKEN or --token")
            }
        }
    }

    /// `ferryctl api-token rotate NAME`.
    struct Rotate: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Give a token a new secret; the old one stops working at once.",
            discussion: """
                Prints the new secret alone on stdout; it is shown only now. Rotating the bootstrap \
                'admin' token also rewrites admin.token and ferryctl.env in the controller's data dir.
                """
        )

        @Argument(help: "Name of the token.")
        var name: String
        @Option(help: ArgumentHelp("How long the new secret works (default: as long as the old one was given).", valueName: "DURATION"))
        var expiresIn: String?
        @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
        @OptionGroup var output: OutputOptions

        func run() async throws {
            try await CLI.guarded {
                let lifetime = try expiresIn.map(APITokenCommand.seconds)
                let token = try await connection.withClient { try await $0.rotateAPIToken(named: name, .init(expiresInSeconds: lifetime)) }
                try APITokenCommand.show(token, output: output, note: "rotated; it expires " + (token.expiresAt.map(Format.timestamp) ?? "never"))
            }
        }
    }

    /// `ferryctl api-token remove NAME`.
    struct Remove: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Remove an API token; it stops working at once.")

        @Argument(help: "Name of the token.")
        var name: String
        @OptionGroup(title: "Connection Options") var connection: ConnectionOptions

        func run() async throws {
            try await CLI.guarded {
                try await connection.withClient { try await $0.removeAPIToken(named: name) }
                print("removed API token \(Text.printable(name))")
            }
        }
    }
}

/// `ferryctl api-tokens`.
struct APITokensCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "api-tokens",
        abstract: "List operator API tokens (names and roles, never secrets)."
    )

    @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
    @OptionGroup var output: OutputOptions

    func run() async throws {
        try await CLI.guarded {
            let tokens = try await connection.withClient { try await $0.apiTokens() }
            if output.json {
                try Console.json(tokens)
                return
            }
            var table = TextTable("name", "role", "created", "expires")
            for t in tokens { table.add(t.name, t.role, Format.timestamp(t.createdAt), t.expiresAt.map(Format.timestamp) ?? "never") }
            print(table.render())
        }
    }
}

extension APITokenCommand {
    /// A new secret: JSON, or the secret alone on stdout and a note on stderr.
    static func show(_ token: API.APIToken, output: OutputOptions, note: String) throws {
        if output.json {
            try Console.json(token)
            return
        }
        guard let secret = token.token, !secret.isEmpty else {
            throw FerryError(.protocolViolation, "the controller answered for API token \(token.name) without its secret")
        }
        print(secret)
        Console.note("API token '\(Text.printable(token.name))' \(note)")
    }

    /// A duration flag in whole seconds.
    static func seconds(_ text: String) throws -> Int64 {
        let duration = try ConfigText.duration(text)
        return duration.components.seconds
    }
}
