import AsyncHTTPClient
import Crypto
import FerryWire
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import ServiceLifecycle

/// Delivers alert notifications to the configured webhooks: a JSON POST signed with
/// HMAC-SHA256 (`X-Ferry-Signature: sha256=HEX` over `TIMESTAMP.BODY`, the timestamp in
/// `X-Ferry-Timestamp`, so a receiver can refuse replays), retried with exponential backoff
/// until a 2xx answer or the attempts run out. Every attempt is recorded with the alert.
final class WebhookDispatcher: Service, Sendable {
    struct Delivery: Sendable {
        var alertID: String
        var notification: API.AlertNotification
    }

    let urls: [String]
    private let key: SymmetricKey
    private let store: StateStore
    private let logger: Logger
    private let maxAttempts: Int
    private let firstDelay: Duration
    private let stream: AsyncStream<Delivery>
    private let continuation: AsyncStream<Delivery>.Continuation

    init(urls: [String], secret: Data, store: StateStore, logger: Logger, maxAttempts: Int = 8, firstDelay: Duration = .seconds(1)) {
        self.urls = urls
        self.key = SymmetricKey(data: secret)
        self.store = store
        self.logger = logger
        self.maxAttempts = maxAttempts
        self.firstDelay = firstDelay
        (stream, continuation) = AsyncStream.makeStream(of: Delivery.self)
    }

    /// Queues a notification for every webhook; returns at once.
    func enqueue(_ notification: API.AlertNotification) {
        guard !urls.isEmpty else { return }
        continuation.yield(Delivery(alertID: notification.alert.id, notification: notification))
    }

    /// One queue per webhook, delivered in order: an alert's resolution never overtakes its
    /// firing, and a webhook that is down holds one delivery in retries, not one task per alert.
    func run() async throws {
        let queues = urls.map { _ in AsyncStream.makeStream(of: Delivery.self) }
        await withDiscardingTaskGroup { group in
            for (url, queue) in zip(urls, queues) {
                group.addTask {
                    for await delivery in queue.stream { await self.deliver(delivery, to: url) }
                }
            }
            for await delivery in stream.cancelOnGracefulShutdown() {
                for queue in queues { queue.continuation.yield(delivery) }
            }
            // Shutting down: retries waiting for their next attempt stop here.
            for queue in queues { queue.continuation.finish() }
            group.cancelAll()
        }
    }

    /// A webhook as API users and logs see it: scheme, host and port only. Its path, query or
    /// user info often carry a credential (a Slack-style URL is one).
    static func shown(_ url: String) -> String {
        guard let u = URLComponents(string: url), let scheme = u.scheme, let host = u.host else { return "webhook" }
        return "\(scheme)://\(host)\(u.port.map { ":\($0)" } ?? "")/…"
    }

    /// `sha256=HEX` of HMAC-SHA256(secret, "TIMESTAMP.BODY").
    static func signature(key: SymmetricKey, timestamp: String, body: Data) -> String {
        let mac = HMAC<SHA256>.authenticationCode(for: Data((timestamp + ".").utf8) + body, using: key)
        return "sha256=" + mac.map { String(format: "%02x", $0) }.joined()
    }

    private func deliver(_ delivery: Delivery, to url: String) async {
        guard let body = try? API.encoder().encode(delivery.notification) else { return }
        var delay = firstDelay
        for attempt in 1...maxAttempts {
            let timestamp = String(Int(Date().timeIntervalSince1970))
            var request = HTTPClientRequest(url: url)
            request.method = .POST
            request.headers.add(name: "Content-Type", value: "application/json")
            request.headers.add(name: "User-Agent", value: "ferry-controller/\(FerryVersion.current)")
            request.headers.add(name: "X-Ferry-Event", value: delivery.notification.event.rawValue)
            request.headers.add(name: "X-Ferry-Alert", value: delivery.alertID)
            request.headers.add(name: "X-Ferry-Timestamp", value: timestamp)
            request.headers.add(name: "X-Ferry-Signature", value: Self.signature(key: key, timestamp: timestamp, body: body))
            request.body = .bytes(ByteBuffer(data: body))
            var status: Int?
            var failure: String?
            do {
                let response = try await HTTPClient.shared.execute(request, timeout: .seconds(10))
                status = Int(response.status.code)
                _ = try? await response.body.collect(upTo: 64 << 10)
            } catch {
                failure = String(describing: error).replacingOccurrences(of: url, with: Self.shown(url)).prefix(300).description
            }
            let delivered = status.map { (200..<300).contains($0) } ?? false
            if !delivered, failure == nil, let status { failure = "HTTP \(status)" }
            try? await store.recordDelivery(alertID: delivery.alertID, API.AlertDelivery(
                url: Self.shown(url), event: delivery.notification.event, attempt: attempt, at: Date(), status: status, error: failure, delivered: delivered))
            if delivered { return }
            logger.warning("alert webhook delivery failed", metadata: [
                "url": "\(Self.shown(url))", "alert": "\(delivery.alertID)", "attempt": "\(attempt)", "error": "\(failure ?? "")"])
            guard attempt < maxAttempts, (try? await Task.sleep(for: delay)) != nil else { break }
            delay = min(delay * 2, .seconds(60))
        }
        logger.error("alert webhook gave up", metadata: ["url": "\(Self.shown(url))", "alert": "\(delivery.alertID)", "attempts": "\(maxAttempts)"])
    }
}
