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
    @Option(help: ArgumentHelp("How writes are captured: export (through the agent's NBD export, every write in order) or scan (the fallback for a device the workload uses directly: compared with the replica every --scan-interval).", valueName: "MODE"))
    var capture: String = "export"
    @Option(help: ArgumentHelp("For --capture scan: time between comparisons, the recovery point objective (e.g. 30s, 5m).", valueName: "DURATION"))
    var scanInterval: String?
    @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
    @OptionGroup var output: OutputOptions

    func run() async throws {
        try await CLI.guarded {
            let size = try createSize.map(ByteSize.parse)
            var request = API.ProtectRequest(host: host, volume: volume, path: path, createSizeBytes: size)
            request.captureMode = capture
            if let scanInterval {
                let d = try ConfigText.duration(scanInterval)
                request.scanIntervalSeconds = Int(d.components.seconds)
            }
            let protected = try await connection.withClient { [request] in try await $0.protect(request) }
            if output.json {
                try Console.json(protected)
            } else {
                print("protected \(protected.host)/\(protected.name): \(protected.path), \(Format.bytes(protected.sizeBytes))")
                if protected.captureMode == "scan" {
                    print("capture: scan every \(protected.scanIntervalSeconds ?? 30)s (the workload keeps using \(protected.path) directly)")
                } else if let socket = protected.socketPath {
                    print("export: nbd+unix:///\(protected.name)?socket=\(socket)")
                }
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
                var table = TextTable("host", "volume", "state", "size", "synced", "lag", "lag bytes", "throughput", "sink lag")
                for v in volumes {
                    table.add(v.host, v.name, v.replicaState?.rawValue ?? v.state.rawValue, Format.bytes(v.sizeBytes),
                              v.syncedPercent.map { String(format: "%.1f%%", $0) } ?? "-",
                              v.lagSeconds.map { String(format: "%.1fs", $0) } ?? "-",
                              v.lagBytes.map(Format.bytes) ?? "-",
                              v.throughputBytesPerSecond.map { Format.bytes(UInt64($0)) + "/s" } ?? "-",
                              v.sink.map(Self.sinkLag) ?? "-")
                }
                print(table.render())
            }
        }
    }
}

extension VolumesCommand {
    /// A sink's lag: seconds since it held everything, and the records it has still to apply.
    static func sinkLag(_ s: API.SinkProgress) -> String {
        String(format: "%.1fs", s.lagSeconds) + ", " + (s.behindRecords.map { "\($0) records" } ?? "earlier epoch")
    }
}

