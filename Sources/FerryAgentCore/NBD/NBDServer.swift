import FerryWire
import Logging
import NIOCore
import NIOPosix
import Synchronization

/// The agent's NBD export of its protected volumes: what the workload (a qemu guest disk, the
/// kernel client, libnbd tools) reads and writes through, so every write is captured in order.
///
/// Fixed-newstyle negotiation with EXPORT_NAME, LIST, INFO, GO, ABORT and STRUCTURED_REPLY;
/// READ, WRITE (with FUA), FLUSH, TRIM, WRITE_ZEROES and DISC; several requests in flight per
/// connection and several connections per export (MULTI_CONN: a FLUSH covers them all).
public final class NBDServer: Sendable {
    private let exports: Mutex<[String: BlockVolume]>
    private let logger: Logger
    private let group: any EventLoopGroup
    /// Requests handled at once on one connection; the reader stops reading beyond it.
    static let maxInFlight = 64

    public init(volumes: [BlockVolume], logger: Logger, group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) {
        exports = Mutex(Dictionary(volumes.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first }))
        self.logger = logger
        self.group = group
    }

    /// Adds (or replaces) an export; connections made from now on see it.
    public func add(_ volume: BlockVolume) {
        exports.withLock { $0[volume.name] = volume }
    }

    /// Withdraws an export from new connections.
    public func remove(name: String) {
        exports.withLock { $0[name] = nil }
    }

    /// Serves on a unix socket (replacing a stale socket file) until the task is cancelled.
    public func serve(unixSocket path: String, onReady: @Sendable () -> Void = {}) async throws {
        unlink(path)
        let server = try await ServerBootstrap(group: group)
            .childChannelOption(.recvAllocator, value: Self.receiveBuffers)
            .bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true) { channel in
                channel.eventLoop.makeCompletedFuture { try Self.asyncChannel(channel) }
            }
        chmod(path, 0o600)
        try await accept(server, onReady: onReady, where: path)
    }

    /// Serves on TCP (normally loopback) until the task is cancelled; `onReady` gets the bound port.
    public func serve(host: String, port: Int, onReady: @Sendable (Int) -> Void = { _ in }) async throws {
        let server = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.recvAllocator, value: Self.receiveBuffers)
            .bind(host: host, port: port) { channel in
                channel.eventLoop.makeCompletedFuture { try Self.asyncChannel(channel) }
            }
        let bound = server.channel.localAddress?.port ?? port
        try await accept(server, onReady: { onReady(bound) }, where: "\(host):\(bound)")
    }

    /// Writes come in bursts of up to 32 MiB: read up to 1 MiB at a time (NIO's default stops
    /// at 64 KiB), so a large write is a few reads and a few trips through the inbound stream.
    static let receiveBuffers = AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 64 << 10, maximum: 1 << 20)

    static func asyncChannel(_ channel: any Channel) throws -> NIOAsyncChannel<ByteBuffer, ByteBuffer> {
        try NIOAsyncChannel(wrappingChannelSynchronously: channel,
                            configuration: .init(backPressureStrategy: .init(lowWatermark: 4, highWatermark: 16)))
    }

    private func accept(
        _ server: NIOAsyncChannel<NIOAsyncChannel<ByteBuffer, ByteBuffer>, Never>,
        onReady: @Sendable () -> Void,
        where address: String
    ) async throws {
        try await server.executeThenClose { clients in
            onReady()
            logger.info("NBD export ready", metadata: ["address": "\(address)", "exports": "\(exports.withLock { $0.keys.sorted() })"])
            try await withThrowingDiscardingTaskGroup { group in
                for try await client in clients {
                    group.addTask { await self.handle(client) }
                }
            }
        }
    }

    /// One client connection. Any failure ends this connection only.
    func handle(_ client: NIOAsyncChannel<ByteBuffer, ByteBuffer>) async {
        do {
            try await client.executeThenClose { inbound, outbound in
                var connection = NBDConnection(
                    reader: InboundReader(inbound.makeAsyncIterator()), outbound: outbound,
                    allocator: client.channel.allocator, exports: exports.withLock { $0 }
                )
                if let (volume, structured) = try await connection.negotiate() {
                    try await connection.transmit(volume: volume, structured: structured)
                }
            }
        } catch is InboundReader.EndOfStream {
            // The client went away, possibly mid-request: nothing partial was applied.
        } catch {
            logger.info("NBD connection closed", metadata: ["reason": "\(error)"])
        }
    }
}

