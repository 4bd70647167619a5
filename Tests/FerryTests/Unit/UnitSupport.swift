import FerryWire
import Foundation
import NIOPosix

/// Runs `body` with a fresh directory made by mkdtemp(3) and removes the directory afterwards,
/// whether `body` returns or throws. Every unit test that touches the disk uses its own.
func withUnitTempDir<T>(_ body: (String) async throws -> T) async throws -> T {
    let base = FileManager.default.temporaryDirectory.path
    var template = Array((base.hasSuffix("/") ? base : base + "/") .appending("ferry-unit-XXXXXX").utf8CString)
    let made: String? = template.withUnsafeMutableBufferPointer { buffer in
        guard let p = mkdtemp(buffer.baseAddress!) else { return nil }
        return String(cString: p)
    }
    guard let dir = made else {
        throw FerryError(.io, "mkdtemp failed: \(String(cString: strerror(errno)))")
    }
    defer { try? FileManager.default.removeItem(atPath: dir) }
    return try await body(dir)
}

/// Permission bits of a file, or nil if it cannot be stat'ed.
func unitFileMode(_ path: String) -> mode_t? {
    var st = stat()
    guard stat(path, &st) == 0 else { return nil }
    return st.st_mode & 0o7777
}

/// Runs `body` with a started two-thread pool (replica file I/O) and shuts it down afterwards.
func withPool<T>(_ body: (NIOThreadPool) async throws -> T) async throws -> T {
    let pool = NIOThreadPool(numberOfThreads: 2)
    pool.start()
    do {
        let result = try await body(pool)
        try await pool.shutdownGracefully()
        return result
    } catch {
        try? await pool.shutdownGracefully()
        throw error
    }
}
