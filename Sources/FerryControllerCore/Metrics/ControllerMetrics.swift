import CoreMetrics
import FerryWire
import Foundation
import Metrics
import Prometheus
import Synchronization

/// The controller's metrics, exported in Prometheus format on the API's `/metrics`.
public final class ControllerMetrics: Sendable {
    public let registry: PrometheusCollectorRegistry
    let agentsConnected: CoreMetrics.Gauge
    let sessionsOpened: CoreMetrics.Counter
    let heartbeatsMissed: CoreMetrics.Counter
    let enrollments: CoreMetrics.Counter
    let enrollmentsRejected: CoreMetrics.Counter
    let certificatesRenewed: CoreMetrics.Counter
    let framesReceived: CoreMetrics.Counter
    let apiRequests: CoreMetrics.Counter
    let replicatedRecords: CoreMetrics.Counter
    /// From capture on the agent to durable on the controller, for the newest record of each batch.
    let replicationLag: CoreMetrics.Timer
    private let factory: PrometheusMetricsFactory
    /// Each volume's per-record lag as its agent last reported it, by host and volume.
    private let writeLags = Mutex<[VolumeKey: LagHistogram]>([:])

    struct VolumeKey: Hashable, Comparable {
        var host: String
        var volume: String
        static func < (a: Self, b: Self) -> Bool { (a.host, a.volume) < (b.host, b.volume) }
    }

