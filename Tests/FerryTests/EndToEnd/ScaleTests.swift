import FerryAgentCore
import FerryCLICore
import FerryWire
import Foundation
import Logging
import ServiceLifecycle
import Testing

/// Many agents on one controller: the sessions are in-process `AgentSession`s (the same code as
/// `ferry-agent run`), the controller and ferryctl are the real binaries.
///
/// - `FERRY_SCALE_AGENTS`: how many (default 200, so the suite's time does not grow;
///   `deploy/bench.sh`'s `scale` part runs 1,000).
/// - `FERRY_SCALE_IDLE_SECONDS`: the idle window over which the controller's CPU is measured
///   (default 10).
/// - `FERRY_SCALE_RESULTS`: a file to write the figures to, `KEY VALUE` lines, for bench.sh.
@Suite("scale")
struct ScaleTests {
    static let agentCount = positive("FERRY_SCALE_AGENTS") ?? 200
    static let idleSeconds = positive("FERRY_SCALE_IDLE_SECONDS") ?? 10
    /// The issue's goal is stated for 5 s heartbeats (the controller's default); set explicitly,
    /// so the figures stay those of 5 s heartbeats if the default ever changes.
    static let heartbeat = Duration.seconds(5)
    /// Enrollments in flight at once (each one a TLS handshake and a certificate issued).
    static let enrollBatch = 50

    static func positive(_ name: String) -> Int? {
        ProcessInfo.processInfo.environment[name].flatMap { Int($0) }.flatMap { $0 > 0 ? $0 : nil }
    }

