import FerryWire
import Foundation
import Testing

/// The agent's `protect-allow` list: what the controller may have a host open and write is the
/// host's decision, whatever token asked.
@Suite("protect-allow")
struct ProtectAllowTests {
    /// Runs ferryctl and expects one line on stderr containing each of `texts`.
    static func refused(_ controller: ControllerProcess, _ arguments: [String], _ texts: String...) async throws {
        let r = try await controller.ctl(arguments)
        #expect(r.status == 1, "\(arguments): \(r)")
        #expect(r.stderr.split(separator: "\n").count == 1 && texts.allSatisfy { r.stderr.contains($0) }, "\(arguments): \(r)")
    }

    @Test("by default only DATA-DIR/volumes/ and unused block devices: a file outside, a ../ escape and a planted symlink are refused with one line, audited, nothing copied or created; inside works; an image download is audited")
    func defaultList() async throws {
        let dir = try TestDirectory()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"))
        let agent = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir, allowTestDirectory: false)
        #expect(try await controller.waitFor("db", state: "online"))
        let dataDir = dir.path + "/agent-db"
        let volumes = dataDir + "/volumes"
        #expect(await eventually(timeout: .seconds(10), every: .milliseconds(100)) { FileManager.default.fileExists(atPath: volumes) })

        // A secret of the host's, outside the data dir.
        let secret = dir.file("shadow")
        #expect(FileManager.default.createFile(atPath: secret, contents: Data(repeating: 0x53, count: 1 << 20), attributes: [.posixPermissions: 0o600]))
        try await Self.refused(controller, ["protect", "db", "--volume", "s1", "--path", secret],
                               "host db does not allow protecting \(secret): not under its protect-allow list (\(volumes)/, unused-block-devices)",
                               "add it to protect-allow in")
        try await Self.refused(controller, ["protect", "db", "--volume", "s2", "--path", volumes + "/../../shadow"],
                               "host db does not allow protecting \(volumes)/../../shadow (\(secret))")
        try FileManager.default.createSymbolicLink(atPath: volumes + "/planted.img", withDestinationPath: secret)
        try await Self.refused(controller, ["protect", "db", "--volume", "s3", "--path", volumes + "/planted.img"],
                               "host db does not allow protecting \(volumes)/planted.img (\(secret))")
        // --create-size outside: refused, and nothing is made.
        try await Self.refused(controller, ["protect", "db", "--volume", "s4", "--path", dir.file("new.img"), "--create-size", "1M"],
                               "host db does not allow protecting \(dir.file("new.img"))")
        try await Self.refused(controller, ["protect", "db", "--volume", "s5", "--path", volumes + "/../escaped.img", "--create-size", "1M"],
                               "does not allow protecting")
        #expect(!FileManager.default.fileExists(atPath: dir.file("new.img")) && !FileManager.default.fileExists(atPath: dataDir + "/escaped.img"))
        // A directory inside the list is no volume either.
        try FileManager.default.createDirectory(atPath: volumes + "/sub", withIntermediateDirectories: true)
        try await Self.refused(controller, ["protect", "db", "--volume", "s6", "--path", volumes + "/sub"], "a directory")

