import FerryWire
import Foundation
import Testing

/// `ferryctl apply -f` and `ferryctl get -o yaml` against a real controller and agents.
@Suite("declarative configuration")
struct ApplyTests {
    @Test("apply a directory: dry run changes nothing; apply protects, groups and plans; again changes nothing; a group changes in place; get's output applies as a no-op; errors name FILE:LINE")
    func applyDirectory() async throws {
        let dir = try TestDirectory()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"))
        defer { controller.process.signal(SIGTERM) }
        var agents: [ChildProcess] = []
        defer { for a in agents { a.signal(SIGTERM) } }
        for host in ["db", "app", "rec1"] {
            agents.append(try await AgentProcess.enrollAndStart(host, controller: controller, in: dir))
            #expect(try await controller.waitFor(host, state: "online"))
        }
        let files = dir.sub("site")
        let volumes = dir.sub("volumes")
        try """
        kind: volume
        host: db
        volume: data
        path: \(volumes)/db.img
        create-size: 8M
        ---
        kind: volume
        host: app
        volume: data
        path: \(volumes)/app.img
        create-size: 8M
        """.write(toFile: files + "/10-volumes.yaml", atomically: true, encoding: .utf8)
        func writeGroup(_ members: [String], crash: String) throws {
            try """
            # the shop's consistency group
            kind: group
            name: shop
            volumes: [\(members.joined(separator: ", "))]
            policy:
              crash-interval: \(crash)
              rpo-alert: 5m
            """.write(toFile: files + "/20-groups.yaml", atomically: true, encoding: .utf8)
        }
        try writeGroup(["db/data"], crash: "2s")
        try """
        kind: plan
        name: shop
        description: database first
        groups:
          - name: db
            items:
              - host: db
                recovery-host: rec1
        """.write(toFile: files + "/30-plan.yaml", atomically: true, encoding: .utf8)

        func ctl(_ args: String...) async throws -> CommandResult { try await controller.ctl(args) }
        let dry = try await ctl("apply", "-f", files, "--dry-run")
        #expect(dry.status == 0, "\(dry)")
        #expect(dry.stdout.contains("+ volume db/data") && dry.stdout.contains("+ volume app/data") && dry.stdout.contains("+ group shop: db/data")
                && dry.stdout.contains("+ plan shop") && dry.stdout.contains("dry run: nothing changed"), "\(dry)")
        #expect(try API.decoder().decode([API.Volume].self, from: Data(try await ctl("volumes", "--json").stdout.utf8)).isEmpty)

