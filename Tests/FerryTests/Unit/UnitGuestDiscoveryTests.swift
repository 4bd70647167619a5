@testable import FerryAgentCore
import FerryWire
import Foundation
import Testing

/// The guests an agent reports in its inventory: qemu command lines read as libvirt, scripts
/// and people write them.
@Suite("guest discovery")
struct UnitGuestDiscoveryTests {
    let sockets = "/var/lib/ferry-agent/sockets"

    @Test("a qemu command line gives the guest's name, CPUs, memory, machine, NICs with their MACs, and the disks that are this agent's exports, in order")
    func qemuCommandLine() throws {
        let arguments = ["/usr/bin/qemu-system-x86_64", "-name", "guest=web1,debug-threads=on", "-machine", "q35,accel=kvm",
                         "-smp", "cpus=4,sockets=1", "-m", "2G", "-nodefaults",
                         "-drive", "file=nbd+unix:///root?socket=\(sockets)/root.sock,format=raw,if=virtio,cache=none",
                         "-drive", "file=/var/lib/images/scratch.qcow2,if=virtio",
                         "-drive", "file=nbd+unix:///other?socket=/run/elsewhere/other.sock,format=raw",
                         "-blockdev", "driver=nbd,node-name=d1,server.type=unix,server.path=\(sockets)/../sockets/logs.sock,export=logs",
                         "-netdev", "tap,id=n0,ifname=tap0", "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:AB:CD:01",
                         "-nic", "user,model=e1000,mac=52:54:00:ab:cd:02", "-device", "virtio-rng-pci", "-daemonize"]
        let guest = try #require(GuestDiscovery.guest(arguments: arguments, socketDirectory: sockets))
        #expect(guest.name == "web1" && guest.cpus == 4 && guest.memoryBytes == 2 << 30 && guest.machine == "q35")
        #expect(guest.volumes == ["root", "logs"])
        #expect(guest.nics.map(\.macAddress) == ["52:54:00:ab:cd:01", "52:54:00:ab:cd:02"])
        #expect(guest.nics.map(\.model) == ["virtio-net-pci", "e1000"])
    }

    @Test("libvirt's command lines: JSON -blockdev and -device, -m size=…k, -smp topology")
    func libvirt() throws {
        let arguments = ["/usr/bin/qemu-system-x86_64", "-name", "guest=db1,debug-threads=on", "-m", "size=2097152k",
                         "-smp", "4,sockets=2,dies=1,cores=2,threads=1",
                         "-blockdev", #"{"driver":"nbd","server":{"type":"unix","path":"\#(sockets)/data.sock"},"export":"data","node-name":"libvirt-1-storage"}"#,
                         "-device", #"{"driver":"virtio-blk-pci","drive":"libvirt-1-format","id":"virtio-disk0","bootindex":1}"#,
                         "-device", #"{"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0","mac":"52:54:00:9A:00:01","bus":"pci.1"}"#]
        let guest = try #require(GuestDiscovery.guest(arguments: arguments, socketDirectory: sockets))
        #expect(guest.name == "db1" && guest.cpus == 4 && guest.memoryBytes == 2 << 30 && guest.volumes == ["data"])
        #expect(guest.nics.map(\.macAddress) == ["52:54:00:9a:00:01"])
        let topology = GuestDiscovery.guest(arguments: ["qemu-system-x86_64", "-smp", "sockets=2,cores=3", "-m", "1.5G",
                                                        "-drive", "file=nbd+unix:///data?socket=\(sockets)/data.sock"], socketDirectory: sockets)
        #expect(topology?.cpus == 6 && topology?.memoryBytes == 3 << 29)
        // Sizes that do not fit are not taken (qemu's default stays), and never trap.
        let huge = GuestDiscovery.guest(arguments: ["qemu-system-x86_64", "-m", "99999999999999T", "-smp", "cpus=0",
                                                    "-drive", "file=nbd+unix:///data?socket=\(sockets)/data.sock"], socketDirectory: sockets)
        #expect(huge?.memoryBytes == 128 << 20 && huge?.cpus == 1)
    }

    @Test("defaults are qemu's (1 CPU, 128 MiB, -m in MiB); a guest with no disk of this agent, or another program, is not one")
    func defaultsAndOthers() {
        let plain = GuestDiscovery.guest(arguments: ["qemu-system-aarch64", "-m", "512", "-drive", "file=nbd+unix:///data?socket=\(sockets)/data.sock"],
                                         socketDirectory: sockets)
        #expect(plain?.name == "data" && plain?.cpus == 1 && plain?.memoryBytes == 512 << 20 && plain?.nics.isEmpty == true)
        #expect(GuestDiscovery.guest(arguments: ["qemu-system-x86_64", "-m", "1G", "-drive", "file=/tmp/a.img"], socketDirectory: sockets) == nil)
        #expect(GuestDiscovery.guest(arguments: ["/usr/bin/qemu-io", "-f", "raw", "nbd+unix:///data?socket=\(sockets)/data.sock"], socketDirectory: sockets) == nil)
        #expect(GuestDiscovery.guest(arguments: [], socketDirectory: sockets) == nil)
        // A trailing option without its value, commas doubled in a value.
        let odd = GuestDiscovery.guest(arguments: ["qemu-system-x86_64", "-name", "a,,b", "-drive", "file=nbd+unix:///data?socket=\(sockets)/data.sock", "-smp"],
                                       socketDirectory: sockets)
        #expect(odd?.name == "a,b" && odd?.cpus == 1)
    }
}
