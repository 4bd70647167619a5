import FerryAgentCore
import FerryWire
import Foundation
import Testing

@Suite("protect-allow path check")
struct UnitProtectAllowTests {
    typealias Device = HostStorage.Device

    @Test("a directory entry allows what is below it, an exact entry only itself; a neighbour with the same prefix is refused")
    func prefixAndExact() {
        let rules: [ProtectAllow.Rule] = [.under("/srv/vols/"), .exact("/data/one.img")]
        func allowed(_ path: String, _ kind: ProtectAllow.Kind = .regular) -> Bool {
            ProtectAllow.refusal(resolved: path, kind: kind, rules: rules, listed: "L") == nil
        }
        #expect(allowed("/srv/vols/a.img") && allowed("/srv/vols/deep/b.img") && allowed("/srv/vols/new.img", .missing))
        #expect(allowed("/data/one.img") && allowed("/data/one.img", .missing))
        #expect(!allowed("/srv/volsX/a.img") && !allowed("/srv/vols") && !allowed("/data/one.img2") && !allowed("/data/two.img"))
        #expect(!allowed("/srv/vols/dir", .other("a directory")))
        #expect(ProtectAllow.refusal(resolved: "/etc/shadow", kind: .regular, rules: rules, listed: "L") == "not under its protect-allow list (L)")
    }

    @Test("block devices: allowed by the default rule only when not in use; an exact entry allows one in use")
    func devices() {
        let rules: [ProtectAllow.Rule] = [.unusedBlockDevices]
        #expect(ProtectAllow.refusal(resolved: "/dev/sdb", kind: .blockDevice(inUse: nil), rules: rules, listed: "L") == nil)
        let inUse = ProtectAllow.refusal(resolved: "/dev/sda", kind: .blockDevice(inUse: "its partition sda1 is mounted at /"), rules: rules, listed: "L")
        #expect(inUse?.contains("in use (its partition sda1 is mounted at /)") == true, "\(String(describing: inUse))")
        #expect(ProtectAllow.refusal(resolved: "/dev/sda", kind: .blockDevice(inUse: "mounted at /"), rules: rules + [.exact("/dev/sda")], listed: "L") == nil)
        #expect(ProtectAllow.refusal(resolved: "/srv/a.img", kind: .regular, rules: rules, listed: "L") != nil)
    }

    @Test("mountinfo and swaps parse; a mounted disk, a disk holding a mounted or swap or held partition is in use, an idle one is not")
    func mounts() {
        let mountinfo = """
            22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
            23 22 0:21 / /proc rw,nosuid - proc proc rw
            30 22 0:45 / /srv/my\\040data rw,relatime shared:9 - btrfs /dev/sdc rw
            31 22 253:0 / /home rw - xfs /dev/mapper/vg-home rw
            """
        let parsed = HostStorage.parseMountInfo(mountinfo)
        #expect(parsed.count == 4)
        #expect(parsed[0].device == Device(major: 8, minor: 1) && parsed[0].mountPoint == "/" && parsed[0].source == "/dev/sda1")
        #expect(parsed[2].mountPoint == "/srv/my data" && parsed[2].source == "/dev/sdc")
        #expect(HostStorage.parseSwaps("Filename\tType\tSize\tUsed\tPriority\n/dev/sdd2 partition 1000 0 -2\n/swapfile file 10 0 -3\n") == ["/dev/sdd2", "/swapfile"])

        var mounted: [Device: String] = [:]
        for m in parsed { mounted[m.device] = m.mountPoint }
        // (the btrfs source resolved to its device, as HostStorage.current does)
        mounted[Device(major: 8, minor: 32)] = "/srv/my data"
        let storage = HostStorage(mounted: mounted, swap: [Device(major: 8, minor: 50)])
        let sda = HostStorage.DeviceFacts(device: Device(major: 8, minor: 0), partitions: [("sda1", Device(major: 8, minor: 1), [])])
        #expect(storage.inUse(sda) == "its partition sda1 is mounted at /")
        #expect(storage.inUse(HostStorage.DeviceFacts(device: Device(major: 8, minor: 1))) == "mounted at /")
        #expect(storage.inUse(HostStorage.DeviceFacts(device: Device(major: 8, minor: 32))) == "mounted at /srv/my data")
        let sdd = HostStorage.DeviceFacts(device: Device(major: 8, minor: 48), partitions: [("sdd1", Device(major: 8, minor: 49), []), ("sdd2", Device(major: 8, minor: 50), [])])
        #expect(storage.inUse(sdd) == "its partition sdd2 is used as swap")
        let pv = HostStorage.DeviceFacts(device: Device(major: 8, minor: 64), partitions: [("sde1", Device(major: 8, minor: 65), ["dm-0"])])
        #expect(storage.inUse(pv) == "its partition sde1 is held by dm-0")
        #expect(storage.inUse(HostStorage.DeviceFacts(device: Device(major: 8, minor: 80), holders: ["md0"])) == "held by md0")
        #expect(storage.inUse(HostStorage.DeviceFacts(device: Device(major: 8, minor: 16), partitions: [("sdb1", Device(major: 8, minor: 17), [])])) == nil)
        #expect(Device(UInt64(8 << 8 | 17)) == Device(major: 8, minor: 17) && Device("259:3") == Device(major: 259, minor: 3))
    }

