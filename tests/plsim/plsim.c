/*
 * plsim: an LD_PRELOAD shim that records every change to the contents of
 * files under $PLSIM_DIR, so that a test can later simulate a power cut.
 *
 * The process under test runs unchanged.  Before each call that changes a
 * tracked file (write, pwrite, pwritev[2], fallocate, ftruncate, truncate,
 * open with O_TRUNC) the shim appends one record to $PLSIM_LOG holding the
 * bytes the call is about to replace and the bytes it writes; after each
 * successful fsync/fdatasync/syncfs/sync (and O_DSYNC/RWF_DSYNC write) it
 * appends a sync record.  Renames and unlinks are logged as durable at once.
 * tests/plsim/plcut.py reads the log after the process was SIGKILLed and
 * rolls back any subset of the writes that no sync covered.  The record
 * format and the rules are in tests/plsim/README.md.
 *
 * Invariants:
 *  1. A content record is completely in the log (one write(2) of the whole
 *     record) before the real call starts.  A record whose call never ran
 *     (SIGKILL in between) holds old bytes equal to the file's bytes, so
 *     undoing it is a no-op.
 *  2. One mutex is held from reading the old bytes until the real call has
 *     returned, so the records of a file are in the log in the order the
 *     kernel applied them, and their old bytes chain exactly.
 *  3. A sync record covers the records that were in the log when the real
 *     sync call *started* ("covers" = log size at that instant).
 *  4. A call that fails or writes less than asked is followed by a CANCEL
 *     record (same pid) giving the bytes actually applied.
 *  5. Descriptors are tracked by number, and each use re-checks the inode
 *     with fstat, so a number reused behind the shim's back is harmless.
 *     Untracked descriptors take a lock-free path (one relaxed load).
 */
#undef _FILE_OFFSET_BITS
#undef _FORTIFY_SOURCE
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#define PLSIM_EXPORT __attribute__((visibility("default")))

#ifndef MIN
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#endif
#ifndef MAX
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#endif

#define PLSIM_MAGIC 0x314d534cu     /* "LSM1" little-endian: 'L','S','M','1' */
#define PLSIM_MAX_FD 65536
#define PLSIM_LOG_FD_MIN 900

enum {
    REC_WRITE = 1,      /* new bytes at offset; extends the file if past EOF */
    REC_ZERO = 2,       /* zeroes at offset (punch hole / zero range) */
    REC_ALLOC = 3,      /* size becomes max(size, offset + length) */
    REC_TRUNCATE = 4,   /* size becomes new_size */
    REC_SYNC = 5,       /* path durable for records before "covers" */
    REC_SYNCALL = 6,    /* every file durable for records before "covers" */
    REC_RENAME = 7,     /* path -> path2, durable */
    REC_EXCHANGE = 8,   /* path <-> path2, durable */
    REC_UNLINK = 9,     /* path removed, durable */
    REC_CANCEL = 10,    /* previous content record of pid applied "length" bytes */
    REC_UNSUPPORTED = 11,
};

enum {
    RECF_KEEP_SIZE = 1,     /* REC_ZERO / REC_ALLOC: size does not grow */
    RECF_RANGE = 2,         /* REC_SYNC: only [offset, offset+length) */
};

/* All fields little-endian (the host order on the machines we run on). */
typedef struct PlsimRecHeader {
    uint32_t magic;
    uint16_t kind;
    uint16_t flags;
    uint32_t pid;
    uint32_t path_len;
    uint32_t path2_len;
    uint32_t reserved;
    uint64_t seq;
    uint64_t offset;
    uint64_t length;
    uint64_t old_size;
    uint64_t new_size;
    uint64_t covers;
    uint64_t old_len;       /* bytes of old data that follow */
    uint64_t new_len;       /* bytes of new data that follow */
} PlsimRecHeader;           /* 88 bytes, then path, path2, old, new */

_Static_assert(sizeof(PlsimRecHeader) == 88, "record header size");

/* ---- real functions ---------------------------------------------------- */

static int (*real_open)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_close)(int);
static int (*real_close_range)(unsigned, unsigned, int);
static void (*real_closefrom)(int);
static int (*real_dup)(int);
static int (*real_dup2)(int, int);
static int (*real_dup3)(int, int, int);
static int (*real_fcntl)(int, int, ...);
static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);
static ssize_t (*real_pwritev2)(int, const struct iovec *, int, off_t, int);
static int (*real_fallocate)(int, int, off_t, off_t);
static int (*real_posix_fallocate)(int, off_t, off_t);
static int (*real_ftruncate)(int, off_t);
static int (*real_truncate)(const char *, off_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_syncfs)(int);
static void (*real_sync)(void);
static int (*real_rename)(const char *, const char *);
static int (*real_renameat)(int, const char *, int, const char *);
static int (*real_renameat2)(int, const char *, int, const char *, unsigned);
static int (*real_unlink)(const char *);
static int (*real_unlinkat)(int, const char *, int);

static void *plsim_sym(const char *name)
{
    void *p = dlsym(RTLD_NEXT, name);
    return p;
}

#define RESOLVE(var, name) do { \
        if (!(var)) { (var) = (__typeof__(var))plsim_sym(name); } \
    } while (0)

