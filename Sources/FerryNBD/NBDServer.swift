import CFerrySystem
import FerryWire
import Foundation
import Logging
import NIOCore
import Synchronization

/// The agent's NBD export of its protected volumes: what the workload (a qemu guest disk, the
/// kernel client, libnbd tools) reads and writes through, so every write is captured in order.
///
/// Fixed-newstyle negotiation with EXPORT_NAME, LIST, INFO, GO, ABORT and STRUCTURED_REPLY;
/// READ, WRITE (with FUA), FLUSH, TRIM, WRITE_ZEROES and DISC; pipelined requests and several
/// connections per export (MULTI_CONN: a FLUSH covers them all).
///
/// Each connection is served by a thread of its own with blocking socket and file calls, as
/// nbdkit and qemu-nbd do: a request costs a few system calls and no hand-off between threads,
/// which is what a disk at hundreds of thousands of requests a second needs. The threads never
/// run on an event loop or on Swift concurrency's pool.
public final class NBDServer: Sendable {
    private let exports: Mutex<[String: any NBDExport]>
    private let logger: Logger
    /// Listening sockets and live connections, so stopping can interrupt their blocking calls.
    private let sockets = Mutex<(listeners: Set<Int32>, connections: Set<Int32>)>(([], []))
    /// A client that has not finished negotiating within this is dropped.
    static let negotiationTimeoutSeconds = 30
    /// Connections served at once (a thread each); more are closed as they come.
    let maxConnections: Int
    /// Who may use the unix socket: root, this process's user and these (checked with
    /// SO_PEERCRED on every connection, whatever the socket file's mode). With extra users the
    /// socket file is made 0666 so they can reach it; the check is the gate.
    let socketUsers: Set<UInt32>
    /// Threads of connections joined from elsewhere (`serve(connection:access:)`).
    private let joinedThreads = DispatchGroup()

