@testable import FerryNBD
import FerryWire
import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization
import Testing

/// The NBD client against real peers: nbdkit (plain, TLS, filters that shape what it offers),
/// Ferry's own NBDServer, and fake servers that misbehave on purpose.
@Suite("NBD client")
struct NBDClientTests {
    // MARK: Fixtures

    /// An nbdkit process serving on a unix socket in a directory of its own; killed with the
    /// fixture (ChildProcess kills with SIGKILL when it goes, also when a test fails).
    final class NBDKit: Sendable {
        let dir: TestDirectory
        let socket: String
        let process: ChildProcess

        /// `arguments` go before the socket options (filters, TLS); `plugin` is the plugin and its parameters.
        init(_ arguments: [String] = [], plugin: [String] = ["memory", "64M"], dir: TestDirectory? = nil) async throws {
            self.dir = try dir ?? TestDirectory("ferry-nbdkit")
            socket = self.dir.file("nbdkit-\(UUID().uuidString.prefix(8)).sock")
            let pidFile = socket + ".pid"
            process = try await ChildProcess("/usr/bin/nbdkit",
                ["--foreground", "--exit-with-parent", "--threads", "16", "--unix", socket, "--pidfile", pidFile] + arguments + plugin,
                logPath: socket + ".log")
            // nbdkit writes its pid file once it is listening.
            let process = self.process
            let ready = await eventually(timeout: .seconds(20), every: .milliseconds(20)) {
                FileManager.default.fileExists(atPath: pidFile) || !process.isRunning
            }
            guard ready, process.isRunning else {
                throw FerryError(.io, "nbdkit did not start: \(process.log)")
            }
        }

        func stop() async { await process.kill9() }
    }

