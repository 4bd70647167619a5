import Crypto
import FerryAgentCore
import FerryWire
import Foundation
import SwiftProtobuf
import Testing
import X509

/// Every bad input gets a clear error and closes at most its own connection. The peers are real:
/// `openssl s_client` for TLS, a raw socket for plain TCP, `ferry-agent enroll` for tokens.
@Suite("bad input on the agent listener")
struct BadInputTests {
    static let frameSession = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("tools/frame_session.py").path

    /// One controller with one healthy agent, shared by the cases of a test; after every case the
    /// agent must still be online.
    struct Fixture {
        let dir: TestDirectory
        let controller: ControllerProcess
        let agent: ChildProcess
        let identity: AgentIdentity

        static func make() async throws -> Fixture {
            let dir = try TestDirectory()
            let config = dir.file("controller.yaml")
            try "enrollment-timeout: 2s\n".write(toFile: config, atomically: true, encoding: .utf8)
            let controller = try await ControllerProcess.start(dataDir: dir.sub("controller"), arguments: ["--config", config])
            let agent = try await AgentProcess.enrollAndStart("healthy", controller: controller, in: dir)
            #expect(try await controller.waitFor("healthy", state: "online"))
            return Fixture(dir: dir, controller: controller, agent: agent, identity: try AgentIdentity.load(from: dir.path + "/agent-healthy"))
        }

        /// Sends `input` through `openssl s_client` (optionally presenting a certificate) and
        /// returns the frames the controller sent back before closing.
        func opensslSend(_ input: [UInt8], certificate: Certificate? = nil, key: Certificate.PrivateKey? = nil) async throws -> (frames: [Ferry_V1_Envelope], result: CommandResult) {
            var args = ["s_client", "-connect", controller.agentAddress, "-quiet", "-tls1_3",
                        "-CAfile", controller.caPath, "-verify_return_error", "-servername", ControllerIdentity.serverName]
            if let certificate, let key {
                let name = UUID().uuidString
                let certPath = dir.file("\(name).pem"), keyPath = dir.file("\(name).key")
                try PEMFiles.writePublic(try PEMFiles.pem(certificate), to: certPath)
                try PEMFiles.writeSecret(try PEMFiles.pem(key), to: keyPath)
                args += ["-cert", certPath, "-key", keyPath]
            }
            let result = try await run("/usr/bin/openssl", args, stdin: input, timeout: .seconds(20))
            // Commands the controller sends on its own (the volume list after a welcome) are not
            // answers to this input.
            let answers = try Frames.split(result.stdoutBytes).filter {
                if case .command = $0.body { return false } else { return true }
            }
            return (answers, result)
        }

        func stillHealthy() async throws {
            #expect(try await controller.host("healthy")?.state == .online)
            #expect(agent.isRunning && controller.process.isRunning)
        }
    }