    public init(volumes: [any NBDExport], logger: Logger, maxConnections: Int = 256, socketUsers: Set<UInt32> = []) {
        exports = Mutex(Dictionary(volumes.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first }))
        self.logger = logger
        self.maxConnections = maxConnections
        self.socketUsers = socketUsers
    }

    /// Whether the peer of a unix socket connection may use the exports.
    func admitsPeer(_ fd: Int32) -> Bool {
        var uid: UInt32 = .max
        guard ferry_peer_uid(fd, &uid) == 0 else { return false }
        guard uid == 0 || uid == geteuid() || socketUsers.contains(uid) else {
            logger.warning("NBD connection refused: the peer's user may not use this socket (add it to nbd-socket-users)", metadata: ["uid": "\(uid)"])
            return false
        }
        return true
    }

    /// Adds (or replaces) an export; connections made from now on see it.
    public func add(_ volume: any NBDExport) {
        exports.withLock { $0[volume.name] = volume }
    }

    /// Withdraws an export from new connections.
    public func remove(name: String) {
        exports.withLock { $0[name] = nil }
    }

    /// Serves on a unix socket (replacing a stale socket file) until the task is cancelled.
    public func serve(unixSocket path: String, onReady: @Sendable () -> Void = {}) async throws {
        unlink(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw FerryError(.io, "cannot create the NBD socket: \(String(cString: strerror(errno)))") }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            close(fd)
            throw FerryError(.badConfiguration, "NBD socket path \(path) is longer than a unix socket path may be")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0, listen(fd, 128) == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw FerryError(.io, "cannot listen on NBD socket \(path): \(reason)")
        }
        chmod(path, socketUsers.isEmpty ? 0o600 : 0o666)
        onReady()
        try await accept(on: fd, where: path, tcp: false)
    }

    /// Serves on TCP (normally loopback) until the task is cancelled; `onReady` gets the bound port.
    public func serve(host: String, port: Int, onReady: @Sendable (Int) -> Void = { _ in }) async throws {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_NUMERICSERV | AI_PASSIVE
        var found: UnsafeMutablePointer<addrinfo>?
        let status = getaddrinfo(host, String(port), &hints, &found)
        guard status == 0, let info = found else {
            throw FerryError(.badConfiguration, "cannot resolve NBD listen address \(host): \(String(cString: gai_strerror(status)))")
        }
        defer { freeaddrinfo(found) }
        let fd = socket(info.pointee.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw FerryError(.io, "cannot create the NBD socket: \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        guard bind(fd, info.pointee.ai_addr, info.pointee.ai_addrlen) == 0, listen(fd, 128) == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw FerryError(.io, "cannot listen for NBD on \(host):\(port): \(reason)")
        }
        var local = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &local) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        let family = local.ss_family
        let boundPort = withUnsafePointer(to: &local) { pointer -> Int in
            if family == sa_family_t(AF_INET6) {
                return pointer.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin6_port)) }
            }
            return pointer.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin_port)) }
        }
        onReady(boundPort)
        try await accept(on: fd, where: "\(host):\(boundPort)", tcp: true)
    }

    /// Accepts on a thread of its own until the task is cancelled; then stops accepting, ends
    /// every connection of this server and returns once their threads are done (so no write
    /// can reach the volume through this server afterwards).
    private func accept(on listener: Int32, where address: String, tcp: Bool) async throws {
        sockets.withLock { _ = $0.listeners.insert(listener) }
        logger.info("NBD export ready", metadata: ["address": "\(address)", "exports": "\(exports.withLock { $0.keys.sorted() })"])
        let failure = await withTaskCancellationHandler {
            await withCheckedContinuation { (done: CheckedContinuation<Int32?, Never>) in
                let thread = Thread { [self] in
                    ferry_name_thread("ferry-nbd-acpt")
                    done.resume(returning: acceptLoop(listener, tcp: tcp))
                }
                thread.start()
            }
        } onCancel: {
            stop(listener)
        }
        try Task.checkCancellation()
        if let failure {
            throw FerryError(.io, "NBD export \(address) stopped accepting connections: \(String(cString: strerror(failure)))")
        }
    }

    /// Returns nil once stopped, or the errno that made accepting impossible.
    private func acceptLoop(_ listener: Int32, tcp: Bool) -> Int32? {
        let threads = DispatchGroup()
        var failure: Int32?
        while true {
            let fd = ferry_accept(listener)
            if fd < 0 {
                let code = errno
                let listening = sockets.withLock { $0.listeners.contains(listener) }
                guard listening else { break } // shut down by `stop`
                switch code {
                case EINTR, ECONNABORTED:
                    continue
                case EMFILE, ENFILE, ENOBUFS, ENOMEM, EPROTO, EPERM:
                    // Transient: out of descriptors or memory, or a connection refused by policy.
                    logger.warning("NBD accept failed; retrying", metadata: ["error": "\(String(cString: strerror(code)))"])
                    usleep(100_000)
                    continue
                default:
                    failure = code
                }
                break
            }
            if tcp {
                var one: Int32 = 1
                setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            } else if !admitsPeer(fd) {
                close(fd)
                continue
            }
            // Registered under the lock `stop` takes: a connection accepted as the server stops
            // is either shut down by `stop` or never served.
            enum Admission { case served, full, stopped }
            let admission = sockets.withLock { s -> Admission in
                guard s.listeners.contains(listener) else { return .stopped }
                guard s.connections.count < maxConnections else { return .full }
                s.connections.insert(fd)
                return .served
            }
            if admission == .stopped { close(fd); break }
            if admission == .full {
                close(fd)
                logger.warning("NBD connection refused: already serving the most connections", metadata: ["limit": "\(maxConnections)"])
                continue
            }
            threads.enter()
            startConnectionThread(fd, access: .local) { threads.leave() }
        }
        stop(listener)
        sockets.withLock { s in
            s.listeners.remove(listener)
            close(listener)
        }
        threads.wait()
        joinedThreads.wait()
        return failure
    }

    /// Serves a connection made elsewhere (a network client joined after its TLS handshake and
    /// authentication) on a thread of its own, restricted by `access`. Takes the descriptor:
    /// it is closed when the connection ends, also when the server is full or stopping.
    public func serve(connection fd: Int32, access: NBDAccess) {
        let admitted = sockets.withLock { s -> Bool in
            // A server that stopped listening everywhere serves nothing new.
            guard !s.listeners.isEmpty, s.connections.count < maxConnections else { return false }
            s.connections.insert(fd)
            return true
        }
        guard admitted else {
            close(fd)
            logger.warning("NBD connection refused: the server is stopped or serving the most connections", metadata: ["limit": "\(maxConnections)"])
            return
        }
        joinedThreads.enter()
        startConnectionThread(fd, access: access) { [joinedThreads] in joinedThreads.leave() }
    }

    /// Serves a registered connection on a new thread; the descriptor is closed at its end.
    private func startConnectionThread(_ fd: Int32, access: NBDAccess, done: @escaping @Sendable () -> Void) {
        let thread = Thread { [self] in
            // Thread names are inherited on Linux; name it for `top -H` and profiles.
            ferry_name_thread("ferry-nbd")
            handle(fd, access: access)
            sockets.withLock { s in
                s.connections.remove(fd)
                close(fd)
            }
            done()
        }
        thread.start()
    }

    /// Stops accepting on `listener` and interrupts every connection's blocking calls.
    private func stop(_ listener: Int32) {
        sockets.withLock { s in
            if s.listeners.remove(listener) != nil { shutdown(listener, Int32(SHUT_RDWR)) }
            for fd in s.connections { shutdown(fd, Int32(SHUT_RDWR)) }
        }
    }

    /// One client connection. Any failure ends this connection only.
    func handle(_ fd: Int32, access: NBDAccess = .local) {
        let visible = exports.withLock { all in access.allowed == nil ? all : all.filter { access.permits($0.key) } }
        var connection = NBDConnection(socket: NBDSocket(fd: fd), exports: visible, access: access)
        do {
            connection.socket.setReadTimeout(seconds: Self.negotiationTimeoutSeconds)
            if let agreed = try connection.negotiate() {
                // An idle disk is normal: no timeout once the export is in use.
                connection.socket.setReadTimeout(seconds: 0)
                try connection.transmit(agreed)
            }
        } catch is NBDSocket.EndOfStream {
            // The client went away, possibly mid-request: nothing partial was applied.
        } catch {
            logger.info("NBD connection closed", metadata: ["reason": "\(error)"])
        }
    }
}

