import FerryWire
import Foundation

/// The controller's settings: defaults, overridden by the config file, overridden by flags.
public struct ControllerConfig: Sendable {
    public var dataDir: String
    /// Agent listener, `HOST:PORT`.
    public var listen: String = "0.0.0.0:7443"
    /// Operator API listener, `HOST:PORT`.
    public var apiListen: String = "127.0.0.1:7444"
    /// Point-in-time exports for agents: NBD with STARTTLS, client certificates of enrolled
    /// hosts required, `HOST:PORT`; empty: off.
    public var nbdTLSListen: String = ""
    /// Extra DNS names and IP addresses for the server certificate (how agents and operators reach
    /// this controller). `ferry-controller`, `localhost`, the hostname and 127.0.0.1 are always in.
    public var tlsNames: [String] = []
    public var tlsAddresses: [String] = []
    /// An operator's CA; when unset the controller makes its own in the data dir.
    public var caCert: String?
    public var caKey: String?
    /// An operator's server certificate (must carry DNS SAN `ferry-controller`); when unset the
    /// controller issues its own from the CA.
    public var serverCert: String?
    public var serverKey: String?
    public var heartbeatInterval: Duration = .seconds(5)
    public var certificateValidity: Duration = .seconds(30 * 86_400)
    public var maxFrameBytes: Int = FrameSize.defaultAuthenticated
    /// Connections each listener (agents, NBD+TLS) holds at once, and from one source address
    /// (raise it for many agents behind one NAT address).
    public var maxConnections: Int = 4096
    public var maxConnectionsPerAddress: Int = 64
    /// Failed enrollments one source address may make in a minute before it is refused for the
    /// rest of that minute.
    public var enrollmentFailuresPerMinute: Int = 10
    /// How long a new connection may take, TLS handshake included, to send its first message.
    public var enrollmentTimeout: Duration = .seconds(10)
    public var logLevel: String = "info"
    /// How long replica journals keep every record before folding it into the base image, and
    /// the most journal bytes kept per volume whatever their age.
    public var replicaRetention: Duration = .seconds(3600)
    public var replicaJournalMax: UInt64 = 8 << 30
    /// Webhooks (http or https URLs) every alert's firing and resolution is POSTed to.
    public var alertWebhooks: [String] = []
    /// The webhooks' HMAC secret; unset: `alert-webhook.secret` in the data dir, made at first start.
    public var alertWebhookSecretFile: String?
    /// How often the alert rules are evaluated, and their thresholds.
    public var alertInterval: Duration = .seconds(5)
    public var alertThresholds = AlertThresholds()

    public init(dataDir: String) { self.dataDir = dataDir }

    /// Keys of the YAML configuration file (see deploy/controller.yaml).
    struct File: ConfigFile {
        var dataDir: String?
        var listen: String?
        var apiListen: String?
        var nbdTLSListen: String?
        var tlsNames: [String]?
        var tlsAddresses: [String]?
        var caCert: String?
        var caKey: String?
        var serverCert: String?
        var serverKey: String?
        var heartbeatInterval: String?
        var certificateValidity: String?
        var maxFrameBytes: Int?
        var maxConnections: Int?
        var maxConnectionsPerAddress: Int?
        var enrollmentFailuresPerMinute: Int?
        var enrollmentTimeout: String?
        var logLevel: String?
        var replicaRetention: String?
        var replicaJournalMax: String?
        var alertWebhooks: [String]?
        var alertWebhookSecretFile: String?
        var alertInterval: String?
        var alertLag: String?
        var alertResync: String?
        var alertHostOffline: String?
        var alertJournalPercent: Int?
        var alertCertificateExpiry: String?
        var alertDrillOverdue: String?

        enum CodingKeys: String, CodingKey, CaseIterable {
            case dataDir = "data-dir", listen, apiListen = "api-listen", nbdTLSListen = "nbd-tls-listen", tlsNames = "tls-names", tlsAddresses = "tls-addresses"
            case caCert = "ca-cert", caKey = "ca-key", serverCert = "server-cert", serverKey = "server-key"
            case heartbeatInterval = "heartbeat-interval", certificateValidity = "certificate-validity"
            case maxConnections = "max-connections", maxConnectionsPerAddress = "max-connections-per-address"
            case enrollmentFailuresPerMinute = "enrollment-failures-per-minute"
            case maxFrameBytes = "max-frame-bytes", enrollmentTimeout = "enrollment-timeout", logLevel = "log-level"
            case replicaRetention = "replica-retention", replicaJournalMax = "replica-journal-max"
            case alertWebhooks = "alert-webhooks", alertWebhookSecretFile = "alert-webhook-secret-file", alertInterval = "alert-interval"
            case alertLag = "alert-lag", alertResync = "alert-resync", alertHostOffline = "alert-host-offline"
            case alertJournalPercent = "alert-journal-percent", alertCertificateExpiry = "alert-certificate-expiry"
            case alertDrillOverdue = "alert-drill-overdue"
        }
    }

