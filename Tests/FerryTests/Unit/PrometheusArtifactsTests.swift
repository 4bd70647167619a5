import Foundation
import Testing

/// deploy/prometheus/ferry-rules.yml and deploy/grafana/ferry-dashboard.json against promtool
/// and against the metrics the controller defines.
@Suite("Prometheus rules and the Grafana dashboard")
struct PrometheusArtifactsTests {
    let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent()

    /// Metric names the controller registers (ControllerMetrics' labels).
    func definedMetrics() throws -> Set<String> {
        let source = try String(contentsOf: repository.appendingPathComponent("Sources/FerryControllerCore/Metrics/ControllerMetrics.swift"), encoding: .utf8)
        let names = source.matches(of: /label: "(ferry_[a-z_]+)"/).map { String($0.output.1) }
        return Set(names)
    }

    /// `ferry_…` names an expression uses, histogram suffixes removed.
    func used(in text: String) -> Set<String> {
        Set(text.matches(of: /ferry_[a-z_]+/).map { m in
            var name = String(m.output)
            for suffix in ["_bucket", "_sum", "_count"] where name.hasSuffix(suffix) { name.removeLast(suffix.count) }
            return name
        })
    }

    @Test("promtool checks the rules and their unit tests pass; every metric they use is one the controller exports")
    func rules() async throws {
        let dir = repository.appendingPathComponent("deploy/prometheus").path
        let check = try await run("/usr/bin/promtool", ["check", "rules", dir + "/ferry-rules.yml"])
        #expect(check.status == 0 && check.stdout.contains("SUCCESS: 7 rules found"), "\(check)")
        let tests = try await run("/usr/bin/promtool", ["test", "rules", dir + "/ferry-rules.test.yml"])
        #expect(tests.status == 0, "\(tests)")
        let defined = try definedMetrics()
        #expect(defined.count > 20)
        let rules = try String(contentsOfFile: dir + "/ferry-rules.yml", encoding: .utf8)
        #expect(used(in: rules).subtracting(defined).sorted() == [])
    }

    @Test("every dashboard query is valid PromQL (checked by promtool as recording rules) on metrics the controller exports")
    func dashboard() async throws {
        let data = try Data(contentsOf: repository.appendingPathComponent("deploy/grafana/ferry-dashboard.json"))
        let dashboard = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let panels = try #require(dashboard["panels"] as? [[String: Any]])
        let exprs = panels.flatMap { ($0["targets"] as? [[String: Any]] ?? []).compactMap { $0["expr"] as? String } }
        #expect(exprs.count >= 12)
        let defined = try definedMetrics()
        #expect(used(in: exprs.joined(separator: "\n")).subtracting(defined).sorted() == [])
        let dir = try TestDirectory()
        var yaml = "groups:\n  - name: dashboard\n    rules:\n"
        for (i, e) in exprs.enumerated() {
            yaml += "      - record: ferry_dashboard_query_\(i)\n        expr: '\(e.replacingOccurrences(of: "'", with: "''"))'\n"
        }
        try yaml.write(toFile: dir.file("queries.yml"), atomically: true, encoding: .utf8)
        let check = try await run("/usr/bin/promtool", ["check", "rules", dir.file("queries.yml")])
        #expect(check.status == 0, "\(check)")
    }
}