static void plsim_resolve(void)
{
    RESOLVE(real_open, "open64");
    RESOLVE(real_openat, "openat64");
    RESOLVE(real_close, "close");
    RESOLVE(real_close_range, "close_range");
    RESOLVE(real_closefrom, "closefrom");
    RESOLVE(real_dup, "dup");
    RESOLVE(real_dup2, "dup2");
    RESOLVE(real_dup3, "dup3");
    RESOLVE(real_fcntl, "fcntl64");
    RESOLVE(real_fcntl, "fcntl");
    RESOLVE(real_write, "write");
    RESOLVE(real_writev, "writev");
    RESOLVE(real_pwrite, "pwrite64");
    RESOLVE(real_pwritev, "pwritev64");
    RESOLVE(real_pwritev2, "pwritev64v2");
    RESOLVE(real_pwritev2, "pwritev2");
    RESOLVE(real_fallocate, "fallocate64");
    RESOLVE(real_posix_fallocate, "posix_fallocate64");
    RESOLVE(real_ftruncate, "ftruncate64");
    RESOLVE(real_truncate, "truncate64");
    RESOLVE(real_fsync, "fsync");
    RESOLVE(real_fdatasync, "fdatasync");
    RESOLVE(real_syncfs, "syncfs");
    RESOLVE(real_sync, "sync");
    RESOLVE(real_rename, "rename");
    RESOLVE(real_renameat, "renameat");
    RESOLVE(real_renameat2, "renameat2");
    RESOLVE(real_unlink, "unlink");
    RESOLVE(real_unlinkat, "unlinkat");
}

/* ---- state ------------------------------------------------------------- */

static pthread_mutex_t plsim_lock = PTHREAD_MUTEX_INITIALIZER;
static __thread int plsim_busy;             /* inside the shim: pass through */
static int plsim_enabled;                   /* PLSIM_DIR and PLSIM_LOG set */
static char plsim_dir[PATH_MAX];
static unsigned long plsim_sync_delay_us;    /* PLSIM_SYNC_DELAY_US */
static char plsim_sync_delay_file[PATH_MAX]; /* PLSIM_SYNC_DELAY_FILE */
static size_t plsim_dir_len;
static char plsim_log_path[PATH_MAX];
static int log_fd = -1;
static uint64_t plsim_seq;

/* tracked[fd] != 0 iff fd was opened on a regular file under plsim_dir. */
static unsigned char tracked[PLSIM_MAX_FD];
static dev_t tracked_dev[PLSIM_MAX_FD];
static ino_t tracked_ino[PLSIM_MAX_FD];

static void plsim_die(const char *what)
{
    char buf[512];
    int n = snprintf(buf, sizeof(buf), "plsim: fatal: %s: %s\n", what,
                     strerror(errno));
    if (n > 0 && real_write) {
        ssize_t r = real_write(2, buf, (size_t)MIN(n, (int)sizeof(buf) - 1));
        (void)r;
    }
    abort();
}

/* Open the log and move it to a high descriptor number that the program
 * is unlikely to dup2 over. */
static void plsim_open_log(void)
{
    int fd = real_open(plsim_log_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC,
                       0644);
    if (fd < 0) {
        plsim_die("cannot open PLSIM_LOG");
    }
    int hi = real_fcntl(fd, F_DUPFD_CLOEXEC, PLSIM_LOG_FD_MIN);
    if (hi >= 0) {
        real_close(fd);
        fd = hi;
    }
    log_fd = fd;
}

static void plsim_atfork_prepare(void) { pthread_mutex_lock(&plsim_lock); }
static void plsim_atfork_parent(void) { pthread_mutex_unlock(&plsim_lock); }
static void plsim_atfork_child(void) { pthread_mutex_unlock(&plsim_lock); }

__attribute__((constructor))
static void plsim_init(void)
{
    plsim_resolve();
    const char *delay = getenv("PLSIM_SYNC_DELAY_US");
    if (delay && *delay) {
        plsim_sync_delay_us = strtoul(delay, NULL, 10);
    }
    const char *delay_file = getenv("PLSIM_SYNC_DELAY_FILE");
    if (delay_file && *delay_file) {
        if (strlen(delay_file) >= sizeof(plsim_sync_delay_file)) {
            plsim_die("PLSIM_SYNC_DELAY_FILE is too long");
        }
        strcpy(plsim_sync_delay_file, delay_file);
    }
    const char *dir = getenv("PLSIM_DIR");
    const char *log = getenv("PLSIM_LOG");
    if (!dir || !*dir || !log || !*log) {
        return;
    }
    if (!realpath(dir, plsim_dir)) {
        plsim_die("PLSIM_DIR cannot be resolved");
    }
    plsim_dir_len = strlen(plsim_dir);
    while (plsim_dir_len > 1 && plsim_dir[plsim_dir_len - 1] == '/') {
        plsim_dir[--plsim_dir_len] = '\0';
    }
    if (log[0] == '/') {
        snprintf(plsim_log_path, sizeof(plsim_log_path), "%s", log);
    } else {
        char cwd[PATH_MAX];
        if (!getcwd(cwd, sizeof(cwd))) {
            plsim_die("getcwd");
        }
        int n = snprintf(plsim_log_path, sizeof(plsim_log_path), "%s/%s", cwd, log);
        if (n < 0 || (size_t)n >= sizeof(plsim_log_path)) {
            errno = ENAMETOOLONG;
            plsim_die("PLSIM_LOG");
        }
    }
    plsim_open_log();
    /* The log file itself may live under PLSIM_DIR: resolve its real name
     * so that it is never tracked. */
    char real[PATH_MAX];
    char link[64];
    snprintf(link, sizeof(link), "/proc/self/fd/%d", log_fd);
    ssize_t n = readlink(link, real, sizeof(real) - 1);
    if (n > 0) {
        real[n] = '\0';
        snprintf(plsim_log_path, sizeof(plsim_log_path), "%s", real);
    }
    pthread_atfork(plsim_atfork_prepare, plsim_atfork_parent, plsim_atfork_child);
    plsim_enabled = 1;
}

