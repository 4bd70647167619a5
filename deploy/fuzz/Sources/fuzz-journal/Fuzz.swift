import CFuzzerDriver
import Foundation
import FerryControllerCore

/// A replica journal segment as read back after a crash: any bytes, a valid prefix.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    ControllerFuzzing.journalSegment(Array(UnsafeRawBufferPointer(start: data, count: size)))
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
