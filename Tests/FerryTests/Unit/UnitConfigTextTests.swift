import FerryAgentCore
import FerryWire
import Foundation
import Testing

@Suite("Unit ConfigText")
struct UnitConfigTextTests {
    // MARK: duration

    static let goodDurations: [(String, Duration)] = [
        ("500ms", .milliseconds(500)),
        ("5ms", .milliseconds(5)),          // not "5m" followed by "s"
        ("15s", .seconds(15)),
        ("10m", .seconds(600)),
        ("1h", .seconds(3_600)),
        ("30d", .seconds(30 * 86_400)),
        ("2", .seconds(2)),
        ("0", .zero),
        ("0s", .zero),
        ("1.5s", .milliseconds(1_500)),
        ("0.25h", .seconds(900)),
        (" 15s ", .seconds(15)),
    ]

    @Test("durations parse", arguments: goodDurations)
    func duration(text: String, expected: Duration) throws {
        #expect(try ConfigText.duration(text) == expected)
    }

    @Test("bad durations are bad-configuration errors",
          arguments: ["5x", "-1s", "", "-1", "s", "ms", "h", "1.2.3s", "1 h", "15 s", "inf", "nan", "infs", "10M", "1hr", "1h30m", "abc"])
    func badDuration(text: String) {
        let error = #expect(throws: FerryError.self) { _ = try ConfigText.duration(text) }
        #expect(error?.code == .badConfiguration)
    }