/* ---- helpers ----------------------------------------------------------- */

static int path_is_tracked(const char *p)
{
    if (strncmp(p, plsim_dir, plsim_dir_len) != 0) {
        return 0;
    }
    if (p[plsim_dir_len] != '/' && p[plsim_dir_len] != '\0' &&
        !(plsim_dir_len == 1 && plsim_dir[0] == '/')) {
        return 0;
    }
    return strcmp(p, plsim_log_path) != 0;
}

/* The current absolute name of fd; returns 0 on success. */
static int fd_path(int fd, char *buf, size_t size)
{
    char link[64];
    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, buf, size - 1);
    if (n <= 0) {
        return -1;
    }
    buf[n] = '\0';
    return 0;
}

/* The absolute name of (dirfd, path) without following the last component:
 * the parent folder is resolved with realpath.  Returns 0 on success. */
static int abs_name(int dirfd, const char *path, char *out, size_t size)
{
    char joined[PATH_MAX * 2];
    if (path[0] == '/') {
        snprintf(joined, sizeof(joined), "%s", path);
    } else {
        char base[PATH_MAX];
        if (dirfd == AT_FDCWD) {
            if (!getcwd(base, sizeof(base))) {
                return -1;
            }
        } else if (fd_path(dirfd, base, sizeof(base)) < 0) {
            return -1;
        }
        snprintf(joined, sizeof(joined), "%s/%s", base, path);
    }
    size_t len = strlen(joined);
    while (len > 1 && joined[len - 1] == '/') {
        joined[--len] = '\0';
    }
    char *slash = strrchr(joined, '/');
    const char *name = slash + 1;
    char dir[PATH_MAX];
    if (slash == joined) {
        snprintf(dir, sizeof(dir), "/");
    } else {
        *slash = '\0';
        if (!realpath(joined, dir)) {
            return -1;
        }
    }
    if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0 || !*name) {
        return -1;
    }
    int n = strcmp(dir, "/") == 0 ? snprintf(out, size, "/%s", name)
                                   : snprintf(out, size, "%s/%s", dir, name);
    return n < 0 || (size_t)n >= size ? -1 : 0;
}

static uint64_t log_size_locked(void)
{
    struct stat st;
    if (fstat(log_fd, &st) < 0) {
        plsim_die("fstat PLSIM_LOG");
    }
    return (uint64_t)st.st_size;
}

/* Append one record: the header, the names, then old and new data (new
 * data given as an iovec so that writev callers need no extra copy). */
static void log_append_locked(PlsimRecHeader *h, const char *path,
                              const char *path2, const void *old,
                              const struct iovec *newv, int newc)
{
    h->magic = PLSIM_MAGIC;
    h->pid = (uint32_t)getpid();
    h->seq = ++plsim_seq;
    h->path_len = path ? (uint32_t)strlen(path) : 0;
    h->path2_len = path2 ? (uint32_t)strlen(path2) : 0;
    size_t total = sizeof(*h) + h->path_len + h->path2_len + h->old_len +
                   h->new_len;
    char *buf = malloc(total);
    if (!buf) {
        plsim_die("out of memory for a log record");
    }
    char *p = buf;
    memcpy(p, h, sizeof(*h));
    p += sizeof(*h);
    memcpy(p, path, h->path_len);
    p += h->path_len;
    if (h->path2_len) {
        memcpy(p, path2, h->path2_len);
        p += h->path2_len;
    }
    if (h->old_len) {
        memcpy(p, old, h->old_len);
        p += h->old_len;
    }
    uint64_t left = h->new_len;
    for (int i = 0; i < newc && left > 0; i++) {
        size_t n = (size_t)MIN((uint64_t)newv[i].iov_len, left);
        memcpy(p, newv[i].iov_base, n);
        p += n;
        left -= n;
    }
    size_t done = 0;
    int reopened = 0;
    while (done < total) {
        ssize_t r = real_write(log_fd, buf + done, total - done);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == EBADF && !reopened) {
                /* The program closed our descriptor behind our back. */
                reopened = 1;
                plsim_open_log();
                continue;
            }
            plsim_die("cannot write PLSIM_LOG");
        }
        done += (size_t)r;
    }
    free(buf);
}

static void log_simple_locked(int kind, int flags, const char *path,
                              const char *path2, uint64_t covers,
                              uint64_t offset, uint64_t length)
{
    PlsimRecHeader h = { .kind = (uint16_t)kind, .flags = (uint16_t)flags,
                         .covers = covers, .offset = offset, .length = length };
    log_append_locked(&h, path ? path : "", path2, NULL, NULL, 0);
}

static void log_cancel_locked(uint64_t applied)
{
    log_simple_locked(REC_CANCEL, 0, "", NULL, 0, 0, applied);
}

/* Read [offset, offset+len) clipped to size into a new buffer; *ret_len is
 * the number of bytes stored (the rest is past EOF, i.e. zeroes). */
static void *read_old(int fd, uint64_t offset, uint64_t len, uint64_t size,
                      uint64_t *ret_len)
{
    uint64_t n = 0;
    if (offset < size) {
        n = MIN(len, size - offset);
    }
    *ret_len = n;
    if (n == 0) {
        return NULL;
    }
    char *buf = calloc(1, n);
    if (!buf) {
        plsim_die("out of memory for old bytes");
    }
    int rfd = fd;
    int own = 0;
    uint64_t got = 0;
    while (got < n) {
        ssize_t r = pread(rfd, buf + got, n - got, (off_t)(offset + got));
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r < 0 && !own) {
            /* O_WRONLY or O_DIRECT: read through a plain descriptor. */
            char link[64];
            snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
            rfd = real_open(link, O_RDONLY | O_CLOEXEC);
            if (rfd < 0) {
                plsim_die("cannot reopen a tracked file to read old bytes");
            }
            own = 1;
            continue;
        }
        if (r < 0) {
            plsim_die("cannot read old bytes");
        }
        if (r == 0) {
            break;      /* raced with nothing we know of: zeroes */
        }
        got += (uint64_t)r;
    }
    if (own) {
        real_close(rfd);
    }
    return buf;
}

