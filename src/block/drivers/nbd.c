/*
 * The "nbd" protocol driver: a node whose content is an export on a remote
 * NBD server, reached through libnbd (the NBD client library).  This is what
 * lets a backup job write its target to a remote server, as QEMU's
 * blockdev-add driver=nbd does:
 *
 *   {"driver": "nbd", "node-name": "t0",
 *    "server": {"type": "unix", "path": "/run/x.sock"}
 *            | {"type": "inet", "host": "h", "port": "10809"},
 *    "export": "name"}
 *   or {"driver": "nbd", "filename": "nbd+unix:///name?socket=/run/x.sock"}
 *   (any NBD URI libnbd accepts: nbd://host:port/name, nbd+unix://...)
 *   plus, for TLS, "tls-creds": the id of a tls-creds-x509 or
 *   tls-creds-psk object with endpoint=client (crypto/tls-creds.h; the
 *   server must then do TLS), and "tls-hostname": the name the server's
 *   certificate must carry (default: the host connected to; a libnbd
 *   older than 1.22 cannot check another name, so it is refused there).
 *
 * Each node owns one libnbd handle, connected at open.  libnbd handles take
 * an internal lock, so any number of threads may issue synchronous commands
 * on the same handle; they are serialized on the connection.
 *
 * Invariants:
 *   1. s->size is the export size the server announced at open; requests
 *      never go past it (unlike "file", an NBD export cannot grow by being
 *      written past its end, so writes there fail with -EINVAL here instead
 *      of being sent).
 *   2. No command carries more than s->max_request bytes of payload, nor
 *      more than NBD_CMD_MAX_LEN bytes of effect, so every request is one
 *      the server advertised it accepts.
 *   3. Flags are only sent when the server advertised them (FUA, FAST_ZERO),
 *      so the server never sees a flag it did not negotiate.
 *   4. Open is bounded in time: connecting plus the handshake run on
 *      libnbd's asynchronous API with a deadline (NBD_OPEN_ATTEMPT_SECONDS,
 *      or the node's 'open-timeout'), because the open runs on the QMP main
 *      loop and a server that accepts but never greets must not hold it.
 *      Requests after open are not bounded.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>

#include <pthread.h>

#include <libnbd.h>

#include "block/block.h"
#include "block/drivers/nbd.h"
#include "crypto/tls-creds.h"
#include "util/cleanup.h"
#include "util/cutils.h"
#include "util/iov.h"

/* Largest payload per NBD_CMD_READ/WRITE when the server names no limit:
 * the NBD spec promises 32 MiB works with every server. */
#define NBD_DEFAULT_MAX_REQUEST (32u * 1024 * 1024)
/* Largest length of a zero/trim/block-status command: the wire field is 32
 * bits without extended headers; keep it a round, aligned value. */
#define NBD_CMD_MAX_LEN (1u << 30)
/* Largest minimum block size we honour as request alignment. */
#define NBD_MAX_ALIGNMENT (64u * 1024)
/* NBD_OPEN_ATTEMPT_SECONDS (nbd.h) bounds opening a node when
 * 'open-timeout' is 0 (one attempt): connecting plus the whole NBD
 * handshake.  A server that accepts but never greets, or trickles its
 * greeting, fails the open after this long instead of holding the monitor
 * (the open runs on the QMP main loop).  The same value as the NBD
 * server's default handshake-max-seconds. */
/* Largest 'open-timeout' accepted, in seconds: it bounds how long one
 * blockdev-add may keep the monitor waiting. */
#define NBD_OPEN_TIMEOUT_MAX 300
/* Pause between two attempts when 'open-timeout' retries. */
#define NBD_OPEN_RETRY_MS 1000

typedef struct BDRVNBDState {
    struct nbd_handle *nbd;
    TLSCreds *tls;           /* referenced while open (object-del refuses) */
    uint64_t size;           /* export size (invariant 1) */
    uint32_t max_request;    /* payload limit per command (invariant 2) */
    bool can_fua;
    bool can_zero;
    bool can_fast_zero;
    bool can_trim;
    bool can_flush;
    bool has_base_allocation;

    /* Block status read ahead (nbd_drv_block_status): what the server said
     * about [runs[0].off, end of the last run), as runs of zero or data,
     * merged; cleared by every write.  Protected by status_lock. */
    pthread_mutex_t status_lock;
    struct NBDStatusRun *runs;
    size_t n_runs, cap_runs;
} BDRVNBDState;

static void nbd_status_forget(BDRVNBDState *s);

