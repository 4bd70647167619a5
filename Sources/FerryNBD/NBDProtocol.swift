import NIOCore

/// Constants of the NBD protocol (fixed newstyle negotiation, simple and structured replies),
/// as in the upstream specification (doc/proto.md of the NBD project).
enum NBD {
    static let initMagic: UInt64 = 0x4E42_444D_4147_4943          // "NBDMAGIC"
    static let optionMagic: UInt64 = 0x4948_4156_454F_5054        // "IHAVEOPT"
    static let optionReplyMagic: UInt64 = 0x0003_E889_0455_65A9
    static let requestMagic: UInt32 = 0x2560_9513
    static let simpleReplyMagic: UInt32 = 0x6744_6698
    static let structuredReplyMagic: UInt32 = 0x668E_33EF

    enum HandshakeFlag {
        static let fixedNewstyle: UInt16 = 1 << 0
        static let noZeroes: UInt16 = 1 << 1
    }

    enum ClientFlag {
        static let fixedNewstyle: UInt32 = 1 << 0
        static let noZeroes: UInt32 = 1 << 1
    }

    enum Option: UInt32 {
        case exportName = 1, abort = 2, list = 3, startTLS = 5, info = 6, go = 7, structuredReply = 8,
             listMetaContext = 9, setMetaContext = 10
    }

    enum Reply {
        static let ack: UInt32 = 1
        static let server: UInt32 = 2
        static let info: UInt32 = 3
        static let metaContext: UInt32 = 4
        static let errUnsupported: UInt32 = 1 << 31 | 1
        static let errPolicy: UInt32 = 1 << 31 | 2
        static let errInvalid: UInt32 = 1 << 31 | 3
        static let errPlatform: UInt32 = 1 << 31 | 4
        static let errTLSRequired: UInt32 = 1 << 31 | 5
        static let errUnknown: UInt32 = 1 << 31 | 6
        static let errShutdown: UInt32 = 1 << 31 | 7
        static let errBlockSizeRequired: UInt32 = 1 << 31 | 8
        static let errTooBig: UInt32 = 1 << 31 | 9
    }

    enum Info {
        static let export: UInt16 = 0
        static let blockSize: UInt16 = 3
    }

    enum TransmissionFlag {
        static let hasFlags: UInt16 = 1 << 0
        static let readOnly: UInt16 = 1 << 1
        static let sendFlush: UInt16 = 1 << 2
        static let sendFUA: UInt16 = 1 << 3
        static let sendTrim: UInt16 = 1 << 5
        static let sendWriteZeroes: UInt16 = 1 << 6
        static let canMultiConn: UInt16 = 1 << 8
    }

    enum Command: UInt16 {
        case read = 0, write = 1, disconnect = 2, flush = 3, trim = 4, cache = 5, writeZeroes = 6, blockStatus = 7
    }

    enum CommandFlag {
        static let fua: UInt16 = 1 << 0
        static let noHole: UInt16 = 1 << 1
        static let df: UInt16 = 1 << 2
        static let reqOne: UInt16 = 1 << 3
        static let fastZero: UInt16 = 1 << 4
    }

    /// Errors on the wire (Linux errno values, as the protocol defines them).
    enum Errno: UInt32 {
        case perm = 1, io = 5, noMem = 12, invalid = 22, noSpace = 28, overflow = 75, notSupported = 95, shutdown = 108
    }

    enum ChunkType {
        static let none: UInt16 = 0
        static let offsetData: UInt16 = 1
        static let offsetHole: UInt16 = 2
        static let blockStatus: UInt16 = 5
        static let error: UInt16 = 1 << 15 | 1
    }

    static let chunkFlagDone: UInt16 = 1 << 0

    /// The one metadata context offered, and the id it has on every connection.
    static let allocationContext = "base:allocation"
    static let allocationContextID: UInt32 = 1
    /// Most queries one LIST/SET_META_CONTEXT may carry (each names a context).
    static let maxMetaQueries = 64
    /// Most extents one block status reply carries.
    static let maxExtentsPerReply = 1024

    /// Largest request payload accepted and advertised (the protocol lets clients assume 32 MiB).
    static let maxPayload = 32 * 1024 * 1024
    /// Largest option payload accepted during negotiation (names are at most 4 KiB).
    static let maxOptionLength = 64 * 1024
    static let preferredBlockSize: UInt32 = 4096
}

/// One transmission-phase request header.
struct NBDRequest: Sendable {
    var flags: UInt16
    var type: UInt16
    var cookie: UInt64
    var offset: UInt64
    var length: UInt32

    static let size = 28

    init(parsing buffer: inout ByteBuffer) throws {
        guard let magic = buffer.readInteger(as: UInt32.self), magic == NBD.requestMagic,
              let flags = buffer.readInteger(as: UInt16.self), let type = buffer.readInteger(as: UInt16.self),
              let cookie = buffer.readInteger(as: UInt64.self), let offset = buffer.readInteger(as: UInt64.self),
              let length = buffer.readInteger(as: UInt32.self)
        else {
            throw NBDProtocolError("bad request magic: the client is out of step with the protocol")
        }
        self.flags = flags
        self.type = type
        self.cookie = cookie
        self.offset = offset
        self.length = length
    }
}

/// A protocol violation that ends the connection (the NBD spec allows a hard disconnect).
struct NBDProtocolError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
