import Foundation

extension API {
    /// What an alert is about.
    public enum AlertRule: String, Codable, Sendable, CaseIterable {
        /// A group's newest complete point is older than its policy's `rpoAlertSeconds`.
        case rpo
        /// A volume's replication lag is over the controller's `alert-lag` (grouped or not).
        case lag
        case volumeError = "volume-error"
        /// Replication into the volume's replica stopped; the message says why (host offline, disk full).
        case volumePaused = "volume-paused"
        /// An initial sync or resync runs longer than `alert-resync`.
        case resyncLong = "resync-long"
        case hostOffline = "host-offline"
        /// A replica journal holds more than `alert-journal-percent` of `replica-journal-max`.
        case journalNearCap = "journal-near-cap"
        /// A host's certificate expires within `alert-certificate-expiry`.
        case certificateExpiring = "certificate-expiring"
        /// A plan's newest job failed.
        case jobFailed = "job-failed"
        /// A protected plan had no successful drill within `alert-drill-overdue`.
        case drillOverdue = "drill-overdue"
    }

    public enum AlertSeverity: String, Codable, Sendable, CaseIterable {
        case warning, critical
    }

    public enum AlertState: String, Codable, Sendable, CaseIterable {
        case firing, resolved
    }

    /// One delivery attempt of an alert's event to a webhook.
    public struct AlertDelivery: Codable, Sendable, Equatable {
        public var url: String
        public var event: AlertState
        public var attempt: Int
        public var at: Date
        /// The HTTP status the webhook answered, if it answered.
        public var status: Int?
        public var error: String?
        public var delivered: Bool
        public init(url: String, event: AlertState, attempt: Int, at: Date, status: Int?, error: String?, delivered: Bool) {
            self.url = url; self.event = event; self.attempt = attempt; self.at = at; self.status = status; self.error = error
            self.delivered = delivered
        }
    }

    /// An alert: opened when its rule's condition held (for as long as the rule asks),
    /// resolved by the controller once it no longer does.
    public struct Alert: Codable, Sendable {
        public var id: String
        public var rule: AlertRule
        public var severity: AlertSeverity
        /// What it is about: a group, HOST/VOLUME, a host or a plan.
        public var subject: String
        public var message: String
        public var state: AlertState
        public var openedAt: Date
        public var resolvedAt: Date?
        public var deliveries: [AlertDelivery]?
        public init(id: String, rule: AlertRule, severity: AlertSeverity, subject: String, message: String, state: AlertState,
                    openedAt: Date, resolvedAt: Date?, deliveries: [AlertDelivery]? = nil) {
            self.id = id; self.rule = rule; self.severity = severity; self.subject = subject; self.message = message
            self.state = state; self.openedAt = openedAt; self.resolvedAt = resolvedAt; self.deliveries = deliveries
        }
    }

    /// The JSON body a webhook receives (signed: `X-Ferry-Signature: sha256=HEX`, an
    /// HMAC-SHA256 of the body with the webhook secret).
    public struct AlertNotification: Codable, Sendable {
        public var event: AlertState
        public var alert: Alert
        public var controller: String
        public var sentAt: Date
        public init(event: AlertState, alert: Alert, controller: String, sentAt: Date) {
            self.event = event; self.alert = alert; self.controller = controller; self.sentAt = sentAt
        }
    }
}
