import FerryControllerCore
import FerryWire
import Foundation
import Testing

@Suite("Unit PlanParser")
struct UnitPlanParserTests {
    /// Enrolled hosts db, app, web (protected) and rec1, rec2 (secondary site).
    static let known = PlanParser.Known(
        hosts: ["db", "app", "web", "rec1", "rec2"],
        volumes: ["db": ["data", "log", "archive"], "app": ["root"], "web": ["root", "static"]]
    )

    static let sample = """
        name: shop
        description: three-tier web shop
        groups:
          - name: db
            pre:
              - hook: check-dr-dns
                host: rec1
                timeout: 60s
              - gate: "confirm the storage team is ready"
                timeout: 24h
            items:
              - host: db
                recovery-host: rec1
                volumes: [data, log]
                start-hook: start-db
                stop-hook: stop-db
                timeout: 300s
                networks:
                  - source: prod
                    recovery: dr
                    test: drill
          - name: app
            post:
              - hook: smoke-test
                host: rec2
            items:
              - host: app
                recovery-host: rec2
                volumes: [root]
                start-hook: start-app
        """

    static let expectedSample = RecoveryPlan(name: "shop", description: "three-tier web shop", groups: [
        RecoveryPlanGroup(
            name: "db",
            pre: [.hook(host: "rec1", name: "check-dr-dns", timeoutSeconds: 60),
                  .gate(message: "confirm the storage team is ready", timeoutSeconds: 86_400)],
            post: [],
            items: [RecoveryPlanItem(host: "db", recoveryHost: "rec1", volumes: ["data", "log"], startHook: "start-db",
                                     stopHook: "stop-db", timeoutSeconds: 300,
                                     networks: [NetworkMapping(source: "prod", recovery: "dr", test: "drill")])]),
        RecoveryPlanGroup(
            name: "app", pre: [],
            post: [.hook(host: "rec2", name: "smoke-test", timeoutSeconds: 600)],
            items: [RecoveryPlanItem(host: "app", recoveryHost: "rec2", volumes: ["root"], startHook: "start-app",
                                     stopHook: nil, timeoutSeconds: 600, networks: [])]),
    ])

    /// The smallest valid plan; error cases below change one thing in it (lines 1-6).
    static let minimal = """
        name: shop
        groups:
          - name: db
            items:
              - host: db
                recovery-host: rec1
        """

    /// The problems reported for `yaml`, one per line (empty when it parses).
    static func problems(_ yaml: String, known: PlanParser.Known = known) -> [String] {
        do {
            _ = try PlanParser.parse(yaml, file: "plan.yaml", known: known)
            return []
        } catch let error as FerryError {
            #expect(error.code == .badRequest)
            return error.message.split(separator: "\n").map(String.init)
        } catch {
            Issue.record("not a FerryError: \(error)")
            return []
        }
    }

    // MARK: Valid plans

    @Test("the sample parses into the exact expected model")
    func sample() throws {
        let plan = try PlanParser.parse(Self.sample, file: "plan.yaml", known: Self.known)
        #expect(plan == Self.expectedSample)
        #expect(plan.volumeKeys == ["db/data", "db/log", "app/root"])
    }

