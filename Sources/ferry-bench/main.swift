// ferry-bench: turns the raw results of deploy/bench.sh (fio JSON output of a baseline and of
// the agent, and the controller's /metrics before and after) into the comparison table.
//
//   ferry-bench --results DIR
//
// DIR holds {nbdkit,agent}-{seq,rand}.json, the CPU each run's servers used
// ({nbdkit,agent}-{seq,rand}.cpu: "TICKS TICKS-PER-SECOND"), metrics-{before,after}.txt and
// floor.txt (single-core AES-GCM and tmpfs write rates measured in the same invocation);
// cuts.txt and export.txt (recovery points); rto.txt (recovery time: "KIND SIZE SECONDS" lines,
// KIND drill_rto, drill_wall, failover_rto or failover_wall); hydration.txt with
// hydrate-{source,local,served}-{rr,rw,sw}.json (hydration against nbdcopy, and fio through a
// hydrated recovered volume, the source agent's export and a volume served from the controller).
// Each table is printed when its files are there (bench.sh's FERRY_BENCH_PARTS runs only some parts).
import Foundation

struct Failure: Error, CustomStringConvertible { let description: String }

func fioWrite(_ path: String) throws -> (bandwidthBytes: Double, iops: Double, fioCores: Double) {
    func number(_ any: Any?) -> Double? { any as? Double ?? (any as? Int).map(Double.init) }
    guard let data = FileManager.default.contents(atPath: path),
          let json = try JSONSerialization.jsonObject(with: data) as? [String: Any],
          let job = (json["jobs"] as? [[String: Any]])?.first, let write = job["write"] as? [String: Any],
          let bw = number(write["bw_bytes"]), let iops = number(write["iops"]),
          let usr = number(job["usr_cpu"]), let sys = number(job["sys_cpu"])
    else { throw Failure(description: "\(path): not a fio JSON result with a write section") }
    return (bw, iops, (usr + sys) / 100)
}

/// Cores the servers of a run used on average: "TICKS TICKS-PER-SECOND" over the run's seconds.
func serverCores(_ path: String, seconds: Double) throws -> Double {
    guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { throw Failure(description: "cannot read \(path)") }
    let parts = text.split(whereSeparator: { $0 == " " || $0 == "\n" }).compactMap { Double($0) }
    guard parts.count == 2, parts[1] > 0 else { throw Failure(description: "\(path): expected TICKS TICKS-PER-SECOND") }
    return parts[0] / parts[1] / seconds
}

func keyValues(_ path: String) throws -> [String: Double] {
    guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { throw Failure(description: "cannot read \(path)") }
    var out: [String: Double] = [:]
    for line in text.split(separator: "\n") {
        let parts = line.split(separator: " ")
        if parts.count == 2, let value = Double(parts[1]) { out[String(parts[0])] = value }
    }
    return out
}

