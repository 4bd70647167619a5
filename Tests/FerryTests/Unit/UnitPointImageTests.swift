import FerryControllerCore
import FerryNBD
import FerryWire
import Foundation
import NIOCore
import NIOPosix
import Testing

@Suite("point-in-time images")
struct UnitPointImageTests {
    /// Not a multiple of 4 KiB, so the last block is partial.
    static let size: UInt64 = (1 << 20) + 1000
    /// Epochs are random: the second is numerically smaller than the first.
    static let first: UInt64 = 0xDEAD_BEEF_1234_5678
    static let second: UInt64 = 0x1111

    /// A small deterministic generator (SplitMix64), so a failure reproduces.
    struct Random {
        var state: UInt64
        mutating func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        mutating func below(_ n: UInt64) -> UInt64 { next() % n }
        mutating func bytes(_ count: Int) -> [UInt8] {
            var out = [UInt8](repeating: 0, count: count)
            var i = 0
            while i < count {
                var word = next()
                for _ in 0..<8 where i < count { out[i] = UInt8(truncatingIfNeeded: word); word >>= 8; i += 1 }
            }
            return out
        }
    }

    /// A write (bytes) or a zeroed range.
    struct Write {
        var offset: UInt64
        var length: UInt64
        var data: [UInt8]?
    }

    /// The journal replayed in memory: the image expected at each position.
    struct Model {
        var image: [UInt8]
        init(size: UInt64) { image = [UInt8](repeating: 0, count: Int(size)) }
        mutating func apply(_ w: Write) {
            let range = Int(w.offset)..<Int(w.offset + w.length)
            if let data = w.data { image.replaceSubrange(range, with: data) } else { image.replaceSubrange(range, with: repeatElement(0, count: range.count)) }
        }
    }

    /// Random writes and zeroed ranges at unaligned offsets and lengths, overlapping one another.
    func writes(_ count: Int, random: inout Random, size: UInt64 = Self.size) -> [Write] {
        (0..<count).map { _ in
            let offset = random.below(size)
            if random.below(5) == 0 {
                let length = 1 + random.below(min(50_000, size - offset))
                return Write(offset: offset, length: length, data: nil)
            }
            let length = 1 + random.below(min(20_000, size - offset))
            return Write(offset: offset, length: length, data: random.bytes(Int(length)))
        }
    }

    func batch(epoch: UInt64, from sequence: UInt64, _ writes: [Write], captured: Int64 = Int64(Date().timeIntervalSince1970 * 1e9)) -> Ferry_V1_ReplicationBatch {
        var b = Ferry_V1_ReplicationBatch()
        b.volume = "v"
        b.epoch = epoch
        b.records = writes.enumerated().map { i, w in
            var r = Ferry_V1_ReplicationRecord()
            r.sequence = sequence + UInt64(i)
            r.offset = w.offset
            if let data = w.data { r.data = Data(data) } else { r.zeroLength = w.length }
            r.capturedUnixNanos = captured
            return r
        }
        return b
    }

    func read(_ image: PointImage, _ offset: UInt64, _ length: Int) throws -> [UInt8] {
        var buffer = ByteBuffer()
        try image.read(offset: offset, length: length, into: &buffer)
        #expect(buffer.readableBytes == length)
        return Array(buffer.readableBytesView)
    }

    /// The whole image and random sub-ranges of it equal `expected`.
    func check(_ image: PointImage, equals expected: [UInt8], random: inout Random, _ comment: Comment) throws {
        #expect(try read(image, 0, expected.count) == expected, comment)
        for _ in 0..<20 {
            let offset = random.below(UInt64(expected.count))
            let length = Int(random.below(min(100_000, UInt64(expected.count) - offset) + 1))
            #expect(try read(image, offset, length) == Array(expected[Int(offset)..<(Int(offset) + length)]), comment)
        }
    }

    /// Applies `rounds` batches of random writes in `epoch`, remembering the position and
    /// expected image after each.
    func fill(_ store: ReplicaStore, epoch: UInt64, rounds: Int, from: UInt64 = 1, model: inout Model, random: inout Random,
              captured: Int64 = Int64(Date().timeIntervalSince1970 * 1e9)) async throws -> [(ReplicaPosition, [UInt8])] {
        var points: [(ReplicaPosition, [UInt8])] = []
        var sequence = from
        for _ in 0..<rounds {
            let ws = writes(Int(5 + random.below(15)), random: &random)
            let durable = try await store.apply(batch(epoch: epoch, from: sequence, ws, captured: captured))
            sequence += UInt64(ws.count)
            #expect(durable == sequence - 1)
            for w in ws { model.apply(w) }
            points.append((ReplicaPosition(epoch: epoch, sequence: durable), model.image))
        }
        return points
    }

