import Foundation

/// Which block devices this host uses itself (mounted or swap), and the partitions and holders
/// of a device, so the default `protect-allow` can refuse a disk that is in use.
public struct HostStorage: Sendable {
    /// A block device's major and minor number.
    public struct Device: Hashable, Sendable, CustomStringConvertible {
        public var major: UInt32
        public var minor: UInt32
        public init(major: UInt32, minor: UInt32) { self.major = major; self.minor = minor }
        /// glibc's encoding of `dev_t` (`gnu_dev_major`, `gnu_dev_minor`).
        public init(_ dev: UInt64) {
            major = UInt32(truncatingIfNeeded: ((dev >> 8) & 0xFFF) | ((dev >> 32) & ~UInt64(0xFFF)))
            minor = UInt32(truncatingIfNeeded: (dev & 0xFF) | ((dev >> 12) & ~UInt64(0xFF)))
        }
        /// `MAJOR:MINOR`, as /proc and /sys write it.
        public init?(_ text: some StringProtocol) {
            let parts = text.split(separator: ":")
            guard parts.count == 2, let major = UInt32(parts[0]), let minor = UInt32(parts[1]) else { return nil }
            self.init(major: major, minor: minor)
        }
        public var description: String { "\(major):\(minor)" }
    }

    /// What /sys says about one block device.
    public struct DeviceFacts: Sendable {
        public var device: Device
        /// Devices built on it (device-mapper, md), by name.
        public var holders: [String]
        public var partitions: [(name: String, device: Device, holders: [String])]
        public init(device: Device, holders: [String] = [], partitions: [(name: String, device: Device, holders: [String])] = []) {
            self.device = device
            self.holders = holders
            self.partitions = partitions
        }
    }

    /// Mounted devices and where each is mounted.
    public var mounted: [Device: String]
    public var swap: Set<Device>

    public init(mounted: [Device: String], swap: Set<Device>) {
        self.mounted = mounted
        self.swap = swap
    }

    /// One line of /proc/self/mountinfo: the device number, the mount point and the source.
    public static func parseMountInfo(_ text: String) -> [(device: Device, mountPoint: String, source: String)] {
        text.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ", omittingEmptySubsequences: false)
            guard fields.count >= 5, let device = Device(fields[2]) else { return nil }
            // After the optional fields, " - " then the filesystem type and the source.
            let tail = fields.firstIndex(of: "-").map { fields[($0 + 1)...] } ?? []
            let source = tail.count >= 2 ? Self.unescape(tail[tail.startIndex + 1]) : ""
            return (device, Self.unescape(fields[4]), source)
        }
    }

    /// /proc/swaps' first column, the swap files and devices.
    public static func parseSwaps(_ text: String) -> [String] {
        text.split(separator: "\n").dropFirst().compactMap { $0.split(separator: " ").first.map { Self.unescape($0) } }
    }

    /// Why the device is in use, or nil. Pure: the facts are passed in.
    public func inUse(_ facts: DeviceFacts) -> String? {
        if let at = mounted[facts.device] { return "mounted at \(at)" }
        if swap.contains(facts.device) { return "used as swap" }
        if let holder = facts.holders.first { return "held by \(holder)" }
        for p in facts.partitions {
            if let at = mounted[p.device] { return "its partition \(p.name) is mounted at \(at)" }
            if swap.contains(p.device) { return "its partition \(p.name) is used as swap" }
            if let holder = p.holders.first { return "its partition \(p.name) is held by \(holder)" }
        }
        return nil
    }

    // MARK: This host

    /// The mounts and swaps of this host now. Blocking: reads /proc.
    public static func current() -> HostStorage {
        var mounted: [Device: String] = [:]
        let info = (try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)) ?? ""
        for m in parseMountInfo(info) {
            mounted[m.device] = mounted[m.device] ?? m.mountPoint
            // Some filesystems (btrfs) report an anonymous device number: the source says which.
            if m.source.hasPrefix("/"), let device = blockDevice(m.source) {
                mounted[device] = mounted[device] ?? m.mountPoint
            }
        }
        let swaps = (try? String(contentsOfFile: "/proc/swaps", encoding: .utf8)) ?? ""
        return HostStorage(mounted: mounted, swap: Set(parseSwaps(swaps).compactMap(blockDevice)))
    }

    /// Why the block device at `path` is in use, or nil. Blocking: reads /sys.
    public func inUse(device path: String) -> String? {
        guard let device = Self.blockDevice(path) else { return "it cannot be read" }
        return inUse(Self.facts(device))
    }

    static func blockDevice(_ path: String) -> Device? {
        var st = stat()
        guard stat(path, &st) == 0, st.st_mode & S_IFMT == S_IFBLK else { return nil }
        return Device(UInt64(st.st_rdev))
    }

    /// /sys/dev/block/MAJOR:MINOR: its holders, and its partitions with theirs.
    static func facts(_ device: Device) -> DeviceFacts {
        let dir = "/sys/dev/block/\(device)"
        let files = FileManager.default
        func holders(_ dir: String) -> [String] { ((try? files.contentsOfDirectory(atPath: dir + "/holders")) ?? []).sorted() }
        var facts = DeviceFacts(device: device, holders: holders(dir))
        for name in ((try? files.contentsOfDirectory(atPath: dir)) ?? []).sorted() where files.fileExists(atPath: dir + "/\(name)/partition") {
            guard let text = try? String(contentsOfFile: dir + "/\(name)/dev", encoding: .utf8),
                  let number = Device(text.trimmingCharacters(in: .whitespacesAndNewlines)) else { continue }
            facts.partitions.append((name, number, holders(dir + "/\(name)")))
        }
        return facts
    }

    /// /proc writes a space, tab, newline or backslash in a path as an octal escape.
    static func unescape(_ field: Substring) -> String {
        guard field.contains("\\") else { return String(field) }
        var out = [UInt8]()
        var bytes = Array(field.utf8)[...]
        while let b = bytes.popFirst() {
            if b == UInt8(ascii: "\\"), bytes.count >= 3, let v = UInt8(String(decoding: bytes.prefix(3), as: UTF8.self), radix: 8) {
                out.append(v)
                bytes = bytes.dropFirst(3)
            } else {
                out.append(b)
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}
