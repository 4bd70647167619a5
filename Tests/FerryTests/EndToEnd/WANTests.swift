import FerryWire
import Foundation
import Testing

/// WAN mode through real processes: bandwidth limits changed at run time with ferryctl, and
/// compression of the streamed bytes, with its effect in /metrics.
@Suite("WAN mode", .serialized)
struct WANTests {
    let replication = ReplicationTests()

    /// The value of one metric line (`NAME{LABELS} VALUE`), 0 if it is not there yet.
    func metric(_ controller: ControllerProcess, _ series: String) async throws -> Double {
        let r = try await controller.ctl("metrics")
        let line = r.stdout.split(separator: "\n").first { $0.hasPrefix(series + " ") }
        return line.flatMap { Double($0.split(separator: " ").last ?? "") } ?? 0
    }

    /// Until the replica equals the source (what the agent reports can be a second old).
    func caughtUp(_ controller: ControllerProcess, image: String) async throws -> Bool {
        guard let replica = try await replication.volume(controller).replicaPath else { return false }
        return try await eventually(timeout: .seconds(60), every: .milliseconds(200)) {
            try await run("/usr/bin/qemu-img", ["compare", "-q", "-f", "raw", "-F", "raw", image, replica]).status == 0
        }
    }

    @Test("a host's bandwidth limit set with ferryctl slows its stream to the limit at once (refused below 1 Mbit/s), lifting it lets the stream catch up; lz4 compression cuts the bytes on the wire for compressible writes and not for random ones (ratio and CPU in /metrics), the replica stays identical; the settings survive a controller restart and are audited")
    func limitsAndCompression() async throws {
        let dir = try TestDirectory()
        var controller = try await ControllerProcess.start(dataDir: dir.sub("controller"))
        let agent = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir)
        defer { agent.signal(SIGTERM) }
        #expect(try await controller.waitFor("db", state: "online"))
        let image = dir.sub("volumes") + "/data.img"
        var r = try await controller.ctl("protect", "db", "--volume", "data", "--path", image, "--create-size", "64M")
        #expect(r.status == 0, "\(r)")
        #expect(try await caughtUp(controller, image: image))
        let uri = "nbd+unix:///data?socket=\(dir.path)/agent-db/sockets/data.sock"
        func write(_ commands: String...) async throws {
            let q = try await run("/usr/bin/qemu-io", ["-f", "raw"] + commands.flatMap { ["-c", $0] } + [uri], timeout: .seconds(60))
            #expect(q.status == 0 && !q.stdout.contains("failed"), "\(q)")
        }

        // Limits: refused below 1 Mbit/s, with the reason; 16 Mbit/s (2 MB/s) for db from now on.
        r = try await controller.ctl("wan", "set", "--host", "db", "--limit", "500kbit")
        #expect(r.status != 0 && r.stderr.contains("1 Mbit/s"), "\(r)")
        r = try await controller.ctl("wan", "set", "--host", "db", "--limit", "16mbit")
        #expect(r.status == 0 && r.stdout.contains("16 Mbit/s"), "\(r)")
        // 12 MiB written at once take at least 6 s to cross at 2 MB/s (the burst is 200 kB).
        let started = ContinuousClock.now
        try await write("write -P 0x31 0 12M", "flush")
        #expect(try await caughtUp(controller, image: image))
        let limited = started.duration(to: .now)
        #expect(limited > .seconds(5.5), "12 MiB replicated in \(limited) under a 2 MB/s limit")
        #expect(try await metric(controller, #"ferry_wan_throttled_seconds_total{host="db",direction="in"}"#) > 4)
        #expect(try await metric(controller, #"ferry_wan_limit_bytes_per_second{scope="db"}"#) == 2_000_000)
        // Lifted: the same again goes as fast as the machine goes.
        r = try await controller.ctl("wan", "set", "--host", "db", "--limit", "none")
        #expect(r.status == 0, "\(r)")
        let again = ContinuousClock.now
        try await write("write -P 0x32 16M 12M", "flush")
        #expect(try await caughtUp(controller, image: image))
        let unlimited = again.duration(to: .now)
        print("WAN: 12 MiB replicated in \(limited) under a 16 Mbit/s limit, in \(unlimited) without")
        #expect(unlimited < limited / 2)

        // Compression for all hosts: the agent hears of it with its volume list.
        r = try await controller.ctl("wan", "set", "--compression", "lz4")
        #expect(r.status == 0, "\(r)")
        let wireSeries = #"ferry_replication_wire_bytes_total{host="db"}"#, dataSeries = #"ferry_replication_data_bytes_total{host="db"}"#
        var wire0 = try await metric(controller, wireSeries), data0 = try await metric(controller, dataSeries)
        try await write("write -P 0x5a 28M 24M", "flush")
        #expect(try await caughtUp(controller, image: image))
        var wire = try await metric(controller, wireSeries) - wire0, data = try await metric(controller, dataSeries) - data0
        #expect(data >= Double(24 << 20) && data / max(wire, 1) > 20, "a repeated byte compresses: \(data) bytes as \(wire) on the wire")
        #expect(try await eventually(timeout: .seconds(10)) {
            try await metric(controller, #"ferry_volume_compress_input_bytes{host="db",volume="data"}"#) >= Double(24 << 20)
        })
        #expect(try await metric(controller, #"ferry_volume_compress_cpu_seconds{host="db",volume="data"}"#) > 0)
        // Random bytes do not compress: they travel as they are.
        (wire0, data0) = (try await metric(controller, wireSeries), try await metric(controller, dataSeries))
        let fio = try await run("/usr/bin/fio", ["--name=random", "--ioengine=nbd", "--uri=\(uri)", "--rw=write", "--bs=1M", "--offset=52M",
                                                 "--size=8M", "--refill_buffers", "--randrepeat=0"], timeout: .seconds(60))
        #expect(fio.status == 0, "\(fio)")
        #expect(try await caughtUp(controller, image: image))
        (wire, data) = (try await metric(controller, wireSeries) - wire0, try await metric(controller, dataSeries) - data0)
        #expect(data >= Double(8 << 20) && wire >= data, "random bytes: \(data) as \(wire) on the wire")

        // Kept across a restart, and audited.
        _ = await controller.process.terminate()
        controller = try await ControllerProcess.start(dataDir: controller.dataDir, listen: controller.agentAddress, logName: "controller-2.log")
        defer { controller.process.signal(SIGTERM) }
        r = try await controller.ctl("wan", "--json")
        let settings = try API.decoder().decode(API.WANSettings.self, from: Data(r.stdout.utf8))
        #expect(settings.all.compression == .lz4 && settings.hosts.allSatisfy { $0.rule.limitBytesPerSecond == nil }, "\(settings)")
        let audit = try await controller.audit().filter { $0.action == "wan.set" }
        #expect(audit.count == 3 && audit.contains { $0.target == "db" && $0.detail.contains("2000000 B/s") }, "\(audit)")
        // The agent, back with the restarted controller, compresses still.
        #expect(try await controller.waitFor("db", state: "online"))
        wire0 = try await metric(controller, wireSeries)
        try await write("write -P 0x66 0 8M", "flush")
        #expect(try await caughtUp(controller, image: image))
        #expect(try await metric(controller, dataSeries) / max(try await metric(controller, wireSeries), 1) > 20)
    }
}
