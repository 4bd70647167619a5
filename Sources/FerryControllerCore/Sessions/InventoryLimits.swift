import FerryWire

/// Bounds on what an agent may report about itself: the inventory is stored and audited on
/// every change, so an agent must not be able to grow the database without limit.
enum InventoryLimits {
    static let maxBytes = 256 * 1024
    static let maxInterfaces = 1024
    static let maxAddressesPerInterface = 256
    static let maxBlockDevices = 4096
    static let maxString = 256
    static let maxGuests = 256
    static let maxGuestDevices = 64
    /// Least time between two unsolicited inventory updates from one agent.
    static let minUpdateInterval: Duration = .seconds(1)
    /// How much closer than that two updates may arrive (scheduling and network jitter).
    static let arrivalJitter: Duration = .milliseconds(250)

    static func check(_ inventory: Ferry_V1_Inventory) throws {
        func bad(_ what: String) -> FerryError { FerryError(.badRequest, "inventory rejected: \(what)") }
        guard inventory.serializedSize() <= maxBytes else { throw bad("larger than \(maxBytes / 1024) KiB") }
        guard inventory.interfaces.count <= maxInterfaces else { throw bad("more than \(maxInterfaces) network interfaces") }
        guard inventory.blockDevices.count <= maxBlockDevices else { throw bad("more than \(maxBlockDevices) block devices") }
        var strings = [inventory.hostname, inventory.osName, inventory.kernel, inventory.architecture, inventory.bootID]
        for nic in inventory.interfaces {
            guard nic.addresses.count <= maxAddressesPerInterface else { throw bad("interface \(nic.name.prefix(64)) has more than \(maxAddressesPerInterface) addresses") }
            strings += [nic.name, nic.macAddress] + nic.addresses
        }
        for dev in inventory.blockDevices { strings += [dev.name, dev.path, dev.model] }
        guard inventory.guests.count <= maxGuests else { throw bad("more than \(maxGuests) guests") }
        for guest in inventory.guests {
            guard guest.nics.count <= maxGuestDevices, guest.volumes.count <= maxGuestDevices else {
                throw bad("guest \(guest.name.prefix(64)) has more than \(maxGuestDevices) NICs or disks")
            }
            strings += [guest.name, guest.machine] + guest.volumes + guest.nics.flatMap { [$0.macAddress, $0.model] }
        }
        if let long = strings.first(where: { $0.utf8.count > maxString }) {
            throw bad("a field is longer than \(maxString) bytes ('\(long.prefix(32))...')")
        }
    }
}

extension Ferry_V1_Inventory {
    fileprivate func serializedSize() -> Int {
        (try? serializedBytes() as [UInt8])?.count ?? Int.max
    }
}
