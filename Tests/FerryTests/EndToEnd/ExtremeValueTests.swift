import Crypto
@testable import FerryAgentCore
import FerryWire
import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization
import Testing
import X509

/// Extreme numbers (0, the largest value, the smallest where signed) in the messages each side
/// accepts: the peer answers with an error or closes only the sender's session, and never traps.
/// The peers are real processes; the other side is a fake driven by the test.
@Suite("extreme values on the wire")
struct ExtremeValueTests {
    // MARK: A fake agent against the real controller

    @Test("a fake agent's extreme numbers: hello, protect, batches, reports, resync, cuts")
    func fakeAgent() async throws {
        let f = try await BadInputTests.Fixture.make()
        let token = try await f.controller.token(host: "fake")
        #expect(try await AgentProcess.enroll(controller: f.controller, token: token, dataDir: f.dir.path + "/agent-fake").status == 0)
        let fake = FakeAgent(identity: try AgentIdentity.load(from: f.dir.path + "/agent-fake"), address: f.controller.agentAddress)
        let answers = FakeAnswers()
        @Sendable func up() async throws {
            #expect(f.controller.process.isRunning, "controller died:\n\(f.controller.process.log.suffix(3000))")
            try await f.stillHealthy()
        }

        // Hello and inventory at their limits: every number is only stored and shown.
        for notAfter in [Int64.min, -1, 0, Int64.max] {
            var hello = fake.hello()
            hello.certificateNotAfter = notAfter
            hello.inventory = FakeAgent.extremeInventory()
            try await fake.session(hello: hello, answer: answers.answer) { session, _ in
                var update = Ferry_V1_InventoryUpdate()
                update.inventory = FakeAgent.extremeInventory()
                update.inventory.cpuCount = 0
                try await session.send(.inventoryUpdate(update))
                #expect(try await f.controller.ctl("host", "show", "fake").status == 0)
            }
        }
        let listed = try await f.controller.host("fake")
        #expect(listed?.inventory?.memoryBytes == UInt64.max)
        try await up()

        try await fake.session(answer: answers.answer) { session, log in
            // Protect: sizes past what a volume can be are refused by the API before any agent
            // sees them, and an agent reporting such a size is refused.
            for size in ["9223372036854775808", "18446744073709551615"] {
                let r = try await f.controller.ctl("protect", "fake", "--volume", "big", "--path", "/tmp/big.img", "--create-size", size)
                #expect(r.status != 0 && r.stderr.contains("beyond the largest volume"), "\(r)")
            }
            let huge = try await f.controller.ctl("protect", "fake", "--volume", "huge", "--path", "/tmp/huge.img", "--create-size", "1M")
            #expect(huge.status != 0 && huge.stderr.contains("beyond the largest volume"), "\(huge)")
            try await up()
            let ok = try await f.controller.ctl("protect", "fake", "--volume", "v", "--path", "/tmp/v.img", "--create-size", "1M")
            #expect(ok.status == 0, "\(ok)")

            // One good write, acked; then the replica is whole (a report of a finished full sync).
            try await session.send(.replicationBatch(FakeAgent.batch(epoch: FakeAnswers.epoch, sequence: 1)))
            #expect(await log.wait { $0.contains { $0.replicationAck.durableSequence == 1 } })
            var report = Ferry_V1_VolumeReport()
            report.volume = "v"
            report.epoch = FakeAnswers.epoch
            report.lastSequence = 1
            report.ackedSequence = 1
            report.sync.kind = .full
            report.sync.fullCompleted = true
            report.sync.totalBytes = 1 << 20
            report.sync.doneBytes = 1 << 20
            try await session.send(.volumeReport(report))
            #expect(try await eventually(timeout: .seconds(15)) { try await f.volume("fake/v")?.replicaState == .protected })

            // Cuts: the agent says it held its writes for UInt64.max microseconds, and (next) that
            // its last sequence is UInt64.max. The points are recorded; nothing traps.
            #expect(try await f.controller.ctl("group", "create", "g", "--volume", "fake/v", "--crash-interval", "0", "--app-interval", "0", "--hold-budget", "10s").status == 0)
            let point = try await f.controller.ctl("point", "create", "g")
            #expect(point.status == 0, "\(point)")
            try await up()
            answers.cutSequence.store(UInt64.max, ordering: .relaxed)
            let late = try await f.controller.ctl("point", "create", "g")
            #expect(late.status == 0, "\(late)")
            let points = try await f.controller.ctl("points", "g", "--json")
            #expect(points.status == 0 && points.stdout.contains(point.stdout.trimmingCharacters(in: .whitespacesAndNewlines)), "\(points)")
            #expect(try await f.controller.ctl("metrics").stdout.contains("ferry_group_cut_pause_seconds"))
            try await up()

            // Resync requests out of range: answered with an error, the session goes on.
            for (offset, block, count) in [(UInt64.max, UInt32(4096), 1), (0, 0, 1), (0, UInt32.max, 1), (0, 4096, 0), (0, 4096, 1025),
                                           (UInt64.max - 4095, 4096, 2), ((1 << 20) - 4096, 4096, 2), (0, 4097, 1)] as [(UInt64, UInt32, Int)] {
                var hashes = Ferry_V1_ResyncHashes()
                hashes.volume = "v"
                hashes.epoch = FakeAnswers.epoch
                hashes.offset = offset
                hashes.blockBytes = block
                hashes.hashes = Array(repeating: Data(), count: count)
                await #expect(throws: FerryError.self, "resync \(offset) \(block) \(count)") {
                    _ = try await session.request(.resyncHashes(hashes), timeout: .seconds(10))
                }
            }
            try await up()
        }