/// Reads exact byte counts from a connection's inbound stream.
struct InboundReader {
    struct EndOfStream: Error {}

    private var iterator: NIOAsyncChannelInboundStream<ByteBuffer>.AsyncIterator
    private var buffer = ByteBuffer()

    init(_ iterator: NIOAsyncChannelInboundStream<ByteBuffer>.AsyncIterator) { self.iterator = iterator }

    mutating func read(_ count: Int) async throws -> ByteBuffer {
        if buffer.readableBytes >= count { return buffer.readSlice(length: count)! }
        // Assemble into a buffer sized for the whole request: each byte is copied once, and
        // never into storage a slice handed out earlier still shares (that would copy it all).
        var assembled = buffer.readableBytes > 0 ? ByteBufferAllocator().buffer(capacity: count) : ByteBuffer()
        assembled.writeBuffer(&buffer)
        while assembled.readableBytes < count {
            guard var chunk = try await iterator.next() else { throw EndOfStream() }
            if assembled.readableBytes == 0 && (chunk.readableBytes >= count || assembled.capacity == 0) {
                assembled = chunk
                if assembled.readableBytes < count {
                    var grown = ByteBufferAllocator().buffer(capacity: count)
                    grown.writeBuffer(&assembled)
                    assembled = grown
                }
            } else {
                assembled.writeBuffer(&chunk)
            }
        }
        buffer = assembled
        return buffer.readSlice(length: count)!
    }

    /// Whether a whole transmission request (header, and payload for a write) is buffered
    /// already, so it can join the batch being formed without waiting.
    func hasWholeRequest() -> Bool {
        guard buffer.readableBytes >= NBDRequest.size,
              let type = buffer.getInteger(at: buffer.readerIndex + 6, as: UInt16.self),
              let length = buffer.getInteger(at: buffer.readerIndex + 24, as: UInt32.self)
        else { return false }
        return type != NBD.Command.write.rawValue || buffer.readableBytes >= NBDRequest.size + Int(length)
    }

    mutating func read<T: FixedWidthInteger>(_ type: T.Type) async throws -> T {
        var bytes = try await read(MemoryLayout<T>.size)
        return bytes.readInteger(as: T.self)!
    }
}

/// The state of one NBD connection: negotiation, then transmission.
struct NBDConnection {
    var reader: InboundReader
    let outbound: NIOAsyncChannelOutboundWriter<ByteBuffer>
    let allocator: ByteBufferAllocator
    let exports: [String: BlockVolume]

    static let transmissionFlags: UInt16 = NBD.TransmissionFlag.hasFlags | NBD.TransmissionFlag.sendFlush
        | NBD.TransmissionFlag.sendFUA | NBD.TransmissionFlag.sendTrim | NBD.TransmissionFlag.sendWriteZeroes
        | NBD.TransmissionFlag.canMultiConn

    // MARK: Negotiation

