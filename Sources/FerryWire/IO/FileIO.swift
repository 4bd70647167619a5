import Foundation

/// Whole-buffer writes: the kernel may write less than asked, or be interrupted.
public enum FileIO {
    /// Writes all of `bytes` at `offset` (or at the end for a file opened O_APPEND when `offset`
    /// is nil). Returns 0, or the errno of the failure.
    public static func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, at offset: UInt64?) -> Int32 {
        var done = 0
        while done < bytes.count {
            let base = bytes.baseAddress! + done
            let n = offset.map { pwrite(fd, base, bytes.count - done, off_t($0) + off_t(done)) } ?? write(fd, base, bytes.count - done)
            if n < 0 {
                if errno == EINTR { continue }
                return errno
            }
            done += n
        }
        return 0
    }
}
