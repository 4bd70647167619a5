import CFuzzerDriver
import Foundation
import FerryControllerCore

/// A recovery plan file, checked against the hosts and volumes of deploy/config/plan.yaml.
let known = PlanParser.Known(
    hosts: ["db", "app", "web", "rec1", "rec2"],
    volumes: ["db": ["data", "log", "archive"], "app": ["root"], "web": ["root", "static"]],
    taken: ["db/archive": "other"]
)

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let text = String(decoding: UnsafeRawBufferPointer(start: data, count: size), as: UTF8.self)
    _ = try? PlanParser.parse(text, file: "plan.yaml", known: known)
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
