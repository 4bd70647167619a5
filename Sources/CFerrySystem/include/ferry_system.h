// Linux calls Swift's Glibc module does not expose (they need _GNU_SOURCE).
#ifndef FERRY_SYSTEM_H
#define FERRY_SYSTEM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/// CRC32C (Castagnoli) of `length` bytes, continuing from `crc` (0 to start). Uses the CPU's
/// crc32 instruction where there is one.
uint32_t ferry_crc32c(uint32_t crc, const void *data, size_t length);

/// Deallocates [offset, offset+length) so it reads as zeroes; the file size is unchanged.
/// Returns 0, or -1 with errno set (EOPNOTSUPP where the file system cannot).
int ferry_punch_hole(int fd, off_t offset, off_t length);

/// Allocates the first `length` bytes of a file without changing its size, so appends into them
/// find their blocks ready. Returns 0, or -1 with errno set.
int ferry_reserve(int fd, off_t length);

/// lseek(fd, offset, SEEK_DATA) and SEEK_HOLE: -1 with errno ENXIO past the last data.
off_t ferry_seek_data(int fd, off_t offset);
off_t ferry_seek_hole(int fd, off_t offset);

/// Keeps buffers up to 32 MiB in the heap and gives freed heap past `keep_freed_bytes` back to
/// the kernel (mallopt).
void ferry_malloc_for_bulk_io(int keep_freed_bytes);

/// Names the calling thread (at most 15 characters), as `top -H` and profilers show it.
void ferry_name_thread(const char *name);

/// accept4(fd, NULL, NULL, SOCK_CLOEXEC): the new connection is not inherited by children.
int ferry_accept(int fd);

/// The user id of a unix socket's peer (SO_PEERCRED). Returns 0, or -1 with errno set.
int ferry_peer_uid(int fd, uint32_t *uid);

/// FIFREEZE / FITHAW on the file system holding the open directory `fd`. Returns 0, or -1
/// with errno set (EBUSY: frozen already; EINVAL on thaw: not frozen; EOPNOTSUPP: cannot).
int ferry_fs_freeze(int fd);
int ferry_fs_thaw(int fd);

/// Forks a guard process that thaws the file systems open at `fds[0..count)`, the last first,
/// as soon as reading `wake_fd` ends (end of file: whoever holds the write end closed it or
/// died) or after `deadline_ms`, whichever comes first; a byte read from `wake_fd` disarms it
/// (it exits without thawing: its owner thawed them). The guard is a grandchild, so it never
/// lingers as the caller's zombie; it ignores SIGTERM, SIGINT, SIGHUP and SIGPIPE (thawing is
/// its whole job) and keeps no other descriptor. After the fork it runs only async-signal-safe
/// calls. Returns 0, or -1 with errno set.
int ferry_fs_thaw_guard(const int *fds, int count, int wake_fd, int deadline_ms);

#endif
