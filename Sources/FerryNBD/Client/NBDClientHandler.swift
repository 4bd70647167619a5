import FerryWire
import Foundation
import NIOCore
import NIOSSL
import NIOTLS
import Synchronization

/// What `NBDClient` hands to its channel.
enum NBDClientCommand: Sendable {
    /// One transmission request; its promise is completed by the handler in every case.
    case request(NBDClientRequest)
    /// NBD_CMD_DISC: no more requests; the connection closes once the outstanding ones are answered.
    case disconnect
}

/// One transmission request as the client submits it (at most the server's maximum size).
struct NBDClientRequest: Sendable {
    var command: NBD.Command
    var flags: UInt16
    var offset: UInt64
    var length: UInt32
    /// The data of a WRITE.
    var payload: ByteBuffer?
    /// The data of a READ, nil for the other commands.
    var promise: EventLoopPromise<ByteBuffer?>
}

/// What the option haggling agreed on.
struct NBDNegotiatedExport: Sendable {
    var size: UInt64
    var transmissionFlags: UInt16
    var minimumBlockSize: UInt32?
    var preferredBlockSize: UInt32?
    var maximumBlockSize: UInt32?
    /// Structured replies were agreed (reads and block status come as chunks).
    var structured = false
    /// The id the server gave `base:allocation`, if it selected it: block status is answered.
    var allocationContext: UInt32?
}

/// The part of a connection's state that threads other than the event loop read: why it ended.
/// The first reason recorded wins.
final class NBDClientConnectionState: Sendable {
    private let ended = Mutex<FerryError?>(nil)

    var failure: FerryError? { ended.withLock { $0 } }

    /// Records why no further request can be served, unless a reason is recorded already.
    /// Returns the reason in force.
    @discardableResult
    func end(_ reason: FerryError) -> FerryError {
        ended.withLock { current in
            if let current { return current }
            current = reason
            return reason
        }
    }
}

