import Foundation

/// Whole-file replacement that a crash or power loss leaves either old or new, never torn.
public enum AtomicFile {
    /// Writes through a new temporary file created with the final mode (never an existing file or
    /// a symlink someone planted), so a secret is never readable by others even for a moment;
    /// then renames it into place and syncs the directory, so the rename survives a power loss.
    public static func write(_ bytes: [UInt8], to path: String, mode: mode_t) throws {
        let tmp = path + ".tmp-\(getpid())"
        unlink(tmp)
        let fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode)
        guard fd >= 0 else { throw FerryError(.io, "cannot create \(tmp): \(String(cString: strerror(errno)))") }
        // The umask may have narrowed the mode; never widen a secret's, only set it exactly.
        fchmod(fd, mode)
        let failed = bytes.withUnsafeBytes { FileIO.writeAll(fd, $0, at: 0) }
        if failed != 0 {
            close(fd)
            unlink(tmp)
            throw FerryError(.io, "cannot write \(tmp): \(String(cString: strerror(failed)))")
        }
        let synced = fsync(fd) == 0
        let closed = close(fd) == 0
        guard synced, closed else {
            unlink(tmp)
            throw FerryError(.io, "cannot write \(tmp): \(String(cString: strerror(errno)))")
        }
        guard rename(tmp, path) == 0 else {
            throw FerryError(.io, "cannot rename \(tmp) to \(path): \(String(cString: strerror(errno)))")
        }
        let parent = (path as NSString).deletingLastPathComponent
        let dir = open(parent.isEmpty ? "." : parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dir >= 0 {
            fsync(dir)
            close(dir)
        }
    }
}