    @Test("frames: over the cap before and after authentication, malformed, unknown kind")
    func frames() async throws {
        let f = try await Fixture.make()

        // Unauthenticated: 64 KiB cap; a 1 MiB header is refused before its body is sent.
        let (preAuth, _) = try await f.opensslSend(Frames.header(1 << 20))
        #expect(preAuth.count == 1)
        #expect(preAuth.first?.error.code == .protocolViolation)
        #expect(preAuth.first?.error.message.contains("exceeds the limit") == true)

        // The cases below speak with the healthy agent's own identity: paused, it cannot come
        // back and replace the test's session (which ends it with "replaced") mid-case.
        f.agent.signal(SIGSTOP)

        // Authenticated: hello, an unknown message kind (answered, session goes on), then a
        // frame over the 40 MiB cap ends the session with a reason.
        var unknown = Frames.envelope(.hello(f.hello()), id: 1)
        unknown += Frames.raw(Frames.unknownKind(id: 7))
        unknown += Frames.header(64 << 20)
        let (session, r1) = try await f.opensslSend(unknown, certificate: f.identity.certificate, key: f.identity.privateKey)
        #expect(session.count == 3, "\(r1)")
        if session.count == 3 {
            #expect(session[0].welcome.hostName == "healthy")
            #expect(session[1].inReplyTo == 7 && session[1].error.code == .unsupported)
            #expect(session[2].error.code == .protocolViolation && session[2].error.message.contains("exceeds the limit"))
        }

        // A frame that is not a protobuf Envelope at all.
        var malformed = Frames.envelope(.hello(f.hello()), id: 1)
        malformed += Frames.raw([0xFF, 0xFF, 0xFF, 0xFF, 0x0F, 0x01])
        let (bad, r2) = try await f.opensslSend(malformed, certificate: f.identity.certificate, key: f.identity.privateKey)
        #expect(bad.count == 2, "\(r2)")
        #expect(bad.last?.error.code == .protocolViolation)
        #expect(bad.last?.error.message.contains("malformed") == true)

        // Random bytes inside an authenticated TLS session.
        var noise = Frames.envelope(.hello(f.hello()), id: 1)
        // The first byte is high so the bytes read as a frame over the cap: a random length under
        // it (about 1 in 100) would wait for a body that never comes.
        noise += [0xF0 | UInt8.random(in: 0...15)] + (1..<2048).map { _ in UInt8.random(in: 0...255) }
        let (noisy, r3) = try await f.opensslSend(noise, certificate: f.identity.certificate, key: f.identity.privateKey)
        #expect(noisy.first?.welcome.hostName == "healthy", "\(r3)")
        #expect(noisy.count == 2 && noisy.last?.error.code == .protocolViolation, "\(noisy)")

        // A message announcing more attached frames than any message may carry is refused
        // before any of them is read.
        var attached = Ferry_V1_Envelope.with(id: 0, .heartbeat(.init()))
        attached.attachments = UInt32(Attachments.maxCount + 1)
        var tooMany = Frames.envelope(.hello(f.hello()), id: 1)
        tooMany += Frames.raw(try attached.serializedBytes())
        let (refused, r4) = try await f.opensslSend(tooMany, certificate: f.identity.certificate, key: f.identity.privateKey)
        #expect(refused.count == 2, "\(r4)")
        #expect(refused.last?.error.code == .protocolViolation)
        #expect(refused.last?.error.message.contains("attached frames") == true, "\(refused)")

        // Ten million empty records in one 20 MB batch (under the 40 MiB cap) would cost
        // gigabytes decoded: refused from the raw bytes, before decoding, with the session.
        // Sent once the welcome has raised the frame cap.
        let hello = f.dir.file("hello.frames"), flood = f.dir.file("flood.frames")
        try Data(Frames.envelope(.hello(f.hello()), id: 1)).write(to: URL(fileURLWithPath: hello))
        try Data(Frames.raw(MessageBudgetTests.emptyRecordsBatch(count: 10_000_000))).write(to: URL(fileURLWithPath: flood))
        let certPath = f.dir.file("healthy.pem"), keyPath = f.dir.file("healthy.key")
        try PEMFiles.writePublic(try PEMFiles.pem(f.identity.certificate), to: certPath)
        try PEMFiles.writeSecret(try PEMFiles.pem(f.identity.privateKey), to: keyPath)
        let before = try f.controller.process.residentBytes()
        let r5 = try await run(RecoveryPointTests.python, [BadInputTests.frameSession, f.controller.agentAddress, f.controller.caPath, certPath, keyPath,
                                                           ControllerIdentity.serverName, hello, flood], timeout: .seconds(90))
        // The welcome and the refusal (not the commands or heartbeats the controller sends on its own).
        let flooded = try Frames.split(r5.stdoutBytes).filter {
            switch $0.body {
            case .welcome, .error: return true
            default: return false
            }
        }
        #expect(flooded.count == 2, "\(r5)")
        #expect(flooded.last?.error.code == .protocolViolation)
        #expect(flooded.last?.error.message.contains("before it is decoded") == true, "\(flooded)")
        let grown = Int64(try f.controller.process.peakResidentBytes()) - Int64(before)
        print("controller peak RSS growth while refusing 10^7 empty records: \(grown >> 20) MiB")
        #expect(grown < 256 << 20, "decoding was attempted: the controller grew by \(grown >> 20) MiB")

        // The first message of a session must be hello.
        let (notHello, _) = try await f.opensslSend(Frames.envelope(.heartbeat(.init()), id: 3), certificate: f.identity.certificate, key: f.identity.privateKey)
        #expect(notHello.first?.error.code == .protocolViolation)

        // Resumed, the agent finds its session taken and comes back on its own.
        f.agent.signal(SIGCONT)
        #expect(try await f.controller.waitFor("healthy", state: "online"))
        try await f.stillHealthy()
    }