    /// Applies a configuration file on top of the defaults.
    public mutating func apply(file path: String) throws {
        let f = try ConfigText.load(File.self, path: path)
        if let v = f.dataDir { dataDir = v }
        if let v = f.listen { listen = v }
        if let v = f.apiListen { apiListen = v }
        if let v = f.nbdTLSListen { nbdTLSListen = v }
        if let v = f.tlsNames { tlsNames = v }
        if let v = f.tlsAddresses { tlsAddresses = v }
        if let v = f.caCert { caCert = v }
        if let v = f.caKey { caKey = v }
        if let v = f.serverCert { serverCert = v }
        if let v = f.serverKey { serverKey = v }
        if let v = f.heartbeatInterval { heartbeatInterval = try ConfigText.duration(v) }
        if let v = f.certificateValidity { certificateValidity = try ConfigText.duration(v) }
        if let v = f.maxFrameBytes { maxFrameBytes = v }
        if let v = f.maxConnections { maxConnections = v }
        if let v = f.maxConnectionsPerAddress { maxConnectionsPerAddress = v }
        if let v = f.enrollmentFailuresPerMinute { enrollmentFailuresPerMinute = v }
        if let v = f.enrollmentTimeout { enrollmentTimeout = try ConfigText.duration(v) }
        if let v = f.logLevel { logLevel = v }
        if let v = f.replicaRetention { replicaRetention = try ConfigText.duration(v) }
        if let v = f.replicaJournalMax { replicaJournalMax = try ConfigText.byteSize(v) }
        if let v = f.alertWebhooks { alertWebhooks = v }
        if let v = f.alertWebhookSecretFile { alertWebhookSecretFile = v }
        if let v = f.alertInterval { alertInterval = try ConfigText.duration(v) }
        func seconds(_ text: String) throws -> Double {
            let d = try ConfigText.duration(text)
            return Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
        }
        if let v = f.alertLag { alertThresholds.lagSeconds = try seconds(v) }
        if let v = f.alertResync { alertThresholds.resyncSeconds = try seconds(v) }
        if let v = f.alertHostOffline { alertThresholds.hostOfflineSeconds = try seconds(v) }
        if let v = f.alertJournalPercent { alertThresholds.journalPercent = Double(v) }
        if let v = f.alertCertificateExpiry { alertThresholds.certificateExpirySeconds = try seconds(v) }
        if let v = f.alertDrillOverdue { alertThresholds.drillOverdueSeconds = try seconds(v) }
    }

    /// Rejects settings that cannot work, with a message that names the setting.
    public func validate() throws {
        _ = try ConfigText.hostPort(listen)
        _ = try ConfigText.hostPort(apiListen)
        if !nbdTLSListen.isEmpty { _ = try ConfigText.hostPort(nbdTLSListen) }
        guard (caCert == nil) == (caKey == nil) else {
            throw FerryError(.badConfiguration, "ca-cert and ca-key go together: the controller signs agent certificates with the CA key")
        }
        guard (serverCert == nil) == (serverKey == nil) else {
            throw FerryError(.badConfiguration, "server-cert and server-key go together")
        }
        guard replicaRetention >= .zero, replicaJournalMax >= 64 << 20 else {
            throw FerryError(.badConfiguration, "replica-retention must not be negative and replica-journal-max must be at least 64M")
        }
        // Journal sizes are counted in signed 64-bit bytes; a cap past a pebibyte is a typo.
        guard replicaJournalMax <= 1 << 50 else {
            throw FerryError(.badConfiguration, "replica-journal-max must be at most 1024T (a pebibyte), not \(replicaJournalMax) bytes")
        }
        guard heartbeatInterval >= .milliseconds(100), heartbeatInterval <= .seconds(300) else {
            throw FerryError(.badConfiguration, "heartbeat-interval must be between 100ms and 300s")
        }
        guard (1...1_000_000).contains(maxConnections), (1...maxConnections).contains(maxConnectionsPerAddress) else {
            throw FerryError(.badConfiguration, "max-connections must be 1 to 1000000 and max-connections-per-address 1 to max-connections")
        }
        guard (1...100_000).contains(enrollmentFailuresPerMinute) else {
            throw FerryError(.badConfiguration, "enrollment-failures-per-minute must be 1 to 100000")
        }
        guard certificateValidity >= .seconds(10) else {
            throw FerryError(.badConfiguration, "certificate-validity must be at least 10s")
        }
        for url in alertWebhooks {
            guard let u = URL(string: url), ["http", "https"].contains(u.scheme ?? ""), u.host != nil, url.utf8.count <= 2048 else {
                throw FerryError(.badConfiguration, "alert-webhooks: '\(url.prefix(200))' is not an http or https URL")
            }
        }
        guard alertInterval >= .milliseconds(100), alertInterval <= .seconds(3600) else {
            throw FerryError(.badConfiguration, "alert-interval must be between 100ms and 1h")
        }
        let t = alertThresholds
        guard [t.lagSeconds, t.resyncSeconds, t.hostOfflineSeconds, t.certificateExpirySeconds, t.drillOverdueSeconds].allSatisfy({ $0 >= 0 && $0 <= 3650 * 86_400 }),
              (1...100).contains(t.journalPercent) else {
            throw FerryError(.badConfiguration, "alert thresholds must be durations of at most 3650d, and alert-journal-percent 1 to 100")
        }
        guard (FrameSize.minimumAuthenticated...256 * 1024 * 1024).contains(maxFrameBytes) else {
            throw FerryError(.badConfiguration, "max-frame-bytes must be between 34 MiB (a 32 MiB write plus framing) and 256 MiB")
        }
    }

    var databasePath: String { dataDir + "/state.sqlite" }
}
