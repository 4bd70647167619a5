import Foundation
import Logging
import NIOCore
import NIOSSL
import Synchronization

/// Adds Ferry's framing to a channel whose TLS handler is already in place.
public enum FramedPipeline {
    public static func configure(_ channel: any Channel, limit: FrameLimit) throws {
        // Replication streams are bulk: read up to 256 KiB at a time, not NIO's default 64 KiB.
        try channel.syncOptions?.setOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 2048, maximum: 256 << 10))
        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(FrameDecoder(limit: limit)))
        try channel.pipeline.syncOperations.addHandler(FrameWriter())
    }

    public static func asyncChannel(_ channel: any Channel) throws -> NIOAsyncChannel<ByteBuffer, ByteBuffer> {
        // A replication batch arrives as a message and its attached frames: let a few more
        // frames queue than NIO's default before reading pauses. Each is capped by the frame
        // limit, so this bounds what one peer can make the receiver hold (16 frames).
        try NIOAsyncChannel(wrappingChannelSynchronously: channel, configuration: .init(backPressureStrategy: .init(lowWatermark: 4, highWatermark: 16)))
    }
}

/// One side of an established agent session: sends and receives envelopes, correlates replies
/// with requests, sends heartbeats and declares the peer dead after three silent intervals.
///
/// Used by both the agent and the controller, so the two sides cannot drift apart.
public final class PeerSession: Sendable {
    public let channel: any Channel
    public let remoteDescription: String
    private let outbound: NIOAsyncChannelOutboundWriter<ByteBuffer>
    /// Requests awaiting their reply. Whoever removes an entry completes its promise, so each
    /// promise is completed exactly once (reply, timeout, cancellation or close).
    private let pending = Mutex<[UInt64: EventLoopPromise<Ferry_V1_Envelope>]>([:])
    private let nextID = Atomic<UInt64>(1)
    private let lastReceived = Atomic<UInt64>(0)
    private let closed = Atomic<Bool>(false)
    /// The session has ended (its connection is gone); it may still be registered for a moment.
    public var isClosed: Bool { closed.load(ordering: .relaxed) }
    private let attachmentsAccepted = Atomic<Bool>(false)
    /// Bandwidth limits on what this session reads and on the bulk messages it sends.
    private let throttles = Mutex<(inbound: (any ByteThrottle)?, outbound: (any ByteThrottle)?)>((nil, nil))
    /// Set while the read loop waits for its inbound limit: the peer is not silent then, this
    /// side is not reading.
    private let throttling = Atomic<Bool>(false)
    /// Messages at least this large go through the outbound limit (bulk data, not control).
    public static let throttledMessageBytes = 16 << 10

    public init(channel: any Channel, outbound: NIOAsyncChannelOutboundWriter<ByteBuffer>) {
        self.channel = channel
        self.outbound = outbound
        self.remoteDescription = channel.remoteAddress.map { Self.describe($0) } ?? "unknown"
        markReceived()
    }

    /// `ip:port` of a socket address.
    public static func describe(_ address: SocketAddress) -> String {
        guard let ip = address.ipAddress, let port = address.port else { return "\(address)" }
        return address.protocol == .inet6 ? "[\(ip)]:\(port)" : "\(ip):\(port)"
    }

    private func markReceived() {
        lastReceived.store(DispatchTime.now().uptimeNanoseconds, ordering: .relaxed)
    }

    /// Time since the peer last sent anything.
    public var silence: Duration {
        let last = lastReceived.load(ordering: .relaxed)
        let now = DispatchTime.now().uptimeNanoseconds
        // The read loop may store a newer time between the two loads.
        return .nanoseconds(now > last ? Int64(now - last) : 0)
    }

    /// Sends a message that expects no reply.
    public func send(_ body: Ferry_V1_Envelope.OneOf_Body, inReplyTo: UInt64 = 0) async throws {
        try await write(.with(inReplyTo: inReplyTo, body))
    }

    /// Sends a reply ahead of whatever this session's other senders have queued: straight into
    /// the channel, not behind the replication batches waiting in the outbound writer. For
    /// control answers whose order relative to those batches does not matter (a cut's answer
    /// names the sequences it cut at; the records themselves may still be on their way). A
    /// batch's frames are written to the channel together, so this never lands inside one.
    public func sendAhead(_ body: Ferry_V1_Envelope.OneOf_Body, inReplyTo: UInt64) async throws {
        let frame = try Ferry_V1_Envelope.with(inReplyTo: inReplyTo, body).frame(allocator: channel.allocator)
        try await channel.writeAndFlush(frame)
    }

    /// Puts this session's traffic under bandwidth limits: every message read (with its
    /// attached frames) waits for `inbound` before it is handled, so a limited peer's stream
    /// is slowed by TCP's own flow control; messages of at least `throttledMessageBytes` wait
    /// for `outbound` before they are written.
    public func throttle(inbound: (any ByteThrottle)?, outbound: (any ByteThrottle)?) {
        throttles.withLock { $0 = (inbound, outbound) }
    }

