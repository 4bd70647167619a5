import FerryWire
import Foundation
import NIOCore
import NIOPosix
import NIOSSL

/// Opens the TLS connection from an agent to its controller (outbound only).
enum ControllerConnection {
    static func open(
        address: String,
        tls: TLSConfiguration,
        pinnedCAFingerprint: [UInt8]? = nil,
        group: any EventLoopGroup,
        frameLimit: FrameLimit
    ) async throws -> NIOAsyncChannel<ByteBuffer, ByteBuffer> {
        let (host, port) = try ConfigText.hostPort(address)
        let context = try NIOSSLContext(configuration: tls)
        do {
            return try await ClientBootstrap(group: group)
                // Short enough that a SIGTERM during a connect to an unreachable controller
                // still ends the agent within its 5 s budget.
                .connectTimeout(.seconds(3))
                .channelOption(.socketOption(.tcp_nodelay), value: 1)
                // A small send buffer: a reply to a consistency cut queues behind what is
                // buffered ahead of it, and the kernel would otherwise buffer megabytes.
                .channelOption(.socketOption(.so_sndbuf), value: 256 << 10)
                .connect(host: host, port: port) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        let handler: NIOSSLClientHandler
                        if let pinnedCAFingerprint {
                            handler = try NIOSSLClientHandler(
                                context: context, serverHostname: ControllerIdentity.serverName,
                                customVerificationCallback: TLSSettings.pinnedVerification(fingerprint: pinnedCAFingerprint)
                            )
                        } else {
                            handler = try NIOSSLClientHandler(context: context, serverHostname: ControllerIdentity.serverName)
                        }
                        try channel.pipeline.syncOperations.addHandler(handler)
                        try FramedPipeline.configure(channel, limit: frameLimit)
                        return try FramedPipeline.asyncChannel(channel)
                    }
                }
        } catch {
            throw FerryError(.unavailable, "cannot connect to controller \(address): \(error)")
        }
    }
}