    @Test("defaults: description, steps, volumes, timeouts, hooks, networks")
    func defaults() throws {
        let yaml = """
            name: shop
            groups:
              - name: db
                pre:
                  - hook: check
                    host: rec1
                  - gate: go on?
                items:
                  - host: db
                    recovery-host: rec1
                    networks:
                      - source: prod
                        recovery: dr
            """
        let plan = try PlanParser.parse(yaml, file: "plan.yaml", known: Self.known)
        #expect(plan == RecoveryPlan(name: "shop", description: "", groups: [
            RecoveryPlanGroup(name: "db",
                              pre: [.hook(host: "rec1", name: "check", timeoutSeconds: 600), .gate(message: "go on?", timeoutSeconds: 86_400)],
                              post: [],
                              items: [RecoveryPlanItem(host: "db", recoveryHost: "rec1", volumes: ["data", "log", "archive"],
                                                       startHook: nil, stopHook: nil, timeoutSeconds: 600,
                                                       networks: [NetworkMapping(source: "prod", recovery: "dr", test: "test")])]),
        ]))
        #expect(plan.volumeKeys == ["db/data", "db/log", "db/archive"])
        #expect(plan.groups[0].pre.map(\.timeoutSeconds) == [PlanParser.defaultHookTimeoutSeconds, PlanParser.defaultGateTimeoutSeconds])
    }

    @Test("durations: units, bare seconds, and the 7-day limit itself")
    func durations() throws {
        for (text, seconds) in [("90", 90), ("15s", 15), ("10m", 600), ("2h", 7_200), ("1d", 86_400), ("7d", 604_800), ("2000ms", 2)] {
            let yaml = Self.minimal + "\n        timeout: \(text)"
            let plan = try PlanParser.parse(yaml, file: "plan.yaml", known: Self.known)
            #expect(plan.groups[0].items[0].timeoutSeconds == seconds, "\(text)")
        }
    }

    @Test("a volume taken by the plan being replaced is not a conflict")
    func takenBySelf() throws {
        let known = PlanParser.Known(hosts: Self.known.hosts, volumes: Self.known.volumes, taken: ["db/data": "shop"])
        let plan = try PlanParser.parse(Self.minimal, file: "plan.yaml", known: known)
        #expect(plan.volumeKeys.first == "db/data")
    }

    @Test("deploy/config/plan.yaml is a valid plan")
    func shippedSample() throws {
        let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().deletingLastPathComponent()
        let path = repository.appendingPathComponent("deploy/config/plan.yaml").path
        let text = try #require(FileManager.default.contents(atPath: path).flatMap { String(data: $0, encoding: .utf8) })
        let known = PlanParser.Known(hosts: ["db", "app", "web", "rec1", "rec2"],
                                     volumes: ["db": ["data", "log"], "app": ["root"], "web": ["root"]])
        let plan = try PlanParser.parse(text, file: path, known: known)
        #expect(plan.name == "shop")
        #expect(plan.groups.map(\.name) == ["db", "app", "web"])
        #expect(plan.groups.flatMap(\.items).map(\.startHook) == ["start-db", "start-app", "start-web"])
        #expect(plan.groups.flatMap(\.items).map(\.stopHook) == ["stop-db", "stop-app", "stop-web"])
        #expect(plan.groups[1].pre.count == 1)
        if case .gate = plan.groups[1].pre.first {} else { Issue.record("no gate before app: \(plan.groups[1].pre)") }
        #expect(plan.volumeKeys == ["db/data", "db/log", "app/root", "web/root"])
    }

    // MARK: One problem each

    struct Case: Sendable, CustomTestStringConvertible {
        var name: String
        var yaml: String
        /// Every (prefix, substring) pair must be found on one reported line.
        var expected: [(String, String)]
        var known: PlanParser.Known = UnitPlanParserTests.known
        var testDescription: String { name }
    }

    static func edit(_ replacements: [(String, String)]) -> String {
        replacements.reduce(minimal) { $0.replacingOccurrences(of: $1.0, with: $1.1) }
    }

    static let cases: [Case] = [
        Case(name: "missing name", yaml: edit([("name: shop\n", "")]),
             expected: [("plan.yaml:1:", "the plan is missing 'name'")]),
        Case(name: "missing groups", yaml: "name: shop\ndescription: x\n",
             expected: [("plan.yaml:1:", "the plan is missing 'groups'")]),
        Case(name: "unknown top-level key", yaml: minimal + "\ndescripton: typo",
             expected: [("plan.yaml:7:", "unknown key 'descripton' in the plan")]),
        Case(name: "unknown item key (and so a missing one)", yaml: edit([("recovery-host", "recovery_host")]),
             expected: [("plan.yaml:6:", "unknown key 'recovery_host' in an item"),
                        ("plan.yaml:5:", "the item for host 'db' is missing 'recovery-host'")]),
        Case(name: "unknown group key", yaml: edit([("    items:", "    steps: []\n    items:")]),
             expected: [("plan.yaml:4:", "unknown key 'steps' in a group")]),
        Case(name: "a mapping where a list is expected", yaml: "name: shop\ngroups:\n  name: db\n",
             expected: [("plan.yaml:2:", "'groups' must be a list, not a mapping")]),
        Case(name: "a string where a list is expected", yaml: minimal + "\n        volumes: data",
             expected: [("plan.yaml:7:", "'volumes' must be a list, not a string")]),
        Case(name: "a list where a string is expected", yaml: edit([("recovery-host: rec1", "recovery-host: [rec1]")]),
             expected: [("plan.yaml:6:", "'recovery-host' must be a string, not a list")]),
        Case(name: "a key with no value", yaml: minimal + "\n        start-hook:",
             expected: [("plan.yaml:7:", "'start-hook' has no value")]),
        Case(name: "a step that is not a mapping", yaml: edit([("    items:", "    pre:\n      - check-dns\n    items:")]),
             expected: [("plan.yaml:5:", "a 'pre' step must be a mapping")]),
        Case(name: "a plan that is a list", yaml: "- name: shop\n",
             expected: [("plan.yaml:1:", "the plan must be a mapping")]),
        Case(name: "empty document", yaml: "# nothing yet\n",
             expected: [("plan.yaml:1:", "the plan is empty")]),
        Case(name: "bad plan name", yaml: edit([("name: shop", "name: Shop_1")]),
             expected: [("plan.yaml:1:", "plan name 'Shop_1' is not valid")]),
        Case(name: "plan name too long", yaml: edit([("name: shop", "name: " + String(repeating: "a", count: 64))]),
             expected: [("plan.yaml:1:", "is not valid")]),
        Case(name: "bad group name", yaml: edit([("- name: db", "- name: -db")]),
             expected: [("plan.yaml:3:", "group name '-db' is not valid")]),
        Case(name: "bad hook name", yaml: minimal + "\n        start-hook: start db",
             expected: [("plan.yaml:7:", "'start db' is not a valid hook name")]),
        Case(name: "unparsable duration", yaml: minimal + "\n        timeout: 5x",
             expected: [("plan.yaml:7:", "timeout: '5x' is not a duration")]),
        Case(name: "zero duration", yaml: minimal + "\n        timeout: 0s",
             expected: [("plan.yaml:7:", "timeout '0s' must be more than 0")]),
        Case(name: "negative duration", yaml: minimal + "\n        timeout: -5s",
             expected: [("plan.yaml:7:", "timeout: '-5s' is not a duration")]),
        Case(name: "duration over 7 days", yaml: minimal + "\n        timeout: 8d",
             expected: [("plan.yaml:7:", "timeout '8d' is longer than 7 days")]),
        Case(name: "duration just over 7 days", yaml: minimal + "\n        timeout: 604801",
             expected: [("plan.yaml:7:", "is longer than 7 days")]),
        Case(name: "duration in part-seconds", yaml: minimal + "\n        timeout: 1500ms",
             expected: [("plan.yaml:7:", "timeout '1500ms' must be a whole number of seconds")]),
        Case(name: "step duration", yaml: edit([("    items:", "    pre:\n      - gate: ok?\n        timeout: 1y\n    items:")]),
             expected: [("plan.yaml:6:", "timeout: '1y' is not a duration")]),
        Case(name: "duplicate group names",
             yaml: minimal + "\n  - name: db\n    items:\n      - host: app\n        recovery-host: rec2",
             expected: [("plan.yaml:7:", "group name 'db' is used twice (first at line 3)")]),
        Case(name: "a volume twice in one item", yaml: minimal + "\n        volumes: [data, log, data]",
             expected: [("plan.yaml:7:", "volume db/data is listed twice in the plan (first at line 7)")]),
        Case(name: "a volume in two items (same host twice)",
             yaml: minimal + "\n        volumes: [data]\n      - host: db\n        recovery-host: rec2\n        volumes:\n          - log\n          - data",
             expected: [("plan.yaml:8:", "host 'db' is already an item at line 5"),
                        ("plan.yaml:12:", "volume db/data is listed twice in the plan (first at line 7)")]),
        Case(name: "a host twice across groups",
             yaml: minimal + "\n        volumes: [data]\n  - name: app\n    items:\n      - host: db\n        recovery-host: rec2\n        volumes: [log]",
             expected: [("plan.yaml:10:", "host 'db' is already an item at line 5")]),
        Case(name: "unknown item host", yaml: edit([("host: db", "host: nope")]),
             expected: [("plan.yaml:5:", "'host': unknown host 'nope'")]),
        Case(name: "unknown recovery host", yaml: edit([("recovery-host: rec1", "recovery-host: rec9")]),
             expected: [("plan.yaml:6:", "'recovery-host': unknown host 'rec9'")]),
        Case(name: "recovery host is the host", yaml: edit([("recovery-host: rec1", "recovery-host: db")]),
             expected: [("plan.yaml:6:", "'recovery-host' must differ from 'host'")]),
        Case(name: "unprotected volume", yaml: minimal + "\n        volumes:\n          - data\n          - nope",
             expected: [("plan.yaml:9:", "'nope' is not a protected volume of host 'db' (protected: data, log, archive)")]),
        Case(name: "invalid volume name", yaml: minimal + "\n        volumes: [.hidden]",
             expected: [("plan.yaml:7:", "'.hidden' is not a valid volume name")]),
        Case(name: "a host without protected volumes",
             yaml: edit([("host: db", "host: rec2")]),
             expected: [("plan.yaml:5:", "host 'rec2' has no protected volumes")]),
        Case(name: "empty volume list", yaml: minimal + "\n        volumes: []",
             expected: [("plan.yaml:7:", "'volumes' is empty")]),
        Case(name: "a volume of another plan", yaml: minimal + "\n        volumes:\n          - log\n          - data",
             expected: [("plan.yaml:9:", "db/data already belongs to plan 'billing'")],
             known: PlanParser.Known(hosts: known.hosts, volumes: known.volumes, taken: ["db/data": "billing"])),
        Case(name: "a defaulted volume of another plan", yaml: minimal,
             expected: [("plan.yaml:5:", "db/archive already belongs to plan 'billing'")],
             known: PlanParser.Known(hosts: known.hosts, volumes: known.volumes, taken: ["db/archive": "billing"])),
        Case(name: "hook step without host", yaml: edit([("    items:", "    pre:\n      - hook: check\n        timeout: 5s\n    items:")]),
             expected: [("plan.yaml:5:", "hook step 'check' needs 'host'")]),
        Case(name: "hook step on an unknown host", yaml: edit([("    items:", "    post:\n      - hook: check\n        host: rec7\n    items:")]),
             expected: [("plan.yaml:6:", "'host': unknown host 'rec7'")]),
        Case(name: "step with hook and gate", yaml: edit([("    items:", "    pre:\n      - hook: check\n        host: rec1\n        gate: wait\n    items:")]),
             expected: [("plan.yaml:5:", "a 'pre' step has both 'hook' and 'gate'")]),
        Case(name: "step with neither hook nor gate", yaml: edit([("    items:", "    post:\n      - timeout: 5s\n    items:")]),
             expected: [("plan.yaml:5:", "a 'post' step needs either 'hook'")]),
        Case(name: "gate with a host", yaml: edit([("    items:", "    pre:\n      - gate: wait\n        host: rec1\n    items:")]),
             expected: [("plan.yaml:6:", "a gate step takes no 'host'")]),
        Case(name: "empty groups", yaml: "name: shop\ngroups: []\n",
             expected: [("plan.yaml:2:", "'groups' is empty")]),
        Case(name: "missing items", yaml: "name: shop\ngroups:\n  - name: db\n    pre: []\n",
             expected: [("plan.yaml:3:", "group 'db' is missing 'items'")]),
        Case(name: "empty items", yaml: "name: shop\ngroups:\n  - name: db\n    items: []\n",
             expected: [("plan.yaml:4:", "'items' of group 'db' is empty")]),
        Case(name: "network without recovery", yaml: minimal + "\n        networks:\n          - source: prod\n            test: t",
             expected: [("plan.yaml:8:", "a network mapping is missing 'recovery'")]),
        Case(name: "network mapped twice",
             yaml: minimal + "\n        networks:\n          - {source: prod, recovery: dr}\n          - {source: prod, recovery: dr2}",
             expected: [("plan.yaml:9:", "network 'prod' is mapped twice in this item (first at line 8)")]),
        Case(name: "target of a volume the item does not recover", yaml: minimal + "\n        volumes: [data]\n        targets:\n          log: /srv/log.img",
             expected: [("plan.yaml:9:", "'targets' names 'log', which is not a volume this item recovers (data)")]),
        Case(name: "relative target", yaml: minimal + "\n        targets:\n          data: data.img",
             expected: [("plan.yaml:8:", "target 'data.img' of data must be an absolute path")]),
        Case(name: "target with ..", yaml: minimal + "\n        targets:\n          data: /srv/../etc/shadow",
             expected: [("plan.yaml:8:", "must be an absolute path without '..'")]),
        Case(name: "one target for two volumes", yaml: minimal + "\n        targets:\n          data: /srv/x.img\n          log: /srv/x.img",
             expected: [("plan.yaml:9:", "target '/srv/x.img' is given twice in this item (first at line 8)")]),
        Case(name: "targets not a mapping", yaml: minimal + "\n        targets: [/srv/x.img]",
             expected: [("plan.yaml:7:", "'targets' must be a mapping of volume names to paths")]),
    ]

    @Test("targets: each volume's path, kept in the plan")
    func targets() throws {
        let plan = try PlanParser.parse(Self.minimal + "\n        targets:\n          data: /dev/vdb\n          log: /srv/ferry/db-log.img",
                                        file: "plan.yaml", known: Self.known)
        #expect(plan.groups[0].items[0].targets == ["data": "/dev/vdb", "log": "/srv/ferry/db-log.img"])
        #expect(try PlanParser.parse(Self.minimal, file: "plan.yaml", known: Self.known).groups[0].items[0].targets == nil)
    }

    @Test("each problem is reported with its line", arguments: cases)
    func problem(_ c: Case) {
        let lines = Self.problems(c.yaml, known: c.known)
        #expect(!lines.isEmpty, "parsed without error")
        for (prefix, text) in c.expected {
            #expect(lines.contains { $0.hasPrefix(prefix) && $0.contains(text) }, "expected \(prefix) … \(text) in:\n\(lines.joined(separator: "\n"))")
        }
        #expect(lines.count == c.expected.count, "unexpected extra problems:\n\(lines.joined(separator: "\n"))")
    }

    @Test("every problem is reported, in line order")
    func manyProblems() {
        let yaml = """
            name: Shop
            groups:
              - name: db
                pre:
                  - hook: check
                  - gate: wait
                    timeout: 9d
                items:
                  - host: db
                    recovery-host: db
                    volumes: [data, nope]
                    stop_hook: stop-db
              - name: db
                items:
                  - host: ghost
                    recovery-host: rec1
            """
        let lines = Self.problems(yaml)
        let expected = [
            "plan.yaml:1: plan name 'Shop' is not valid",
            "plan.yaml:5: hook step 'check' needs 'host'",
            "plan.yaml:7: timeout '9d' is longer than 7 days",
            "plan.yaml:10: 'recovery-host' must differ from 'host'",
            "plan.yaml:11: 'nope' is not a protected volume of host 'db'",
            "plan.yaml:12: unknown key 'stop_hook' in an item",
            "plan.yaml:13: group name 'db' is used twice (first at line 3)",
            "plan.yaml:15: 'host': unknown host 'ghost'",
        ]
        #expect(lines.count == expected.count, "\(lines.joined(separator: "\n"))")
        for (line, text) in zip(lines, expected) {
            #expect(line.hasPrefix(text), "\(line) should start with \(text)")
        }
    }

    @Test("the file name given is the one in messages")
    func fileName() {
        let error = #expect(throws: FerryError.self) {
            _ = try PlanParser.parse("name: shop\n", file: "/etc/ferry/plans/shop.yaml", known: Self.known)
        }
        #expect(error?.message == "/etc/ferry/plans/shop.yaml:1: the plan is missing 'groups'")
    }

    // MARK: YAML syntax

    static let syntaxErrors: [(String, String, String)] = [
        ("unclosed flow list", minimal + "\n        volumes: [data, log\n        start-hook: s", "plan.yaml:8:"),
        ("tab indentation", "name: shop\ngroups:\n\t- name: db\n", "plan.yaml:3:"),
        ("bad indentation", "name: shop\ngroups:\n  - name: db\n     items: []\n", "plan.yaml:4:"),
        ("unclosed quote", "name: shop\ndescription: \"three tier\ngroups: []\n", "plan.yaml:4:"),
        ("two documents", minimal + "\n---\nname: other\n", "plan.yaml:7:"),
    ]

    @Test("a YAML syntax error reports its line", arguments: syntaxErrors)
    func syntax(name: String, yaml: String, prefix: String) {
        let lines = Self.problems(yaml)
        #expect(lines.count == 1, "\(lines)")
        #expect(lines.first?.hasPrefix(prefix + " invalid YAML:") == true, "\(name): \(lines)")
    }

    @Test("a key given twice reports the second occurrence")
    func duplicateKey() {
        let lines = Self.problems(Self.minimal + "\n        recovery-host: rec2")
        #expect(lines == ["plan.yaml:7: duplicate key 'recovery-host' (first at line 6)"])
        let flow = Self.problems("name: shop\ngroups: [{name: db, name: web}]\n")
        #expect(flow.count == 1)
        #expect(flow.first?.hasPrefix("plan.yaml:2: duplicate key 'name'") == true, "\(flow)")
    }

    // MARK: JSON

    @Test("JSON round trip is lossless")
    func jsonRoundTrip() throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let data = try encoder.encode(Self.expectedSample)
        let decoded = try JSONDecoder().decode(RecoveryPlan.self, from: data)
        #expect(decoded == Self.expectedSample)
        #expect(try encoder.encode(decoded) == data)
    }

    @Test("steps are JSON objects with a kind")
    func stepJSON() throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let hook = String(decoding: try encoder.encode(RecoveryPlanStep.hook(host: "rec1", name: "check", timeoutSeconds: 60)), as: UTF8.self)
        #expect(hook == #"{"host":"rec1","kind":"hook","name":"check","timeoutSeconds":60}"#)
        let gate = String(decoding: try encoder.encode(RecoveryPlanStep.gate(message: "go", timeoutSeconds: 5)), as: UTF8.self)
        #expect(gate == #"{"kind":"gate","message":"go","timeoutSeconds":5}"#)
        #expect(try JSONDecoder().decode(RecoveryPlanStep.self, from: Data(gate.utf8)) == .gate(message: "go", timeoutSeconds: 5))
        #expect(throws: DecodingError.self) {
            _ = try JSONDecoder().decode(RecoveryPlanStep.self, from: Data(#"{"kind":"wait","timeoutSeconds":5}"#.utf8))
        }
        #expect(throws: DecodingError.self) {
            _ = try JSONDecoder().decode(RecoveryPlanStep.self, from: Data(#"{"kind":"hook","name":"x","timeoutSeconds":5}"#.utf8))
        }
    }
}
