import ArgumentParser
import FerryWire

/// `ferryctl`: the operator's command line for a Ferry controller.
public struct FerryCtl: AsyncParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "ferryctl",
        abstract: "Operate a Ferry controller: hosts, volumes, consistency groups and points, exports, tokens, audit log, health and metrics.",
        discussion: """
            ferryctl talks to the controller's operator API over HTTPS with a bearer token, and \
            trusts only the cluster CA. The controller writes the settings into its data \
            directory, ready to source:

              source /var/lib/ferry-controller/ferryctl.env

            That file exports FERRY_API, FERRY_TOKEN and FERRY_CA; every command also takes \
            --api, --token and --ca to override them. Commands that print data take --json \
            for scripts. Errors print one line, "ferryctl: <message>", on stderr and exit 1.
            """,
        version: FerryVersion.current,
        subcommands: [
            HostsCommand.self, HostCommand.self,
            ProtectCommand.self, VolumesCommand.self, VolumeCommand.self,
            GroupsCommand.self, GroupCommand.self, PointsCommand.self, PointCommand.self,
            ExportsCommand.self, ExportCommand.self,
            PlansCommand.self, PlanCommand.self, DrillCommand.self, FailoverCommand.self, CommitCommand.self,
            ReprotectCommand.self, FailbackCommand.self, RollbackCommand.self, MigrateCommand.self, JobsCommand.self, JobCommand.self,
            TokenCommand.self, TokensCommand.self, APITokenCommand.self, APITokensCommand.self,
            WANCommand.self, AuditCommand.self, AlertsCommand.self, ApplyCommand.self, GetCommand.self, HealthCommand.self, MetricsCommand.self,
        ]
    )

    public init() {}
}