    /// Runs the option haggling. Returns the export and whether structured replies were agreed,
    /// or nil if the client aborted.
    mutating func negotiate() async throws -> (BlockVolume, Bool)? {
        var greeting = allocator.buffer(capacity: 18)
        greeting.writeInteger(NBD.initMagic)
        greeting.writeInteger(NBD.optionMagic)
        greeting.writeInteger(NBD.HandshakeFlag.fixedNewstyle | NBD.HandshakeFlag.noZeroes)
        try await outbound.write(greeting)

        let clientFlags = try await reader.read(UInt32.self)
        guard clientFlags & NBD.ClientFlag.fixedNewstyle != 0 else {
            throw NBDProtocolError("client does not speak fixed newstyle negotiation")
        }
        let noZeroes = clientFlags & NBD.ClientFlag.noZeroes != 0
        var structured = false

        while true {
            var header = try await reader.read(16)
            let magic = header.readInteger(as: UInt64.self)!
            let option = header.readInteger(as: UInt32.self)!
            let length = Int(header.readInteger(as: UInt32.self)!)
            guard magic == NBD.optionMagic else { throw NBDProtocolError("bad option magic") }
            guard length <= NBD.maxOptionLength else {
                throw NBDProtocolError("option \(option) carries \(length) bytes, over \(NBD.maxOptionLength)")
            }
            var data = try await reader.read(length)

            switch NBD.Option(rawValue: option) {
            case .exportName:
                let name = data.readString(length: data.readableBytes) ?? ""
                // The old way has no error reply: an unknown name closes the connection.
                guard let volume = lookup(name) else { throw NBDProtocolError("no export named '\(name)'") }
                var reply = allocator.buffer(capacity: 134)
                reply.writeInteger(volume.size)
                reply.writeInteger(Self.transmissionFlags)
                if !noZeroes { reply.writeRepeatingByte(0, count: 124) }
                try await outbound.write(reply)
                return (volume, structured)
            case .abort:
                try await optionReply(option, NBD.Reply.ack)
                return nil
            case .list:
                guard length == 0 else { try await optionReply(option, NBD.Reply.errInvalid, message: "LIST takes no data"); continue }
                for name in exports.keys.sorted() {
                    var entry = allocator.buffer(capacity: 4 + name.utf8.count)
                    entry.writeInteger(UInt32(name.utf8.count))
                    entry.writeString(name)
                    try await optionReply(option, NBD.Reply.server, data: entry)
                }
                try await optionReply(option, NBD.Reply.ack)
            case .info, .go:
                guard let nameLength = data.readInteger(as: UInt32.self), let name = data.readString(length: Int(nameLength)),
                      let count = data.readInteger(as: UInt16.self), data.readableBytes == Int(count) * 2
                else {
                    try await optionReply(option, NBD.Reply.errInvalid, message: "malformed INFO/GO request")
                    continue
                }
                guard let volume = lookup(name) else {
                    try await optionReply(option, NBD.Reply.errUnknown, message: "no export named '\(name)'")
                    continue
                }
                var export = allocator.buffer(capacity: 12)
                export.writeInteger(NBD.Info.export)
                export.writeInteger(volume.size)
                export.writeInteger(Self.transmissionFlags)
                try await optionReply(option, NBD.Reply.info, data: export)
                var sizes = allocator.buffer(capacity: 14)
                sizes.writeInteger(NBD.Info.blockSize)
                sizes.writeInteger(UInt32(1))
                sizes.writeInteger(NBD.preferredBlockSize)
                sizes.writeInteger(UInt32(NBD.maxPayload))
                try await optionReply(option, NBD.Reply.info, data: sizes)
                try await optionReply(option, NBD.Reply.ack)
                if option == NBD.Option.go.rawValue { return (volume, structured) }
            case .structuredReply:
                guard length == 0 else { try await optionReply(option, NBD.Reply.errInvalid, message: "STRUCTURED_REPLY takes no data"); continue }
                structured = true
                try await optionReply(option, NBD.Reply.ack)
            case .startTLS:
                // The export is local (unix socket or loopback); TLS is for the controller link.
                try await optionReply(option, NBD.Reply.errPolicy, message: "TLS is not offered on the local export")
            case nil:
                try await optionReply(option, NBD.Reply.errUnsupported)
            }
        }
    }

    /// The default export ("") is the only one when there is exactly one.
    func lookup(_ name: String) -> BlockVolume? {
        if let volume = exports[name] { return volume }
        return name.isEmpty && exports.count == 1 ? exports.values.first : nil
    }