static void nbd_handle_closep(struct nbd_handle **h)
{
    if (*h) {
        nbd_close(*h);
    }
}

/* -errno for the last libnbd failure in this thread. */
static int nbd_errno(void)
{
    int e = nbd_get_errno();
    return e > 0 ? -e : -EIO;
}

/* Sets *ret_value to the string member `key` of obj, or NULL when absent.
 * Returns false (errp set) when the member is not a string. */
static bool opt_string(struct json_object *obj, const char *key,
                       const char **ret_value, Error **errp)
{
    struct json_object *v;
    *ret_value = NULL;
    if (!json_object_object_get_ex(obj, key, &v) || !v) {
        return true;
    }
    if (!json_object_is_type(v, json_type_string)) {
        error_setg(errp, "Parameter '%s' expects a string", key);
        return false;
    }
    *ret_value = json_object_get_string(v);
    return true;
}

/* Where a node connects: the arguments of one libnbd nbd_aio_connect_* call
 * and a URI-like description of the server for messages and info. */
typedef enum { NBD_TARGET_UNIX, NBD_TARGET_TCP, NBD_TARGET_URI } NBDTargetKind;

typedef struct NBDTarget {
    NBDTargetKind kind;
    const char *addr;        /* unix: socket path; tcp: host; uri: the URI */
    const char *port;        /* tcp: points at portbuf or into the options */
    char portbuf[16];
    char *desc;              /* malloc'd description; NULL if out of memory */
    TLSCreds *tls;           /* referenced; NULL: no TLS asked for */
    const char *tls_hostname;
} NBDTarget;

static void nbd_target_cleanup(NBDTarget *t)
{
    free(t->desc);
    tls_creds_put(t->tls);
}

/* Fill t's TLS members from options' "tls-creds" and "tls-hostname". */
static bool nbd_parse_tls(struct json_object *options, NBDTarget *t,
                          Error **errp)
{
    const char *id;
    if (!opt_string(options, "tls-creds", &id, errp) ||
        !opt_string(options, "tls-hostname", &t->tls_hostname, errp)) {
        return false;
    }
    if (t->tls_hostname && !id) {
        error_setg(errp, "nbd: 'tls-hostname' needs 'tls-creds'");
        return false;
    }
#ifndef HAVE_NBD_SET_TLS_HOSTNAME
    /* This libnbd checks the certificate against the host connected to
     * (none for a UNIX socket, where only the CA's signature is checked):
     * a tls-hostname it cannot check is refused, never ignored. */
    if (t->tls_hostname &&
        (t->kind != NBD_TARGET_TCP || strcmp(t->tls_hostname, t->addr) != 0)) {
        error_setg(errp, "nbd: 'tls-hostname' other than the server's host "
                   "needs libnbd 1.22 or later (nbd_set_tls_hostname)");
        return false;
    }
#endif
    if (id && !(t->tls = tls_creds_get(id, false, errp))) {
        return false;
    }
    return true;
}

bool nbd_handle_set_tls(struct nbd_handle *h, const TLSCreds *creds,
                        const char *tls_hostname)
{
    if (!creds) {
        return true;
    }
    if (nbd_set_tls(h, LIBNBD_TLS_REQUIRE) < 0) {
        return false;
    }
#ifdef HAVE_NBD_SET_TLS_HOSTNAME
    if (tls_hostname && nbd_set_tls_hostname(h, tls_hostname) < 0) {
        return false;
    }
#endif
    if (tls_creds_kind(creds) == TLS_CREDS_PSK) {
        return nbd_set_tls_psk_file(h, tls_creds_psk_file(creds)) >= 0 &&
               nbd_set_tls_username(h, tls_creds_username(creds)) >= 0;
    }
    return nbd_set_tls_certificates(h, tls_creds_dir(creds)) >= 0 &&
           nbd_set_tls_verify_peer(h, tls_creds_verify_peer(creds)) >= 0;
}

