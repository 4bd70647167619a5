import FerryWire
import Foundation
import Glibc
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import ServiceLifecycle
import X509

/// Serves the point-in-time exports to agents over the network: NBD fixed-newstyle with
/// STARTTLS (as `nbds://` clients such as libnbd and qemu speak it), TLS 1.3 with a client
/// certificate of an enrolled, admitted host required. After the TLS handshake the connection
/// is joined to the export server (the same one the controller's local socket reaches) with the
/// host as its principal: it sees and opens only the exports made for that host.
struct PointExportTLSService: Service {
    let listen: String
    let exports: PointExports
    let tls: NIOSSLContext
    let store: StateStore
    let group: any EventLoopGroup
    let logger: Logger
    /// Connections held at once, in all and per source address.
    let caps: ConnectionCaps
    /// Called with the bound address (the configured port may be 0).
    let onBound: @Sendable (SocketAddress) -> Void

    func run() async throws {
        let (host, port) = try ConfigText.hostPort(listen)
        let exports = self.exports, tls = self.tls, store = self.store, logger = self.logger, caps = self.caps
        let server = try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 128)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    guard caps.admit(channel) else {
                        channel.close(promise: nil)
                        return
                    }
                    try channel.pipeline.syncOperations.addHandler(
                        StartTLSNegotiator(tls: tls, exports: exports, store: store, logger: logger))
                }
            }
            .bind(host: host, port: port).get()
        if let address = server.localAddress {
            onBound(address)
            logger.info("point exports over NBD+TLS ready", metadata: ["address": "\(PeerSession.describe(address))"])
        }
        try await withGracefulShutdownHandler {
            try await server.closeFuture.get()
        } onGracefulShutdown: {
            server.close(promise: nil)
        }
    }
}

/// The plaintext part of the handshake: the greeting, the client's flags and options until
/// STARTTLS (anything else is answered NBD_REP_ERR_TLS_REQD); then TLS is put in front and
/// `ExportJoiner` takes over. Bounded: options of at most 4 KiB, 16 of them before STARTTLS.
final class StartTLSNegotiator: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private static let initMagic: UInt64 = 0x4E42_444D_4147_4943
    private static let optionMagic: UInt64 = 0x4948_4156_454F_5054
    private static let replyMagic: UInt64 = 0x0003_E889_0455_65A9
    private static let startTLS: UInt32 = 5, abort: UInt32 = 2
    private static let ack: UInt32 = 1, errTLSRequired: UInt32 = 1 << 31 | 5, errInvalid: UInt32 = 1 << 31 | 3

    private let tls: NIOSSLContext
    private let exports: PointExports
    private let store: StateStore
    private let logger: Logger
    private var buffer = ByteBuffer()
    private var flagsRead = false
    private var options = 0

    init(tls: NIOSSLContext, exports: PointExports, store: StateStore, logger: Logger) {
        self.tls = tls
        self.exports = exports
        self.store = store
        self.logger = logger
    }

    func channelActive(context: ChannelHandlerContext) {
        var greeting = context.channel.allocator.buffer(capacity: 18)
        greeting.writeInteger(Self.initMagic)
        greeting.writeInteger(Self.optionMagic)
        greeting.writeInteger(UInt16(1 | 2)) // fixed newstyle, no zeroes
        context.writeAndFlush(wrapOutboundOut(greeting), promise: nil)
        // A client that never finishes the handshake does not hold the connection for long.
        let channel = context.channel
        context.eventLoop.scheduleTask(in: .seconds(30)) {
            channel.pipeline.handler(type: ExportJoiner.self).whenComplete { result in
                if case .success(let joiner) = result, joiner.joined { return }
                channel.close(promise: nil)
            }
        }
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        buffer.writeBuffer(&incoming)
        if !flagsRead {
            guard let flags = buffer.readInteger(as: UInt32.self) else { return }
            guard flags & 1 != 0 else { context.close(promise: nil); return }
            flagsRead = true
        }
        while buffer.readableBytes >= 16 {
            guard let magic = buffer.getInteger(at: buffer.readerIndex, as: UInt64.self),
                  let option = buffer.getInteger(at: buffer.readerIndex + 8, as: UInt32.self),
                  let length = buffer.getInteger(at: buffer.readerIndex + 12, as: UInt32.self) else { return }
            guard magic == Self.optionMagic, length <= 4096, options < 16 else { context.close(promise: nil); return }
            guard buffer.readableBytes >= 16 + Int(length) else { return }
            buffer.moveReaderIndex(forwardBy: 16 + Int(length))
            options += 1
            switch option {
            case Self.startTLS where length == 0:
                reply(context, option, Self.ack)
                startTLS(context)
                return
            case Self.abort:
                reply(context, option, Self.ack)
                context.close(promise: nil)
                return
            case Self.startTLS:
                reply(context, option, Self.errInvalid)
            default:
                reply(context, option, Self.errTLSRequired)
            }
        }
    }

    private func reply(_ context: ChannelHandlerContext, _ option: UInt32, _ type: UInt32) {
        var out = context.channel.allocator.buffer(capacity: 20)
        out.writeInteger(Self.replyMagic)
        out.writeInteger(option)
        out.writeInteger(type)
        out.writeInteger(UInt32(0))
        context.writeAndFlush(wrapOutboundOut(out), promise: nil)
    }

    /// TLS goes in front; nothing the client sent may follow STARTTLS before it reads the
    /// answer, so there is nothing left over to hand on.
    private func startTLS(_ context: ChannelHandlerContext) {
        let pipeline = context.pipeline
        do {
            try pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls), position: .before(self))
            try pipeline.syncOperations.addHandler(ExportJoiner(exports: exports, store: store, logger: logger), position: .after(self))
        } catch {
            context.close(promise: nil)
            return
        }
        pipeline.syncOperations.removeHandler(self, promise: nil)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