        // Replication batches with each field at an extreme, one session each: a refused batch
        // closes the sender's session only (and says why); an accepted one is acked.
        var variants: [(String, Ferry_V1_ReplicationBatch)] = []
        func variant(_ name: String, epoch: UInt64 = FakeAnswers.epoch, _ change: (inout Ferry_V1_ReplicationRecord) -> Void) {
            var b = FakeAgent.batch(epoch: epoch, sequence: 2)
            change(&b.records[0])
            variants.append((name, b))
        }
        variant("captured Int64.min") { $0.capturedUnixNanos = Int64.min }
        variant("captured -1") { $0.capturedUnixNanos = -1 }
        variant("sequence max") { $0.sequence = UInt64.max }
        variant("sequence 0") { $0.sequence = 0 }
        variant("offset max") { $0.offset = UInt64.max }
        variant("zero length max") { $0.data = Data(); $0.zeroLength = UInt64.max }
        variant("zero length max at max") { $0.data = Data(); $0.offset = UInt64.max; $0.zeroLength = UInt64.max }
        variant("attached length max") { $0.data = Data(); $0.attachedLength = UInt32.max }
        variant("epoch 0", epoch: 0) { _ in }
        variant("captured Int64.max") { $0.capturedUnixNanos = Int64.max }
        variant("epoch max", epoch: UInt64.max) { $0.sequence = 1 }
        for (name, batch) in variants {
            let outcome = try await fake.session(answer: answers.answer) { session, log in
                try await session.send(.replicationBatch(batch))
                let answered = await log.wait { events in
                    events.contains { if case .replicationAck = $0.body { true } else { false } } || log.ended != nil
                }
                return answered ? (log.ended ?? "acked") : "no answer"
            }
            #expect(outcome != "no answer", "\(name)")
            try await up()
        }

        // Compressed batches (WAN mode): every decompressed size is checked before any work; a
        // lie closes the sender's session only, with the reason; an honest one is acked.
        let plain = ByteBuffer(repeating: 7, count: 64 << 10)
        let block = try #require(AttachedFrameCompression.compress(plain, allocator: ByteBufferAllocator()))
        var compressed: [(String, [UInt32], [ByteBuffer], String?)] = [
            ("sizes missing for a frame", [UInt32(plain.readableBytes)], [block, block], "decompressed sizes"),
            ("size UInt32.max", [UInt32.max], [block], "frame limit"),
            ("size 0 for a block", [0], [block], "claims only"),
            ("size under the block", [UInt32(block.readableBytes - 1)], [block], "claims only"),
            ("size one short of the data", [UInt32(plain.readableBytes - 1)], [block], "corrupt"),
            ("a corrupt block", [UInt32(plain.readableBytes)], [ByteBuffer(repeating: 0xFF, count: 300)], "corrupt"),
            ("an honest block", [UInt32(plain.readableBytes)], [block], nil),
        ]
        compressed.append(("sizes past a batch's total", Array(repeating: UInt32(FrameSize.defaultAuthenticated), count: 2),
                           [block, block], "decompressed"))
        for (name, sizes, frames, reason) in compressed {
            // (Sequence 1: the batches above left the replica in another epoch.)
            var batch = FakeAgent.batch(epoch: FakeAnswers.epoch, sequence: 1)
            batch.records[0].data = Data()
            batch.records[0].attachedLength = UInt32(plain.readableBytes)
            batch.attachedSizes = sizes
            let outcome = try await fake.session(answer: answers.answer) { [batch] session, log in
                try await session.send(.replicationBatch(batch), attachments: frames)
                let answered = await log.wait { events in
                    events.contains { if case .replicationAck = $0.body { true } else { false } } || log.ended != nil
                }
                return answered ? (log.ended ?? "acked") : "no answer"
            }
            if let reason {
                #expect(outcome.contains(reason), "\(name): \(outcome)")
            } else {
                #expect(outcome == "acked", "\(name): \(outcome)")
            }
            try await up()
        }