    @Test("plain TCP and random bytes are refused at TLS; the controller keeps serving")
    func plainTCP() async throws {
        let f = try await Fixture.make()
        for payload in [Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8), (0..<4096).map { _ in UInt8.random(in: 0...255) }] {
            let answer = try await RawTCP.exchange(address: f.controller.agentAddress, send: payload, timeout: .seconds(10))
            // A TLS alert at most (content type 21), never a Ferry frame or a hang.
            #expect(answer.closed, "connection left open")
            #expect(answer.bytes.isEmpty || answer.bytes[0] == 21, "\(answer.bytes.prefix(8))")
        }
        // A client that connects and says nothing is closed after the enrollment timeout (2 s).
        let started = ContinuousClock.now
        let silent = try await RawTCP.exchange(address: f.controller.agentAddress, send: [], timeout: .seconds(15))
        #expect(silent.closed)
        #expect(ContinuousClock.now - started < .seconds(6))
        let metrics = try await f.controller.ctl("metrics")
        #expect(metrics.stdout.contains("ferry_connections_rejected_total{reason=\"tls\"}"))
        try await f.stillHealthy()
    }

    @Test("client certificates: none, another CA, expired, not issued here, revoked, another host's")
    func certificates() async throws {
        let f = try await Fixture.make()
        let hello = Frames.envelope(.hello(f.hello()), id: 1)

        // None: only enrollment is allowed.
        let (none, _) = try await f.opensslSend(hello)
        #expect(none.first?.error.code == .unauthenticated)
        #expect(none.first?.error.message.contains("enroll first") == true)

        // Another CA: refused in the TLS handshake, no frame ever answered.
        let foreignCA = try CertificateAuthority.create(commonName: "Someone else")
        let foreignKey = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let foreign = try foreignCA.issueHostCertificate(publicKey: foreignKey.publicKey, hostID: f.identity.info.hostID, hostName: "healthy", validity: 3600)
        let (foreignFrames, foreignResult) = try await f.opensslSend(hello, certificate: foreign, key: foreignKey)
        #expect(foreignFrames.isEmpty)
        #expect(foreignResult.stderr.contains("alert"), "\(foreignResult)")

        // Expired, though issued by the right CA for a real host.
        let ca = try CertificateAuthority.load(certificatePath: f.controller.dataDir + "/ca.pem", keyPath: f.controller.dataDir + "/ca.key")
        let expiredKey = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let expired = try ca.issueHostCertificate(publicKey: expiredKey.publicKey, hostID: f.identity.info.hostID, hostName: "healthy",
                                                  validity: 60, now: Date().addingTimeInterval(-7200))
        let (expiredFrames, expiredResult) = try await f.opensslSend(hello, certificate: expired, key: expiredKey)
        #expect(expiredFrames.isEmpty)
        #expect(expiredResult.stderr.contains("certificate expired"), "\(expiredResult)")

        // Valid and signed by the right CA, but never issued by the controller (someone holding
        // an operator CA key minted it): refused, since only issued serials count.
        let mintedKey = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let minted = try ca.issueHostCertificate(publicKey: mintedKey.publicKey, hostID: f.identity.info.hostID, hostName: "healthy", validity: 3600)
        let (mintedFrames, _) = try await f.opensslSend(hello, certificate: minted, key: mintedKey)
        #expect(mintedFrames.first?.error.code == .revoked)
        #expect(mintedFrames.first?.error.message.contains("not issued by this controller") == true, "\(mintedFrames)")

        // Another host's certificate: an agent speaks only for itself.
        let otherDir = f.dir.path + "/agent-other"
        let token = try await f.controller.token(host: "other")
        #expect(try await AgentProcess.enroll(controller: f.controller, token: token, dataDir: otherDir).status == 0)
        let other = try AgentIdentity.load(from: otherDir)
        let (impostor, _) = try await f.opensslSend(hello, certificate: other.certificate, key: other.privateKey)
        #expect(impostor.first?.error.code == .permissionDenied)
        #expect(impostor.first?.error.message.contains("speaks only for itself") == true)

        // Revoked: remove the other host, then present its (unexpired, CA-signed) certificate.
        #expect(try await f.controller.ctl("host", "remove", "other").status == 0)
        var otherHello = f.hello()
        otherHello.hostID = other.info.hostID
        let (revoked, _) = try await f.opensslSend(Frames.envelope(.hello(otherHello), id: 1), certificate: other.certificate, key: other.privateKey)
        #expect(revoked.first?.error.code == .revoked)
        try await f.stillHealthy()
    }

    @Test("tokens: reused, expired, bound to another host, for another controller, malformed")
    func tokens() async throws {
        let f = try await Fixture.make()
        func enroll(_ token: String, name: String? = nil) async throws -> CommandResult {
            try await AgentProcess.enroll(controller: f.controller, token: token, dataDir: f.dir.path + "/enroll-\(UUID().uuidString)", name: name)
        }
        func refused(_ r: CommandResult, _ text: String) {
            #expect(r.status != 0)
            let lines = r.stderr.split(separator: "\n").filter { $0.hasPrefix("ferry-agent:") }
            #expect(lines.count == 1 && lines[0].contains(text), "\(r)")
        }

        let once = try await f.controller.token()
        #expect(try await enroll(once, name: "first").status == 0)
        refused(try await enroll(once, name: "second"), "already used")

        let short = try await f.controller.token(ttl: "1s")
        try await Task.sleep(for: .seconds(2))
        refused(try await enroll(short, name: "late"), "expired")

        let bound = try await f.controller.token(host: "db")
        refused(try await enroll(bound, name: "web"), "is for host 'db', not 'web'")
        // The refusal did not consume it: the right host still enrolls with it.
        #expect(try await enroll(bound).status == 0)

        // A malformed certificate request is refused without spending the token.
        let spare = try await f.controller.token()
        var garbage = Ferry_V1_EnrollRequest()
        garbage.token = spare
        garbage.csrDer = Data((0..<300).map { _ in UInt8.random(in: 0...255) })
        garbage.requestedName = "garbage"
        let (csrRefused, _) = try await f.opensslSend(Frames.envelope(.enrollRequest(garbage), id: 1))
        #expect(csrRefused.first?.error.code == .badRequest)
        #expect(csrRefused.first?.error.message.contains("certificate request") == true, "\(csrRefused)")
        #expect(try await enroll(spare, name: "second-try").status == 0)

        let stranger = EnrollmentToken.generate(caFingerprint: Array(repeating: 7, count: 32))
        refused(try await enroll(stranger.description, name: "x"), "CA fingerprint")
        refused(try await enroll("not-a-token", name: "x"), "not a Ferry enrollment token")

        let hosts = try await f.controller.hosts().map(\.name).sorted()
        #expect(hosts == ["db", "first", "healthy", "second-try"])
        try await f.stillHealthy()
    }
}