    @Test("Simulated agents (FERRY_SCALE_AGENTS, default 200) hold idle sessions with one controller and all show in ferryctl hosts --json")
    func manyAgents() async throws {
        let count = Self.agentCount
        // Each session is a socket here and one in the controller (which inherits this limit).
        try FileLimit.raise(to: rlim_t(2 * count + 1024))
        let dir = try TestDirectory()
        // Every simulated agent comes from 127.0.0.1, as many agents behind one NAT address do:
        // room for all of them, and for reconnections while a closed connection is not yet released.
        let perAddress = 2 * count + 16
        let config = dir.file("controller.yaml")
        try """
        heartbeat-interval: \(Self.heartbeat.components.seconds)s
        max-connections: \(max(4096, perAddress))
        max-connections-per-address: \(perAddress)

        """.write(toFile: config, atomically: true, encoding: .utf8)
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"), arguments: ["--config", config])
        let api = APIClient.Settings(
            baseURL: try #require(controller.apiEnvironment["FERRY_API"]),
            token: controller.apiEnvironment["FERRY_TOKEN"], caPath: controller.caPath
        )
        let logger = { var l = Logger(label: "sim"); l.logLevel = .error; return l }()

        // Enroll in batches: the tokens through the API, the enrollments over mTLS as agents do.
        let enrollStart = ContinuousClock.now
        var identities: [AgentIdentity] = []
        for batch in stride(from: 0, to: count, by: Self.enrollBatch) {
            let names = (batch..<min(batch + Self.enrollBatch, count)).map { String(format: "sim-%04d", $0) }
            let tokens = try await APIClient.withClient(api) { client in
                var tokens: [String] = []
                for name in names {
                    tokens.append(try #require(try await client.createToken(.init(ttlSeconds: 600, host: name)).token))
                }
                return tokens
            }
            let enrolled = try await withThrowingTaskGroup(of: AgentIdentity.self) { group in
                for (name, token) in zip(names, tokens) {
                    group.addTask {
                        try await Enroller.enroll(controller: controller.agentAddress, token: token, requestedName: nil, hostname: name,
                                                  dataDir: dir.path + "/" + name, logger: logger)
                    }
                }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            identities += enrolled
        }
        let enrollTook = ContinuousClock.now - enrollStart
        #expect(identities.count == count)

        let sessions = identities.map { identity in
            var config = AgentConfig(dataDir: dir.path + "/" + identity.info.hostName)
            config.reconnectMaxDelay = .seconds(2)
            let name = identity.info.hostName
            return AgentSession(identity: identity, config: config, logger: logger, inventory: {
                var inventory = InventoryCollector.collect()
                inventory.hostname = name
                return inventory
            })
        }
        let connectStart = ContinuousClock.now
        let group = ServiceGroup(services: sessions, logger: logger)
        let running = Task { try await group.run() }

        // Every agent dials at once: allow for the handshakes of a large count on a small machine.
        let allOnline = try await eventually(timeout: .seconds(60) + .milliseconds(100 * count), every: .milliseconds(500)) {
            try await controller.hosts().filter { $0.state == .online }.count == count
        }
        let onlineTook = ContinuousClock.now - connectStart
        let hosts = try await controller.hosts()
        #expect(allOnline, "\(hosts.filter { $0.state == .online }.count) of \(count) online")
        #expect(Set(hosts.map(\.name)) == Set(identities.map(\.info.hostName)))
        #expect(hosts.allSatisfy { $0.inventory?.hostname == $0.name })
        #expect(sessions.allSatisfy { $0.heartbeatInterval == Self.heartbeat }, "the controller's welcome sets each session's heartbeat")
        print(String(format: "scale: %d agents enrolled in %.1f s, all online %.1f s after their sessions started", count, enrollTook.seconds, onlineTook.seconds))

        // The controller idling with every session open: CPU over the window and resident memory.
        // (The one deliberate sleep: the window is the measurement.)
        let opened = sessions.map(\.sessionsOpened)
        let pid = controller.process.pid
        let before = try ProcStat.cpuSeconds(pid: pid), windowStart = ContinuousClock.now
        var perSecond: [Double] = []
        var last = before
        for _ in 0..<Self.idleSeconds {
            try await Task.sleep(for: .seconds(1))
            let now = try ProcStat.cpuSeconds(pid: pid)
            perSecond.append(now - last)
            last = now
        }
        let cpu = (last - before) / (ContinuousClock.now - windowStart).seconds
        let rss = try ProcStat.residentBytes(pid: pid)
        print("""
            scale: controller idle with \(count) agents (\(Self.heartbeat.components.seconds) s heartbeats) over \(Self.idleSeconds) s: \
            CPU \(String(format: "%.2f", cpu * 100)) % of one core, RSS \(rss >> 20) MiB; \
            per second: \(perSecond.map { String(format: "%.0f%%", $0 * 100) }.joined(separator: " "))
            """)
        if let path = ProcessInfo.processInfo.environment["FERRY_SCALE_RESULTS"] {
            try """
            agents \(count)
            heartbeat_seconds \(Self.heartbeat.components.seconds)
            enroll_seconds \(String(format: "%.3f", enrollTook.seconds))
            online_seconds \(String(format: "%.3f", onlineTook.seconds))
            idle_seconds \(Self.idleSeconds)
            controller_cpu_fraction \(String(format: "%.5f", cpu))
            controller_rss_bytes \(rss)

            """.write(toFile: path, atomically: true, encoding: .utf8)
        }
        // A sanity bound for any count and build (the issue's goal, < 5 % at 1,000 agents, is
        // for the release build: bench.sh's scale part reports against it).
        #expect(cpu < 0.5, "controller busy while idle: \(cpu * 100) %")
        // No session dropped while idling, and all still online.
        #expect(sessions.map(\.sessionsOpened) == opened, "sessions reopened during the idle window")
        #expect(try await controller.hosts().filter { $0.state == .online }.count == count)

        await group.triggerGracefulShutdown()
        try await running.value
        #expect(try await eventually(timeout: .seconds(15) + .milliseconds(15 * count), every: .milliseconds(500)) {
            try await controller.hosts().allSatisfy { $0.state == .offline }
        })
        let (status, _) = await controller.process.terminate()
        #expect(status == 0)
    }
}

/// The open-file limit of this process (and of the processes it starts, which inherit it).
enum FileLimit {
    /// Raises the soft limit to at least `wanted`, as far as the hard limit allows.
    static func raise(to wanted: rlim_t) throws {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { throw FerryError(.io, "getrlimit failed") }
        guard limit.rlim_cur < wanted else { return }
        limit.rlim_cur = min(wanted, limit.rlim_max)
        guard setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { throw FerryError(.io, "setrlimit(RLIMIT_NOFILE) failed") }
    }
}

/// Process figures from /proc.
enum ProcStat {
    static func cpuSeconds(pid: Int32) throws -> Double {
        let stat = try String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)
        // Fields after the command name (which may contain spaces) start at ") ".
        let fields = stat[stat.range(of: ") ")!.upperBound...].split(separator: " ")
        let ticks = (Double(fields[11]) ?? 0) + (Double(fields[12]) ?? 0)
        return ticks / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    static func residentBytes(pid: Int32) throws -> Int {
        let status = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
        for line in status.split(separator: "\n") where line.hasPrefix("VmRSS:") {
            return (Int(line.split(separator: " ")[1]) ?? 0) * 1024
        }
        return 0
    }
}