    /// Values whose millisecond count does not fit in Int64 used to trap in `Int64(Double)`
    /// (e.g. `ferryctl token create --ttl 1e300s` crashed). Checked in a child process (exit
    /// test) so that a regression fails this test instead of crashing the whole test run.
    @Test("a huge duration is a bad-configuration error, not a crash")
    func hugeDurationDoesNotCrash() async {
        await #expect(processExitsWith: .success) {
            for text in ["1e300s", "1e300", "99999999999999999999", "9999999999999999999d", "1e18ms", "1.7976931348623157e308h"] {
                do {
                    _ = try ConfigText.duration(text)
                    exit(2) // accepted
                } catch let error as FerryError where error.code == .badConfiguration {
                    continue
                } catch {
                    exit(3)
                }
            }
            exit(0)
        }
    }

    @Test("long but sane durations are accepted")
    func longDurations() throws {
        #expect(try ConfigText.duration("3650d") == .seconds(3_650 * 86_400))      // a 10-year CA
        #expect(try ConfigText.duration("8760h") == .seconds(365 * 86_400))
    }

    // MARK: hostPort

    static let goodHostPorts: [(String, String, Int)] = [
        ("127.0.0.1:7443", "127.0.0.1", 7443),
        ("[::1]:80", "::1", 80),
        ("[fe80::1%eth0]:9000", "fe80::1%eth0", 9000),
        ("host:0", "host", 0),
        ("controller.example.com:65535", "controller.example.com", 65535),
    ]

    @Test("HOST:PORT parses", arguments: goodHostPorts)
    func hostPort(text: String, host: String, port: Int) throws {
        let parsed = try ConfigText.hostPort(text)
        #expect(parsed.host == host)
        #expect(parsed.port == port)
    }

    @Test("bad HOST:PORT values are bad-configuration errors",
          arguments: ["nohost", ":80", "h:99999", "h:65536", "h:-1", "h:", "h:http", "::1", "fe80::1:80", "[::1]", "[::1]x80", "[]:80", ""])
    func badHostPort(text: String) {
        let error = #expect(throws: FerryError.self) { _ = try ConfigText.hostPort(text) }
        #expect(error?.code == .badConfiguration)
    }

    @Test("a default port fills in only when none is given")
    func defaultPort() throws {
        #expect(try ConfigText.hostPort("nohost", defaultPort: 7443) == ("nohost", 7443))
        #expect(try ConfigText.hostPort("[::1]", defaultPort: 7443) == ("::1", 7443))
        #expect(try ConfigText.hostPort("h:80", defaultPort: 7443) == ("h", 80))
        #expect(throws: FerryError.self) { try ConfigText.hostPort(":80", defaultPort: 7443) }
        #expect(throws: FerryError.self) { try ConfigText.hostPort("h:99999", defaultPort: 7443) }
    }

    // MARK: load

    struct Sample: ConfigFile, Equatable {
        var name: String
        var port: Int?
        var logLevel: String?

        enum CodingKeys: String, CodingKey, CaseIterable {
            case name, port
            case logLevel = "log-level"
        }
    }

    struct AllOptional: ConfigFile, Equatable {
        var name: String?

        enum CodingKeys: String, CodingKey, CaseIterable {
            case name
        }
    }

    static func write(_ text: String, in dir: String) throws -> String {
        let path = dir + "/config.yaml"
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    @Test("a valid file loads")
    func loadValid() async throws {
        try await withUnitTempDir { dir in
            let path = try Self.write("name: web1\nport: 7443\nlog-level: debug\n", in: dir)
            #expect(try ConfigText.load(Sample.self, path: path) == Sample(name: "web1", port: 7443, logLevel: "debug"))
        }
    }

    @Test("an empty file decodes as an empty mapping")
    func loadEmpty() async throws {
        try await withUnitTempDir { dir in
            let path = try Self.write("", in: dir)
            #expect(try ConfigText.load(AllOptional.self, path: path) == AllOptional(name: nil))
        }
    }

    @Test("a file with only a newline, blanks or comments decodes as an empty mapping",
          arguments: ["\n", "  \n", "# every setting commented out\n# log-level: debug\n"])
    func loadBlankDocument(text: String) async throws {
        try await withUnitTempDir { dir in
            let path = try Self.write(text, in: dir)
            #expect(try ConfigText.load(AllOptional.self, path: path) == AllOptional(name: nil))
            var config = AgentConfig(dataDir: dir)
            try config.apply(file: path)
        }
    }

    /// A document that is only a start marker (`---`, e.g. a template whose settings are all
    /// commented out) composes to a null node, not nil; it is still an empty mapping.
    @Test("a file that is only '---' (plus comments) decodes as an empty mapping",
          arguments: ["---\n", "---\n# log-level: debug\n"])
    func loadMarkerOnlyDocument(text: String) async throws {
        try await withUnitTempDir { dir in
            let path = try Self.write(text, in: dir)
            let loaded = try ConfigText.load(AllOptional.self, path: path)
            #expect(loaded == AllOptional(name: nil))
        }
    }

    @Test("missing key, wrong type, broken YAML and a non-mapping are bad-configuration errors naming the file",
          arguments: ["port: 1\n", "name: web1\nport: many\n", "name: [unclosed\n", "- a\n- b\n"])
    func loadErrors(text: String) async throws {
        try await withUnitTempDir { dir in
            let path = try Self.write(text, in: dir)
            let error = #expect(throws: FerryError.self) { _ = try ConfigText.load(Sample.self, path: path) }
            #expect(error?.code == .badConfiguration)
            #expect(error?.message.contains(path) == true)
        }
    }

    @Test("a missing file is a bad-configuration error")
    func loadMissingFile() async throws {
        try await withUnitTempDir { dir in
            let error = #expect(throws: FerryError.self) { _ = try ConfigText.load(Sample.self, path: dir + "/absent.yaml") }
            #expect(error?.code == .badConfiguration)
        }
    }

    @Test("an unknown (typo'd) top-level key is a bad-configuration error naming the key",
          arguments: ["name: web1\nprot: 7443\n", "name: web1\nloglevel: debug\n", "prot: 7443\n", "name: web1\nName: web2\n"])
    func unknownKeyRejected(text: String) async throws {
        try await withUnitTempDir { dir in
            let path = try Self.write(text, in: dir)
            let error = #expect(throws: FerryError.self) { _ = try ConfigText.load(Sample.self, path: path) }
            #expect(error?.code == .badConfiguration)
            let key = try #require(text.split(separator: "\n").last?.split(separator: ":").first.map(String.init))
            #expect(error?.message.contains("'\(key)'") == true, "\(error?.message ?? "")")
        }
    }

    @Test("AgentConfig.apply(file:) refuses a misspelt key and applies the spelt-right ones")
    func agentConfigTypo() async throws {
        try await withUnitTempDir { dir in
            let typo = try Self.write("reconect-max-delay: 30s\nreconnect-initial-delay: 1s\n", in: dir)
            var config = AgentConfig(dataDir: dir)
            let error = #expect(throws: FerryError.self) { try config.apply(file: typo) }
            #expect(error?.code == .badConfiguration)
            #expect(error?.message.contains("reconect-max-delay") == true)

            let good = try Self.write("reconnect-max-delay: 30s\nreconnect-initial-delay: 1s\ncontroller: 10.0.0.1:7443\n", in: dir)
            try config.apply(file: good)
            #expect(config.reconnectInitialDelay == .seconds(1))
            #expect(config.reconnectMaxDelay == .seconds(30))
            #expect(config.controller == "10.0.0.1:7443")
            try config.validate()
        }
    }
}
