import Foundation
import Testing
@testable import FerryControllerCore

@Suite("lag history for the console's chart")
struct UnitLagHistoryTests {
    @Test("one sample per 10 s holding the worst lag in it; an hour kept; nonsense clamped")
    func buckets() {
        var history = LagHistory()
        let start = Date(timeIntervalSince1970: 1_800_000_000)
        history.record(lagSeconds: 0.2, lagBytes: 10, now: start)
        history.record(lagSeconds: 3.5, lagBytes: 5, now: start.addingTimeInterval(4))
        history.record(lagSeconds: 0.1, lagBytes: 99, now: start.addingTimeInterval(9))
        #expect(history.samples.count == 1)
        #expect(history.samples[0].lagSeconds == 3.5 && history.samples[0].lagBytes == 99)
        history.record(lagSeconds: -4, lagBytes: 0, now: start.addingTimeInterval(10))
        history.record(lagSeconds: .infinity, lagBytes: 0, now: start.addingTimeInterval(20))
        #expect(history.samples.map(\.lagSeconds) == [3.5, 0, 0])
        for i in 3..<(400) { history.record(lagSeconds: Double(i), lagBytes: 0, now: start.addingTimeInterval(Double(i) * 10)) }
        #expect(history.samples.count == 361)
        #expect(history.samples.first!.at >= start.addingTimeInterval(3990 - 3600))
        #expect(history.samples.last!.lagSeconds == 399)
    }
}
