import Foundation

/// JSON bodies of the operator REST API, shared by the controller and ferryctl.
public enum API {
    /// Version prefix of every API path.
    public static let prefix = "/v1"

    public static func encoder() -> JSONEncoder {
        let e = JSONEncoder()
        e.dateEncodingStrategy = .iso8601
        e.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        return e
    }

    public static func decoder() -> JSONDecoder {
        let d = JSONDecoder()
        d.dateDecodingStrategy = .iso8601
        return d
    }

    /// The body of every non-2xx answer.
    public struct ErrorBody: Codable, Sendable {
        public struct Detail: Codable, Sendable {
            public var code: String
            public var message: String
        }
        public var error: Detail

        public init(code: String, message: String) { error = Detail(code: code, message: message) }
    }

    /// A host's connection: `online` (its session is up), `offline`, or `enrolled` (never connected yet).
    public enum HostState: String, Codable, Sendable, CaseIterable, CustomStringConvertible {
        case online, offline, enrolled
        public var description: String { rawValue }
    }

    /// Whether a volume's host is connected (its export is served).
    public enum VolumeState: String, Codable, Sendable, CaseIterable, CustomStringConvertible {
        case exported
        case hostOffline = "host-offline"
        public var description: String { rawValue }
    }

    /// A volume's replication health, as the console and `ferryctl volumes` show it.
    public enum ReplicaState: String, Codable, Sendable, CaseIterable, CustomStringConvertible {
        case protected
        case initialSync = "initial-sync"
        case resyncing
        /// Replication stopped: its host is offline, or the controller's disk is full (`lastError`).
        case paused
        case error
        /// A failover just landed the volume: its replica is being built from the failover point.
        case seeding
        public var description: String { rawValue }
    }

    public struct Host: Codable, Sendable {
        public var id: String
        public var name: String
        /// `enrolled` (never connected), `online` or `offline`.
        public var state: HostState
        /// Peer address of the current or last session.
        public var address: String?
        public var os: String?
        public var kernel: String?
        public var agentVersion: String?
        public var enrolledAt: Date
        public var lastSeen: Date?
        public var certificateSerial: String?
        public var certificateExpiry: Date?
        public var inventory: Inventory?

        public init(id: String, name: String, state: HostState, address: String?, os: String?, kernel: String?, agentVersion: String?,
                    enrolledAt: Date, lastSeen: Date?, certificateSerial: String?, certificateExpiry: Date?, inventory: Inventory?) {
            self.id = id; self.name = name; self.state = state; self.address = address; self.os = os; self.kernel = kernel
            self.agentVersion = agentVersion; self.enrolledAt = enrolledAt; self.lastSeen = lastSeen
            self.certificateSerial = certificateSerial; self.certificateExpiry = certificateExpiry; self.inventory = inventory
        }
    }

    public struct Inventory: Codable, Sendable, Equatable {
        public struct Interface: Codable, Sendable, Equatable {
            public var name: String
            public var macAddress: String
            public var mtu: UInt32
            public var up: Bool
            public var addresses: [String]
        }

        public struct BlockDevice: Codable, Sendable, Equatable {
            public var name: String
            public var path: String
            public var sizeBytes: UInt64
            public var model: String
            public var rotational: Bool
            public var readOnly: Bool
        }

        public var hostname: String
        public var os: String
        public var kernel: String
        public var architecture: String
        public var cpus: UInt32
        public var memoryBytes: UInt64
        public var bootID: String
        public var interfaces: [Interface]
        public var blockDevices: [BlockDevice]
        /// Virtual machines whose disks are this host's protected volumes (their own shape).
        public var guests: [Guest]

        public struct Guest: Codable, Sendable, Equatable {
            public struct NIC: Codable, Sendable, Equatable {
                public var macAddress: String
                public var model: String

                public init(macAddress: String, model: String) { self.macAddress = macAddress; self.model = model }
            }
            public var name: String
            public var cpus: UInt32
            public var memoryBytes: UInt64
            public var nics: [NIC]
            /// Protected volume names, the guest's disks in order.
            public var volumes: [String]
            public var machine: String?