/* Fill t from options' "server" (parsing only; nothing is connected). */
static bool nbd_parse_server(struct json_object *options, const char *export,
                             NBDTarget *t, Error **errp)
{
    struct json_object *server;
    if (!json_object_object_get_ex(options, "server", &server) || !server) {
        error_setg(errp, "Parameter 'server' is missing");
        return false;
    }
    if (!json_object_is_type(server, json_type_object)) {
        error_setg(errp, "Parameter 'server' expects an object");
        return false;
    }
    const char *type;
    if (!opt_string(server, "type", &type, errp)) {
        return false;
    }
    if (!type) {
        error_setg(errp, "Parameter 'server.type' is missing");
        return false;
    }
    if (strcmp(type, "unix") == 0) {
        if (!opt_string(server, "path", &t->addr, errp)) {
            return false;
        }
        if (!t->addr || !*t->addr) {
            error_setg(errp, "Parameter 'server.path' is missing");
            return false;
        }
        t->kind = NBD_TARGET_UNIX;
        if (asprintf(&t->desc, "nbd+unix:///%s?socket=%s", export, t->addr) < 0) {
            t->desc = NULL;
        }
        return true;
    }
    if (strcmp(type, "inet") == 0 || strcmp(type, "tcp") == 0) {
        struct json_object *v;
        t->port = "10809";
        if (!opt_string(server, "host", &t->addr, errp)) {
            return false;
        }
        if (!t->addr || !*t->addr) {
            error_setg(errp, "Parameter 'server.host' is missing");
            return false;
        }
        if (json_object_object_get_ex(server, "port", &v) && v) {
            if (json_object_is_type(v, json_type_int)) {
                int64_t p = json_object_get_int64(v);
                if (p < 1 || p > 65535) {
                    error_setg(errp, "Parameter 'server.port' must be 1..65535");
                    return false;
                }
                snprintf(t->portbuf, sizeof(t->portbuf), "%d", (int)p);
                t->port = t->portbuf;
            } else if (json_object_is_type(v, json_type_string)) {
                t->port = json_object_get_string(v);
            } else {
                error_setg(errp, "Parameter 'server.port' expects a string");
                return false;
            }
        }
        t->kind = NBD_TARGET_TCP;
        if (asprintf(&t->desc, "nbd://%s:%s/%s", t->addr, t->port, export) < 0) {
            t->desc = NULL;
        }
        return true;
    }
    error_setg(errp, "Unsupported NBD server type '%s' (use 'unix' or 'inet')",
               type);
    return false;
}

/* Fill t from options: either "filename" (an NBD URI) or "server". */
static bool nbd_parse_target(struct json_object *options, const char *export,
                             NBDTarget *t, Error **errp)
{
    const char *uri;
    if (!opt_string(options, "filename", &uri, errp)) {
        return false;
    }
    if (!uri) {
        return nbd_parse_server(options, export, t, errp);
    }
    if (json_object_object_get_ex(options, "server", NULL)) {
        error_setg(errp, "nbd: give either 'filename' (a URI) or 'server', "
                   "not both");
        return false;
    }
    t->kind = NBD_TARGET_URI;
    t->addr = uri;
    t->desc = strdup(uri);
    return true;
}

/* Sets *ret to the whole number of seconds in options' member key (a JSON
 * integer or a decimal string, as the command line gives it), 0 when
 * absent.  Values above max are refused. */
static bool opt_seconds(struct json_object *options, const char *key,
                        uint64_t max, uint64_t *ret, Error **errp)
{
    struct json_object *v;
    *ret = 0;
    if (!json_object_object_get_ex(options, key, &v) || !v) {
        return true;
    }
    bool ok = false;
    if (json_object_is_type(v, json_type_int)) {
        int64_t i = json_object_get_int64(v);
        ok = i >= 0 && (uint64_t)i <= max;
        *ret = ok ? (uint64_t)i : 0;
    } else if (json_object_is_type(v, json_type_string)) {
        const char *str = json_object_get_string(v);
        char *end;
        errno = 0;
        unsigned long long u = strtoull(str, &end, 10);
        ok = *str >= '0' && *str <= '9' && !*end && !errno && u <= max;
        *ret = ok ? (uint64_t)u : 0;
    }
    if (!ok) {
        error_setg(errp, "Parameter '%s' expects a number of seconds from 0 "
                   "to %" PRIu64, key, max);
    }
    return ok;
}

/* A new handle set up for export (and t's TLS), not yet connected. */
static struct nbd_handle *nbd_new_handle(const char *export,
                                         const NBDTarget *t, Error **errp)
{
    _cleanup_(nbd_handle_closep) struct nbd_handle *h = nbd_create();
    if (!h) {
        error_setg(errp, "Cannot create an NBD client handle: %s",
                   nbd_get_error());
        return NULL;
    }
    if (nbd_set_export_name(h, export) < 0 ||
        nbd_set_request_structured_replies(h, true) < 0 ||
        nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) < 0 ||
        !nbd_handle_set_tls(h, t->tls, t->tls_hostname)) {
        error_setg(errp, "Cannot set up the NBD client handle: %s",
                   nbd_get_error());
        return NULL;
    }
    return steal_pointer(&h);
}

