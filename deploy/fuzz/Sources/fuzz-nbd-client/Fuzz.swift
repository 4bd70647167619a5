import CFuzzerDriver
import Foundation
import FerryNBD
import NIOEmbedded

/// What an NBD server sends to the client: greeting, option replies, then replies.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let channel = EmbeddedChannel()
    try! NBDFuzzing.client(Array(UnsafeRawBufferPointer(start: data, count: size)), channel: channel)
    _ = try? channel.finish(acceptAlreadyClosed: true)
    try? channel.embeddedEventLoop.syncShutdownGracefully()
    return 0
}

@main
enum Main {
    static func main() {
        var argc = CommandLine.argc
        var argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
        exit(LLVMFuzzerRunDriver(&argc, &argv) { data, size in fuzz(data, size) })
    }
}