    func optionReply(_ option: UInt32, _ type: UInt32, data: ByteBuffer? = nil, message: String? = nil) async throws {
        var payload = data ?? ByteBuffer()
        if let message, data == nil { payload = allocator.buffer(string: message) }
        var reply = allocator.buffer(capacity: 20 + payload.readableBytes)
        reply.writeInteger(NBD.optionReplyMagic)
        reply.writeInteger(option)
        reply.writeInteger(type)
        reply.writeInteger(UInt32(payload.readableBytes))
        reply.writeBuffer(&payload)
        try await outbound.write(reply)
    }

    // MARK: Transmission

    /// Requests pipelined by the client and already received are executed as one batch: one
    /// trip to the I/O threads and one write of all their replies, instead of one each.
    static let maxBatch = 64
    static let maxBatchBytes = 32 << 20

    mutating func transmit(volume: BlockVolume, structured: Bool) async throws {
        let replies = Replies(outbound: outbound, allocator: allocator, structured: structured)
        try await withThrowingTaskGroup(of: Int.self) { tasks in
            var inFlight = 0
            var disconnect = false
            while !disconnect {
                var batch: [(NBDRequest, ByteBuffer?)] = []
                var bytes = 0
                repeat {
                    var header = try await reader.read(NBDRequest.size)
                    let request = try NBDRequest(parsing: &header)
                    var payload: ByteBuffer?
                    if request.type == NBD.Command.write.rawValue {
                        // The payload follows the header whatever we think of the request; one
                        // too large to buffer safely ends the connection instead.
                        guard request.length <= NBD.maxPayload else {
                            throw NBDProtocolError("write of \(request.length) bytes exceeds the \(NBD.maxPayload)-byte maximum")
                        }
                        payload = try await reader.read(Int(request.length))
                    }
                    if request.type == NBD.Command.disconnect.rawValue {
                        disconnect = true
                        break
                    }
                    batch.append((request, payload))
                    bytes += Int(request.length)
                } while batch.count < Self.maxBatch && bytes < Self.maxBatchBytes && reader.hasWholeRequest()
                guard !batch.isEmpty else { break }
                while inFlight + batch.count > NBDServer.maxInFlight, inFlight > 0 {
                    inFlight -= try await tasks.next() ?? 0
                }
                inFlight += batch.count
                let requests = batch
                tasks.addTask {
                    try await Self.execute(requests, volume: volume, replies: replies)
                    return requests.count
                }
            }
            // DISC: finish what is in flight, then close.
            try await tasks.waitForAll()
        }
    }

    /// What to do with one request: an operation on the volume, or an immediate error reply.
    enum Plan {
        case run(BlockVolume.Operation)
        case fail(NBD.Errno, String)
        case nothing
    }

    static func plan(_ request: NBDRequest, payload: ByteBuffer?, volume: BlockVolume) -> Plan {
        guard let command = NBD.Command(rawValue: request.type) else { return .fail(.invalid, "unknown command \(request.type)") }
        let fua = request.flags & NBD.CommandFlag.fua != 0
        let (end, overflow) = request.offset.addingReportingOverflow(UInt64(request.length))
        let inBounds = !overflow && end <= volume.size
        switch command {
        case .read:
            guard request.length <= NBD.maxPayload else { return .fail(.overflow, "read of \(request.length) bytes exceeds \(NBD.maxPayload)") }
            guard inBounds else { return .fail(.invalid, "read past the end of the export") }
            return .run(.read(offset: request.offset, length: Int(request.length)))
        case .write:
            guard inBounds, let payload else { return .fail(.noSpace, "write past the end of the export") }
            // An empty write changes nothing and records nothing.
            return request.length > 0 ? .run(.write(offset: request.offset, data: payload, fua: fua)) : .nothing
        case .writeZeroes, .trim:
            guard inBounds else { return .fail(.noSpace, "request past the end of the export") }
            return request.length > 0 ? .run(.zero(offset: request.offset, length: UInt64(request.length), fua: fua)) : .nothing
        case .flush:
            return .run(.flush)
        case .disconnect, .cache, .blockStatus:
            return .fail(.invalid, "command \(request.type) not offered")
        }
    }

