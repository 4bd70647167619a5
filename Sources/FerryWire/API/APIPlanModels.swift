/// A recovery plan: which protected hosts come up where, in what order, with which hooks and
/// manual gates in between. Operators write plans as YAML (the controller's `PlanParser`
/// validates them); the controller and ferryctl exchange them as JSON. Timeouts in seconds.
public struct RecoveryPlan: Codable, Sendable, Equatable {
    /// Unique plan name: `[a-z0-9][a-z0-9-]{0,62}`.
    public var name: String
    /// Free text for operators; empty when the plan has none.
    public var description: String
    /// Recovered one after the other, in this order.
    public var groups: [RecoveryPlanGroup]

    public init(name: String, description: String, groups: [RecoveryPlanGroup]) {
        self.name = name; self.description = description; self.groups = groups
    }

    /// Every volume the plan recovers, as `HOST/VOLUME`, in plan order (group by group, item by
    /// item, volume by volume).
    public var volumeKeys: [String] {
        groups.flatMap { group in group.items.flatMap { item in item.volumes.map { "\(item.host)/\($0)" } } }
    }
}

/// One stage of a plan: its `pre` steps run in order, then every item starts in parallel, then
/// its `post` steps run in order once every item has started.
public struct RecoveryPlanGroup: Codable, Sendable, Equatable {
    /// Unique within the plan.
    public var name: String
    /// Steps run before the group's items start.
    public var pre: [RecoveryPlanStep]
    /// Steps run after every item of the group has started.
    public var post: [RecoveryPlanStep]
    /// The hosts this group recovers; at least one.
    public var items: [RecoveryPlanItem]

    public init(name: String, pre: [RecoveryPlanStep], post: [RecoveryPlanStep], items: [RecoveryPlanItem]) {
        self.name = name; self.pre = pre; self.post = post; self.items = items
    }
}

/// One protected host brought up on an agent of the secondary site.
public struct RecoveryPlanItem: Codable, Sendable, Equatable {
    /// The protected (primary-site) host whose volumes are recovered.
    public var host: String
    /// The agent in the secondary site that attaches the volumes and runs the hooks.
    public var recoveryHost: String
    /// Protected volume names of `host`, at least one.
    public var volumes: [String]
    /// Name of a hook in the recovery host's agent config that starts the workload.
    public var startHook: String?
    /// Name of a hook in the recovery host's agent config that stops the workload.
    public var stopHook: String?
    /// Longest the start or stop hook may run.
    public var timeoutSeconds: Int
    /// Network mapping handed to the start hook.
    public var networks: [NetworkMapping]
    /// Where a volume lands on the recovery host when it is hydrated (volume name → path);
    /// volumes not named go to a file in the recovery host's data dir.
    public var targets: [String: String]?

    public init(host: String, recoveryHost: String, volumes: [String], startHook: String?, stopHook: String?,
                timeoutSeconds: Int, networks: [NetworkMapping], targets: [String: String]? = nil) {
        self.host = host; self.recoveryHost = recoveryHost; self.volumes = volumes; self.startHook = startHook
        self.stopHook = stopHook; self.timeoutSeconds = timeoutSeconds; self.networks = networks; self.targets = targets
    }
}

/// Which network a production network becomes in a real recovery and in a test (drill).
public struct NetworkMapping: Codable, Sendable, Equatable {
    /// The network in the primary site.
    public var source: String
    /// Its replacement in a real recovery.
    public var recovery: String
    /// Its replacement in a test recovery (isolated from production).
    public var test: String

    public init(source: String, recovery: String, test: String) {
        self.source = source; self.recovery = recovery; self.test = test
    }
}

/// A step before or after a group's items. JSON: `{"kind":"hook","host":…,"name":…,
/// "timeoutSeconds":…}` or `{"kind":"gate","message":…,"timeoutSeconds":…}`.
public enum RecoveryPlanStep: Codable, Sendable, Equatable {
    /// Runs the hook `name` defined in the agent config of `host`.
    case hook(host: String, name: String, timeoutSeconds: Int)
    /// Waits for an operator (`ferryctl job resume`), showing `message`; fails after the timeout.
    case gate(message: String, timeoutSeconds: Int)

    /// Longest the step may take.
    public var timeoutSeconds: Int {
        switch self {
        case .hook(_, _, let t), .gate(_, let t): return t
        }
    }

    private enum CodingKeys: String, CodingKey {
        case kind, host, name, message, timeoutSeconds
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let kind = try c.decode(String.self, forKey: .kind)
        switch kind {
        case "hook":
            self = .hook(host: try c.decode(String.self, forKey: .host), name: try c.decode(String.self, forKey: .name),
                         timeoutSeconds: try c.decode(Int.self, forKey: .timeoutSeconds))
        case "gate":
            self = .gate(message: try c.decode(String.self, forKey: .message),
                         timeoutSeconds: try c.decode(Int.self, forKey: .timeoutSeconds))
        default:
            throw DecodingError.dataCorruptedError(forKey: .kind, in: c,
                                                   debugDescription: "unknown step kind '\(kind)' (expected hook or gate)")
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        switch self {
        case .hook(let host, let name, let timeoutSeconds):
            try c.encode("hook", forKey: .kind)
            try c.encode(host, forKey: .host)
            try c.encode(name, forKey: .name)
            try c.encode(timeoutSeconds, forKey: .timeoutSeconds)
        case .gate(let message, let timeoutSeconds):
            try c.encode("gate", forKey: .kind)
            try c.encode(message, forKey: .message)
            try c.encode(timeoutSeconds, forKey: .timeoutSeconds)
        }
    }
}
