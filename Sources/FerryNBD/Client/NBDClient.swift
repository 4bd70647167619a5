import FerryWire
import Foundation
import NIOCore
import NIOPosix
import NIOSSL

/// TLS for an NBD connection: NBD_OPT_STARTTLS, then NIOSSL in front of the connection.
public struct NBDClientTLS: Sendable {
    /// A client context: its trust roots verify the server (`.fullVerification`); it may carry
    /// a client certificate (Ferry's point exports require one). TLS 1.3 is expected.
    public let context: NIOSSLContext
    /// The DNS name checked against the server certificate and sent as SNI (for Ferry's
    /// controller, `ControllerIdentity.serverName`, also when dialling an IP address; NIOSSL
    /// refuses an IP address here). nil skips the name check, leaving only the chain check.
    public let serverHostname: String?

    public init(context: NIOSSLContext, serverHostname: String?) {
        self.context = context
        self.serverHostname = serverHostname
    }

    /// A context for TLS 1.3 with full verification against `trustRoots`, optionally
    /// presenting a client certificate.
    public static func makeContext(
        trustRoots: [NIOSSLCertificate], certificateChain: [NIOSSLCertificate] = [], privateKey: NIOSSLPrivateKey? = nil
    ) throws -> NIOSSLContext {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.minimumTLSVersion = .tlsv13
        configuration.certificateVerification = .fullVerification
        configuration.trustRoots = .certificates(trustRoots)
        configuration.certificateChain = certificateChain.map { .certificate($0) }
        if let privateKey { configuration.privateKey = .privateKey(privateKey) }
        return try NIOSSLContext(configuration: configuration)
    }
}

/// A client of one NBD export: fixed-newstyle negotiation (optionally over STARTTLS) with
/// NBD_OPT_GO, then READ, WRITE (with FUA), WRITE_ZEROES and FLUSH with simple replies, and
/// DISC on close.
///
/// Requests from any number of tasks and threads share the one connection and are pipelined:
/// each is sent as soon as it is made and matched to its reply by handle, whatever order the
/// server answers in. Requests larger than the server's maximum (32 MiB at most) are split.
///
/// Failures:
/// - a request the server refuses throws `VolumeIOError` with the server's errno;
/// - a request outside the export, or a write to a read-only export, throws `VolumeIOError`
///   (EINVAL, ENOSPC, EPERM) without being sent;
/// - when the connection breaks (closed, reset, TLS ended uncleanly) or the server breaks the
///   protocol, every outstanding and every later request throws `FerryError` (code
///   `.unavailable` "connection lost", or `.protocolViolation`), and `isConnected` turns false.
///   There is no reconnection: make a new client.
///
/// Requests themselves have no timeout: a live server that never answers holds them until the
/// connection ends or `close()` gives up on it.
public final class NBDClient: Sendable {
    /// Size of the export in bytes.
    public let size: UInt64
    /// The server advertised NBD_FLAG_READ_ONLY: writes and zeroes fail with EPERM.
    public let isReadOnly: Bool
    /// The server advertised NBD_FLAG_SEND_FLUSH (without it `flush` has nothing to do).
    public let canFlush: Bool
    /// The server advertised NBD_FLAG_SEND_FUA (without it a FUA write is followed by a flush).
    public let canFUA: Bool
    /// The server advertised NBD_FLAG_SEND_WRITE_ZEROES (without it zeroes are written as data).
    public let canWriteZeroes: Bool
    /// The server advertised NBD_FLAG_CAN_MULTI_CONN.
    public let canMultiConn: Bool
    /// The server answers block status (`base:allocation`): asked for with `allocation: true`.
    public let canBlockStatus: Bool
    /// The server's block size constraints (NBD_INFO_BLOCK_SIZE), if it sent them: a
    /// re-export should advertise the same so its clients keep to them.
    public let minimumBlockSize: UInt32?
    public let preferredBlockSize: UInt32?
    /// The most bytes one request carries: 32 MiB, or less if the server says so.
    public let maximumRequestSize: Int

    /// Where the server is, for messages.
    let peer: String
    let channel: any Channel
    let state: NBDClientConnectionState

    /// The largest request sent without a block size advertised (the protocol's portable limit).
    public static let defaultMaximumRequestSize = 32 * 1024 * 1024
    /// How long `close` waits for outstanding requests before dropping the connection.
    static let closeGrace = TimeAmount.seconds(10)

