/*
 * `bitback io`: qemu-io style reads and writes through the block library.
 *
 *   bitback io [-f FMT] [-r [-U]] [-n] FILE -c CMD [-c CMD ...]
 *
 * Commands (a subset of qemu-io's, same syntax and output):
 *   write [-P PATTERN | -s FILE] [-z [-u]] [-c] [-f] [-q] OFF LEN
 *   read [-P PATTERN] [-v] [-q] OFF LEN
 *   discard|trim [-q] OFF LEN
 *   flush
 *   sleep MS
 *
 * Writes go through bdrv_pwrite / bdrv_pwrite_zeroes, so every enabled
 * bitmap of the image is marked before the data lands, exactly as a write
 * through bitbackd would mark it.  Requests larger than BDRV_MAX_REQUEST are
 * split; a buffer of at most that size is allocated whatever LEN is.
 * Commands run in order; a failed command is reported on stderr and the
 * next ones still run (as qemu-io does), and the exit status is non-zero if
 * any command failed, including a `read -P` whose data does not match.
 * stdout is flushed after every command so a caller can watch progress
 * (tests use `sleep` to hold the image open, then SIGKILL the process).
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli/cli.h"
#include "util/cutils.h"
#include "util/cleanup.h"

#define IO_MAX_ARGS 32
#define IO_MAX_COMMANDS 4096
/* Longest `sleep`: one day, in milliseconds. */
#define IO_MAX_SLEEP_MS (24u * 3600 * 1000)

typedef struct IoState {
    BlockDriverState *bs;
    uint64_t length;           /* image size */
} IoState;

void cli_io_usage(FILE *out)
{
    fprintf(out,
            "Usage: bitback io [-f FMT] [-r [-U]] [-n] FILE -c CMD [-c CMD ...]\n"
            "\n"
            "Options:\n"
            "  -c, --cmd CMD      run CMD (may be repeated; run in order)\n"
            "  -f, --format FMT   image format (default: probe)\n"
            "  -r, --read-only    open the image read-only\n"
            "  -U, --force-share  open it even while another process writes it\n"
            "                     (with -r only, as qemu-io)\n"
            "  -n, --nocache      use O_DIRECT\n"
            "\n"
            "Commands:\n"
            "  write [-P PATTERN | -s FILE] [-z [-u]] [-c] [-f] [-q] OFF LEN\n"
            "        write LEN bytes of PATTERN (default 0xcd) at OFF, or the\n"
            "        first LEN bytes of FILE (-s, LEN at most 64 MiB);\n"
            "        -z writes zeroes (-u: may unmap), -f uses FUA,\n"
            "        -c writes compressed clusters (qcow2; whole, unallocated\n"
            "        clusters)\n"
            "  read [-P PATTERN] [-v] [-q] OFF LEN\n"
            "        read LEN bytes at OFF; -P verifies every byte is PATTERN,\n"
            "        -v dumps the data in hex\n"
            "  discard [-q] OFF LEN   (alias: trim)\n"
            "  flush\n"
            "  sleep MS              hold the image open for MS milliseconds\n"
            "\n"
            "OFF and LEN accept the suffixes K, M, G, T.\n");
}

