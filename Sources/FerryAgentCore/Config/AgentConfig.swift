import FerryWire
import Foundation

/// The agent's settings: defaults, overridden by the config file, overridden by flags.
public struct AgentConfig: Sendable {
    public var dataDir: String
    /// Controller agent listener, `HOST:PORT`. Set at enrollment and remembered; a value here
    /// overrides the remembered one (e.g. after the controller moved).
    public var controller: String?
    /// Name to ask for at enrollment (default: the hostname). A token bound to a host wins.
    public var name: String?
    /// First and largest delay between reconnection attempts; each attempt doubles the delay,
    /// with jitter, up to the maximum.
    public var reconnectInitialDelay: Duration = .milliseconds(250)
    public var reconnectMaxDelay: Duration = .seconds(5)
    /// How often the inventory is re-read to report changes.
    public var inventoryInterval: Duration = .seconds(60)
    public var logLevel: String = "info"
    /// Where each protected volume's NBD socket is made (`NAME.sock`); default `DATA-DIR/sockets`.
    public var socketDir: String?
    /// Threads doing volume I/O (pread, pwrite, fdatasync).
    public var ioThreads: Int = 4
    /// Per volume: captured writes held in memory before spilling, and the spill file's cap.
    /// Past both, only dirty-extent marks are kept and those extents resync later.
    public var changeLogMemory: UInt64 = 64 << 20
    public var changeLogSpill: UInt64 = 1 << 30
    /// Also serve every volume's NBD export on this loopback `HOST:PORT` (by export name), for
    /// clients that cannot use a unix socket. Off by default.
    public var nbdTCP: String?
    /// nbd-tcp has no authentication: any local user could read and write every protected
    /// volume through it. It is served only when this says the operator accepts that.
    public var nbdTCPInsecure = false
    /// Users besides root and the agent's own that may use the NBD unix sockets (names or
    /// numeric ids), e.g. the user qemu runs as. Checked per connection (SO_PEERCRED).
    public var nbdSocketUsers: [String] = []
    /// Hooks the controller may ask for by name (quiesce, thaw, later start and stop): each a
    /// command line run with `/bin/sh -c`. The controller never sends a command, only a name.
    public var hooks: [String: String] = [:]
    /// Built-in `fsfreeze` hooks (`NAME: {fsfreeze: [MOUNTPOINT, …]}` under `hooks:`): frozen in
    /// order as a group's quiesce hook, thawed in reverse as its thaw hook.
    public var fsfreezeHooks: [String: [String]] = [:]
    /// What the controller may have this agent protect (open, create, write); nil: the default,
    /// `DATA-DIR/volumes/` and block devices not in use.
    public var protectAllowEntries: [String]?
    /// Most bytes per second a recovered volume's hydration fetches from the controller (0: no
    /// limit), so a hydration leaves room on a shared link between sites.
    public var hydrationRateLimit: UInt64 = 0
    /// The config file these settings came from, named in refusals so the operator knows where to look.
    public var configPath: String?

    public var protectAllow: ProtectAllow {
        get throws { try protectAllowEntries.map { try ProtectAllow(entries: $0) } ?? .defaults(dataDir: dataDir) }
    }

    public var socketDirectory: String { socketDir ?? dataDir + "/sockets" }

    public init(dataDir: String) { self.dataDir = dataDir }

    struct File: ConfigFile {
        var dataDir: String?
        var controller: String?
        var name: String?
        var reconnectInitialDelay: String?
        var reconnectMaxDelay: String?
        var inventoryInterval: String?
        var logLevel: String?
        var socketDir: String?
        var ioThreads: Int?
        var changeLogMemory: String?
        var changeLogSpill: String?
        var nbdTCP: String?
        var hooks: [String: HookValue]?
        var protectAllow: [String]?
        var nbdTCPInsecure: Bool?
        var nbdSocketUsers: [String]?
        var hydrationRateLimit: String?

        enum CodingKeys: String, CodingKey, CaseIterable {
            case dataDir = "data-dir", controller, name, reconnectInitialDelay = "reconnect-initial-delay"
            case reconnectMaxDelay = "reconnect-max-delay", inventoryInterval = "inventory-interval", logLevel = "log-level"
            case socketDir = "socket-dir", ioThreads = "io-threads", changeLogMemory = "change-log-memory", changeLogSpill = "change-log-spill"
            case nbdTCP = "nbd-tcp", hooks, protectAllow = "protect-allow", nbdTCPInsecure = "nbd-tcp-insecure"
            case nbdSocketUsers = "nbd-socket-users", hydrationRateLimit = "hydration-rate-limit"
        }
    }

    /// A hook under `hooks:`: a command line, or `{fsfreeze: [MOUNTPOINT, …]}`.
    enum HookValue: Decodable {
        case command(String)
        case fsfreeze([String])

        private enum Keys: String, CodingKey { case fsfreeze }

        init(from decoder: any Decoder) throws {
            if let command = try? decoder.singleValueContainer().decode(String.self) {
                self = .command(command)
                return
            }
            let c = try decoder.container(keyedBy: Keys.self)
            self = .fsfreeze(try c.decode([String].self, forKey: .fsfreeze))
        }
    }