/* Lock and check that fd is a tracked, linked regular file; fills st and
 * path.  Returns 1 with the lock held, or 0 (lock not held). */
static int fd_begin(int fd, struct stat *st, char *path, size_t size)
{
    if (!plsim_enabled || plsim_busy || fd < 0 || fd >= PLSIM_MAX_FD ||
        !__atomic_load_n(&tracked[fd], __ATOMIC_RELAXED)) {
        return 0;
    }
    pthread_mutex_lock(&plsim_lock);
    if (!tracked[fd] || fstat(fd, st) < 0 || st->st_dev != tracked_dev[fd] ||
        st->st_ino != tracked_ino[fd]) {
        __atomic_store_n(&tracked[fd], 0, __ATOMIC_RELAXED);
        pthread_mutex_unlock(&plsim_lock);
        return 0;
    }
    if (st->st_nlink == 0 || fd_path(fd, path, size) < 0 || !path_is_tracked(path)) {
        /* Deleted or moved out of PLSIM_DIR: its contents no longer matter. */
        pthread_mutex_unlock(&plsim_lock);
        return 0;
    }
    plsim_busy = 1;
    return 1;
}

static void fd_end(void)
{
    plsim_busy = 0;
    pthread_mutex_unlock(&plsim_lock);
}

/* Start tracking fd if it is a regular file under plsim_dir. */
static void fd_opened(int fd)
{
    if (!plsim_enabled || fd < 0 || fd >= PLSIM_MAX_FD) {
        return;
    }
    struct stat st;
    char path[PATH_MAX];
    int yes = fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
              fd_path(fd, path, sizeof(path)) == 0 && path_is_tracked(path);
    pthread_mutex_lock(&plsim_lock);
    if (yes) {
        tracked_dev[fd] = st.st_dev;
        tracked_ino[fd] = st.st_ino;
    }
    __atomic_store_n(&tracked[fd], (unsigned char)yes, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&plsim_lock);
}

static void fd_copy(int oldfd, int newfd)
{
    if (!plsim_enabled || newfd < 0 || newfd >= PLSIM_MAX_FD) {
        return;
    }
    pthread_mutex_lock(&plsim_lock);
    int yes = oldfd >= 0 && oldfd < PLSIM_MAX_FD && tracked[oldfd];
    if (yes) {
        tracked_dev[newfd] = tracked_dev[oldfd];
        tracked_ino[newfd] = tracked_ino[oldfd];
    }
    __atomic_store_n(&tracked[newfd], (unsigned char)yes, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&plsim_lock);
}

static void fd_forget(int fd)
{
    if (fd >= 0 && fd < PLSIM_MAX_FD && tracked[fd]) {
        __atomic_store_n(&tracked[fd], 0, __ATOMIC_RELAXED);
    }
}

/* If the program is about to reuse our log descriptor number, move the log
 * away first. */
static void protect_log_fd(int fd)
{
    if (plsim_enabled && fd == log_fd) {
        pthread_mutex_lock(&plsim_lock);
        int hi = real_fcntl(log_fd, F_DUPFD_CLOEXEC, log_fd + 1);
        if (hi < 0) {
            plsim_die("cannot move the log descriptor");
        }
        real_close(log_fd);
        log_fd = hi;
        pthread_mutex_unlock(&plsim_lock);
    }
}

/* ---- content changes --------------------------------------------------- */

static uint64_t iov_total(const struct iovec *iov, int n)
{
    uint64_t t = 0;
    for (int i = 0; i < n; i++) {
        t += iov[i].iov_len;
    }
    return t;
}

/* Is every write on fd durable when it returns (O_DSYNC / O_SYNC)? */
static int fd_sync_each(int fd)
{
    int fl = real_fcntl(fd, F_GETFL);
    return fl >= 0 && (fl & O_DSYNC);
}

/* The offset a write() at the file position will land at. */
static off_t fd_write_pos(int fd, const struct stat *st)
{
    int fl = real_fcntl(fd, F_GETFL);
    if (fl >= 0 && (fl & O_APPEND)) {
        return st->st_size;
    }
    return lseek(fd, 0, SEEK_CUR);
}

/* Log a write of iov at pos on a tracked fd (lock held). */
static void log_write_locked(int fd, const char *path, const struct stat *st,
                             uint64_t pos, const struct iovec *iov, int niov,
                             uint64_t len)
{
    PlsimRecHeader h = { .kind = REC_WRITE, .offset = pos, .length = len,
                         .old_size = (uint64_t)st->st_size };
    h.new_size = MAX((uint64_t)st->st_size, pos + len);
    void *old = read_old(fd, pos, len, (uint64_t)st->st_size, &h.old_len);
    h.new_len = len;
    log_append_locked(&h, path, NULL, old, iov, niov);
    free(old);
}

/* After the real write: CANCEL when short, SYNC(range) when durable. */
static void log_write_done_locked(const char *path, ssize_t r, uint64_t pos,
                                  uint64_t len, int durable)
{
    if (r < 0 || (uint64_t)r < len) {
        log_cancel_locked(r < 0 ? 0 : (uint64_t)r);
    }
    if (durable && r > 0) {
        log_simple_locked(REC_SYNC, RECF_RANGE, path, NULL, log_size_locked(),
                          pos, (uint64_t)r);
    }
}

