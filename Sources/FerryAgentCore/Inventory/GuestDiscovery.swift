import FerryWire
import Foundation

/// Finds the qemu guests whose disks are this agent's NBD exports, and their shape (name, CPUs,
/// memory, NICs with their MACs, machine type) as their command lines give it: what a recovery
/// host needs to boot the same guest after a failover. Read from /proc, nothing is asked of the
/// guests or their hypervisor.
public enum GuestDiscovery {
    /// Most guests, NICs and disks per guest, and bytes per name reported: within what the
    /// controller takes (a host with more is reported in part, never refused whole).
    static let maxGuests = 64, maxDevices = 16, maxString = 200

    /// Guests of every qemu process on the host whose disks include an export under
    /// `socketDirectory`, run by root or by one of `users` (those allowed on the sockets): any
    /// local user can start a process that calls itself qemu, and every user's command line is
    /// readable, but only those can use the exports. Blocking (it reads /proc): a thread pool.
    public static func guests(socketDirectory: String, users: Set<UInt32> = []) -> [Ferry_V1_Guest] {
        let directory = (socketDirectory as NSString).standardizingPath
        let pids = ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap { Int32($0) }.sorted()
        var out: [Ferry_V1_Guest] = []
        for pid in pids where out.count < maxGuests {
            var st = stat()
            guard stat("/proc/\(pid)", &st) == 0, st.st_uid == 0 || users.contains(st.st_uid) else { continue }
            guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline"), data.count < 1 << 20 else { continue }
            var arguments = data.split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
            if arguments.last == "" { arguments.removeLast() }
            if let g = guest(arguments: arguments, socketDirectory: directory) { out.append(g) }
        }
        return out
    }

    /// The guest a qemu command line describes, if it is one and a disk of it is one of this
    /// agent's exports (`nbd+unix:///NAME?socket=DIR/NAME.sock`).
    public static func guest(arguments: [String], socketDirectory: String) -> Ferry_V1_Guest? {
        guard let program = arguments.first, (program as NSString).lastPathComponent.hasPrefix("qemu-system") else { return nil }
        var g = Ferry_V1_Guest()
        g.cpus = 1
        g.memoryBytes = 128 << 20 // qemu's default
        var i = 1
        while i < arguments.count {
            let option = arguments[i].hasPrefix("--") ? String(arguments[i].dropFirst()) : arguments[i]
            let value = i + 1 < arguments.count ? arguments[i + 1] : ""
            switch option {
            case "-name":
                g.name = properties(value, first: "guest")["guest"] ?? ""
            case "-smp":
                // cpus=N, or the topology's product (sockets x dies x cores x threads).
                let p = properties(value, first: "cpus")
                if let n = p["cpus"].flatMap(UInt32.init), n > 0 {
                    g.cpus = n
                } else {
                    let parts = ["sockets", "dies", "cores", "threads"].compactMap { p[$0].flatMap(UInt32.init) }
                    if !parts.isEmpty {
                        let product = parts.reduce(UInt64(1)) { min($0 * UInt64($1), 1 << 20) }
                        if product > 0 { g.cpus = UInt32(product) }
                    }
                }
            case "-m":
                if let size = properties(value, first: "size")["size"].flatMap(memory) { g.memoryBytes = size }
            case "-machine", "-M":
                g.machine = properties(value, first: "type")["type"] ?? ""
            case "-device":
                let p = properties(value, first: "driver")
                if let driver = p["driver"], driver.contains("net") || p["netdev"] != nil, let mac = p["mac"] {
                    var nic = Ferry_V1_GuestNIC()
                    nic.macAddress = mac.lowercased()
                    nic.model = driver
                    g.nics.append(nic)
                }
            case "-nic":
                let p = properties(value, first: "type")
                if let mac = p["mac"] {
                    var nic = Ferry_V1_GuestNIC()
                    nic.macAddress = mac.lowercased()
                    nic.model = p["model"] ?? "virtio-net-pci"
                    g.nics.append(nic)
                }
            case "-drive", "-blockdev":
                if let volume = volume(properties(value, first: "file"), socketDirectory: socketDirectory) { g.volumes.append(volume) }
            default:
                i += 1
                continue
            }
            i += 2
        }
        guard !g.volumes.isEmpty else { return nil }
        if g.name.isEmpty { g.name = g.volumes[0] }
        g.nics = Array(g.nics.prefix(maxDevices))
        g.volumes = Array(g.volumes.prefix(maxDevices))
        let strings = [g.name, g.machine] + g.volumes + g.nics.flatMap { [$0.macAddress, $0.model] }
        guard strings.allSatisfy({ $0.utf8.count <= maxString }) else { return nil }
        return g
    }