            public init(name: String, cpus: UInt32, memoryBytes: UInt64, nics: [NIC], volumes: [String], machine: String?) {
                self.name = name; self.cpus = cpus; self.memoryBytes = memoryBytes; self.nics = nics; self.volumes = volumes
                self.machine = machine
            }
        }
    }

    public struct TokenCreateRequest: Codable, Sendable {
        /// Lifetime in seconds; default one hour.
        public var ttlSeconds: Int?
        /// Binds the token to a host name: an agent enrolling with it gets that name, and an agent
        /// asking for a different name is refused.
        public var host: String?

        public init(ttlSeconds: Int?, host: String?) { self.ttlSeconds = ttlSeconds; self.host = host }
    }

    public struct Token: Codable, Sendable {
        /// Short public id (first characters of the secret's hash), safe to show and log.
        public var id: String
        /// The token itself; only in the answer to its creation.
        public var token: String?
        public var host: String?
        public var createdAt: Date
        public var expiresAt: Date
        public var usedAt: Date?
        public var usedBy: String?
        public var createdBy: String

        public init(id: String, token: String?, host: String?, createdAt: Date, expiresAt: Date, usedAt: Date?, usedBy: String?, createdBy: String) {
            self.id = id; self.token = token; self.host = host; self.createdAt = createdAt; self.expiresAt = expiresAt
            self.usedAt = usedAt; self.usedBy = usedBy; self.createdBy = createdBy
        }
    }

    /// A bearer token of the operator API. Roles nest: viewer < operator < admin.
    public struct APIToken: Codable, Sendable {
        public var name: String
        /// `viewer` (read), `operator` (run operations), `admin` (also tokens, hosts, PKI).
        public var role: String
        public var createdAt: Date
        /// The secret; only in the answer to its creation or rotation.
        public var token: String?
        /// When it stops working (nil: the bootstrap admin token, which is rotated instead).
        public var expiresAt: Date?

        public init(name: String, role: String, createdAt: Date, token: String?, expiresAt: Date? = nil) {
            self.name = name; self.role = role; self.createdAt = createdAt; self.token = token; self.expiresAt = expiresAt
        }
    }

    public struct APITokenCreateRequest: Codable, Sendable {
        public var name: String
        public var role: String
        /// Lifetime in seconds (default 90 days, at most 2 years).
        public var expiresInSeconds: Int64?

        public init(name: String, role: String, expiresInSeconds: Int64? = nil) {
            self.name = name; self.role = role; self.expiresInSeconds = expiresInSeconds
        }
    }

    /// `POST /v1/api-tokens/:name/rotate`: a new secret for the token.
    public struct APITokenRotateRequest: Codable, Sendable {
        /// Lifetime of the new secret in seconds (default: as long as the old one was given).
        public var expiresInSeconds: Int64?

        public init(expiresInSeconds: Int64? = nil) { self.expiresInSeconds = expiresInSeconds }
    }