/// The state of one NBD connection: negotiation, then transmission.
struct NBDConnection: ~Copyable {
    var socket: NBDSocket
    let allocator = ByteBufferAllocator()
    let exports: [String: any NBDExport]
    var access: NBDAccess = .local

    static let transmissionFlags: UInt16 = NBD.TransmissionFlag.hasFlags | NBD.TransmissionFlag.sendFlush
        | NBD.TransmissionFlag.sendFUA | NBD.TransmissionFlag.sendTrim | NBD.TransmissionFlag.sendWriteZeroes
        | NBD.TransmissionFlag.canMultiConn

    static func flags(_ export: any NBDExport) -> UInt16 {
        export.isReadOnly ? NBD.TransmissionFlag.hasFlags | NBD.TransmissionFlag.sendFlush | NBD.TransmissionFlag.readOnly
            | NBD.TransmissionFlag.canMultiConn : transmissionFlags
    }

    // MARK: Negotiation

    /// What one connection's negotiation settled.
    struct Agreed {
        var volume: any NBDExport
        /// Structured replies were agreed.
        var structured: Bool
        /// `base:allocation` was selected for this export: block status is answered.
        var allocation: Bool
    }

    /// Runs the option haggling. Returns what was agreed, or nil if the client aborted.
    mutating func negotiate() throws -> Agreed? {
        var greeting = allocator.buffer(capacity: 18)
        greeting.writeInteger(NBD.initMagic)
        greeting.writeInteger(NBD.optionMagic)
        greeting.writeInteger(NBD.HandshakeFlag.fixedNewstyle | NBD.HandshakeFlag.noZeroes)
        try socket.write(greeting)

        let clientFlags = try socket.read(UInt32.self)
        guard clientFlags & NBD.ClientFlag.fixedNewstyle != 0 else {
            throw NBDProtocolError("client does not speak fixed newstyle negotiation")
        }
        let noZeroes = clientFlags & NBD.ClientFlag.noZeroes != 0
        var structured = false
        // The export SET_META_CONTEXT selected base:allocation for, if any.
        var allocationFor: String?

        while true {
            var header = try socket.read(16)
            let magic = header.readInteger(as: UInt64.self)!
            let option = header.readInteger(as: UInt32.self)!
            let length = Int(header.readInteger(as: UInt32.self)!)
            guard magic == NBD.optionMagic else { throw NBDProtocolError("bad option magic") }
            guard length <= NBD.maxOptionLength else {
                throw NBDProtocolError("option \(option) carries \(length) bytes, over \(NBD.maxOptionLength)")
            }
            var data = try socket.read(length)

            switch NBD.Option(rawValue: option) {
            case .exportName:
                let name = data.readString(length: data.readableBytes) ?? ""
                // The old way has no error reply: an unknown name closes the connection.
                guard let volume = lookup(name) else { throw NBDProtocolError("no export named '\(name)'") }
                access.observer?(.opened(export: volume.name))
                var reply = allocator.buffer(capacity: 134)
                reply.writeInteger(volume.size)
                reply.writeInteger(Self.flags(volume))
                if !noZeroes { reply.writeRepeatingByte(0, count: 124) }
                try socket.write(reply)
                return Agreed(volume: volume, structured: structured, allocation: structured && allocationFor == name)
            case .abort:
                try optionReply(option, NBD.Reply.ack)
                return nil
            case .list:
                guard length == 0 else { try optionReply(option, NBD.Reply.errInvalid, message: "LIST takes no data"); continue }
                for name in exports.keys.sorted() {
                    var entry = allocator.buffer(capacity: 4 + name.utf8.count)
                    entry.writeInteger(UInt32(name.utf8.count))
                    entry.writeString(name)
                    try optionReply(option, NBD.Reply.server, data: entry)
                }
                try optionReply(option, NBD.Reply.ack)
            case .info, .go:
                guard let nameLength = data.readInteger(as: UInt32.self), let name = data.readString(length: Int(nameLength)),
                      let count = data.readInteger(as: UInt16.self), data.readableBytes == Int(count) * 2
                else {
                    try optionReply(option, NBD.Reply.errInvalid, message: "malformed INFO/GO request")
                    continue
                }
                guard let volume = lookup(name) else {
                    try optionReply(option, NBD.Reply.errUnknown, message: "no export named '\(name)'")
                    continue
                }
                var export = allocator.buffer(capacity: 12)
                export.writeInteger(NBD.Info.export)
                export.writeInteger(volume.size)
                export.writeInteger(Self.flags(volume))
                try optionReply(option, NBD.Reply.info, data: export)
                var sizes = allocator.buffer(capacity: 14)
                sizes.writeInteger(NBD.Info.blockSize)
                sizes.writeInteger(UInt32(1))
                sizes.writeInteger(NBD.preferredBlockSize)
                sizes.writeInteger(UInt32(NBD.maxPayload))
                try optionReply(option, NBD.Reply.info, data: sizes)
                try optionReply(option, NBD.Reply.ack)
                if option == NBD.Option.go.rawValue {
                    access.observer?(.opened(export: volume.name))
                    return Agreed(volume: volume, structured: structured, allocation: structured && allocationFor == name)
                }
            case .structuredReply:
                guard length == 0 else { try optionReply(option, NBD.Reply.errInvalid, message: "STRUCTURED_REPLY takes no data"); continue }
                structured = true
                try optionReply(option, NBD.Reply.ack)
            case .listMetaContext, .setMetaContext:
                let isSet = option == NBD.Option.setMetaContext.rawValue
                guard let request = Self.metaContextRequest(&data) else {
                    try optionReply(option, NBD.Reply.errInvalid, message: "malformed META_CONTEXT request")
                    continue
                }
                guard !isSet || structured else {
                    try optionReply(option, NBD.Reply.errInvalid, message: "SET_META_CONTEXT needs structured replies first")
                    continue
                }
                guard lookup(request.export) != nil else {
                    try optionReply(option, NBD.Reply.errUnknown, message: "no export named '\(request.export)'")
                    continue
                }
                // An empty LIST asks for every context; "base:" names every one of the base namespace.
                let offered = request.queries.contains(NBD.allocationContext)
                    || (!isSet && (request.queries.isEmpty || request.queries.contains("base:")))
                if isSet { allocationFor = offered ? request.export : nil }
                if offered {
                    var context = allocator.buffer(capacity: 4 + NBD.allocationContext.utf8.count)
                    context.writeInteger(NBD.allocationContextID)
                    context.writeString(NBD.allocationContext)
                    try optionReply(option, NBD.Reply.metaContext, data: context)
                }
                try optionReply(option, NBD.Reply.ack)
            case .startTLS:
                // The export is local (unix socket or loopback); TLS is for the controller link.
                try optionReply(option, NBD.Reply.errPolicy, message: "TLS is not offered on the local export")
            case nil:
                try optionReply(option, NBD.Reply.errUnsupported)
            }
        }
    }

