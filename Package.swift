// swift-tools-version:6.1
import PackageDescription

// deploy/fuzz.sh builds Ferry's modules (only these: instrumenting every dependency too makes
// libFuzzer scan a million coverage counters after each input) with coverage and ASan.
let fuzzing = Context.environment["FERRY_FUZZ"] == "1"

let swiftSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
] + (fuzzing ? [.unsafeFlags(["-sanitize=fuzzer,address"])] : [])

let package = Package(
    name: "ferry",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "ferry-agent", targets: ["ferry-agent"]),
        .executable(name: "ferry-controller", targets: ["ferry-controller"]),
        .executable(name: "ferryctl", targets: ["ferryctl"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-nio-extras.git", from: "1.35.2"),
        .package(url: "https://github.com/apple/swift-certificates.git", from: "1.21.1"),
        .package(url: "https://github.com/apple/swift-crypto.git", "3.12.3"..<"5.0.0"),
        .package(url: "https://github.com/apple/swift-asn1.git", from: "1.7.4"),
        .package(url: "https://github.com/apple/swift-protobuf.git", exact: "1.39.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/async-http-client.git", from: "1.37.0"),
        .package(url: "https://github.com/groue/GRDB.swift.git", from: "7.10.0"),
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", from: "2.28.1"),
        .package(url: "https://github.com/jpsim/Yams.git", from: "6.2.2"),
        .package(url: "https://github.com/swiftlang/swift-subprocess.git", from: "1.0.2"),
    ],
    targets: [
        // The wire contract: generated protobuf, framing, PKI, TLS settings, REST models.
        .target(
            name: "FerryWire",
            dependencies: [
                "CFerrySystem",
                "CLZ4",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "_CryptoExtras", package: "swift-crypto"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Yams", package: "Yams"),
            ],
            swiftSettings: swiftSettings
        ),
        // The NBD protocol, a blocking, thread-per-connection export server, shared by the agent
        // (write-capturing volumes) and the controller (point-in-time images), and a pipelined
        // NIO client (the agent reading a point-in-time export over STARTTLS).
        .target(
            name: "FerryNBD",
            dependencies: [
                "FerryWire",
                "CFerrySystem",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        // Linux system calls Swift's Glibc module does not expose (fallocate, SEEK_DATA/SEEK_HOLE).
        .target(name: "CFerrySystem"),
        // liblz4, for compressing replication streams over a WAN (Debian liblz4-dev).
        .systemLibrary(name: "CLZ4", pkgConfig: "liblz4", providers: [.apt(["liblz4-dev"])]),
        .target(
            name: "FerryAgentCore",
            dependencies: [
                "FerryWire",
                "FerryNBD",
                "CFerrySystem",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOExtras", package: "swift-nio-extras"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Subprocess", package: "swift-subprocess"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "FerryControllerCore",
            dependencies: [
                "FerryWire",
                "FerryNBD",
                "CFerrySystem",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOExtras", package: "swift-nio-extras"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "GRDB", package: "GRDB.swift"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdTLS", package: "hummingbird"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Yams", package: "Yams"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
            ],
            // The console's files and the OpenAPI document are compiled in as EmbeddedAssets.swift
            // (deploy/console/embed.py), not shipped as resources.
            exclude: ["Console/Assets", "API/openapi.yaml"],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "FerryCLICore",
            dependencies: [
                "FerryWire",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Yams", package: "Yams"),
            ],
            swiftSettings: swiftSettings
        ),
        .executableTarget(name: "ferry-agent", dependencies: ["FerryAgentCore"], swiftSettings: swiftSettings),
        .executableTarget(name: "ferry-controller", dependencies: ["FerryControllerCore"], swiftSettings: swiftSettings),
        .executableTarget(name: "ferryctl", dependencies: ["FerryCLICore"], swiftSettings: swiftSettings),
        // Prints deploy/bench.sh's comparison table (not part of the product).
        .executableTarget(name: "ferry-bench", dependencies: ["FerryWire"], swiftSettings: swiftSettings),
        .testTarget(
            name: "FerryTests",
            dependencies: [
                "FerryWire", "FerryNBD", "FerryAgentCore", "FerryControllerCore", "FerryCLICore",
                .product(name: "Subprocess", package: "swift-subprocess"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOTestUtils", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
                .product(name: "GRDB", package: "GRDB.swift"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: swiftSettings
        ),
    ],
    swiftLanguageModes: [.v6]
)

// The libFuzzer targets (deploy/fuzz/Sources), only with FERRY_FUZZ=1, and then only them and the
// libraries they fuzz. They live in this package so a fuzz build in the same scratch directory
// reuses every dependency already built and recompiles only Ferry's own modules; their main
// hands LLVMFuzzerTestOneInput to libFuzzer's driver and links only with -sanitize=fuzzer.
if fuzzing {
    func fuzzTarget(_ name: String, _ dependencies: [Target.Dependency]) -> Target {
        .executableTarget(
            name: name, dependencies: ["CFuzzerDriver"] + dependencies, path: "deploy/fuzz/Sources/\(name)",
            swiftSettings: swiftSettings,
            linkerSettings: [.unsafeFlags(["-sanitize=fuzzer,address"])]
        )
    }
    let libraries: Set = ["FerryWire", "FerryNBD", "CFerrySystem", "CLZ4", "FerryAgentCore", "FerryControllerCore"]
    package.targets.removeAll { !libraries.contains($0.name) }
    package.products = []
    package.targets += [
        .target(name: "CFuzzerDriver", path: "deploy/fuzz/Sources/CFuzzerDriver"),
        fuzzTarget("fuzz-frames", ["FerryControllerCore"]),
        fuzzTarget("fuzz-nbd-server", ["FerryNBD"]),
        fuzzTarget("fuzz-nbd-client", ["FerryNBD", .product(name: "NIOEmbedded", package: "swift-nio")]),
        fuzzTarget("fuzz-plan", ["FerryControllerCore"]),
        fuzzTarget("fuzz-config", ["FerryAgentCore", "FerryControllerCore"]),
        fuzzTarget("fuzz-token", ["FerryWire"]),
        fuzzTarget("fuzz-journal", ["FerryControllerCore"]),
    ]
}