static ssize_t do_pwritev(int fd, const struct iovec *iov, int niov, off_t off,
                          int rwf, int kind)
{
    /* kind: 0 write, 1 writev, 2 pwrite, 3 pwritev, 4 pwritev2 */
    struct stat st;
    char path[PATH_MAX];
    if (!fd_begin(fd, &st, path, sizeof(path))) {
        switch (kind) {
        case 0: return real_write(fd, iov[0].iov_base, iov[0].iov_len);
        case 1: return real_writev(fd, iov, niov);
        case 2: return real_pwrite(fd, iov[0].iov_base, iov[0].iov_len, off);
        case 3: return real_pwritev(fd, iov, niov, off);
        default: return real_pwritev2(fd, iov, niov, off, rwf);
        }
    }
    uint64_t len = iov_total(iov, niov);
    off_t pos = off;
    if (kind <= 1 || (kind == 4 && off == -1)) {
        pos = fd_write_pos(fd, &st);
    }
#ifdef RWF_APPEND
    if (kind == 4 && (rwf & RWF_APPEND)) {
        pos = st.st_size;
    }
#endif
    int durable = fd_sync_each(fd) || (kind == 4 && (rwf & (RWF_DSYNC | RWF_SYNC)));
    ssize_t r;
    if (pos < 0 || len == 0) {
        pos = pos < 0 ? 0 : pos;
        len = 0;
    } else {
        log_write_locked(fd, path, &st, (uint64_t)pos, iov, niov, len);
    }
    switch (kind) {
    case 0: r = real_write(fd, iov[0].iov_base, iov[0].iov_len); break;
    case 1: r = real_writev(fd, iov, niov); break;
    case 2: r = real_pwrite(fd, iov[0].iov_base, iov[0].iov_len, off); break;
    case 3: r = real_pwritev(fd, iov, niov, off); break;
    default: r = real_pwritev2(fd, iov, niov, off, rwf); break;
    }
    int e = errno;
    if (len > 0) {
        log_write_done_locked(path, r, (uint64_t)pos, len, durable);
    }
    fd_end();
    errno = e;
    return r;
}

PLSIM_EXPORT ssize_t write(int fd, const void *buf, size_t count)
{
    struct iovec v = { (void *)buf, count };
    if (!real_write) {
        plsim_resolve();
    }
    return do_pwritev(fd, &v, 1, 0, 0, 0);
}

PLSIM_EXPORT ssize_t writev(int fd, const struct iovec *iov, int iovcnt)
{
    if (!real_writev) {
        plsim_resolve();
    }
    if (iovcnt <= 0) {
        return real_writev(fd, iov, iovcnt);
    }
    return do_pwritev(fd, iov, iovcnt, 0, 0, 1);
}

PLSIM_EXPORT ssize_t pwrite(int fd, const void *buf, size_t count, off_t off)
{
    struct iovec v = { (void *)buf, count };
    if (!real_pwrite) {
        plsim_resolve();
    }
    return do_pwritev(fd, &v, 1, off, 0, 2);
}

PLSIM_EXPORT ssize_t pwrite64(int fd, const void *buf, size_t count, off64_t off)
{
    return pwrite(fd, buf, count, off);
}

PLSIM_EXPORT ssize_t pwritev(int fd, const struct iovec *iov, int iovcnt, off_t off)
{
    if (!real_pwritev) {
        plsim_resolve();
    }
    if (iovcnt <= 0) {
        return real_pwritev(fd, iov, iovcnt, off);
    }
    return do_pwritev(fd, iov, iovcnt, off, 0, 3);
}

PLSIM_EXPORT ssize_t pwritev64(int fd, const struct iovec *iov, int iovcnt, off64_t off)
{
    return pwritev(fd, iov, iovcnt, off);
}

PLSIM_EXPORT ssize_t pwritev2(int fd, const struct iovec *iov, int iovcnt,
                              off_t off, int flags)
{
    if (!real_pwritev2) {
        plsim_resolve();
    }
    if (iovcnt <= 0) {
        return real_pwritev2(fd, iov, iovcnt, off, flags);
    }
    return do_pwritev(fd, iov, iovcnt, off, flags, 4);
}

PLSIM_EXPORT ssize_t pwritev64v2(int fd, const struct iovec *iov, int iovcnt,
                                 off64_t off, int flags)
{
    return pwritev2(fd, iov, iovcnt, off, flags);
}

/* fallocate and posix_fallocate. */
static int do_fallocate(int fd, int mode, off_t off, off_t len, int posix)
{
    struct stat st;
    char path[PATH_MAX];
    if (!fd_begin(fd, &st, path, sizeof(path))) {
        return posix ? real_posix_fallocate(fd, off, len)
                     : real_fallocate(fd, mode, off, len);
    }
    uint64_t size = (uint64_t)st.st_size;
    uint64_t o = off < 0 ? 0 : (uint64_t)off;
    uint64_t l = len < 0 ? 0 : (uint64_t)len;
    int logged = 1;
    PlsimRecHeader h = { .offset = o, .length = l, .old_size = size,
                         .new_size = size };
    void *old = NULL;
    if (mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) {
        h.kind = REC_ZERO;
        if (mode & FALLOC_FL_KEEP_SIZE) {
            h.flags = RECF_KEEP_SIZE;
        } else {
            h.new_size = MAX(size, o + l);
        }
        old = read_old(fd, o, l, size, &h.old_len);
    } else if (mode & ~FALLOC_FL_KEEP_SIZE) {
        h.kind = REC_UNSUPPORTED;   /* collapse / insert range */
    } else if (mode & FALLOC_FL_KEEP_SIZE) {
        logged = 0;                 /* no visible change */
    } else {
        h.kind = REC_ALLOC;
        h.new_size = MAX(size, o + l);
        if (h.new_size == size) {
            logged = 0;
        }
    }
    if (logged) {
        log_append_locked(&h, path, NULL, old, NULL, 0);
    }
    free(old);
    int r = posix ? real_posix_fallocate(fd, off, len)
                  : real_fallocate(fd, mode, off, len);
    int e = posix ? r : errno;
    if (logged && h.kind != REC_UNSUPPORTED && r != 0) {
        log_cancel_locked(0);
    }
    if (logged && r == 0 && h.kind != REC_UNSUPPORTED && fd_sync_each(fd)) {
        log_simple_locked(REC_SYNC, RECF_RANGE, path, NULL, log_size_locked(),
                          o, l);
    }
    fd_end();
    if (!posix) {
        errno = e;
    }
    return r;
}

