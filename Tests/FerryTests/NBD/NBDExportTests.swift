@testable import FerryAgentCore
@testable import FerryNBD
import FerryWire
import Foundation
import Logging
import NIOCore
import NIOPosix
import Testing

/// The agent's NBD export against the real clients (nbdinfo, qemu-io, qemu-img, nbdcopy, fio),
/// over a real unix socket onto a real image file. The capture is checked by replaying it onto a
/// blank image: it must come out identical to the export.
@Suite("NBD export")
struct NBDExportTests {
    /// One export of a sparse image, served until the fixture goes away.
    final class Export: Sendable {
        let dir: TestDirectory
        let image: String
        let socket: String
        let recorder = InMemoryChangeRecorder()
        let volume: BlockVolume
        let pool: NIOThreadPool
        let serving: Task<Void, any Error>

        var uri: String { "nbd+unix:///vol?socket=\(socket)" }

        init(size: Int, maxConnections: Int = 256) async throws {
            dir = try TestDirectory("ferry-nbd")
            image = dir.file("vol.img")
            socket = dir.file("vol.sock")
            #expect(FileManager.default.createFile(atPath: image, contents: nil))
            #expect(truncate(image, off_t(size)) == 0)
            pool = NIOThreadPool(numberOfThreads: 4)
            pool.start()
            volume = try BlockVolume(name: "vol", path: image, recorder: recorder, pool: pool)
            let server = NBDServer(volumes: [volume], logger: Logger(label: "nbd-test"), maxConnections: maxConnections)
            let ready = AsyncStream<Void>.makeStream()
            let socket = self.socket
            serving = Task { try await server.serve(unixSocket: socket, onReady: { ready.continuation.yield() }) }
            for await _ in ready.stream { break }
        }

