import CFuzzerDriver
import Foundation
import FerryControllerCore

/// An agent session's byte stream as the controller reads it: frames, envelopes, attachments,
/// replication batches.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    ControllerFuzzing.frames(Array(UnsafeRawBufferPointer(start: data, count: size)))
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