/// `ferryctl volume show HOST/NAME`.
struct VolumeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "volume", abstract: "Show, resync, resize or export one protected volume.",
        subcommands: [Show.self, Resync.self, Resize.self, Export.self]
    )

    static func parse(_ target: String) throws -> (host: String, name: String) {
        let parts = target.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else {
            throw FerryError(.badRequest, "expected HOST/VOLUME, e.g. db01/data, not '\(target)'")
        }
        return (String(parts[0]), String(parts[1]))
    }

    struct Resync: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Compare the whole volume with its replica by block hashes and send only what differs.",
            discussion: "The agent must be online. Progress shows in 'ferryctl volumes' and 'ferryctl volume show'. Needs an operator token."
        )

        @Argument(help: "HOST/VOLUME")
        var target: String
        @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
        @OptionGroup var output: OutputOptions

        func run() async throws {
            try await CLI.guarded {
                let (host, name) = try VolumeCommand.parse(target)
                let v = try await connection.withClient { try await $0.resync(host: host, name: name) }
                if output.json { try Console.json(v) } else { print("resync of \(v.host)/\(v.name) started (\(Format.bytes(v.sizeBytes)) to compare)") }
            }
        }
    }

    struct Resize: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Grow a protected volume online, without a resync.",
            discussion: """
                The agent grows the image file (sparse) to SIZE; a block device, or a volume \
                captured by scanning, must already be that size (grow it first, e.g. lvextend). \
                The new size is recorded in the replication stream: the replica and new points \
                follow, older points keep their own size. New connections to the export see the \
                new size; a connected guest or nbd-client keeps the old one until it reconnects. \
                Shrinking is refused. The agent must be online. Needs an operator token.
                """
        )

        @Argument(help: "HOST/VOLUME")
        var target: String
        @Option(help: ArgumentHelp("The new size (e.g. 20G, 512M): a whole number of 512-byte sectors.", valueName: "SIZE"))
        var size: String
        @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
        @OptionGroup var output: OutputOptions

        func run() async throws {
            try await CLI.guarded {
                let (host, name) = try VolumeCommand.parse(target)
                let bytes = try ByteSize.parse(size)
                let r = try await connection.withClient { try await $0.resize(host: host, name: name, sizeBytes: bytes) }
                if output.json {
                    try Console.json(r)
                } else if !r.changed {
                    print("\(r.host)/\(r.name) is \(Format.bytes(r.sizeBytes)) already; nothing changed")
                } else {
                    print("\(r.host)/\(r.name) grown from \(Format.bytes(r.previousBytes)) to \(Format.bytes(r.sizeBytes))")
                    if r.replicaBytes < r.sizeBytes {
                        print("the replica is still \(Format.bytes(r.replicaBytes)): it follows once the agent's stream delivers the resize")
                    }
                }
            }
        }
    }

    struct Export: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Serve a recovery point of a volume over NBD, or download its image.",
            discussion: """
                Without --out the controller serves the point as an NBD export and the URI is \
                printed alone on stdout, e.g. for qemu-img or qemu -drive file=URI; remove it \
                with 'ferryctl export remove ID'. With --out the whole raw image is streamed into \
                FILE (written sparsely if it is a regular file; a block device gets every byte). \
                Choose the point with --point or --as-of. Needs an operator token.
                """
        )

        @Argument(help: "HOST/VOLUME")
        var target: String
        @Option(help: ArgumentHelp("Which point: \(PointFormat.choices).", valueName: "POINT"))
        var point: String?
        @Option(help: ArgumentHelp("The newest point at or before this ISO 8601 time, e.g. 2026-11-24T10:42:07Z.", valueName: "TIME"))
        var asOf: String?
        @Flag(help: "Export writable through a copy-on-write overlay (the point itself never changes).")
        var writable = false
        @Option(name: .customLong("for"), help: ArgumentHelp(
            "A host that may open the export over NBD+TLS with its own certificate (repeatable). Without it only the controller's local socket serves it.",
            valueName: "HOST"))
        var forHosts: [String] = []
        @Option(help: ArgumentHelp("Download the raw image into this file (or block device) instead of exporting it.", valueName: "FILE"))
        var out: String?
        @Flag(help: "With --out: overwrite FILE if it exists.")
        var force = false
        @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
        @OptionGroup var output: OutputOptions

        func run() async throws {
            try await CLI.guarded {
                let (host, name) = try VolumeCommand.parse(target)
                if point != nil, asOf != nil { throw FerryError(.badRequest, "give --point or --as-of, not both") }
                let when = try asOf.map(PointFormat.parse(asOf:))
                let choice = when == nil ? (point ?? "latest") : nil
                if let out {
                    if writable || !forHosts.isEmpty { throw FerryError(.badRequest, "--writable and --for apply to an NBD export, not to --out") }
                    let started = ContinuousClock.now
                    let result = try await connection.withClient { [choice] client in
                        try await client.downloadImage(host: host, name: name, point: choice, asOf: when, to: out, overwrite: force)
                    }
                    let seconds = (ContinuousClock.now - started).seconds
                    if output.json {
                        try Console.json(ImageResult(volume: "\(host)/\(name)", file: out, point: result.point, bytes: result.bytes,
                                                     writtenBytes: result.writtenBytes, seconds: seconds))
                    } else {
                        var line = "wrote \(out): \(Format.bytes(result.bytes)) (\(result.bytes) bytes, \(Format.bytes(result.writtenBytes)) non-zero)"
                        line += " of \(host)/\(name) at point \(result.point.map(Text.printable) ?? choice ?? asOf ?? "-")"
                        line += String(format: " in %.1fs", seconds)
                        if seconds > 0 { line += " (\(Format.bytes(UInt64(Double(result.bytes) / seconds)))/s)" }
                        print(line)
                    }
                    return
                }
                let request = API.ExportCreateRequest(point: choice, asOf: when, writable: writable ? true : nil,
                                                     hosts: forHosts.isEmpty ? nil : forHosts)
                let export = try await connection.withClient { try await $0.createExport(host: host, name: name, request) }
                if output.json {
                    try Console.json(export)
                    return
                }
                print(export.uri)
                Console.note("export \(Text.printable(export.id)): \(Text.printable(export.volume)) at point \(Text.printable(export.point)), "
                             + "\(export.writable ? "writable (copy-on-write)" : "read-only"), opened in "
                             + String(format: "%.0f ms", export.openMilliseconds) + "; over NBD+TLS for "
                             + (export.hosts.isEmpty ? "no host (local socket only)" : Text.printable(export.hosts.joined(separator: ", "))))
                Console.note("remove it with: ferryctl export remove \(Text.printable(export.id))")
            }
        }

        /// `--json` answer of a download.
        struct ImageResult: Encodable {
            var volume: String
            var file: String
            var point: String?
            var bytes: UInt64
            var writtenBytes: UInt64
            var seconds: Double
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show a protected volume and where its workload reaches it.")

        @Argument(help: "HOST/VOLUME")
        var target: String
        @OptionGroup(title: "Connection Options") var connection: ConnectionOptions
        @OptionGroup var output: OutputOptions

        func run() async throws {
            try await CLI.guarded {
                let (host, name) = try VolumeCommand.parse(target)
                let v = try await connection.withClient { try await $0.volume(host: host, name: name) }
                if output.json {
                    try Console.json(v)
                    return
                }
                var fields = KeyValueList()
                fields.add("volume", "\(v.host)/\(v.name)")
                fields.add("state", v.state.rawValue)
                fields.add("path", v.path)
                fields.add("size", "\(Format.bytes(v.sizeBytes)) (\(v.sizeBytes) bytes)")
                if v.captureMode == "scan" {
                    fields.add("capture", "scan every \(v.scanIntervalSeconds ?? 30)s")
                } else {
                    fields.add("export", v.socketPath.map { "nbd+unix:///\(v.name)?socket=\($0)" } ?? "-")
                }
                if let tcp = v.tcpAddress { fields.add("tcp export", "nbd://\(tcp)/\(v.name)") }
                fields.add("protected", Format.timestamp(v.protectedAt))
                fields.add("replica", v.replicaState?.rawValue ?? "-")
                fields.add("synced", v.syncedPercent.map { String(format: "%.1f%%", $0) } ?? "-")
                fields.add("lag", v.lagSeconds.map { String(format: "%.2fs, ", $0) + Format.bytes(v.lagBytes ?? 0) } ?? "-")
                fields.add("throughput", v.throughputBytesPerSecond.map { Format.bytes(UInt64($0)) + "/s" } ?? "-")
                fields.add("durable sequence", v.durableSequence.map(String.init) ?? "-")
                fields.add("marked extents", v.markedExtents.map(String.init) ?? "-")
                if let s = v.sync {
                    var line = "\(s.kind): \(Format.bytes(s.doneBytes)) of \(Format.bytes(s.totalBytes)) compared, \(Format.bytes(s.sentBytes)) sent"
                    if !s.done {
                        line += ", \(Format.bytes(s.rateBytesPerSecond))/s"
                        if let eta = s.etaSeconds { line += ", ETA \(Format.span(eta))" }
                    } else {
                        line += ", done"
                    }
                    fields.add("sync", line)
                }
                fields.add("syncs completed", v.syncsCompleted.map(String.init) ?? "-")
                if let e = v.lastError { fields.add("error", e) }
                if let sink = v.sink {
                    fields.add("sink of", "\(sink.follows), at sequence \(sink.sequence) (\(VolumesCommand.sinkLag(sink)) behind; \(Format.bytes(sink.appliedBytes)) applied)")
                }
                fields.add("replica image", v.replicaPath ?? "-")
                for h in v.hydration ?? [] {
                    var line = "\(h.plan) on \(h.recoveryHost) (\(h.target)): \(Format.bytes(h.localBytes)) of \(Format.bytes(h.sizeBytes)) local, "
                        + "\(Format.bytes(h.fetchedBytes)) fetched"
                    if h.complete {
                        line += h.released ? ", complete, export released" : ", complete"
                    } else {
                        line += ", \(Format.bytes(UInt64(max(0, h.bytesPerSecond))))/s"
                        if let eta = h.etaSeconds { line += ", ETA \(Format.span(eta))" }
                    }
                    fields.add("hydration", line)
                }
                print(fields.render())
            }
        }
    }
}

/// Sizes such as `512M`, `10G`, `1T` or plain bytes.
enum ByteSize {
    static func parse(_ text: String) throws -> UInt64 {
        guard let n = try? ConfigText.byteSize(text), n > 0 else {
            throw FerryError(.badRequest, "'\(text)' is not a size (examples: 512M, 10G, 1T)")
        }
        return n
    }
}