        // Reports at every extreme: stored, shown and turned into metrics.
        try await fake.session(answer: answers.answer) { session, _ in
            for value in [UInt64.max, 0] {
                for nanos in [Int64.min, -1, Int64.max] {
                    var r = Ferry_V1_VolumeReport()
                    r.volume = "v"
                    r.epoch = value
                    r.lastSequence = value
                    r.ackedSequence = value
                    r.pendingBytes = value
                    r.oldestPendingUnixNanos = nanos
                    r.markedExtents = value
                    r.sync.kind = .marked
                    r.sync.totalBytes = value
                    r.sync.doneBytes = value == 0 ? UInt64.max : 0
                    r.sync.sentBytes = value
                    r.sync.rateBytesPerSecond = value
                    r.sync.pendingExtents = value
                    r.sync.startedUnixNanos = nanos
                    r.compressInBytes = value
                    r.compressOutBytes = value
                    r.compressNanos = value
                    try await session.send(.volumeReport(r))
                    let show = try await f.controller.ctl("volume", "show", "fake/v", "--json")
                    #expect(show.status == 0, "\(show)")
                }
            }
            #expect(try await f.controller.ctl("metrics").status == 0)
            #expect(try await f.controller.ctl("volumes").status == 0)
        }
        try await up()

        // Values read back from the database that Ferry never writes (a pause of UInt64.max
        // stored as its signed bit pattern, a negative volume size): the controller starts
        // and answers, with an error where the value cannot be used.
        _ = await f.controller.process.terminate()
        let edit = try await run("/usr/bin/sqlite3", [f.controller.dataDir + "/state.sqlite",
                                                       "UPDATE recoveryPoint SET pauseMicros = -1; UPDATE volume SET sizeBytes = -1;"])
        #expect(edit.status == 0, "\(edit)")
        let again = try await ControllerProcess.start(dataDir: f.controller.dataDir, arguments: ["--config", f.dir.file("controller.yaml")])
        defer { again.process.signal(SIGKILL) }
        let points = try await again.ctl("points", "g", "--json")
        #expect(points.status == 0, "\(points)")
        let volumes = try await again.ctl("volumes")
        #expect(volumes.status != 0 && volumes.stderr.contains("damaged"), "\(volumes)")
        #expect(try await again.ctl("hosts").status == 0)
        #expect(again.process.isRunning, "controller died:\n\(again.process.log.suffix(3000))")
    }

    // MARK: A fake controller against a real agent

    @Test("a fake controller's extreme numbers: protect, volume list, acks, hashes, blocks, cuts, hooks, recovery")
    func fakeController() async throws {
        let dir = try TestDirectory()
        let fake = try FakeController()
        let agentDir = dir.sub("agent")
        let config = dir.file("agent.yaml")
        try "hooks:\n  ok: \"true\"\n".write(toFile: config, atomically: true, encoding: .utf8)
        let volumes = dir.sub("volumes")

        try await fake.serve { connections in
            // The identity names the listener's port, known only now.
            try fake.identity(hostID: UUID().uuidString.lowercased(), hostName: "real").save(to: agentDir)
            let agent = try await AgentProcess.start(dataDir: agentDir, arguments: ["--config", config])
            defer { agent.signal(SIGKILL) }
            @Sendable func alive(_ what: String) {
                #expect(agent.isRunning, "agent died after \(what):\n\(agent.log.suffix(3000))")
            }
            // Every command below must be answered with an error (or a result), never a trap.
            @Sendable func refused(_ what: String, timeout: Duration = .seconds(20), _ fill: @Sendable (inout Ferry_V1_Command) -> Void,
                                   on session: PeerSession) async -> Ferry_V1_CommandResult? {
                defer { alive(what) }
                var command = Ferry_V1_Command()
                fill(&command)
                do {
                    let reply = try await session.request(.command(command), timeout: timeout)
                    guard case .commandResult(let result) = reply.body else {
                        Issue.record("\(what): answered with \(reply.bodyName)")
                        return nil
                    }
                    guard case .error? = result.outcome else {
                        Issue.record("\(what): not refused: \(result)")
                        return nil
                    }
                    return result
                } catch {
                    Issue.record("\(what): no answer: \(error)")
                    return nil
                }
            }

            try await fake.session(from: &connections) { session, log in
                // Sizes to create that no file can have; sizes that do not exist.
                for size in [UInt64.max, 1 << 63] {
                    let result = await refused("protect create-size \(size)", { c in
                        c.protectVolume.volume.name = "big"
                        c.protectVolume.volume.path = volumes + "/big-\(size).img"
                        c.protectVolume.volume.createSizeBytes = size
                    }, on: session)
                    #expect(result?.error.message.contains("beyond the largest volume") == true, "\(String(describing: result))")
                    alive("protect \(size)")
                }
                // Past any file system's limit, but a size a volume may have: the kernel refuses it.
                var largest = Ferry_V1_Command()
                largest.protectVolume.volume.name = "largest"
                largest.protectVolume.volume.path = volumes + "/largest.img"
                largest.protectVolume.volume.createSizeBytes = UInt64(Int64.max)
                #expect(try await session.request(.command(largest), timeout: .seconds(20)).commandResult.error.message.contains("cannot size"))
                alive("protect Int64.max")
                _ = await refused("protect a missing path, no size", { c in
                    c.protectVolume.volume.name = "none"
                    c.protectVolume.volume.path = volumes + "/none.img"
                }, on: session)

                // A good volume, to aim the rest at.
                var spec = Ferry_V1_VolumeSpec()
                spec.name = "vol"
                spec.path = volumes + "/vol.img"
                spec.createSizeBytes = 1 << 20
                var protect = Ferry_V1_Command()
                protect.protectVolume.volume = spec
                let protected = try await session.request(.command(protect), timeout: .seconds(20))
                let status = protected.commandResult.volumeStatus
                #expect(status.sizeBytes == 1 << 20, "\(protected)")
                alive("protect")

                // The volume list claims the replica holds UInt64.max of this epoch: refused for
                // that volume, which is still served.
                spec.createSizeBytes = 0
                spec.sizeBytes = 1 << 20
                spec.epoch = status.epoch
                spec.durableSequence = UInt64.max
                spec.generation = 0
                var sync = Ferry_V1_Command()
                sync.syncVolumes.volumes = [spec]
                let synced = try await session.request(.command(sync), timeout: .seconds(20))
                let listed = synced.commandResult.volumeStatuses.volumes
                #expect(listed.count == 1 && listed.first?.error.contains("claims sequence") == true, "\(synced)")
                try await Self.write(socket: listed.first?.socketPath ?? status.socketPath)
                #expect(await log.wait { $0.contains { $0.replicationBatch.volume == "vol" } }, "no batch after the write")
                alive("volume list with durable max, then a write")

                // An ack of more than was ever captured: answered with an error, nothing trimmed.
                var ack = Ferry_V1_ReplicationAck()
                ack.volume = "vol"
                ack.epoch = status.epoch
                ack.durableSequence = UInt64.max
                try await session.send(.replicationAck(ack))
                #expect(await log.wait { $0.contains { $0.error.message.contains("captured only through") } }, "no error for the ack")
                try await Self.write(socket: status.socketPath)
                ack.epoch = UInt64.max
                try await session.send(.replicationAck(ack))
                try await Self.write(socket: status.socketPath)
                alive("ack max")

                // Scan volumes with the interval at 0 and at its largest.
                for interval in [UInt32(0), UInt32.max] {
                    var scan = Ferry_V1_Command()
                    scan.protectVolume.volume.name = "scan\(interval)"
                    scan.protectVolume.volume.path = volumes + "/scan\(interval).img"
                    scan.protectVolume.volume.createSizeBytes = 1 << 20
                    scan.protectVolume.volume.captureMode = .scan
                    scan.protectVolume.volume.scanIntervalSeconds = interval
                    scan.protectVolume.volume.generation = UInt64.max
                    scan.timeoutMs = UInt32.max
                    _ = try await session.request(.command(scan), timeout: .seconds(20))
                    alive("scan interval \(interval)")
                }

                // Hash requests out of range.
                for (offset, block, count) in [(UInt64.max, UInt32(4096), UInt32(1)), (0, 0, 1), (0, 3, 1), (0, UInt32.max, 1), (0, 4096, 0),
                                               (0, 4096, UInt32.max), (UInt64.max - 4095, 4096, 1), (1 << 20, 4096, 1)] as [(UInt64, UInt32, UInt32)] {
                    _ = await refused("hash blocks \(offset) \(block) \(count)", { c in
                        c.hashBlocks.volume = "vol"
                        c.hashBlocks.offset = offset
                        c.hashBlocks.blockBytes = block
                        c.hashBlocks.count = count
                    }, on: session)
                }

                // Fenced (generation max), then blocks outside the volume.
                var fence = Ferry_V1_Command()
                fence.fenceVolumes.volumes = ["vol"]
                fence.fenceVolumes.generation = UInt64.max
                #expect(try await session.request(.command(fence), timeout: .seconds(20)).commandResult.volumesFenced.volumes.count == 1)
                for (offset, zero, data) in [(UInt64.max, UInt64(0), 4096), (0, UInt64.max, 0), (UInt64.max, UInt64.max, 0), (1 << 20, 1, 0),
                                             ((1 << 20) - 1, 0, 4096)] as [(UInt64, UInt64, Int)] {
                    _ = await refused("apply blocks \(offset) \(zero) \(data)", { c in
                        var block = Ferry_V1_AppliedBlock()
                        block.offset = offset
                        block.zeroLength = zero
                        block.data = Data(count: data)
                        c.applyBlocks.volume = "vol"
                        c.applyBlocks.blocks = [block]
                    }, on: session)
                }

                // Cuts: hold budgets out of range are refused; cut ids at the extremes work.
                for hold in [UInt32(0), UInt32.max, 10_001] {
                    _ = await refused("prepare cut hold \(hold)", { c in
                        c.prepareCut.cutID = 7
                        c.prepareCut.volumes = ["vol"]
                        c.prepareCut.holdMs = hold
                    }, on: session)
                }
                for id in [UInt64(0), UInt64.max] {
                    var prepare = Ferry_V1_Command()
                    prepare.prepareCut.cutID = id
                    prepare.prepareCut.volumes = ["vol"]
                    prepare.prepareCut.holdMs = 1000
                    _ = try await session.request(.command(prepare), timeout: .seconds(20))
                    var finish = Ferry_V1_Command()
                    finish.finishCut.cutID = id
                    _ = try await session.request(.command(finish), timeout: .seconds(20))
                    alive("cut \(id)")
                }

                // Hooks with timeouts at 0 and at the largest value; one not defined.
                for timeout in [UInt32(0), UInt32.max] {
                    for name in ["ok", "missing"] {
                        var hook = Ferry_V1_Command()
                        hook.runHook.name = name
                        hook.runHook.timeoutMs = timeout
                        _ = try await session.request(.command(hook), timeout: .seconds(30))
                        alive("hook \(name) \(timeout)")
                    }
                }

                // Recoveries naming ports that are not ports, and sizes no volume has.
                for (port, size) in [(UInt32(0), UInt64(1 << 20)), (65_536, 1 << 20), (UInt32.max, 1 << 20), (1, UInt64.max), (1, 1 << 63)] {
                    let result = await refused("recover port \(port) size \(size)", timeout: .seconds(30), { c in
                        c.recoverVolumes.recoveryID = "plan.host"
                        c.recoverVolumes.hookTimeoutMs = UInt32.max
                        var v = Ferry_V1_RecoveredVolumeSpec()
                        v.name = "r"
                        v.source = "host/vol"
                        v.exportHost = "127.0.0.1"
                        v.exportPort = port
                        v.exportName = "x"
                        v.sizeBytes = size
                        c.recoverVolumes.volumes = [v]
                    }, on: session)
                    #expect(result?.error.code == .badRequest, "port \(port) size \(size): \(String(describing: result))")
                }
                var stop = Ferry_V1_Command()
                stop.stopRecovery.recoveryID = "plan.host"
                stop.stopRecovery.hookTimeoutMs = UInt32.max
                _ = try await session.request(.command(stop), timeout: .seconds(20))
                alive("stop recovery")
            }

            // A welcome with its numbers at the extremes; the agent answers on.
            for (heartbeat, frame) in [(UInt32.max, UInt32(0)), (0, UInt32.max)] {
                try await fake.session(from: &connections, heartbeatMs: heartbeat, maxFrame: frame) { session, _ in
                    var echo = Ferry_V1_Command()
                    echo.echo.payload = Data("ping".utf8)
                    echo.timeoutMs = 0
                    let reply = try await session.request(.command(echo), timeout: .seconds(20))
                    #expect(reply.commandResult.echo.payload == Data("ping".utf8))
                }
                alive("welcome \(heartbeat) \(frame)")
            }
            #expect(agent.isRunning)
        }
    }

    /// One 4 KiB write through the volume's NBD export (qemu-io).
    static func write(socket: String) async throws {
        let name = ((socket as NSString).lastPathComponent as NSString).deletingPathExtension
        let r = try await run("/usr/bin/qemu-io", ["-f", "raw", "-t", "none", "-c", "write -P 7 0 4k", "nbd+unix:///\(name)?socket=\(socket)"])
        #expect(r.status == 0, "\(r)")
    }
}