    /// A protected volume. `state` is `exported` while its host is online, `host-offline` otherwise.
    public struct Volume: Codable, Sendable {
        public var host: String
        public var name: String
        public var path: String
        public var sizeBytes: UInt64
        public var state: VolumeState
        /// The agent's NBD socket for the workload: nbd+unix:///NAME?socket=SOCKET
        public var socketPath: String?
        /// Sequence of the last captured write, as the agent last reported it.
        public var lastSequence: UInt64?
        public var protectedAt: Date
        /// `initial-sync` (never completely copied yet), `protected`, `resyncing` (extents are
        /// being compared after a crash, an overflow or a request), `paused` (the host is not
        /// connected, or the controller's disk is full), `error` (see `lastError`) or `seeding`.
        public var replicaState: ReplicaState?
        /// Last sequence of the current capture epoch durable on the controller.
        public var durableSequence: UInt64?
        /// The controller's replica image of the volume (latest state).
        public var replicaPath: String?
        /// How much of the volume is known to match the replica, 0-100.
        public var syncedPercent: Double?
        /// Age of the oldest write the controller does not hold yet (0: none pending).
        public var lagSeconds: Double?
        /// Captured bytes the controller does not hold yet.
        public var lagBytes: UInt64?
        /// Bytes applied to the replica per second, over the last seconds.
        public var throughputBytesPerSecond: Double?
        /// The current (or last) initial sync or resync.
        public var sync: SyncProgress?
        /// Extents marked dirty in the agent's activity log.
        public var markedExtents: UInt64?
        /// Syncs completed since the volume was protected.
        public var syncsCompleted: UInt64?
        /// The last error applying the stream.
        public var lastError: String?
        /// Recoveries of this volume hydrating onto (or hydrated on) a recovery host.
        public var hydration: [Hydration]?
        /// When the agent last reported on the volume.
        public var reportedAt: Date?
        /// The agent's loopback TCP export (`nbd://HOST:PORT/NAME`), if it has one.
        public var tcpAddress: String?
        /// `export` (every write captured through the agent's NBD export) or `scan`.
        public var captureMode: String?
        /// For `scan`: seconds between comparisons (the recovery point objective).
        public var scanIntervalSeconds: Int?
        /// Reprotected after a failover that landed: this (fenced) volume follows its recovered
        /// volume's journal in write order.
        public var sink: SinkProgress?
        /// The replica journal's bytes, and the most it may hold (`replica-journal-max`).
        public var journalBytes: UInt64?
        public var journalLimitBytes: UInt64?

        public init(host: String, name: String, path: String, sizeBytes: UInt64, state: VolumeState, socketPath: String?,
                    lastSequence: UInt64?, protectedAt: Date) {
            self.host = host; self.name = name; self.path = path; self.sizeBytes = sizeBytes; self.state = state
            self.socketPath = socketPath; self.lastSequence = lastSequence; self.protectedAt = protectedAt
        }
    }

    /// A fenced original volume following its landed recovered volume (reprotect): where it
    /// stands in that volume's replica journal.
    public struct SinkProgress: Codable, Sendable, Equatable {
        /// The recovered volume it follows: "HOST/VOLUME".
        public var follows: String
        public var epoch: UInt64
        public var sequence: UInt64
        /// Records of the followed replica not applied yet (nil while the sink is in an earlier epoch).
        public var behindRecords: UInt64?
        /// Seconds since the sink last held every record the replica had (0: caught up).
        public var lagSeconds: Double
        /// Bytes applied since the controller started following.
        public var appliedBytes: UInt64
        public var caughtUpAt: Date?

        public init(follows: String, epoch: UInt64, sequence: UInt64, behindRecords: UInt64?, lagSeconds: Double, appliedBytes: UInt64, caughtUpAt: Date?) {
            self.follows = follows; self.epoch = epoch; self.sequence = sequence; self.behindRecords = behindRecords
            self.lagSeconds = lagSeconds; self.appliedBytes = appliedBytes; self.caughtUpAt = caughtUpAt
        }
    }

    /// Where an initial sync or resync stands.
    public struct SyncProgress: Codable, Sendable {
        /// `full` (initial sync or on demand) or `marked` (after a crash or a change-log overflow).
        public var kind: String
        public var totalBytes: UInt64
        public var doneBytes: UInt64
        /// Bytes that differed and were sent.
        public var sentBytes: UInt64
        public var rateBytesPerSecond: UInt64
        /// Seconds left at the current rate (nil when done or unknown).
        public var etaSeconds: Double?
        public var done: Bool

        public init(kind: String, totalBytes: UInt64, doneBytes: UInt64, sentBytes: UInt64, rateBytesPerSecond: UInt64, etaSeconds: Double?, done: Bool) {
            self.kind = kind; self.totalBytes = totalBytes; self.doneBytes = doneBytes; self.sentBytes = sentBytes
            self.rateBytesPerSecond = rateBytesPerSecond; self.etaSeconds = etaSeconds; self.done = done
        }
    }

