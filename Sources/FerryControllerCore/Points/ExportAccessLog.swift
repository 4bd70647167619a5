import FerryWire
import Logging
import ServiceLifecycle
import Synchronization

/// Opens and refusals of exports over the network, on their way to the audit log. NBD
/// connection threads record without waiting; a service writes the entries to the store. A
/// host that floods refusals cannot grow memory: past `capacity` unwritten entries the oldest
/// are dropped, and the count dropped is logged with the next one written.
public final class ExportAccessLog: Sendable {
    public enum Outcome: String, Sendable {
        case opened = "export.open"
        case refused = "export.refused"
    }

    struct Entry: Sendable {
        var outcome: Outcome
        var host: String
        var export: String
        var volume: String?
    }

    static let capacity = 4096
    let entries: AsyncStream<Entry>
    private let continuation: AsyncStream<Entry>.Continuation
    /// Entries dropped since the auditor last looked.
    let dropped = Atomic<Int>(0)

    public init() {
        (entries, continuation) = AsyncStream.makeStream(of: Entry.self, bufferingPolicy: .bufferingNewest(Self.capacity))
    }

    /// `host` is the principal's name as the audit log shows it (a host name, or an address
    /// where the peer did not authenticate).
    public func record(_ outcome: Outcome, host: String, export: String, volume: String?) {
        if case .dropped = continuation.yield(Entry(outcome: outcome, host: host, export: String(export.prefix(256)), volume: volume)) {
            dropped.add(1, ordering: .relaxed)
        }
    }

    func finish() { continuation.finish() }
}

/// Writes the export access log to the audit table.
struct ExportAccessAuditor: Service {
    let log: ExportAccessLog
    let store: StateStore
    let logger: Logger

    func run() async throws {
        await withGracefulShutdownHandler {
            for await entry in log.entries {
                do {
                    try await store.audit(actor: "agent:\(entry.host)", action: entry.outcome.rawValue, target: entry.export,
                                          detail: "volume=\(entry.volume ?? "-")")
                } catch {
                    logger.warning("cannot write an export access to the audit log", metadata: ["error": "\(error)"])
                }
                let lost = log.dropped.exchange(0, ordering: .relaxed)
                if lost > 0 {
                    try? await store.audit(actor: "system", action: "export.audit-dropped", target: "-",
                                           detail: "\(lost) export accesses were not recorded (more than \(ExportAccessLog.capacity) waiting)")
                }
                if entry.outcome == .refused {
                    logger.warning("export refused", metadata: ["host": "\(entry.host)", "export": "\(entry.export)", "volume": "\(entry.volume ?? "-")"])
                }
            }
        } onGracefulShutdown: {
            log.finish()
        }
    }
}