    static func execute(_ batch: [(NBDRequest, ByteBuffer?)], volume: BlockVolume, replies: Replies) async throws {
        let plans = batch.map { plan($0.0, payload: $0.1, volume: volume) }
        let operations = plans.compactMap { if case .run(let op) = $0 { op } else { nil } }
        var outcomes = operations.isEmpty ? [] : try await volume.perform(operations, allocator: replies.allocator)[...]
        var out: [ByteBuffer] = []
        out.reserveCapacity(batch.count * 2)
        for ((request, _), plan) in zip(batch, plans) {
            let isRead = request.type == NBD.Command.read.rawValue
            switch plan {
            case .fail(let code, let message):
                replies.error(request.cookie, code, isRead: isRead, message: message, into: &out)
            case .nothing:
                replies.done(request.cookie, into: &out)
            case .run:
                switch outcomes.removeFirst() {
                case .success(let data?): replies.read(request.cookie, offset: request.offset, data: data, into: &out)
                case .success(nil): replies.done(request.cookie, into: &out)
                case .failure(let error):
                    replies.error(request.cookie, error.errno == ENOSPC ? .noSpace : .io, isRead: isRead, message: error.description, into: &out)
                }
            }
        }
        try await replies.outbound.write(contentsOf: out)
    }
}

/// Builds transmission replies; a batch's replies go out in one write, so replies of concurrent
/// batches never interleave.
struct Replies: Sendable {
    let outbound: NIOAsyncChannelOutboundWriter<ByteBuffer>
    let allocator: ByteBufferAllocator
    let structured: Bool

    func done(_ cookie: UInt64, into out: inout [ByteBuffer]) {
        out.append(simple(cookie, error: 0))
    }

    func read(_ cookie: UInt64, offset: UInt64, data: ByteBuffer, into out: inout [ByteBuffer]) {
        guard structured else {
            out.append(simple(cookie, error: 0))
            out.append(data)
            return
        }
        var header = allocator.buffer(capacity: 28)
        if data.readableBytes == 0 {
            chunk(&header, cookie: cookie, type: NBD.ChunkType.none, length: 0)
            out.append(header)
            return
        }
        chunk(&header, cookie: cookie, type: NBD.ChunkType.offsetData, length: 8 + data.readableBytes)
        header.writeInteger(offset)
        out.append(header)
        out.append(data)
    }

    func error(_ cookie: UInt64, _ code: NBD.Errno, isRead: Bool, message: String, into out: inout [ByteBuffer]) {
        guard structured && isRead else {
            out.append(simple(cookie, error: code.rawValue))
            return
        }
        let text = String(message.utf8.prefix(4096)) ?? "error"
        var reply = allocator.buffer(capacity: 26 + text.utf8.count)
        chunk(&reply, cookie: cookie, type: NBD.ChunkType.error, length: 6 + text.utf8.count)
        reply.writeInteger(code.rawValue)
        reply.writeInteger(UInt16(text.utf8.count))
        reply.writeString(text)
        out.append(reply)
    }

    private func simple(_ cookie: UInt64, error: UInt32) -> ByteBuffer {
        var reply = allocator.buffer(capacity: 16)
        reply.writeInteger(NBD.simpleReplyMagic)
        reply.writeInteger(error)
        reply.writeInteger(cookie)
        return reply
    }

    private func chunk(_ buffer: inout ByteBuffer, cookie: UInt64, type: UInt16, length: Int) {
        buffer.writeInteger(NBD.structuredReplyMagic)
        buffer.writeInteger(NBD.chunkFlagDone)
        buffer.writeInteger(type)
        buffer.writeInteger(cookie)
        buffer.writeInteger(UInt32(length))
    }
}