/* One connection attempt: connect and run the NBD handshake with libnbd's
 * asynchronous API, polling the handle's socket never past deadline_ns.
 * Returns the handle, ready for commands, or NULL with errp set when the
 * connection fails or the deadline passes first (a server that accepts but
 * never greets, or trickles its greeting, cannot hold the caller longer). */
static struct nbd_handle *nbd_connect_once(const char *export,
                                           const NBDTarget *t,
                                           uint64_t deadline_ns,
                                           uint64_t limit_s, Error **errp)
{
    const char *where = t->desc ? t->desc : t->addr;
    _cleanup_(nbd_handle_closep) struct nbd_handle *h =
        nbd_new_handle(export, t, errp);
    if (!h) {
        return NULL;
    }
    int r;
    switch (t->kind) {
    case NBD_TARGET_UNIX:
        r = nbd_aio_connect_unix(h, t->addr);
        break;
    case NBD_TARGET_TCP:
        r = nbd_aio_connect_tcp(h, t->addr, t->port);
        break;
    default:
        r = nbd_supports_uri(h) ? nbd_aio_connect_uri(h, t->addr) : -1;
        break;
    }
    if (!nbd_handle_wait_connected(h, r, where, deadline_ns, limit_s, errp)) {
        return NULL;
    }
    return steal_pointer(&h);
}

bool nbd_handle_wait_connected(struct nbd_handle *h, int r, const char *where,
                               uint64_t deadline_ns, uint64_t limit_s,
                               Error **errp)
{
    while (r >= 0 && !nbd_aio_is_ready(h)) {
        if (nbd_aio_is_dead(h) || nbd_aio_is_closed(h)) {
            r = -1;
            break;
        }
        int ms = clock_ms_until(deadline_ns);
        if (ms == 0) {
            error_setg(errp, "Failed to connect to NBD server at '%s': no "
                       "complete NBD handshake within %" PRIu64 " second%s",
                       where, limit_s, limit_s == 1 ? "" : "s");
            return false;
        }
        r = nbd_poll(h, ms);
    }
    if (r < 0) {
        error_setg(errp, "Failed to connect to NBD server at '%s': %s", where,
                   nbd_get_error() ? nbd_get_error() : "connection closed");
        return false;
    }
    return true;
}

/* Connect to t, bounded in time (see NBD_OPEN_ATTEMPT_SECONDS).  With
 * open_timeout 0 there is one attempt; otherwise failed attempts are
 * retried every NBD_OPEN_RETRY_MS until open_timeout seconds have passed,
 * and the last failure is reported. */
static struct nbd_handle *nbd_connect(const char *export, const NBDTarget *t,
                                      uint64_t open_timeout, Error **errp)
{
    uint64_t limit_s = open_timeout ? open_timeout : NBD_OPEN_ATTEMPT_SECONDS;
    uint64_t end = clock_monotonic_ns() + limit_s * UINT64_C(1000000000);
    for (;;) {
        Error *err = NULL;
        struct nbd_handle *h = nbd_connect_once(export, t, end, limit_s, &err);
        if (h) {
            return h;
        }
        int ms = clock_ms_until(end);
        if (open_timeout == 0 || ms == 0) {
            error_propagate(errp, err);
            return NULL;
        }
        error_free(err);
        ms = MIN(ms, NBD_OPEN_RETRY_MS);
        struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
        }
    }
}

/* A libnbd can_* answer as a bool (errors count as "cannot"). */
static bool nbd_flag(int r)
{
    return r > 0;
}

