import FerryAgentCore
import Foundation
import Testing

@Suite("agent hooks by name")
struct UnitHookRunnerTests {
    let runner = HookRunner(hooks: ["ok": "echo fine", "fails": "echo disk not ready >&2; exit 3", "slow": "sleep 300", "slow-pipe": "sleep 300 | cat",
                                    "leaves-child": "sleep 300 & echo started", "fds": "test $(ls /proc/self/fd | wc -l) -le 4",
                                    "env": "test \"$FERRY_PLAN\" = shop && test -z \"$LD_PRELOAD_X\" && test -z \"$FERRY_bad\""])

    @Test("a hook that exits 0 succeeds; a failing one reports its status and output; an unknown name is refused")
    func outcomes() async {
        #expect(await runner.run("ok", timeout: .seconds(60)) == nil)
        let failed = await runner.run("fails", timeout: .seconds(60))
        #expect(failed?.contains("status 3") == true && failed?.contains("disk not ready") == true, "\(String(describing: failed))")
        let unknown = await runner.run("rm -rf /", timeout: .seconds(10))
        #expect(unknown?.contains("no hook named") == true)
    }

    @Test("a hook past its timeout is killed, with its children, and reported as timed out")
    func timeout() async {
        for name in ["slow", "slow-pipe"] {
            let started = ContinuousClock.now
            let outcome = await runner.run(name, timeout: .milliseconds(500))
            #expect(outcome?.contains("timed out") == true, "\(String(describing: outcome))")
            // Far less than the hook's 300 s, with room for the ~10 s stalls the parallel tier's
            // load has caused here (the kill is late, not missing).
            #expect(started.duration(to: .now) < .seconds(60))
        }
    }

    @Test("a controller's environment reaches the hook only as FERRY_* names: PATH-like and malformed names are dropped")
    func environment() async {
        let env = ["FERRY_PLAN": "shop", "LD_PRELOAD_X": "/evil.so", "FERRY_bad": "x", "PATH": "/tmp"]
        let outcome = await runner.run("env", timeout: .seconds(60), environment: env)
        #expect(outcome == nil, "\(String(describing: outcome))")
    }

    @Test("a hook that leaves a child holding its output returns when the hook exits; a hook inherits no descriptor of the agent but its output, even with 1,500 open")
    func descriptors() async throws {
        let started = ContinuousClock.now
        #expect(await runner.run("leaves-child", timeout: .seconds(60)) == nil)
        #expect(started.duration(to: .now) < .seconds(30))
        // Many open descriptors fill a whole readdir buffer of /proc/self/fd, where Foundation's
        // Process on this toolchain read past the last entry and crashed the agent.
        try FileLimit.raise(to: 8192) // a soft limit of 1,024 would refuse them
        var opened: [Int32] = []
        defer { for fd in opened { close(fd) } }
        for _ in 0..<1500 {
            let fd = open("/dev/null", O_RDONLY | O_CLOEXEC)
            try #require(fd >= 0)
            opened.append(fd)
        }
        for _ in 0..<20 {
            let outcome = await runner.run("fds", timeout: .seconds(30))
            #expect(outcome == nil, "\(String(describing: outcome))")
        }
    }
}

/// The fsfreeze hook's refusals and configuration, without freezing anything.
@Suite("fsfreeze hook: configuration and refusals")
struct UnitFsfreezeTests {
    @Test("hooks: a command or {fsfreeze: [...]}; bad mount lists are refused at load")
    func configuration() throws {
        let dir = try TestDirectory()
        func load(_ yaml: String) throws -> AgentConfig {
            let path = dir.file("agent-\(UUID().uuidString).yaml")
            try yaml.write(toFile: path, atomically: true, encoding: .utf8)
            var config = AgentConfig(dataDir: dir.path)
            try config.apply(file: path)
            try config.validate()
            return config
        }
        let config = try load("hooks:\n  flush: sync\n  freeze-db:\n    fsfreeze: [/srv/db, /srv/wal]\n")
        #expect(config.hooks == ["flush": "sync"] && config.fsfreezeHooks == ["freeze-db": ["/srv/db", "/srv/wal"]])
        for bad in ["hooks:\n  f:\n    fsfreeze: []\n", "hooks:\n  f:\n    fsfreeze: [relative/dir]\n", "hooks:\n  f:\n    fsfreeze: [/a, /a]\n",
                    "hooks:\n  f:\n    freeze: [/a]\n"] {
            #expect(throws: (any Error).self, "\(bad)") { _ = try load(bad) }
        }
    }

    @Test("refused without freezing: not a mount point, the agent's own file system, no phase, a missing directory")
    func refusals() async throws {
        let dir = try TestDirectory()
        let freezer = FilesystemFreeze(dataDir: dir.path)
        // The mount point of the file system the test directory (the agent's data dir) is on.
        var own = dir.path
        func device(_ path: String) -> UInt { var s = stat(); return stat(path, &s) == 0 ? UInt(s.st_dev) : 0 }
        while own != "/", device((own as NSString).deletingLastPathComponent) == device(own) { own = (own as NSString).deletingLastPathComponent }
        let runner = HookRunner(hooks: [:], fsfreeze: ["sub": [dir.sub("sub")], "own": [own], "gone": [dir.path + "/missing"]], freezer: freezer)
        let quiesce = [HookRunner.phaseVariable: "quiesce"]
        #expect(await runner.run("sub", timeout: .seconds(5), environment: quiesce)?.contains("is not a mount point") == true)
        let refusal = await runner.run("own", timeout: .seconds(5), environment: quiesce) ?? ""
        #expect(refusal.contains("holds the agent's data dir"), "\(own): \(refusal)")
        #expect(await runner.run("gone", timeout: .seconds(5), environment: quiesce)?.contains("cannot open mount point") == true)
        #expect(await runner.run("sub", timeout: .seconds(5))?.contains("quiesce or thaw") == true)
        // A thaw without a freeze is no error (the controller always thaws, also after an abort).
        #expect(await runner.run("sub", timeout: .seconds(5), environment: [HookRunner.phaseVariable: "thaw"]) == nil)
        #expect(freezer.frozen.isEmpty)
    }
}