// MARK: - Fakes

/// What a fake session received (replies to its requests are not in it) and how it ended.
final class SessionLog: Sendable {
    private let events = Mutex<[Ferry_V1_Envelope]>([])
    private let end = Mutex<String?>(nil)

    func append(_ e: Ferry_V1_Envelope) { events.withLock { $0.append(e) } }
    func ended(_ why: String) { end.withLock { $0 = why } }
    var ended: String? { end.withLock { $0 } }
    var all: [Ferry_V1_Envelope] { events.withLock { $0 } }

    /// Waits until `condition` holds for what was received (or 15 s pass).
    func wait(_ condition: ([Ferry_V1_Envelope]) -> Bool) async -> Bool {
        await eventually(timeout: .seconds(15), every: .milliseconds(50)) { condition(all) }
    }
}

/// Runs an established session: `body` in a task of its own, while this task reads (answering
/// commands with `answer`); returns what `body` returned once it is done, and closes.
private func drive<T: Sendable>(
    _ connection: NIOAsyncChannel<ByteBuffer, ByteBuffer>,
    session: PeerSession, messages: inout NIOAsyncChannelInboundStream<ByteBuffer>.AsyncIterator, heartbeat: Duration,
    answer: @escaping @Sendable (Ferry_V1_Envelope) -> Ferry_V1_Envelope.OneOf_Body?,
    _ body: @escaping @Sendable (PeerSession, SessionLog) async throws -> T
) async throws -> T {
    let log = SessionLog()
    return try await withThrowingTaskGroup(of: T?.self) { group in
        let channel = connection.channel
        group.addTask {
            defer { channel.close(promise: nil) }
            return try await body(session, log)
        }
        do {
            try await session.run(inbound: &messages, heartbeatInterval: heartbeat, logger: Logger(label: "fake")) { envelope, _ in
                log.append(envelope)
                if let reply = answer(envelope) { try? await session.send(reply, inReplyTo: envelope.id) }
            }
        } catch {
            log.ended((error as? FerryError)?.message ?? "\(error)")
        }
        var result: T?
        for try await r in group where r != nil { result = r }
        return result!
    }
}

