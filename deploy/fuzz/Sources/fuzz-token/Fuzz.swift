import CFuzzerDriver
import Foundation
import FerryWire

/// An enrollment token as an operator pastes it; a token that parses must print back as one
/// that parses to the same token.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let text = String(decoding: UnsafeRawBufferPointer(start: data, count: size), as: UTF8.self)
    if let token = try? EnrollmentToken(parsing: text) {
        precondition((try? EnrollmentToken(parsing: token.description)) == token, "token does not round-trip")
    }
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