/// After the TLS handshake: checks that the client certificate belongs to an admitted host,
/// hands one end of a socket pair to the export server with that host as the principal, skips
/// the server's greeting, sends the client's flags, and from then on copies bytes both ways.
/// What the client sends meanwhile is kept and sent first. A refused host is audited.
final class ExportJoiner: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let exports: PointExports
    private let store: StateStore
    private let logger: Logger
    private var pending: [ByteBuffer] = []
    private var inner: (any Channel)?
    private(set) var joined = false

    init(exports: PointExports, store: StateStore, logger: Logger) {
        self.exports = exports
        self.store = store
        self.logger = logger
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event { admit(context) }
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let bytes = unwrapInboundIn(data)
        if joined, let inner {
            inner.write(bytes, promise: nil)
        } else {
            pending.append(bytes)
            if pending.reduce(0, { $0 + $1.readableBytes }) > 64 << 10 { context.close(promise: nil) }
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        inner?.flush()
        context.fireChannelReadComplete()
    }

    // Backpressure both ways: the client is read only while the export server's side takes
    // more, and (InnerSide) the export server only while the client takes its replies, so a
    // client that never reads holds at most a few socket buffers of the controller's memory.
    func read(context: ChannelHandlerContext) {
        if let inner, !inner.isWritable { return }
        context.read()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { inner?.read() }
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        inner?.close(promise: nil)
        exports.connections.remove(context.channel)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        logger.info("NBD+TLS connection closed", metadata: ["error": "\(error)"])
        context.close(promise: nil)
    }

    private func admit(_ context: ChannelHandlerContext) {
        let channel = context.channel, store = self.store, loop = context.eventLoop, exports = self.exports
        let handler = NIOLoopBound(self, eventLoop: loop)
        let contextBox = NIOLoopBound(context, eventLoop: loop)
        let peer = channel.remoteAddress.map(PeerSession.describe) ?? "unknown address"
        let promise = loop.makePromise(of: NIOBSDSocket.Handle.self)
        promise.completeWithTask {
            let host: HostRecord
            let certificate: Certificate
            do {
                guard let presented = try await TLSSettings.peerCertificate(of: channel),
                      let hostID = HostIdentity.hostID(of: presented) else {
                    throw FerryError(.unauthenticated, "a client certificate of an enrolled host is required")
                }
                certificate = presented
                host = try await store.admit(hostID: hostID, serial: HostIdentity.serialString(certificate))
            } catch {
                exports.accessLog.record(.refused, host: peer, export: "-", volume: nil)
                throw error
            }
            // Revocation and expiry end the connection: removing the host or superseding this
            // certificate closes it (ExportConnections), and so does the certificate's end.
            guard exports.connections.add(channel, hostID: host.id, serial: HostIdentity.serialString(certificate)) else {
                exports.accessLog.record(.refused, host: host.name, export: "-", volume: nil)
                throw FerryError(.unavailable, "host \(host.name) holds \(exports.connections.maxPerHost) NBD+TLS connections already")
            }
            let lifetime = certificate.notValidAfter.timeIntervalSinceNow
            channel.eventLoop.scheduleTask(in: .milliseconds(Int64(max(0, min(lifetime, 400 * 86_400)) * 1000))) {
                channel.close(promise: nil)
            }
            let (ours, theirs) = try Self.socketPair()
            await exports.serveJoined(connection: theirs, hostID: host.id, hostName: host.name)
            return ours
        }
        promise.futureResult.flatMap { fd -> EventLoopFuture<any Channel> in
            ClientBootstrap(group: loop)
                .channelInitializer { inner in
                    inner.eventLoop.makeCompletedFuture {
                        try inner.pipeline.syncOperations.addHandler(InnerSide(outer: channel))
                    }
                }
                .withConnectedSocket(fd)
                .flatMapErrorThrowing { error in
                    _ = Glibc.close(fd)
                    throw error
                }
        }.whenComplete { result in
            let me = handler.value, context = contextBox.value
            switch result {
            case .success(let inner):
                me.inner = inner
                me.joined = true
                // The client's flags first (its own went to the negotiator), then its options.
                var flags = inner.allocator.buffer(capacity: 4)
                flags.writeInteger(UInt32(1 | 2)) // fixed newstyle, no zeroes
                inner.write(flags, promise: nil)
                for bytes in me.pending { inner.write(bytes, promise: nil) }
                me.pending = []
                inner.flush()
            case .failure(let error):
                me.logger.info("NBD+TLS connection refused", metadata: ["peer": "\(peer)", "error": "\((error as? FerryError)?.message ?? "\(error)")"])
                context.close(promise: nil)
            }
        }
    }

    /// A connected pair of local stream sockets: one for the channel, one for the export server.
    static func socketPair() throws -> (NIOBSDSocket.Handle, NIOBSDSocket.Handle) {
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            throw FerryError(.io, "cannot make a socket pair for an NBD+TLS connection: \(String(cString: strerror(errno)))")
        }
        return (fds[0], fds[1])
    }
}

/// The export server's side of a joined connection: its greeting is dropped (the client
/// had one from the negotiator); everything after goes to the client.
final class InnerSide: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let outer: any Channel
    private var greetingLeft = 18

    init(outer: any Channel) { self.outer = outer }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        if greetingLeft > 0 {
            let skip = min(greetingLeft, bytes.readableBytes)
            bytes.moveReaderIndex(forwardBy: skip)
            greetingLeft -= skip
            guard bytes.readableBytes > 0 else { return }
        }
        outer.write(bytes, promise: nil)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        outer.flush()
        context.fireChannelReadComplete()
    }

    /// Reads the export server's replies only while the client takes them.
    func read(context: ChannelHandlerContext) {
        if !outer.isWritable { return }
        context.read()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { outer.read() }
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        outer.close(promise: nil)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}