/// The client side of one NBD connection: the fixed-newstyle handshake (with optional STARTTLS,
/// then NBD_OPT_GO), then transmission with simple replies. Requests are pipelined and matched
/// to replies by handle, so the server may answer them in any order.
///
/// Every request's promise is completed exactly once: by its reply, or by the connection's end
/// (closed, broken, a protocol violation), so no caller can wait forever on a dead connection.
final class NBDClientHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = NBDClientCommand
    typealias OutboundOut = ByteBuffer

    private enum Phase {
        case greeting
        case startTLSReply
        case tlsHandshake
        case structuredReply
        case metaContextReplies
        case goReplies
        case transmission
        case ended
    }

    private struct InFlight {
        var command: NBD.Command
        var offset: UInt64
        var length: UInt32
        var promise: EventLoopPromise<ByteBuffer?>
        /// Structured replies: what the chunks so far brought (a READ's data, zero-filled where
        /// no chunk was; BLOCK_STATUS's descriptors), and the first error chunk's errno.
        var collected: ByteBuffer?
        var error: UInt32 = 0
    }

    /// A READ reply whose data is still arriving, collected in a buffer of its own.
    private struct PartialRead {
        var request: InFlight
        var data: ByteBuffer
    }

    /// Option replies carry short strings and block sizes: anything larger is not a server we
    /// understand, and is not buffered.
    static let maxOptionReplyLength = 64 * 1024

    private let export: String
    /// Ask for structured replies and `base:allocation` (block status) before GO.
    private let allocation: Bool
    private let tls: NBDClientTLS?
    private let peer: String
    private let state: NBDClientConnectionState
    private let negotiated: EventLoopPromise<NBDNegotiatedExport>
    private let deadline: NIODeadline
    private let timeout: TimeAmount

    private var phase = Phase.greeting
    private var buffer = ByteBuffer()
    private var timeoutTask: Scheduled<Void>?
    private var info = NBDNegotiatedExport(size: 0, transmissionFlags: 0)
    private var sawExportInfo = false

    private var nextHandle: UInt64 = 1
    private var inFlight: [UInt64: InFlight] = [:]
    private var partialRead: PartialRead?
    /// DISC was sent: the connection closes once nothing is in flight.
    private var disconnecting = false
    /// Why the connection is ending, as told to requests still outstanding when it goes.
    private var endReason: FerryError?

    init(export: String, allocation: Bool = false, tls: NBDClientTLS?, peer: String, state: NBDClientConnectionState,
         negotiated: EventLoopPromise<NBDNegotiatedExport>, deadline: NIODeadline, timeout: TimeAmount) {
        self.export = export
        self.allocation = allocation
        self.tls = tls
        self.peer = peer
        self.state = state
        self.negotiated = negotiated
        self.deadline = deadline
        self.timeout = timeout
    }

    // MARK: Lifecycle

    func channelActive(context: ChannelHandlerContext) {
        // The handshake, TLS included, must be done by the deadline the caller set.
        let channel = context.channel
        timeoutTask = context.eventLoop.assumeIsolated().scheduleTask(deadline: deadline) { [self] in
            guard phase != .transmission, phase != .ended else { return }
            let seconds = Double(timeout.nanoseconds) / 1e9
            failNegotiation(FerryError(.timeout, "the NBD server at \(peer) did not complete the handshake within \(seconds) s"), channel: channel)
        }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        if endReason == nil, phase != .transmission, phase != .ended {
            endReason = FerryError(.unavailable, "the NBD server at \(peer) closed the connection during the handshake"
                + (phase == .tlsHandshake ? " (TLS)" : ""))
        }
        connectionEnded(endReason ?? lost("the server closed the connection"))
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        // Normally after channelInactive; this is the last chance to complete every promise.
        connectionEnded(endReason ?? lost("the connection was torn down"))
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        let reason: FerryError
        switch phase {
        case .tlsHandshake:
            reason = FerryError(.unauthenticated, "TLS handshake with the NBD server at \(peer) failed: \(Self.describe(error))")
        case .goReplies where error is NIOSSLError || error is BoringSSLError,
             .structuredReply where error is NIOSSLError || error is BoringSSLError,
             .metaContextReplies where error is NIOSSLError || error is BoringSSLError:
            // TLS 1.3: a server refuses the client certificate only after the client's handshake is done.
            reason = FerryError(.unauthenticated, "the NBD server at \(peer) ended TLS during negotiation (a refused client certificate shows here): "
                + Self.describe(error))
        case .greeting, .startTLSReply, .goReplies, .structuredReply, .metaContextReplies:
            reason = FerryError(.unavailable, "NBD negotiation with \(peer) failed: \(Self.describe(error))")
        case .transmission, .ended:
            // NIOSSL's uncleanShutdown (the peer went without close_notify) lands here too.
            reason = lost(Self.describe(error))
        }
        if endReason == nil { endReason = reason }
        if phase == .transmission {
            // Later requests fail at once, before the close has run its course.
            state.end(reason)
        }
        failNegotiation(reason, channel: context.channel) // only while negotiating
        context.close(promise: nil)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event, phase == .tlsHandshake {
            sendOptions(context)
        }
        context.fireUserInboundEventTriggered(event)
    }

    // MARK: Inbound

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        guard phase != .ended else { return }
        if buffer.readableBytes == 0 {
            buffer = bytes
        } else {
            buffer.writeBuffer(&bytes)
        }
        process(context)
        // Keep no reference to storage that READ data handed out shares; a partial header
        // (at most a few bytes in transmission) is copied instead.
        if buffer.readableBytes == 0 {
            buffer = ByteBuffer()
        } else if buffer.readerIndex > 0 {
            var rest = context.channel.allocator.buffer(capacity: buffer.readableBytes)
            rest.writeBuffer(&buffer)
            buffer = rest
        }
    }

    private func process(_ context: ChannelHandlerContext) {
        while true {
            let progressed: Bool
            switch phase {
            case .greeting: progressed = readGreeting(context)
            case .startTLSReply: progressed = readStartTLSReply(context)
            case .structuredReply: progressed = readStructuredReplyAnswer(context)
            case .metaContextReplies: progressed = readMetaContextReply(context)
            case .goReplies: progressed = readGoReply(context)
            case .transmission: progressed = readReply(context)
            case .tlsHandshake, .ended: progressed = false
            }
            if !progressed { return }
        }
    }

    // MARK: Negotiation

    private func readGreeting(_ context: ChannelHandlerContext) -> Bool {
        guard buffer.readableBytes >= 18 else { return false }
        let magic = buffer.readInteger(as: UInt64.self)!
        let optionMagic = buffer.readInteger(as: UInt64.self)!
        let flags = buffer.readInteger(as: UInt16.self)!
        guard magic == NBD.initMagic else {
            return violation(context, "the peer at \(peer) is not an NBD server (greeting magic 0x\(String(magic, radix: 16)))")
        }
        guard optionMagic == NBD.optionMagic else {
            return violation(context, "the NBD server at \(peer) speaks the old-style handshake only, which this client does not")
        }
        guard flags & NBD.HandshakeFlag.fixedNewstyle != 0 else {
            return violation(context, "the NBD server at \(peer) does not offer fixed newstyle negotiation")
        }
        // NO_ZEROES only matters for EXPORT_NAME, which is never sent; it is echoed when offered
        // (a client must not set a flag the server did not).
        var clientFlags = NBD.ClientFlag.fixedNewstyle
        if flags & NBD.HandshakeFlag.noZeroes != 0 { clientFlags |= NBD.ClientFlag.noZeroes }
        var out = context.channel.allocator.buffer(capacity: 20)
        out.writeInteger(clientFlags)
        if tls != nil {
            writeOption(&out, .startTLS, data: nil)
            phase = .startTLSReply
            context.writeAndFlush(wrapOutboundOut(out), promise: nil)
        } else {
            context.write(wrapOutboundOut(out), promise: nil)
            sendOptions(context)
        }
        return true
    }

    private enum OptionReply {
        case incomplete
        /// The connection is ending (a protocol violation was reported).
        case violated
        case reply(type: UInt32, data: ByteBuffer)
    }

    /// One whole option reply to `option`, once it has arrived.
    private func readOptionReply(_ context: ChannelHandlerContext, expecting option: NBD.Option) -> OptionReply {
        guard buffer.readableBytes >= 20 else { return .incomplete }
        let start = buffer.readerIndex
        let magic = buffer.getInteger(at: start, as: UInt64.self)!
        let replyOption = buffer.getInteger(at: start + 8, as: UInt32.self)!
        let type = buffer.getInteger(at: start + 12, as: UInt32.self)!
        let length = Int(buffer.getInteger(at: start + 16, as: UInt32.self)!)
        guard magic == NBD.optionReplyMagic else {
            _ = violation(context, "the NBD server at \(peer) sent an option reply with bad magic 0x\(String(magic, radix: 16))")
            return .violated
        }
        guard replyOption == option.rawValue else {
            _ = violation(context, "the NBD server at \(peer) answered option \(replyOption) while \(option) was asked")
            return .violated
        }
        guard length <= Self.maxOptionReplyLength else {
            _ = violation(context, "the NBD server at \(peer) sent a \(length)-byte option reply (over \(Self.maxOptionReplyLength))")
            return .violated
        }
        guard buffer.readableBytes >= 20 + length else { return .incomplete }
        buffer.moveReaderIndex(forwardBy: 20)
        return .reply(type: type, data: buffer.readSlice(length: length)!)
    }

    private func readStartTLSReply(_ context: ChannelHandlerContext) -> Bool {
        guard case .reply(let type, let data) = readOptionReply(context, expecting: .startTLS) else { return false }
        guard type == NBD.Reply.ack else {
            let reason = type & (1 << 31) != 0
                ? "refused STARTTLS (\(Self.replyName(type))\(Self.serverText(data)))"
                : "answered STARTTLS with reply type \(type)"
            failNegotiation(FerryError(.unsupported, "TLS was required but the NBD server at \(peer) \(reason); not connecting in plaintext"),
                            channel: context.channel)
            return false
        }
        // Nothing may follow the ACK in plaintext: the server waits for our ClientHello.
        guard buffer.readableBytes == 0 else {
            return violation(context, "the NBD server at \(peer) sent plaintext after accepting STARTTLS")
        }
        guard let tls else { return false }
        do {
            let handler = try NIOSSLClientHandler(context: tls.context, serverHostname: tls.serverHostname)
            try context.pipeline.syncOperations.addHandler(handler, position: .first)
        } catch {
            failNegotiation(FerryError(.badConfiguration, "cannot start TLS to the NBD server at \(peer): \(Self.describe(error))"),
                            channel: context.channel)
            return false
        }
        // GO is sent once the handshake completes (userInboundEventTriggered).
        phase = .tlsHandshake
        return false
    }

    /// The options after the greeting (and TLS), sent together: with `allocation`,
    /// STRUCTURED_REPLY and SET_META_CONTEXT base:allocation; then GO. Their replies come in order.
    private func sendOptions(_ context: ChannelHandlerContext) {
        guard allocation else {
            phase = .goReplies
            return sendGo(context)
        }
        var out = context.channel.allocator.buffer(capacity: 64 + export.utf8.count)
        writeOption(&out, .structuredReply, data: nil)
        var meta = context.channel.allocator.buffer(capacity: 32 + export.utf8.count)
        meta.writeInteger(UInt32(export.utf8.count))
        meta.writeString(export)
        meta.writeInteger(UInt32(1))
        meta.writeInteger(UInt32(NBD.allocationContext.utf8.count))
        meta.writeString(NBD.allocationContext)
        writeOption(&out, .setMetaContext, data: meta)
        context.write(wrapOutboundOut(out), promise: nil)
        phase = .structuredReply
        sendGo(context)
    }

    /// A server without structured replies refuses them and SET_META_CONTEXT: the connection
    /// then works without block status.
    private func readStructuredReplyAnswer(_ context: ChannelHandlerContext) -> Bool {
        guard case .reply(let type, _) = readOptionReply(context, expecting: .structuredReply) else { return false }
        info.structured = type == NBD.Reply.ack
        phase = .metaContextReplies
        return true
    }

    private func readMetaContextReply(_ context: ChannelHandlerContext) -> Bool {
        guard case .reply(let type, var data) = readOptionReply(context, expecting: .setMetaContext) else { return false }
        switch type {
        case NBD.Reply.metaContext:
            guard let id = data.readInteger(as: UInt32.self), let name = data.readString(length: data.readableBytes) else {
                return violation(context, "the NBD server at \(peer) sent a short NBD_REP_META_CONTEXT")
            }
            if name == NBD.allocationContext, info.structured { info.allocationContext = id }
        default:
            // ACK ends the list; an error means no context (the server does not offer it).
            phase = .goReplies
        }
        return true
    }

    /// NBD_OPT_GO for the export, asking for its block size constraints as well.
    private func sendGo(_ context: ChannelHandlerContext) {
        var data = context.channel.allocator.buffer(capacity: 8 + export.utf8.count)
        data.writeInteger(UInt32(export.utf8.count))
        data.writeString(export)
        data.writeInteger(UInt16(1))
        data.writeInteger(NBD.Info.blockSize)
        var out = context.channel.allocator.buffer(capacity: 16 + data.readableBytes)
        writeOption(&out, .go, data: data)
        context.writeAndFlush(wrapOutboundOut(out), promise: nil)
    }

    private func readGoReply(_ context: ChannelHandlerContext) -> Bool {
        guard case .reply(let type, var data) = readOptionReply(context, expecting: .go) else { return false }
        switch type {
        case NBD.Reply.info:
            guard let infoType = data.readInteger(as: UInt16.self) else {
                return violation(context, "the NBD server at \(peer) sent an empty NBD_REP_INFO")
            }
            switch infoType {
            case NBD.Info.export:
                guard let size = data.readInteger(as: UInt64.self), let flags = data.readInteger(as: UInt16.self) else {
                    return violation(context, "the NBD server at \(peer) sent a short NBD_INFO_EXPORT")
                }
                info.size = size
                info.transmissionFlags = flags
                sawExportInfo = true
            case NBD.Info.blockSize:
                guard let minimum = data.readInteger(as: UInt32.self), let preferred = data.readInteger(as: UInt32.self),
                      let maximum = data.readInteger(as: UInt32.self)
                else {
                    return violation(context, "the NBD server at \(peer) sent a short NBD_INFO_BLOCK_SIZE")
                }
                info.minimumBlockSize = minimum
                info.preferredBlockSize = preferred
                info.maximumBlockSize = maximum
            default:
                break // names, descriptions: not needed
            }
            return true
        case NBD.Reply.ack:
            guard sawExportInfo else {
                return violation(context, "the NBD server at \(peer) accepted NBD_OPT_GO without sending NBD_INFO_EXPORT")
            }
            phase = .transmission
            timeoutTask?.cancel()
            timeoutTask = nil
            negotiated.succeed(info)
            return true
        case let error where error & (1 << 31) != 0:
            failNegotiation(goRefused(error, text: Self.serverText(data)), channel: context.channel)
            return false
        default:
            return true // other reply types (NBD_REP_SERVER, ...) carry nothing needed here
        }
    }

    private func goRefused(_ type: UInt32, text: String) -> FerryError {
        let what = "the NBD server at \(peer) refused export '\(export)' (\(Self.replyName(type))\(text))"
        switch type {
        case NBD.Reply.errUnknown:
            return FerryError(.notFound, what)
        case NBD.Reply.errTLSRequired:
            return FerryError(.permissionDenied, what + ": it requires TLS")
        case NBD.Reply.errPolicy:
            return FerryError(.permissionDenied, what)
        case NBD.Reply.errUnsupported:
            return FerryError(.unsupported, what + ": it does not support NBD_OPT_GO, which this client requires")
        case NBD.Reply.errShutdown:
            return FerryError(.unavailable, what + ": it is shutting down")
        default:
            return FerryError(.unavailable, what)
        }
    }

    private func writeOption(_ out: inout ByteBuffer, _ option: NBD.Option, data: ByteBuffer?) {
        out.writeInteger(NBD.optionMagic)
        out.writeInteger(option.rawValue)
        out.writeInteger(UInt32(data?.readableBytes ?? 0))
        if var data { out.writeBuffer(&data) }
    }

    private func failNegotiation(_ error: FerryError, channel: any Channel) {
        guard phase != .transmission, phase != .ended else { return }
        phase = .ended
        timeoutTask?.cancel()
        timeoutTask = nil
        endReason = error
        state.end(error)
        negotiated.fail(error)
        channel.close(promise: nil)
    }

    // MARK: Transmission

    private func readReply(_ context: ChannelHandlerContext) -> Bool {
        if var partial = partialRead {
            // Out of the property first: a second reference to its storage would make every
            // append copy the whole read so far (quadratic in the read's length).
            partialRead = nil
            let take = min(buffer.readableBytes, Int(partial.request.length) - partial.data.readableBytes)
            guard take > 0 else {
                partialRead = partial
                return false
            }
            var slice = buffer.readSlice(length: take)!
            partial.data.writeBuffer(&slice)
            guard partial.data.readableBytes == Int(partial.request.length) else {
                partialRead = partial
                return false
            }
            partial.request.promise.succeed(partial.data)
            replied(context)
            return true
        }
        guard buffer.readableBytes >= 16 else { return false }
        let start = buffer.readerIndex
        let magic = buffer.getInteger(at: start, as: UInt32.self)!
        if magic == NBD.structuredReplyMagic, info.structured { return readChunk(context) }
        let error = buffer.getInteger(at: start + 4, as: UInt32.self)!
        let handle = buffer.getInteger(at: start + 8, as: UInt64.self)!
        guard magic == NBD.simpleReplyMagic else {
            let kind = magic == NBD.structuredReplyMagic ? "a structured reply, which was not negotiated" : "bad magic 0x\(String(magic, radix: 16))"
            return violation(context, "the NBD server at \(peer) sent a reply with \(kind)")
        }
        guard let request = inFlight.removeValue(forKey: handle) else {
            return violation(context, "the NBD server at \(peer) sent a reply for handle \(handle), which no outstanding request has")
        }
        buffer.moveReaderIndex(forwardBy: 16)
        if error != 0 {
            request.promise.fail(Self.requestFailed(request, errno: error, peer: peer))
        } else if request.command == .read {
            let length = Int(request.length)
            if buffer.readableBytes >= length {
                request.promise.succeed(buffer.readSlice(length: length)!)
            } else {
                // A large read: collect it in storage of its own rather than growing the buffer.
                var data = context.channel.allocator.buffer(capacity: length)
                data.writeBuffer(&buffer)
                partialRead = PartialRead(request: request, data: data)
                return true
            }
        } else {
            request.promise.succeed(nil)
        }
        replied(context)
        return true
    }

    /// Largest structured chunk taken: a READ's data (at most the largest request) and its offset,
    /// or a block status answer of 1 Mi descriptors.
    static let maxChunkLength = Int(NBDClient.defaultMaximumRequestSize) + 4096

    /// One structured reply chunk, once whole. A READ collects its data (OFFSET_DATA,
    /// OFFSET_HOLE) into a zero-filled buffer; BLOCK_STATUS its descriptors; the DONE chunk
    /// answers the request.
    private func readChunk(_ context: ChannelHandlerContext) -> Bool {
        guard buffer.readableBytes >= 20 else { return false }
        let start = buffer.readerIndex
        let flags = buffer.getInteger(at: start + 4, as: UInt16.self)!
        let type = buffer.getInteger(at: start + 6, as: UInt16.self)!
        let handle = buffer.getInteger(at: start + 8, as: UInt64.self)!
        let length = Int(buffer.getInteger(at: start + 16, as: UInt32.self)!)
        guard length <= Self.maxChunkLength else {
            return violation(context, "the NBD server at \(peer) sent a \(length)-byte reply chunk (over \(Self.maxChunkLength))")
        }
        guard buffer.readableBytes >= 20 + length else { return false }
        guard var request = inFlight[handle] else {
            return violation(context, "the NBD server at \(peer) sent a reply chunk for handle \(handle), which no outstanding request has")
        }
        buffer.moveReaderIndex(forwardBy: 20)
        var payload = buffer.readSlice(length: length)!
        switch (type, request.command) {
        case (NBD.ChunkType.none, _):
            guard flags & NBD.chunkFlagDone != 0, length == 0 else {
                return violation(context, "the NBD server at \(peer) sent NBD_REPLY_TYPE_NONE without DONE or with data")
            }
        case (NBD.ChunkType.offsetData, .read), (NBD.ChunkType.offsetHole, .read):
            guard let offset = payload.readInteger(as: UInt64.self), offset >= request.offset else {
                return violation(context, "the NBD server at \(peer) sent a read chunk before the request's offset")
            }
            let count = type == NBD.ChunkType.offsetData ? payload.readableBytes : Int(payload.readInteger(as: UInt32.self) ?? 0)
            let at = offset - request.offset
            // Checked without adding: a chunk's offset is the server's to choose, up to 2^64 - 1.
            guard at <= UInt64(request.length), UInt64(count) <= UInt64(request.length) - at else {
                return violation(context, "the NBD server at \(peer) sent read data past the request's end")
            }
            if type == NBD.ChunkType.offsetData, request.collected == nil, at == 0, count == Int(request.length) {
                // The usual answer: one chunk with all the data. Kept as it came, not copied.
                request.collected = payload
                break
            }
            var data = request.collected ?? context.channel.allocator.buffer(repeating: 0, count: Int(request.length))
            if type == NBD.ChunkType.offsetData {
                data.setBuffer(payload, at: data.readerIndex + Int(at))
            } else {
                data.setRepeatingByte(0, count: count, at: data.readerIndex + Int(at))
            }
            request.collected = data
        case (NBD.ChunkType.blockStatus, .blockStatus):
            guard payload.readInteger(as: UInt32.self) == info.allocationContext, payload.readableBytes % 8 == 0, payload.readableBytes > 0 else {
                return violation(context, "the NBD server at \(peer) sent block status of another context or without descriptors")
            }
            request.collected = payload
        case (let t, _) where t & (1 << 15) != 0:
            guard let code = payload.readInteger(as: UInt32.self) else {
                return violation(context, "the NBD server at \(peer) sent an error chunk without an error")
            }
            if request.error == 0 { request.error = code == 0 ? UInt32(EIO) : code }
        default:
            return violation(context, "the NBD server at \(peer) sent reply chunk type \(type) to NBD command \(request.command)")
        }
        guard flags & NBD.chunkFlagDone != 0 else {
            inFlight[handle] = request
            return true
        }
        inFlight[handle] = nil
        if request.error != 0 {
            request.promise.fail(Self.requestFailed(request, errno: request.error, peer: peer))
        } else if request.command == .read {
            request.promise.succeed(request.collected ?? context.channel.allocator.buffer(repeating: 0, count: Int(request.length)))
        } else if request.command == .blockStatus {
            guard let descriptors = request.collected else {
                request.promise.fail(VolumeIOError(operation: "NBD block status at \(request.offset) on \(peer) (no descriptors)", errno: EIO))
                replied(context)
                return true
            }
            request.promise.succeed(descriptors)
        } else {
            request.promise.succeed(nil)
        }
        replied(context)
        return true
    }

    /// After each answered request: a disconnecting client closes once nothing is outstanding.
    private func replied(_ context: ChannelHandlerContext) {
        if disconnecting, inFlight.isEmpty, partialRead == nil {
            context.close(promise: nil)
        }
    }

    private static func requestFailed(_ request: InFlight, errno: UInt32, peer: String) -> VolumeIOError {
        let name: String
        switch request.command {
        case .read: name = "NBD read of \(request.length) bytes at \(request.offset)"
        case .write: name = "NBD write of \(request.length) bytes at \(request.offset)"
        case .writeZeroes: name = "NBD write-zeroes of \(request.length) bytes at \(request.offset)"
        case .flush: name = "NBD flush"
        case .blockStatus: name = "NBD block status of \(request.length) bytes at \(request.offset)"
        default: name = "NBD command \(request.command)"
        }
        // The protocol uses Linux errno values; anything out of range is reported as EIO.
        let code = errno < 4096 ? Int32(errno) : EIO
        return VolumeIOError(operation: name + " on \(peer)", errno: code)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        // The handler owns each request's promise from here on: the write promise only tells
        // the submitter that it was handed over.
        promise?.succeed()
        switch unwrapOutboundIn(data) {
        case .request(let request):
            guard phase == .transmission, !disconnecting, endReason == nil else {
                request.promise.fail(state.failure ?? endReason ?? lost("the connection is not usable"))
                return
            }
            let handle = nextHandle
            nextHandle &+= 1
            inFlight[handle] = InFlight(command: request.command, offset: request.offset, length: request.length, promise: request.promise)
            var header = context.channel.allocator.buffer(capacity: NBDRequest.size)
            header.writeInteger(NBD.requestMagic)
            header.writeInteger(request.flags)
            header.writeInteger(request.command.rawValue)
            header.writeInteger(handle)
            header.writeInteger(request.offset)
            header.writeInteger(request.length)
            let written = context.eventLoop.makePromise(of: Void.self)
            if let payload = request.payload {
                context.write(wrapOutboundOut(header), promise: nil)
                context.write(wrapOutboundOut(payload), promise: written)
            } else {
                context.write(wrapOutboundOut(header), promise: written)
            }
            // A write that failed leaves the stream unusable: end the connection.
            let channel = context.channel
            written.futureResult.assumeIsolated().whenFailure { [self] error in
                if endReason == nil { endReason = lost("sending a request failed: \(Self.describe(error))") }
                channel.close(promise: nil)
            }
        case .disconnect:
            guard phase == .transmission, !disconnecting else { return }
            disconnecting = true
            var header = context.channel.allocator.buffer(capacity: NBDRequest.size)
            header.writeInteger(NBD.requestMagic)
            header.writeInteger(UInt16(0))
            header.writeInteger(NBD.Command.disconnect.rawValue)
            header.writeInteger(nextHandle)
            header.writeInteger(UInt64(0))
            header.writeInteger(UInt32(0))
            nextHandle &+= 1
            // The server answers what is outstanding, then closes; we close once it has answered.
            if inFlight.isEmpty {
                let channel = context.channel
                context.writeAndFlush(wrapOutboundOut(header)).whenComplete { _ in channel.close(promise: nil) }
            } else {
                context.writeAndFlush(wrapOutboundOut(header), promise: nil)
            }
        }
    }

    // MARK: Ending

    private func lost(_ reason: String) -> FerryError {
        FerryError(.unavailable, "NBD connection to \(peer) lost: \(reason)")
    }

    /// A protocol violation by the server: nothing it sends can be trusted any more.
    private func violation(_ context: ChannelHandlerContext, _ message: String) -> Bool {
        let error = FerryError(.protocolViolation, message + "; connection closed")
        if phase == .transmission {
            if endReason == nil { endReason = error }
            state.end(error)
            connectionEnded(error)
            context.close(promise: nil)
        } else {
            failNegotiation(error, channel: context.channel)
        }
        return false
    }

    /// Fails every outstanding request (and the negotiation, if still going) with `reason`.
    private func connectionEnded(_ reason: FerryError) {
        timeoutTask?.cancel()
        timeoutTask = nil
        let reason = state.end(reason)
        if phase != .transmission && phase != .ended {
            negotiated.fail(reason)
        }
        phase = .ended
        // Those outstanding learn why the connection went (a client close says so too).
        let outstanding = endReason ?? reason
        if let partial = partialRead {
            partialRead = nil
            partial.request.promise.fail(outstanding)
        }
        let requests = inFlight
        inFlight = [:]
        for (_, request) in requests { request.promise.fail(outstanding) }
    }

    // MARK: Descriptions

    static func describe(_ error: any Error) -> String {
        if let error = error as? NIOSSLError, case .uncleanShutdown = error {
            return "the server closed the TLS connection without close_notify (NIOSSL uncleanShutdown)"
        }
        if let error = error as? FerryError { return error.message }
        if let error = error as? IOError { return String(cString: strerror(error.errnoCode)) }
        return String(describing: error)
    }

    static func serverText(_ data: ByteBuffer) -> String {
        guard data.readableBytes > 0, let text = data.getString(at: data.readerIndex, length: min(data.readableBytes, 4096)) else { return "" }
        return ": " + text
    }

    static func replyName(_ type: UInt32) -> String {
        switch type {
        case NBD.Reply.errUnsupported: return "NBD_REP_ERR_UNSUP"
        case NBD.Reply.errPolicy: return "NBD_REP_ERR_POLICY"
        case NBD.Reply.errInvalid: return "NBD_REP_ERR_INVALID"
        case NBD.Reply.errPlatform: return "NBD_REP_ERR_PLATFORM"
        case NBD.Reply.errTLSRequired: return "NBD_REP_ERR_TLS_REQD"
        case NBD.Reply.errUnknown: return "NBD_REP_ERR_UNKNOWN"
        case NBD.Reply.errShutdown: return "NBD_REP_ERR_SHUTDOWN"
        case NBD.Reply.errBlockSizeRequired: return "NBD_REP_ERR_BLOCK_SIZE_REQD"
        case NBD.Reply.errTooBig: return "NBD_REP_ERR_TOO_BIG"
        default: return "option reply error \(type & ~(1 << 31))"
        }
    }
}