    private func admitOutbound(_ bytes: Int) async {
        guard bytes >= Self.throttledMessageBytes, let outbound = throttles.withLock({ $0.outbound }) else { return }
        await outbound.admit(bytes)
    }

    /// Whether the peer said it reads attached frames (a controller's Welcome does); until it
    /// has, bulk data must travel inside the messages.
    public var peerAcceptsAttachments: Bool {
        get { attachmentsAccepted.load(ordering: .relaxed) }
        set { attachmentsAccepted.store(newValue, ordering: .relaxed) }
    }

    /// Sends a message followed by raw frames that belong to it (bulk data that is neither
    /// copied into nor parsed out of protobuf). The frames are queued together, so no other
    /// message of this session can come between them.
    public func send(_ body: Ferry_V1_Envelope.OneOf_Body, attachments: [ByteBuffer]) async throws {
        guard !attachments.isEmpty else { return try await send(body) }
        precondition(attachments.count <= Attachments.maxCount, "too many attachments for one message")
        var envelope = Ferry_V1_Envelope.with(body)
        envelope.attachments = UInt32(attachments.count)
        var frames = [try envelope.frame(allocator: channel.allocator)]
        frames.append(contentsOf: attachments)
        await admitOutbound(frames.reduce(0) { $0 + $1.readableBytes })
        try await outbound.write(contentsOf: frames)
    }

    private func write(_ envelope: Ferry_V1_Envelope) async throws {
        let frame = try envelope.frame(allocator: channel.allocator)
        await admitOutbound(frame.readableBytes)
        try await outbound.write(frame)
    }

    /// Sends a request and waits for the envelope whose `in_reply_to` names it. An `Error` reply
    /// is thrown as a `FerryError`. The request is written before this returns control, so it keeps
    /// its order relative to the caller's other sends.
    public func request(_ body: Ferry_V1_Envelope.OneOf_Body, timeout: Duration) async throws -> Ferry_V1_Envelope {
        let id = nextID.add(1, ordering: .relaxed).oldValue
        let promise = channel.eventLoop.makePromise(of: Ferry_V1_Envelope.self)
        pending.withLock { $0[id] = promise }
        if closed.load(ordering: .relaxed) {
            fail(id, FerryError(.unavailable, "session with \(remoteDescription) is closed"))
        }
        let timer = channel.eventLoop.scheduleTask(in: .nanoseconds(Int64(timeout.seconds * 1e9))) {
            self.fail(id, FerryError(.timeout, "no reply from \(self.remoteDescription) within \(timeout)"))
        }
        defer { timer.cancel() }
        do {
            try await write(.with(id: id, body))
        } catch {
            fail(id, error)
        }
        let reply = try await withTaskCancellationHandler {
            try await promise.futureResult.get()
        } onCancel: {
            self.fail(id, CancellationError())
        }
        if case .error(let e) = reply.body { throw FerryError(wire: e) }
        return reply
    }

    private func fail(_ id: UInt64, _ error: any Error) {
        pending.withLock { $0.removeValue(forKey: id) }?.fail(error)
    }