    /// A CA and a server certificate for "localhost" made with openssl, in nbdkit's layout
    /// (ca-cert.pem, server-cert.pem, server-key.pem).
    static func makeCertificates(in dir: String) async throws {
        func openssl(_ arguments: [String]) async throws {
            let r = try await run("/usr/bin/openssl", arguments)
            guard r.status == 0 else { throw FerryError(.pki, "openssl \(arguments.joined(separator: " ")): \(r)") }
        }
        try await openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "30",
                           "-subj", "/CN=Ferry test NBD CA", "-keyout", dir + "/ca-key.pem", "-out", dir + "/ca-cert.pem",
                           "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        try await openssl(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=localhost",
                           "-keyout", dir + "/server-key.pem", "-out", dir + "/server.csr"])
        try "subjectAltName=DNS:localhost\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
            .write(toFile: dir + "/server.ext", atomically: true, encoding: .utf8)
        try await openssl(["x509", "-req", "-in", dir + "/server.csr", "-CA", dir + "/ca-cert.pem", "-CAkey", dir + "/ca-key.pem",
                           "-CAcreateserial", "-days", "30", "-out", dir + "/server-cert.pem", "-extfile", dir + "/server.ext"])
    }

    static func tls(trusting caFile: String) throws -> NBDClientTLS {
        let context = try NBDClientTLS.makeContext(trustRoots: try NIOSSLCertificate.fromPEMFile(caFile))
        return NBDClientTLS(context: context, serverHostname: "localhost")
    }

    /// `count` bytes of a pattern that differs by `seed` and position.
    static func pattern(_ seed: Int, count: Int) -> ByteBuffer {
        var buffer = ByteBufferAllocator().buffer(capacity: count)
        buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: count) { out in
            for i in 0..<count { out[i] = UInt8(truncatingIfNeeded: (i / 7) &* 31 &+ seed &* 101 &+ i) }
            return count
        }
        return buffer
    }

    /// Compared 64 KiB at a time with memcmp: byte by byte, a debug build spent tens of seconds
    /// of a cooperative-pool thread on 40 MiB, starving the timers of tests running beside it.
    static func isZero(_ buffer: ByteBuffer) -> Bool {
        let zeros = [UInt8](repeating: 0, count: 64 << 10)
        return buffer.withUnsafeReadableBytes { bytes in
            var at = 0
            while at < bytes.count {
                let n = min(zeros.count, bytes.count - at)
                if memcmp(bytes.baseAddress! + at, zeros, n) != 0 { return false }
                at += n
            }
            return true
        }
    }

    /// The results of requests started as tasks, so a test can wait for them with a bound and
    /// never hang on one that does not finish.
    final class Outcomes: Sendable {
        private let results = Mutex<[Result<Void, any Error>]>([])
        var count: Int { results.withLock { $0.count } }
        var all: [Result<Void, any Error>] { results.withLock { $0 } }
        func record(_ result: Result<Void, any Error>) { results.withLock { $0.append(result) } }

        func start(_ body: @escaping @Sendable () async throws -> Void) {
            Task {
                do { try await body(); record(.success(())) } catch { record(.failure(error)) }
            }
        }
    }

    /// Problems seen by plain threads, checked once they are done.
    final class Failures: Sendable {
        private let list = Mutex<[String]>([])
        var all: [String] { list.withLock { $0 } }
        func add(_ failure: String) { list.withLock { $0.append(failure) } }
    }

    // MARK: 1. nbdkit memory over a unix socket

    @Test("nbdkit memory: size, patterns read back (split past 32 MiB), zeroes, flush, 256 pipelined writes and reads")
    func nbdkitMemory() async throws {
        let server = try await NBDKit(plugin: ["memory", "96M"])
        let client = try await NBDClient.connect(unixSocket: server.socket, export: "")
        #expect(client.size == 96 << 20)
        #expect(!client.isReadOnly && client.canFlush && client.canFUA && client.canWriteZeroes)
        #expect(client.isConnected)
        #expect(client.maximumRequestSize <= NBDClient.defaultMaximumRequestSize)

        let first = Self.pattern(1, count: 1 << 20)
        try await client.write(offset: 0, data: first)
        #expect(try await client.read(offset: 0, length: 1 << 20) == first)
        // Unaligned, small, with FUA.
        let odd = Self.pattern(2, count: 777)
        try await client.write(offset: 4097, data: odd, fua: true)
        #expect(try await client.read(offset: 4097, length: 777) == odd)
        #expect(try await client.read(offset: 4096, length: 1).readableBytesView.first == first.getInteger(at: 4096, as: UInt8.self))

        try await client.writeZeroes(offset: 512 << 10, length: 256 << 10)
        let zeroed = try await client.read(offset: 0, length: 1 << 20)
        #expect(zeroed.getSlice(at: 0, length: 4097) == first.getSlice(at: 0, length: 4097))
        #expect(Self.isZero(zeroed.getSlice(at: 512 << 10, length: 256 << 10)!))
        #expect(zeroed.getSlice(at: 768 << 10, length: 256 << 10) == first.getSlice(at: 768 << 10, length: 256 << 10))
        try await client.flush()

        // Larger than one request: split into pipelined pieces both ways.
        let big = Self.pattern(3, count: 40 << 20)
        try await client.write(offset: 50 << 20, data: big)
        #expect(try await client.read(offset: 50 << 20, length: 40 << 20) == big)

        // 256 writes at once, then 256 reads at once, each of its own 4 KiB block.
        try await withThrowingTaskGroup(of: Void.self) { group in
            for i in 0..<256 {
                group.addTask { try await client.write(offset: UInt64(2 << 20) + UInt64(i) * 4096, data: Self.pattern(1000 + i, count: 4096)) }
            }
            try await group.waitForAll()
        }
        let mismatches = try await withThrowingTaskGroup(of: Int.self) { group in
            for i in 0..<256 {
                group.addTask {
                    let data = try await client.read(offset: UInt64(2 << 20) + UInt64(i) * 4096, length: 4096)
                    return data == Self.pattern(1000 + i, count: 4096) ? 0 : 1
                }
            }
            return try await group.reduce(0, +)
        }
        #expect(mismatches == 0)

        // Outside the export: refused with an errno, nothing sent, the connection goes on.
        await #expect(throws: VolumeIOError.self) { _ = try await client.read(offset: client.size - 10, length: 4096) }
        do {
            try await client.write(offset: client.size, data: odd)
            Issue.record("a write past the end succeeded")
        } catch let error as VolumeIOError {
            #expect(error.errno == ENOSPC)
        }
        #expect(client.isConnected)

        await client.close()
        #expect(!client.isConnected)
        do {
            _ = try await client.read(offset: 0, length: 512)
            Issue.record("a read after close succeeded")
        } catch let error as FerryError {
            #expect(error.code == .unavailable && error.message.contains("closed"), "\(error)")
        }
        await server.stop()
    }

    /// The whole `base:allocation` map, asked piece by piece as a server answers prefixes; runs
    /// merged by whether they read as zeroes.
    static func allocationMap(_ client: NBDClient) async throws -> [[UInt64]] {
        var runs: [[UInt64]] = []
        var at: UInt64 = 0
        while at < client.size {
            let extents = try await client.blockStatus(offset: at, length: client.size - at)
            for e in extents {
                let zero: UInt64 = e.isZero ? 1 : 0
                if let last = runs.last, last[2] == zero { runs[runs.count - 1][1] += e.length } else { runs.append([at, e.length, zero]) }
                at += e.length
            }
        }
        return runs
    }

    @Test("block status: the client reads nbdkit's and Ferry's allocation maps, structured reads and hole chunks come back right; a server without structured replies still serves, without block status")
    func blockStatus() async throws {
        // nbdkit memory: a sparse array; what is written is data, a zeroed range a hole again.
        let server = try await NBDKit(plugin: ["memory", "64M"])
        let client = try await NBDClient.connect(unixSocket: server.socket, export: "", allocation: true)
        #expect(client.canBlockStatus)
        let data = Self.pattern(4, count: 2 << 20)
        try await client.write(offset: 8 << 20, data: data)
        try await client.writeZeroes(offset: 9 << 20, length: 1 << 20)
        #expect(try await Self.allocationMap(client) == [[0, 8 << 20, 1], [8 << 20, 1 << 20, 0], [9 << 20, 55 << 20, 1]])
        #expect(try await client.read(offset: 8 << 20, length: 1 << 20) == data.getSlice(at: 0, length: 1 << 20))
        #expect(Self.isZero(try await client.read(offset: 9 << 20, length: 1 << 20)))
        // A read split in pieces, each its own structured reply.
        let big = try await client.read(offset: 0, length: 40 << 20)
        #expect(big.getSlice(at: 8 << 20, length: 1 << 20) == data.getSlice(at: 0, length: 1 << 20))
        #expect(Self.isZero(big.getSlice(at: 0, length: 8 << 20)!) && Self.isZero(big.getSlice(at: 9 << 20, length: 31 << 20)!))
        let one = try await client.blockStatus(offset: (8 << 20) + 4096, length: 4096)
        #expect(one == [NBDExtent(length: 4096, flags: 0)])
        await #expect(throws: VolumeIOError.self) { try await client.blockStatus(offset: 64 << 20, length: 1) }
        await client.close()

        // Without structured replies (nbdkit --no-sr): no block status, reads as before.
        let plain = try await NBDKit(["--no-sr"], plugin: ["memory", "16M"])
        let old = try await NBDClient.connect(unixSocket: plain.socket, export: "", allocation: true)
        #expect(!old.canBlockStatus)
        let refused = await #expect(throws: VolumeIOError.self) { try await old.blockStatus(offset: 0, length: 4096) }
        #expect(refused?.errno == EOPNOTSUPP)
        try await old.write(offset: 4096, data: Self.pattern(5, count: 4096))
        #expect(try await old.read(offset: 4096, length: 4096) == Self.pattern(5, count: 4096))
        await old.close()

        // Ferry's own export of a sparse file.
        let ferry = try await NBDExportTests.Export(size: 32 << 20)
        let writer = try await NBDClient.connect(unixSocket: ferry.socket, export: "vol", allocation: true)
        #expect(writer.canBlockStatus)
        try await writer.write(offset: 3 << 20, data: Self.pattern(6, count: 1 << 20))
        try await writer.flush()
        #expect(try await Self.allocationMap(writer) == [[0, 3 << 20, 1], [3 << 20, 1 << 20, 0], [4 << 20, 28 << 20, 1]])
        #expect(try await writer.read(offset: 3 << 20, length: 1 << 20) == Self.pattern(6, count: 1 << 20))
        await writer.close()
    }

    @Test("what the server offers is honoured: a 1 MiB maximum splits requests; no WRITE_ZEROES means zero writes; errors carry the errno")
    func serverConstraints() async throws {
        let dir = try TestDirectory("ferry-nbdc")
        // An advertised maximum, enforced: a request over it would fail with EINVAL.
        let small = try await NBDKit(["--filter=blocksize-policy"],
                                     plugin: ["memory", "16M", "blocksize-maximum=1M", "blocksize-error-policy=error"], dir: dir)
        let a = try await NBDClient.connect(unixSocket: small.socket, export: "")
        #expect(a.maximumRequestSize == 1 << 20)
        let data = Self.pattern(7, count: (5 << 20) + 123)
        try await a.write(offset: 1000, data: data)
        #expect(try await a.read(offset: 1000, length: data.readableBytes) == data)
        try await a.writeZeroes(offset: 1000, length: 3 << 20)
        #expect(Self.isZero(try await a.read(offset: 1000, length: 3 << 20)))
        await a.close()

        // No WRITE_ZEROES advertised: zeroes are written as data.
        let noZero = try await NBDKit(["--filter=nozero"], plugin: ["memory", "16M"], dir: dir)
        let b = try await NBDClient.connect(unixSocket: noZero.socket, export: "")
        #expect(!b.canWriteZeroes)
        try await b.write(offset: 0, data: Self.pattern(8, count: 2 << 20))
        try await b.writeZeroes(offset: 4096, length: (1 << 20) + 5, fua: true)
        let back = try await b.read(offset: 0, length: 2 << 20)
        #expect(back.getSlice(at: 0, length: 4096) == Self.pattern(8, count: 4096))
        #expect(Self.isZero(back.getSlice(at: 4096, length: (1 << 20) + 5)!))
        #expect(back.getInteger(at: 4096 + (1 << 20) + 5, as: UInt8.self) == Self.pattern(8, count: 2 << 20).getInteger(at: 4096 + (1 << 20) + 5, as: UInt8.self))
        await b.close()

        // Every write fails with ENOSPC on the server: each request says so; reads still work.
        let failing = try await NBDKit(["--filter=error"], plugin: ["memory", "16M", "error-pwrite=ENOSPC", "error-pwrite-rate=100%"], dir: dir)
        let c = try await NBDClient.connect(unixSocket: failing.socket, export: "")
        for _ in 0..<3 {
            do {
                try await c.write(offset: 0, data: Self.pattern(9, count: 4096))
                Issue.record("a write the server fails succeeded")
            } catch let error as VolumeIOError {
                #expect(error.errno == ENOSPC, "\(error)")
            }
        }
        #expect(Self.isZero(try await c.read(offset: 0, length: 4096)))
        #expect(c.isConnected)
        await c.close()

        // A read-only export: writes fail with EPERM before anything is sent.
        let readOnly = try await NBDKit(["--readonly"], plugin: ["memory", "1M"], dir: dir)
        let d = try await NBDClient.connect(unixSocket: readOnly.socket, export: "")
        #expect(d.isReadOnly)
        do {
            try await d.writeZeroes(offset: 0, length: 512)
            Issue.record("zeroing a read-only export succeeded")
        } catch let error as VolumeIOError {
            #expect(error.errno == EPERM)
        }
        await d.close()
        for server in [small, noZero, failing, readOnly] { await server.stop() }
    }

    // MARK: 2. TLS

    @Test("nbdkit --tls=require: works with the right CA; a wrong CA, a plaintext-only server, and no TLS each fail clearly")
    func tls() async throws {
        let dir = try TestDirectory("ferry-nbdc-tls")
        let pki = dir.sub("pki"), otherPKI = dir.sub("other")
        try await Self.makeCertificates(in: pki)
        try await Self.makeCertificates(in: otherPKI)
        let secure = try await NBDKit(["--tls=require", "--tls-certificates=\(pki)"], plugin: ["memory", "32M"], dir: dir)

        let client = try await NBDClient.connect(unixSocket: secure.socket, export: "", tls: try Self.tls(trusting: pki + "/ca-cert.pem"))
        #expect(client.size == 32 << 20)
        let data = Self.pattern(11, count: 3 << 20)
        try await client.write(offset: 12345, data: data)
        #expect(try await client.read(offset: 12345, length: data.readableBytes) == data)
        try await client.writeZeroes(offset: 12345, length: 1 << 20)
        try await client.flush()
        #expect(Self.isZero(try await client.read(offset: 12345, length: 1 << 20)))
        await client.close()
        #expect(!client.isConnected)

        // A CA that did not sign the server's certificate.
        do {
            _ = try await NBDClient.connect(unixSocket: secure.socket, export: "", tls: try Self.tls(trusting: otherPKI + "/ca-cert.pem"))
            Issue.record("connected with a CA that does not trust the server")
        } catch let error as FerryError {
            #expect(error.code == .unauthenticated && error.message.contains("TLS handshake"), "\(error)")
        }

        // No TLS asked of a server that requires it.
        do {
            _ = try await NBDClient.connect(unixSocket: secure.socket, export: "")
            Issue.record("connected in plaintext to a TLS-only server")
        } catch let error as FerryError {
            #expect(error.code == .permissionDenied && error.message.contains("requires TLS"), "\(error)")
        }

        // TLS asked of servers that offer none: nbdkit without --tls, and Ferry's local export.
        let plain = try await NBDKit(plugin: ["memory", "1M"], dir: dir)
        do {
            _ = try await NBDClient.connect(unixSocket: plain.socket, export: "", tls: try Self.tls(trusting: pki + "/ca-cert.pem"))
            Issue.record("TLS was requested and a plaintext server was accepted")
        } catch let error as FerryError {
            #expect(error.code == .unsupported && error.message.contains("refused STARTTLS"), "\(error)")
        }
        let ferry = try await FerryExport(size: 1 << 20, dir: dir)
        do {
            _ = try await NBDClient.connect(unixSocket: ferry.socket, export: "mem", tls: try Self.tls(trusting: pki + "/ca-cert.pem"))
            Issue.record("TLS was requested and Ferry's plaintext export was accepted")
        } catch let error as FerryError {
            #expect(error.code == .unsupported && error.message.contains("TLS is not offered"), "\(error)")
        }
        await secure.stop()
        await plain.stop()
    }

    @Test("the controller's point-in-time export over STARTTLS with the agent's certificate reads back the point; without a client certificate it is refused")
    func controllerPointExport() async throws {
        let points = RecoveryPointTests()
        let c = try await points.cluster(["db": ["data"]], controllerArguments: ["--nbd-tls-listen", "127.0.0.1:0"])
        defer {
            for agent in c.agents.values { agent.signal(SIGTERM) }
            c.controller.process.signal(SIGTERM)
        }
        let w = try await run("/usr/bin/qemu-io", ["-f", "raw", "-t", "none", "-c", "write -P 0x5a 1M 2M", c.uris["db/data"]!])
        #expect(w.status == 0, "\(w)")
        var r = try await c.controller.ctl("group", "create", "g", "--volume", "db/data", "--crash-interval", "0", "--app-interval", "0",
                                          // Not a timing test: a loaded machine must not abort the cut.
                                          "--hold-budget", "2s")
        #expect(r.status == 0, "\(r)")
        // A cut aborts when a member answers past the hold budget (a busy machine): try again.
        for _ in 0..<10 {
            r = try await c.controller.ctl("point", "create", "g")
            if r.status == 0 || !r.stderr.contains("hold budget") { break }
        }
        #expect(r.status == 0, "\(r)")
        let point = r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(try await eventually(timeout: .seconds(20)) { try await points.points(c.controller, "g").allSatisfy { $0.complete } })
        let export = try await points.export(c.controller, "db/data", point: point, for: ["db"])
        let address = try String(contentsOfFile: c.controller.dataDir + "/nbd-tls-listen.addr", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let colon = try #require(address.lastIndex(of: ":"))
        let host = String(address[..<colon]), port = try #require(Int(address[address.index(after: colon)...]))

        // The agent's own identity; the controller's certificate names it ControllerIdentity.serverName.
        let agentDir = c.dir.path + "/agent-db"
        let ca = try NIOSSLCertificate.fromPEMFile(agentDir + "/ca.pem")
        let context = try NBDClientTLS.makeContext(trustRoots: ca, certificateChain: try NIOSSLCertificate.fromPEMFile(agentDir + "/agent.pem"),
                                                   privateKey: try NIOSSLPrivateKey(file: agentDir + "/agent.key", format: .pem))
        let tls = NBDClientTLS(context: context, serverHostname: ControllerIdentity.serverName)
        let client = try await NBDClient.connect(host: host, port: port, export: export.id, tls: tls)
        let source = try #require(FileManager.default.contents(atPath: c.images["db/data"]!))
        #expect(client.size == UInt64(source.count))
        let image = try await client.read(offset: 0, length: Int(client.size))
        #expect(Data(image.readableBytesView) == source)
        #expect(image.getInteger(at: 1 << 20, as: UInt8.self) == 0x5A)
        await client.close()

        // No client certificate: refused (with TLS 1.3, only once the handshake is over).
        do {
            let anonymous = NBDClientTLS(context: try NBDClientTLS.makeContext(trustRoots: ca), serverHostname: ControllerIdentity.serverName)
            let refused = try await NBDClient.connect(host: host, port: port, export: export.id, tls: anonymous)
            Issue.record("opened a point export without a client certificate")
            await refused.close()
        } catch let error as FerryError {
            #expect(error.code == .unauthenticated && error.message.contains("TLS"), "\(error)")
        }
    }

    // MARK: 3. Ferry's NBDServer, blocking API from plain threads

    /// An in-memory export for Ferry's NBDServer.
    final class MemoryExport: NBDExport {
        let name: String
        let size: UInt64
        let isReadOnly = false
        private let bytes: Mutex<[UInt8]>

        init(name: String, size: Int) {
            self.name = name
            self.size = UInt64(size)
            bytes = Mutex([UInt8](repeating: 0, count: size))
        }

        func performNow(_ op: NBDOperation, allocator: ByteBufferAllocator) -> Result<ByteBuffer?, VolumeIOError> {
            switch op {
            case .read(let offset, let length):
                return .success(bytes.withLock { allocator.buffer(bytes: $0[Int(offset)..<Int(offset) + length]) })
            case .write(let offset, let data, _):
                bytes.withLock { $0.replaceSubrange(Int(offset)..<Int(offset) + data.readableBytes, with: data.readableBytesView) }
                return .success(nil)
            case .zero(let offset, let length, _):
                bytes.withLock { $0.replaceSubrange(Int(offset)..<Int(offset) + Int(length), with: repeatElement(0, count: Int(length))) }
                return .success(nil)
            case .flush:
                return .success(nil)
            }
        }
    }

    /// Ferry's NBDServer serving one MemoryExport ("mem") on a unix socket and on loopback TCP.
    final class FerryExport: Sendable {
        let dir: TestDirectory
        let socket: String
        let port: Int
        let serving: [Task<Void, any Error>]

        init(size: Int, dir: TestDirectory? = nil) async throws {
            self.dir = try dir ?? TestDirectory("ferry-nbdc-ferry")
            socket = self.dir.file("ferry-\(UUID().uuidString.prefix(8)).sock")
            let server = NBDServer(volumes: [MemoryExport(name: "mem", size: size)], logger: Logger(label: "nbd-client-test"))
            let ready = AsyncStream<Int>.makeStream()
            let socket = self.socket
            serving = [
                Task { try await server.serve(unixSocket: socket, onReady: { ready.continuation.yield(0) }) },
                Task { try await server.serve(host: "127.0.0.1", port: 0, onReady: { ready.continuation.yield($0) }) },
            ]
            var port = 0, seen = 0
            for await p in ready.stream {
                if p != 0 { port = p }
                seen += 1
                if seen == 2 { break }
            }
            self.port = port
        }

        deinit { for task in serving { task.cancel() } }
    }

    @Test("Ferry's NBDServer over TCP: the blocking API from 8 plain threads at once, one connection; unknown export names fail clearly")
    func blockingFromThreads() async throws {
        let export = try await FerryExport(size: 48 << 20)
        let client = try await NBDClient.connect(host: "127.0.0.1", port: export.port, export: "mem")
        #expect(client.size == 48 << 20)
        #expect(client.maximumRequestSize == 32 << 20)

        let failures = Failures()
        let threads = 8, rounds = 40
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            let group = DispatchGroup()
            for t in 0..<threads {
                group.enter()
                Thread {
                    defer { group.leave() }
                    // Each thread owns 1 MiB; requests of every kind interleave on the connection.
                    let base = UInt64(t) << 20
                    do {
                        for round in 0..<rounds {
                            let length = 4096 * (1 + (round % 16))
                            let data = Self.pattern(t * 1000 + round, count: length)
                            let offset = base + UInt64((round * 4096) % (512 << 10))
                            try client.writeBlocking(offset: offset, data: data, fua: round % 5 == 0)
                            let back = try client.readBlocking(offset: offset, length: length)
                            if back != data { failures.add("thread \(t) round \(round): data differs") }
                            try client.writeZeroesBlocking(offset: offset + 512, length: 1024)
                            if !Self.isZero(try client.readBlocking(offset: offset + 512, length: 1024)) {
                                failures.add("thread \(t) round \(round): zeroes not read back")
                            }
                            if round % 10 == 0 { try client.flushBlocking() }
                        }
                    } catch {
                        failures.add("thread \(t): \(error)")
                    }
                }.start()
            }
            group.notify(queue: .global()) { done.resume() }
        }
        #expect(failures.all == [])

        // One read larger than the server's 32 MiB maximum, split.
        let big = Self.pattern(5, count: 40 << 20)
        try await client.write(offset: 8 << 20, data: big)
        #expect(try await client.read(offset: 8 << 20, length: 40 << 20) == big)
        await client.close()

        do {
            _ = try await NBDClient.connect(unixSocket: export.socket, export: "nonesuch")
            Issue.record("an unknown export was opened")
        } catch let error as FerryError {
            // The server's own text comes through.
            #expect(error.code == .notFound && error.message.contains("no export named 'nonesuch'"), "\(error)")
        }
        do {
            _ = try await NBDClient.connect(unixSocket: export.dir.file("missing.sock"), export: "mem")
            Issue.record("connected to a socket that does not exist")
        } catch let error as FerryError {
            #expect(error.code == .unavailable && error.message.contains("cannot connect"), "\(error)")
        }
    }

    // MARK: 4. The server going away

    @Test("nbdkit killed with requests outstanding (plain and TLS): all fail promptly with 'connection lost', later ones too", arguments: [false, true])
    func serverKilled(useTLS: Bool) async throws {
        let dir = try TestDirectory("ferry-nbdc-kill")
        var arguments = ["--filter=delay"]
        var tls: NBDClientTLS?
        if useTLS {
            let pki = dir.sub("pki")
            try await Self.makeCertificates(in: pki)
            arguments += ["--tls=require", "--tls-certificates=\(pki)"]
            tls = try Self.tls(trusting: pki + "/ca-cert.pem")
        }
        // Reads take a minute: only the connection's end can finish them within the bound below.
        let server = try await NBDKit(arguments, plugin: ["memory", "16M", "rdelay=60"], dir: dir)
        let client = try await NBDClient.connect(unixSocket: server.socket, export: "", tls: tls)
        let outcomes = Outcomes()
        for i in 0..<8 {
            outcomes.start { _ = try await client.read(offset: UInt64(i) * 4096, length: 4096) }
        }
        try await Task.sleep(for: .milliseconds(300))
        #expect(outcomes.count == 0)
        let killed = ContinuousClock.now
        await server.stop()
        let finished = await eventually(timeout: .seconds(10), every: .milliseconds(20)) { outcomes.count == 8 }
        #expect(finished, "outstanding requests did not fail within 10 s of the server's death")
        #expect(ContinuousClock.now - killed < .seconds(15))
        for outcome in outcomes.all {
            guard case .failure(let error) = outcome, let error = error as? FerryError else {
                Issue.record("expected a FerryError, got \(outcome)")
                continue
            }
            #expect(error.code == .unavailable && error.message.contains("lost"), "\(error)")
        }
        #expect(!client.isConnected)
        do {
            try await client.write(offset: 0, data: Self.pattern(1, count: 512))
            Issue.record("a write after the connection was lost succeeded")
        } catch let error as FerryError {
            #expect(error.code == .unavailable && error.message.contains("lost"), "\(error)")
        }
        await client.close()
    }

    // MARK: 5. Fake servers that misbehave

    /// A one-connection NBD server on a unix socket, served by a plain thread with POSIX calls:
    /// it negotiates (GO for any name), then hands the connection to a scenario.
    final class FakeServer: Sendable {
        enum Scenario: Sendable {
            /// Answer the second request with a bad magic.
            case badMagic
            /// Answer the first request with a handle no request has.
            case unknownHandle
            /// Read the first request, then close.
            case closeMidRequest
            /// Send the greeting, then nothing.
            case silentAfterGreeting
            /// Read four READ requests, then answer them last first, each with its offset's
            /// block number as data.
            case answersInReverse
        }

        let socket: String
        private let fds = Mutex<(listener: Int32, connection: Int32)>((-1, -1))
        /// Set once the client has closed the connection (the fake server read end of stream).
        let clientClosed = Mutex(false)
        let requestsSeen = Mutex(0)

        init(_ scenario: Scenario, dir: TestDirectory) throws {
            socket = dir.file("fake-\(UUID().uuidString.prefix(8)).sock")
            let listener = socket_(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(socket.utf8)) }
            let bound = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            guard listener >= 0, bound == 0, listen(listener, 4) == 0 else { throw FerryError(.io, "fake server cannot listen on \(socket)") }
            fds.withLock { $0.listener = listener }
            Thread { [self] in serve(listener, scenario) }.start()
        }

        private func serve(_ listener: Int32, _ scenario: Scenario) {
            let fd = accept(listener, nil, nil)
            guard fd >= 0 else { return }
            fds.withLock { $0.connection = fd }
            defer {
                fds.withLock { fds in
                    if fds.connection >= 0 { close(fds.connection); fds.connection = -1 }
                }
            }
            do {
                var greeting = ByteBuffer()
                greeting.writeInteger(NBD.initMagic)
                greeting.writeInteger(NBD.optionMagic)
                greeting.writeInteger(NBD.HandshakeFlag.fixedNewstyle | NBD.HandshakeFlag.noZeroes)
                try send(fd, greeting)
                if case .silentAfterGreeting = scenario {
                    waitForClose(fd)
                    return
                }
                _ = try receive(fd, 4)
                while true {
                    var header = try receive(fd, 16)
                    header.moveReaderIndex(forwardBy: 8)
                    let option = header.readInteger(as: UInt32.self)!
                    _ = try receive(fd, Int(header.readInteger(as: UInt32.self)!))
                    if option == NBD.Option.go.rawValue {
                        var info = ByteBuffer()
                        info.writeInteger(NBD.Info.export)
                        info.writeInteger(UInt64(1 << 20))
                        info.writeInteger(NBD.TransmissionFlag.hasFlags | NBD.TransmissionFlag.sendFlush)
                        try send(fd, optionReply(option, NBD.Reply.info, info))
                        try send(fd, optionReply(option, NBD.Reply.ack, ByteBuffer()))
                        break
                    }
                    try send(fd, optionReply(option, NBD.Reply.errUnsupported, ByteBuffer()))
                }
                if case .answersInReverse = scenario {
                    var requests: [NBDRequest] = []
                    for _ in 0..<4 {
                        var header = try receive(fd, NBDRequest.size)
                        requests.append(try NBDRequest(parsing: &header))
                    }
                    requestsSeen.withLock { $0 += 4 }
                    for request in requests.reversed() {
                        var reply = simpleReply(magic: NBD.simpleReplyMagic, cookie: request.cookie)
                        reply.writeRepeatingByte(UInt8(request.offset / 512), count: Int(request.length))
                        try send(fd, reply)
                    }
                    waitForClose(fd)
                    return
                }
                var first = try receive(fd, NBDRequest.size)
                let firstRequest = try NBDRequest(parsing: &first)
                requestsSeen.withLock { $0 += 1 }
                switch scenario {
                case .closeMidRequest:
                    return // the deferred close
                case .unknownHandle:
                    try send(fd, simpleReply(magic: NBD.simpleReplyMagic, cookie: firstRequest.cookie &+ 1000))
                case .badMagic:
                    var second = try receive(fd, NBDRequest.size)
                    let secondRequest = try NBDRequest(parsing: &second)
                    requestsSeen.withLock { $0 += 1 }
                    try send(fd, simpleReply(magic: 0xDEAD_BEEF, cookie: secondRequest.cookie))
                case .silentAfterGreeting, .answersInReverse:
                    break
                }
                waitForClose(fd)
            } catch {
                waitForClose(fd)
            }
        }

        /// Reads until the client closes (whatever it sends is dropped).
        private func waitForClose(_ fd: Int32) {
            var scratch = [UInt8](repeating: 0, count: 65536)
            while recv(fd, &scratch, scratch.count, 0) > 0 {}
            clientClosed.withLock { $0 = true }
        }

        private func optionReply(_ option: UInt32, _ type: UInt32, _ data: ByteBuffer) -> ByteBuffer {
            var b = ByteBuffer()
            b.writeInteger(NBD.optionReplyMagic)
            b.writeInteger(option)
            b.writeInteger(type)
            b.writeInteger(UInt32(data.readableBytes))
            b.writeImmutableBuffer(data)
            return b
        }

        private func simpleReply(magic: UInt32, cookie: UInt64) -> ByteBuffer {
            var b = ByteBuffer()
            b.writeInteger(magic)
            b.writeInteger(UInt32(0))
            b.writeInteger(cookie)
            return b
        }

        private func send(_ fd: Int32, _ buffer: ByteBuffer) throws {
            let ok = buffer.withUnsafeReadableBytes { bytes -> Bool in
                var sent = 0
                while sent < bytes.count {
                    let n = Glibc.send(fd, bytes.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL))
                    if n <= 0 { return false }
                    sent += n
                }
                return true
            }
            if !ok { throw FerryError(.io, "fake server: send failed") }
        }

        private func receive(_ fd: Int32, _ count: Int) throws -> ByteBuffer {
            var buffer = ByteBufferAllocator().buffer(capacity: count)
            while buffer.readableBytes < count {
                let want = count - buffer.readableBytes
                let n = buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: want) { out in
                    max(0, recv(fd, out.baseAddress, want, 0))
                }
                if n == 0 { throw FerryError(.io, "fake server: the client went away") }
            }
            return buffer
        }

        /// Ends the fake server: wakes its thread whatever it is blocked in.
        func stop() {
            fds.withLock { fds in
                if fds.listener >= 0 { shutdown(fds.listener, Int32(SHUT_RDWR)); close(fds.listener); fds.listener = -1 }
                if fds.connection >= 0 { shutdown(fds.connection, Int32(SHUT_RDWR)) }
            }
        }

        deinit { stop() }
    }

    @Test("a fake server's bad reply magic, unknown handle, or close mid-request: every outstanding request fails, the client closes", arguments: [
        FakeServer.Scenario.badMagic, .unknownHandle, .closeMidRequest,
    ])
    func misbehavingServer(scenario: FakeServer.Scenario) async throws {
        let dir = try TestDirectory("ferry-nbdc-fake")
        let server = try FakeServer(scenario, dir: dir)
        defer { server.stop() }
        let client = try await NBDClient.connect(unixSocket: server.socket, export: "any")
        #expect(client.size == 1 << 20)
        let outcomes = Outcomes()
        for i in 0..<4 {
            outcomes.start { _ = try await client.read(offset: UInt64(i) * 512, length: 512) }
        }
        let finished = await eventually(timeout: .seconds(10), every: .milliseconds(20)) { outcomes.count == 4 }
        #expect(finished, "outstanding requests did not fail within 10 s")
        let expected: FerryError.Code = scenario == .closeMidRequest ? .unavailable : .protocolViolation
        for outcome in outcomes.all {
            guard case .failure(let error) = outcome, let error = error as? FerryError else {
                Issue.record("expected a FerryError, got \(outcome)")
                continue
            }
            #expect(error.code == expected, "\(error)")
            switch scenario {
            case .badMagic: #expect(error.message.contains("bad magic"), "\(error)")
            case .unknownHandle: #expect(error.message.contains("no outstanding request"), "\(error)")
            default: #expect(error.message.contains("lost"), "\(error)")
            }
        }
        #expect(!client.isConnected)
        await #expect(throws: FerryError.self) { try await client.flush() }
        if scenario != .closeMidRequest {
            // The client, not the server, ended the connection.
            #expect(await eventually(timeout: .seconds(10)) { server.clientClosed.withLock { $0 } })
        }
        await client.close()
    }

    @Test("replies in the reverse order of the requests each reach their own request")
    func outOfOrderReplies() async throws {
        let dir = try TestDirectory("ferry-nbdc-fake")
        let server = try FakeServer(.answersInReverse, dir: dir)
        defer { server.stop() }
        let client = try await NBDClient.connect(unixSocket: server.socket, export: "any")
        let results = try await withThrowingTaskGroup(of: (Int, ByteBuffer).self) { group in
            for i in 1...4 {
                group.addTask { (i, try await client.read(offset: UInt64(i) * 512, length: 512)) }
            }
            return try await group.reduce(into: [:]) { $0[$1.0] = $1.1 }
        }
        #expect(server.requestsSeen.withLock { $0 } == 4)
        for i in 1...4 {
            let data = try #require(results[i])
            #expect(data.readableBytes == 512 && data.readableBytesView.allSatisfy { $0 == UInt8(i) }, "read \(i)")
        }
        #expect(client.isConnected)
        await client.close()
        #expect(await eventually(timeout: .seconds(10)) { server.clientClosed.withLock { $0 } })
    }

    @Test("a server that stops answering during the handshake: connect fails with a timeout")
    func handshakeTimeout() async throws {
        let dir = try TestDirectory("ferry-nbdc-fake")
        let server = try FakeServer(.silentAfterGreeting, dir: dir)
        defer { server.stop() }
        let start = ContinuousClock.now
        do {
            _ = try await NBDClient.connect(unixSocket: server.socket, export: "any", timeout: .milliseconds(500))
            Issue.record("connected to a server that never answered")
        } catch let error as FerryError {
            #expect(error.code == .timeout && error.message.contains("handshake"), "\(error)")
        }
        #expect(ContinuousClock.now - start < .seconds(30))
        #expect(await eventually(timeout: .seconds(10)) { server.clientClosed.withLock { $0 } })
    }
}

/// `socket(2)`, named apart from the fixtures' `socket` properties.
private func socket_(_ domain: Int32, _ type: Int32, _ proto: Int32) -> Int32 { Glibc.socket(domain, type, proto) }