/* qemu-io's size notation: "512 bytes", "2.930 KiB". */
static void io_size_str(double v, char *buf, size_t len)
{
    static const char *const units[] = {"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    size_t i = 0;

    if (v < 1024) {
        snprintf(buf, len, "%.0f bytes", v);
        return;
    }
    v /= 1024;
    while (v >= 1024 && i + 1 < ARRAY_SIZE(units)) {
        v /= 1024;
        i++;
    }
    /* "1 MiB" rather than "1.000 MiB", as qemu-io prints. */
    snprintf(buf, len, "%.3f", v);
    if (strlen(buf) > 4 && !strcmp(buf + strlen(buf) - 4, ".000")) {
        buf[strlen(buf) - 4] = '\0';
    }
    snprintf(buf + strlen(buf), len - strlen(buf), " %s", units[i]);
}

static void print_stats(uint64_t bytes, double secs)
{
    char sz[32], rate[32];

    if (secs <= 0) {
        secs = 1e-9;
    }
    io_size_str((double)bytes, sz, sizeof(sz));
    io_size_str((double)bytes / secs, rate, sizeof(rate));
    printf("%s, 1 ops; %05.2f sec (%s/sec and %.4f ops/sec)\n",
           sz, secs, rate, 1.0 / secs);
}

static bool parse_pattern(const char *s, int *ret, Error **errp)
{
    char *end;
    long v;

    errno = 0;
    v = strtol(s, &end, 0);
    if (errno || end == s || *end || v < 0 || v > 255) {
        error_setg(errp, "Invalid pattern '%s': expected a byte value 0..255",
                   s);
        return false;
    }
    *ret = (int)v;
    return true;
}

/* Parse "OFF LEN" and check the range lies within the image. */
static bool parse_range(IoState *s, const char *cmd, int nargs, char **args,
                        uint64_t *ret_off, uint64_t *ret_len, Error **errp)
{
    if (nargs != 2) {
        error_setg(errp, "%s: expected OFFSET and LENGTH (got %d arguments)",
                   cmd, nargs);
        return false;
    }
    if (!cli_parse_size(args[0], "offset", ret_off, errp) ||
        !cli_parse_size(args[1], "length", ret_len, errp)) {
        error_prepend(errp, "%s: ", cmd);
        return false;
    }
    if (*ret_off > s->length || *ret_len > s->length - *ret_off) {
        error_setg(errp, "%s: offset %" PRIu64 " + length %" PRIu64
                   " is beyond the end of the image (%" PRIu64 " bytes)",
                   cmd, *ret_off, *ret_len, s->length);
        return false;
    }
    return true;
}

/* Buffer for up to min(len, BDRV_MAX_REQUEST) bytes, aligned for O_DIRECT. */
static void *io_alloc(uint64_t len, Error **errp)
{
    size_t n = (size_t)MIN(len, (uint64_t)BDRV_MAX_REQUEST);
    void *buf = NULL;

    if (n == 0) {
        n = 1;
    }
    if (posix_memalign(&buf, 4096, ROUND_UP(n, 4096)) != 0) {
        error_setg(errp, "Out of memory allocating a %zu byte buffer", n);
        return NULL;
    }
    return buf;
}

static void hex_dump(const uint8_t *buf, uint64_t offset, size_t len)
{
    for (size_t i = 0; i < len; i += 16) {
        size_t n = MIN((size_t)16, len - i);

        printf("%08" PRIx64 ":  ", offset + i);
        for (size_t j = 0; j < 16; j++) {
            if (j < n) {
                printf("%02x ", buf[i + j]);
            } else {
                printf("   ");
            }
        }
        printf(" ");
        for (size_t j = 0; j < n; j++) {
            uint8_t ch = buf[i + j];
            putchar(ch >= 0x20 && ch < 0x7f ? ch : '.');
        }
        putchar('\n');
    }
}

/* Split "-P 0xab -z" style options off the front of args.  optstr lists
 * the accepted letters, a ':' after a letter means it takes a value.
 * Returns the index of the first positional argument, or -1. */
static int io_getopt(const char *cmd, int argc, char **argv, const char *optstr,
                     const char *values[26], Error **errp)
{
    int i;

    for (i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char *p;

        if (a[0] != '-' || a[1] == '\0') {
            break;
        }
        if (!strcmp(a, "--")) {
            return i + 1;
        }
        for (p = a + 1; *p; p++) {
            const char *spec = strchr(optstr, *p);

            if (*p < 'A' || *p > 'z' || !spec || *spec == ':') {
                error_setg(errp, "%s: invalid option -- '%c' (try 'bitback io --help')",
                           cmd, *p);
                return -1;
            }
            /* Upper and lower case letters share a slot only if the
             * command does not use both; ours never do. */
            int slot = (*p | 0x20) - 'a';
            if (slot < 0 || slot >= 26) {
                error_setg(errp, "%s: invalid option -- '%c'", cmd, *p);
                return -1;
            }
            if (spec[1] == ':') {
                if (p[1]) {
                    values[slot] = p + 1;
                } else if (i + 1 < argc) {
                    values[slot] = argv[++i];
                } else {
                    error_setg(errp, "%s: option -%c needs a value", cmd, *p);
                    return -1;
                }
                break;
            }
            values[slot] = "";
        }
    }
    return i;
}

#define OPT(c) (values[((c) | 0x20) - 'a'])

/* write -s: the first len bytes of `path` into buf (len <= one request,
 * as buf holds no more). */
static bool read_source_file(const char *path, void *buf, uint64_t len,
                             Error **errp)
{
    if (len > BDRV_MAX_REQUEST) {
        error_setg(errp, "write: -s writes at most %u bytes", BDRV_MAX_REQUEST);
        return false;
    }
    FILE *f = fopen(path, "rb");
    if (!f) {
        error_setg_errno(errp, errno, "write: cannot open '%s'", path);
        return false;
    }
    bool ok = fread(buf, 1, len, f) == len;
    fclose(f);
    if (!ok) {
        error_setg(errp, "write: '%s' is shorter than %" PRIu64 " bytes",
                   path, len);
    }
    return ok;
}

static bool io_write(IoState *s, int argc, char **argv, Error **errp)
{
    const char *values[26] = {0};
    _cleanup_free_ void *buf = NULL;
    uint64_t off, len, done = 0;
    int pattern = 0xcd, flags = 0, first;
    bool zero, quiet;
    double t0;

    first = io_getopt("write", argc, argv, "P:s:zucfq", values, errp);
    if (first < 0) {
        return false;
    }
    zero = OPT('z') != NULL;
    if (OPT('c') && zero) {
        error_setg(errp, "write: -c and -z cannot be used together");
        return false;
    }
    if (OPT('c')) {
        flags |= BDRV_REQ_WRITE_COMPRESSED;
    }
    quiet = OPT('q') != NULL;
    if ((OPT('P') || OPT('s')) && zero) {
        error_setg(errp, "write: -z and -P or -s cannot be used together");
        return false;
    }
    if (OPT('P') && OPT('s')) {
        error_setg(errp, "write: -P and -s cannot be used together");
        return false;
    }
    if (OPT('u') && !zero) {
        error_setg(errp, "write: -u requires -z");
        return false;
    }
    if (OPT('P') && !parse_pattern(OPT('P'), &pattern, errp)) {
        return false;
    }
    if (OPT('f')) {
        flags |= BDRV_REQ_FUA;
    }
    if (OPT('u')) {
        flags |= BDRV_REQ_MAY_UNMAP;
    }
    if (!parse_range(s, "write", argc - first, argv + first, &off, &len, errp)) {
        return false;
    }
    if (s->bs->read_only) {
        error_setg(errp, "write: the image is open read-only (-r)");
        return false;
    }
    if (!zero) {
        buf = io_alloc(len, errp);
        if (!buf) {
            return false;
        }
        memset(buf, pattern, (size_t)MIN(len, (uint64_t)BDRV_MAX_REQUEST));
    }
    if (OPT('s') && !read_source_file(OPT('s'), buf, len, errp)) {
        return false;
    }
    t0 = clock_monotonic_seconds();
    while (done < len) {
        uint64_t n = MIN(len - done, (uint64_t)BDRV_MAX_REQUEST);
        int ret = zero ? bdrv_pwrite_zeroes(s->bs, off + done, n, flags)
                       : bdrv_pwrite(s->bs, off + done, buf, n, flags);
        if (ret < 0) {
            error_setg_errno(errp, -ret, "write failed at offset %" PRIu64,
                             off + done);
            return false;
        }
        done += n;
    }
    if (!quiet) {
        printf("wrote %" PRIu64 "/%" PRIu64 " bytes at offset %" PRIu64 "\n",
               len, len, off);
        print_stats(len, clock_monotonic_seconds() - t0);
    }
    return true;
}

static bool io_read(IoState *s, int argc, char **argv, bool *ret_mismatch,
                    Error **errp)
{
    const char *values[26] = {0};
    _cleanup_free_ uint8_t *buf = NULL;
    uint64_t off, len, done = 0, bad_at = 0;
    int pattern = -1, first;
    bool quiet, verbose, mismatch = false;
    uint8_t bad_val = 0;
    double t0;

    first = io_getopt("read", argc, argv, "P:vq", values, errp);
    if (first < 0) {
        return false;
    }
    quiet = OPT('q') != NULL;
    verbose = OPT('v') != NULL;
    if (OPT('P') && !parse_pattern(OPT('P'), &pattern, errp)) {
        return false;
    }
    if (!parse_range(s, "read", argc - first, argv + first, &off, &len, errp)) {
        return false;
    }
    buf = io_alloc(len, errp);
    if (!buf) {
        return false;
    }
    t0 = clock_monotonic_seconds();
    while (done < len) {
        uint64_t n = MIN(len - done, (uint64_t)BDRV_MAX_REQUEST);
        int ret = bdrv_pread(s->bs, off + done, buf, n);
        if (ret < 0) {
            error_setg_errno(errp, -ret, "read failed at offset %" PRIu64,
                             off + done);
            return false;
        }
        if (pattern >= 0 && !mismatch) {
            for (uint64_t i = 0; i < n; i++) {
                if (buf[i] != pattern) {
                    mismatch = true;
                    bad_at = off + done + i;
                    bad_val = buf[i];
                    break;
                }
            }
        }
        if (verbose) {
            hex_dump(buf, off + done, (size_t)n);
        }
        done += n;
    }
    if (mismatch) {
        /* qemu-io's wording: the request's offset and length. */
        fflush(stdout);
        fprintf(stderr, "Pattern verification failed at offset %" PRIu64
                ", %" PRIu64 " bytes (first mismatch at offset %" PRIu64
                ": 0x%02x, expected 0x%02x)\n", off, len, bad_at, bad_val,
                pattern);
        *ret_mismatch = true;
    }
    if (!quiet) {
        printf("read %" PRIu64 "/%" PRIu64 " bytes at offset %" PRIu64 "\n",
               len, len, off);
        print_stats(len, clock_monotonic_seconds() - t0);
    }
    return true;
}

static bool io_discard(IoState *s, int argc, char **argv, Error **errp)
{
    const char *values[26] = {0};
    uint64_t off, len, done = 0;
    int first;
    double t0;

    first = io_getopt("discard", argc, argv, "q", values, errp);
    if (first < 0) {
        return false;
    }
    if (!parse_range(s, "discard", argc - first, argv + first, &off, &len,
                     errp)) {
        return false;
    }
    if (s->bs->read_only) {
        error_setg(errp, "discard: the image is open read-only (-r)");
        return false;
    }
    t0 = clock_monotonic_seconds();
    while (done < len) {
        uint64_t n = MIN(len - done, (uint64_t)BDRV_MAX_REQUEST);
        int ret = bdrv_pdiscard(s->bs, off + done, n);
        if (ret < 0) {
            error_setg_errno(errp, -ret, "discard failed at offset %" PRIu64,
                             off + done);
            return false;
        }
        done += n;
    }
    if (!OPT('q')) {
        printf("discard %" PRIu64 "/%" PRIu64 " bytes at offset %" PRIu64 "\n",
               len, len, off);
        print_stats(len, clock_monotonic_seconds() - t0);
    }
    return true;
}

static bool io_sleep(int argc, char **argv, Error **errp)
{
    struct timespec ts;
    char *end;
    unsigned long ms;

    if (argc != 1) {
        error_setg(errp, "sleep: expected milliseconds");
        return false;
    }
    errno = 0;
    ms = strtoul(argv[0], &end, 10);
    if (errno || end == argv[0] || *end || argv[0][0] == '-' ||
        ms > IO_MAX_SLEEP_MS) {
        error_setg(errp, "sleep: invalid time '%s' (milliseconds, at most %u)",
                   argv[0], IO_MAX_SLEEP_MS);
        return false;
    }
    ts.tv_sec = (time_t)(ms / 1000);
    ts.tv_nsec = (long)(ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
        /* keep sleeping for the remaining time */
    }
    return true;
}

/* Run one command line.  Returns false when it failed (error in errp) or
 * sets *ret_mismatch for a failed pattern verification. */
static bool io_run(IoState *s, const char *line, bool *ret_mismatch,
                   Error **errp)
{
    _cleanup_free_ char *copy = strdup(line);
    char *argv[IO_MAX_ARGS];
    char *save = NULL, *tok;
    int argc = 0;

    if (!copy) {
        error_setg(errp, "Out of memory");
        return false;
    }
    for (tok = strtok_r(copy, " \t\n", &save); tok;
         tok = strtok_r(NULL, " \t\n", &save)) {
        if (argc == IO_MAX_ARGS) {
            error_setg(errp, "'%s': too many arguments", line);
            return false;
        }
        argv[argc++] = tok;
    }
    if (argc == 0) {
        error_setg(errp, "empty command");
        return false;
    }
    if (!strcmp(argv[0], "write")) {
        return io_write(s, argc - 1, argv + 1, errp);
    }
    if (!strcmp(argv[0], "read")) {
        return io_read(s, argc - 1, argv + 1, ret_mismatch, errp);
    }
    if (!strcmp(argv[0], "discard") || !strcmp(argv[0], "trim")) {
        return io_discard(s, argc - 1, argv + 1, errp);
    }
    if (!strcmp(argv[0], "flush")) {
        int ret;
        if (argc != 1) {
            error_setg(errp, "flush: takes no arguments");
            return false;
        }
        ret = bdrv_flush(s->bs);
        if (ret < 0) {
            error_setg_errno(errp, -ret, "flush failed");
            return false;
        }
        return true;
    }
    if (!strcmp(argv[0], "sleep")) {
        return io_sleep(argc - 1, argv + 1, errp);
    }
    if (!strcmp(argv[0], "help")) {
        cli_io_usage(stdout);
        return true;
    }
    error_setg(errp, "unknown command '%s' (write, read, discard, trim, "
               "flush, sleep)", argv[0]);
    return false;
}

int cli_cmd_io(int argc, char **argv)
{
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {"cmd", required_argument, NULL, 'c'},
        {"read-only", no_argument, NULL, 'r'},
        {"nocache", no_argument, NULL, 'n'},
        {"force-share", no_argument, NULL, 'U'},
        {NULL, 0, NULL, 0},
    };
    _cleanup_free_ const char **cmds = NULL;
    int ncmds = 0, c, ret = CLI_EXIT_OK;
    const char *fmt = NULL, *filename;
    int flags = BDRV_O_RDWR;
    IoState s = {0};
    Error *err = NULL;
    int64_t len;

    cmds = calloc(IO_MAX_COMMANDS, sizeof(*cmds));
    if (!cmds) {
        error_report("Out of memory");
        return CLI_EXIT_ERROR;
    }
    cli_reset_getopt();
    while ((c = getopt_long(argc, argv, "hf:c:rnU", long_opts, NULL)) != -1) {
        switch (c) {
        case 'h':
            cli_io_usage(stdout);
            return CLI_EXIT_OK;
        case 'f':
            fmt = optarg;
            break;
        case 'c':
            if (ncmds == IO_MAX_COMMANDS) {
                error_report("io: too many commands (at most %d)",
                             IO_MAX_COMMANDS);
                return CLI_EXIT_ERROR;
            }
            cmds[ncmds++] = optarg;
            break;
        case 'r':
            flags &= ~BDRV_O_RDWR;
            break;
        case 'n':
            flags |= BDRV_O_NOCACHE;
            break;
        case 'U':
            flags |= BDRV_O_FORCE_SHARE;   /* the block layer wants -r too */
            break;
        default:
            return CLI_EXIT_ERROR;
        }
    }
    if (optind != argc - 1) {
        error_report("io: expecting exactly one file name (try 'bitback io --help')");
        return CLI_EXIT_ERROR;
    }
    if (ncmds == 0) {
        error_report("io: no commands given (use -c CMD)");
        return CLI_EXIT_ERROR;
    }
    filename = argv[optind];

    s.bs = cli_open_image(filename, fmt, flags, &err);
    if (!s.bs) {
        error_report_err(err);
        return CLI_EXIT_ERROR;
    }
    len = bdrv_getlength(s.bs);
    if (len < 0) {
        error_report("Could not get the size of '%s': %s", filename,
                     strerror((int)-len));
        bdrv_close(s.bs, NULL);
        return CLI_EXIT_ERROR;
    }
    s.length = (uint64_t)len;

    for (int i = 0; i < ncmds; i++) {
        bool mismatch = false;

        if (!io_run(&s, cmds[i], &mismatch, &err)) {
            fflush(stdout);
            error_report_err(err);
            err = NULL;
            ret = CLI_EXIT_ERROR;
        } else if (mismatch) {
            ret = CLI_EXIT_ERROR;
        }
        fflush(stdout);
    }
    if (!cli_close_image(s.bs)) {
        ret = CLI_EXIT_ERROR;
    }
    return ret;
}
