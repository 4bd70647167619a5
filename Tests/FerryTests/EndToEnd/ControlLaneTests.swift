import FerryWire
import Foundation
import Testing

/// Consistency cuts travel on each agent's control lane, a connection of their own, so a
/// session full of replication data never makes them miss their hold budget.
@Suite("control lane", .serialized)
struct ControlLaneTests {
    static let tc = FileManager.default.isExecutableFile(atPath: "/usr/sbin/tc") ? "/usr/sbin/tc" : "/sbin/tc"

    @Test("the agent's link to the controller shaped to 25 Mbit/s and saturated by fio: a request on the session waits behind seconds of replication data, yet every group cut with a 500 ms hold budget succeeds, on the control lane")
    func cutsDoNotQueueBehindData() async throws {
        let dir = try TestDirectory()
        // Two hosts: the controller's and the agent's network namespaces, joined by a veth pair.
        let site = try await NetworkNamespace(), host = try await NetworkNamespace()
        try await site.ip("-n", site.name, "link", "add", "lane0", "type", "veth", "peer", "name", "lane1", "netns", host.name)
        try await site.ip("-n", site.name, "addr", "add", "198.18.77.1/24", "dev", "lane0")
        try await site.ip("-n", host.name, "addr", "add", "198.18.77.2/24", "dev", "lane1")
        try await site.ip("-n", site.name, "link", "set", "lane0", "up")
        try await site.ip("-n", host.name, "link", "set", "lane1", "up")

        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"), listen: "198.18.77.1:0", namespace: site)
        defer { controller.process.signal(SIGTERM) }
        let agentDir = dir.path + "/agent-db"
        let token = try await controller.token(host: "db")
        let (enroll, arguments) = NetworkNamespace.wrap(host, Binaries.path("ferry-agent"),
            ["enroll", "--controller", controller.agentAddress, "--token", token, "--data-dir", agentDir])
        let enrolled = try await run(enroll, arguments)
        #expect(enrolled.status == 0, "\(enrolled)")
        let agent = try await AgentProcess.start(dataDir: agentDir, namespace: host)
        defer { agent.signal(SIGTERM) }
        #expect(try await controller.waitFor("db", state: "online"))
        var r = try await controller.ctl("protect", "db", "--volume", "data", "--path", dir.sub("volumes") + "/data.img", "--create-size", "512M")
        #expect(r.status == 0, "\(r)")
        r = try await controller.ctl("group", "create", "g", "--volume", "db/data", "--crash-interval", "0", "--app-interval", "0",
                                     "--hold-budget", "500ms")
        #expect(r.status == 0, "\(r)")
        #expect(try await eventually(timeout: .seconds(60), every: .milliseconds(300)) {
            try await controller.ctl("point", "create", "g").status == 0
        }, "the volume never became ready for a point")
        #expect(await eventually(timeout: .seconds(10)) { controller.process.log.contains("control lane open") },
                "the agent opened no control lane:\n\(agent.log.suffix(3000))")

        // The agent's side of the link: 25 Mbit/s (3 MB/s), a short queue.
        let shaped = try await run(Self.tc, ["-n", host.name, "qdisc", "replace", "dev", "lane1", "root", "tbf", "rate", "25mbit", "burst", "32k", "latency", "20ms"])
        #expect(shaped.status == 0, "\(shaped)")
        // fio writes 20 MB/s, far more than the link carries, for 12 s: the change log (memory,
        // then its spill file) takes the difference, and the session's send window stays full.
        let uri = "nbd+unix:///data?socket=\(agentDir)/sockets/data.sock"
        let fio = try await ChildProcess("/usr/bin/fio", ["--name=fill", "--ioengine=nbd", "--uri=\(uri)", "--rw=write", "--bs=1M", "--size=512M",
                                                    "--rate=20m", "--time_based", "--runtime=12"], logPath: dir.file("fio.log"))
        defer { fio.signal(SIGTERM) }
        try await Task.sleep(for: .seconds(3))

        // A request on the session (an inventory refresh) waits behind the data queued ahead of it.
        let asked = ContinuousClock.now
        r = try await controller.ctl("host", "refresh", "db")
        let sessionWait = asked.duration(to: .now)
        #expect(r.status == 0, "\(r)")
        // The cuts, meanwhile, on the lane: every one within its 500 ms budget.
        var succeeded = 0, failures: [String] = []
        for _ in 0..<6 {
            r = try await controller.ctl("point", "create", "g")
            if r.status == 0 { succeeded += 1 } else { failures.append(r.stderr) }
        }
        print("control lane: a session request took \(sessionWait) under the saturated link; \(succeeded) of 6 cuts succeeded")
        #expect(sessionWait > .seconds(1), "the session was not congested: the test shows nothing")
        #expect(succeeded == 6, "\(failures)")
        #expect(fio.isRunning, "fio ended before the cuts: the link was not saturated throughout\n\(fio.log)")
        let points = try await controller.ctl("points", "g", "--json")
        let pauses = try API.decoder().decode([API.Point].self, from: Data(points.stdout.utf8)).compactMap(\.pauseMicros)
        #expect(pauses.count >= 7 && pauses.allSatisfy { $0 < 500_000 }, "\(pauses)")
        let _ = try await run(Self.tc, ["-n", host.name, "qdisc", "del", "dev", "lane1", "root"])
    }
}
