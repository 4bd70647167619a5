// ferry-bench: turns the raw results of deploy/bench.sh (fio JSON output of a baseline and of
// the agent, and the controller's /metrics before and after) into the comparison table.
//
//   ferry-bench --results DIR
//
// DIR holds nbdkit-{seq,rand}.json with nbdkit's CPU (nbdkit-{seq,rand}.cpu: "TICKS
// TICKS-PER-SECOND"), agent-{seq,rand,lag}.json with each daemon's CPU until replicated
// (agent-RUN.proc), the controller's /metrics around each run (metrics-RUN-{before,after}.txt),
// rss.txt (peak RSS) and floor.txt (single-core AES-GCM and tmpfs write rates measured in the same invocation);
// cuts-{paced,saturated}.txt and export.txt (recovery points); rto.txt (recovery time: "KIND SIZE SECONDS" lines,
// KIND drill_rto, drill_wall, failover_rto or failover_wall); hydration.txt with
// hydrate-{source,local,served}-{rr,rw,sw}.json (hydration against nbdcopy, and fio through a
// hydrated recovered volume, the source agent's export and a volume served from the controller);
// scale.txt (the scale test's idle agents: agents, heartbeat_seconds, online_seconds, idle_seconds,
// controller_cpu_fraction, controller_rss_bytes).
// Each table is printed when its files are there (bench.sh's FERRY_BENCH_PARTS runs only some parts).
import FerryWire
import Foundation

struct Failure: Error, CustomStringConvertible { let description: String }