    /// Runs the session until the peer closes, goes silent for three heartbeat intervals, or an
    /// error occurs. `handle` receives every message that is neither a heartbeat nor a reply,
    /// with the frames attached to it; it runs inline, so messages are handled in arrival order.
    /// Reads continue from `inbound`, which may already have yielded the first messages of the
    /// connection.
    public func run(
        inbound: inout NIOAsyncChannelInboundStream<ByteBuffer>.AsyncIterator,
        heartbeatInterval: Duration,
        logger: Logger,
        handle: @Sendable (Ferry_V1_Envelope, [ByteBuffer]) async throws -> Void
    ) async throws {
        defer { shutdown(FerryError(.unavailable, "session with \(remoteDescription) ended")) }
        let dead = Mutex<FerryError?>(nil)
        // Unstructured tasks, so the read loop below can keep using `inbound` (inout). The
        // watchdog never writes: a peer that stops reading must not stall its own detection.
        let watchdog = Task {
                let deadline = heartbeatInterval * 3
                while true {
                    // Sleeps until the peer's silence would reach the deadline (a message since
                    // pushes it back), not at a fixed pace: one wakeup per deadline or so rather
                    // than two per heartbeat interval, which adds up with many sessions.
                    let silence = self.silence
                    if self.throttling.load(ordering: .relaxed) {
                        // This side is waiting for a bandwidth limit, not reading: not the peer's silence.
                        try await Task.sleep(for: heartbeatInterval)
                        continue
                    }
                    if silence > deadline {
                        dead.withLock {
                            $0 = FerryError(.timeout, "no message from \(self.remoteDescription) for \(self.silence); peer presumed dead after 3 missed heartbeats")
                        }
                        try? await self.channel.close()
                        return
                    }
                    try await Task.sleep(for: max(deadline - silence, .zero) + .milliseconds(1))
                }
            }
            let heartbeats = Task {
                while true {
                    try await Task.sleep(for: heartbeatInterval)
                    var hb = Ferry_V1_Heartbeat()
                    hb.sentUnixMs = Int64(Date().timeIntervalSince1970 * 1000)
                    try? await self.send(.heartbeat(hb))
                }
            }
            defer {
                watchdog.cancel()
                heartbeats.cancel()
            }
            do {
                while let frame = try await inbound.next() {
                    markReceived()
                    let envelope = try Ferry_V1_Envelope(frame: frame)
                    let attachments = try await Attachments.read(envelope.attachments, from: &inbound)
                    if let limit = throttles.withLock({ $0.inbound }) {
                        throttling.store(true, ordering: .relaxed)
                        await limit.admit(frame.readableBytes + attachments.reduce(0) { $0 + $1.readableBytes })
                        throttling.store(false, ordering: .relaxed)
                        markReceived()
                    }
                    if envelope.inReplyTo != 0 {
                        if let waiter = pending.withLock({ $0.removeValue(forKey: envelope.inReplyTo) }) {
                            waiter.succeed(envelope)
                        } else {
                            logger.debug("late or unexpected reply", metadata: ["in-reply-to": "\(envelope.inReplyTo)"])
                        }
                        continue
                    }
                    switch envelope.body {
                    case .heartbeat:
                        continue
                    case .goodbye(let bye):
                        throw FerryError(.unavailable, "peer closed the session: \(bye.reason)")
                    case .none:
                        // A message from a newer peer: say so and carry on.
                        logger.warning("unknown message kind", metadata: ["id": "\(envelope.id)"])
                        if envelope.id != 0 {
                            try await send(.error(FerryError(.unsupported, "unknown message kind").wire), inReplyTo: envelope.id)
                        }
                    default:
                        try await handle(envelope, attachments)
                    }
                }
            } catch {
                if let reason = dead.withLock({ $0 }) { throw reason }
                throw error
            }
            if let reason = dead.withLock({ $0 }) { throw reason }
            throw FerryError(.unavailable, "connection to \(remoteDescription) closed")
    }

    /// Runs `body` in the current task; if it has not finished within `timeout`, the channel is
    /// closed so that any read it is blocked in ends.
    public func withDeadline<T: Sendable>(_ timeout: Duration, _ body: () async throws -> T) async throws -> T {
        let expired = Atomic<Bool>(false)
        let timer = Task {
            try await Task.sleep(for: timeout)
            expired.store(true, ordering: .relaxed)
            try? await self.channel.close()
        }
        defer { timer.cancel() }
        do {
            return try await body()
        } catch {
            if expired.load(ordering: .relaxed) { throw FerryError(.timeout, "\(remoteDescription) sent nothing within \(timeout)") }
            throw error
        }
    }

    /// Tells the peer why, then closes the connection.
    public func close(reason: String) async {
        var bye = Ferry_V1_Goodbye()
        bye.reason = reason
        try? await send(.goodbye(bye))
        shutdown(FerryError(.unavailable, "session closed: \(reason)"))
        try? await channel.close()
    }

    private func shutdown(_ error: FerryError) {
        closed.store(true, ordering: .relaxed)
        let waiters = pending.withLock { p in
            defer { p.removeAll() }
            return Array(p.values)
        }
        for w in waiters { w.fail(error) }
    }
}

/// Bounds on the raw frames attached to one message: a peer cannot make the receiver buffer
/// more than this for one message, whatever the envelope claims.
public enum Attachments {
    /// A replication batch attaches one frame per large write, plus one for its small writes.
    public static let maxCount = 16384
    public static let maxBytes = 64 << 20

    static func read(_ count: UInt32, from inbound: inout NIOAsyncChannelInboundStream<ByteBuffer>.AsyncIterator) async throws -> [ByteBuffer] {
        var gather = try Gather(count)
        while !gather.isComplete {
            guard let frame = try await inbound.next() else {
                throw FerryError(.unavailable, "connection closed in the middle of a message's attached frames")
            }
            try gather.add(frame)
        }
        return gather.frames
    }

    /// One message's attached frames as they arrive, refused as soon as they exceed the bounds
    /// (public for the fuzz targets, which feed frames without a connection).
    public struct Gather {
        public private(set) var frames: [ByteBuffer] = []
        private let count: Int
        private var total = 0

        public init(_ count: UInt32) throws {
            guard count <= maxCount else {
                throw FerryError(.protocolViolation, "a message announces \(count) attached frames, over the limit of \(maxCount)")
            }
            self.count = Int(count)
            frames.reserveCapacity(self.count)
        }

        public var isComplete: Bool { frames.count == count }

        public mutating func add(_ frame: ByteBuffer) throws {
            total += frame.readableBytes
            guard total <= maxBytes else {
                throw FerryError(.protocolViolation, "a message's attached frames exceed \(maxBytes) bytes")
            }
            frames.append(frame)
        }
    }
}
