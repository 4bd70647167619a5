// swift-tools-version:6.1
// Ferry's libFuzzer targets, a package of their own so the normal build never sees them (they
// have no main and link only with -sanitize=fuzzer). Build and run them with deploy/fuzz.sh.
import Foundation
import PackageDescription

// The main package, two levels up. A path dependency is known by its directory's name, which
// differs between checkouts (a worktree, CI's clone), so its products are named through it.
let root = URL(fileURLWithPath: Context.packageDirectory).deletingLastPathComponent().deletingLastPathComponent()
let ferry = root.lastPathComponent.lowercased()

// Each target's main hands LLVMFuzzerTestOneInput to libFuzzer's driver. Ferry's own modules
// get the same sanitizers through FERRY_FUZZ=1 (its Package.swift); dependencies are not
// instrumented.
func fuzzTarget(_ name: String, _ dependencies: [Target.Dependency]) -> Target {
    .executableTarget(
        name: name, dependencies: ["CFuzzerDriver"] + dependencies, path: "Sources/\(name)",
        swiftSettings: [.unsafeFlags(["-sanitize=fuzzer,address"])],
        linkerSettings: [.unsafeFlags(["-sanitize=fuzzer,address"])]
    )
}

let package = Package(
    name: "ferry-fuzz",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(path: root.path),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
    ],
    targets: [
        .target(name: "CFuzzerDriver"),
        fuzzTarget("fuzz-frames", [.product(name: "FerryControllerCore", package: ferry)]),
        fuzzTarget("fuzz-nbd-server", [.product(name: "FerryNBD", package: ferry)]),
        fuzzTarget("fuzz-nbd-client", [
            .product(name: "FerryNBD", package: ferry),
            .product(name: "NIOEmbedded", package: "swift-nio"),
        ]),
        fuzzTarget("fuzz-plan", [.product(name: "FerryControllerCore", package: ferry)]),
        fuzzTarget("fuzz-config", [
            .product(name: "FerryAgentCore", package: ferry),
            .product(name: "FerryControllerCore", package: ferry),
        ]),
        fuzzTarget("fuzz-token", [.product(name: "FerryWire", package: ferry)]),
        fuzzTarget("fuzz-journal", [.product(name: "FerryControllerCore", package: ferry)]),
    ],
    swiftLanguageModes: [.v6]
)