    /// A LIST/SET_META_CONTEXT request: the export, then the queries, each a length and a name.
    static func metaContextRequest(_ data: inout ByteBuffer) -> (export: String, queries: [String])? {
        guard let nameLength = data.readInteger(as: UInt32.self), nameLength <= 4096,
              let export = data.readString(length: Int(nameLength)),
              let count = data.readInteger(as: UInt32.self), count <= NBD.maxMetaQueries else { return nil }
        var queries: [String] = []
        for _ in 0..<count {
            guard let length = data.readInteger(as: UInt32.self), length <= 4096,
                  let query = data.readString(length: Int(length)) else { return nil }
            queries.append(query)
        }
        return data.readableBytes == 0 ? (export, queries) : nil
    }

    /// The default export ("") is the only one when there is exactly one (local sockets only).
    /// A name this connection may not open is reported, and answered as if it did not exist.
    func lookup(_ name: String) -> (any NBDExport)? {
        if let volume = exports[name] { return volume }
        if name.isEmpty, access.offersDefaultExport, exports.count == 1 { return exports.values.first }
        access.observer?(.refused(export: name))
        return nil
    }

    mutating func optionReply(_ option: UInt32, _ type: UInt32, data: ByteBuffer? = nil, message: String? = nil) throws {
        var payload = data ?? ByteBuffer()
        if let message, data == nil { payload = allocator.buffer(string: message) }
        var reply = allocator.buffer(capacity: 20 + payload.readableBytes)
        reply.writeInteger(NBD.optionReplyMagic)
        reply.writeInteger(option)
        reply.writeInteger(type)
        reply.writeInteger(UInt32(payload.readableBytes))
        reply.writeBuffer(&payload)
        try socket.write(reply)
    }

