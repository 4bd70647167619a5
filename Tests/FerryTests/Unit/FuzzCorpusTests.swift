import FerryAgentCore
import FerryControllerCore
import FerryNBD
import FerryWire
import Foundation
import NIOEmbedded
import Testing

/// The fuzz targets' inputs (deploy/fuzz/corpus: the seeds, and every input a fuzzer crashed
/// on, named `crash-*`) fed to the same entry points the targets use, so the normal suite
/// checks each one: a crash here is a regression. The seeds must also still be valid inputs,
/// or the fuzzer would start from nothing.
@Suite("Fuzz corpus")
struct FuzzCorpusTests {
    static let corpus = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("deploy/fuzz/corpus")

    /// The inputs of one target, by file name.
    static func inputs(_ target: String) throws -> [(name: String, bytes: [UInt8])] {
        let dir = corpus.appendingPathComponent(target)
        let names = try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted()
        #expect(!names.isEmpty, "no inputs in \(dir.path)")
        return try names.map { ($0, Array(try Data(contentsOf: dir.appendingPathComponent($0)))) }
    }

    static func text(_ bytes: [UInt8]) -> String { String(decoding: bytes, as: UTF8.self) }

    @Test func frames() throws {
        for input in try Self.inputs("fuzz-frames") { ControllerFuzzing.frames(input.bytes) }
    }

    @Test func nbdServer() throws {
        for input in try Self.inputs("fuzz-nbd-server") { NBDFuzzing.server(input.bytes) }
    }

    @Test func nbdClient() throws {
        for input in try Self.inputs("fuzz-nbd-client") {
            let channel = EmbeddedChannel()
            try NBDFuzzing.client(input.bytes, channel: channel)
            _ = try? channel.finish(acceptAlreadyClosed: true)
        }
    }

    @Test func plans() throws {
        let known = PlanParser.Known(
            hosts: ["db", "app", "web", "rec1", "rec2"],
            volumes: ["db": ["data", "log", "archive"], "app": ["root"], "web": ["root", "static"]],
            taken: ["db/archive": "other"]
        )
        for input in try Self.inputs("fuzz-plan") {
            let plan = Result { try PlanParser.parse(Self.text(input.bytes), file: input.name, known: known) }
            if !input.name.hasPrefix("crash-") { #expect((try? plan.get()) != nil, "seed \(input.name)") }
        }
    }

    @Test func configs() async throws {
        try await withUnitTempDir { dir in
            for input in try Self.inputs("fuzz-config") {
                let path = dir + "/" + input.name
                try Data(input.bytes).write(to: URL(fileURLWithPath: path))
                var agent = AgentConfig(dataDir: "/var/lib/ferry")
                let asAgent = Result { try agent.apply(file: path); try agent.validate() }
                var controller = ControllerConfig(dataDir: "/var/lib/ferry")
                let asController = Result { try controller.apply(file: path); try controller.validate() }
                if !input.name.hasPrefix("crash-") {
                    // Each seed is a valid configuration of one of the two.
                    let valid = (try? asAgent.get()) != nil || (try? asController.get()) != nil
                    #expect(valid, "seed \(input.name)")
                }
            }
        }
    }

    @Test func tokens() throws {
        for input in try Self.inputs("fuzz-token") {
            let token = try? EnrollmentToken(parsing: Self.text(input.bytes))
            if let token { #expect(try EnrollmentToken(parsing: token.description) == token) }
            if !input.name.hasPrefix("crash-") { #expect(token != nil, "seed \(input.name)") }
        }
    }

    @Test func journalSegments() throws {
        for input in try Self.inputs("fuzz-journal") { ControllerFuzzing.journalSegment(input.bytes) }
    }
}
