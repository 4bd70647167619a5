import FerryWire
import Foundation
import Testing

/// `ferryctl protect` through the controller to a real agent, whose NBD export real tools use.
@Suite("protecting volumes")
struct ProtectTests {
    @Test("protect creates and exports a volume; qemu-io writes through the agent; errors are clear; the export survives kill -9 with the controller down")
    func protectAndExport() async throws {
        let dir = try TestDirectory()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"))
        let agent = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir)
        #expect(try await controller.waitFor("db", state: "online"))
        let volumes = dir.sub("volumes")
        let image = volumes + "/data.img"

        let protected = try await controller.ctl("protect", "db", "--volume", "data", "--path", image, "--create-size", "64M")
        #expect(protected.status == 0, "\(protected)")
        let listed = try await controller.ctl("volumes", "--json")
        let all = try API.decoder().decode([API.Volume].self, from: Data(listed.stdout.utf8))
        let volume = try #require(all.first)
        #expect(all.count == 1 && volume.host == "db" && volume.name == "data" && volume.sizeBytes == 64 << 20 && volume.state == .exported)
        let socket = try #require(volume.socketPath)
        let uri = "nbd+unix:///data?socket=\(socket)"
        #expect((try FileManager.default.attributesOfItem(atPath: image)[.size] as? Int) == 64 << 20)

        let written = try await run("/usr/bin/qemu-io", ["-f", "raw", uri, "-c", "write -P 0x5e 1M 2M", "-c", "flush"])
        #expect(written.status == 0, "\(written)")
        // The bytes are in the image file itself.
        let fd = open(image, O_RDONLY)
        var probe = [UInt8](repeating: 0, count: 4096)
        _ = pread(fd, &probe, 4096, 2 << 20)
        close(fd)
        #expect(probe.allSatisfy { $0 == 0x5E })
        let show = try await controller.ctl("volume", "show", "db/data")
        #expect(show.status == 0 && show.stdout.contains(socket), "\(show)")

        func refused(_ arguments: [String], _ text: String) async throws {
            let r = try await controller.ctl(arguments)
            #expect(r.status == 1, "\(arguments): \(r)")
            #expect(r.stderr.split(separator: "\n").count == 1 && r.stderr.contains(text), "\(arguments): \(r)")
        }
        try await refused(["protect", "db", "--volume", "logs", "--path", volumes + "/missing.img"], "does not exist")
        try await refused(["protect", "db", "--volume", "copy", "--path", image], "already protected")
        try await refused(["protect", "db", "--volume", "data", "--path", volumes + "/other.img", "--create-size", "1M"], "already protects a volume named 'data'")
        #expect(FileManager.default.createFile(atPath: volumes + "/small.img", contents: Data(count: 4096)))
        try await refused(["protect", "db", "--volume", "small", "--path", volumes + "/small.img", "--create-size", "1M"], "exists with 4096 bytes")
        try await refused(["protect", "db", "--volume", "rel", "--path", "data.img"], "must be absolute")
        try await refused(["protect", "db", "--volume", "../x", "--path", volumes + "/x.img"], "not a valid volume name")
        try await refused(["protect", "nosuchhost", "--volume", "x", "--path", volumes + "/x.img"], "no host named")
        #expect(try await controller.audit().contains { $0.action == "volume.protect" && $0.target == "db/data" && $0.actor == "api:admin" })

        // The agent dies and comes back while the controller is down: the workload gets its disk
        // back at once, from the agent's own memory of its volumes.
        await agent.kill9()
        _ = await controller.process.terminate()
        let again = try await AgentProcess.start(dataDir: dir.path + "/agent-db", logPath: dir.file("db-2.log"))
        // (The killed agent left its socket file behind: wait for an answer, not for the file.)
        let served = try await eventually(timeout: .seconds(10), every: .milliseconds(200)) {
            try await run("/usr/bin/nbdinfo", ["--size", uri]).status == 0
        }
        #expect(served, "\(again.log)")
        let read = try await run("/usr/bin/qemu-io", ["-f", "raw", uri, "-c", "read -P 0x5e 1M 2M"])
        #expect(read.status == 0 && !read.stdout.contains("Pattern verification failed"), "\(read)")

