import FerryCLICore
import FerryWire
import Foundation
import Testing

/// `ferryctl apply` files: parsing with FILE:LINE errors, and the plan of changes.
@Suite("declarative configuration files")
struct UnitDeclarativeTests {
    static let text = """
        # protection
        kind: volume
        host: db
        volume: data
        path: /srv/db.img
        create-size: 16M
        ---
        kind: group
        name: shop
        volumes: [db/data, app/data]
        policy:
          crash-interval: 5s
          rpo-alert: 2m
          hold-budget: 80ms
        ---
        kind: plan
        name: shop
        groups:
          - name: db
            items:
              - host: db
                recovery-host: rec1
        """

    @Test("documents parse with their lines; a plan keeps its text with the kind line blanked and its lines in place")
    func parse() throws {
        let found = try DeclarationParser.parse(Self.text, file: "site.yaml")
        #expect(found.count == 3)
        guard case .volume(let v) = found[0], case .group(let g) = found[1], case .plan(let p) = found[2] else {
            Issue.record("\(found)"); return
        }
        #expect(v.key == "db/data" && v.createSizeBytes == 16 << 20 && v.capture == "export" && v.location.description == "site.yaml:2")
        #expect(g.volumes == ["db/data", "app/data"] && g.policy.crashIntervalSeconds == 5 && g.policy.rpoAlertSeconds == 120
                && g.policy.holdBudgetMilliseconds == 80 && g.policy.appIntervalSeconds == API.GroupPolicy().appIntervalSeconds)
        #expect(g.location.line == 8)
        let lines = p.text.split(separator: "\n", omittingEmptySubsequences: false)
        #expect(lines.count >= 22 && lines[16] == "name: shop" && !p.text.contains("kind:"), "\(lines)")
    }

    @Test("mistakes are reported at their file and line")
    func errors() {
        func message(_ text: String) -> String {
            do { _ = try DeclarationParser.parse(text, file: "f.yaml"); return "" } catch { return (error as? FerryError)?.message ?? "\(error)" }
        }
        #expect(message("kind: volume\nhost: db\nvolume: x\npath: /p\ncolume: 3\n").hasPrefix("f.yaml:5: unknown key 'colume'"))
        #expect(message("kind: group\nname: g\nvolumes: [a/b]\npolicy:\n  crash-interval: soon\n").hasPrefix("f.yaml:5: a duration"))
        #expect(message("kind: group\nname: g\nvolumes: [a/b]\npolicy:\n  crash: 5s\n").hasPrefix("f.yaml:5: unknown policy key 'crash'"))
        #expect(message("kind: volume\nhost: db\n---\nkind: rocket\n").hasPrefix("f.yaml:1: missing 'volume'"))
        #expect(message("kind: volume\nhost: db\nvolume: x\npath: /p\n---\nkind: rocket\n").hasPrefix("f.yaml:6: unknown kind 'rocket'"))
        #expect(message("kind: volume\nhost: [db\n").hasPrefix("f.yaml:"), "\(message("kind: volume\nhost: [db\n"))")
        #expect(message("kind: group\nname: g\nvolumes:\n  - a/b\n  - nohost\n").hasPrefix("f.yaml:5: a member is HOST/VOLUME"))
    }

    @Test("the plan: new things are made, matching ones left alone, groups change in place, a path cannot")
    func plan() throws {
        let declared = try DeclarationParser.parse(Self.text, file: "site.yaml")
        let empty = try DeclarativePlan.make(declared, volumes: [], groups: [], plans: [])
        #expect(empty.lines.map { String($0.prefix(14)) } == ["+ volume db/da", "+ group shop: ", "+ plan shop"])

        var volume = API.Volume(host: "db", name: "data", path: "/srv/db.img", sizeBytes: 16 << 20, state: .exported, socketPath: nil,
                                lastSequence: nil, protectedAt: Date())
        volume.captureMode = "export"
        guard case .group(let g) = declared[1], case .plan(let p) = declared[2] else { return }
        let group = API.Group(name: "shop", volumes: ["db/data", "app/data"], policy: g.policy, createdAt: Date(), points: 3, newestPoint: nil,
                              rpoSeconds: nil, rpoAlert: false, lastRoundError: nil)
        let stored = API.Plan(plan: RecoveryPlan(name: "shop", description: "", groups: []), state: .protected, updatedAt: Date(), lastJob: nil,
                              source: p.text.trimmingCharacters(in: .newlines))
        let same = try DeclarativePlan.make(declared, volumes: [volume], groups: [group], plans: [stored])
        #expect(same.changes.isEmpty && same.unchanged == ["volume db/data", "group shop", "plan shop"])

        var older = group
        older.volumes = ["db/data", "web/data"]
        older.policy.crashIntervalSeconds = 15
        let changed = try DeclarativePlan.make(declared, volumes: [volume], groups: [older], plans: [stored])
        #expect(changed.lines == ["~ group shop: + app/data; - web/data; crash-interval 15s → 5s"])

        var moved = volume
        moved.path = "/elsewhere.img"
        #expect(throws: FerryError.self) { _ = try DeclarativePlan.make(declared, volumes: [moved], groups: [group], plans: [stored]) }
        #expect(throws: FerryError.self) { _ = try DeclarativePlan.make(declared + declared, volumes: [], groups: [], plans: []) }

        // What `get` exports parses back into the same declarations: applying it changes nothing.
        let exported = DeclarativeExport.yaml(volumes: [volume], groups: [group], plans: [stored])
        let back = try DeclarationParser.parse(exported, file: "export.yaml")
        #expect(try DeclarativePlan.make(back, volumes: [volume], groups: [group], plans: [stored]).changes.isEmpty, "\(exported)")
    }

    @Test("Windows line ends and commented separators parse; a volume moving between groups leaves one before it joins the other")
    func lineEndsAndMoves() throws {
        let crlf = Self.text.replacingOccurrences(of: "\n", with: "\r\n").replacingOccurrences(of: "---\r\n", with: "--- # next\r\n")
        let parsed = try DeclarationParser.parse(crlf, file: "win.yaml")
        #expect(parsed.count == 3)
        if case .plan(let p) = parsed[2] { #expect(!p.text.contains("kind:") && p.text.contains("name: shop")) }
        let files = try DeclarationParser.parse("""
            kind: group
            name: a
            volumes: [db/x, db/moving]
            ---
            kind: group
            name: b
            volumes: [db/y]
            """, file: "groups.yaml")
        func group(_ name: String, _ volumes: [String]) -> API.Group {
            API.Group(name: name, volumes: volumes, policy: API.GroupPolicy(), createdAt: Date(), points: 0, newestPoint: nil, rpoSeconds: nil,
                      rpoAlert: false, lastRoundError: nil)
        }
        let plan = try DeclarativePlan.make(files, volumes: [], groups: [group("a", ["db/x"]), group("b", ["db/y", "db/moving"])], plans: [])
        #expect(plan.lines == ["~ group b: - db/moving", "~ group a: + db/moving"])
    }
}