static bool nbd_drv_open(BlockDriverState *bs, struct json_object *options,
                         int flags, Error **errp)
{
    BDRVNBDState *s = bs->opaque;
    const char *export;
    if (!opt_string(options, "export", &export, errp)) {
        return false;
    }
    if (!export) {
        export = "";
    }

    uint64_t open_timeout, reconnect_delay;
    if (!opt_seconds(options, "open-timeout", NBD_OPEN_TIMEOUT_MAX,
                     &open_timeout, errp) ||
        !opt_seconds(options, "reconnect-delay", UINT32_MAX, &reconnect_delay,
                     errp)) {
        return false;
    }
    if (reconnect_delay) {
        error_setg(errp, "nbd: 'reconnect-delay' is not supported (this "
                   "driver does not reconnect); use 0");
        return false;
    }
    _cleanup_(nbd_target_cleanup) NBDTarget target = { 0 };
    if (!nbd_parse_target(options, export, &target, errp) ||
        !nbd_parse_tls(options, &target, errp)) {
        return false;
    }
    _cleanup_(nbd_handle_closep) struct nbd_handle *h =
        nbd_connect(export, &target, open_timeout, errp);
    if (!h) {
        return false;
    }
    _cleanup_free_ char *desc = steal_pointer(&target.desc);
    const char *where = desc ? desc : export;

    int64_t size = nbd_get_size(h);
    if (size < 0) {
        error_setg(errp, "Cannot get the size of NBD export '%s': %s",
                   where, nbd_get_error());
        return false;
    }
    if ((uint64_t)size > BDRV_MAX_LENGTH) {
        error_setg(errp, "NBD export '%s' is too large (%" PRId64 " bytes)",
                   where, size);
        return false;
    }
    int ro = nbd_is_read_only(h);
    if (ro < 0) {
        error_setg(errp, "Cannot query NBD export '%s': %s", where,
                   nbd_get_error());
        return false;
    }
    if (ro && (flags & BDRV_O_RDWR)) {
        error_setg(errp, "NBD export '%s' is read-only; open the node with "
                   "read-only=true", where);
        return false;
    }

    s->size = (uint64_t)size;
    s->can_fua = nbd_flag(nbd_can_fua(h));
    s->can_zero = nbd_flag(nbd_can_zero(h));
    s->can_fast_zero = s->can_zero && nbd_flag(nbd_can_fast_zero(h));
    s->can_trim = nbd_flag(nbd_can_trim(h));
    s->can_flush = nbd_flag(nbd_can_flush(h));
    pthread_mutex_init(&s->status_lock, NULL);
    s->has_base_allocation =
        nbd_flag(nbd_can_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION));

    s->max_request = NBD_DEFAULT_MAX_REQUEST;
    int64_t max = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
    if (max > 0) {
        s->max_request = (uint32_t)MIN((uint64_t)max, (uint64_t)BDRV_MAX_REQUEST);
    }
    int64_t min = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM);
    if (min > 1 && min <= NBD_MAX_ALIGNMENT && !(min & (min - 1))) {
        bs->request_alignment = (uint32_t)min;
        /* Keep chunks a multiple of the alignment. */
        s->max_request = ROUND_DOWN(s->max_request, (uint32_t)min);
    }
    if (s->max_request == 0) {
        s->max_request = NBD_DEFAULT_MAX_REQUEST;
    }

    if (!bs->filename && desc) {
        bs->filename = steal_pointer(&desc);
    }
    s->nbd = steal_pointer(&h);
    s->tls = steal_pointer(&target.tls);
    return true;
}

static void nbd_drv_close(BlockDriverState *bs)
{
    BDRVNBDState *s = bs->opaque;
    if (s->nbd) {
        nbd_shutdown(s->nbd, 0);
        nbd_close(s->nbd);
        s->nbd = NULL;
    }
    tls_creds_put(s->tls);
    s->tls = NULL;
    free(s->runs);
    s->runs = NULL;
    s->n_runs = s->cap_runs = 0;
}

static int64_t nbd_drv_getlength(BlockDriverState *bs)
{
    BDRVNBDState *s = bs->opaque;
    return (int64_t)s->size;
}

static bool nbd_in_range(BDRVNBDState *s, uint64_t offset, uint64_t bytes)
{
    return offset <= s->size && bytes <= s->size - offset;
}

/* Read [offset, +bytes) into the flat buffer buf, in chunks. */
static int nbd_read_flat(BDRVNBDState *s, uint64_t offset, uint64_t bytes,
                         uint8_t *buf)
{
    while (bytes > 0) {
        size_t n = (size_t)MIN(bytes, (uint64_t)s->max_request);
        if (nbd_pread(s->nbd, buf, n, offset, 0) < 0) {
            return nbd_errno();
        }
        buf += n;
        offset += n;
        bytes -= n;
    }
    return 0;
}

static int nbd_write_flat(BDRVNBDState *s, uint64_t offset, uint64_t bytes,
                          const uint8_t *buf, uint32_t nbd_flags)
{
    while (bytes > 0) {
        size_t n = (size_t)MIN(bytes, (uint64_t)s->max_request);
        if (nbd_pwrite(s->nbd, buf, n, offset, nbd_flags) < 0) {
            return nbd_errno();
        }
        buf += n;
        offset += n;
        bytes -= n;
    }
    return 0;
}