/// An enrolled host whose session the test drives instead of ferry-agent.
struct FakeAgent {
    let identity: AgentIdentity
    let address: String

    func hello() -> Ferry_V1_Hello {
        var hello = Ferry_V1_Hello()
        hello.protocolVersion = .protocolVersion1
        hello.hostID = identity.info.hostID
        hello.agentVersion = "fake"
        return hello
    }

    static func extremeInventory() -> Ferry_V1_Inventory {
        var inventory = Ferry_V1_Inventory()
        inventory.hostname = "fake"
        inventory.cpuCount = UInt32.max
        inventory.memoryBytes = UInt64.max
        var nic = Ferry_V1_NetworkInterface()
        nic.name = "eth0"
        nic.mtu = UInt32.max
        var zero = nic
        zero.name = "eth1"
        zero.mtu = 0
        inventory.interfaces = [nic, zero]
        var disk = Ferry_V1_BlockDevice()
        disk.name = "vda"
        disk.sizeBytes = UInt64.max
        var empty = disk
        empty.name = "vdb"
        empty.sizeBytes = 0
        inventory.blockDevices = [disk, empty]
        return inventory
    }

    /// A batch of one 4 KiB write at offset 0, captured now.
    static func batch(epoch: UInt64, sequence: UInt64) -> Ferry_V1_ReplicationBatch {
        var record = Ferry_V1_ReplicationRecord()
        record.sequence = sequence
        record.offset = 0
        record.data = Data(repeating: 5, count: 4096)
        record.capturedUnixNanos = Int64(Date().timeIntervalSince1970 * 1e9)
        var batch = Ferry_V1_ReplicationBatch()
        batch.volume = "v"
        batch.epoch = epoch
        batch.records = [record]
        return batch
    }

