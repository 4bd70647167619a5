import FerryWire
import NIOCore

/// Entry points for the fuzz targets in deploy/fuzz and their regression tests: each feeds
/// arbitrary bytes to the real parser, the way a peer or a file would, and traps if an
/// invariant breaks.
public enum ControllerFuzzing {
    /// The volume the fuzzed replication batches write to.
    static let volumeSize: UInt64 = 1 << 20

    /// Plays `input` as what an agent sends on its session, as the controller reads it: the
    /// first byte picks how the rest arrives in reads; the rest is cut into frames, each decoded
    /// as an envelope with its attached frames (decompressed when the batch says they are LZ4
    /// blocks), and a replication batch is put through a fenced
    /// volume's gate (generation 1, epoch 1, through sequence 8) and checked record by record
    /// against a 1 MiB volume. Stops at the first error, as a session does.
    public static func frames(_ input: [UInt8]) {
        let chunkSizes = [1, 3, 7, 16, 64, 512, 4096, Int.max]
        let chunk = chunkSizes[Int((input.first ?? 0) & 7)]
        let processor = NIOSingleStepByteToMessageProcessor(FrameDecoder(limit: FrameLimit(FrameSize.unauthenticated)))
        var frames: [ByteBuffer] = []
        var rest = input.dropFirst()
        do {
            while !rest.isEmpty {
                let piece = rest.prefix(chunk)
                rest = rest.dropFirst(piece.count)
                try processor.process(buffer: ByteBuffer(bytes: piece)) { frames.append($0) }
            }
            try processor.finishProcessing(seenEOF: true) { frames.append($0) }
        } catch {
            // A frame over the limit ends the connection; what came before it is still read.
        }
        var inbound = frames[...]
        let gate = IngestGate.fenced(generation: 1, through: ReplicaPosition(epoch: 1, sequence: 8))
        do {
            while let frame = inbound.popFirst() {
                let envelope = try Ferry_V1_Envelope(frame: frame)
                // As Attachments.read does, without a connection to wait on.
                var gather = try Attachments.Gather(envelope.attachments)
                while !gather.isComplete, let next = inbound.popFirst() { try gather.add(next) }
                guard gather.isComplete else { return } // the connection closed mid-message
                var attachments = gather.frames
                guard case .replicationBatch(var batch) = envelope.body else { continue }
                if !batch.attachedSizes.isEmpty {
                    // Compressed frames (WAN mode), checked and expanded as the session does.
                    attachments = try AttachedFrameCompression.decompress(attachments, sizes: batch.attachedSizes,
                                                                          maxFrameBytes: FrameSize.unauthenticated, allocator: ByteBufferAllocator())
                    for (frame, size) in zip(attachments, batch.attachedSizes) {
                        precondition(frame.readableBytes == Int(size), "a decompressed frame is not its stated size")
                    }
                }
                switch gate.decide(generation: batch.generation, epoch: batch.epoch, sequences: batch.records.map(\.sequence)) {
                case .all: break
                case .prefix(let count, _): (batch, attachments) = batch.prefix(count, attachments: attachments)
                case .refuse: continue
                }
                var size = volumeSize
                for record in try IncomingRecord.of(batch, attachments: attachments, volumeSize: &size) {
                    if record.resize {
                        precondition(record.offset == 0 && record.length >= volumeSize && record.length <= size, "resize out of order")
                        continue
                    }
                    precondition(record.length > 0 && record.offset + record.length <= size, "record outside the volume")
                    precondition(record.data.map { UInt64($0.readableBytes) == record.length } ?? true, "record length is not its data's")
                }
            }
        } catch {
            // The session ends here.
        }
    }

    /// Scans `input` as a journal segment of a 1 MiB volume, and walks its headers, checking
    /// that both agree on the valid prefix and that every record lies inside it.
    public static func journalSegment(_ input: [UInt8]) {
        input.withUnsafeBytes { bytes in
            var scanned: [JournalRecord.Scanned] = []
            let valid = JournalRecord.scan(bytes, size: volumeSize) { scanned.append($0) }
            precondition(valid <= bytes.count, "scan went past the segment")
            var bound = volumeSize
            for r in scanned {
                if r.kind == .resize {
                    precondition(r.offset == 0 && r.data == nil, "a resize with an offset or a payload")
                    bound = max(bound, r.length)
                    continue
                }
                precondition(r.end <= valid && r.offset + r.length <= bound, "scanned record outside the segment or volume")
                if let data = r.data { precondition(data.count == Int(r.length), "record payload is not its length") }
            }
            // walkHeaders trusts what scan checked: on the valid prefix it must see the same records.
            var walked = 0
            let end = JournalRecord.walkHeaders(UnsafeRawBufferPointer(rebasing: bytes[..<valid]), size: volumeSize) { header in
                precondition(walked < scanned.count && header.end == scanned[walked].end && header.sequence == scanned[walked].sequence
                             && header.kind == scanned[walked].kind && header.length == scanned[walked].length,
                             "walkHeaders and scan disagree")
                walked += 1
                return true
            }
            precondition(end == valid && walked == scanned.count, "walkHeaders and scan disagree on the valid prefix")
        }
    }
}