static int nbd_drv_preadv(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                          const struct iovec *iov, int niov, int flags)
{
    BDRVNBDState *s = bs->opaque;
    if (!nbd_in_range(s, offset, bytes) || iov_size(iov, niov) < bytes) {
        return -EINVAL;
    }
    if (niov == 1) {
        return nbd_read_flat(s, offset, bytes, iov[0].iov_base);
    }
    _cleanup_free_ uint8_t *buf = malloc(bytes ? bytes : 1);
    if (!buf) {
        return -ENOMEM;
    }
    int r = nbd_read_flat(s, offset, bytes, buf);
    if (r < 0) {
        return r;
    }
    iov_from_buf(iov, niov, 0, buf, bytes);
    return 0;
}

static int nbd_drv_pwritev(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                           const struct iovec *iov, int niov, int flags)
{
    BDRVNBDState *s = bs->opaque;
    nbd_status_forget(s);           /* the status read ahead is stale */
    /* Invariant 1: the export cannot grow. */
    if (!nbd_in_range(s, offset, bytes) || iov_size(iov, niov) < bytes) {
        return -EINVAL;
    }
    uint32_t nbd_flags = 0;
    if ((flags & BDRV_REQ_FUA) && s->can_fua) {
        nbd_flags |= LIBNBD_CMD_FLAG_FUA;
    }
    int r;
    if (niov == 1) {
        r = nbd_write_flat(s, offset, bytes, iov[0].iov_base, nbd_flags);
    } else {
        _cleanup_free_ uint8_t *buf = malloc(bytes ? bytes : 1);
        if (!buf) {
            return -ENOMEM;
        }
        iov_to_buf(iov, niov, 0, buf, bytes);
        r = nbd_write_flat(s, offset, bytes, buf, nbd_flags);
    }
    if (r == 0 && (flags & BDRV_REQ_FUA) && !s->can_fua && s->can_flush) {
        /* No FUA on the wire: a flush gives the same guarantee. */
        if (nbd_flush(s->nbd, 0) < 0) {
            return nbd_errno();
        }
    }
    return r;
}

static int nbd_drv_pwrite_zeroes(BlockDriverState *bs, uint64_t offset,
                                 uint64_t bytes, int flags)
{
    BDRVNBDState *s = bs->opaque;
    nbd_status_forget(s);           /* the status read ahead is stale */
    if (!nbd_in_range(s, offset, bytes)) {
        return -EINVAL;
    }
    if (!s->can_zero) {
        return -ENOTSUP;
    }
    uint32_t nbd_flags = 0;
    if (!(flags & BDRV_REQ_MAY_UNMAP)) {
        nbd_flags |= LIBNBD_CMD_FLAG_NO_HOLE;
    }
    if (flags & BDRV_REQ_NO_FALLBACK) {
        if (!s->can_fast_zero) {
            return -ENOTSUP;
        }
        nbd_flags |= LIBNBD_CMD_FLAG_FAST_ZERO;
    }
    if ((flags & BDRV_REQ_FUA) && s->can_fua) {
        nbd_flags |= LIBNBD_CMD_FLAG_FUA;
    }
    while (bytes > 0) {
        uint64_t n = MIN(bytes, (uint64_t)NBD_CMD_MAX_LEN);
        if (nbd_zero(s->nbd, n, offset, nbd_flags) < 0) {
            return nbd_errno();
        }
        offset += n;
        bytes -= n;
    }
    if ((flags & BDRV_REQ_FUA) && !s->can_fua && s->can_flush &&
        nbd_flush(s->nbd, 0) < 0) {
        return nbd_errno();
    }
    return 0;
}

static int nbd_drv_pdiscard(BlockDriverState *bs, uint64_t offset,
                            uint64_t bytes)
{
    BDRVNBDState *s = bs->opaque;
    nbd_status_forget(s);           /* the status read ahead is stale */
    if (!nbd_in_range(s, offset, bytes)) {
        return -EINVAL;
    }
    if (!s->can_trim) {
        return 0;   /* discard is a hint */
    }
    while (bytes > 0) {
        uint64_t n = MIN(bytes, (uint64_t)NBD_CMD_MAX_LEN);
        if (nbd_trim(s->nbd, n, offset, 0) < 0) {
            return nbd_errno();
        }
        offset += n;
        bytes -= n;
    }
    return 0;
}

static int nbd_drv_flush(BlockDriverState *bs)
{
    BDRVNBDState *s = bs->opaque;
    if (!s->can_flush) {
        return 0;
    }
    return nbd_flush(s->nbd, 0) < 0 ? nbd_errno() : 0;
}