    public struct ProtectRequest: Codable, Sendable {
        public var host: String
        public var volume: String
        public var path: String
        /// Create a sparse image of this size if the path does not exist.
        public var createSizeBytes: UInt64?
        /// `export` (default) or `scan`.
        public var captureMode: String?
        /// For `scan`: seconds between comparisons (default 30).
        public var scanIntervalSeconds: Int?

        public init(host: String, volume: String, path: String, createSizeBytes: UInt64?) {
            self.host = host; self.volume = volume; self.path = path; self.createSizeBytes = createSizeBytes
        }
    }

    /// `POST /v1/volumes/:host/:name/resize`: grow a protected volume online.
    public struct ResizeRequest: Codable, Sendable {
        public var sizeBytes: UInt64

        public init(sizeBytes: UInt64) { self.sizeBytes = sizeBytes }
    }

    /// What a resize did.
    public struct ResizeResult: Codable, Sendable {
        public var host: String
        public var name: String
        public var previousBytes: UInt64
        public var sizeBytes: UInt64
        /// False when the volume had that size already.
        public var changed: Bool
        /// The replica's size now: the new size once the agent's stream delivered the resize
        /// (the answer waits up to 30 s for it); less while it is still on its way.
        public var replicaBytes: UInt64

        public init(host: String, name: String, previousBytes: UInt64, sizeBytes: UInt64, changed: Bool, replicaBytes: UInt64) {
            self.host = host; self.name = name; self.previousBytes = previousBytes; self.sizeBytes = sizeBytes
            self.changed = changed; self.replicaBytes = replicaBytes
        }
    }

    public struct AuditEntry: Codable, Sendable {
        public var id: Int64
        public var at: Date
        public var actor: String
        public var action: String
        public var target: String
        public var detail: String

        public init(id: Int64, at: Date, actor: String, action: String, target: String, detail: String) {
            self.id = id; self.at = at; self.actor = actor; self.action = action; self.target = target; self.detail = detail
        }
    }

    /// Without a token only `status`; the rest for a valid token.
    /// `GET /v1/whoami`: the caller's token.
    public struct Principal: Codable, Sendable {
        public var name: String
        public var role: String
        public var expiresAt: Date?
        public init(name: String, role: String, expiresAt: Date?) { self.name = name; self.role = role; self.expiresAt = expiresAt }
    }

    /// One sample of `GET /v1/volumes/:host/:name/lag-history`: the worst lag in 10 s.
    public struct LagSample: Codable, Sendable, Equatable {
        public var at: Date
        public var lagSeconds: Double
        public var lagBytes: UInt64
        public init(at: Date, lagSeconds: Double, lagBytes: UInt64) { self.at = at; self.lagSeconds = lagSeconds; self.lagBytes = lagBytes }
    }

    public struct Health: Codable, Sendable {
        public var status: String
        public var version: String?
        public var agentsOnline: Int?

        public init(status: String, version: String?, agentsOnline: Int?) {
            self.status = status; self.version = version; self.agentsOnline = agentsOnline
        }
    }
}

extension API.Inventory {
    public init(_ p: Ferry_V1_Inventory) {
        self.init(
            hostname: p.hostname, os: p.osName, kernel: p.kernel, architecture: p.architecture, cpus: p.cpuCount,
            memoryBytes: p.memoryBytes, bootID: p.bootID,
            interfaces: p.interfaces.map { .init(name: $0.name, macAddress: $0.macAddress, mtu: $0.mtu, up: $0.up, addresses: $0.addresses) },
            blockDevices: p.blockDevices.map {
                .init(name: $0.name, path: $0.path, sizeBytes: $0.sizeBytes, model: $0.model, rotational: $0.rotational, readOnly: $0.readOnly)
            },
            guests: p.guests.map { g in
                .init(name: g.name, cpus: g.cpus, memoryBytes: g.memoryBytes,
                      nics: g.nics.map { .init(macAddress: $0.macAddress, model: $0.model) }, volumes: g.volumes,
                      machine: g.machine.isEmpty ? nil : g.machine)
            }
        )
    }
}

/// Version strings reported by every component.
public enum FerryVersion {
    public static let current = "0.1.0"
}
