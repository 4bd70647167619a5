import CFuzzerDriver
import Foundation
import FerryAgentCore
import FerryControllerCore

/// A configuration file, read as the agent's and as the controller's (each rejects the other's
/// keys; both go as far as they can), then validated.
let path: String = {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("ferry-fuzz-config-\(getpid())")
    try! FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    return dir.appendingPathComponent("config.yaml").path
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    _ = FileManager.default.createFile(atPath: path, contents: Data(UnsafeRawBufferPointer(start: data, count: size)))
    var agent = AgentConfig(dataDir: "/var/lib/ferry")
    if (try? agent.apply(file: path)) != nil { _ = try? agent.validate() }
    var controller = ControllerConfig(dataDir: "/var/lib/ferry")
    if (try? controller.apply(file: path)) != nil { _ = try? controller.validate() }
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
