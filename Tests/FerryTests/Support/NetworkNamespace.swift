import FerryWire
import Foundation

/// A network namespace owned by one test: its own interfaces and addresses, so a test can change
/// the network a process sees without touching the machine's. Deleted when the test ends.
final class NetworkNamespace: Sendable {
    static let ip = FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip") ? "/usr/sbin/ip" : "/sbin/ip"
    let name: String

    init() async throws {
        name = "ferry-t-" + String(UUID().uuidString.prefix(8)).lowercased()
        try await ip("netns", "add", name)
        try await ip("-n", name, "link", "set", "lo", "up")
    }

    /// Runs `ip ARGS`, throwing with its stderr on failure.
    func ip(_ arguments: String...) async throws {
        let r = try await run(Self.ip, arguments)
        guard r.status == 0 else { throw FerryError(.internalError, "ip \(arguments.joined(separator: " ")): \(r.stderr)") }
    }

    /// The command line that runs `executable` inside `namespace` (or as is without one).
    static func wrap(_ namespace: NetworkNamespace?, _ executable: String, _ arguments: [String]) -> (String, [String]) {
        guard let namespace else { return (executable, arguments) }
        return (ip, ["netns", "exec", namespace.name, executable] + arguments)
    }

    /// What `ip netns delete` does (a deinit cannot await a child process): detach the
    /// namespace's bind mount, remove its file; the namespace goes with its last process.
    deinit {
        let path = "/run/netns/" + name
        _ = umount2(path, Int32(MNT_DETACH))
        _ = unlink(path)
    }
}
