import Foundation
import NIOCore

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

    /// Reads `count` bytes at `offset` onto the end of `buffer`, retrying short reads. Past the
    /// end of the file the rest reads as zeroes when `zeroFillPastEnd`, else the read stops
    /// there. Returns 0, or the errno of the failure.
    public static func read(_ fd: Int32, count: Int, at offset: UInt64, into buffer: inout ByteBuffer, zeroFillPastEnd: Bool) -> Int32 {
        var done = 0
        while done < count {
            var failure: Int32 = 0
            let n = buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: count - done) { out in
                let r = pread(fd, out.baseAddress, count - done, off_t(offset) + off_t(done))
                if r < 0 { failure = errno }
                return max(r, 0)
            }
            if failure == EINTR { continue }
            if failure != 0 { return failure }
            if n == 0 {
                if zeroFillPastEnd { buffer.writeRepeatingByte(0, count: count - done) }
                return 0
            }
            done += n
        }
        return 0
    }

    /// Appends `buffers` in order at the end of a file opened O_APPEND, or sends them on a
    /// stream socket (`socket`: a vanished peer is then an EPIPE, never a SIGPIPE), with as few
    /// system calls as the kernel allows (writev, sendmsg). Returns 0, or the errno of the failure.
    public static func writeAll(_ fd: Int32, _ buffers: [ByteBuffer], socket: Bool = false) -> Int32 {
        var index = 0
        var skip = 0 // bytes of buffers[index] already written
        while index < buffers.count {
            let batch = min(buffers.count - index, 1024) // IOV_MAX on Linux
            // The buffers are alive and unchanged for the whole call, so their storage stays put.
            var vectors: [iovec] = []
            vectors.reserveCapacity(batch)
            for i in index..<(index + batch) {
                buffers[i].withUnsafeReadableBytes { bytes in
                    let from = i == index ? skip : 0
                    vectors.append(iovec(iov_base: UnsafeMutableRawPointer(mutating: bytes.baseAddress.map { $0 + from }),
                                         iov_len: bytes.count - from))
                }
            }
            let n = vectors.withUnsafeMutableBufferPointer { iov in
                guard socket else { return writev(fd, iov.baseAddress, Int32(iov.count)) }
                var message = msghdr()
                message.msg_iov = iov.baseAddress
                message.msg_iovlen = iov.count
                return sendmsg(fd, &message, Int32(MSG_NOSIGNAL))
            }
            if n < 0 {
                if errno == EINTR { continue }
                return errno
            }
            // Advance past what was written, possibly into the middle of a buffer, and past
            // empty buffers (so a call with nothing left to write ends).
            var left = n
            while index < buffers.count {
                let remaining = buffers[index].readableBytes - skip
                guard left >= remaining else { skip += left; break }
                left -= remaining
                index += 1
                skip = 0
            }
            if n == 0 && index < buffers.count { return EIO }
        }
        return 0
    }
}
