/// Bounds on numbers that arrive from a peer, the API or a file, shared by the controller and
/// the agent. A value past them is refused where it arrives, with an error that names it, so
/// no conversion or arithmetic further in can trap on it.
public enum WireLimits {
    /// Largest volume size: file offsets are signed 64-bit in the kernel (off_t), and sizes are
    /// stored as signed 64-bit integers in the controller's database.
    public static let maxVolumeBytes = UInt64(Int64.max)

    /// Checks a volume size (or a size to create) named `what`.
    public static func checkVolumeSize(_ bytes: UInt64, _ what: String, code: FerryError.Code = .badRequest) throws {
        guard bytes <= maxVolumeBytes else {
            throw FerryError(code, "\(what) of \(bytes) bytes is beyond the largest volume (\(maxVolumeBytes) bytes, 2^63-1)")
        }
    }

    /// Checks a TCP port named `what`: 1 to 65535.
    public static func checkPort(_ port: UInt32, _ what: String) throws {
        guard (1...65535).contains(port) else {
            throw FerryError(.badRequest, "\(what) \(port) is not a TCP port (1 to 65535)")
        }
    }
}