        // Nothing was recorded or copied: no volume, no replica, the agent remembers none.
        let listed = try await controller.ctl("volumes", "--json")
        #expect(try API.decoder().decode([API.Volume].self, from: Data(listed.stdout.utf8)).isEmpty, "\(listed)")
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: controller.dataDir + "/replicas")) ?? []).allSatisfy { host in
            ((try? FileManager.default.contentsOfDirectory(atPath: controller.dataDir + "/replicas/" + host)) ?? []).isEmpty
        })
        #expect(!((try? String(contentsOfFile: dataDir + "/volumes.json", encoding: .utf8)) ?? "").contains("shadow"))
        let audit = try await controller.audit()
        for (volume, _) in [("s1", secret), ("s2", ""), ("s3", ""), ("s4", ""), ("s5", "")] {
            #expect(audit.contains { $0.action == "volume.protect-refused" && $0.target == "db/\(volume)" && $0.actor == "api:admin" && $0.detail.contains("does not allow") },
                    "\(volume): \(audit)")
        }

        // Inside the default list: works.
        let image = volumes + "/data.img"
        let ok = try await controller.ctl("protect", "db", "--volume", "data", "--path", image, "--create-size", "4M")
        #expect(ok.status == 0, "\(ok)")
        #expect(try await eventually(timeout: .seconds(30), every: .milliseconds(300)) {
            let shown = try await controller.ctl("volume", "show", "db/data", "--json")
            return try API.decoder().decode(API.Volume.self, from: Data(shown.stdout.utf8)).replicaState == .protected
        })

        // Downloading the image is audited: who took which volume at which point.
        let out = dir.file("download.img")
        let downloaded = try await controller.ctl("volume", "export", "db/data", "--point", "latest", "--out", out)
        #expect(downloaded.status == 0, "\(downloaded)")
        #expect(try await controller.audit().contains {
            $0.action == "volume.download" && $0.target == "db/data" && $0.actor == "api:admin" && $0.detail == "point=latest"
        })
        _ = await agent.terminate()
        _ = await controller.process.terminate()
    }

    @Test("an explicit protect-allow permits exactly what it lists; a volume protected before the list existed is still served, with a warning the controller audits")
    func explicitListAndEarlierVolumes() async throws {
        let dir = try TestDirectory()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"))
        // Before the list: the agent allows its whole test directory (as every agent did).
        let first = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir)
        #expect(try await controller.waitFor("db", state: "online"))
        let legacy = dir.sub("legacy") + "/old.img"
        let made = try await controller.ctl("protect", "db", "--volume", "old", "--path", legacy, "--create-size", "4M")
        #expect(made.status == 0, "\(made)")
        #expect(await first.terminate().status == 0)
        #expect(try await controller.waitFor("db", state: "offline"))

        // The host now lists one image and one directory: the old volume is outside both.
        let dataDir = dir.path + "/agent-db"
        let config = dir.file("agent.yaml")
        let extra = dir.sub("extra"), images = dir.sub("images")
        try "protect-allow:\n  - \(extra)/one.img\n  - \(images)/\n".write(toFile: config, atomically: true, encoding: .utf8)
        let agent = try await AgentProcess.start(dataDir: dataDir, arguments: ["--config", config], logPath: dir.file("db-2.log"), allowTestDirectory: false)
        #expect(try await controller.waitFor("db", state: "online"))

        // Still served, with a warning in the agent's log and an audit entry from the controller.
        let shown = try await controller.ctl("volume", "show", "db/old", "--json")
        let socket = try #require(try API.decoder().decode(API.Volume.self, from: Data(shown.stdout.utf8)).socketPath)
        let info = try await run("/usr/bin/nbdinfo", ["--size", "nbd+unix:///old?socket=\(socket)"])
        #expect(info.status == 0 && info.stdout.contains("\(4 << 20)"), "\(info)")
        #expect(agent.log.contains("outside protect-allow"), "\(agent.log)")
        var entry: API.AuditEntry?
        #expect(try await eventually(timeout: .seconds(10), every: .milliseconds(200)) {
            entry = try await controller.audit().first { $0.action == "volume.outside-protect-allow" && $0.target == "db/old" }
            return entry != nil
        })
        #expect(entry?.actor == "agent:db" && entry?.detail.contains(legacy) == true && entry?.detail.contains("protect-allow") == true, "\(String(describing: entry))")

        // Exactly what is listed: the image, anything below the directory; not a neighbour, not
        // another file next to the earlier volume, not the default volumes dir any more.
        #expect(try await controller.ctl("protect", "db", "--volume", "one", "--path", extra + "/one.img", "--create-size", "4M").status == 0)
        // (a '..' that stays inside the directory is fine: the real path decides)
        _ = dir.sub("images/deep")
        #expect(try await controller.ctl("protect", "db", "--volume", "two", "--path", images + "/deep/../two.img", "--create-size", "4M").status == 0)
        #expect(FileManager.default.fileExists(atPath: images + "/two.img"))
        try await Self.refused(controller, ["protect", "db", "--volume", "three", "--path", extra + "/three.img", "--create-size", "4M"],
                               "host db does not allow protecting \(extra)/three.img", "add it to protect-allow in \(config)")
        try await Self.refused(controller, ["protect", "db", "--volume", "again", "--path", dir.path + "/legacy/again.img", "--create-size", "4M"],
                               "does not allow protecting")
        try await Self.refused(controller, ["protect", "db", "--volume", "def", "--path", dataDir + "/volumes/def.img", "--create-size", "4M"],
                               "does not allow protecting")
        #expect(!FileManager.default.fileExists(atPath: extra + "/three.img") && !FileManager.default.fileExists(atPath: dir.path + "/legacy/again.img"))
        _ = await agent.terminate()
        _ = await controller.process.terminate()
    }
}