    public mutating func apply(file path: String) throws {
        let f = try ConfigText.load(File.self, path: path)
        configPath = path
        if let v = f.dataDir { dataDir = v }
        if let v = f.controller { controller = v }
        if let v = f.name { name = v }
        if let v = f.reconnectInitialDelay { reconnectInitialDelay = try ConfigText.duration(v) }
        if let v = f.reconnectMaxDelay { reconnectMaxDelay = try ConfigText.duration(v) }
        if let v = f.inventoryInterval { inventoryInterval = try ConfigText.duration(v) }
        if let v = f.logLevel { logLevel = v }
        if let v = f.socketDir { socketDir = v }
        if let v = f.ioThreads { ioThreads = v }
        if let v = f.changeLogMemory { changeLogMemory = try ConfigText.byteSize(v) }
        if let v = f.changeLogSpill { changeLogSpill = try ConfigText.byteSize(v) }
        if let v = f.nbdTCP { nbdTCP = v }
        if let v = f.hooks {
            hooks = [:]
            fsfreezeHooks = [:]
            for (name, value) in v {
                switch value {
                case .command(let command): hooks[name] = command
                case .fsfreeze(let mounts): fsfreezeHooks[name] = mounts
                }
            }
        }
        if let v = f.protectAllow { protectAllowEntries = v }
        if let v = f.nbdTCPInsecure { nbdTCPInsecure = v }
        if let v = f.nbdSocketUsers { nbdSocketUsers = v }
        if let v = f.hydrationRateLimit { hydrationRateLimit = try ConfigText.byteSize(v) }
    }

    /// `nbd-socket-users` as user ids (names looked up in the user database).
    public var socketUserIDs: Set<UInt32> {
        get throws {
            Set(try nbdSocketUsers.map { entry in
                if let uid = UInt32(entry) { return uid }
                guard let user = getpwnam(entry) else {
                    throw FerryError(.badConfiguration, "nbd-socket-users: no user named '\(entry)' on this host")
                }
                return user.pointee.pw_uid
            })
        }
    }

    public func validate() throws {
        if let controller { _ = try ConfigText.hostPort(controller) }
        guard reconnectInitialDelay > .zero, reconnectMaxDelay >= reconnectInitialDelay else {
            throw FerryError(.badConfiguration, "reconnect-initial-delay must be positive and not above reconnect-max-delay")
        }
        guard (1...64).contains(ioThreads) else {
            throw FerryError(.badConfiguration, "io-threads must be between 1 and 64")
        }
        if let nbdTCP {
            let (host, _) = try ConfigText.hostPort(nbdTCP)
            // The export carries no authentication: only processes of this host may reach it.
            guard host == "localhost" || host.hasPrefix("127.") || host == "::1" || host == "[::1]" else {
                throw FerryError(.badConfiguration, "nbd-tcp must be a loopback address (127.0.0.1:PORT or [::1]:PORT), not \(nbdTCP)")
            }
            guard nbdTCPInsecure else {
                throw FerryError(.badConfiguration, "nbd-tcp serves every protected volume without authentication to any user of this host; prefer the unix sockets (nbd-socket-users lets other users in), or set nbd-tcp-insecure: true to accept that")
            }
        }
        _ = try socketUserIDs
        guard changeLogMemory >= 1 << 20, changeLogMemory <= 64 << 30 else {
            throw FerryError(.badConfiguration, "change-log-memory must be between 1M and 64G")
        }
        guard changeLogSpill <= 1 << 40 else {
            throw FerryError(.badConfiguration, "change-log-spill must be at most 1T (0 disables spilling)")
        }
        for (name, command) in hooks {
            guard !name.isEmpty, name.count <= 64, name.allSatisfy({ $0.isLetter || $0.isNumber || "-_.".contains($0) }) else {
                throw FerryError(.badConfiguration, "hook name '\(name)' must be 1-64 letters, digits, '-', '_' or '.'")
            }
            guard !command.trimmingCharacters(in: .whitespaces).isEmpty else {
                throw FerryError(.badConfiguration, "hook '\(name)' has an empty command")
            }
        }
        for (name, mounts) in fsfreezeHooks {
            guard !name.isEmpty, name.count <= 64, name.allSatisfy({ $0.isLetter || $0.isNumber || "-_.".contains($0) }) else {
                throw FerryError(.badConfiguration, "hook name '\(name)' must be 1-64 letters, digits, '-', '_' or '.'")
            }
            guard !mounts.isEmpty, mounts.count <= 64, mounts.allSatisfy({ $0.hasPrefix("/") }), Set(mounts).count == mounts.count else {
                throw FerryError(.badConfiguration, "fsfreeze hook '\(name)' needs 1 to 64 distinct absolute mount points")
            }
        }
        // Two hooks freezing one mount point would thaw each other's freezes.
        let allMounts = fsfreezeHooks.values.flatMap { $0 }
        guard Set(allMounts).count == allMounts.count else {
            throw FerryError(.badConfiguration, "a mount point is in two fsfreeze hooks; each may be in one")
        }
        _ = try protectAllow
        guard inventoryInterval >= .seconds(1) else {
            throw FerryError(.badConfiguration, "inventory-interval must be at least 1s")
        }
    }
}

/// Exponential backoff with jitter: delays grow 2x per failure up to a cap, each drawn uniformly
/// from the upper half of the current step so a fleet does not reconnect in lockstep.
public struct Backoff: Sendable {
    let initial: Duration
    let maximum: Duration
    private(set) var step: Duration

    public init(initial: Duration, maximum: Duration) {
        self.initial = initial
        self.maximum = maximum
        step = initial
    }

    public mutating func next() -> Duration {
        let current = step
        step = min(step * 2, maximum)
        let ms = Double(current.components.seconds) * 1000 + Double(current.components.attoseconds) / 1e15
        return .milliseconds(Int64(Double.random(in: ms / 2 ... ms)))
    }

    public mutating func reset() { step = initial }
}
