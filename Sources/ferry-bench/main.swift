// ferry-bench: turns the raw results of deploy/bench.sh (fio JSON output of a baseline and of
// the agent, and the controller's /metrics before and after) into the comparison table.
//
//   ferry-bench --results DIR
//
// DIR holds {nbdkit,agent}-{seq,rand}.json and metrics-{before,after}.txt.
import Foundation

struct Failure: Error, CustomStringConvertible { let description: String }

func fioWrite(_ path: String) throws -> (bandwidthBytes: Double, iops: Double) {
    guard let data = FileManager.default.contents(atPath: path),
          let json = try JSONSerialization.jsonObject(with: data) as? [String: Any],
          let job = (json["jobs"] as? [[String: Any]])?.first, let write = job["write"] as? [String: Any],
          let bw = write["bw_bytes"] as? Double ?? (write["bw_bytes"] as? Int).map(Double.init),
          let iops = write["iops"] as? Double
    else { throw Failure(description: "\(path): not a fio JSON result with a write section") }
    return (bw, iops)
}

/// Cumulative bucket counts of `ferry_replication_lag_seconds` by upper bound.
func lagBuckets(_ path: String) throws -> [(le: Double, count: Double)] {
    guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { throw Failure(description: "cannot read \(path)") }
    var buckets: [(Double, Double)] = []
    for line in text.split(separator: "\n") where line.hasPrefix("ferry_replication_lag_seconds_bucket") {
        guard let leStart = line.range(of: "le=\""), let leEnd = line[leStart.upperBound...].firstIndex(of: "\""),
              let count = Double(line.split(separator: " ").last ?? "") else { continue }
        let le = String(line[leStart.upperBound..<leEnd])
        buckets.append((le == "+Inf" ? .infinity : Double(le) ?? .infinity, count))
    }
    return buckets.sorted { $0.0 < $1.0 }
}

/// The bucket bound under which `q` of the samples taken between the two scrapes fall.
func quantile(_ q: Double, before: [(le: Double, count: Double)], after: [(le: Double, count: Double)]) -> Double? {
    let delta = after.map { b in (b.le, b.count - (before.first { $0.le == b.le }?.count ?? 0)) }
    guard let total = delta.last?.1, total > 0 else { return nil }
    return delta.first { $0.1 >= q * total }?.0
}

func main() throws {
    let args = CommandLine.arguments
    guard let i = args.firstIndex(of: "--results"), i + 1 < args.count else {
        throw Failure(description: "usage: ferry-bench --results DIR")
    }
    let dir = args[i + 1]
    let baseSeq = try fioWrite(dir + "/nbdkit-seq.json"), agentSeq = try fioWrite(dir + "/agent-seq.json")
    let baseRand = try fioWrite(dir + "/nbdkit-rand.json"), agentRand = try fioWrite(dir + "/agent-rand.json")
    let before = try lagBuckets(dir + "/metrics-before.txt"), after = try lagBuckets(dir + "/metrics-after.txt")
    func mib(_ b: Double) -> String { String(format: "%.0f MiB/s", b / 1_048_576) }
    func ratio(_ a: Double, _ b: Double) -> String { String(format: "%.2fx", a / b) }
    func ms(_ s: Double?) -> String { s.map { $0.isInfinite ? "> 30 s" : String(format: "<= %.0f ms", $0 * 1000) } ?? "no samples" }
    let rows: [(String, String, String, String, String)] = [
        ("1 MiB sequential write", mib(baseSeq.bandwidthBytes), mib(agentSeq.bandwidthBytes), ratio(agentSeq.bandwidthBytes, baseSeq.bandwidthBytes), ">= 0.90x"),
        ("4 KiB random write (qd16)", String(format: "%.0f IOPS", baseRand.iops), String(format: "%.0f IOPS", agentRand.iops), ratio(agentRand.iops, baseRand.iops), ">= 0.80x"),
        ("replication lag p50", "-", ms(quantile(0.5, before: before, after: after)), "-", "-"),
        ("replication lag p99", "-", ms(quantile(0.99, before: before, after: after)), "-", "< 1 s"),
    ]
    let header = ("measure", "nbdkit file", "ferry agent", "ratio", "target")
    let all = [header] + rows
    let widths = (0..<5).map { c in all.map { [$0.0, $0.1, $0.2, $0.3, $0.4][c].count }.max() ?? 0 }
    for r in all {
        let cells = [r.0, r.1, r.2, r.3, r.4]
        print(zip(cells, widths).map { $0.padding(toLength: $1, withPad: " ", startingAt: 0) }.joined(separator: "  "))
    }
}

do { try main() } catch { FileHandle.standardError.write(Data("ferry-bench: \(error)\n".utf8)); exit(1) }