        // The controller returns and hands over the same list; nothing changes for the workload.
        let back = try await ControllerProcess.start(dataDir: controller.dataDir, listen: controller.agentAddress, logName: "controller-2.log")
        #expect(try await back.waitFor("db", state: "online"))
        let after = try await back.ctl("volume", "show", "db/data", "--json")
        #expect(try API.decoder().decode(API.Volume.self, from: Data(after.stdout.utf8)).state == .exported)
        let (status, took) = await again.terminate()
        #expect(status == 0 && took < .seconds(5))
        _ = await back.process.terminate()
    }

    @Test("the NBD unix socket checks its peer's user: root and nbd-socket-users get in, any other local user is refused whatever the file's mode")
    func socketPeerUser() async throws {
        let dir = try TestDirectory()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"))
        // Sockets where other users can reach them (the test's own directory is private).
        let sockets = "/tmp/ferry-sockets-\(UUID().uuidString.prefix(8))"
        defer { try? FileManager.default.removeItem(atPath: sockets) }
        let config = dir.file("agent.yaml")
        try "socket-dir: \(sockets)\nnbd-socket-users: [daemon]\n".write(toFile: config, atomically: true, encoding: .utf8)
        let agent = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir, arguments: ["--config", config])
        defer {
            agent.signal(SIGTERM)
            controller.process.signal(SIGTERM)
        }
        #expect(try await controller.waitFor("db", state: "online"))
        let r = try await controller.ctl("protect", "db", "--volume", "data", "--path", dir.sub("volumes") + "/data.img", "--create-size", "16M")
        #expect(r.status == 0, "\(r)")
        let uri = "nbd+unix:///data?socket=\(sockets)/data.sock"
        #expect(await eventually(timeout: .seconds(10)) { FileManager.default.fileExists(atPath: sockets + "/data.sock") })
        func size(as user: String) async throws -> CommandResult {
            let uid = try #require(getpwnam(user)).pointee.pw_uid, gid = try #require(getpwnam(user)).pointee.pw_gid
            return try await run("/usr/bin/setpriv", ["--reuid=\(uid)", "--regid=\(gid)", "--clear-groups", "/usr/bin/nbdinfo", "--size", uri], timeout: .seconds(20))
        }
        #expect(try await run("/usr/bin/nbdinfo", ["--size", uri]).stdout.contains("16777216"), "root")
        let allowed = try await size(as: "daemon")
        #expect(allowed.status == 0 && allowed.stdout.contains("16777216"), "\(allowed)")
        let other = try await size(as: "nobody")
        #expect(other.status != 0 && other.stderr.contains("16777216") == false, "\(other)")
        #expect(await eventually(timeout: .seconds(5)) { agent.log.contains("peer's user may not use this socket") }, "\(agent.log.suffix(3000))")
    }

    @Test("nbd-tcp serves every volume on one loopback port by export name, only with nbd-tcp-insecure; a non-loopback address is refused")
    func loopbackTCPExport() async throws {
        let dir = try TestDirectory()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"))
        let wide = dir.file("wide.yaml")
        try "nbd-tcp: 0.0.0.0:10809\n".write(toFile: wide, atomically: true, encoding: .utf8)
        let refused = try await run(Binaries.path("ferry-agent"), ["run", "--data-dir", dir.sub("nowhere"), "--config", wide])
        #expect(refused.status != 0 && refused.stderr.contains("nbd-tcp must be a loopback address"), "\(refused)")

        // Unauthenticated: only with the operator's explicit acceptance.
        let plain = dir.file("plain.yaml")
        try "nbd-tcp: 127.0.0.1:0\n".write(toFile: plain, atomically: true, encoding: .utf8)
        let unaccepted = try await run(Binaries.path("ferry-agent"), ["run", "--data-dir", dir.sub("nowhere"), "--config", plain])
        #expect(unaccepted.status != 0 && unaccepted.stderr.contains("nbd-tcp-insecure"), "\(unaccepted)")

        let config = dir.file("agent.yaml")
        try "nbd-tcp: 127.0.0.1:0\nnbd-tcp-insecure: true\n".write(toFile: config, atomically: true, encoding: .utf8)
        let agent = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir, arguments: ["--config", config])
        #expect(try await controller.waitFor("db", state: "online"))
        let volumes = dir.sub("volumes")
        for name in ["data", "logs"] {
            #expect(try await controller.ctl("protect", "db", "--volume", name, "--path", volumes + "/\(name).img", "--create-size", "16M").status == 0)
        }
        var shown: API.Volume?
        #expect(try await eventually(timeout: .seconds(10), every: .milliseconds(300)) {
            shown = try API.decoder().decode(API.Volume.self, from: Data(try await controller.ctl("volume", "show", "db/logs", "--json").stdout.utf8))
            return shown?.tcpAddress != nil
        })
        let tcp = try #require(shown?.tcpAddress)
        #expect(tcp.hasPrefix("127.0.0.1:") && !tcp.hasSuffix(":0"))
        let written = try await run("/usr/bin/qemu-io", ["-f", "raw", "nbd://\(tcp)/logs", "-c", "write -P 0x7c 0 1M", "-c", "flush"])
        #expect(written.status == 0, "\(written)")
        let listed = try await run("/usr/bin/nbdinfo", ["--list", "nbd://\(tcp)"])
        #expect(listed.stdout.contains("data") && listed.stdout.contains("logs"), "\(listed)")
        #expect(try await eventually(timeout: .seconds(30), every: .milliseconds(300)) {
            try await run("/usr/bin/qemu-img", ["compare", "-q", "-f", "raw", "-F", "raw", volumes + "/logs.img", try #require(shown?.replicaPath)]).status == 0
        })
        _ = await agent.terminate()
        _ = await controller.process.terminate()
    }
}
