@testable import FerryAgentCore
@testable import FerryControllerCore
import FerryWire
import Foundation
import Testing

/// Sizes and durations at and past their limits in configuration files and plans: refused with
/// an error that names the setting, never a trap (nor a value that traps later).
@Suite("Unit extreme values in configuration and plans")
struct UnitExtremeValueTests {
    @Test("sizes: past UInt64, overflowing their unit, negative or not numbers are refused")
    func sizes() throws {
        for text in ["9999999999999999999G", "18446744073709551616", "16777216T", "17179869184G", "18014398509481984K",
                     "-1", "-1G", "1e30", "99999999999999999999999K", "", "G", "1.5G"] {
            #expect(throws: FerryError.self, "\(text)") { _ = try ConfigText.byteSize(text) }
        }
        #expect(try ConfigText.byteSize("18446744073709551615") == UInt64.max)
        #expect(try ConfigText.byteSize("16777215T") == 16_777_215 << 40)
        #expect(try ConfigText.byteSize("0") == 0)
    }

    @Test("durations: past 100 years, negative, not finite or not numbers are refused")
    func durations() throws {
        for text in ["9999999999999999999d", "9223372036854775807ms", "1e300s", "-1s", "-0.5ms", "nan", "inf", "infs",
                     "36501d", "876001h", "99999999999999999999999999999", "", "s"] {
            #expect(throws: FerryError.self, "\(text)") { _ = try ConfigText.duration(text) }
        }
        #expect(try ConfigText.duration("36500d") == .seconds(36_500 * 86_400))
        #expect(try ConfigText.duration("0") == .zero)
    }

    @Test("controller configuration: a journal cap past a pebibyte, huge durations and frame sizes are refused")
    func controllerConfig() throws {
        let dir = try TestDirectory()
        func load(_ yaml: String) throws -> ControllerConfig {
            let path = dir.file("controller-\(UUID().uuidString).yaml")
            try yaml.write(toFile: path, atomically: true, encoding: .utf8)
            var config = ControllerConfig(dataDir: dir.path)
            try config.apply(file: path)
            try config.validate()
            return config
        }
        // 2^63 bytes: accepted before, then converted to Int64 at start (a trap).
        for size in ["8388608T", "16777215T", "2048T"] {
            #expect(throws: FerryError.self, "\(size)") { _ = try load("replica-journal-max: \(size)\n") }
        }
        #expect(try load("replica-journal-max: 1024T\n").replicaJournalMax == 1 << 50)
        for line in ["heartbeat-interval: 9999999999999999999d", "heartbeat-interval: 36500d", "heartbeat-interval: 0",
                     "max-frame-bytes: 99999999999999999999", "max-frame-bytes: -1", "max-frame-bytes: 9223372036854775807",
                     "certificate-validity: 1e300s", "enrollment-timeout: -5s", "replica-retention: 9999999999999999999d"] {
            #expect(throws: FerryError.self, "\(line)") { _ = try load(line + "\n") }
        }
    }

    @Test("agent configuration: change-log sizes and thread counts at the extremes are refused")
    func agentConfig() throws {
        let dir = try TestDirectory()
        func load(_ yaml: String) throws -> AgentConfig {
            let path = dir.file("agent-\(UUID().uuidString).yaml")
            try yaml.write(toFile: path, atomically: true, encoding: .utf8)
            var config = AgentConfig(dataDir: dir.path)
            try config.apply(file: path)
            try config.validate()
            return config
        }
        for line in ["change-log-memory: 9999999999999999999G", "change-log-memory: 16777215T", "change-log-memory: 0",
                     "change-log-spill: 18446744073709551615", "io-threads: 99999999999999999999", "io-threads: -1",
                     "io-threads: 9223372036854775807", "reconnect-initial-delay: 0", "reconnect-max-delay: 9999999999999999999d",
                     "inventory-interval: -1s", "nbd-tcp: 127.0.0.1:65536", "nbd-tcp: 127.0.0.1:-1", "controller: host:99999999999999999999"] {
            #expect(throws: FerryError.self, "\(line)") { _ = try load(line + "\n") }
        }
        #expect(try load("change-log-memory: 64G\nchange-log-spill: 1T\n").changeLogMemory == 64 << 30)
    }

    @Test("plan timeouts: past 7 days, huge, negative or zero are reported on their line")
    func planTimeouts() throws {
        let known = PlanParser.Known(hosts: ["db", "rec1"], volumes: ["db": ["data"]])
        let minimal = """
            name: shop
            groups:
              - name: db
                items:
                  - host: db
                    recovery-host: rec1
            """
        for text in ["9999999999999999999d", "9223372036854775807", "9223372036854775808ms", "1e300s", "-5s", "0", "0s", "8d",
                     "604801", "1.5s", "nan"] {
            do {
                _ = try PlanParser.parse(minimal + "\n        timeout: \(text)", file: "plan.yaml", known: known)
                Issue.record("timeout \(text) accepted")
            } catch let error as FerryError {
                #expect(error.code == .badRequest && error.message.contains("timeout"), "\(text): \(error.message)")
            }
        }
        let longest = try PlanParser.parse(minimal + "\n        timeout: 7d", file: "plan.yaml", known: known)
        #expect(longest.groups[0].items[0].timeoutSeconds == PlanParser.maxTimeoutSeconds)
    }
}