    /// `a=1,b=2` (qemu's option syntax; ",," is a literal comma); a leading bare value is `first`.
    /// A JSON object (libvirt writes `-device` and `-blockdev` so) is flattened the same way,
    /// nested keys joined by dots (`server.path`).
    static func properties(_ text: String, first: String) -> [String: String] {
        if text.hasPrefix("{") { return json(text) }
        var out: [String: String] = [:]
        var parts: [String] = []
        var current = ""
        var chars = Array(text)[...]
        while let c = chars.popFirst() {
            if c == ",", chars.first == "," {
                current.append(",")
                chars.removeFirst()
            } else if c == "," {
                parts.append(current)
                current = ""
            } else {
                current.append(c)
            }
        }
        parts.append(current)
        for (n, part) in parts.enumerated() {
            if let eq = part.firstIndex(of: "=") {
                out[String(part[..<eq])] = String(part[part.index(after: eq)...])
            } else if n == 0, !part.isEmpty {
                out[first] = part
            }
        }
        return out
    }

    static func json(_ text: String) -> [String: String] {
        guard text.utf8.count <= 64 << 10, let object = try? JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any] else { return [:] }
        var out: [String: String] = [:]
        func flatten(_ value: Any, _ key: String, depth: Int) {
            guard depth < 8, out.count < 256 else { return }
            switch value {
            case let d as [String: Any]: for (k, v) in d { flatten(v, key.isEmpty ? k : key + "." + k, depth: depth + 1) }
            case let s as String: out[key] = s
            case let n as NSNumber: out[key] = n.stringValue
            default: break
            }
        }
        flatten(object, "", depth: 0)
        return out
    }

    /// qemu's -m: a number of MiB, or with a suffix (K, M, G, T), fractions too ("1.5G");
    /// nil when it is not one or does not fit.
    static func memory(_ text: String) -> UInt64? {
        let units: [Character: Double] = ["K": 1024, "M": 1_048_576, "G": 1_073_741_824, "T": 1_099_511_627_776]
        var number = Substring(text), unit: Double = 1_048_576
        if let last = text.uppercased().last, let u = units[last] {
            number = text.dropLast()
            unit = u
        }
        guard let value = Double(number), value.isFinite, value > 0 else { return nil }
        let bytes = value * unit
        return bytes < Double(UInt64.max / 2) ? UInt64(bytes) : nil
    }

    /// The export name of an `nbd+unix:///NAME?socket=PATH` file (or a blockdev's nbd `path` and
    /// `export`), if PATH is one of this agent's sockets.
    static func volume(_ p: [String: String], socketDirectory: String) -> String? {
        var name: String?, socket: String?
        if let file = p["file"] ?? p["file.filename"], file.hasPrefix("nbd+unix:///"), let components = URLComponents(string: file) {
            name = String(components.path.dropFirst())
            socket = components.queryItems?.first { $0.name == "socket" }?.value
        } else if p["driver"] == "nbd" || p["file.driver"] == "nbd" {
            name = p["export"] ?? p["file.export"]
            socket = p["server.path"] ?? p["file.server.path"] ?? p["path"] ?? p["file.path"]
        }
        guard let name, !name.isEmpty, let socket else { return nil }
        let directory = ((socket as NSString).deletingLastPathComponent as NSString).standardizingPath
        return directory == socketDirectory ? name : nil
    }
}
