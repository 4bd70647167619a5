import FerryNBD
import FerryWire
import Foundation
import Logging
import NIOPosix
import NIOSSL

/// The recovery host's side of a failover or drill: serves a protected host's volumes from
/// the controller's point images through local NBD sockets and runs the start hook; stops
/// them (stop hook first) when the controller says so.
public actor RecoveryManager {
    struct Running {
        var command: Ferry_V1_RecoverVolumes
        var volumes: [any RecoveryServedVolume]
        var sockets: [String]
        var servers: [Task<Void, any Error>]
        var hook: Ferry_V1_HookResult
        /// The background copies of hydrating volumes (cancelled on stop).
        var hydrators: [Task<Void, Never>] = []
    }

    let socketDirectory: String
    let dataDir: String
    let hooks: HookRunner
    let logger: Logger
    private var running: [String: Running] = [:]
    /// Recoveries being started, so a repeated command (a resumed job) waits for the first.
    private var starting: [String: Task<Ferry_V1_RecoveryStarted, any Error>] = [:]
    /// Recoveries whose start hook is being run again.
    private var rerunning: Set<String> = []

    /// Users besides root and the agent's that may use the recovered volumes' sockets.
    let socketUsers: Set<UInt32>
    /// Where hydration targets may be (the host's protect-allow).
    let allow: ProtectAllow
    /// Most bytes per second a hydration fetches (0: no limit).
    let hydrationRateLimit: UInt64
    /// What the last recovery reports said, so unchanged ones are not sent again.
    private var reported: [String: [Ferry_V1_RecoveredVolumeStatus]] = [:]
    /// The session's report loop, waiting for something to report; or a change it has not seen.
    private var reportWaiter: CheckedContinuation<Void, Never>?
    private var unseenChange = false

    /// This host's protected volumes: a failover that lands here serves its volumes as these.
    let volumes: VolumeManager?

    public init(socketDirectory: String, dataDir: String, hooks: HookRunner, logger: Logger, socketUsers: Set<UInt32> = [],
                allow: ProtectAllow? = nil, hydrationRateLimit: UInt64 = 0, volumes: VolumeManager? = nil) {
        self.volumes = volumes
        self.socketDirectory = socketDirectory
        self.socketUsers = socketUsers
        self.allow = allow ?? .defaults(dataDir: dataDir)
        self.hydrationRateLimit = hydrationRateLimit
        self.dataDir = dataDir
        self.hooks = hooks
        self.logger = logger
    }

    /// Most volumes one recovery serves.
    static let maxVolumes = 256

    /// - Parameters:
    ///   - controllerHost: where this agent reaches its controller (exports without a host of
    ///     their own are there).
    ///   - tls: STARTTLS with this host's certificate.
    public func recover(_ command: Ferry_V1_RecoverVolumes, controllerHost: String,
                        tls: @escaping @Sendable () throws -> NBDClientTLS) async throws -> Ferry_V1_RecoveryStarted {
        guard Self.validID(command.recoveryID) else {
            throw FerryError(.badRequest, "recovery id '\(command.recoveryID)' is not PLAN.HOST of letters, digits, '-', '_' and '.'")
        }
        guard !command.volumes.isEmpty, command.volumes.count <= Self.maxVolumes,
              command.volumes.allSatisfy({ VolumeName.isValid($0.name) && !$0.exportName.isEmpty && $0.exportName.utf8.count <= 256 }),
              Set(command.volumes.map(\.name)).count == command.volumes.count,
              command.descriptionJson.utf8.count <= 1 << 20 else {
            throw FerryError(.badRequest, "a recovery names 1 to \(Self.maxVolumes) volumes, each once, with valid names and exports")
        }
        if command.preflight {
            try await preflight(command, controllerHost: controllerHost, tls: tls)
            var out = Ferry_V1_RecoveryStarted()
            out.recoveryID = command.recoveryID
            return out
        }
        if var existing = running[command.recoveryID] {
            guard existing.command.volumes.map(\.exportName) == command.volumes.map(\.exportName) else {
                throw FerryError(.conflict, "recovery \(command.recoveryID) is running here with other exports; stop it first")
            }
            if !existing.hook.error.isEmpty || (existing.hook.name.isEmpty && !command.startHook.isEmpty),
               rerunning.insert(command.recoveryID).inserted {
                // The start hook failed (or never ran, after an agent restart): run it again,
                // once at a time, and keep the outcome only if the recovery is still the same.
                defer { rerunning.remove(command.recoveryID) }
                existing.hook = await runStartHook(command, volumes: existing.volumes, sockets: existing.sockets)
                guard running[command.recoveryID]?.volumes.first === existing.volumes.first else {
                    throw FerryError(.conflict, "recovery \(command.recoveryID) was stopped while its start hook ran")
                }
                running[command.recoveryID] = existing
            }
            return started(command.recoveryID, existing)
        }
        if let pending = starting[command.recoveryID] { return try await pending.value }
        let task = Task { try await self.start(command, controllerHost: controllerHost, tls: tls, runHook: true) }
        starting[command.recoveryID] = task
        defer { starting[command.recoveryID] = nil }
        return try await task.value
    }

    private func started(_ id: String, _ r: Running) -> Ferry_V1_RecoveryStarted {
        var out = Ferry_V1_RecoveryStarted()
        out.recoveryID = id
        out.hook = r.hook
        out.volumes = zip(r.volumes, r.sockets).map { v, socket in v.status(socket: socket) }
        return out
    }

    /// Reports of hydrating recoveries that changed since the last call (all of them after
    /// `resendReports`, as when a session opens).
    public func changedReports() -> [Ferry_V1_RecoveryReport] {
        var out: [Ferry_V1_RecoveryReport] = []
        for (id, r) in running.sorted(by: { $0.key < $1.key }) where r.volumes.contains(where: { $0 is HydratingVolume }) {
            let volumes = zip(r.volumes, r.sockets).map { v, socket in v.status(socket: socket) }
            guard reported[id] != volumes else { continue }
            reported[id] = volumes
            var report = Ferry_V1_RecoveryReport()
            report.recoveryID = id
            report.volumes = volumes
            out.append(report)
        }
        return out
    }

    public func resendReports() { reported = [:] }

    /// Returns when there is something to report: at once after a change (a hydration started,
    /// completed or stopped), after a second while a copy runs (its progress), else only at the
    /// next change. Returns when the task is cancelled, too.
    public func waitForReportable() async {
        if unseenChange {
            unseenChange = false
            return
        }
        if running.values.contains(where: { $0.volumes.contains { ($0 as? HydratingVolume)?.isComplete == false } }) {
            try? await Task.sleep(for: .seconds(1))
            return
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                // Both this and the cancellation below run on the actor: whichever is second sees the other.
                if Task.isCancelled || unseenChange {
                    unseenChange = false
                    c.resume()
                } else {
                    reportWaiter?.resume()
                    reportWaiter = c
                }
            }
        } onCancel: {
            Task { await self.wakeReporter() }
        }
    }

    /// Something changed that a report should say.
    func noteReportable() {
        if reportWaiter == nil { unseenChange = true }
        wakeReporter()
    }

    private func wakeReporter() {
        reportWaiter?.resume()
        reportWaiter = nil
    }

    private func start(_ command: Ferry_V1_RecoverVolumes, controllerHost: String, tls: @escaping @Sendable () throws -> NBDClientTLS,
                       runHook: Bool) async throws -> Ferry_V1_RecoveryStarted {
        // Here, so a recovery restored from the data dir is checked like a command.
        for spec in command.volumes {
            try WireLimits.checkPort(spec.exportPort, "the export port of \(spec.name)")
            try WireLimits.checkVolumeSize(spec.sizeBytes, "the recovered volume \(spec.name)")
        }
        var volumes: [any RecoveryServedVolume] = []
        var sockets: [String] = []
        var servers: [Task<Void, any Error>] = []
        var hydrators: [Task<Void, Never>] = []
        do {
            try FileManager.default.createDirectory(atPath: socketDirectory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            for spec in command.volumes {
                if spec.protected {
                    // Served, captured and hydrated as a protected volume of this host.
                    guard let (volume, socket) = await self.volumes?.served(spec.name) else {
                        throw FerryError(.notFound, "\(spec.name) is not served here as a protected volume; the controller sends it in the volume list first")
                    }
                    volumes.append(ProtectedRecoveredVolume(source: spec.source, volume: volume))
                    sockets.append(socket)
                    continue
                }
                let host = spec.exportHost.isEmpty ? controllerHost : spec.exportHost
                let port = Int(spec.exportPort), export = spec.exportName
                // TLS from the host's current certificate at every connection: it is renewed.
                let connect: @Sendable () async throws -> NBDClient = {
                    try await NBDClient.connect(host: host, port: port, export: export, tls: try tls())
                }
                if spec.hydrate {
                    let withStatus: @Sendable () async throws -> NBDClient = {
                        try await NBDClient.connect(host: host, port: port, export: export, tls: try tls(), allocation: true)
                    }
                    let (volume, hydrator) = try await hydrating(spec, recovery: command.recoveryID, connect: connect, withStatus: withStatus)
                    volumes.append(volume)
                    if let hydrator { hydrators.append(hydrator) }
                    let socket = socketDirectory + "/recovered-" + spec.name + ".sock"
                    try await NBDServer(volumes: [volume], logger: logger, socketUsers: socketUsers).start(unixSocket: socket, into: &servers)
                    sockets.append(socket)
                    continue
                }
                var client: NBDClient?
                do {
                    client = try await connect()
                } catch {
                    // A restored recovery (agent restart) connects when the controller is back.
                    if runHook { throw FerryError(.unavailable, "cannot reach the export of \(spec.source) at \(host):\(port): \((error as? FerryError)?.message ?? "\(error)")") }
                }
                let size = client?.size ?? spec.sizeBytes
                guard spec.sizeBytes == 0 || size == spec.sizeBytes, size > 0 else {
                    await client?.close()
                    throw FerryError(.conflict, "the export of \(spec.source) is \(size) bytes, not \(spec.sizeBytes)")
                }
                let volume = RecoveredVolume(name: spec.name, source: spec.source, size: size, first: client, logger: logger, connect: connect)
                volumes.append(volume)
                let socket = socketDirectory + "/recovered-" + spec.name + ".sock"
                let server = NBDServer(volumes: [volume], logger: logger, socketUsers: socketUsers)
                try await server.start(unixSocket: socket, into: &servers)
                sockets.append(socket)
            }
        } catch {
            for s in servers { s.cancel() }
            for h in hydrators { h.cancel() }
            for v in volumes { await v.stop() }
            throw error
        }
        do {
            try writeDescription(command, volumes: volumes, sockets: sockets)
            // Kept so an agent restart serves the recovered volumes again.
            try PEMFiles.writePublic(try command.jsonString(), to: dataDir + "/recoveries/" + command.recoveryID + ".recovery")
        } catch {
            for s in servers { s.cancel() }
            for h in hydrators { h.cancel() }
            for v in volumes { await v.stop() }
            throw FerryError(.io, "cannot record recovery \(command.recoveryID): \(error)")
        }
        let hook = runHook ? await runStartHook(command, volumes: volumes, sockets: sockets) : Ferry_V1_HookResult()
        let r = Running(command: command, volumes: volumes, sockets: sockets, servers: servers, hook: hook, hydrators: hydrators)
        running[command.recoveryID] = r
        if !hydrators.isEmpty { noteReportable() }
        logger.info("recovered volumes served", metadata: ["recovery": "\(command.recoveryID)", "volumes": "\(volumes.count)", "network": "\(command.network)",
                                                         "hook-error": "\(hook.error)"])
        return started(command.recoveryID, r)
    }

    /// What the start hook gets: the volumes' sockets and the source host's description.
    private func writeDescription(_ command: Ferry_V1_RecoverVolumes, volumes: [any RecoveryServedVolume], sockets: [String]) throws {
        let file = dataDir + "/recoveries/" + command.recoveryID + ".json"
        var description: [String: Any] = [:]
        if let data = command.descriptionJson.data(using: .utf8), let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any] {
            description = object
        }
        description["volumes"] = zip(volumes, sockets).map { v, socket in
            ["name": v.name, "source": v.source, "socket": socket, "uri": "nbd+unix:///\(v.name)?socket=\(socket)", "size_bytes": v.size] as [String: Any]
        }
        try FileManager.default.createDirectory(atPath: dataDir + "/recoveries", withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        try PEMFiles.writePublic(String(decoding: try JSONSerialization.data(withJSONObject: description, options: [.prettyPrinted, .sortedKeys]), as: UTF8.self) + "\n", to: file)
    }

    private func runStartHook(_ command: Ferry_V1_RecoverVolumes, volumes: [any RecoveryServedVolume], sockets: [String]) async -> Ferry_V1_HookResult {
        var hook = Ferry_V1_HookResult()
        guard !command.startHook.isEmpty else { return hook }
        let begun = ContinuousClock.now
        hook.name = command.startHook
        let file = dataDir + "/recoveries/" + command.recoveryID + ".json"
        let env = environment(command, file: file, sockets: zip(volumes, sockets).map { ($0.name, $1) }, mode: "recover")
        if let error = await hooks.run(command.startHook, timeout: Self.timeout(command.hookTimeoutMs), environment: env) { hook.error = error }
        hook.durationMicros = CutHolds.micros(begun.duration(to: .now))
        return hook
    }

    /// After an agent restart: serves the recoveries that were running again (no hooks run;
    /// the controller's next recover command, if any, runs the start hook).
    public func restore(controllerHost: String, tls: @escaping @Sendable () throws -> NBDClientTLS) async {
        let dir = dataDir + "/recoveries"
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: dir) else { return }
        for name in names.sorted() where name.hasSuffix(".recovery") {
            guard let text = try? String(contentsOfFile: dir + "/" + name, encoding: .utf8),
                  let command = try? Ferry_V1_RecoverVolumes(jsonString: text), running[command.recoveryID] == nil,
                  starting[command.recoveryID] == nil else { continue }
            // Through `starting`, so a recover command meanwhile waits for this instead of
            // serving the same sockets a second time.
            let task = Task { try await self.start(command, controllerHost: controllerHost, tls: tls, runHook: false) }
            starting[command.recoveryID] = task
            defer { starting[command.recoveryID] = nil }
            do {
                _ = try await task.value
                logger.info("recovery restored after an agent restart", metadata: ["recovery": "\(command.recoveryID)"])
            } catch {
                logger.error("cannot restore a recovery", metadata: ["recovery": "\(command.recoveryID)", "error": "\(error)"])
            }
        }
    }

    /// Runs the stop hook, then withdraws the volumes. Stopping what is not running is fine.
    public func stop(_ command: Ferry_V1_StopRecovery) async -> Ferry_V1_RecoveryStopped {
        var out = Ferry_V1_RecoveryStopped()
        out.recoveryID = command.recoveryID
        guard let r = running[command.recoveryID] else {
            unlink(dataDir + "/recoveries/" + command.recoveryID + ".recovery")
            return out
        }
        out.wasRunning = true
        if !command.stopHook.isEmpty {
            let begun = ContinuousClock.now
            out.hook.name = command.stopHook
            let env = environment(r.command, file: dataDir + "/recoveries/" + command.recoveryID + ".json",
                                  sockets: zip(r.volumes, r.sockets).map { ($0.name, $1) }, mode: "stop")
            if let error = await hooks.run(command.stopHook, timeout: Self.timeout(command.hookTimeoutMs), environment: env) { out.hook.error = error }
            out.hook.durationMicros = CutHolds.micros(begun.duration(to: .now))
            // A stop hook that failed leaves the workload's disks in place: it may still run.
            guard out.hook.error.isEmpty else { return out }
        }
        running[command.recoveryID] = nil
        reported[command.recoveryID] = nil
        unlink(dataDir + "/recoveries/" + command.recoveryID + ".recovery")
        for h in r.hydrators { h.cancel() }
        for h in r.hydrators { await h.value }
        for s in r.servers { s.cancel() }
        for s in r.servers { _ = try? await s.value }
        for v in r.volumes { await v.stop() }
        // A protected volume's socket is its volume manager's, and stays.
        for (v, socket) in zip(r.volumes, r.sockets) where !(v is ProtectedRecoveredVolume) { unlink(socket) }
        // A drill's copy is disposable: a target the agent made goes with its map. A failover's
        // stays: it is the workload's disk.
        for case let v as HydratingVolume in r.volumes {
            if r.command.network == "test", v.targetZeroed { unlink(v.target) }
            if r.command.network == "test" { unlink(v.mapPath) }
        }
        logger.info("recovered volumes withdrawn", metadata: ["recovery": "\(command.recoveryID)"])
        return out
    }

    func environment(_ command: Ferry_V1_RecoverVolumes, file: String, sockets: [(String, String)], mode: String) -> [String: String] {
        [
            "FERRY_MODE": mode,
            "FERRY_PLAN": command.plan,
            "FERRY_RECOVERY_ID": command.recoveryID,
            "FERRY_SOURCE_HOST": command.sourceHost,
            "FERRY_NETWORK": command.network,
            "FERRY_RECOVERY_FILE": file,
            "FERRY_VOLUMES": sockets.map { "\($0.0)=\($0.1)" }.joined(separator: " "),
        ]
    }

    /// A hydrating volume: its target checked against protect-allow, opened (resumed from its
    /// saved map, or started), and its background copy started unless it is complete.
    private func hydrating(_ spec: Ferry_V1_RecoveredVolumeSpec, recovery: String,
                           connect: @escaping @Sendable () async throws -> NBDClient,
                           withStatus: @escaping @Sendable () async throws -> NBDClient) async throws -> (HydratingVolume, Task<Void, Never>?) {
        let target = spec.targetPath.isEmpty ? dataDir + "/volumes/recovered/" + recovery + "/" + spec.name + ".img" : spec.targetPath
        let allow = self.allow
        let (resolved, refusal) = try await NIOThreadPool.singleton.runIfActive { allow.check(target) }
        if let refusal {
            throw FerryError(.permissionDenied, "the hydration target \(target)\(resolved == target ? "" : " (\(resolved))") is not allowed on this host: \(refusal); add it to protect-allow")
        }
        let mapPath = dataDir + "/recoveries/" + recovery + "/" + spec.name + ".hydration"
        if !FileManager.default.fileExists(atPath: mapPath) {
            try await checkSpace(target: target, size: spec.sizeBytes, connect: withStatus)
        }
        try FileManager.default.createDirectory(atPath: dataDir + "/recoveries/" + recovery, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        // Reads of blocks not local yet go to the point (reconnecting as a recovered volume does).
        let remote = RecoveredVolume(name: spec.name, source: spec.source, size: spec.sizeBytes, first: nil, logger: logger, connect: connect)
        let logger = self.logger, name = spec.name
        let volume = try await NIOThreadPool.singleton.runIfActive {
            try HydratingVolume.open(name: spec.name, source: spec.source, size: spec.sizeBytes, target: target, mapPath: mapPath,
                                     point: spec.exportName, remote: remote, logger: logger,
                                     onComplete: {
                                         Task {
                                             await remote.stop()
                                             await self.noteReportable()
                                         }
                                     })
        }
        guard !volume.isComplete else {
            await remote.stop()
            return (volume, nil)
        }
        logger.info("hydrating a recovered volume", metadata: ["volume": "\(name)", "target": "\(target)", "local": "\(volume.progress.localBytes)"])
        let hydrator = Hydrator(volume: volume, connect: withStatus, pool: NIOThreadPool.singleton, logger: logger,
                                rateLimit: hydrationRateLimit, report: { progress, _ in
                                    // The copy's last word (with its final duration) is reported at once.
                                    if progress.complete { Task { await self.noteReportable() } }
                                })
        return (volume, Task { await hydrator.run() })
    }

    /// The checks a failover runs on its recovery host before it fences anything: every
    /// hydrating volume's target is allowed here, fits the volume, and its file system has room
    /// for the point's data. A target with a map already (a resumed hydration) passes.
    private func preflight(_ command: Ferry_V1_RecoverVolumes, controllerHost: String,
                           tls: @escaping @Sendable () throws -> NBDClientTLS) async throws {
        for spec in command.volumes where spec.hydrate {
            try WireLimits.checkPort(spec.exportPort, "the export port of \(spec.name)")
            try WireLimits.checkVolumeSize(spec.sizeBytes, "the recovered volume \(spec.name)")
            let target = spec.targetPath.isEmpty
                ? (volumes?.defaultRecoveredPath(spec.name) ?? dataDir + "/volumes/recovered/" + spec.name + ".img") : spec.targetPath
            let allow = self.allow
            let (resolved, refusal) = try await NIOThreadPool.singleton.runIfActive { allow.check(target) }
            if let refusal {
                throw FerryError(.permissionDenied, "the hydration target \(target)\(resolved == target ? "" : " (\(resolved))") is not allowed on this host: \(refusal); add it to protect-allow")
            }
            var st = stat()
            if stat(target, &st) == 0 {
                let type = st.st_mode & S_IFMT
                guard type == S_IFREG || type == S_IFBLK else {
                    throw FerryError(.badRequest, "the hydration target \(target) is neither a file nor a block device")
                }
                let capacity: UInt64
                if type == S_IFBLK {
                    let fd = open(target, O_RDONLY | O_CLOEXEC)
                    capacity = fd >= 0 ? UInt64(max(0, lseek(fd, 0, SEEK_END))) : 0
                    if fd >= 0 { close(fd) }
                } else {
                    capacity = UInt64(max(0, st.st_size))
                }
                guard capacity >= spec.sizeBytes else {
                    throw FerryError(.badRequest, "the hydration target \(target) holds \(capacity) bytes; the volume needs \(spec.sizeBytes)")
                }
            }
            if let volumes, FileManager.default.fileExists(atPath: volumes.hydrationMapPath(spec.name)) { continue }
            let host = spec.exportHost.isEmpty ? controllerHost : spec.exportHost
            let port = Int(spec.exportPort), export = spec.exportName
            try await checkSpace(target: target, size: spec.sizeBytes, connect: {
                try await NBDClient.connect(host: host, port: port, export: export, tls: try tls(), allocation: true)
            })
        }
    }

    /// Before a hydration starts: a block device must be there; a file's file system must have
    /// room for the point's data (its block status: holes and zero ranges take no room), less
    /// what the file holds already. Refused before anything is served or created.
    private func checkSpace(target: String, size: UInt64, connect: @escaping @Sendable () async throws -> NBDClient) async throws {
        var st = stat()
        if stat(target, &st) == 0, (st.st_mode & S_IFMT) == S_IFBLK { return } // sized when opened
        var needed: UInt64 = 0
        let client = try await connect()
        do {
            var at: UInt64 = 0
            while at < size, client.canBlockStatus {
                for e in try await client.blockStatus(offset: at, length: min(size - at, 1 << 30)) {
                    if !e.isZero { needed += e.length }
                    at += e.length
                }
            }
            if !client.canBlockStatus { needed = size }
        } catch {
            await client.close()
            throw error
        }
        await client.close()
        let existing = stat(target, &st) == 0 ? UInt64(max(0, st.st_blocks)) * 512 : 0
        var directory = (target as NSString).deletingLastPathComponent
        while !FileManager.default.fileExists(atPath: directory), directory.count > 1 { directory = (directory as NSString).deletingLastPathComponent }
        var fs = statvfs()
        guard statvfs(directory, &fs) == 0 else { throw FerryError.system(errno, "statvfs \(directory)") }
        let free = UInt64(fs.f_bavail) * UInt64(fs.f_frsize)
        let wanted = needed > existing ? needed - existing : 0
        guard free >= wanted else {
            throw FerryError(.noSpace, "the file system of the hydration target \(target) has \(free >> 20) MiB free; the point holds \(needed >> 20) MiB of data (\(wanted >> 20) MiB more than the file has): free space or choose another target")
        }
    }

    static func timeout(_ ms: UInt32) -> Duration { .milliseconds(Int64(max(1000, min(ms, 3_600_000)))) }

    static func validID(_ id: String) -> Bool {
        (3...160).contains(id.count) && id.contains(".")
            && id.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" || $0 == ".") }
    }
}

extension NBDServer {
    /// Serves a unix socket in a task of its own; returns once it listens (or throws why not).
    func start(unixSocket path: String, into tasks: inout [Task<Void, any Error>]) async throws {
        let ready = AsyncStream<Void>.makeStream()
        let task = Task {
            defer { ready.continuation.finish() }
            try await self.serve(unixSocket: path, onReady: { ready.continuation.yield() })
        }
        var listening = false
        for await _ in ready.stream { listening = true; break }
        guard listening else {
            let reason: String
            do { try await task.value; reason = "it stopped" } catch { reason = (error as? FerryError)?.message ?? "\(error)" }
            throw FerryError(.io, "cannot serve \(path): \(reason)")
        }
        tasks.append(task)
    }
}