    public init(registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry()) {
        self.registry = registry
        var factory = PrometheusMetricsFactory(registry: registry)
        // Replication lag is a sub-second figure: buckets from 1 ms up.
        factory.durationHistogramBuckets["ferry_replication_lag_seconds"] = [
            .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10), .milliseconds(20), .milliseconds(50),
            .milliseconds(100), .milliseconds(200), .milliseconds(500), .seconds(1), .seconds(2), .seconds(5), .seconds(10), .seconds(30),
        ]
        // A cut's pause is a few milliseconds against a 50 ms budget.
        factory.durationHistogramBuckets["ferry_group_cut_pause_seconds"] = [
            .microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10),
            .milliseconds(20), .milliseconds(50), .milliseconds(100), .milliseconds(500), .seconds(1),
        ]
        self.factory = factory
        agentsConnected = CoreMetrics.Gauge(label: "ferry_agents_connected", factory: factory)
        sessionsOpened = CoreMetrics.Counter(label: "ferry_sessions_opened_total", factory: factory)
        heartbeatsMissed = CoreMetrics.Counter(label: "ferry_sessions_dead_peer_total", factory: factory)
        enrollments = CoreMetrics.Counter(label: "ferry_enrollments_total", factory: factory)
        enrollmentsRejected = CoreMetrics.Counter(label: "ferry_enrollments_rejected_total", factory: factory)
        certificatesRenewed = CoreMetrics.Counter(label: "ferry_certificates_renewed_total", factory: factory)
        framesReceived = CoreMetrics.Counter(label: "ferry_session_messages_received_total", factory: factory)
        apiRequests = CoreMetrics.Counter(label: "ferry_api_requests_total", factory: factory)
        replicatedRecords = CoreMetrics.Counter(label: "ferry_replication_records_total", factory: factory)
        replicationLag = CoreMetrics.Timer(label: "ferry_replication_lag_seconds", factory: factory)
    }

    /// Counts a refused connection, labelled by why.
    func connectionRejected(_ reason: String) {
        CoreMetrics.Counter(label: "ferry_connections_rejected_total", dimensions: [("reason", reason)], factory: factory).increment()
    }

    /// Per-volume gauges from the agent's report: lag, bytes pending, sync progress, throughput.
    func noteVolume(host: String, report: Ferry_V1_VolumeReport, throughput: Double) {
        let labels = [("host", host), ("volume", report.volume)]
        let oldest = report.oldestPendingUnixNanos
        let lag = oldest > 0 ? max(0, Date().timeIntervalSince1970 - Double(oldest) / 1e9) : 0
        CoreMetrics.Gauge(label: "ferry_volume_lag_seconds", dimensions: labels, factory: factory).record(lag)
        CoreMetrics.Gauge(label: "ferry_volume_pending_bytes", dimensions: labels, factory: factory).record(Double(report.pendingBytes))
        CoreMetrics.Gauge(label: "ferry_volume_throughput_bytes_per_second", dimensions: labels, factory: factory).record(throughput)
        CoreMetrics.Gauge(label: "ferry_volume_marked_extents", dimensions: labels, factory: factory).record(Double(report.markedExtents))
        CoreMetrics.Gauge(label: "ferry_volume_sync_pending_extents", dimensions: labels, factory: factory).record(Double(report.sync.pendingExtents))
        CoreMetrics.Gauge(label: "ferry_volume_sync_sent_bytes", dimensions: labels, factory: factory).record(Double(report.sync.sentBytes))
        noteCompression(host: host, report: report)
        if report.hasWriteLag, let lag = LagHistogram(counts: report.writeLag.counts, sumSeconds: report.writeLag.sumSeconds) {
            writeLags.withLock { $0[VolumeKey(host: host, volume: report.volume)] = lag }
        }
    }

    /// `ferry_volume_write_lag_seconds`: each record's lag from its write's completion at the
    /// agent to the controller's durable ack of it, in the agent's buckets (the agent counts,
    /// so one clock measures both ends). Rendered here because the counts arrive already bucketed.
    func renderWriteLags() -> String {
        let lags = writeLags.withLock { $0 }
        guard !lags.isEmpty else { return "" }
        var out = "# TYPE ferry_volume_write_lag_seconds histogram\n"
        func escape(_ s: String) -> String {
            s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
                .replacingOccurrences(of: "\n", with: "\\n")
        }
        for (key, lag) in lags.sorted(by: { $0.key < $1.key }) {
            let labels = "host=\"\(escape(key.host))\",volume=\"\(escape(key.volume))\""
            var cumulative: UInt64 = 0
            for (i, bound) in LagHistogram.bounds.enumerated() {
                cumulative &+= lag.counts[i]
                out += "ferry_volume_write_lag_seconds_bucket{\(labels),le=\"\(bound)\"} \(cumulative)\n"
            }
            cumulative &+= lag.counts[LagHistogram.bounds.count]
            out += "ferry_volume_write_lag_seconds_bucket{\(labels),le=\"+Inf\"} \(cumulative)\n"
            out += "ferry_volume_write_lag_seconds_sum{\(labels)} \(lag.sumSeconds)\n"
            out += "ferry_volume_write_lag_seconds_count{\(labels)} \(cumulative)\n"
        }
        return out
    }

    /// A replication batch's written bytes as they came over the wire and once decompressed,
    /// and the CPU time decompressing took (the compression ratio is data / wire).
    func replicationBytes(host: String, wire: Int, data: Int, decompressSeconds: Double?) {
        let labels = [("host", host)]
        CoreMetrics.Counter(label: "ferry_replication_wire_bytes_total", dimensions: labels, factory: factory).increment(by: wire)
        CoreMetrics.Counter(label: "ferry_replication_data_bytes_total", dimensions: labels, factory: factory).increment(by: data)
        if let decompressSeconds {
            CoreMetrics.FloatingPointCounter(label: "ferry_replication_decompress_seconds_total", dimensions: labels, factory: factory)
                .increment(by: decompressSeconds)
        }
    }

    /// A WAN bandwidth limit in force (0: none), per scope: a host's name or "*" for all hosts.
    func wanLimit(scope: String, bytesPerSecond: UInt64) {
        CoreMetrics.Gauge(label: "ferry_wan_limit_bytes_per_second", dimensions: [("scope", scope)], factory: factory).record(Double(bytesPerSecond))
    }

    /// Time a host's stream waited for a WAN limit, by direction (in: replication; out: reverse).
    func wanThrottled(host: String, direction: String, wait: Duration) {
        CoreMetrics.FloatingPointCounter(label: "ferry_wan_throttled_seconds_total", dimensions: [("host", host), ("direction", direction)], factory: factory)
            .increment(by: Double(wait.components.seconds) + Double(wait.components.attoseconds) / 1e18)
    }

    /// The agent's compression of a volume's stream, cumulative for its process as it reported.
    func noteCompression(host: String, report: Ferry_V1_VolumeReport) {
        guard report.compressInBytes > 0 else { return }
        let labels = [("host", host), ("volume", report.volume)]
        CoreMetrics.Gauge(label: "ferry_volume_compress_input_bytes", dimensions: labels, factory: factory).record(Double(report.compressInBytes))
        CoreMetrics.Gauge(label: "ferry_volume_compress_output_bytes", dimensions: labels, factory: factory).record(Double(report.compressOutBytes))
        CoreMetrics.Gauge(label: "ferry_volume_compress_cpu_seconds", dimensions: labels, factory: factory).record(Double(report.compressNanos) / 1e9)
    }

    /// Hydration of a recovered volume: bytes local, its size, the copy rate, 1 once complete.
    func noteHydration(_ h: API.Hydration) {
        let labels = [("plan", h.plan), ("volume", h.volume), ("recovery_host", h.recoveryHost)]
        CoreMetrics.Gauge(label: "ferry_hydration_local_bytes", dimensions: labels, factory: factory).record(Double(h.localBytes))
        CoreMetrics.Gauge(label: "ferry_hydration_size_bytes", dimensions: labels, factory: factory).record(Double(h.sizeBytes))
        CoreMetrics.Gauge(label: "ferry_hydration_fetched_bytes", dimensions: labels, factory: factory).record(Double(h.fetchedBytes))
        CoreMetrics.Gauge(label: "ferry_hydration_bytes_per_second", dimensions: labels, factory: factory).record(h.bytesPerSecond)
        CoreMetrics.Gauge(label: "ferry_hydration_complete", dimensions: labels, factory: factory).record(h.complete ? 1 : 0)
    }

    /// 1 while a volume's replication waits for the controller's disk to have space, else 0
    /// (the alert: `ferry_volume_replication_paused{reason="disk-full"} == 1`).
    func replicationPaused(host: String, volume: String, paused: Bool) {
        CoreMetrics.Gauge(label: "ferry_volume_replication_paused", dimensions: [("host", host), ("volume", volume), ("reason", "disk-full")],
                          factory: factory).record(paused ? 1 : 0)
    }

    /// Counts a completed sync (initial, resync after a crash or overflow, or on demand).
    func syncCompleted(host: String, volume: String) {
        CoreMetrics.Counter(label: "ferry_volume_syncs_completed_total", dimensions: [("host", host), ("volume", volume)], factory: factory).increment()
    }

    /// How long one member held its writes during a group cut, as the agent measured it.
    func cutPause(group: String, host: String, micros: UInt64) {
        CoreMetrics.Timer(label: "ferry_group_cut_pause_seconds", dimensions: [("group", group), ("host", host)], factory: factory)
            .recordNanoseconds(Int64(min(micros, AgentInputChecks.maxPauseMicros)) * 1000)
    }

    /// Counts a cut round by outcome (committed, aborted).
    func cutRound(group: String, outcome: String) {
        CoreMetrics.Counter(label: "ferry_group_cut_rounds_total", dimensions: [("group", group), ("outcome", outcome)], factory: factory).increment()
    }

    /// Seconds since the group's newest point, and whether that is past its alert threshold.
    func groupRPO(group: String, seconds: Double, alert: Bool) {
        CoreMetrics.Gauge(label: "ferry_group_rpo_seconds", dimensions: [("group", group)], factory: factory).record(seconds)
        CoreMetrics.Gauge(label: "ferry_group_rpo_alert", dimensions: [("group", group)], factory: factory).record(alert ? 1 : 0)
    }

    func alertsFiring(rule: String, count: Int) {
        CoreMetrics.Gauge(label: "ferry_alerts_firing", dimensions: [("rule", rule)], factory: factory).record(Double(count))
    }

    public func render() -> String { registry.emitToString() + renderWriteLags() }
}