extension BadInputTests.Fixture {
    func hello() -> Ferry_V1_Hello {
        var hello = Ferry_V1_Hello()
        hello.protocolVersion = .protocolVersion1
        hello.hostID = identity.info.hostID
        hello.agentVersion = "test"
        return hello
    }
}

/// Building and splitting Ferry frames by hand, as a hostile or broken peer would.
enum Frames {
    static func header(_ length: Int) -> [UInt8] {
        withUnsafeBytes(of: UInt32(length).bigEndian) { Array($0) }
    }

    static func raw(_ body: [UInt8]) -> [UInt8] { header(body.count) + body }

    static func envelope(_ body: Ferry_V1_Envelope.OneOf_Body, id: UInt64) -> [UInt8] {
        raw(try! Ferry_V1_Envelope.with(id: id, body).serializedBytes())
    }

    /// An Envelope with a body field number no version of the contract uses.
    static func unknownKind(id: UInt64) -> [UInt8] {
        var bytes: [UInt8] = try! Ferry_V1_Envelope.with(id: id, .heartbeat(.init())).serializedBytes()
        // Drop the heartbeat field (tag 12, length 0) and add field 99 (length-delimited, 2 bytes).
        bytes.removeLast(2)
        bytes += [0x9A, 0x06, 0x02, 0x08, 0x01]
        return bytes
    }

    static func split(_ bytes: [UInt8]) throws -> [Ferry_V1_Envelope] {
        var frames: [Ferry_V1_Envelope] = []
        var i = 0
        while i + 4 <= bytes.count {
            let length = Int(bytes[i]) << 24 | Int(bytes[i + 1]) << 16 | Int(bytes[i + 2]) << 8 | Int(bytes[i + 3])
            guard i + 4 + length <= bytes.count else { break }
            frames.append(try Ferry_V1_Envelope(serializedBytes: Array(bytes[(i + 4)..<(i + 4 + length)])))
            i += 4 + length
        }
        return frames
    }
}

/// A plain TCP peer: sends bytes, reads until the server closes or the timeout.
enum RawTCP {
    static func exchange(address: String, send: [UInt8], timeout: Duration) async throws -> (bytes: [UInt8], closed: Bool) {
        let (host, port) = try ConfigText.hostPort(address)
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw FerryError(.io, "socket failed") }
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        inet_pton(AF_INET, host, &addr.sin_addr)
        let connected = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard connected == 0 else { throw FerryError(.io, "connect to \(address) failed") }
        _ = send.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        var received: [UInt8] = []
        let deadline = ContinuousClock.now + timeout
        var buffer = [UInt8](repeating: 0, count: 4096)
        while ContinuousClock.now < deadline {
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            // Non-blocking polls with sleeps between them, so no pool thread is ever held.
            if poll(&pfd, 1, 0) > 0 {
                let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
                if n <= 0 { return (received, true) }
                received += buffer[0..<n]
                continue
            }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return (received, false)
    }
}
