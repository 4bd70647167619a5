import FerryWire
import Foundation
import NIOCore

/// Reads what this host is from the kernel: /proc, /sys, uname and the interface list.
public enum InventoryCollector {
    /// - Parameter guestSockets: the agent's NBD socket directory: qemu guests whose disks are
    ///   exports there are listed with their shape (nil: none are looked for).
    public static func collect(guestSockets: String? = nil, guestUsers: Set<UInt32> = []) -> Ferry_V1_Inventory {
        var inv = Ferry_V1_Inventory()
        inv.hostname = ProcessInfo.processInfo.hostName
        inv.osName = osRelease()
        var u = utsname()
        if uname(&u) == 0 {
            inv.kernel = withUnsafeBytes(of: &u.release) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            inv.architecture = withUnsafeBytes(of: &u.machine) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
        }
        inv.cpuCount = UInt32(max(1, sysconf(Int32(_SC_NPROCESSORS_ONLN))))
        inv.memoryBytes = memTotal()
        inv.bootID = read("/proc/sys/kernel/random/boot_id") ?? ""
        inv.interfaces = interfaces()
        inv.blockDevices = blockDevices()
        if let guestSockets { inv.guests = GuestDiscovery.guests(socketDirectory: guestSockets, users: guestUsers) }
        return inv
    }

    static func read(_ path: String) -> String? {
        guard let data = FileManager.default.contents(atPath: path) else { return nil }
        return String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    static func osRelease() -> String {
        guard let text = read("/etc/os-release") else { return "Linux" }
        for line in text.split(separator: "\n") where line.hasPrefix("PRETTY_NAME=") {
            return line.dropFirst("PRETTY_NAME=".count).trimmingCharacters(in: CharacterSet(charactersIn: "\""))
        }
        return "Linux"
    }

    static func memTotal() -> UInt64 {
        guard let text = read("/proc/meminfo") else { return 0 }
        for line in text.split(separator: "\n") where line.hasPrefix("MemTotal:") {
            let kb = line.split(separator: " ").dropFirst().first.flatMap { UInt64($0) } ?? 0
            return kb * 1024
        }
        return 0
    }

    static func interfaces() -> [Ferry_V1_NetworkInterface] {
        var byName: [String: Ferry_V1_NetworkInterface] = [:]
        let devices = (try? System.enumerateDevices()) ?? []
        for device in devices {
            var nic = byName[device.name] ?? {
                var n = Ferry_V1_NetworkInterface()
                n.name = device.name
                n.macAddress = read("/sys/class/net/\(device.name)/address") ?? ""
                n.mtu = UInt32(read("/sys/class/net/\(device.name)/mtu") ?? "") ?? 0
                n.up = (read("/sys/class/net/\(device.name)/operstate") ?? "") != "down"
                return n
            }()
            if let address = device.address?.ipAddress {
                let prefix = device.netmask.map(prefixLength) ?? 0
                nic.addresses.append("\(address)/\(prefix)")
            }
            byName[device.name] = nic
        }
        return byName.keys.sorted().compactMap { byName[$0] }
    }

    static func prefixLength(_ netmask: SocketAddress) -> Int {
        switch netmask {
        case .v4(let a):
            return UInt32(bigEndian: a.address.sin_addr.s_addr).nonzeroBitCount
        case .v6(let a):
            return withUnsafeBytes(of: a.address.sin6_addr) { $0.reduce(0) { $0 + $1.nonzeroBitCount } }
        default:
            return 0
        }
    }

    static func blockDevices() -> [Ferry_V1_BlockDevice] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/block")) ?? []
        return names.sorted().compactMap { name in
            let base = "/sys/block/\(name)"
            guard let sectors = read(base + "/size").flatMap(UInt64.init), sectors > 0 else { return nil }
            var dev = Ferry_V1_BlockDevice()
            dev.name = name
            dev.path = "/dev/\(name)"
            dev.sizeBytes = sectors * 512
            dev.model = read(base + "/device/model") ?? ""
            dev.rotational = read(base + "/queue/rotational") == "1"
            dev.readOnly = read(base + "/ro") == "1"
            return dev
        }
    }
}