func fioWrite(_ path: String) throws -> (bandwidthBytes: Double, iops: Double) {
    func number(_ any: Any?) -> Double? { any as? Double ?? (any as? Int).map(Double.init) }
    guard let data = FileManager.default.contents(atPath: path),
          let json = try JSONSerialization.jsonObject(with: data) as? [String: Any],
          let job = (json["jobs"] as? [[String: Any]])?.first, let write = job["write"] as? [String: Any],
          let bw = number(write["bw_bytes"]), let iops = number(write["iops"])
    else { throw Failure(description: "\(path): not a fio JSON result with a write section") }
    return (bw, iops)
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

/// The per-record write-lag histogram in a `/metrics` scrape, summed over every volume.
func writeLag(_ path: String) throws -> LagHistogram {
    guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { throw Failure(description: "cannot read \(path)") }
    var cumulative = Array(repeating: UInt64(0), count: LagHistogram.bounds.count + 1)
    var sum = 0.0
    for line in text.split(separator: "\n") {
        let value = line.split(separator: " ").last.map(String.init) ?? ""
        if line.hasPrefix("ferry_volume_write_lag_seconds_sum{") { sum += Double(value) ?? 0 }
        guard line.hasPrefix("ferry_volume_write_lag_seconds_bucket{"), let leStart = line.range(of: "le=\""),
              let leEnd = line[leStart.upperBound...].firstIndex(of: "\""), let count = UInt64(value) else { continue }
        let le = String(line[leStart.upperBound..<leEnd])
        let index = le == "+Inf" ? LagHistogram.bounds.count : LagHistogram.bounds.firstIndex(of: Double(le) ?? -1)
        if let index { cumulative[index] += count }
    }
    // Cumulative per bound → per bucket.
    let counts = cumulative.indices.map { i in i == 0 ? cumulative[0] : cumulative[i] &- cumulative[i - 1] }
    guard let histogram = LagHistogram(counts: counts, sumSeconds: sum) else { throw Failure(description: "\(path): malformed lag histogram") }
    return histogram
}

/// A run's per-record lag: the records acked between its two scrapes.
func runLag(_ dir: String, _ run: String) throws -> LagHistogram {
    try writeLag("\(dir)/metrics-\(run)-after.txt").since(try writeLag("\(dir)/metrics-\(run)-before.txt"))
}

func mib(_ b: Double) -> String { String(format: "%.0f MiB/s", b / 1_048_576) }

func ms(_ s: Double?) -> String {
    guard let s else { return "no samples" }
    return s >= LagHistogram.bounds.last! ? "> 60 s" : s < 1 ? String(format: "%.0f ms", s * 1000) : String(format: "%.2f s", s)
}

/// Replication throughput against the baseline, and the replication lag of every record.
func replicationTable(_ dir: String) throws {
    let baseSeq = try fioWrite(dir + "/nbdkit-seq.json"), agentSeq = try fioWrite(dir + "/agent-seq.json")
    let baseRand = try fioWrite(dir + "/nbdkit-rand.json"), agentRand = try fioWrite(dir + "/agent-rand.json")
    func ratio(_ a: Double, _ b: Double) -> String { String(format: "%.2fx", a / b) }
    var rows: [[String]] = [
        ["1 MiB sequential write", mib(baseSeq.bandwidthBytes), mib(agentSeq.bandwidthBytes), ratio(agentSeq.bandwidthBytes, baseSeq.bandwidthBytes), "report beside the floor"],
        ["4 KiB random write (qd16)", String(format: "%.0f IOPS", baseRand.iops), String(format: "%.0f IOPS", agentRand.iops), ratio(agentRand.iops, baseRand.iops), "report beside the floor"],
    ]
    for (run, label, target) in [("seq", "1 MiB sequential, saturating", "-"), ("rand", "4 KiB random, saturating", "-"),
                                 ("lag", "1 MiB sequential at 500 MB/s", "< 1 s")] {
        guard let lag = try? runLag(dir, run) else { continue }
        var what = label
        if run == "lag", let fio = try? fioWrite(dir + "/agent-lag.json") { what += " (reached \(mib(fio.bandwidthBytes)))" }
        rows.append(["lag p50 / p99 / max: \(what)", "-",
                     "\(ms(lag.quantile(0.5))) / \(ms(lag.quantile(0.99))) / \(ms(lag.quantile(1)))", "\(lag.count) records", "p99 \(target)"])
    }
    print("Replication: fio through the agent while it replicates vs through nbdkit (lag: each record, from its write's completion to the controller's durable ack, on the agent's clock)")
    printTable([["measure", "nbdkit file", "ferry agent", "ratio", "target"]] + rows)
}

/// Recovery points: group-cut pauses and a point-in-time export's first read.
func pointsTable(_ cuts: String, _ dir: String) {
    /// A cut run's pauses (ms, sorted) and aborted rounds, from "pause_micros N" and "aborted N" lines.
    func parse(_ text: String) -> (pauses: [Double], aborted: Int) {
        let pauses = text.split(separator: "\n").compactMap { line -> Double? in
            let p = line.split(separator: " ")
            return p.count == 2 && p[0] == "pause_micros" ? Double(p[1]).map { $0 / 1000 } : nil
        }.sorted()
        let aborted = text.split(separator: "\n").first { $0.hasPrefix("aborted ") }.flatMap { Int($0.split(separator: " ")[1]) } ?? 0
        return (pauses, aborted)
    }
    func at(_ pauses: [Double], _ q: Double) -> String {
        pauses.isEmpty ? "-" : String(format: "%.1f ms", pauses[min(pauses.count - 1, Int((q * Double(pauses.count)).rounded(.up)) - 1)])
    }
    let paced = parse(cuts)
    let saturated = (try? String(contentsOfFile: dir + "/cuts-saturated.txt", encoding: .utf8)).map(parse)
    func succeeded(_ r: (pauses: [Double], aborted: Int)) -> String {
        let rounds = r.pauses.count + r.aborted
        return rounds == 0 ? "-" : String(format: "%.1f %% of %d", 100 * Double(r.pauses.count) / Double(rounds), rounds)
    }
    let export = (try? keyValues(dir + "/export.txt")) ?? [:]
    func ratio(_ a: Double?, _ b: Double?) -> String {
        guard let a, let b, b > 0 else { return "-" }
        return String(format: "%.1f ms, %.2fx", a, a / b)
    }
    print("Recovery points: 16-volume group on 4 agents, fio 4 KiB random writes to one volume per agent, at 4000 IOPS each and unthrottled (saturating)")
    var rows = [["measure", "4000 IOPS per agent", "saturating", "target"],
                ["group cuts that succeed", succeeded(paced), saturated.map(succeeded) ?? "-", ">= 95 %"]]
    for (label, q, target) in [("group-cut pause p50 (longest member)", 0.5, "-"), ("group-cut pause p99", 0.99, "< 20 ms"), ("group-cut pause max", 1.0, "-")] {
        rows.append([label, at(paced.pauses, q), saturated.map { at($0.pauses, q) } ?? "-", target])
    }
    printTable(rows)
    print()
    printTable([["measure", "value", "target"],
                ["10 GiB point export: command to first read", export["first_read_ms"].map { String(format: "%.0f ms", $0) } ?? "-", "< 1 s"],
                ["10 GiB point export: image open (controller)", export["open_ms"].map { String(format: "%.1f ms", $0) } ?? "-", "-"],
                ["same, 2 GiB more journal: first open", export["journal_first_open_ms"].map { String(format: "%.1f ms", $0) } ?? "-", "-"],
                ["same, 2 GiB more journal: best of 3 / above", ratio(export["journal_best_open_ms"], export["open_ms"]), "< 3x"]])
}

/// A run's CPU per process: "KEY VALUE" lines (agent_ticks, controller_ticks, ticks_per_second).
func processCPU(_ path: String) throws -> (agent: Double, controller: Double) {
    let kv = try keyValues(path)
    guard let a = kv["agent_ticks"], let c = kv["controller_ticks"], let hz = kv["ticks_per_second"], hz > 0 else {
        throw Failure(description: "\(path): expected agent_ticks, controller_ticks and ticks_per_second")
    }
    return (a / hz, c / hz)
}

/// Bytes fio wrote in a run.
func fioBytes(_ path: String) throws -> Double {
    guard let data = FileManager.default.contents(atPath: path),
          let json = try JSONSerialization.jsonObject(with: data) as? [String: Any],
          let job = (json["jobs"] as? [[String: Any]])?.first, let write = job["write"] as? [String: Any],
          let bytes = (write["io_bytes"] as? Int).map(Double.init) ?? (write["io_bytes"] as? Double)
    else { throw Failure(description: "\(path): no write io_bytes") }
    return bytes
}

/// CPU per GiB written, per process, against the floor measured in the same invocation: the
/// work each side cannot avoid. The agent: serving the writes as nbdkit did in the baseline run
/// (its CPU per GiB there) plus encrypting them (one core's AES-128-GCM rate). The controller:
/// decrypting, one journal append (new tmpfs pages) and one replica write (tmpfs overwrite; for
/// 4 KiB random writes, 4 KiB random overwrites, a system call each).
/// Each run's CPU is counted from fio's start until the controller holds every write durably.
func efficiencyTable(_ dir: String) throws {
    let floor = try keyValues(dir + "/floor.txt")
    guard let aes = floor["aes_bytes_per_second"], let fresh = floor["tmpfs_new_bytes_per_second"],
          let over = floor["tmpfs_overwrite_bytes_per_second"], aes > 0, fresh > 0, over > 0
    else { throw Failure(description: "\(dir)/floor.txt lacks a rate") }
    let gib = 1_073_741_824.0
    func nbdkitPerGiB(_ run: String) throws -> Double {
        let text = try String(contentsOfFile: "\(dir)/nbdkit-\(run).cpu", encoding: .utf8)
        let parts = text.split(whereSeparator: { $0 == " " || $0 == "\n" }).compactMap { Double($0) }
        guard parts.count == 2, parts[1] > 0 else { throw Failure(description: "nbdkit-\(run).cpu: expected TICKS TICKS-PER-SECOND") }
        return parts[0] / parts[1] / (try fioBytes("\(dir)/nbdkit-\(run).json") / gib)
    }
    let encrypt = gib / aes
    let controllerFloor = gib / aes + gib / fresh + gib / over
    // Older floor files lack the random rate: the sequential floor then stands in.
    let random4k = floor["tmpfs_random_4k_bytes_per_second"].flatMap { $0 > 0 ? $0 : nil }
    let controllerRandomFloor = random4k.map { gib / aes + gib / fresh + gib / $0 } ?? controllerFloor
    let seqFloor = try nbdkitPerGiB("seq") + encrypt, randFloor = try nbdkitPerGiB("rand") + encrypt
    var rows: [[String]] = [["figure", "measured", "floor", "ratio", "goal"]]
    func cell(_ x: Double) -> String { String(format: "%.2f core·s/GiB", x) }
    for (run, label, agentFloor, agentGoal, controllerFloor) in [
        ("seq", "1 MiB sequential", seqFloor, 1.3, controllerFloor), ("rand", "4 KiB random", randFloor, 1.5, controllerRandomFloor),
        ("lag", "1 MiB sequential at 500 MB/s", seqFloor, 1.3, controllerFloor),
    ] {
        guard let cpu = try? processCPU("\(dir)/agent-\(run).proc"), let bytes = try? fioBytes("\(dir)/agent-\(run).json"), bytes > 0 else { continue }
        let agent = cpu.agent / (bytes / gib), controller = cpu.controller / (bytes / gib)
        rows.append(["agent CPU per GiB, \(label)", cell(agent), cell(agentFloor), String(format: "%.2fx", agent / agentFloor),
                     String(format: "<= %.1fx", agentGoal)])
        rows.append(["controller CPU per GiB, \(label)", cell(controller), cell(controllerFloor),
                     String(format: "%.2fx", controller / controllerFloor), "<= 1.3x"])
    }
    if let rss = try? keyValues(dir + "/rss.txt"), let agent = rss["agent_hwm_kib"], let log = rss["change_log_memory_bytes"] {
        let cap = log / 1_048_576 + 48
        rows.append(["agent peak RSS (VmHWM) over the runs", String(format: "%.0f MiB", agent / 1024),
                     String(format: "%.0f MiB change log", log / 1_048_576), String(format: "%.2fx of the goal", agent / 1024 / cap),
                     String(format: "< %.0f MiB", cap)])
        if let controller = rss["controller_hwm_kib"] {
            rows.append(["controller peak RSS (VmHWM) over the runs", String(format: "%.0f MiB", controller / 1024), "-", "-", "-"])
        }
    }
    print(String(format: "Efficiency per process (agent floor: nbdkit's own CPU per GiB in this run + AES-128-GCM at %.1f GB/s per core; controller floor: decrypt + tmpfs append at %.1f GB/s + overwrite at %.1f GB/s, or for 4 KiB random writes 4 KiB random overwrites at %.2f GB/s)",
                 aes / 1e9, fresh / 1e9, over / 1e9, (random4k ?? over) / 1e9))
    printTable(rows)
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

/// One replication run with everything on a real disk, against the disk's own rate.
func diskTable(_ dir: String) throws {
    let floor = try fioWrite(dir + "/disk-floor.json").bandwidthBytes
    let run = try fioWrite(dir + "/disk-run.json").bandwidthBytes
    let bytes = try fioBytes(dir + "/disk-run.json")
    let proc = try keyValues(dir + "/disk-run.proc")
    let cpu = try processCPU(dir + "/disk-run.proc")
    let gib = 1_073_741_824.0
    let seconds = (proc["fio_seconds"] ?? 0) + (proc["catch_up_seconds"] ?? 0)
    print("Real disk (volume, change log, journal and replica on one disk): 1 MiB sequential writes; floor: the disk's own sequential write rate with an fdatasync every 4 MiB (the controller's group commit), measured in this run")
    printTable([
        ["figure", "measured", "floor", "ratio"],
        ["fio through the agent", mib(run), mib(floor), String(format: "%.2fx", run / floor)],
        // From fio's start until the controller holds every write durably; the disk takes each
        // byte three times meanwhile (the volume, the journal, the image), only the journal synced.
        ["replicated end to end (fio + catch-up)", mib(seconds > 0 ? bytes / seconds : 0), mib(floor),
         String(format: "%.2fx", seconds > 0 ? bytes / seconds / floor : 0)],
        ["agent CPU per GiB", String(format: "%.2f core·s/GiB", cpu.agent / (bytes / gib)), "-", "-"],
        ["controller CPU per GiB", String(format: "%.2f core·s/GiB", cpu.controller / (bytes / gib)), "-", "-"],
    ])
}

/// Initial sync of a half-full volume against nbdcopy over TLS into nbdkit's memory plugin.
func syncTable(_ dir: String) throws {
    let kv = try keyValues(dir + "/sync.txt")
    guard let nbdcopy = kv["nbdcopy_seconds"], let ferry = kv["ferry_seconds"], ferry > 0 else { throw Failure(description: "sync.txt is incomplete") }
    print("Initial sync: a 4 GiB volume, every other MiB random (2 GiB of data), protected from scratch; baseline nbdcopy of the same file over TLS into nbdkit's memory plugin")
    printTable([["measure", "ferry", "nbdcopy", "ratio (nbdcopy time / ferry time)", "target"],
                ["initial sync of 4 GiB half full", String(format: "%.1f s", ferry), String(format: "%.1f s", nbdcopy),
                 String(format: "%.2fx", nbdcopy / ferry), ">= 1.0x"]])
}

/// WAN mode over the lab's 100 Mbit/s link: lag and bytes on the wire, compression off and lz4.
func wanTable(_ dir: String) throws {
    func counter(_ path: String, _ name: String) throws -> Double {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { throw Failure(description: "cannot read \(path)") }
        return text.split(separator: "\n").filter { $0.hasPrefix(name + "{") }
            .compactMap { Double($0.split(separator: " ").last ?? "") }.reduce(0, +)
    }
    func delta(_ run: String, _ name: String) throws -> Double {
        try counter("\(dir)/metrics-\(run)-after.txt", name) - counter("\(dir)/metrics-\(run)-before.txt", name)
    }
    print("WAN mode: the lab's inter-site link shaped to 100 Mbit/s (tbf), fio 64 KiB random writes at 16 MB/s (128 Mbit/s) for the run")
    var rows = [["workload", "compression", "written", "on the wire", "ratio", "lag p50", "lag p99", "backlog drained", "agent compress CPU"]]
    for (workload, label) in [("db", "database-like (half compressible)"), ("random", "random (incompressible)")] {
        for compression in ["none", "lz4"] {
            let run = "wan-\(workload)-\(compression)"
            guard FileManager.default.fileExists(atPath: "\(dir)/\(run).proc") else { continue }
            let proc = try keyValues("\(dir)/\(run).proc")
            let data = try delta(run, "ferry_replication_data_bytes_total"), wire = try delta(run, "ferry_replication_wire_bytes_total")
            let lag = try runLag(dir, run)
            let cpu = try delta(run, "ferry_volume_compress_cpu_seconds")
            rows.append([label, compression, String(format: "%.0f MiB", data / 1_048_576), String(format: "%.0f MiB", wire / 1_048_576),
                         String(format: "%.2fx", data / max(wire, 1)), ms(lag.quantile(0.5)), ms(lag.quantile(0.99)),
                         String(format: "%.0f s", proc["catch_up_seconds"] ?? 0),
                         compression == "lz4" ? String(format: "%.2f core·s/GiB", cpu / max(data / 1_073_741_824, 1e-9)) : "-"])
        }
    }
    printTable(rows)
}

/// Idle agents on one controller: its CPU over the idle window and RSS, against the goal for
/// 1,000 agents with 5 s heartbeats.
func scaleTable(_ dir: String) throws {
    let kv = try keyValues(dir + "/scale.txt")
    guard let agents = kv["agents"], let cpu = kv["controller_cpu_fraction"], let rss = kv["controller_rss_bytes"],
          let online = kv["online_seconds"], let idle = kv["idle_seconds"], let heartbeat = kv["heartbeat_seconds"]
    else { throw Failure(description: "scale.txt is incomplete") }
    print(String(format: "Scale: %.0f idle agents (in-process sessions of the test build, one TLS session each) on one release controller, %.0f s heartbeats; CPU over a %.0f s idle window once all are online",
                 agents, heartbeat, idle))
    printTable([["agents", "controller CPU (one core)", "controller RSS", "sessions start to all online", "goal (1,000 agents, 5 s heartbeats)"],
                [String(format: "%.0f", agents), String(format: "%.2f %%", cpu * 100), String(format: "%.0f MiB", rss / 1_048_576),
                 String(format: "%.1f s", online), "< 5 % of a core, < 1 GiB"]])
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
    if let cuts = try? String(contentsOfFile: dir + "/cuts-paced.txt", encoding: .utf8) {
        section()
        pointsTable(cuts, dir)
    }
    if replication {
        section()
        try efficiencyTable(dir)
    }
    if let rto = try? String(contentsOfFile: dir + "/rto.txt", encoding: .utf8) {
        section()
        rtoTable(rto)
    }
    if has("hydration.txt") {
        section()
        try hydrationTable(dir)
    }
    if has("disk-run.proc") {
        section()
        try diskTable(dir)
    }
    if has("sync.txt") {
        section()
        try syncTable(dir)
    }
    if has("wan-db-none.proc") || has("wan-db-lz4.proc") {
        section()
        try wanTable(dir)
}

    if has("scale.txt") {
        section()
        try scaleTable(dir)
    }
    if !printed { throw Failure(description: "\(dir) holds no results") }
}

do { try main() } catch { FileHandle.standardError.write(Data("ferry-bench: \(error)\n".utf8)); exit(1) }
