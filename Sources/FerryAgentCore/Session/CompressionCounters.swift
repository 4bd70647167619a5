import Synchronization

/// What a volume's streamer did compressing its written bytes, cumulative for this agent
/// process (reported with the volume, rendered by the controller as counters).
public final class CompressionCounters: Sendable {
    private let inBytes = Atomic<UInt64>(0)
    private let outBytes = Atomic<UInt64>(0)
    private let nanos = Atomic<UInt64>(0)

    public init() {}

    func add(in bytesIn: Int, out bytesOut: Int, nanoseconds: UInt64) {
        inBytes.add(UInt64(bytesIn), ordering: .relaxed)
        outBytes.add(UInt64(bytesOut), ordering: .relaxed)
        nanos.add(nanoseconds, ordering: .relaxed)
    }

    public var snapshot: (inBytes: UInt64, outBytes: UInt64, nanoseconds: UInt64) {
        (inBytes.load(ordering: .relaxed), outBytes.load(ordering: .relaxed), nanos.load(ordering: .relaxed))
    }
}
