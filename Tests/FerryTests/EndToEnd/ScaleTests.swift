import FerryAgentCore
import FerryCLICore
import FerryWire
import Foundation
import Logging
import ServiceLifecycle
import Testing

/// Many agents on one controller: the sessions are in-process `AgentSession`s (the same code as
/// `ferry-agent run`), the controller and ferryctl are the real binaries.
@Suite("scale")
struct ScaleTests {
    static let agentCount = 200

    @Test("200 simulated agents hold sessions with one controller and all show in ferryctl hosts --json")
    func twoHundredAgents() async throws {
        let dir = try TestDirectory()
        // Every simulated agent comes from 127.0.0.1, as many agents behind one NAT address do.
        let config = dir.file("controller.yaml")
        try "max-connections-per-address: \(Self.agentCount + 16)\n".write(toFile: config, atomically: true, encoding: .utf8)
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"), arguments: ["--config", config])
        let api = APIClient.Settings(
            baseURL: try #require(controller.apiEnvironment["FERRY_API"]),
            token: controller.apiEnvironment["FERRY_TOKEN"], caPath: controller.caPath
        )
        let logger = { var l = Logger(label: "sim"); l.logLevel = .error; return l }()

        // Enroll in batches: the tokens through the API, the enrollments over mTLS as agents do.
        var identities: [AgentIdentity] = []
        for batch in stride(from: 0, to: Self.agentCount, by: 25) {
            let names = (batch..<min(batch + 25, Self.agentCount)).map { String(format: "sim-%03d", $0) }
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
        #expect(identities.count == Self.agentCount)

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
        let group = ServiceGroup(services: sessions, logger: logger)
        let running = Task { try await group.run() }

        let allOnline = try await eventually(timeout: .seconds(60), every: .milliseconds(500)) {
            try await controller.hosts().filter { $0.state == "online" }.count == Self.agentCount
        }
        let hosts = try await controller.hosts()
        #expect(allOnline, "\(hosts.filter { $0.state == "online" }.count) of \(Self.agentCount) online")
        #expect(Set(hosts.map(\.name)) == Set(identities.map(\.info.hostName)))
        #expect(hosts.allSatisfy { $0.inventory?.hostname == $0.name })

        // The controller idling with every session open: CPU over 10 s and resident memory.
        let before = try ProcStat.cpuSeconds(pid: controller.process.pid)
        try await Task.sleep(for: .seconds(10))
        let cpu = (try ProcStat.cpuSeconds(pid: controller.process.pid) - before) / 10
        let rss = try ProcStat.residentBytes(pid: controller.process.pid)
        print("controller idle with \(Self.agentCount) agents: CPU \(String(format: "%.1f", cpu * 100)) % of one core, RSS \(rss >> 20) MiB")
        #expect(cpu < 0.5, "controller busy while idle: \(cpu * 100) %")
        // No session dropped while idling: every one was opened exactly once.
        #expect(sessions.allSatisfy { $0.sessionsOpened == 1 })

        await group.triggerGracefulShutdown()
        try await running.value
        #expect(try await eventually(timeout: .seconds(15), every: .milliseconds(500)) {
            try await controller.hosts().allSatisfy { $0.state == "offline" }
        })
        let (status, _) = await controller.process.terminate()
        #expect(status == 0)
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
