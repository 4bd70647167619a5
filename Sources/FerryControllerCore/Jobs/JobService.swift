import Foundation
import ServiceLifecycle
import Synchronization

/// Resumes what a previous controller process left: recovered volumes' exports, reverse
/// streams and unfinished jobs. Jobs are not cancelled at shutdown: they stay `running` in
/// the database and go on at the next start.
struct JobService: Service {
    let jobs: JobRunner

    func run() async throws {
        await jobs.resumeAfterRestart()
        try? await gracefulShutdown()
        await jobs.shutdown()
    }
}

/// The port the controller's NBD TLS listener bound, once it has.
final class BoundPort: Sendable {
    private let port = Mutex<Int?>(nil)
    func set(_ value: Int?) { port.withLock { $0 = value } }
    var value: Int? { port.withLock { $0 } }
}
