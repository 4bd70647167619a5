import FerryWire
import Foundation
import Logging
import NIOCore
import Synchronization

/// Entry points for the fuzz targets in deploy/fuzz and their regression tests: each feeds
/// arbitrary bytes to the real parser, the way a peer would, and traps if an invariant breaks.
public enum NBDFuzzing {
    /// Exports the fuzzed server offers: a writable one and a read-only one.
    static let exportSize: UInt64 = 16 << 10

    /// Plays `input` as everything an NBD client sends to the server (negotiation, then
    /// transmission) over a socket pair, reading the server's replies until it closes.
    public static func server(_ input: [UInt8]) {
        var fds: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            fatalError("socketpair: \(String(cString: strerror(errno)))")
        }
        let (client, serverSide) = (fds[0], fds[1])
        let server = NBDServer(volumes: [MemoryExport(name: "disk", size: exportSize, readOnly: false),
                                         MemoryExport(name: "ro", size: exportSize, readOnly: true)],
                               logger: Logger(label: "fuzz", factory: { _ in SwiftLogNoOpLogHandler() }))
        // The client writes and reads in one thread (poll), so neither side can block the other.
        let peerDone = DispatchSemaphore(value: 0)
        let thread = Thread {
            playClient(client, input)
            peerDone.signal()
        }
        thread.start()
        server.handle(serverSide)
        close(serverSide)
        peerDone.wait()
        close(client)
    }

    /// Sends `input`, then half-closes, reading (and dropping) replies until the server closes.
    private static func playClient(_ fd: Int32, _ input: [UInt8]) {
        var sent = 0
        var sink = [UInt8](repeating: 0, count: 16 << 10)
        if input.isEmpty { shutdown(fd, Int32(SHUT_WR)) }
        while true {
            var p = pollfd(fd: fd, events: Int16(POLLIN) | (sent < input.count ? Int16(POLLOUT) : 0), revents: 0)
            guard poll(&p, 1, -1) >= 0 else {
                if errno == EINTR { continue }
                return
            }
            if p.revents & Int16(POLLOUT) != 0, sent < input.count {
                let n = input.withUnsafeBytes { send(fd, $0.baseAddress! + sent, input.count - sent, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT)) }
                if n > 0 {
                    sent += n
                    if sent == input.count { shutdown(fd, Int32(SHUT_WR)) }
                } else if n < 0, errno != EAGAIN, errno != EINTR {
                    sent = input.count // the server went away: keep reading what it said
                }
            }
            if p.revents & (Int16(POLLIN) | Int16(POLLHUP) | Int16(POLLERR)) != 0 {
                let n = recv(fd, &sink, sink.count, Int32(MSG_DONTWAIT))
                if n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR) { return }
            }
        }
    }

    /// Plays `input` as everything an NBD server sends to the client on `channel`, which must
    /// be an `EmbeddedChannel` (everything runs on the caller's thread). The first byte picks
    /// how the rest is cut into reads; once negotiated, the client submits a few requests (a
    /// DISC after them when bit 3 of the first byte is set). With bit 4 set the client asks for
    /// structured replies and `base:allocation` first, and its last request is a block status. Traps unless every request and the
    /// negotiation have their outcome once the channel is closed.
    public static func client(_ input: [UInt8], channel: any Channel) throws {
        let state = NBDClientConnectionState()
        let negotiated = channel.eventLoop.makePromise(of: NBDNegotiatedExport.self)
        let allocation = (input.first ?? 0) & 0x10 != 0
        let handler = NBDClientHandler(export: "disk", allocation: allocation, tls: nil, peer: "fuzz", state: state, negotiated: negotiated,
                                       deadline: .now() + .hours(1), timeout: .hours(1))
        try channel.pipeline.syncOperations.addHandler(handler)
        channel.pipeline.fireChannelActive()

        let outcomes = Counter()
        negotiated.futureResult.whenComplete { _ in outcomes.add() }
        let chunkSizes = [1, 3, 7, 16, 64, 512, 4096, Int.max]
        let first = input.first ?? 0
        let chunk = chunkSizes[Int(first & 7)]
        var rest = input.dropFirst()
        var submitted = 0
        let ready = Counter()
        negotiated.futureResult.whenSuccess { _ in ready.add() }
        while !rest.isEmpty || submitted == 0 {
            if !rest.isEmpty {
                let piece = rest.prefix(chunk)
                rest = rest.dropFirst(piece.count)
                channel.pipeline.fireChannelRead(ByteBuffer(bytes: piece))
            }
            if ready.value > 0, submitted == 0 {
                for request in requests(channel.eventLoop, blockStatus: allocation) {
                    request.promise.futureResult.whenComplete { _ in outcomes.add() }
                    channel.writeAndFlush(NBDClientCommand.request(request), promise: nil)
                    submitted += 1
                }
                if first & 8 != 0 { channel.writeAndFlush(NBDClientCommand.disconnect, promise: nil) }
            }
            if rest.isEmpty { break }
        }
        channel.close(promise: nil)
        precondition(outcomes.value == 1 + submitted, "\(1 + submitted - outcomes.value) NBD client promises left pending after the connection closed")
    }

    /// The requests a negotiated client submits: handles 1 to 5 (6: block status), in this order.
    private static func requests(_ loop: any EventLoop, blockStatus: Bool) -> [NBDClientRequest] {
        return [
            NBDClientRequest(command: .read, flags: 0, offset: 0, length: 512, payload: nil, promise: loop.makePromise()),
            NBDClientRequest(command: .write, flags: 0, offset: 512, length: 512, payload: ByteBuffer(repeating: 1, count: 512), promise: loop.makePromise()),
            NBDClientRequest(command: .flush, flags: 0, offset: 0, length: 0, payload: nil, promise: loop.makePromise()),
            NBDClientRequest(command: .writeZeroes, flags: 0, offset: 0, length: 4096, payload: nil, promise: loop.makePromise()),
            NBDClientRequest(command: .read, flags: 0, offset: 4096, length: 8192, payload: nil, promise: loop.makePromise()),
        ] + (blockStatus ? [NBDClientRequest(command: .blockStatus, flags: 0, offset: 0, length: 65536, payload: nil, promise: loop.makePromise())] : [])
    }

    private final class Counter: Sendable {
        private let count = Atomic<Int>(0)
        func add() { count.add(1, ordering: .relaxed) }
        var value: Int { count.load(ordering: .relaxed) }
    }
}

/// An export held in memory, for the fuzzed server.
private final class MemoryExport: NBDExport {
    let name: String
    let size: UInt64
    let isReadOnly: Bool
    private let bytes: Mutex<[UInt8]>

    init(name: String, size: UInt64, readOnly: Bool) {
        self.name = name
        self.size = size
        isReadOnly = readOnly
        bytes = Mutex([UInt8](repeating: 0, count: Int(size)))
    }

    func performNow(_ op: NBDOperation, allocator: ByteBufferAllocator) -> Result<ByteBuffer?, VolumeIOError> {
        // The server checked the bounds; a range outside the export here is the server's bug.
        bytes.withLock { b in
            switch op {
            case .read(let offset, let length):
                return .success(allocator.buffer(bytes: b[Int(offset)..<Int(offset) + length]))
            case .write(let offset, let data, _):
                b.replaceSubrange(Int(offset)..<Int(offset) + data.readableBytes, with: data.readableBytesView)
                return .success(nil)
            case .zero(let offset, let length, _):
                b.replaceSubrange(Int(offset)..<Int(offset) + Int(length), with: repeatElement(0, count: Int(length)))
                return .success(nil)
            case .flush:
                return .success(nil)
            }
        }
    }
}