    // MARK: Transmission

    /// Requests the client pipelined are served in order, one after the other, and their
    /// replies go out together once no further whole request is waiting in the socket buffer
    /// (or a megabyte of them is queued).
    mutating func transmit(_ agreed: Agreed) throws {
        let volume = agreed.volume
        let replies = Replies(allocator: allocator, structured: agreed.structured, allocation: agreed.allocation)
        do {
            while true {
                var header = try socket.read(NBDRequest.size)
                let request = try NBDRequest(parsing: &header)
                var payload: ByteBuffer?
                if request.type == NBD.Command.write.rawValue {
                    // The payload follows the header whatever we think of the request; one too
                    // large to buffer safely ends the connection instead.
                    guard request.length <= NBD.maxPayload else {
                        throw NBDProtocolError("write of \(request.length) bytes exceeds the \(NBD.maxPayload)-byte maximum")
                    }
                    payload = try socket.readOwned(Int(request.length))
                }
                if request.type == NBD.Command.disconnect.rawValue {
                    // DISC: what came before is answered; then close.
                    try socket.flush()
                    return
                }
                if request.type != NBD.Command.read.rawValue, volume.holdsWrites {
                    // This request may wait for a cut's hold: what is already done goes out first.
                    try socket.flush()
                }
                var out: [ByteBuffer] = []
                Self.execute(request, payload: payload, volume: volume, replies: replies, into: &out)
                socket.queue(out)
                if socket.repliesFull || !socket.hasWholeRequest { try socket.flush() }
            }
        } catch let error as NBDProtocolError {
            // Requests served before the bad one still get their answers.
            try? socket.flush()
            throw error
        }
    }