    private init(channel: any Channel, state: NBDClientConnectionState, peer: String, export: NBDNegotiatedExport) {
        self.channel = channel
        self.state = state
        self.peer = peer
        size = export.size
        canBlockStatus = export.structured && export.allocationContext != nil
        let flags = export.transmissionFlags & NBD.TransmissionFlag.hasFlags != 0 ? export.transmissionFlags : 0
        isReadOnly = flags & NBD.TransmissionFlag.readOnly != 0
        canFlush = flags & NBD.TransmissionFlag.sendFlush != 0
        canFUA = flags & NBD.TransmissionFlag.sendFUA != 0
        canWriteZeroes = flags & NBD.TransmissionFlag.sendWriteZeroes != 0
        canMultiConn = flags & NBD.TransmissionFlag.canMultiConn != 0
        minimumBlockSize = export.minimumBlockSize
        preferredBlockSize = export.preferredBlockSize
        var maximum = Self.defaultMaximumRequestSize
        if let advertised = export.maximumBlockSize, advertised > 0 { maximum = min(maximum, Int(advertised)) }
        // Keep split points on the server's minimum block (a power of two by the protocol).
        if let minimum = export.minimumBlockSize, minimum > 1, minimum.nonzeroBitCount == 1, Int(minimum) <= maximum {
            maximum &= ~(Int(minimum) - 1)
        }
        maximumRequestSize = maximum
    }

    deinit {
        // A client dropped without `close` still ends its connection.
        channel.close(promise: nil)
    }

    // MARK: Connecting

    /// Connects to the NBD server on a unix socket and opens `export` (NBD_OPT_GO).
    ///
    /// - Parameters:
    ///   - tls: STARTTLS first; a server that refuses it is an error (never a plaintext fallback).
    ///   - timeout: bounds the connection and the whole handshake, TLS included.
    /// - Throws: `FerryError`: `.unavailable` (cannot connect, closed), `.timeout`,
    ///   `.unsupported` (STARTTLS refused), `.unauthenticated` (TLS handshake failed),
    ///   `.notFound` / `.permissionDenied` (the server refused the export, its text included),
    ///   `.protocolViolation`.
    public static func connect(
        unixSocket path: String, export: String, tls: NBDClientTLS? = nil, allocation: Bool = false,
        eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton, timeout: TimeAmount = .seconds(10)
    ) async throws -> NBDClient {
        try await connect(to: .unix(path), export: export, tls: tls, allocation: allocation, group: eventLoopGroup, timeout: timeout)
    }

    /// Connects to the NBD server at `host:port` over TCP and opens `export` (NBD_OPT_GO).
    /// Parameters and errors as for the unix socket form.
    public static func connect(
        host: String, port: Int, export: String, tls: NBDClientTLS? = nil, allocation: Bool = false,
        eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton, timeout: TimeAmount = .seconds(10)
    ) async throws -> NBDClient {
        try await connect(to: .tcp(host, port), export: export, tls: tls, allocation: allocation, group: eventLoopGroup, timeout: timeout)
    }

    private enum Target: CustomStringConvertible {
        case unix(String)
        case tcp(String, Int)

        var description: String {
            switch self {
            case .unix(let path): return "unix:" + path
            case .tcp(let host, let port): return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
            }
        }
    }