PLSIM_EXPORT int fallocate(int fd, int mode, off_t off, off_t len)
{
    if (!real_fallocate) {
        plsim_resolve();
    }
    return do_fallocate(fd, mode, off, len, 0);
}

PLSIM_EXPORT int fallocate64(int fd, int mode, off64_t off, off64_t len)
{
    return fallocate(fd, mode, off, len);
}

PLSIM_EXPORT int posix_fallocate(int fd, off_t off, off_t len)
{
    if (!real_posix_fallocate) {
        plsim_resolve();
    }
    return do_fallocate(fd, 0, off, len, 1);
}

PLSIM_EXPORT int posix_fallocate64(int fd, off64_t off, off64_t len)
{
    return posix_fallocate(fd, off, len);
}

/* Log a size change of a tracked file read through rfd (lock held). */
static void log_truncate_locked(int rfd, const char *path, uint64_t size,
                                uint64_t length)
{
    PlsimRecHeader h = { .kind = REC_TRUNCATE, .old_size = size,
                         .new_size = length, .offset = MIN(size, length) };
    void *old = NULL;
    if (length < size) {
        h.length = size - length;
        old = read_old(rfd, length, size - length, size, &h.old_len);
    }
    log_append_locked(&h, path, NULL, old, NULL, 0);
    free(old);
}

PLSIM_EXPORT int ftruncate(int fd, off_t length)
{
    if (!real_ftruncate) {
        plsim_resolve();
    }
    struct stat st;
    char path[PATH_MAX];
    if (length < 0 || !fd_begin(fd, &st, path, sizeof(path))) {
        return real_ftruncate(fd, length);
    }
    log_truncate_locked(fd, path, (uint64_t)st.st_size, (uint64_t)length);
    int r = real_ftruncate(fd, length);
    int e = errno;
    if (r < 0) {
        log_cancel_locked(0);
    }
    fd_end();
    errno = e;
    return r;
}

PLSIM_EXPORT int ftruncate64(int fd, off64_t length)
{
    return ftruncate(fd, length);
}

/* Called with the lock held: if path names a tracked regular file, log its
 * truncation to length.  Returns 1 when a record was logged. */
static int log_path_truncate_locked(const char *path, uint64_t length)
{
    char name[PATH_MAX];
    if (abs_name(AT_FDCWD, path, name, sizeof(name)) < 0) {
        return 0;
    }
    int rfd = real_open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (rfd < 0) {
        return 0;
    }
    struct stat st;
    char real[PATH_MAX];
    int ok = fstat(rfd, &st) == 0 && S_ISREG(st.st_mode) &&
             fd_path(rfd, real, sizeof(real)) == 0 && path_is_tracked(real);
    if (ok && (uint64_t)st.st_size != length) {
        log_truncate_locked(rfd, real, (uint64_t)st.st_size, length);
    } else {
        ok = 0;
    }
    real_close(rfd);
    return ok;
}

PLSIM_EXPORT int truncate(const char *path, off_t length)
{
    if (!real_truncate) {
        plsim_resolve();
    }
    if (!plsim_enabled || plsim_busy || length < 0) {
        return real_truncate(path, length);
    }
    pthread_mutex_lock(&plsim_lock);
    plsim_busy = 1;
    int logged = log_path_truncate_locked(path, (uint64_t)length);
    int r = real_truncate(path, length);
    int e = errno;
    if (logged && r < 0) {
        log_cancel_locked(0);
    }
    plsim_busy = 0;
    pthread_mutex_unlock(&plsim_lock);
    errno = e;
    return r;
}

PLSIM_EXPORT int truncate64(const char *path, off64_t length)
{
    return truncate(path, length);
}

/* ---- open / close / dup ------------------------------------------------ */

