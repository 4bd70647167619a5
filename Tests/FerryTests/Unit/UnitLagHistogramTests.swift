import FerryAgentCore
import FerryWire
import NIOCore
import Testing

@Suite("Unit lag histogram: per-record replication lag")
struct UnitLagHistogramTests {
    @Test("values land in the bucket whose bound is the first at or above them; quantiles interpolate inside a bucket")
    func buckets() throws {
        var h = LagHistogram()
        #expect(h.quantile(0.99) == nil)
        h.record(seconds: 0.001)   // exactly on the first bound
        h.record(seconds: -5)      // a stepped clock: counts as 0
        h.record(seconds: 0.0015)  // (0.001, 0.002]
        h.record(seconds: 1000)    // past every bound
        #expect(h.counts[0] == 2 && h.counts[1] == 1 && h.counts[LagHistogram.bounds.count] == 1)
        #expect(h.count == 4)
        #expect(abs(h.sumSeconds - 1000.0025) < 1e-9)

        var even = LagHistogram()
        for _ in 0..<100 { even.record(seconds: 0.4) } // all in (0.3, 0.5]
        let p50 = try #require(even.quantile(0.5))
        #expect(abs(p50 - 0.4) < 1e-9, "half way through (0.3, 0.5]: \(p50)")
        #expect(try #require(even.quantile(1)) == 0.5)

        // The records between two states of one histogram.
        var later = even
        later.record(seconds: 2.5)
        let delta = later.since(even)
        #expect(delta.count == 1 && delta.counts[LagHistogram.bounds.firstIndex(of: 3)!] == 1)

        // A report of another shape is refused rather than trusted.
        #expect(LagHistogram(counts: [1, 2], sumSeconds: 1) == nil)
        #expect(LagHistogram(counts: Array(repeating: 0, count: LagHistogram.bounds.count + 1), sumSeconds: .nan) == nil)
    }

    @Test("the change log counts each record once, when the controller's ack of it arrives, and not an ack of another epoch")
    func changeLogCountsAckedRecords() throws {
        let log = try ChangeLog(memoryBytes: 1 << 20, epoch: 3)
        for i in 0..<5 { _ = log.append(offset: UInt64(i) * 4096, kind: .write(ByteBuffer(repeating: 1, count: 4096))) }
        #expect(log.snapshot.writeLag.count == 0)
        log.trim(through: 5, epoch: 4)
        #expect(log.snapshot.writeLag.count == 0)
        log.trim(through: 2, epoch: 3)
        #expect(log.snapshot.writeLag.count == 2)
        log.trim(through: 2, epoch: 3) // the same ack again
        log.trim(through: 5, epoch: 3)
        let lag = log.snapshot.writeLag
        #expect(lag.count == 5)
        // Acked at once: well under a second each.
        #expect(try #require(lag.quantile(1)) < 1)
    }
}
