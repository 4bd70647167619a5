import Foundation

extension API {
    /// How a consistency group takes and keeps its points. Durations in seconds.
    public struct GroupPolicy: Codable, Sendable, Equatable {
        /// Crash-consistent group point every this many seconds (0: none scheduled).
        public var crashIntervalSeconds: Int = 15
        /// App-consistent point (quiesce hook, cut, thaw hook) every this many seconds (0: none).
        public var appIntervalSeconds: Int = 3600
        /// Names of the hooks each member's agent defines in its own config.
        public var quiesceHook: String?
        public var thawHook: String?
        /// Longest a quiesce or thaw hook may run.
        public var hookTimeoutSeconds: Int = 30
        /// Longest a member may hold its writes during a cut before the round aborts.
        public var holdBudgetMilliseconds: Int = 50
        /// Retention tiers: every point for `keepAllSeconds`, then one an hour until
        /// `hourlySeconds`, then one a day until `dailySeconds`.
        public var keepAllSeconds: Int = 7200
        public var hourlySeconds: Int = 86_400
        public var dailySeconds: Int = 604_800
        /// Alert when the newest point is older than this.
        public var rpoAlertSeconds: Int = 60

        public init() {}

        public init(from decoder: any Decoder) throws {
            // Every field is optional in a request: what is missing keeps its default.
            let c = try decoder.container(keyedBy: CodingKeys.self)
            let d = GroupPolicy()
            crashIntervalSeconds = try c.decodeIfPresent(Int.self, forKey: .crashIntervalSeconds) ?? d.crashIntervalSeconds
            appIntervalSeconds = try c.decodeIfPresent(Int.self, forKey: .appIntervalSeconds) ?? d.appIntervalSeconds
            quiesceHook = try c.decodeIfPresent(String.self, forKey: .quiesceHook)
            thawHook = try c.decodeIfPresent(String.self, forKey: .thawHook)
            hookTimeoutSeconds = try c.decodeIfPresent(Int.self, forKey: .hookTimeoutSeconds) ?? d.hookTimeoutSeconds
            holdBudgetMilliseconds = try c.decodeIfPresent(Int.self, forKey: .holdBudgetMilliseconds) ?? d.holdBudgetMilliseconds
            keepAllSeconds = try c.decodeIfPresent(Int.self, forKey: .keepAllSeconds) ?? d.keepAllSeconds
            hourlySeconds = try c.decodeIfPresent(Int.self, forKey: .hourlySeconds) ?? d.hourlySeconds
            dailySeconds = try c.decodeIfPresent(Int.self, forKey: .dailySeconds) ?? d.dailySeconds
            rpoAlertSeconds = try c.decodeIfPresent(Int.self, forKey: .rpoAlertSeconds) ?? d.rpoAlertSeconds
        }
    }

    public struct GroupCreateRequest: Codable, Sendable {
        public var name: String
        /// Members as `HOST/VOLUME`.
        public var volumes: [String]
        public var policy: GroupPolicy?
        public init(name: String, volumes: [String], policy: GroupPolicy?) {
            self.name = name; self.volumes = volumes; self.policy = policy
        }
    }

    public struct Group: Codable, Sendable {
        public var name: String
        public var volumes: [String]
        public var policy: GroupPolicy
        public var createdAt: Date
        public var points: Int
        public var newestPoint: Date?
        /// Seconds since the newest point (nil: none yet).
        public var rpoSeconds: Double?
        public var rpoAlert: Bool
        /// Why the last scheduled round failed, if it did.
        public var lastRoundError: String?
        public init(name: String, volumes: [String], policy: GroupPolicy, createdAt: Date, points: Int, newestPoint: Date?,
                    rpoSeconds: Double?, rpoAlert: Bool, lastRoundError: String?) {
            self.name = name; self.volumes = volumes; self.policy = policy; self.createdAt = createdAt; self.points = points
            self.newestPoint = newestPoint; self.rpoSeconds = rpoSeconds; self.rpoAlert = rpoAlert; self.lastRoundError = lastRoundError
        }
    }

    public struct PointMember: Codable, Sendable, Equatable {
        /// `HOST/VOLUME`
        public var volume: String
        public var epoch: UInt64
        public var sequence: UInt64
        public init(volume: String, epoch: UInt64, sequence: UInt64) {
            self.volume = volume; self.epoch = epoch; self.sequence = sequence
        }
    }

    public struct Point: Codable, Sendable {
        public var id: String
        public var group: String
        public var createdAt: Date
        /// crash, app, group-crash, group-app or manual
        public var kind: String
        /// app when the quiesce hooks ran on every member; crash otherwise
        public var consistency: String
        public var label: String?
        /// Why a quiesce or thaw hook failed (the point is then crash-consistent).
        public var hookError: String?
        public var members: [PointMember]
        /// Every member's data up to the point has reached the controller's disk.
        public var complete: Bool
        /// Longest member pause of the cut, in microseconds.
        public var pauseMicros: UInt64?
        public init(id: String, group: String, createdAt: Date, kind: String, consistency: String, label: String?, hookError: String?,
                    members: [PointMember], complete: Bool, pauseMicros: UInt64?) {
            self.id = id; self.group = group; self.createdAt = createdAt; self.kind = kind; self.consistency = consistency
            self.label = label; self.hookError = hookError; self.members = members; self.complete = complete; self.pauseMicros = pauseMicros
        }
    }

    public struct PointCreateRequest: Codable, Sendable {
        public var app: Bool?
        public var label: String?
        public init(app: Bool?, label: String?) { self.app = app; self.label = label }
    }

    /// A point-in-time image served by the controller as an NBD export.
    public struct ExportCreateRequest: Codable, Sendable {
        /// A point choice: latest, latest-processed, latest-crash, latest-app, latest-group, an id.
        public var point: String?
        /// ISO 8601 time: the newest point at or before it.
        public var asOf: Date?
        /// Through a copy-on-write overlay; the point itself never changes.
        public var writable: Bool?
        /// Hosts (names) that may open it over NBD+TLS; none: the controller's local socket only.
        public var hosts: [String]?
        public init(point: String?, asOf: Date?, writable: Bool?, hosts: [String]? = nil) {
            self.point = point; self.asOf = asOf; self.writable = writable; self.hosts = hosts
        }
    }

    public struct Export: Codable, Sendable {
        public var id: String
        /// `HOST/VOLUME`
        public var volume: String
        public var point: String
        public var epoch: UInt64
        public var sequence: UInt64
        public var writable: Bool
        /// libnbd / qemu URI of the local export.
        public var uri: String
        public var socketPath: String
        public var createdAt: Date
        /// How long opening the image took.
        public var openMilliseconds: Double
        /// Hosts that may open it over NBD+TLS (empty: the local socket only).
        public var hosts: [String]
        public init(id: String, volume: String, point: String, epoch: UInt64, sequence: UInt64, writable: Bool, uri: String,
                    socketPath: String, createdAt: Date, openMilliseconds: Double, hosts: [String] = []) {
            self.id = id; self.volume = volume; self.point = point; self.epoch = epoch; self.sequence = sequence; self.writable = writable
            self.uri = uri; self.socketPath = socketPath; self.createdAt = createdAt; self.openMilliseconds = openMilliseconds
            self.hosts = hosts
        }
    }
}