        let applied = try await ctl("apply", "-f", files)
        #expect(applied.status == 0 && applied.stdout.contains("applied 4 changes"), "\(applied)")
        let groups = try API.decoder().decode([API.Group].self, from: Data(try await ctl("groups", "--json").stdout.utf8))
        #expect(groups.map(\.name) == ["shop"] && groups[0].policy.crashIntervalSeconds == 2 && groups[0].policy.rpoAlertSeconds == 300)
        #expect(try await ctl("plan", "show", "shop").status == 0)
        #expect(try await eventually(timeout: .seconds(30), every: .milliseconds(300)) {
            let g = try API.decoder().decode(API.Group.self, from: Data(try await ctl("group", "show", "shop", "--json").stdout.utf8))
            return g.points >= 2
        })

        // The same files again: nothing to do, nothing audited.
        let auditBefore = try await controller.audit().count
        let again = try await ctl("apply", "-f", files)
        #expect(again.status == 0 && again.stdout.contains("no changes (4 declarations match)"), "\(again)")
        #expect(try await controller.audit().count == auditBefore)

        // The group grows and its policy changes, in place: same group, its points kept.
        let before = try API.decoder().decode(API.Group.self, from: Data(try await ctl("group", "show", "shop", "--json").stdout.utf8))
        try writeGroup(["db/data", "app/data"], crash: "1s")
        let diff = try await ctl("apply", "-f", files, "--dry-run")
        #expect(diff.stdout.contains("~ group shop: + app/data; crash-interval 2s → 1s"), "\(diff)")
        let changed = try await ctl("apply", "-f", files)
        #expect(changed.status == 0 && changed.stdout.contains("applied 1 changes; 3 unchanged"), "\(changed)")
        let after = try API.decoder().decode(API.Group.self, from: Data(try await ctl("group", "show", "shop", "--json").stdout.utf8))
        #expect(after.volumes.sorted() == ["app/data", "db/data"] && after.policy.crashIntervalSeconds == 1)
        #expect(after.createdAt == before.createdAt && after.points >= before.points)
        #expect(try await controller.audit().contains { $0.action == "group.update" && $0.target == "shop" })
        // New points cover the new member.
        #expect(try await eventually(timeout: .seconds(30), every: .milliseconds(300)) {
            let points = try API.decoder().decode([API.Point].self, from: Data(try await ctl("points", "shop", "--json").stdout.utf8))
            return points.last?.members.map(\.volume).sorted() == ["app/data", "db/data"]
        })

        // What get exports applies back as a no-op.
        let exported = try await ctl("get", "all", "-o", "yaml")
        #expect(exported.status == 0 && exported.stdout.contains("kind: plan") && exported.stdout.contains("crash-interval: 1s"), "\(exported)")
        try exported.stdout.write(toFile: dir.file("exported.yaml"), atomically: true, encoding: .utf8)
        let roundTrip = try await ctl("apply", "-f", dir.file("exported.yaml"))
        #expect(roundTrip.status == 0 && roundTrip.stdout.contains("no changes"), "\(roundTrip)\n\(exported.stdout)")

        // Errors name the file and line: ours, and the controller's for a plan.
        try "kind: volume\nhost: db\nvolume: logs\npath: \(volumes)/logs.img\nsize: 8M\n".write(toFile: dir.file("bad.yaml"), atomically: true, encoding: .utf8)
        let bad = try await ctl("apply", "-f", dir.file("bad.yaml"))
        #expect(bad.status == 1 && bad.stderr.contains("bad.yaml:5: unknown key 'size'"), "\(bad)")
        try "kind: group\nname: other\nvolumes: [db/nothing]\n".write(toFile: dir.file("missing.yaml"), atomically: true, encoding: .utf8)
        let missing = try await ctl("apply", "-f", dir.file("missing.yaml"))
        #expect(missing.status == 1 && missing.stderr.contains("missing.yaml:1:") && missing.stderr.contains("not a protected volume"), "\(missing)")
        try "\n\nkind: plan\nname: broken\ngroups:\n  - name: db\n    items:\n      - host: nohost\n        recovery-host: rec1\n"
            .write(toFile: dir.file("plan-bad.yaml"), atomically: true, encoding: .utf8)
        let planBad = try await ctl("apply", "-f", dir.file("plan-bad.yaml"))
        #expect(planBad.status == 1 && planBad.stderr.contains("plan-bad.yaml:8"), "\(planBad)")
        // A viewer may look but not apply.
        let viewer = try await ctl("api-token", "create", "looker", "--role", "viewer")
        let refused = try await controller.ctl(["apply", "-f", files], environment: ["FERRY_TOKEN": viewer.stdout.trimmingCharacters(in: .whitespacesAndNewlines)])
        #expect(refused.status == 0, "nothing to change needs no write: \(refused)")
        try writeGroup(["db/data"], crash: "1s")
        let refusedWrite = try await controller.ctl(["apply", "-f", files], environment: ["FERRY_TOKEN": viewer.stdout.trimmingCharacters(in: .whitespacesAndNewlines)])
        #expect(refusedWrite.status == 1 && refusedWrite.stderr.contains("20-groups.yaml:2:") && refusedWrite.stderr.contains("needs operator"), "\(refusedWrite)")
    }
}