/* The biggest block status request: the protocol's 32-bit length, kept
 * 64 KiB aligned.  (Reads stay at NBD_CMD_MAX_LEN.) */
#define NBD_STATUS_MAX_LEN 0xffff0000u
/* Requests in flight when block status reads ahead: a walk over a huge
 * sparse export costs round trips, not server time (a 64 TiB qcow2 served
 * by qemu-storage-daemon is 16384 requests of 4 GiB). */
#define NBD_STATUS_AHEAD 64

typedef struct NBDStatusRun {
    uint64_t off, len;
    bool zero;
} NBDStatusRun;

/* One request of a read ahead: its range, and the runs its reply gave. */
typedef struct NBDStatusWindow {
    uint64_t off, len;
    NBDStatusRun *runs;
    size_t n, cap;
    uint64_t covered;          /* bytes from off the reply described */
    bool failed;
} NBDStatusWindow;

static void status_push(NBDStatusRun **runs, size_t *n, size_t *cap,
                        uint64_t off, uint64_t len, bool zero)
{
    if (*n && (*runs)[*n - 1].zero == zero &&
        (*runs)[*n - 1].off + (*runs)[*n - 1].len == off) {
        (*runs)[*n - 1].len += len;
        return;
    }
    if (*n == *cap) {
        size_t c = *cap ? *cap * 2 : 16;
        NBDStatusRun *r = realloc(*runs, c * sizeof(*r));
        if (!r) {
            abort();
        }
        *runs = r;
        *cap = c;
    }
    (*runs)[(*n)++] = (NBDStatusRun){ off, len, zero };
}

/* base:allocation extents of one window.  Only the ZERO bit promises that
 * reads return zeroes; a hole without it may read as anything, so it
 * counts as data. */