    /// Opens a session (hello, welcome), runs `body` while answering the controller's commands
    /// with `answer`, then closes.
    func session<T: Sendable>(hello: Ferry_V1_Hello? = nil, answer: @escaping @Sendable (Ferry_V1_Command) -> Ferry_V1_CommandResult,
                              _ body: @escaping @Sendable (PeerSession, SessionLog) async throws -> T) async throws -> T {
        let connection = try await ControllerConnection.open(
            address: address, tls: try TLSSettings.agentSession(certificate: identity.certificate, key: identity.privateKey, ca: identity.ca),
            group: MultiThreadedEventLoopGroup.singleton, frameLimit: FrameLimit(FrameSize.defaultAuthenticated))
        let hello = hello ?? self.hello()
        return try await connection.executeThenClose { inbound, outbound in
            let session = PeerSession(channel: connection.channel, outbound: outbound)
            var messages = inbound.makeAsyncIterator()
            try await outbound.write(try Ferry_V1_Envelope.with(id: 1, .hello(hello)).frame(allocator: connection.channel.allocator))
            guard let frame = try await messages.next() else { throw FerryError(.unavailable, "controller closed before welcoming") }
            let reply = try Ferry_V1_Envelope(frame: frame)
            guard case .welcome(let welcome) = reply.body else { throw FerryError(.protocolViolation, "hello answered with \(reply) ") }
            return try await drive(connection, session: session, messages: &messages, heartbeat: .milliseconds(Int64(welcome.heartbeatIntervalMs)),
                                   answer: { envelope in
                                       guard case .command(let command) = envelope.body else { return nil }
                                       return .commandResult(answer(command))
                                   }, body)
        }
    }
}