    @Test("an image at any position of two epochs and many segments reads as the journal replayed to it, export included")
    func imagesMatchReplay() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                var random = Random(state: 1)
                var model = Model(size: Self.size)
                let store = try ReplicaStore(directory: dir + "/r", size: Self.size, pool: pool, segmentBytes: 64 << 10)
                // Before anything: the empty volume.
                let empty = try await store.openImage(at: ReplicaPosition(epoch: 0, sequence: 0))
                try check(empty, equals: model.image, random: &random, "empty")
                try empty.close()
                var points = try await fill(store, epoch: Self.first, rounds: 8, model: &model, random: &random)
                // The new epoch's sequence 0: all of the first epoch.
                var report = Ferry_V1_VolumeReport()
                report.volume = "v"
                report.epoch = Self.second
                try await store.note(report)
                points.append((ReplicaPosition(epoch: Self.second, sequence: 0), model.image))
                points += try await fill(store, epoch: Self.second, rounds: 6, model: &model, random: &random)
                #expect(await store.state.epochs == [Self.first, Self.second])
                #expect(await store.latestPosition == points.last!.0)
                #expect(await store.compare(ReplicaPosition(epoch: Self.first, sequence: 50), ReplicaPosition(epoch: Self.second, sequence: 1)) == .orderedAscending)
                #expect(await store.compare(ReplicaPosition(epoch: 7, sequence: 1), ReplicaPosition(epoch: Self.second, sequence: 1)) == nil)
                for (i, (position, expected)) in points.enumerated() {
                    let image = try await store.openImage(at: position)
                    #expect(image.position == position)
                    #expect(!image.writable)
                    try check(image, equals: expected, random: &random, "point \(i) at \(position)")
                    if i % 5 == 0 {
                        try image.copy(toFile: dir + "/export-\(i).img")
                        #expect(FileManager.default.contents(atPath: dir + "/export-\(i).img") == Data(expected))
                    }
                    try image.close()
                }
                // The latest point is the replica itself.
                #expect(points.last!.1 == Array(FileManager.default.contents(atPath: dir + "/r/replica.img")!))
                #expect(await store.openImages == 0)
            }
        }
    }

    @Test("positions the replica does not hold are refused with a reason an operator can act on")
    func refusedPositions() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                var random = Random(state: 2)
                var model = Model(size: Self.size)
                let store = try ReplicaStore(directory: dir + "/r", size: Self.size, pool: pool, segmentBytes: 64 << 10)
                _ = try await fill(store, epoch: Self.first, rounds: 2, model: &model, random: &random)
                let latest = await store.latestPosition
                let ahead = await #expect(throws: FerryError.self) {
                    try await store.openImage(at: ReplicaPosition(epoch: Self.first, sequence: latest.sequence + 1))
                }
                #expect(ahead?.code == .notFound)
                #expect(ahead?.message.contains("not received yet") == true)
                let unknown = await #expect(throws: FerryError.self) { try await store.openImage(at: ReplicaPosition(epoch: 42, sequence: 1)) }
                #expect(unknown?.message.contains("never received that epoch") == true)
                #expect(await store.openImages == 0)
            }
        }
    }

    @Test("a pin keeps the segments after it from folding, unless the journal is over its cap; nothing folds while an image is open")
    func foldWithPin() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                var random = Random(state: 3)
                var model = Model(size: Self.size)
                let old = Int64(Date().addingTimeInterval(-7200).timeIntervalSince1970 * 1e9)
                let store = try ReplicaStore(directory: dir + "/r", size: Self.size, pool: pool, retention: .seconds(3600),
                                             journalLimit: 64 << 20, segmentBytes: 64 << 10)
                let points = try await fill(store, epoch: Self.first, rounds: 16, model: &model, random: &random, captured: old)
                let segmentsBefore = try FileManager.default.contentsOfDirectory(atPath: dir + "/r/journal").filter { $0.hasSuffix(".seg") }.count
                #expect(segmentsBefore > 4)
                let pin = points[7].0
                await store.pin(pin)
                // Nothing folds while an image is open.
                let open = try await store.openImage(at: points[3].0)
                #expect(try await store.fold() == 0)
                #expect(await store.basePosition == nil)
                try check(open, equals: points[3].1, random: &random, "open across a refused fold")
                try open.close()
                #expect(await store.openImages == 0)
                let folded = try await store.fold()
                #expect(folded > 0)
                let base = try #require(await store.basePosition)
                #expect(await store.compare(base, pin) != .orderedDescending)
                #expect(await store.journalBytes > 0)
                for (i, (position, expected)) in points.enumerated() {
                    if await store.compare(position, base) == .orderedAscending {
                        let error = await #expect(throws: FerryError.self) { try await store.openImage(at: position) }
                        #expect(error?.message.contains("folded into the base") == true)
                    } else {
                        let image = try await store.openImage(at: position)
                        try check(image, equals: expected, random: &random, "point \(i) after a pinned fold")
                        try image.close()
                    }
                }
                // The pinned point itself survives.
                let pinned = try await store.openImage(at: pin)
                try check(pinned, equals: points[7].1, random: &random, "pinned point")
                try pinned.close()
                // Unpinned, everything past the window folds and the base is the latest.
                await store.pin(nil)
                _ = try await store.fold()
                #expect(await store.basePosition == points.last!.0)
                let latest = try await store.openImage(at: points.last!.0)
                try check(latest, equals: points.last!.1, random: &random, "latest after a full fold")
                try latest.close()
            }
        }
    }

    @Test("over the journal's size cap the pin gives way: older points are gone with a clear error")
    func capBeatsPin() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                var random = Random(state: 4)
                var model = Model(size: Self.size)
                let store = try ReplicaStore(directory: dir + "/r", size: Self.size, pool: pool, retention: .seconds(3600),
                                             journalLimit: 256 << 10, segmentBytes: 64 << 10)
                let points = try await fill(store, epoch: Self.first, rounds: 16, model: &model, random: &random)
                await store.pin(points[0].0)
                #expect(try await store.fold() > 0)
                #expect(await store.journalBytes <= 256 << 10)
                let base = try #require(await store.basePosition)
                #expect(await store.compare(base, points[0].0) == .orderedDescending)
                let error = await #expect(throws: FerryError.self) { try await store.openImage(at: points[0].0) }
                #expect(error?.message.contains("pruned") == true)
                let latest = try await store.openImage(at: points.last!.0)
                try check(latest, equals: points.last!.1, random: &random, "latest over the cap")
                try latest.close()
            }
        }
    }

    @Test("block status: a point's map covers the range in order, what it calls zero reads as zeroes, written records are data, zeroed records and base holes are holes; a limit answers a prefix")
    func allocationMap() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                // Exact on a sparse volume: data only where a record wrote bytes.
                let size: UInt64 = 10 << 20
                let sparse = try ReplicaStore(directory: dir + "/sparse", size: size, pool: pool, segmentBytes: 1 << 20)
                let durable = try await sparse.apply(batch(epoch: Self.first, from: 1, [
                    Write(offset: 1 << 20, length: 65536, data: [UInt8](repeating: 7, count: 65536)),
                    Write(offset: 2 << 20, length: 65536, data: nil),
                ]))
                let image = try await sparse.openImage(at: ReplicaPosition(epoch: Self.first, sequence: durable))
                let map = try image.allocation(offset: 0, length: size, limit: 1024)
                #expect(map == [NBDExtent(length: 1 << 20, flags: NBDExtent.unallocated), NBDExtent(length: 65536, flags: 0),
                                NBDExtent(length: size - (1 << 20) - 65536, flags: NBDExtent.unallocated)], "\(map)")
                #expect(try image.allocation(offset: 0, length: size, limit: 1) == [NBDExtent(length: 1 << 20, flags: NBDExtent.unallocated)])
                #expect(try image.allocation(offset: (1 << 20) + 4096, length: 4096, limit: 8) == [NBDExtent(length: 4096, flags: 0)])
                #expect(throws: FerryError.self) { try image.allocation(offset: size - 1, length: 2, limit: 8) }
                try image.close()

                // Random writes, zeroes and an overlay: whatever the map calls zero is zero.
                var random = Random(state: 9)
                var model = Model(size: Self.size)
                let store = try ReplicaStore(directory: dir + "/r", size: Self.size, pool: pool, segmentBytes: 64 << 10)
                let points = try await fill(store, epoch: Self.first, rounds: 5, model: &model, random: &random)
                var expected = Model(size: Self.size)
                expected.image = points[2].1
                let writable = try await store.openImage(at: points[2].0, overlayDirectory: dir + "/overlay")
                for change in writes(20, random: &random) {
                    if let data = change.data { try writable.write(offset: change.offset, data: ByteBuffer(bytes: data)) } else { try writable.zero(offset: change.offset, length: change.length) }
                    expected.apply(change)
                }
                for (image, bytes) in [(try await store.openImage(at: points[4].0), points[4].1), (writable, expected.image)] {
                    for _ in 0..<50 {
                        let offset = random.below(Self.size)
                        let length = 1 + random.below(Self.size - offset)
                        let limit = Int(1 + random.below(6))
                        let extents = try image.allocation(offset: offset, length: length, limit: limit)
                        #expect(!extents.isEmpty && extents.count <= limit && extents.allSatisfy { $0.length > 0 })
                        #expect(extents.reduce(0) { $0 + $1.length } <= length)
                        var at = offset
                        for e in extents {
                            if e.isZero { #expect(bytes[Int(at)..<Int(at + e.length)].allSatisfy { $0 == 0 }, "zero extent \(e) at \(at)") }
                            at += e.length
                        }
                    }
                    let whole = try image.allocation(offset: 0, length: Self.size, limit: 1 << 20)
                    #expect(whole.reduce(0) { $0 + $1.length } == Self.size)
                    try image.close()
                }
            }
        }
    }

    @Test("an overlay takes aligned and unaligned writes and zeroes over the point, leaves the point unchanged and survives a reopen")
    func overlay() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                var random = Random(state: 5)
                var model = Model(size: Self.size)
                let store = try ReplicaStore(directory: dir + "/r", size: Self.size, pool: pool, segmentBytes: 64 << 10)
                let points = try await fill(store, epoch: Self.first, rounds: 6, model: &model, random: &random)
                let (position, point) = points[3]
                let readOnly = try await store.openImage(at: position)
                #expect(throws: FerryError.self) { try readOnly.write(offset: 0, data: ByteBuffer(bytes: [1])) }
                var expected = Model(size: Self.size)
                expected.image = point
                var image = try await store.openImage(at: position, overlayDirectory: dir + "/overlay")
                #expect(image.writable)
                var changes: [Write] = [
                    Write(offset: 8192, length: 8192, data: random.bytes(8192)), // aligned
                    Write(offset: 100, length: 10, data: random.bytes(10)), // inside one block
                    Write(offset: 4000, length: 9000, data: random.bytes(9000)), // across blocks
                    Write(offset: Self.size - 50, length: 50, data: random.bytes(50)), // the partial last block
                    Write(offset: 20_000, length: 70_000, data: nil), // zeroes, unaligned
                    Write(offset: 65536, length: 65536, data: nil), // zeroes, aligned
                ]
                changes += writes(30, random: &random)
                for change in changes {
                    if let data = change.data {
                        try image.write(offset: change.offset, data: ByteBuffer(bytes: data))
                    } else {
                        try image.zero(offset: change.offset, length: change.length)
                    }
                    expected.apply(change)
                }
                try check(image, equals: expected.image, random: &random, "overlay")
                try check(readOnly, equals: point, random: &random, "the point under the overlay")
                try image.flush()
                try image.copy(toFile: dir + "/drill.img")
                #expect(FileManager.default.contents(atPath: dir + "/drill.img") == Data(expected.image))
                try image.close()
                let closed = #expect(throws: FerryError.self) { try read(image, 0, 1) }
                #expect(closed?.message.contains("closed") == true)
                // Reopened from the same directory: the overlay's writes are still there.
                image = try await store.openImage(at: position, overlayDirectory: dir + "/overlay")
                try check(image, equals: expected.image, random: &random, "overlay reopened")
                let more = Write(offset: 333, length: 5000, data: random.bytes(5000))
                try image.write(offset: more.offset, data: ByteBuffer(bytes: more.data!))
                expected.apply(more)
                try image.close()
                image = try await store.openImage(at: position, overlayDirectory: dir + "/overlay")
                try check(image, equals: expected.image, random: &random, "overlay saved on close")
                try image.close()
                // The overlay belongs to its point.
                let other = await #expect(throws: FerryError.self) {
                    try await store.openImage(at: points[4].0, overlayDirectory: dir + "/overlay")
                }
                #expect(other?.code == .conflict)
                try check(readOnly, equals: point, random: &random, "the point after the overlay closed")
                try readOnly.close()
                #expect(await store.openImages == 0)
            }
        }
    }

    @Test("after a restart images at old positions of both epochs still open and read right")
    func restart() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                var random = Random(state: 6)
                var model = Model(size: Self.size)
                var points: [(ReplicaPosition, [UInt8])] = []
                do {
                    let store = try ReplicaStore(directory: dir + "/r", size: Self.size, pool: pool, segmentBytes: 64 << 10)
                    points = try await fill(store, epoch: Self.first, rounds: 4, model: &model, random: &random)
                    points += try await fill(store, epoch: Self.second, rounds: 4, model: &model, random: &random)
                }
                let store = try ReplicaStore(directory: dir + "/r", size: Self.size, pool: pool, segmentBytes: 64 << 10)
                #expect(await store.state.epochs == [Self.first, Self.second])
                #expect(await store.latestPosition == points.last!.0)
                for (i, (position, expected)) in points.enumerated() {
                    let image = try await store.openImage(at: position)
                    try check(image, equals: expected, random: &random, "point \(i) after a restart")
                    try image.close()
                }
                // Records still arrive after the restart, into new segments.
                points += try await fill(store, epoch: Self.second, rounds: 2, from: points.last!.0.sequence + 1, model: &model, random: &random)
                let image = try await store.openImage(at: points.last!.0)
                try check(image, equals: points.last!.1, random: &random, "a point after the restart")
                try image.close()
            }
        }
    }

    @Test("a state file from before positions gets its epochs from the journal")
    func oldStateFile() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                var random = Random(state: 7)
                var model = Model(size: Self.size)
                var points: [(ReplicaPosition, [UInt8])] = []
                do {
                    let store = try ReplicaStore(directory: dir + "/r", size: Self.size, pool: pool, segmentBytes: 64 << 10)
                    points = try await fill(store, epoch: Self.first, rounds: 3, model: &model, random: &random)
                    points += try await fill(store, epoch: Self.second, rounds: 3, model: &model, random: &random)
                }
                // Drop the new fields, as a controller before them wrote the file.
                let path = dir + "/r/state.json"
                var json = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as! [String: Any]
                json["epochs"] = nil
                json["baseThrough"] = nil
                try JSONSerialization.data(withJSONObject: json).write(to: URL(fileURLWithPath: path))
                let store = try ReplicaStore(directory: dir + "/r", size: Self.size, pool: pool, segmentBytes: 64 << 10)
                #expect(await store.state.epochs == [Self.first, Self.second])
                let image = try await store.openImage(at: points[1].0)
                try check(image, equals: points[1].1, random: &random, "an old point over an old state file")
                try image.close()
            }
        }
    }

    @Test("a 10 GiB sparse volume with a few records opens and reads from the journal and the base")
    func largeSparseVolume() async throws {
        try await withUnitTempDir { dir in
            try await withPool { pool in
                let size: UInt64 = 10 << 30
                var random = Random(state: 8)
                let store = try ReplicaStore(directory: dir + "/r", size: size, pool: pool)
                let ws = [
                    Write(offset: 12345, length: 3000, data: random.bytes(3000)),
                    Write(offset: (5 << 30) + 7, length: 70_000, data: random.bytes(70_000)),
                    Write(offset: (5 << 30) + 1000, length: 500, data: nil),
                    Write(offset: size - 4097, length: 4097, data: random.bytes(4097)),
                ]
                _ = try await store.apply(batch(epoch: Self.first, from: 1, ws))
                let image = try await store.openImage(at: await store.latestPosition)
                #expect(try read(image, 12345, 3000) == ws[0].data!)
                var middle = ws[1].data!
                middle.replaceSubrange(993..<1493, with: repeatElement(0, count: 500))
                #expect(try read(image, (5 << 30) + 7, 70_000) == middle)
                #expect(try read(image, size - 4097, 4097) == ws[3].data!)
                #expect(try read(image, 3 << 30, 1 << 20) == [UInt8](repeating: 0, count: 1 << 20))
                #expect(try read(image, 12000, 400) == [UInt8](repeating: 0, count: 345) + ws[0].data![0..<55])
                #expect(throws: FerryError.self) { try read(image, size - 10, 11) }
                // The export is sparse and as large as the volume.
                try image.copy(toFile: dir + "/export.img")
                let export = try FileHandle(forReadingFrom: URL(fileURLWithPath: dir + "/export.img"))
                #expect(try export.seekToEnd() == size)
                try export.seek(toOffset: (5 << 30) + 7)
                #expect(try export.read(upToCount: 70_000).map(Array.init) == middle)
                try export.close()
                try image.close()
            }
        }
    }
}