static int nbd_status_cb(void *opaque, const char *metacontext,
                         uint64_t offset, uint32_t *entries, size_t nr_entries,
                         int *error)
{
    NBDStatusWindow *w = opaque;

    if (strcmp(metacontext, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0 ||
        offset != w->off || w->covered) {
        return 0;
    }
    for (size_t i = 0; i + 1 < nr_entries && entries[i] != 0; i += 2) {
        uint64_t len = MIN((uint64_t)entries[i], w->len - w->covered);
        if (!len) {
            break;
        }
        status_push(&w->runs, &w->n, &w->cap, w->off + w->covered, len,
                    entries[i + 1] & LIBNBD_STATE_ZERO);
        w->covered += len;
    }
    return 0;
}

/* Ask the server about up to NBD_STATUS_AHEAD windows from offset at
 * once and keep what comes back, contiguous from offset, as the cache.
 * 0 or -errno.  Caller holds status_lock. */
static int nbd_status_fill_locked(BDRVNBDState *s, uint64_t offset)
{
    NBDStatusWindow w[NBD_STATUS_AHEAD] = { 0 };
    int64_t cookie[NBD_STATUS_AHEAD];
    size_t n = 0, pending = 0;
    int ret = 0;

    for (uint64_t off = offset; n < NBD_STATUS_AHEAD && off < s->size; n++) {
        w[n].off = off;
        w[n].len = MIN(s->size - off, (uint64_t)NBD_STATUS_MAX_LEN);
        off += w[n].len;
    }
    for (size_t i = 0; i < n; i++) {
        nbd_extent_callback cb = { .callback = nbd_status_cb,
                                   .user_data = &w[i] };
        cookie[i] = nbd_aio_block_status(s->nbd, w[i].len, w[i].off, cb,
                                         NBD_NULL_COMPLETION, 0);
        if (cookie[i] < 0) {
            ret = nbd_errno();
            n = i;              /* wait for the ones already sent */
            break;
        }
        pending++;
    }
    while (pending) {
        for (size_t i = 0; i < n; i++) {
            if (cookie[i] <= 0) {
                continue;
            }
            int r = nbd_aio_command_completed(s->nbd, (uint64_t)cookie[i]);
            if (r == 0) {
                continue;
            }
            if (r < 0) {
                w[i].failed = true;
                if (!ret) {
                    ret = nbd_errno();
                }
            }
            cookie[i] = 0;
            pending--;
        }
        if (pending && nbd_poll(s->nbd, -1) < 0) {
            if (!ret) {
                ret = nbd_errno();
            }
            break;
        }
    }
    /* The cache: the windows in order, up to the first gap. */
    s->n_runs = 0;
    for (size_t i = 0; i < n && !w[i].failed; i++) {
        for (size_t k = 0; k < w[i].n; k++) {
            status_push(&s->runs, &s->n_runs, &s->cap_runs, w[i].runs[k].off,
                        w[i].runs[k].len, w[i].runs[k].zero);
        }
        if (w[i].covered < w[i].len) {
            break;
        }
    }
    for (size_t i = 0; i < NBD_STATUS_AHEAD; i++) {
        free(w[i].runs);
    }
    if (pending) {
        return ret ? ret : -EIO;  /* the connection is gone */
    }
    return s->n_runs ? 0 : (ret ? ret : -EIO);
}

static void nbd_status_forget(BDRVNBDState *s)
{
    pthread_mutex_lock(&s->status_lock);
    s->n_runs = 0;
    pthread_mutex_unlock(&s->status_lock);
}

static int nbd_drv_block_status(BlockDriverState *bs, uint64_t offset,
                                uint64_t bytes, uint64_t *pnum)
{
    BDRVNBDState *s = bs->opaque;
    if (!s->has_base_allocation) {
        *pnum = bytes;
        return BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED;
    }
    if (!nbd_in_range(s, offset, bytes) || bytes == 0) {
        return -EINVAL;
    }
    pthread_mutex_lock(&s->status_lock);
    size_t i = 0;
    if (!s->n_runs || offset < s->runs[0].off ||
        offset >= s->runs[s->n_runs - 1].off + s->runs[s->n_runs - 1].len) {
        int r = nbd_status_fill_locked(s, offset);
        if (r < 0) {
            pthread_mutex_unlock(&s->status_lock);
            return r;
        }
    }
    /* The run holding offset (runs are sorted and contiguous). */
    size_t lo = 0, hi = s->n_runs;
    while (hi - lo > 1) {
        size_t mid = (lo + hi) / 2;
        if (s->runs[mid].off <= offset) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    i = lo;
    bool zero = s->runs[i].zero;
    *pnum = MIN(s->runs[i].off + s->runs[i].len - offset, bytes);
    pthread_mutex_unlock(&s->status_lock);
    return zero ? BDRV_BLOCK_ZERO | BDRV_BLOCK_ALLOCATED
                : BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED;
}

static void nbd_drv_info(BlockDriverState *bs, struct json_object *data)
{
    BDRVNBDState *s = bs->opaque;
    json_object_object_add(data, "can-fua", json_object_new_boolean(s->can_fua));
    json_object_object_add(data, "can-zero", json_object_new_boolean(s->can_zero));
    json_object_object_add(data, "can-trim", json_object_new_boolean(s->can_trim));
    json_object_object_add(data, "base-allocation",
                           json_object_new_boolean(s->has_base_allocation));
}

/* blockdev-add's members of an nbd node (block.h: open_opts): the server's
 * address (nbd_parse_server; "tcp" is taken as "inet") or an NBD URI. */
static const char *const nbd_server_types[] = { "inet", "unix", "tcp", NULL };
static const JsonOptSpec nbd_server_opts[] = {
    { "type", JSON_OPT_STR, false, NULL, nbd_server_types },
    { "path", JSON_OPT_STR, true },
    { "host", JSON_OPT_STR, true },
    { "port", JSON_OPT_ANY, true },      /* a string or an integer */
    { NULL },
};
static const JsonOptSpec nbd_open_opts[] = {
    { "server", JSON_OPT_OBJECT, true, nbd_server_opts },
    { "filename", JSON_OPT_STR, true },
    { "export", JSON_OPT_STR, true },
    { "tls-creds", JSON_OPT_STR, true },
    { "tls-hostname", JSON_OPT_STR, true },
    { "open-timeout", JSON_OPT_UINT, true },
    { "reconnect-delay", JSON_OPT_UINT, true },
    { NULL },
};

const BlockDriver bdrv_nbd = {
    .format_name = "nbd",
    .instance_size = sizeof(BDRVNBDState),
    .is_protocol = true,
    .open = nbd_drv_open,
    .open_opts = nbd_open_opts,
    .close = nbd_drv_close,
    .getlength = nbd_drv_getlength,
    .preadv = nbd_drv_preadv,
    .pwritev = nbd_drv_pwritev,
    .pwrite_zeroes = nbd_drv_pwrite_zeroes,
    .pdiscard = nbd_drv_pdiscard,
    .flush = nbd_drv_flush,
    .block_status = nbd_drv_block_status,
    .info = nbd_drv_info,
};