/// How the fake agent answers the controller's commands.
final class FakeAnswers: Sendable {
    static let epoch: UInt64 = 0xFE11
    /// The sequence a cut reports for each volume.
    let cutSequence = Atomic<UInt64>(1)

    var answer: @Sendable (Ferry_V1_Command) -> Ferry_V1_CommandResult {
        { [self] command in
            var result = Ferry_V1_CommandResult()
            func status(_ spec: Ferry_V1_VolumeSpec) -> Ferry_V1_VolumeStatus {
                var s = Ferry_V1_VolumeStatus()
                s.name = spec.name
                s.path = spec.path
                // "huge" reports a size no volume can have.
                s.sizeBytes = spec.name == "huge" ? UInt64.max : 1 << 20
                s.socketPath = "/tmp/fake-\(spec.name).sock"
                s.epoch = Self.epoch
                s.lastSequence = UInt64.max
                return s
            }
            switch command.kind {
            case .protectVolume(let p): result.volumeStatus = status(p.volume)
            case .syncVolumes(let s): result.volumeStatuses.volumes = s.volumes.map(status)
            case .prepareCut(let p):
                result.cutPrepared.cutID = p.cutID
                result.cutPrepared.members = p.volumes.map { name in
                    var m = Ferry_V1_CutMember()
                    m.volume = name
                    m.epoch = Self.epoch
                    m.sequence = cutSequence.load(ordering: .relaxed)
                    return m
                }
            case .finishCut(let f):
                result.cutFinished.cutID = f.cutID
                result.cutFinished.pauseMicros = UInt64.max
                result.cutFinished.releasedOnOwn = true
            case .runHook(let h):
                result.hookResult.name = h.name
                result.hookResult.durationMicros = UInt64.max
            default:
                result.error = FerryError(.unsupported, "fake agent").wire
            }
            return result
        }
    }
}

/// The controller's side of agent sessions, played by the test with its own CA: a real agent
/// enrolled by it (an identity written here) connects to it like to its controller.
final class FakeController: Sendable {
    let ca: CertificateAuthority
    let serverChain: [Certificate]
    let serverKey: Certificate.PrivateKey
    private let address = Mutex<String>("")

