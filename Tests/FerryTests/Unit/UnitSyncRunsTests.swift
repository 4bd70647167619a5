@testable import FerryAgentCore
import FerryWire
import Testing

@Suite("Unit sync runs: differing blocks travel as runs of consecutive blocks")
struct UnitSyncRunsTests {
    @Test("consecutive blocks join up to 16 (1 MiB); gaps split runs; out of order, repeated or out-of-range indices are refused")
    func runs() throws {
        #expect(try VolumeSyncWorker.runs([], count: 64) == [])
        #expect(try VolumeSyncWorker.runs([0, 1, 2, 5, 6, 9], count: 64) == [0..<3, 5..<7, 9..<10])
        #expect(try VolumeSyncWorker.runs((0..<40).map(UInt32.init), count: 64) == [0..<16, 16..<32, 32..<40])
        #expect(try VolumeSyncWorker.runs([63], count: 64) == [63..<64])
        for bad: [UInt32] in [[64], [3, 2], [4, 4], [UInt32.max]] {
            #expect(throws: FerryError.self, "\(bad)") { try VolumeSyncWorker.runs(bad, count: 64) }
        }
    }
}