static int do_openat(int dirfd, const char *path, int flags, mode_t mode)
{
    if (!real_openat) {
        plsim_resolve();
    }
    if (!plsim_enabled || plsim_busy) {
        return real_openat(dirfd, path, flags, mode);
    }
    int logged = 0;
    int locked = 0;
    if ((flags & O_TRUNC) && (flags & O_ACCMODE) != O_RDONLY) {
        char name[PATH_MAX];
        if (abs_name(dirfd, path, name, sizeof(name)) == 0) {
            pthread_mutex_lock(&plsim_lock);
            plsim_busy = 1;
            locked = 1;
            int rfd = real_openat(dirfd, path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
            if (rfd >= 0) {
                struct stat st;
                char real[PATH_MAX];
                if (fstat(rfd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0 &&
                    fd_path(rfd, real, sizeof(real)) == 0 && path_is_tracked(real)) {
                    log_truncate_locked(rfd, real, (uint64_t)st.st_size, 0);
                    logged = 1;
                }
                real_close(rfd);
            }
        }
    }
    int fd = real_openat(dirfd, path, flags, mode);
    int e = errno;
    if (locked) {
        if (logged && fd < 0) {
            log_cancel_locked(0);
        }
        plsim_busy = 0;
        pthread_mutex_unlock(&plsim_lock);
    }
    if (fd >= 0) {
        fd_opened(fd);
    }
    errno = e;
    return fd;
}

#define OPEN_MODE(flags, mode) do { \
        if ((flags) & (O_CREAT | __O_TMPFILE)) { \
            va_list ap; \
            va_start(ap, flags); \
            mode = va_arg(ap, int); \
            va_end(ap); \
        } \
    } while (0)

PLSIM_EXPORT int open(const char *path, int flags, ...)
{
    mode_t mode = 0;
    OPEN_MODE(flags, mode);
    return do_openat(AT_FDCWD, path, flags, mode);
}

PLSIM_EXPORT int open64(const char *path, int flags, ...)
{
    mode_t mode = 0;
    OPEN_MODE(flags, mode);
    return do_openat(AT_FDCWD, path, flags, mode);
}

PLSIM_EXPORT int openat(int dirfd, const char *path, int flags, ...)
{
    mode_t mode = 0;
    OPEN_MODE(flags, mode);
    return do_openat(dirfd, path, flags, mode);
}

PLSIM_EXPORT int openat64(int dirfd, const char *path, int flags, ...)
{
    mode_t mode = 0;
    OPEN_MODE(flags, mode);
    return do_openat(dirfd, path, flags, mode);
}

PLSIM_EXPORT int __open_2(const char *path, int flags)
{
    return do_openat(AT_FDCWD, path, flags, 0);
}

PLSIM_EXPORT int __open64_2(const char *path, int flags)
{
    return do_openat(AT_FDCWD, path, flags, 0);
}

PLSIM_EXPORT int __openat_2(int dirfd, const char *path, int flags)
{
    return do_openat(dirfd, path, flags, 0);
}

PLSIM_EXPORT int __openat64_2(int dirfd, const char *path, int flags)
{
    return do_openat(dirfd, path, flags, 0);
}

PLSIM_EXPORT int creat(const char *path, mode_t mode)
{
    return do_openat(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode);
}

PLSIM_EXPORT int creat64(const char *path, mode_t mode)
{
    return creat(path, mode);
}

PLSIM_EXPORT int close(int fd)
{
    if (!real_close) {
        plsim_resolve();
    }
    if (plsim_enabled && fd == log_fd) {
        return 0;       /* the log is ours: pretend */
    }
    fd_forget(fd);
    return real_close(fd);
}

PLSIM_EXPORT int close_range(unsigned first, unsigned last, int flags)
{
    if (!real_close_range) {
        plsim_resolve();
    }
    if (!real_close_range) {
        errno = ENOSYS;
        return -1;
    }
    if (!plsim_enabled) {
        return real_close_range(first, last, flags);
    }
    if (!(flags & CLOSE_RANGE_CLOEXEC)) {
        for (unsigned fd = first; fd <= last && fd < PLSIM_MAX_FD; fd++) {
            fd_forget((int)fd);
        }
    }
    unsigned lf = (unsigned)log_fd;
    if (lf < first || lf > last) {
        return real_close_range(first, last, flags);
    }
    int r = 0;
    if (lf > first) {
        r = real_close_range(first, lf - 1, flags);
    }
    if (r == 0 && lf < last) {
        r = real_close_range(lf + 1, last, flags);
    }
    return r;
}

PLSIM_EXPORT void closefrom(int lowfd)
{
    if (lowfd < 0) {
        lowfd = 0;
    }
    close_range((unsigned)lowfd, ~0u, 0);
}

PLSIM_EXPORT int dup(int fd)
{
    if (!real_dup) {
        plsim_resolve();
    }
    int r = real_dup(fd);
    if (r >= 0) {
        fd_copy(fd, r);
    }
    return r;
}

PLSIM_EXPORT int dup2(int oldfd, int newfd)
{
    if (!real_dup2) {
        plsim_resolve();
    }
    if (oldfd != newfd) {
        protect_log_fd(newfd);
    }
    int r = real_dup2(oldfd, newfd);
    if (r >= 0 && oldfd != newfd) {
        fd_copy(oldfd, r);
    }
    return r;
}

PLSIM_EXPORT int dup3(int oldfd, int newfd, int flags)
{
    if (!real_dup3) {
        plsim_resolve();
    }
    if (oldfd != newfd) {
        protect_log_fd(newfd);
    }
    int r = real_dup3(oldfd, newfd, flags);
    if (r >= 0) {
        fd_copy(oldfd, r);
    }
    return r;
}

static int do_fcntl(int fd, int cmd, void *arg)
{
    if (!real_fcntl) {
        plsim_resolve();
    }
    int r = real_fcntl(fd, cmd, arg);
    if (r >= 0 && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC)) {
        fd_copy(fd, r);
    }
    return r;
}

PLSIM_EXPORT int fcntl(int fd, int cmd, ...)
{
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    return do_fcntl(fd, cmd, arg);
}

PLSIM_EXPORT int fcntl64(int fd, int cmd, ...)
{
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    return do_fcntl(fd, cmd, arg);
}

/* ---- durability -------------------------------------------------------- */