    init() throws {
        ca = try CertificateAuthority.create(commonName: "Fake controller CA")
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        serverChain = [try ca.issueServerCertificate(publicKey: key.publicKey, dnsNames: [ControllerIdentity.serverName],
                                                     ipAddresses: ["127.0.0.1"], validity: 3600), ca.certificate]
        serverKey = key
    }

    /// An identity for the agent's data dir, issued by this CA, pointing at this listener
    /// (known once `serve` has bound it: call this inside `serve`'s body).
    func identity(hostID: String, hostName: String) throws -> AgentIdentity {
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let certificate = try ca.issueHostCertificate(publicKey: key.publicKey, hostID: hostID, hostName: hostName, validity: 3600)
        return AgentIdentity(info: .init(hostID: hostID, hostName: hostName, controller: address.withLock { $0 }.isEmpty ? "127.0.0.1:1" : address.withLock { $0 }),
                             certificate: certificate, privateKey: key, ca: ca.certificate)
    }

    typealias Connections = NIOAsyncChannelInboundStream<NIOAsyncChannel<ByteBuffer, ByteBuffer>>.AsyncIterator

    /// Listens on 127.0.0.1 (the port the agent's identity names) and runs `body` with the
    /// incoming connections.
    func serve(_ body: (inout Connections) async throws -> Void) async throws {
        let tls = try NIOSSLContext(configuration: TLSSettings.agentListener(chain: serverChain, key: serverKey, ca: ca.certificate))
        let server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .bind(host: "127.0.0.1", port: 0) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls))
                    try FramedPipeline.configure(channel, limit: FrameLimit(FrameSize.defaultAuthenticated))
                    return try FramedPipeline.asyncChannel(channel)
                }
            }
        address.withLock { $0 = "127.0.0.1:\(server.channel.localAddress?.port ?? 0)" }
        try await server.executeThenClose { inbound in
            var connections = inbound.makeAsyncIterator()
            let outcome: Result<Void, any Error>
            do {
                try await body(&connections)
                outcome = .success(())
            } catch {
                outcome = .failure(error)
            }
            // The agent reconnects by itself: every connection it made meanwhile must be ended
            // through executeThenClose (NIO traps on an async channel dropped unentered).
            try? await server.channel.close()
            while let connection = try? await connections.next() {
                try? await connection.executeThenClose { _, _ in }
            }
            try outcome.get()
        }
    }

    /// Takes the next agent connection: hello, then a welcome with the given numbers; runs
    /// `body` while answering the agent's resync requests with indices out of range.
    func session<T: Sendable>(from connections: inout Connections, heartbeatMs: UInt32 = 1000, maxFrame: UInt32 = UInt32(FrameSize.defaultAuthenticated),
                              _ body: @escaping @Sendable (PeerSession, SessionLog) async throws -> T) async throws -> T {
        guard let connection = try await connections.next() else { throw FerryError(.unavailable, "listener closed") }
        return try await connection.executeThenClose { inbound, outbound in
            let session = PeerSession(channel: connection.channel, outbound: outbound)
            var messages = inbound.makeAsyncIterator()
            guard let frame = try await session.withDeadline(.seconds(30), { try await messages.next() }) else {
                throw FerryError(.unavailable, "agent closed before hello")
            }
            let hello = try Ferry_V1_Envelope(frame: frame)
            guard case .hello(let h) = hello.body else { throw FerryError(.protocolViolation, "expected hello, got \(hello.bodyName)") }
            var welcome = Ferry_V1_Welcome()
            welcome.hostID = h.hostID
            welcome.hostName = "real"
            welcome.heartbeatIntervalMs = heartbeatMs
            welcome.maxFrameBytes = maxFrame
            welcome.acceptsAttachments = true
            try await session.send(.welcome(welcome), inReplyTo: hello.id)
            return try await drive(connection, session: session, messages: &messages, heartbeat: .seconds(1), answer: { envelope in
                guard case .resyncHashes = envelope.body else { return nil }
                var diff = Ferry_V1_ResyncDiff()
                diff.differing = [UInt32.max]
                return .resyncDiff(diff)
            }, body)
        }
    }
}

extension BadInputTests.Fixture {
    /// `ferryctl volume show TARGET --json`, or nil if it fails.
    func volume(_ target: String) async throws -> API.Volume? {
        let r = try await controller.ctl("volume", "show", target, "--json")
        guard r.status == 0 else { return nil }
        return try? API.decoder().decode(API.Volume.self, from: Data(r.stdout.utf8))
    }
}