    @Test("on real files: '..' and symlinks are resolved before the check, so neither escapes; a symlinked allowed directory still matches; only files and devices qualify")
    func realFiles() throws {
        let dir = try TestDirectory()
        let volumes = dir.sub("data/volumes")
        let outside = dir.file("secret")
        #expect(FileManager.default.createFile(atPath: outside, contents: Data("x".utf8)))
        #expect(FileManager.default.createFile(atPath: volumes + "/in.img", contents: Data("x".utf8)))
        let allow = ProtectAllow.defaults(dataDir: dir.path + "/data")
        #expect(allow.check(volumes + "/in.img").refusal == nil)
        #expect(allow.check(volumes + "/new.img").refusal == nil)
        let escape = allow.check(volumes + "/../../secret")
        #expect(escape.resolved == outside && escape.refusal?.hasPrefix("not under its protect-allow list") == true, "\(escape)")
        #expect(allow.check(volumes + "/../../created.img").refusal != nil)
        try FileManager.default.createSymbolicLink(atPath: volumes + "/link.img", withDestinationPath: outside)
        let link = allow.check(volumes + "/link.img")
        #expect(link.resolved == outside && link.refusal != nil, "\(link)")
        try FileManager.default.createSymbolicLink(atPath: volumes + "/dangling.img", withDestinationPath: dir.file("nothing"))
        #expect(allow.check(volumes + "/dangling.img").refusal?.contains("symlink to a missing file") == true)
        try FileManager.default.createSymbolicLink(atPath: volumes + "/out", withDestinationPath: dir.path)
        #expect(allow.check(volumes + "/out/secret").refusal != nil && allow.check(volumes + "/out/fresh.img").refusal != nil)
        #expect(allow.check(volumes + "/missing/../x.img").refusal?.contains("'..' below a directory that does not exist") == true)
        #expect(allow.check(volumes).refusal != nil)
        #expect(allow.check(volumes + "/").refusal != nil)
        _ = dir.sub("data/volumes/sub")
        #expect(allow.check(volumes + "/sub").refusal?.contains("a directory") == true)
        // A directory entry reached through a symlink matches the real path.
        try FileManager.default.createSymbolicLink(atPath: dir.file("alias"), withDestinationPath: volumes)
        let aliased = try ProtectAllow(entries: [dir.file("alias") + "/"])
        #expect(aliased.check(volumes + "/in.img").refusal == nil && aliased.check(outside).refusal != nil)
        // A character device is never a volume, even when listed.
        #expect(try ProtectAllow(entries: ["/dev/null", "/dev/"]).check("/dev/null").refusal?.contains("a character device") == true)
    }

    @Test("config entries: absolute, no '.' or '..', the keyword; the default when the key is absent")
    func entries() throws {
        let allow = try ProtectAllow(entries: ["/srv/vols/", "/dev/disk/by-id/wwn-1", "unused-block-devices"])
        #expect(allow.rules == [.under("/srv/vols/"), .exact("/dev/disk/by-id/wwn-1"), .unusedBlockDevices])
        for bad in ["srv/vols/", "/srv/../etc/", "/srv/./x", "", "/"] {
            #expect(throws: FerryError.self, "\(bad)") { try ProtectAllow(entries: [bad]) }
        }
        let dir = try TestDirectory()
        let file = dir.file("agent.yaml")
        try "protect-allow:\n  - /srv/vols/\n".write(toFile: file, atomically: true, encoding: .utf8)
        var config = AgentConfig(dataDir: "/var/lib/ferry-agent")
        #expect(try config.protectAllow == .defaults(dataDir: "/var/lib/ferry-agent"))
        try config.apply(file: file)
        #expect(try config.protectAllow.rules == [.under("/srv/vols/")] && config.configPath == file)
        try "protect-allow: [relative/]\n".write(toFile: file, atomically: true, encoding: .utf8)
        var bad = AgentConfig(dataDir: "/x")
        try bad.apply(file: file)
        #expect(throws: FerryError.self) { try bad.validate() }
    }
}