func printTable(_ rows: [[String]]) {
    let widths = (0..<(rows.first?.count ?? 0)).map { c in rows.map { $0[c].count }.max() ?? 0 }
    for r in rows {
        print(zip(r, widths).map { $0.padding(toLength: $1, withPad: " ", startingAt: 0) }.joined(separator: "  ").trimmingCharacters(in: .whitespaces))
    }
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

func mib(_ b: Double) -> String { String(format: "%.0f MiB/s", b / 1_048_576) }

/// Replication throughput against the baseline, and the replication lag.
func replicationTable(_ dir: String) throws {
    let baseSeq = try fioWrite(dir + "/nbdkit-seq.json"), agentSeq = try fioWrite(dir + "/agent-seq.json")
    let baseRand = try fioWrite(dir + "/nbdkit-rand.json"), agentRand = try fioWrite(dir + "/agent-rand.json")
    let before = try lagBuckets(dir + "/metrics-before.txt"), after = try lagBuckets(dir + "/metrics-after.txt")
    func ratio(_ a: Double, _ b: Double) -> String { String(format: "%.2fx", a / b) }
    func ms(_ s: Double?) -> String { s.map { $0.isInfinite ? "> 30 s" : String(format: "<= %.0f ms", $0 * 1000) } ?? "no samples" }
    let rows: [(String, String, String, String, String)] = [
        ("1 MiB sequential write", mib(baseSeq.bandwidthBytes), mib(agentSeq.bandwidthBytes), ratio(agentSeq.bandwidthBytes, baseSeq.bandwidthBytes), ">= 0.90x"),
        ("4 KiB random write (qd16)", String(format: "%.0f IOPS", baseRand.iops), String(format: "%.0f IOPS", agentRand.iops), ratio(agentRand.iops, baseRand.iops), ">= 0.80x"),
        ("replication lag p50", "-", ms(quantile(0.5, before: before, after: after)), "-", "-"),
        ("replication lag p99", "-", ms(quantile(0.99, before: before, after: after)), "-", "< 1 s"),
    ]
    printTable([["measure", "nbdkit file", "ferry agent", "ratio", "target"]] + rows.map { [$0.0, $0.1, $0.2, $0.3, $0.4] })
}

/// Recovery points: group-cut pauses and a point-in-time export's first read.
func pointsTable(_ cuts: String, _ dir: String) {
    let pauses = cuts.split(separator: "\n").compactMap { line -> Double? in
        let p = line.split(separator: " ")
        return p.count == 2 && p[0] == "pause_micros" ? Double(p[1]).map { $0 / 1000 } : nil
    }.sorted()
    let aborted = cuts.split(separator: "\n").first { $0.hasPrefix("aborted ") }.flatMap { Int($0.split(separator: " ")[1]) } ?? 0
    func at(_ q: Double) -> String {
        pauses.isEmpty ? "-" : String(format: "%.1f ms", pauses[min(pauses.count - 1, Int((q * Double(pauses.count)).rounded(.up)) - 1)])
    }
    let export = (try? keyValues(dir + "/export.txt")) ?? [:]
    print("Recovery points: 16-volume group on 4 agents, fio 4 KiB random writes at 4000 IOPS per agent (\(pauses.count) points, \(aborted) rounds aborted)")
    printTable([["measure", "value", "target"],
                ["group-cut pause p50 (longest member)", at(0.5), "-"],
                ["group-cut pause p99", at(0.99), "< 20 ms"],
                ["group-cut pause max", pauses.last.map { String(format: "%.1f ms", $0) } ?? "-", "-"],
                ["10 GiB point export: command to first read", export["first_read_ms"].map { String(format: "%.0f ms", $0) } ?? "-", "< 1 s"],
                ["10 GiB point export: image open (controller)", export["open_ms"].map { String(format: "%.1f ms", $0) } ?? "-", "-"]])
}

/// The floor: the least CPU the sequential target needs here, from rates measured in this
/// invocation. Only work that cannot be avoided counts (the workload's own side as the
/// baseline spent it, TLS both ways, one journal append and one replica write per byte);
/// socket copies, checksums and the agent's bookkeeping come on top.
func floorTable(_ dir: String) throws {
    let baseSeq = try fioWrite(dir + "/nbdkit-seq.json"), agentSeq = try fioWrite(dir + "/agent-seq.json")
    let seconds = Double(ProcessInfo.processInfo.environment["FERRY_BENCH_RUNTIME"] ?? "") ?? 15
    let floor = try keyValues(dir + "/floor.txt")
    guard let aes = floor["aes_bytes_per_second"], let fresh = floor["tmpfs_new_bytes_per_second"],
          let over = floor["tmpfs_overwrite_bytes_per_second"], let cores = floor["cores"], aes > 0, fresh > 0, over > 0
    else { throw Failure(description: "\(dir)/floor.txt lacks a rate") }
    let target = 0.9 * baseSeq.bandwidthBytes
    let baselineCores = try serverCores(dir + "/nbdkit-seq.cpu", seconds: seconds) + baseSeq.fioCores
    let parts: [(String, String, Double)] = [
        ("fio and its NBD server (as in the baseline run)", String(format: "%.2f cores at %@", baselineCores, mib(baseSeq.bandwidthBytes)),
         baselineCores * 0.9),
        ("TLS encrypt (agent) and decrypt (controller)", String(format: "AES-128-GCM %.1f GB/s per core", aes / 1e9), 2 * target / aes),
        ("controller journal append (new tmpfs pages)", String(format: "%.1f GB/s", fresh / 1e9), target / fresh),
        ("controller replica write (tmpfs overwrite)", String(format: "%.1f GB/s", over / 1e9), target / over),
    ]
    let needed = parts.reduce(0) { $0 + $1.2 }
    let used = try serverCores(dir + "/agent-seq.cpu", seconds: seconds) + agentSeq.fioCores
    print("Cost floor of the sequential target on this machine: 0.90x the baseline is \(mib(target))")
    printTable([["work per byte", "measured here", "cores needed"]]
        + parts.map { [$0.0, $0.1, String(format: "%.2f", $0.2)] }
        + [["total, a lower bound", "", String(format: "%.2f of %.0f", needed, cores)],
           ["agent, controller and fio in the agent run", mib(agentSeq.bandwidthBytes), String(format: "%.2f used", used)]])
}

/// "1G" → "1 GiB", "512M" → "512 MiB": a size as bench.sh's FERRY_BENCH_RTO_SIZES gives it.
func sizeLabel(_ s: String) -> String {
    let units: [Character: String] = ["K": "KiB", "M": "MiB", "G": "GiB", "T": "TiB"]
    guard let last = s.last, let unit = units[Character(last.uppercased())] else { return s }
    return "\(s.dropLast()) \(unit)"
}

func median(_ xs: [Double]) -> Double? {
    let s = xs.sorted()
    guard !s.isEmpty else { return nil }
    return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
}

/// Recovery time of the 3-group, 16-volume plan at each volume size: the drill's median (and
/// range), one unplanned failover, each as the controller reports it (job creation to the last
/// start hook done) and as the whole ferryctl command took; flatness is the ratio of the
/// largest size's figure to the smallest's.
func rtoTable(_ text: String) {
    var samples: [String: [String: [Double]]] = [:]  // kind → size → seconds
    var sizes: [String] = []
    var drills = 0
    for line in text.split(separator: "\n") {
        let p = line.split(separator: " ").map(String.init)
        if p.count == 2, p[0] == "drills" { drills = Int(p[1]) ?? 0 }
        guard p.count == 3, p[0] != "sync", let v = Double(p[2]) else { continue }
        if !sizes.contains(p[1]) { sizes.append(p[1]) }
        samples[p[0], default: [:]][p[1], default: []].append(v)
    }
    func time(_ s: Double) -> String { s < 1 ? String(format: "%.0f ms", s * 1000) : String(format: "%.2f s", s) }
    func cell(_ kind: String, _ size: String) -> String {
        guard let xs = samples[kind]?[size], let m = median(xs) else { return "-" }
        return time(m) + (xs.count > 1 ? " (\(time(xs.min()!))-\(time(xs.max()!)))" : "")
    }
    func flatness(_ kind: String) -> String {
        guard sizes.count > 1, let a = samples[kind]?[sizes.first!].flatMap(median), let b = samples[kind]?[sizes.last!].flatMap(median), a > 0
        else { return "-" }
        return String(format: "%.2fx", b / a)
    }
    let target = "< 10 s, ratio ~1.0x"
    let rows: [(String, String, String)] = [
        ("drill_rto", "drill RTO: command to last start hook (median)", target),
        ("drill_wall", "drill: whole ferryctl drill command (median)", "-"),
        ("failover_rto", "unplanned failover RTO (one run)", target),
        ("failover_wall", "unplanned failover: whole ferryctl failover command", "-"),
    ].filter { samples[$0.0] != nil }
    let ratioHeader = sizes.count > 1 ? "\(sizeLabel(sizes.last!)) / \(sizeLabel(sizes.first!))" : "ratio"
    let repeats = drills > 0 ? "; drill: median (min-max) of \(drills)" : ""
    print("Recovery time: plan of 3 groups (db1+db2, app1, web1), 16 sparse volumes on 4 source agents, 2 recovery agents, hooks \"true\"\(repeats)")
    let header: [String] = ["measure"] + sizes.map(sizeLabel) + [ratioHeader, "target"]
    let body: [[String]] = rows.map { row in
        let cells: [String] = sizes.map { cell(row.0, $0) }
        return [row.1] + cells + [flatness(row.0), row.2]
    }
    printTable([header] + body)
}

/// IOPS and bytes per second of a fio run's read or write section.
func fioRate(_ path: String, _ section: String) throws -> (bandwidthBytes: Double, iops: Double) {
    func number(_ any: Any?) -> Double? { any as? Double ?? (any as? Int).map(Double.init) }
    guard let data = FileManager.default.contents(atPath: path),
          let json = try JSONSerialization.jsonObject(with: data) as? [String: Any],
          let job = (json["jobs"] as? [[String: Any]])?.first, let part = job[section] as? [String: Any],
          let bw = number(part["bw_bytes"]), let iops = number(part["iops"])
    else { throw Failure(description: "\(path): not a fio JSON result with a \(section) section") }
    return (bw, iops)
}

func hydrationTable(_ dir: String) throws {
    let kv = try keyValues(dir + "/hydration.txt")
    guard let hydrate = kv["hydrate_seconds"], let nbdcopy = kv["nbdcopy_seconds"], let size = kv["size_bytes"],
          let fetched = kv["fetched_bytes"] else { throw Failure(description: "hydration.txt is incomplete") }
    let gib = size / 1_073_741_824
    print(String(format: "Hydration: a %.0f GiB point, half of it data, onto a file of the recovery host (on disk)", gib))
    var rows = [["", "Ferry", "baseline", "ratio", "target"]]
    rows.append(["hydration copy vs nbdcopy over TLS (seconds)", String(format: "%.1f s", hydrate), String(format: "%.1f s", nbdcopy),
                 String(format: "%.2fx", nbdcopy / hydrate), ">= 1.0x"])
    if let total = kv["hydrate_total_seconds"] {
        rows.append(["failover command to hydrated (RTO, copy, report)", String(format: "%.1f s", total), String(format: "%.1f s", nbdcopy),
                     String(format: "%.2fx", nbdcopy / total), "-"])
    }
    rows.append(["bytes fetched / volume size", String(format: "%.0f MiB", fetched / 1_048_576), String(format: "%.0f MiB", size / 1_048_576),
                 String(format: "%.2f", fetched / size), "holes not moved"])
    if let rto = kv["failover_rto_seconds"] {
        rows.append(["failover --hydrate RTO (command to start hooks done)", String(format: "%.2f s", rto), "-", "-", "< 10 s"])
    }
    if let seed = kv["seed_seconds"] {
        rows.append(["landed volume's replica built from the point (controller, local copy)", String(format: "%.1f s", seed), "-", "-", "-"])
    }
    if let caughtUp = kv["landed_replica_caught_up_seconds"] {
        rows.append(["failover command to landed replica caught up", String(format: "%.1f s", caughtUp), "-", "-", "-"])
    }
    printTable(rows)
    print()
    print("fio through the landed volume after hydration (captured, replicated) vs the source agent's export (iodepth 16)")
    var fio = [["workload", "hydrated", "source", "ratio", "served from controller", "ratio", "target"]]
    for (tag, name, section, unit) in [("rr", "4 KiB random read", "read", "iops"), ("rw", "4 KiB random write", "write", "iops"),
                                       ("sw", "1 MiB sequential write", "write", "bw")] {
        // The better of the two runs of each (bench.sh runs them in both orders).
        func best(_ name: String) throws -> (bandwidthBytes: Double, iops: Double) {
            let runs = try ["a", "b"].compactMap { run -> (bandwidthBytes: Double, iops: Double)? in
                let path = dir + "/\(name)-\(tag)-\(run).json"
                return FileManager.default.fileExists(atPath: path) ? try fioRate(path, section) : nil
            }
            guard let top = runs.max(by: { unit == "iops" ? $0.iops < $1.iops : $0.bandwidthBytes < $1.bandwidthBytes }) else {
                return try fioRate(dir + "/\(name)-\(tag).json", section)
            }
            return top
        }
        let local = try best("hydrate-local")
        let source = try best("hydrate-source")
        let served = try? fioRate(dir + "/hydrate-served-\(tag).json", section)
        func show(_ r: (bandwidthBytes: Double, iops: Double)) -> String {
            unit == "iops" ? String(format: "%.0f IOPS", r.iops) : mib(r.bandwidthBytes)
        }
        func value(_ r: (bandwidthBytes: Double, iops: Double)) -> Double { unit == "iops" ? r.iops : r.bandwidthBytes }
        fio.append([name, show(local), show(source), String(format: "%.2fx", value(local) / value(source)),
                    served.map(show) ?? "-", served.map { String(format: "%.2fx", value($0) / value(source)) } ?? "-", ">= 0.9x"])
    }
    printTable(fio)
}

func main() throws {
    let args = CommandLine.arguments
    guard let i = args.firstIndex(of: "--results"), i + 1 < args.count else {
        throw Failure(description: "usage: ferry-bench --results DIR")
    }
    let dir = args[i + 1]
    let has = { (name: String) in FileManager.default.fileExists(atPath: dir + "/" + name) }
    var printed = false
    func section() { if printed { print() }; printed = true }
    let replication = has("agent-seq.json")
    if replication {
        section()
        try replicationTable(dir)
    }
    if let cuts = try? String(contentsOfFile: dir + "/cuts.txt", encoding: .utf8) {
        section()
        pointsTable(cuts, dir)
    }
    if replication {
        section()
        try floorTable(dir)
    }
    if let rto = try? String(contentsOfFile: dir + "/rto.txt", encoding: .utf8) {
        section()
        rtoTable(rto)
    }
    if has("hydration.txt") {
        section()
        try hydrationTable(dir)
    }
    if !printed { throw Failure(description: "\(dir) holds no results") }
}

do { try main() } catch { FileHandle.standardError.write(Data("ferry-bench: \(error)\n".utf8)); exit(1) }
