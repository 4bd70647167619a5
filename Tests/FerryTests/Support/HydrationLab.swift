import FerryWire
import Foundation
import Testing

/// The two-host setup hydration tests share: a controller with an NBD TLS listener, a source
/// agent `db` with one protected volume `data` (written with `writes`, caught up, in group
/// `shop` with one point cut) and a recovery agent `rec1` whose hydration is slowed to 4 MiB/s
/// (so a test can act midway), and plan `shop` landing db/data on rec1 at `target`.
struct HydrationLab {
    static let plan = """
        name: shop
        groups:
          - name: db
            items:
              - host: db
                recovery-host: rec1
                targets:
                  data: TARGET
        """

    let dir: TestDirectory
    var controller: ControllerProcess
    let db: ChildProcess
    var rec1: ChildProcess
    let recConfig: String
    let site: FailoverTests.Site
    let point: String
    let target: String
    let planFile: String

    static func start(size: String, writes: [String]) async throws -> HydrationLab {
        let failover = FailoverTests()
        let dir = try TestDirectory()
        let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"), arguments: ["--nbd-tls-listen", "127.0.0.1:0"])
        let recConfig = dir.file("agent-rec1.yaml")
        try "hydration-rate-limit: 4M\n".write(toFile: recConfig, atomically: true, encoding: .utf8)
        let db = try await AgentProcess.enrollAndStart("db", controller: controller, in: dir)
        let rec1 = try await AgentProcess.enrollAndStart("rec1", controller: controller, in: dir, arguments: ["--config", recConfig])
        #expect(try await controller.waitFor("db", state: "online"))
        #expect(try await controller.waitFor("rec1", state: "online"))
        var r = try await controller.ctl("protect", "db", "--volume", "data", "--path", dir.sub("volumes-db") + "/data.img", "--create-size", size)
        #expect(r.status == 0, "\(r)")
        let source = "nbd+unix:///data?socket=\(dir.path)/agent-db/sockets/data.sock"
        let w = try await run("/usr/bin/qemu-io", ["-f", "raw"] + (writes + ["flush"]).flatMap { ["-c", $0] } + [source], timeout: .seconds(60))
        #expect(w.status == 0 && !(w.stdout + w.stderr).contains("failed"), "\(w)")
        let site = FailoverTests.Site(dir: dir, controller: controller, agents: [:], hooks: "", images: [:], uris: [:])
        #expect(try await failover.caughtUp(site, "db/data"))
        r = try await controller.ctl("group", "create", "shop", "--volume", "db/data", "--crash-interval", "0", "--app-interval", "0",
                                          // Not a timing test: a loaded machine must not abort the cut.
                                          "--hold-budget", "2s")
        #expect(r.status == 0, "\(r)")
        // A cut whose member misses the 50 ms hold budget (a busy machine) aborts and records
        // nothing; an operator tries again, and so does this lab: it is about what follows.
        for _ in 0..<5 {
            r = try await controller.ctl("point", "create", "shop")
            if r.status == 0 || !r.stderr.contains("aborted") { break }
        }
        #expect(r.status == 0, "\(r)")
        let point = r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        // Complete (every member's writes up to it durable here) before anything recovers it.
        #expect(try await eventually(timeout: .seconds(60), every: .milliseconds(200)) {
            let points = try await controller.ctl("points", "shop", "--json")
            return (try? API.decoder().decode([API.Point].self, from: Data(points.stdout.utf8)))?.first { $0.id == point }?.complete == true
        }, "point \(point) never completed")
        let target = dir.path + "/rec1-target/db-data.img"
        let planFile = dir.file("plan.yaml")
        try plan.replacingOccurrences(of: "TARGET", with: target).write(toFile: planFile, atomically: true, encoding: .utf8)
        r = try await controller.ctl("plan", "apply", "-f", planFile)
        #expect(r.status == 0, "\(r)")
        return HydrationLab(dir: dir, controller: controller, db: db, rec1: rec1, recConfig: recConfig, site: site, point: point,
                            target: target, planFile: planFile)
    }

    /// Applies the plan with another target (a refusal test's), or back to `target`.
    func applyPlan(target: String? = nil) async throws {
        try Self.plan.replacingOccurrences(of: "TARGET", with: target ?? self.target).write(toFile: planFile, atomically: true, encoding: .utf8)
        let r = try await controller.ctl("plan", "apply", "-f", planFile)
        #expect(r.status == 0, "\(r)")
    }
}
