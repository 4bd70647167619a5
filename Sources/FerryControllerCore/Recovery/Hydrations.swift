import FerryWire
import Foundation
import Logging

/// Where the hydration of recovered volumes stands, from their recovery hosts' reports. When a
/// volume is complete (every block on its recovery host's storage) the controller's point export
/// for it is released, and the recovery record says so: a controller restart does not serve it
/// again, and the controller is off that volume's data path.
public actor Hydrations {
    let store: StateStore
    let exports: PointExports
    let metrics: ControllerMetrics
    let logger: Logger
    /// "RECOVERY/LOCALNAME" → the latest status.
    private var latest: [String: API.Hydration] = [:]
    /// Told when a volume completes, for the report of the job that recovered it.
    private var jobs: JobRunner?

    func attach(jobs: JobRunner) { self.jobs = jobs }

    init(store: StateStore, exports: PointExports, metrics: ControllerMetrics, logger: Logger) {
        self.store = store
        self.exports = exports
        self.metrics = metrics
        self.logger = logger
    }

    /// A recovery host's report. Only the host a recovery runs on may report on it.
    func record(_ report: Ferry_V1_RecoveryReport, from hostName: String) async throws {
        guard report.volumes.count <= 256 else { throw FerryError(.badRequest, "a recovery report names at most 256 volumes") }
        guard var record = try await store.recoveries().first(where: { $0.id == report.recoveryID }) else {
            throw FerryError(.notFound, "no recovery '\(report.recoveryID)'")
        }
        guard record.recoveryHost == hostName else {
            throw FerryError(.permissionDenied, "recovery \(record.id) runs on \(record.recoveryHost), not \(hostName)")
        }
        var changed = false
        for status in report.volumes {
            guard let i = record.volumes.firstIndex(where: { $0.localName == status.name }), record.volumes[i].hydrate == true else { continue }
            let v = record.volumes[i]
            let local = min(status.localBytes, v.size)
            let rate = status.bytesPerSecond.isFinite && status.bytesPerSecond >= 0 ? status.bytesPerSecond : 0
            var h = API.Hydration(plan: record.plan, volume: v.source, recoveryHost: record.recoveryHost, localName: v.localName,
                                  target: String(status.targetPath.prefix(4096)), sizeBytes: v.size, localBytes: local,
                                  fetchedBytes: status.fetchedBytes, bytesPerSecond: rate, complete: status.hydrated,
                                  released: v.released == true, updatedAt: Date())
            h.copySeconds = status.copySeconds.isFinite && status.copySeconds >= 0 ? status.copySeconds : nil
            if status.hydrated, v.released != true {
                if await exports.image(id: v.exportID) != nil {
                    try? await exports.remove(id: v.exportID, managed: true)
                }
                record.volumes[i].released = true
                h.released = true
                changed = true
                logger.info("recovered volume hydrated; its point export is released", metadata: [
                    "volume": "\(v.source)", "recovery-host": "\(record.recoveryHost)", "fetched": "\(status.fetchedBytes)"])
                try? await store.audit(actor: "host:\(hostName)", action: "recovery.hydrated", target: v.source,
                                       detail: "recovery=\(record.id) target=\(h.target) size=\(v.size) fetched=\(status.fetchedBytes)")
                if let job = record.job {
                    let copy = h.copySeconds.map { String(format: ", copied in %.1f s", $0) } ?? ""
                    await jobs?.addReport(job, key: "hydration_\(v.localName)",
                                          value: "complete on \(record.recoveryHost) (\(h.target)): \(status.fetchedBytes) of \(v.size) bytes fetched\(copy)")
                }
            }
            latest[record.id + "/" + v.localName] = h
            metrics.noteHydration(h)
        }
        if changed { try await store.saveRecovery(record) }
    }

    /// A recovered volume protected on its recovery host reports its hydration with the
    /// volume's own report: it counts as its recovery's.
    func record(volume: String, progress: Ferry_V1_HydrationProgress, from hostName: String) async throws {
        guard let record = try await store.recoveries().first(where: { r in
            r.recoveryHost == hostName && r.volumes.contains { $0.localName == volume && $0.hydrate == true }
        }) else { return }
        var status = Ferry_V1_RecoveredVolumeStatus()
        status.name = volume
        status.targetPath = progress.targetPath
        status.localBytes = progress.localBytes
        status.fetchedBytes = progress.fetchedBytes
        status.bytesPerSecond = progress.bytesPerSecond
        status.copySeconds = progress.copySeconds
        status.hydrated = progress.hydrated
        status.hydrating = true
        var report = Ferry_V1_RecoveryReport()
        report.recoveryID = record.id
        report.volumes = [status]
        try await self.record(report, from: hostName)
    }

    /// The hydrations of a plan's recovered volumes (all plans: nil), as last reported, of
    /// recoveries that are still there (a drill cleaned up takes its entries with it).
    func list(plan: String? = nil) async -> [API.Hydration] {
        let live = Set(((try? await store.recoveries(plan: plan)) ?? []).flatMap { r in r.volumes.map { r.id + "/" + $0.localName } })
        latest = latest.filter { live.contains($0.key) || (plan != nil && $0.value.plan != plan) }
        return latest.filter { live.contains($0.key) }.values.sorted { ($0.plan, $0.volume) < ($1.plan, $1.volume) }
    }
}
