import ArgumentParser
import FerryWire
import Foundation

/// `ferryctl protect HOST --volume NAME --path PATH [--create-size SIZE]`.
struct ProtectCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "protect",
        abstract: "Protect a volume of a connected host: the agent exports it over NBD and captures every write.",
        discussion: """
            PATH is an image file or a block device on the host. With --create-size a new sparse \
            image is made if PATH does not exist. The workload then uses the volume through the \
            agent's socket (see 'ferryctl volume show HOST/NAME'), e.g. \
            qemu -drive file=nbd+unix:///NAME?socket=SOCKET. Needs an operator token.
            """
    )

    @Argument(help: "The host, as listed by 'ferryctl hosts'.")
    var host: String
    @Option(help: "Name of the volume (letters, digits, '.', '-', '_').")
    var volume: String
    @Option(help: "Image file or block device on the host (absolute path).")
    var path: String
    @Option(help: ArgumentHelp("Create a sparse image of this size if PATH does not exist (e.g. 10G, 512M).", valueName: "SIZE"))
    var createSize: String?
    @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
    @OptionGroup var output: OutputOptions

    func run() async throws {
        try await CLI.guarded {
            let size = try createSize.map(ByteSize.parse)
            let protected = try await connection.withClient {
                try await $0.protect(API.ProtectRequest(host: host, volume: volume, path: path, createSizeBytes: size))
            }
            if output.json {
                try Console.json(protected)
            } else {
                print("protected \(protected.host)/\(protected.name): \(protected.path), \(Format.bytes(protected.sizeBytes))")
                if let socket = protected.socketPath { print("export: nbd+unix:///\(protected.name)?socket=\(socket)") }
            }
        }
    }
}

/// `ferryctl volumes`.
struct VolumesCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "volumes", abstract: "List protected volumes.")

    @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
    @OptionGroup var output: OutputOptions

    func run() async throws {
        try await CLI.guarded {
            let volumes = try await connection.withClient { try await $0.volumes() }
            if output.json {
                try Console.json(volumes)
            } else if volumes.isEmpty {
                print("no protected volumes; 'ferryctl protect HOST --volume NAME --path PATH' adds one")
            } else {
                var table = TextTable("host", "volume", "state", "size", "path")
                for v in volumes { table.add(v.host, v.name, v.state, Format.bytes(v.sizeBytes), v.path) }
                print(table.render())
            }
        }
    }
}

/// `ferryctl volume show HOST/NAME`.
struct VolumeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "volume", abstract: "Show one protected volume.", subcommands: [Show.self]
    )

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show a protected volume and where its workload reaches it.")

        @Argument(help: "HOST/VOLUME")
        var target: String
        @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
        @OptionGroup var output: OutputOptions

        func run() async throws {
            try await CLI.guarded {
                let parts = target.split(separator: "/", omittingEmptySubsequences: false)
                guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else {
                    throw FerryError(.badRequest, "expected HOST/VOLUME, e.g. db01/data, not '\(target)'")
                }
                let v = try await connection.withClient { try await $0.volume(host: String(parts[0]), name: String(parts[1])) }
                if output.json {
                    try Console.json(v)
                    return
                }
                var fields = KeyValueList()
                fields.add("volume", "\(v.host)/\(v.name)")
                fields.add("state", v.state)
                fields.add("path", v.path)
                fields.add("size", "\(Format.bytes(v.sizeBytes)) (\(v.sizeBytes) bytes)")
                fields.add("export", v.socketPath.map { "nbd+unix:///\(v.name)?socket=\($0)" } ?? "-")
                fields.add("protected", Format.timestamp(v.protectedAt))
                print(fields.render())
            }
        }
    }
}

/// Sizes such as `512M`, `10G`, `1T` or plain bytes.
enum ByteSize {
    static func parse(_ text: String) throws -> UInt64 {
        let t = text.trimmingCharacters(in: .whitespaces).uppercased()
        let units: [(String, UInt64)] = [("TIB", 1 << 40), ("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10),
                                          ("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10), ("B", 1)]
        for (suffix, factor) in units where t.hasSuffix(suffix) {
            if let n = UInt64(t.dropLast(suffix.count)), n > 0, n <= UInt64.max / factor { return n * factor }
        }
        if let n = UInt64(t), n > 0 { return n }
        throw FerryError(.badRequest, "'\(text)' is not a size (examples: 512M, 10G, 1T)")
    }
}
