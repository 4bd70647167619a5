#define _GNU_SOURCE
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <sys/socket.h>
#include <unistd.h>
#include "ferry_system.h"

int ferry_punch_hole(int fd, off_t offset, off_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
}

int ferry_reserve(int fd, off_t length) {
    return fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, length);
}

off_t ferry_seek_data(int fd, off_t offset) { return lseek(fd, offset, SEEK_DATA); }

off_t ferry_seek_hole(int fd, off_t offset) { return lseek(fd, offset, SEEK_HOLE); }

static uint32_t crc32c_table[256];

// Filled once at load time, before any thread can use it.
__attribute__((constructor)) static void crc32c_init_table(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc32c_table[i] = c;
    }
}

static uint32_t crc32c_software(uint32_t crc, const unsigned char *p, size_t n) {
    while (n--) crc = crc32c_table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__)
#include <string.h>
__attribute__((target("sse4.2")))
static uint32_t crc32c_hardware(uint32_t crc, const unsigned char *p, size_t n) {
    uint64_t c = crc;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}
#endif

uint32_t ferry_crc32c(uint32_t crc, const void *data, size_t length) {
    const unsigned char *p = data;
    crc = ~crc;
#if defined(__x86_64__)
    if (__builtin_cpu_supports("sse4.2")) return ~crc32c_hardware(crc, p, length);
#endif
    return ~crc32c_software(crc, p, length);
}

void ferry_malloc_for_bulk_io(int keep_freed_bytes) {
    // 32 MiB is glibc's ceiling for the mmap threshold on 64-bit (HEAP_MAX_SIZE / 2).
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, keep_freed_bytes);
}

void ferry_name_thread(const char *name) { pthread_setname_np(pthread_self(), name); }

int ferry_accept(int fd) { return accept4(fd, NULL, NULL, SOCK_CLOEXEC); }

int ferry_peer_uid(int fd, uint32_t *uid) {
    struct ucred credentials;
    socklen_t length = sizeof(credentials);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &credentials, &length) != 0) return -1;
    *uid = credentials.uid;
    return 0;
}

#include <errno.h>
#include <linux/fs.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>

int ferry_fs_freeze(int fd) { return ioctl(fd, FIFREEZE, 0); }
int ferry_fs_thaw(int fd) { return ioctl(fd, FITHAW, 0); }

static int ferry_is_kept(int fd, const int *fds, int count, int wake_fd) {
    if (fd == wake_fd) return 1;
    for (int i = 0; i < count; i++) if (fds[i] == fd) return 1;
    return 0;
}

static long ferry_now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

int ferry_fs_thaw_guard(const int *fds, int count, int wake_fd, int deadline_ms) {
    pid_t child = fork();
    if (child < 0) return -1;
    if (child > 0) {
        int status = 0;
        pid_t waited;
        while ((waited = waitpid(child, &status, 0)) < 0 && errno == EINTR) {}
        if (waited < 0) return -1;
        return (WIFEXITED(status) && WEXITSTATUS(status) == 0) ? 0 : (errno = ECHILD, -1);
    }
    // The child: fork the guard and exit, so the guard is reparented and never a zombie.
    pid_t guard = fork();
    if (guard < 0) _exit(1);
    if (guard > 0) _exit(0);
    struct sigaction ignore;
    memset(&ignore, 0, sizeof ignore);
    ignore.sa_handler = SIG_IGN;
    sigaction(SIGTERM, &ignore, NULL);
    sigaction(SIGINT, &ignore, NULL);
    sigaction(SIGHUP, &ignore, NULL);
    sigaction(SIGPIPE, &ignore, NULL);
    // Every other descriptor closed: a copy of the wake pipe's write end would keep it open.
    int highest = wake_fd;
    for (int i = 0; i < count; i++) if (fds[i] > highest) highest = fds[i];
    for (int fd = 0; fd <= highest; fd++) {
        if (ferry_is_kept(fd, fds, count, wake_fd)) continue;
        int next = fd;
        while (next + 1 <= highest && !ferry_is_kept(next + 1, fds, count, wake_fd)) next++;
        if (syscall(SYS_close_range, (unsigned)fd, (unsigned)next, 0) != 0) {
            for (int f = fd; f <= next; f++) close(f);
        }
        fd = next;
    }
    if (syscall(SYS_close_range, (unsigned)highest + 1, ~0U, 0) != 0) {
        for (int f = highest + 1; f < 65536; f++) close(f);
    }
    long end = ferry_now_ms() + deadline_ms;
    for (;;) {
        long left = end - ferry_now_ms();
        if (left <= 0) break;
        struct pollfd p = { .fd = wake_fd, .events = POLLIN };
        int r = poll(&p, 1, left > 60000 ? 60000 : (int)left);
        if (r < 0 && errno == EINTR) continue;
        if (r != 0) {
            char byte;
            ssize_t n = read(wake_fd, &byte, 1);
            if (n < 0 && errno == EINTR) continue;
            if (n > 0) _exit(0);  // disarmed: the agent thawed them itself
            break;                // end of file (or an error): thaw now
        }
    }
    for (int i = count - 1; i >= 0; i--) ioctl(fds[i], FITHAW, 0);
    _exit(0);
}