    private static func connect(
        to target: Target, export: String, tls: NBDClientTLS?, allocation: Bool, group: any EventLoopGroup, timeout: TimeAmount
    ) async throws -> NBDClient {
        let peer = target.description
        guard export.utf8.count <= 4096 else {
            throw FerryError(.badRequest, "NBD export name is \(export.utf8.count) bytes long; the protocol allows 4096")
        }
        let loop = group.next()
        let state = NBDClientConnectionState()
        let negotiated = loop.makePromise(of: NBDNegotiatedExport.self)
        let deadline = NIODeadline.now() + timeout
        var bootstrap = ClientBootstrap(group: loop)
            .connectTimeout(timeout)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(NBDClientHandler(
                        export: export, allocation: allocation, tls: tls, peer: peer, state: state, negotiated: negotiated, deadline: deadline, timeout: timeout))
                }
            }
        let channel: any Channel
        do {
            switch target {
            case .unix(let path):
                channel = try await bootstrap.connect(unixDomainSocketPath: path).get()
            case .tcp(let host, let port):
                bootstrap = bootstrap.channelOption(.socketOption(.tcp_nodelay), value: 1)
                channel = try await bootstrap.connect(host: host, port: port).get()
            }
        } catch {
            // The handler may never have been made; its promise must not be left pending.
            let failure = FerryError(.unavailable, "cannot connect to the NBD server at \(peer): \(NBDClientHandler.describe(error))")
            negotiated.fail(failure)
            throw failure
        }
        do {
            let export = try await negotiated.futureResult.get()
            return NBDClient(channel: channel, state: state, peer: peer, export: export)
        } catch {
            channel.close(promise: nil)
            throw error as? FerryError ?? FerryError(.unavailable, "NBD negotiation with \(peer) failed: \(error)")
        }
    }

    // MARK: State

    /// Whether requests can still be served: false once the connection has ended or `close`
    /// was called.
    public var isConnected: Bool { channel.isActive && state.failure == nil }

    /// Why the connection can serve no more requests, once it cannot.
    public var failure: FerryError? { state.failure }

    /// Sends NBD_CMD_DISC and closes once the server has answered what is outstanding (or
    /// after 10 s). Requests made from now on fail; outstanding ones still get their answers.
    public func close() async {
        state.end(FerryError(.unavailable, "the NBD client for \(peer) was closed"))
        let channel = self.channel
        if channel.isActive {
            let giveUp = channel.eventLoop.scheduleTask(in: Self.closeGrace) { channel.close(promise: nil) }
            channel.writeAndFlush(NBDClientCommand.disconnect).whenFailure { _ in channel.close(promise: nil) }
            try? await channel.closeFuture.get()
            giveUp.cancel()
        } else {
            try? await channel.close()
        }
    }

    // MARK: Async operations

    /// Reads `length` bytes at `offset` (split into pipelined requests if larger than
    /// `maximumRequestSize`).
    public func read(offset: UInt64, length: Int) async throws -> ByteBuffer {
        try await readFuture(offset: offset, length: length).get()
    }

    /// Writes `data` at `offset`; with `fua`, the write is durable when this returns.
    public func write(offset: UInt64, data: ByteBuffer, fua: Bool = false) async throws {
        try await writeFuture(offset: offset, data: data, fua: fua).get()
    }

    /// Zeroes `length` bytes at `offset`: NBD_CMD_WRITE_ZEROES, or zero-filled writes if the
    /// server does not offer it.
    public func writeZeroes(offset: UInt64, length: UInt64, fua: Bool = false) async throws {
        try await writeZeroesFuture(offset: offset, length: length, fua: fua).get()
    }

    /// Makes every write the server has answered durable (NBD_CMD_FLUSH).
    public func flush() async throws {
        try await flushFuture().get()
    }

    /// The `base:allocation` map from `offset`: at least one extent, covering up to `length`
    /// bytes (a server may answer a prefix; ask again from where it ends). Needs a connection
    /// made with `allocation: true` to a server that offers it (`canBlockStatus`).
    public func blockStatus(offset: UInt64, length: UInt64) async throws -> [NBDExtent] {
        try await blockStatusFuture(offset: offset, length: length).get()
    }

    // MARK: Blocking operations

    // For plain threads (an NBDExport serving a local NBD server): each call waits for its own
    // reply while other threads' requests share the connection. Never call these on an event
    // loop (it would wait for itself) or from Swift concurrency's pool (it would starve it).

    /// `read(offset:length:)`, blocking the calling thread.
    public func readBlocking(offset: UInt64, length: Int) throws -> ByteBuffer {
        Self.preconditionNotOnEventLoop()
        return try readFuture(offset: offset, length: length).wait()
    }

    /// `write(offset:data:fua:)`, blocking the calling thread.
    public func writeBlocking(offset: UInt64, data: ByteBuffer, fua: Bool = false) throws {
        Self.preconditionNotOnEventLoop()
        try writeFuture(offset: offset, data: data, fua: fua).wait()
    }

    /// `writeZeroes(offset:length:fua:)`, blocking the calling thread.
    public func writeZeroesBlocking(offset: UInt64, length: UInt64, fua: Bool = false) throws {
        Self.preconditionNotOnEventLoop()
        try writeZeroesFuture(offset: offset, length: length, fua: fua).wait()
    }

    /// `blockStatus(offset:length:)`, blocking the calling thread.
    public func blockStatusBlocking(offset: UInt64, length: UInt64) throws -> [NBDExtent] {
        Self.preconditionNotOnEventLoop()
        return try blockStatusFuture(offset: offset, length: length).wait()
    }

    /// `flush()`, blocking the calling thread.
    public func flushBlocking() throws {
        Self.preconditionNotOnEventLoop()
        try flushFuture().wait()
    }

    private static func preconditionNotOnEventLoop() {
        precondition(MultiThreadedEventLoopGroup.currentEventLoop == nil,
                     "NBDClient's blocking calls must not run on an event loop; use the async forms")
    }

    // MARK: Requests

    /// Fails with EINVAL (reads) or ENOSPC (writes) for a range outside the export, as NBD
    /// servers do, without sending anything.
    private func checkRange(_ operation: String, offset: UInt64, length: UInt64, errno code: Int32) -> VolumeIOError? {
        let (end, overflow) = offset.addingReportingOverflow(length)
        guard overflow || end > size else { return nil }
        return VolumeIOError(operation: "NBD \(operation) of \(length) bytes at \(offset) (past the end of the \(size)-byte export on \(peer))",
                             errno: code)
    }

    private func checkWritable(_ operation: String) -> VolumeIOError? {
        isReadOnly ? VolumeIOError(operation: "NBD \(operation) (the export on \(peer) is read-only)", errno: EPERM) : nil
    }

    /// The pieces of `[offset, offset + length)` no larger than `maximumRequestSize`.
    private func chunks(offset: UInt64, length: UInt64) -> [(offset: UInt64, length: UInt32)] {
        var pieces: [(UInt64, UInt32)] = []
        pieces.reserveCapacity(Int(length / UInt64(maximumRequestSize)) + 1)
        var done: UInt64 = 0
        while done < length {
            let piece = min(length - done, UInt64(maximumRequestSize))
            pieces.append((offset + done, UInt32(piece)))
            done += piece
        }
        return pieces
    }

    /// Hands one request to the connection (several are written before one flush). The
    /// handler completes the promise; if the channel is gone before it got there, this does.
    private func send(_ command: NBD.Command, flags: UInt16 = 0, offset: UInt64 = 0, length: UInt32 = 0,
                      payload: ByteBuffer? = nil, flush: Bool = true) -> EventLoopFuture<ByteBuffer?> {
        let promise = channel.eventLoop.makePromise(of: ByteBuffer?.self)
        if let failure = state.failure {
            promise.fail(failure)
            return promise.futureResult
        }
        let request = NBDClientCommand.request(NBDClientRequest(
            command: command, flags: flags, offset: offset, length: length, payload: payload, promise: promise))
        let handedOver = flush ? channel.writeAndFlush(request) : channel.write(request)
        let state = self.state, peer = self.peer
        handedOver.whenFailure { error in
            promise.fail(state.failure ?? FerryError(.unavailable, "NBD connection to \(peer) lost: \(error)"))
        }
        return promise.futureResult
    }

    /// Sends the pieces together (one flush) and succeeds when all have.
    private func sendAll(_ requests: [(command: NBD.Command, flags: UInt16, offset: UInt64, length: UInt32, payload: ByteBuffer?)])
        -> [EventLoopFuture<ByteBuffer?>] {
        var futures: [EventLoopFuture<ByteBuffer?>] = []
        futures.reserveCapacity(requests.count)
        for (index, r) in requests.enumerated() {
            futures.append(send(r.command, flags: r.flags, offset: r.offset, length: r.length, payload: r.payload,
                                flush: index == requests.count - 1))
        }
        return futures
    }

    private func readFuture(offset: UInt64, length: Int) -> EventLoopFuture<ByteBuffer> {
        let loop = channel.eventLoop
        guard length >= 0 else {
            return loop.makeFailedFuture(VolumeIOError(operation: "NBD read of a negative length", errno: EINVAL))
        }
        if let error = checkRange("read", offset: offset, length: UInt64(length), errno: EINVAL) {
            return loop.makeFailedFuture(error)
        }
        if length == 0 { return loop.makeSucceededFuture(channel.allocator.buffer(capacity: 0)) }
        if length <= maximumRequestSize {
            return send(.read, offset: offset, length: UInt32(length)).map { $0 ?? ByteBuffer() }
        }
        let pieces = chunks(offset: offset, length: UInt64(length)).map { (NBD.Command.read, UInt16(0), $0.offset, $0.length, ByteBuffer?.none) }
        let allocator = channel.allocator
        return EventLoopFuture.whenAllSucceed(sendAll(pieces), on: loop).map { parts in
            var whole = allocator.buffer(capacity: length)
            for part in parts { if var part { whole.writeBuffer(&part) } }
            return whole
        }
    }

    private func writeFuture(offset: UInt64, data: ByteBuffer, fua: Bool) -> EventLoopFuture<Void> {
        let loop = channel.eventLoop
        if let error = checkWritable("write") ?? checkRange("write", offset: offset, length: UInt64(data.readableBytes), errno: ENOSPC) {
            return loop.makeFailedFuture(error)
        }
        if data.readableBytes == 0 { return loop.makeSucceededVoidFuture() }
        let flags = fua && canFUA ? NBD.CommandFlag.fua : 0
        let pieces = chunks(offset: offset, length: UInt64(data.readableBytes)).map { piece in
            (NBD.Command.write, flags, piece.offset,
             piece.length, ByteBuffer?.some(data.getSlice(at: data.readerIndex + Int(piece.offset - offset), length: Int(piece.length))!))
        }
        return afterAll(sendAll(pieces), fua: fua)
    }

    private func writeZeroesFuture(offset: UInt64, length: UInt64, fua: Bool) -> EventLoopFuture<Void> {
        let loop = channel.eventLoop
        if let error = checkWritable("write-zeroes") ?? checkRange("write-zeroes", offset: offset, length: length, errno: ENOSPC) {
            return loop.makeFailedFuture(error)
        }
        if length == 0 { return loop.makeSucceededVoidFuture() }
        let flags = fua && canFUA ? NBD.CommandFlag.fua : 0
        let pieces: [(command: NBD.Command, flags: UInt16, offset: UInt64, length: UInt32, payload: ByteBuffer?)]
        if canWriteZeroes {
            pieces = chunks(offset: offset, length: length).map { (.writeZeroes, flags, $0.offset, $0.length, nil) }
        } else {
            // One zero buffer, shared by every piece (slices are not copies).
            let zeroes = channel.allocator.buffer(repeating: 0, count: Int(min(length, UInt64(maximumRequestSize))))
            pieces = chunks(offset: offset, length: length).map {
                (.write, flags, $0.offset, $0.length, zeroes.getSlice(at: zeroes.readerIndex, length: Int($0.length))!)
            }
        }
        return afterAll(sendAll(pieces), fua: fua)
    }

    private func flushFuture() -> EventLoopFuture<Void> {
        // Without SEND_FLUSH the client must not send FLUSH: the server does not cache writes.
        guard canFlush else {
            if let failure = state.failure { return channel.eventLoop.makeFailedFuture(failure) }
            return channel.eventLoop.makeSucceededVoidFuture()
        }
        return send(.flush).map { _ in }
    }

    private func blockStatusFuture(offset: UInt64, length: UInt64) -> EventLoopFuture<[NBDExtent]> {
        let loop = channel.eventLoop
        guard canBlockStatus else {
            return loop.makeFailedFuture(VolumeIOError(operation: "NBD block status (not offered by \(peer), or not asked for)", errno: EOPNOTSUPP))
        }
        if let error = checkRange("block status", offset: offset, length: length, errno: EINVAL) { return loop.makeFailedFuture(error) }
        let asked = UInt32(min(length, UInt64(UInt32.max)))
        guard asked > 0 else { return loop.makeFailedFuture(VolumeIOError(operation: "NBD block status of 0 bytes", errno: EINVAL)) }
        let peer = self.peer
        return send(.blockStatus, offset: offset, length: asked).flatMapThrowing { descriptors in
            var bytes = descriptors ?? ByteBuffer()
            var extents: [NBDExtent] = []
            var covered: UInt64 = 0
            while let length = bytes.readInteger(as: UInt32.self), let flags = bytes.readInteger(as: UInt32.self) {
                // Past the request the answer is cut (the protocol lets the last extent run on).
                let n = min(UInt64(length), UInt64(asked) - covered)
                guard n > 0 else { break }
                extents.append(NBDExtent(length: n, flags: flags))
                covered += n
            }
            guard !extents.isEmpty else {
                throw VolumeIOError(operation: "NBD block status at \(offset) on \(peer) (an empty answer)", errno: EIO)
            }
            return extents
        }
    }

    /// Succeeds when every piece has; a FUA write to a server without FUA is followed by a flush.
    private func afterAll(_ futures: [EventLoopFuture<ByteBuffer?>], fua: Bool) -> EventLoopFuture<Void> {
        let all = EventLoopFuture.andAllSucceed(futures, on: channel.eventLoop)
        guard fua, !canFUA, canFlush else { return all }
        return all.flatMap { self.flushFuture() }
    }
}