static int do_sync(int fd, int data)
{
    struct stat st;
    char path[PATH_MAX];
    if (plsim_sync_delay_us &&
        (!plsim_sync_delay_file[0] || access(plsim_sync_delay_file, F_OK) == 0)) {
        usleep(plsim_sync_delay_us);    /* a slow disk flush, for any file */
    }
    if (!fd_begin(fd, &st, path, sizeof(path))) {
        return data ? real_fdatasync(fd) : real_fsync(fd);
    }
    uint64_t covers = log_size_locked();
    fd_end();       /* do not hold the lock across a slow sync */
    int r = data ? real_fdatasync(fd) : real_fsync(fd);
    int e = errno;
    if (r == 0) {
        pthread_mutex_lock(&plsim_lock);
        plsim_busy = 1;
        log_simple_locked(REC_SYNC, 0, path, NULL, covers, 0, 0);
        plsim_busy = 0;
        pthread_mutex_unlock(&plsim_lock);
    }
    errno = e;
    return r;
}

PLSIM_EXPORT int fsync(int fd)
{
    if (!real_fsync) {
        plsim_resolve();
    }
    return do_sync(fd, 0);
}

PLSIM_EXPORT int fdatasync(int fd)
{
    if (!real_fdatasync) {
        plsim_resolve();
    }
    return do_sync(fd, 1);
}

static void log_syncall(uint64_t covers)
{
    pthread_mutex_lock(&plsim_lock);
    plsim_busy = 1;
    log_simple_locked(REC_SYNCALL, 0, "", NULL, covers, 0, 0);
    plsim_busy = 0;
    pthread_mutex_unlock(&plsim_lock);
}

static uint64_t current_covers(void)
{
    pthread_mutex_lock(&plsim_lock);
    uint64_t c = log_size_locked();
    pthread_mutex_unlock(&plsim_lock);
    return c;
}

PLSIM_EXPORT int syncfs(int fd)
{
    if (!real_syncfs) {
        plsim_resolve();
    }
    if (!plsim_enabled || plsim_busy) {
        return real_syncfs(fd);
    }
    uint64_t covers = current_covers();
    int r = real_syncfs(fd);
    int e = errno;
    if (r == 0) {
        log_syncall(covers);
    }
    errno = e;
    return r;
}

PLSIM_EXPORT void sync(void)
{
    if (!real_sync) {
        plsim_resolve();
    }
    if (!plsim_enabled || plsim_busy) {
        real_sync();
        return;
    }
    uint64_t covers = current_covers();
    real_sync();
    log_syncall(covers);
}

/* ---- names ------------------------------------------------------------- */

static int do_renameat2(int olddir, const char *oldpath, int newdir,
                        const char *newpath, unsigned flags, int which)
{
    char a[PATH_MAX], b[PATH_MAX];
    int names = plsim_enabled && !plsim_busy &&
                abs_name(olddir, oldpath, a, sizeof(a)) == 0 &&
                abs_name(newdir, newpath, b, sizeof(b)) == 0 &&
                (path_is_tracked(a) || path_is_tracked(b));
    if (names) {
        pthread_mutex_lock(&plsim_lock);
        plsim_busy = 1;
    }
    int r;
    if (which == 0) {
        r = real_rename(oldpath, newpath);
    } else if (which == 1) {
        r = real_renameat(olddir, oldpath, newdir, newpath);
    } else {
        r = real_renameat2(olddir, oldpath, newdir, newpath, flags);
    }
    int e = errno;
    if (names) {
        if (r == 0) {
            int kind = (which == 2 && (flags & RENAME_EXCHANGE)) ? REC_EXCHANGE
                                                                 : REC_RENAME;
            log_simple_locked(kind, 0, a, b, 0, 0, 0);
        }
        plsim_busy = 0;
        pthread_mutex_unlock(&plsim_lock);
    }
    errno = e;
    return r;
}

PLSIM_EXPORT int rename(const char *oldpath, const char *newpath)
{
    if (!real_rename) {
        plsim_resolve();
    }
    return do_renameat2(AT_FDCWD, oldpath, AT_FDCWD, newpath, 0, 0);
}

PLSIM_EXPORT int renameat(int olddir, const char *oldpath, int newdir,
                          const char *newpath)
{
    if (!real_renameat) {
        plsim_resolve();
    }
    return do_renameat2(olddir, oldpath, newdir, newpath, 0, 1);
}

PLSIM_EXPORT int renameat2(int olddir, const char *oldpath, int newdir,
                           const char *newpath, unsigned flags)
{
    if (!real_renameat2) {
        plsim_resolve();
    }
    return do_renameat2(olddir, oldpath, newdir, newpath, flags, 2);
}

static int do_unlinkat(int dirfd, const char *path, int flags, int at)
{
    char a[PATH_MAX];
    int names = plsim_enabled && !plsim_busy && !(flags & AT_REMOVEDIR) &&
                abs_name(dirfd, path, a, sizeof(a)) == 0 && path_is_tracked(a);
    if (names) {
        pthread_mutex_lock(&plsim_lock);
        plsim_busy = 1;
    }
    int r = at ? real_unlinkat(dirfd, path, flags) : real_unlink(path);
    int e = errno;
    if (names) {
        if (r == 0) {
            log_simple_locked(REC_UNLINK, 0, a, NULL, 0, 0, 0);
        }
        plsim_busy = 0;
        pthread_mutex_unlock(&plsim_lock);
    }
    errno = e;
    return r;
}

PLSIM_EXPORT int unlink(const char *path)
{
    if (!real_unlink) {
        plsim_resolve();
    }
    return do_unlinkat(AT_FDCWD, path, 0, 0);
}

PLSIM_EXPORT int unlinkat(int dirfd, const char *path, int flags)
{
    if (!real_unlinkat) {
        plsim_resolve();
    }
    return do_unlinkat(dirfd, path, flags, 1);
}