    /// What to do with one request: an operation on the volume, or an immediate error reply.
    enum Plan {
        case run(NBDOperation)
        /// Block status of `[offset, offset + length)`; `one`: a single extent is enough.
        case status(offset: UInt64, length: UInt64, one: Bool)
        case fail(NBD.Errno, String)
        case nothing
    }

    static func plan(_ request: NBDRequest, payload: ByteBuffer?, volume: any NBDExport, allocation: Bool = false) -> Plan {
        guard let command = NBD.Command(rawValue: request.type) else { return .fail(.invalid, "unknown command \(request.type)") }
        let fua = request.flags & NBD.CommandFlag.fua != 0
        let (end, overflow) = request.offset.addingReportingOverflow(UInt64(request.length))
        let inBounds = !overflow && end <= volume.size
        if volume.isReadOnly, command == .write || command == .writeZeroes || command == .trim {
            return .fail(.perm, "the export is read-only")
        }
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
        case .blockStatus:
            guard allocation else { return .fail(.invalid, "block status needs base:allocation selected with SET_META_CONTEXT") }
            guard inBounds, request.length > 0 else { return .fail(.invalid, "block status of an empty range or past the end of the export") }
            return .status(offset: request.offset, length: UInt64(request.length), one: request.flags & NBD.CommandFlag.reqOne != 0)
        case .disconnect, .cache:
            return .fail(.invalid, "command \(request.type) not offered")
        }
    }

    static func execute(_ request: NBDRequest, payload: ByteBuffer?, volume: any NBDExport, replies: Replies, into out: inout [ByteBuffer]) {
        // Errors of these carry a message in a structured reply.
        let isRead = request.type == NBD.Command.read.rawValue || request.type == NBD.Command.blockStatus.rawValue
        switch plan(request, payload: payload, volume: volume, allocation: replies.allocation) {
        case .fail(let code, let message):
            replies.error(request.cookie, code, isRead: isRead, message: message, into: &out)
        case .nothing:
            replies.done(request.cookie, into: &out)
        case .status(let offset, let length, let one):
            switch volume.allocation(offset: offset, length: length, limit: one ? 1 : NBD.maxExtentsPerReply) {
            case .success(let extents):
                replies.blockStatus(request.cookie, extents: Self.answerable(extents, length: length, one: one), into: &out)
            case .failure(let error):
                replies.error(request.cookie, .io, isRead: true, message: error.description, into: &out)
            }
        case .run(let operation):
            switch volume.performNow(operation, allocator: replies.allocator) {
            case .success(let data?): replies.read(request.cookie, offset: request.offset, data: data, into: &out)
            case .success(nil): replies.done(request.cookie, into: &out)
            case .failure(let error):
                replies.error(request.cookie, error.errno == ENOSPC ? .noSpace : .io, isRead: isRead, message: error.description, into: &out)
            }
        }
    }
}

extension NBDConnection {
    /// What an export's map becomes on the wire: within the request, no empty extent, each
    /// under 4 GiB (the field is 32 bits; a request is too), one if the client asked for one.
    static func answerable(_ extents: [NBDExtent], length: UInt64, one: Bool) -> [NBDExtent] {
        var out: [NBDExtent] = []
        var left = length
        for e in extents where e.length > 0 && left > 0 {
            let n = min(e.length, left, UInt64(UInt32.max))
            out.append(NBDExtent(length: n, flags: e.flags))
            left -= n
            if one || n < e.length { break }
        }
        return out.isEmpty ? [NBDExtent(length: min(length, UInt64(UInt32.max)), flags: 0)] : out
    }
}

/// Builds transmission replies.
struct Replies: Sendable {
    let allocator: ByteBufferAllocator
    let structured: Bool
    var allocation = false

    func blockStatus(_ cookie: UInt64, extents: [NBDExtent], into out: inout [ByteBuffer]) {
        var reply = allocator.buffer(capacity: 24 + 8 * extents.count)
        chunk(&reply, cookie: cookie, type: NBD.ChunkType.blockStatus, length: 4 + 8 * extents.count)
        reply.writeInteger(NBD.allocationContextID)
        for e in extents {
            reply.writeInteger(UInt32(e.length))
            reply.writeInteger(e.flags)
        }
        out.append(reply)
    }

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
