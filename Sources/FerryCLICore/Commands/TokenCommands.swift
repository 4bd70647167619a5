import ArgumentParser
import FerryWire
import Foundation

/// `ferryctl token …`: enrollment tokens.
struct TokenCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "token",
        abstract: "Create enrollment tokens for new hosts.",
        subcommands: [Create.self]
    )
}

extension TokenCommand {
    /// `ferryctl token create`.
    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a single-use enrollment token for a new agent.",
            discussion: """
                Prints the token alone on stdout, so TOKEN=$(ferryctl token create) works; \
                its expiry and how to use it go to stderr. The token is shown only now: the \
                controller keeps just its hash. Needs an admin token.
                """
        )

        @Option(help: ArgumentHelp("How long the token stays valid, from 1s to 30d (e.g. 15m, 1h, 7d).", valueName: "DURATION"))
        var ttl: String = "1h"
        @Option(help: ArgumentHelp(
            "Bind the token to this host name: the agent enrolling with it gets this name and no other.",
            valueName: "NAME"))
        var host: String?
        @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
        @OptionGroup var output: OutputOptions

        func run() async throws {
            try await CLI.guarded {
                let seconds = try Self.seconds(ttl: ttl)
                let token = try await connection.withClient { client in
                    try await client.createToken(API.TokenCreateRequest(ttlSeconds: seconds, host: host))
                }
                if output.json {
                    try Console.json(token)
                    return
                }
                guard let secret = token.token, !secret.isEmpty else {
                    throw FerryError(.protocolViolation, "the controller created token \(token.id) but returned no secret")
                }
                print(secret)
                let binding = token.host.map { "for host \(Text.printable($0)) only" } ?? "for any host name"
                Console.note("token \(token.id) is valid \(binding) until \(Format.timestamp(token.expiresAt)) (\(Format.relative(token.expiresAt)))")
                Console.note("enroll with: ferry-agent enroll --controller HOST:PORT --token-file FILE --data-dir DIR (or FERRY_ENROLL_TOKEN=TOKEN)")
            }
        }

        /// Whole seconds for the API; sub-second remainders are dropped.
        static func seconds(ttl: String) throws -> Int {
            let duration: Duration
            do {
                duration = try ConfigText.duration(ttl)
            } catch {
                throw FerryError(.badRequest, "--ttl: '\(ttl)' is not a duration (examples: 15s, 10m, 1h, 30d)")
            }
            let seconds = duration.components.seconds
            guard seconds >= 1 else { throw FerryError(.badRequest, "--ttl must be at least 1s") }
            guard seconds <= 30 * 86_400 else { throw FerryError(.badRequest, "--ttl must be at most 30d") }
            return Int(seconds)
        }
    }
}

/// `ferryctl tokens`.
struct TokensCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tokens",
        abstract: "List enrollment tokens (never their secrets), newest first.",
        discussion: "USED shows when and by which host a token was spent. Needs an admin token."
    )

    @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
    @OptionGroup var output: OutputOptions

    func run() async throws {
        try await CLI.guarded {
            let tokens = try await connection.withClient { try await $0.tokens() }
            if output.json {
                try Console.json(tokens)
            } else if tokens.isEmpty {
                print("no enrollment tokens; 'ferryctl token create' makes one")
            } else {
                print(Self.table(tokens, now: Date()))
            }
        }
    }

    static func table(_ tokens: [API.Token], now: Date) -> String {
        var table = TextTable("id", "host", "created", "expires", "used")
        for t in tokens {
            let used: String
            if let usedAt = t.usedAt {
                used = Format.timestamp(usedAt) + (t.usedBy.map { " by \($0)" } ?? "")
            } else {
                used = t.expiresAt <= now ? "expired" : "unused"
            }
            table.add(t.id, t.host ?? "any", Format.timestamp(t.createdAt), Format.relative(t.expiresAt, now: now), used)
        }
        return table.render()
    }
}