        /// Applies the captured changes, in sequence order, to a blank image of the same size.
        func replay() throws -> String {
            let path = dir.file("replay-\(UUID().uuidString).img")
            #expect(FileManager.default.createFile(atPath: path, contents: nil))
            #expect(truncate(path, off_t(volume.size)) == 0)
            let fd = open(path, O_RDWR)
            defer { close(fd) }
            var last: UInt64 = 0
            for change in recorder.changes {
                #expect(change.sequence == last + 1, "sequences are dense and increasing")
                last = change.sequence
                switch change.kind {
                case .write(let data):
                    _ = data.withUnsafeReadableBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(change.offset)) }
                case .zero(let length):
                    let zeroes = [UInt8](repeating: 0, count: Int(length))
                    _ = zeroes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(change.offset)) }
                case .resize(let size):
                    _ = ftruncate(fd, off_t(size))
                }
            }
            return path
        }

        func compareWithReplay() async throws {
            let replayed = try replay()
            let r = try await run("/usr/bin/qemu-img", ["compare", "-f", "raw", "-F", "raw", replayed, uri])
            #expect(r.status == 0 && r.stdout.contains("Images are identical"), "\(r)")
        }

        deinit {
            serving.cancel()
            try? pool.syncShutdownGracefully()
        }
    }

    @Test("nbdinfo sees the export, its size and every capability; LIST names it")
    func nbdinfo() async throws {
        let export = try await Export(size: 64 << 20)
        let r = try await run("/usr/bin/nbdinfo", ["--json", export.uri])
        #expect(r.status == 0, "\(r)")
        let info = try #require(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any])
        let first = try #require((info["exports"] as? [[String: Any]])?.first)
        #expect(first["export-size"] as? Int == 64 << 20)
        for capability in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"] {
            #expect(first[capability] as? Bool == true, "\(capability)")
        }
        #expect(first["is_read_only"] as? Bool == false)
        #expect(first["block_size_maximum"] as? Int == 32 << 20)
        let list = try await run("/usr/bin/nbdinfo", ["--list", "--json", "nbd+unix:///?socket=\(export.socket)"])
        #expect(list.status == 0 && list.stdout.contains("\"export-name\": \"vol\""), "\(list)")
    }

    @Test("block status (base:allocation): nbdinfo --map and qemu-img map see exactly the written ranges as data and the file's holes as zero holes")
    func blockStatus() async throws {
        let export = try await Export(size: 64 << 20)
        let w = try await run("/usr/bin/qemu-io", ["-f", "raw", export.uri, "-c", "write -P 0x61 4M 1M", "-c", "write -P 0x62 40M 64k", "-c", "flush"])
        #expect(w.status == 0, "\(w)")
        let expected: [(offset: Int, length: Int, data: Bool)] = [
            (0, 4 << 20, false), (4 << 20, 1 << 20, true), (5 << 20, 35 << 20, false),
            (40 << 20, 64 << 10, true), ((40 << 20) + (64 << 10), (24 << 20) - (64 << 10), false),
        ]
        let map = try await Self.nbdinfoMap(export.uri)
        #expect(map.map { [$0.offset, $0.length, $0.data ? 1 : 0] } == expected.map { [$0.offset, $0.length, $0.data ? 1 : 0] }, "\(map)")
        let q = try await Self.qemuImgMap(export.uri)
        #expect(q.map { [$0.offset, $0.length, $0.data ? 1 : 0] } == expected.map { [$0.offset, $0.length, $0.data ? 1 : 0] }, "\(q)")
        // The data still reads back where the map says it is.
        let r = try await run("/usr/bin/qemu-io", ["-f", "raw", export.uri, "-c", "read -P 0x61 4M 1M", "-c", "read -P 0x62 40M 64k", "-c", "read -P 0 5M 1M"])
        #expect(r.status == 0 && !r.stdout.contains("Pattern verification failed"), "\(r)")
    }

    /// `nbdinfo --map` (libnbd's block status): runs of data and of zero holes, merged.
    static func nbdinfoMap(_ uri: String) async throws -> [(offset: Int, length: Int, data: Bool)] {
        let r = try await run("/usr/bin/nbdinfo", ["--map=base:allocation", "--json", uri])
        #expect(r.status == 0, "\(r)")
        let runs = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [[String: Any]] ?? []
        return merged(runs.map { ($0["offset"] as? Int ?? -1, $0["length"] as? Int ?? -1, ($0["type"] as? Int ?? -1) & 2 == 0) })
    }

    /// `qemu-img map` (qemu's NBD client asks block status too).
    static func qemuImgMap(_ uri: String) async throws -> [(offset: Int, length: Int, data: Bool)] {
        let r = try await run("/usr/bin/qemu-img", ["map", "-f", "raw", "--output=json", uri])
        #expect(r.status == 0, "\(r)")
        let runs = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [[String: Any]] ?? []
        return merged(runs.map { ($0["start"] as? Int ?? -1, $0["length"] as? Int ?? -1, $0["data"] as? Bool ?? true) })
    }

    static func merged(_ runs: [(Int, Int, Bool)]) -> [(offset: Int, length: Int, data: Bool)] {
        var out: [(offset: Int, length: Int, data: Bool)] = []
        for (offset, length, data) in runs {
            if let last = out.last, last.data == data, last.offset + last.length == offset {
                out[out.count - 1].length += length
            } else {
                out.append((offset, length, data))
            }
        }
        return out
    }

    @Test("qemu-io writes, zeroes, discards and flushes; every change is captured in order")
    func qemuIO() async throws {
        let export = try await Export(size: 32 << 20)
        let r = try await run("/usr/bin/qemu-io", ["-f", "raw", export.uri,
            "-c", "write -P 0xab 0 1M", "-c", "write -P 0x11 512k 8k", "-c", "write -z 256k 4k",
            "-c", "discard 768k 64k", "-c", "flush", "-c", "read -P 0xab 0 256k", "-c", "read -P 0x11 512k 8k",
            "-c", "read -P 0 256k 4k", "-c", "write -P 0xcd 31M 1M"])
        #expect(r.status == 0 && !r.stdout.contains("Pattern verification failed"), "\(r)")
        #expect(export.recorder.changes.count == 5)
        try await export.compareWithReplay()
    }

    @Test("fio's nbd engine with verify=crc32c, random and sequential, several jobs at once")
    func fio() async throws {
        let export = try await Export(size: 128 << 20)
        for (rw, bs) in [("randwrite", "4k"), ("write", "1M")] {
            let r = try await run("/usr/bin/fio", [
                "--name=ferry", "--ioengine=nbd", "--uri=\(export.uri)", "--rw=\(rw)", "--bs=\(bs)", "--size=48M",
                "--iodepth=16", "--numjobs=2", "--offset_increment=64M", "--verify=crc32c", "--verify_state_save=0", "--do_verify=1",
                "--end_fsync=1", "--group_reporting",
            ], timeout: .seconds(240))
            // fio exits non-zero on any verify mismatch or I/O error.
            #expect(r.status == 0, "\(rw): \(r)")
        }
        try await export.compareWithReplay()
    }

    @Test("nbdcopy in and out (two connections, MULTI_CONN) round-trips a file exactly")
    func nbdcopy() async throws {
        let export = try await Export(size: 24 << 20)
        let source = export.dir.file("source.img")
        let random = try #require(FileHandle(forReadingAtPath: "/dev/urandom")).readData(ofLength: 24 << 20)
        try random.write(to: URL(fileURLWithPath: source))
        let into = try await run("/usr/bin/nbdcopy", ["--flush", source, export.uri])
        #expect(into.status == 0, "\(into)")
        let out = export.dir.file("out.img")
        let back = try await run("/usr/bin/nbdcopy", [export.uri, out])
        #expect(back.status == 0, "\(back)")
        #expect(FileManager.default.contentsEqual(atPath: source, andPath: out))
        try await export.compareWithReplay()
    }

    @Test("the loopback TCP listener serves the same export to qemu-io and nbdinfo")
    func loopbackTCP() async throws {
        let export = try await Export(size: 8 << 20)
        let server = NBDServer(volumes: [export.volume], logger: Logger(label: "nbd-tcp-test"))
        let bound = AsyncStream<Int>.makeStream()
        let serving = Task { try await server.serve(host: "127.0.0.1", port: 0, onReady: { bound.continuation.yield($0) }) }
        defer { serving.cancel() }
        var port = 0
        for await p in bound.stream { port = p; break }
        #expect(port > 0)
        let uri = "nbd://127.0.0.1:\(port)/vol"
        let r = try await run("/usr/bin/qemu-io", ["-f", "raw", uri, "-c", "write -P 0x7e 0 64k", "-c", "read -P 0x7e 0 64k"])
        #expect(r.status == 0 && !r.stdout.contains("Pattern verification failed"), "\(r)")
        let info = try await run("/usr/bin/nbdinfo", ["--size", uri])
        #expect(info.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "\(8 << 20)", "\(info)")
        // Both listeners capture into the same log: one write so far.
        #expect(export.recorder.changes.count == 1)
        try await export.compareWithReplay()
    }
}
