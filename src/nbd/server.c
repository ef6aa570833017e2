/*
 * The NBD server (NetworkBlockDevice/nbd doc/proto.md): one listening socket,
 * named exports of block nodes, fixed newstyle negotiation, simple and
 * structured replies, and the base:allocation and qemu:dirty-bitmap:NAME
 * metadata contexts (the latter with qemu-nbd -B semantics: flag 1 = dirty).
 *
 * Threads.  An accept thread hands every connection to a thread of its own,
 * which negotiates and then becomes worker 0 of that connection.  Workers
 * follow the leader/follower pattern: a worker takes the connection's
 * recv_lock, reads ONE request (header and, for writes, payload), drops the
 * lock, runs the request against the node and sends the reply under the
 * connection's send_lock.  When a worker takes a request and no other worker
 * is idle, it starts another one (up to 4 per CPU, 8..32), so several
 * requests of one client run in parallel without a hand-off queue and
 * without any lock shared between connections on the data path.  Each
 * worker owns a reusable buffer; no request allocates memory of its own
 * except block status replies.
 *
 * Small reads (up to NBD_INLINE_READ_MAX) are first tried with
 * BDRV_REQ_NOWAIT: when the data is in the page cache, the worker that read
 * the request answers it on the spot and goes on reading, with no hand-off
 * to another thread.  A hand-off (a futex wake and a context switch) costs
 * more than a cached 4 KiB read, and on a small machine the extra wake-ups
 * steal CPU from the client.  A read that would wait for the disk goes the
 * normal way, so a cold read never stalls the connection's other requests.
 *
 * Invariants:
 *  1. Only the worker holding recv_lock reads the socket; all writes to the
 *     socket happen under send_lock, one whole reply (all chunks) at a time.
 *  2. A reply is sent only after the node call returned, so an answered
 *     write is in the node (and in its dirty bitmaps, block.c invariant).
 *  3. A connection ends (closing = true) on EOF, NBD_CMD_DISC, a protocol
 *     violation (bad magic, oversized write payload), a failed send, or a
 *     shutdown(SHUT_RD) from nbd_export_del/nbd_server_stop.  Requests
 *     already read still run and are answered before the socket closes.
 *  4. A connection counts in its export's nclients from NBD_OPT_GO (or
 *     EXPORT_NAME) until its socket is closed; an export is freed only
 *     when nclients is 0, so the data path never sees a freed export.
 *  5. Payload and option sizes are checked against NBD_MAX_PAYLOAD and
 *     NBD_MAX_OPT_PAYLOAD before anything is allocated; the bytes of
 *     requests in flight on one connection stay under
 *     NBD_MAX_INFLIGHT_BYTES (one oversized request may run alone).
 *  6. A request answered inline (under recv_lock) never waits for the disk
 *     (BDRV_REQ_NOWAIT) or for another request; recv_lock is taken before
 *     send_lock, never the other way round.
 *
 * Only this file maps errno values to NBD error codes.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "nbd/server.h"
#include "nbd/nbd-proto.h"
#include "util/cleanup.h"
#include "util/cutils.h"

#define NBD_MAX_PAYLOAD        (32u * 1024 * 1024)  /* read/write data */
#define NBD_MAX_OPT_PAYLOAD    (64u * 1024)         /* option data */
#define NBD_MAX_WORKERS        32                   /* per connection, at most */
#define NBD_MAX_INFLIGHT_BYTES (UINT64_C(256) * 1024 * 1024)
#define NBD_KEEP_BUF           (4u * 1024 * 1024)   /* larger buffers are freed after use */
#define NBD_MAX_READ_SEGMENTS  64                   /* data/hole chunks per read reply */
#define NBD_MAX_EXTENTS        16384                /* descriptors per context and reply */
#define NBD_SEND_TIMEOUT_SEC   60                   /* a peer that stops reading is dropped */
#define NBD_BUF_ALIGN          4096
#define NBD_SOCKET_SNDBUF      (4 * 1024 * 1024)
#define NBD_RECV_BUF           (64 * 1024)          /* buffered request headers */
#define NBD_SPARSE_READ_MIN    (64 * 1024)          /* smaller reads skip hole detection */
#define NBD_INLINE_READ_MAX    (32 * 1024)          /* cached reads the reader answers itself */
#define NBD_POLL_MAX_NS        32000                /* busy-poll at most this long */
#define NBD_POLL_START_NS      4000                 /* first busy-poll time once it pays */
_Static_assert(NBD_INLINE_READ_MAX < NBD_SPARSE_READ_MIN,
               "an inline read must not look for holes");

#define META_BASE_ALLOCATION   "base:allocation"
#define META_DIRTY_PREFIX      "qemu:dirty-bitmap:"

struct NBDExport {
    char *id;
    char *name;
    char *description;            /* may be NULL */
    BlockDriverState *bs;         /* referenced */
    bool writable;
    int nbitmaps;
    BdrvDirtyBitmap **bitmaps;    /* marked busy while exported */
    char **ctx_names;             /* "qemu:dirty-bitmap:NAME" */
    unsigned nclients;            /* connections using it (srv.lock) */
    bool removing;                /* hidden from new connections */
    uint64_t serial;              /* unique per export ever added */
    NBDExport *next;
};

typedef struct NBDClient NBDClient;

typedef struct NBDWorker {
    NBDClient *c;
    pthread_t thread;
    uint8_t *buf;                 /* NBD_BUF_ALIGN aligned */
    size_t cap;
} NBDWorker;

typedef struct NBDRequest {
    uint16_t flags;
    uint16_t type;
    uint64_t handle;
    uint64_t offset;
    uint32_t len;
    uint64_t budget;              /* bytes counted in inflight_bytes */
    int early_err;                /* errno found while receiving, or 0 */
} NBDRequest;

struct NBDClient {
    int fd;
    bool inet;
    NBDClient *next;              /* srv.clients */

    /* Negotiated state (fixed once transmission starts). */
    NBDExport *exp;               /* pinned (nclients) from GO on */
    uint64_t size;
    uint16_t tflags;
    bool structured;
    bool no_zeroes;
    NBDExport *meta_exp;          /* export named by SET_META_CONTEXT */
    uint64_t meta_serial;
    uint32_t next_ctx_id;
    uint32_t base_id;             /* 0: base:allocation not selected */
    uint32_t *bitmap_ids;         /* per exported bitmap, 0: not selected */
    int nctx;                     /* selected contexts */

    pthread_mutex_t recv_lock;    /* invariant 1; guards rbuf too */
    uint8_t *rbuf;                /* bytes received, not yet consumed */
    size_t rpos, rlen;
    uint64_t poll_ns;             /* busy-poll time before blocking (recv_lock) */
    pthread_mutex_t send_lock;
    bool send_failed;             /* send_lock */

    pthread_mutex_t lock;         /* the fields below */
    pthread_cond_t cond;
    bool closing;
    int nworkers;
    int busy;                     /* workers holding a request */
    uint64_t inflight_bytes;
    NBDWorker workers[NBD_MAX_WORKERS];
};

static struct {
    pthread_mutex_t lock;         /* everything here */
    pthread_cond_t cond;          /* nclients / exp->nclients changes */
    bool running;
    int listen_fd;
    int wake_pipe[2];
    pthread_t accept_thread;
    char *unix_path;              /* to unlink on stop */
    bool inet;
    unsigned max_connections;
    unsigned nclients;
    NBDClient *clients;
    NBDExport *exports;
    uint64_t next_serial;
    int max_workers;              /* per connection, set at start */
} srv = {
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .cond = PTHREAD_COND_INITIALIZER,
    .listen_fd = -1,
    .wake_pipe = { -1, -1 },
};

/* ------------------------------------------------------------------ */
/* Socket I/O                                                           */

/* Read exactly len bytes: 0, or -1 on EOF / error. */
static int recv_full(int fd, void *buf, size_t len)
{
    uint8_t *p = buf;
    while (len > 0) {
        ssize_t n = recv(fd, p, len, 0);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* One recv() into the empty c->rbuf (recv_lock held), with adaptive busy
 * polling, the scheme of QEMU's iothread poll-max-ns: when the client's
 * requests arrive at short intervals, poll the socket for up to c->poll_ns
 * before sleeping in recv().  A sleeping server thread must be woken by
 * the client's send(), and that wake-up is paid on the client's CPU.  The
 * poll time doubles (from NBD_POLL_START_NS to NBD_POLL_MAX_NS) while the
 * sleeps it failed to avoid were short, and drops to 0 after a longer one,
 * so an idle or slow client costs no polling. */
static ssize_t client_fill(NBDClient *c)
{
    if (c->poll_ns > 0) {
        uint64_t start = clock_monotonic_ns();
        do {
            ssize_t n = recv(c->fd, c->rbuf, NBD_RECV_BUF, MSG_DONTWAIT);
            if (n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
                return n;
            }
        } while (clock_monotonic_ns() - start < c->poll_ns);
    }
    uint64_t start = clock_monotonic_ns();
    ssize_t n = recv(c->fd, c->rbuf, NBD_RECV_BUF, 0);
    uint64_t slept = clock_monotonic_ns() - start;
    if (slept > NBD_POLL_MAX_NS) {
        c->poll_ns = 0;
    } else if (slept > c->poll_ns) {
        c->poll_ns = c->poll_ns ? MIN(2 * c->poll_ns, (uint64_t)NBD_POLL_MAX_NS)
                                : NBD_POLL_START_NS;
    }
    return n;
}

/* Transmission-phase reads (recv_lock held): serve from the connection's
 * buffer first, so that one recv() picks up many pipelined request headers;
 * large payloads go straight to their destination. */
static int client_recv(NBDClient *c, void *dst, size_t len)
{
    uint8_t *p = dst;
    while (len > 0) {
        if (c->rpos < c->rlen) {
            size_t n = MIN(len, c->rlen - c->rpos);
            memcpy(p, c->rbuf + c->rpos, n);
            c->rpos += n;
            p += n;
            len -= n;
            continue;
        }
        if (len >= NBD_RECV_BUF / 2) {
            return recv_full(c->fd, p, len);
        }
        ssize_t n = client_fill(c);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return -1;
        }
        c->rpos = 0;
        c->rlen = (size_t)n;
    }
    return 0;
}

static int client_recv_discard(NBDClient *c, uint64_t len)
{
    uint8_t tmp[16384];
    while (len > 0) {
        size_t n = MIN(len, sizeof(tmp));
        if (client_recv(c, tmp, n) < 0) {
            return -1;
        }
        len -= n;
    }
    return 0;
}

/* Send every byte of iov (which is consumed).  0, or -1 on error. */
static int send_iov(int fd, struct iovec *iov, int niov)
{
    while (niov > 0) {
        struct msghdr msg = {
            .msg_iov = iov,
            .msg_iovlen = (size_t)MIN(niov, IOV_MAX),
        };
        ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return -1;
        }
        size_t left = (size_t)n;
        while (niov > 0 && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++;
            niov--;
        }
        if (niov > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + left;
            iov->iov_len -= left;
        }
    }
    return 0;
}

static int send_buf(int fd, const void *buf, size_t len)
{
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    return send_iov(fd, &iov, 1);
}

/* ------------------------------------------------------------------ */
/* Exports                                                              */

static NBDExport *export_find_locked(const char *name)
{
    for (NBDExport *e = srv.exports; e; e = e->next) {
        if (!e->removing && strcmp(e->name, name) == 0) {
            return e;
        }
    }
    if (name[0] == '\0') {
        /* The default export: the first one added. */
        for (NBDExport *e = srv.exports; e; e = e->next) {
            if (!e->removing) {
                return e;
            }
        }
    }
    return NULL;
}

/* Find an export by name and count a user of it (invariant 4). */
static NBDExport *export_pin(const char *name)
{
    LOCK_GUARD(&srv.lock);
    NBDExport *e = export_find_locked(name);
    if (e) {
        e->nclients++;
    }
    return e;
}

static void export_unpin(NBDExport *e)
{
    if (!e) {
        return;
    }
    LOCK_GUARD(&srv.lock);
    e->nclients--;
    pthread_cond_broadcast(&srv.cond);
}

static void export_free(NBDExport *e)
{
    if (!e) {
        return;
    }
    for (int i = 0; i < e->nbitmaps; i++) {
        if (e->bitmaps[i]) {
            bdrv_dirty_bitmap_set_busy(e->bitmaps[i], false);
        }
        free(e->ctx_names[i]);
    }
    free(e->bitmaps);
    free(e->ctx_names);
    if (e->bs) {
        bdrv_unref(e->bs);
    }
    free(e->id);
    free(e->name);
    free(e->description);
    free(e);
}

static uint16_t export_tflags(const NBDExport *e, bool structured)
{
    uint16_t f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA |
                 NBD_FLAG_CAN_MULTI_CONN;
    if (e->writable) {
        f |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES |
             NBD_FLAG_SEND_FAST_ZERO;
    } else {
        f |= NBD_FLAG_READ_ONLY;
    }
    if (structured) {
        f |= NBD_FLAG_SEND_DF;
    }
    return f;
}

/* A bitmap named `name` on bs or down its backing chain. */
static BdrvDirtyBitmap *find_bitmap_in_chain(BlockDriverState *bs,
                                             const char *name)
{
    for (BlockDriverState *cur = bs; cur; cur = cur->backing) {
        BdrvDirtyBitmap *bm = bdrv_find_dirty_bitmap(cur, name);
        if (bm) {
            return bm;
        }
    }
    return NULL;
}

NBDExport *nbd_export_add(const char *id, BlockDriverState *bs,
                          const char *name, const char *description,
                          bool writable, const char *const *bitmaps,
                          int nbitmaps, Error **errp)
{
    if (!id || !*id) {
        error_setg(errp, "export id must not be empty");
        return NULL;
    }
    if (!name) {
        name = bs->node_name;
    }
    if (!name || strlen(name) > NBD_MAX_STRING) {
        error_setg(errp, "export name must be at most %d bytes", NBD_MAX_STRING);
        return NULL;
    }
    if (description && strlen(description) > NBD_MAX_STRING) {
        error_setg(errp, "export description must be at most %d bytes",
                   NBD_MAX_STRING);
        return NULL;
    }
    if (nbitmaps < 0 || (nbitmaps > 0 && !bitmaps)) {
        error_setg(errp, "bad bitmap list");
        return NULL;
    }
    if (writable && bs->read_only) {
        error_setg(errp, "node '%s' is read-only: cannot export it writable",
                   bs->node_name ? bs->node_name : "?");
        return NULL;
    }
    {
        LOCK_GUARD(&srv.lock);
        for (NBDExport *e = srv.exports; e; e = e->next) {
            if (strcmp(e->id, id) == 0) {
                error_setg(errp, "export id '%s' is already in use", id);
                return NULL;
            }
            if (!e->removing && strcmp(e->name, name) == 0) {
                error_setg(errp, "NBD export '%s' already exists", name);
                return NULL;
            }
        }
    }

    NBDExport *e = calloc(1, sizeof(*e));
    if (!e) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    e->id = strdup(id);
    e->name = strdup(name);
    e->description = description ? strdup(description) : NULL;
    e->writable = writable;
    e->bitmaps = calloc((size_t)nbitmaps + 1, sizeof(*e->bitmaps));
    e->ctx_names = calloc((size_t)nbitmaps + 1, sizeof(*e->ctx_names));
    if (!e->id || !e->name || (description && !e->description) ||
        !e->bitmaps || !e->ctx_names) {
        export_free(e);
        error_setg(errp, "out of memory");
        return NULL;
    }
    for (int i = 0; i < nbitmaps; i++) {
        const char *bname = bitmaps[i];
        if (!bname) {
            export_free(e);
            error_setg(errp, "bad bitmap list");
            return NULL;
        }
        for (int j = 0; j < i; j++) {
            if (strcmp(bitmaps[j], bname) == 0) {
                export_free(e);
                error_setg(errp, "bitmap '%s' is listed twice", bname);
                return NULL;
            }
        }
        BdrvDirtyBitmap *bm = find_bitmap_in_chain(bs, bname);
        if (!bm) {
            export_free(e);
            error_setg(errp, "Bitmap '%s' is not found", bname);
            return NULL;
        }
        if (!bdrv_dirty_bitmap_check(bm, BDRV_BITMAP_DEFAULT | BDRV_BITMAP_ALLOW_RO,
                                     errp)) {
            export_free(e);
            return NULL;
        }
        /* As QEMU: a read-only export of a node that others may still
         * write would show a bitmap that changes under the client. */
        if (!writable && !bs->read_only && !bm->disabled) {
            export_free(e);
            error_setg(errp, "Enabled bitmap '%s' incompatible with readonly "
                       "export", bname);
            return NULL;
        }
        if (asprintf(&e->ctx_names[i], META_DIRTY_PREFIX "%s", bname) < 0) {
            e->ctx_names[i] = NULL;
            export_free(e);
            error_setg(errp, "out of memory");
            return NULL;
        }
        bdrv_dirty_bitmap_set_busy(bm, true);
        e->bitmaps[i] = bm;
        e->nbitmaps = i + 1;
    }
    bdrv_ref(bs);
    e->bs = bs;

    LOCK_GUARD(&srv.lock);
    e->serial = ++srv.next_serial;
    NBDExport **pp = &srv.exports;
    while (*pp) {
        pp = &(*pp)->next;
    }
    *pp = e;
    return e;
}

NBDExport *nbd_export_find(const char *id)
{
    LOCK_GUARD(&srv.lock);
    for (NBDExport *e = srv.exports; e; e = e->next) {
        if (!e->removing && strcmp(e->id, id) == 0) {
            return e;
        }
    }
    return NULL;
}

const char *nbd_export_id(const NBDExport *exp)
{
    return exp->id;
}

NBDExport *nbd_export_find_by_name(const char *name)
{
    LOCK_GUARD(&srv.lock);
    for (NBDExport *e = srv.exports; e; e = e->next) {
        if (!e->removing && strcmp(e->name, name) == 0) {
            return e;
        }
    }
    return NULL;
}

/* Unlink e, disconnect its clients (requests in flight are answered) and
 * wait for them.  Called with srv.lock held; e->removing is set. */
static void export_drain_locked(NBDExport *e)
{
    for (NBDClient *c = srv.clients; c; c = c->next) {
        if (c->exp == e) {
            shutdown(c->fd, SHUT_RD);
        }
    }
    while (e->nclients > 0) {
        pthread_cond_wait(&srv.cond, &srv.lock);
    }
    for (NBDExport **pp = &srv.exports; *pp; pp = &(*pp)->next) {
        if (*pp == e) {
            *pp = e->next;
            break;
        }
    }
}

bool nbd_export_del(const char *id, bool force, Error **errp)
{
    NBDExport *e = NULL;
    {
        LOCK_GUARD(&srv.lock);
        for (NBDExport *it = srv.exports; it; it = it->next) {
            if (!it->removing && strcmp(it->id, id) == 0) {
                e = it;
                break;
            }
        }
        if (!e) {
            error_set(errp, ERROR_CLASS_GENERIC_ERROR,
                      "Export '%s' is not found", id);
            return false;
        }
        if (e->nclients > 0 && !force) {
            error_setg(errp, "export '%s' still in use (%u connection%s); "
                       "use mode 'hard' to disconnect", id, e->nclients,
                       e->nclients == 1 ? "" : "s");
            return false;
        }
        e->removing = true;
        export_drain_locked(e);
    }
    export_free(e);
    return true;
}

struct json_object *nbd_export_query(void)
{
    struct json_object *arr = json_object_new_array();
    LOCK_GUARD(&srv.lock);
    for (NBDExport *e = srv.exports; e; e = e->next) {
        struct json_object *o = json_object_new_object();
        json_object_object_add(o, "type", json_object_new_string("nbd"));
        json_object_object_add(o, "id", json_object_new_string(e->id));
        json_object_object_add(o, "node-name",
                               json_object_new_string(e->bs->node_name ?
                                                      e->bs->node_name : ""));
        json_object_object_add(o, "shutting-down",
                               json_object_new_boolean(e->removing));
        json_object_array_add(arr, o);
    }
    return arr;
}

bool nbd_node_is_exported(BlockDriverState *bs)
{
    LOCK_GUARD(&srv.lock);
    for (NBDExport *e = srv.exports; e; e = e->next) {
        if (e->bs == bs) {
            return true;
        }
    }
    return false;
}

/* ------------------------------------------------------------------ */
/* Negotiation                                                          */

/* Results of option handlers. */
enum { OPT_CONTINUE = 0, OPT_TRANSMIT = 1, OPT_CLOSE = -1 };

static int opt_reply(NBDClient *c, uint32_t opt, uint32_t type,
                     const void *data, uint32_t len)
{
    uint8_t hdr[20];
    st_be64(hdr, NBD_REP_MAGIC);
    st_be32(hdr + 8, opt);
    st_be32(hdr + 12, type);
    st_be32(hdr + 16, len);
    struct iovec iov[2] = {
        { .iov_base = hdr, .iov_len = sizeof(hdr) },
        { .iov_base = (void *)data, .iov_len = len },
    };
    return send_iov(c->fd, iov, len ? 2 : 1) < 0 ? OPT_CLOSE : OPT_CONTINUE;
}

/* An error reply with a human readable message. */
static int opt_error(NBDClient *c, uint32_t opt, uint32_t type,
                     const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int opt_error(NBDClient *c, uint32_t opt, uint32_t type,
                     const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (n < 0) {
        n = 0;
    }
    return opt_reply(c, opt, type, msg, (uint32_t)MIN((size_t)n, sizeof(msg) - 1));
}

static int opt_info_export(NBDClient *c, uint32_t opt, NBDExport *e,
                           uint64_t size)
{
    uint8_t d[12];
    st_be16(d, NBD_INFO_EXPORT);
    st_be64(d + 2, size);
    st_be16(d + 10, export_tflags(e, c->structured));
    return opt_reply(c, opt, NBD_REP_INFO, d, sizeof(d));
}

static int opt_info_string(NBDClient *c, uint32_t opt, uint16_t type,
                           const char *s)
{
    size_t len = strlen(s);
    uint8_t d[2 + NBD_MAX_STRING];
    len = MIN(len, (size_t)NBD_MAX_STRING);
    st_be16(d, type);
    memcpy(d + 2, s, len);
    return opt_reply(c, opt, NBD_REP_INFO, d, (uint32_t)(2 + len));
}

static int opt_info_block_size(NBDClient *c, uint32_t opt)
{
    uint8_t d[14];
    st_be16(d, NBD_INFO_BLOCK_SIZE);
    st_be32(d + 2, 1);
    st_be32(d + 6, 4096);
    st_be32(d + 10, NBD_MAX_PAYLOAD);
    return opt_reply(c, opt, NBD_REP_INFO, d, sizeof(d));
}

/* Forget the metadata context selection. */
static void meta_clear(NBDClient *c)
{
    free(c->bitmap_ids);
    c->bitmap_ids = NULL;
    c->base_id = 0;
    c->nctx = 0;
    c->meta_exp = NULL;
    c->meta_serial = 0;
}

/* Negotiation is over: the client uses export e (its pin is kept) from now
 * on.  Meta contexts chosen for another export, or for an earlier export of
 * the same name, are dropped.  Returns OPT_TRANSMIT. */
static int client_enter_transmission(NBDClient *c, NBDExport *e, uint64_t size)
{
    c->exp = e;
    c->size = size;
    c->tflags = export_tflags(e, c->structured);
    if (c->meta_exp != e || c->meta_serial != e->serial) {
        meta_clear(c);
    }
    return OPT_TRANSMIT;
}

/* NBD_OPT_INFO and NBD_OPT_GO.  Data: u32 name length, name, u16 count,
 * count x u16 info requests. */
static int opt_info_go(NBDClient *c, uint32_t opt, const uint8_t *data,
                       uint32_t len)
{
    if (len < 6) {
        return opt_error(c, opt, NBD_REP_ERR_INVALID, "option too short");
    }
    uint32_t namelen = ld_be32(data);
    if (namelen > NBD_MAX_STRING || namelen > len - 6) {
        return opt_error(c, opt, NBD_REP_ERR_INVALID, "bad export name length");
    }
    uint16_t nreq = ld_be16(data + 4 + namelen);
    if ((uint64_t)len != 6 + (uint64_t)namelen + 2 * (uint64_t)nreq) {
        return opt_error(c, opt, NBD_REP_ERR_INVALID, "bad option length");
    }
    char name[NBD_MAX_STRING + 1];
    memcpy(name, data + 4, namelen);
    name[namelen] = '\0';
    if (memchr(name, '\0', namelen)) {
        return opt_error(c, opt, NBD_REP_ERR_INVALID, "export name holds NUL");
    }
    bool want_name = false, want_desc = false;
    for (uint16_t i = 0; i < nreq; i++) {
        uint16_t t = ld_be16(data + 6 + namelen + 2 * i);
        want_name |= t == NBD_INFO_NAME;
        want_desc |= t == NBD_INFO_DESCRIPTION;
    }
    NBDExport *e = export_pin(name);
    if (!e) {
        return opt_error(c, opt, NBD_REP_ERR_UNKNOWN, "export '%s' not found",
                         name);
    }
    int64_t size = bdrv_getlength(e->bs);
    int r = OPT_CONTINUE;
    if (size < 0) {
        r = opt_error(c, opt, NBD_REP_ERR_PLATFORM, "cannot get export size");
        export_unpin(e);
        return r;
    }
    if (want_name) {
        r = opt_info_string(c, opt, NBD_INFO_NAME, e->name);
    }
    if (r == OPT_CONTINUE && want_desc && e->description) {
        r = opt_info_string(c, opt, NBD_INFO_DESCRIPTION, e->description);
    }
    if (r == OPT_CONTINUE) {
        r = opt_info_block_size(c, opt);
    }
    if (r == OPT_CONTINUE) {
        r = opt_info_export(c, opt, e, (uint64_t)size);
    }
    if (r == OPT_CONTINUE) {
        r = opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
    }
    if (r != OPT_CONTINUE || opt == NBD_OPT_INFO) {
        export_unpin(e);
        return r;
    }
    /* GO: keep the pin, enter transmission. */
    return client_enter_transmission(c, e, (uint64_t)size);
}

static int opt_export_name(NBDClient *c, const uint8_t *data, uint32_t len)
{
    if (len > NBD_MAX_STRING) {
        return OPT_CLOSE;
    }
    char name[NBD_MAX_STRING + 1];
    memcpy(name, data, len);
    name[len] = '\0';
    NBDExport *e = export_pin(name);
    if (!e) {
        return OPT_CLOSE;   /* this option cannot carry an error */
    }
    int64_t size = bdrv_getlength(e->bs);
    if (size < 0) {
        export_unpin(e);
        return OPT_CLOSE;
    }
    uint8_t reply[8 + 2 + 124] = { 0 };
    st_be64(reply, (uint64_t)size);
    st_be16(reply + 8, export_tflags(e, c->structured));
    if (send_buf(c->fd, reply, c->no_zeroes ? 10 : sizeof(reply)) < 0) {
        export_unpin(e);
        return OPT_CLOSE;
    }
    return client_enter_transmission(c, e, (uint64_t)size);
}

static int opt_list(NBDClient *c, uint32_t len)
{
    if (len != 0) {
        return opt_error(c, NBD_OPT_LIST, NBD_REP_ERR_INVALID,
                         "NBD_OPT_LIST takes no data");
    }
    /* Copy the names out so that nothing is sent under srv.lock. */
    size_t n = 0;
    _cleanup_free_ uint8_t *buf = NULL;
    size_t used = 0, cap = 0;
    _cleanup_free_ size_t *ends = NULL;
    {
        LOCK_GUARD(&srv.lock);
        for (NBDExport *e = srv.exports; e; e = e->next) {
            if (!e->removing) {
                n++;
            }
        }
        ends = calloc(n + 1, sizeof(*ends));
        if (!ends) {
            return OPT_CLOSE;
        }
        n = 0;
        for (NBDExport *e = srv.exports; e; e = e->next) {
            if (e->removing) {
                continue;
            }
            size_t nl = strlen(e->name);
            size_t dl = e->description ? strlen(e->description) : 0;
            size_t need = 4 + nl + dl;
            if (used + need > cap) {
                size_t ncap = MAX(cap * 2, used + need + 256);
                uint8_t *nb = realloc(buf, ncap);
                if (!nb) {
                    return OPT_CLOSE;
                }
                buf = nb;
                cap = ncap;
            }
            st_be32(buf + used, (uint32_t)nl);
            memcpy(buf + used + 4, e->name, nl);
            if (dl) {
                memcpy(buf + used + 4 + nl, e->description, dl);
            }
            used += need;
            ends[n++] = used;
        }
    }
    size_t start = 0;
    for (size_t i = 0; i < n; i++) {
        if (opt_reply(c, NBD_OPT_LIST, NBD_REP_SERVER, buf + start,
                      (uint32_t)(ends[i] - start)) != OPT_CONTINUE) {
            return OPT_CLOSE;
        }
        start = ends[i];
    }
    return opt_reply(c, NBD_OPT_LIST, NBD_REP_ACK, NULL, 0);
}

/* Mark in sel[] (index 0: base:allocation, 1 + i: bitmap i) the contexts
 * of e that query q selects.  LIST also takes namespace queries
 * ("base:", "qemu:", "qemu:dirty-bitmap:"). */
static void meta_match(const NBDExport *e, const char *q, size_t qlen,
                       bool list, bool *sel)
{
#define QEQ(lit) (qlen == sizeof(lit) - 1 && memcmp(q, lit, qlen) == 0)
    if (QEQ(META_BASE_ALLOCATION) || (list && QEQ("base:"))) {
        sel[0] = true;
        return;
    }
    if (list && (QEQ("qemu:") || QEQ(META_DIRTY_PREFIX))) {
        for (int i = 0; i < e->nbitmaps; i++) {
            sel[1 + i] = true;
        }
        return;
    }
    for (int i = 0; i < e->nbitmaps; i++) {
        if (strlen(e->ctx_names[i]) == qlen &&
            memcmp(e->ctx_names[i], q, qlen) == 0) {
            sel[1 + i] = true;
        }
    }
#undef QEQ
}

static int meta_reply(NBDClient *c, uint32_t opt, uint32_t id,
                      const char *name)
{
    size_t nl = strlen(name);
    _cleanup_free_ uint8_t *d = malloc(4 + nl);
    if (!d) {
        return OPT_CLOSE;
    }
    st_be32(d, id);
    memcpy(d + 4, name, nl);
    return opt_reply(c, opt, NBD_REP_META_CONTEXT, d, (uint32_t)(4 + nl));
}

/* NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.  Data: u32 name
 * length, name, u32 query count, then per query u32 length and string. */
static int opt_meta(NBDClient *c, uint32_t opt, const uint8_t *data,
                    uint32_t len)
{
    bool list = opt == NBD_OPT_LIST_META_CONTEXT;
    if (!c->structured) {
        return opt_error(c, opt, NBD_REP_ERR_INVALID,
                         "structured replies must be negotiated first");
    }
    if (len < 8) {
        return opt_error(c, opt, NBD_REP_ERR_INVALID, "option too short");
    }
    uint32_t namelen = ld_be32(data);
    if (namelen > NBD_MAX_STRING || namelen > len - 8) {
        return opt_error(c, opt, NBD_REP_ERR_INVALID, "bad export name length");
    }
    char name[NBD_MAX_STRING + 1];
    memcpy(name, data + 4, namelen);
    name[namelen] = '\0';
    uint32_t nq = ld_be32(data + 4 + namelen);
    /* Validate every query before acting on any. */
    uint64_t pos = 8 + (uint64_t)namelen;
    for (uint32_t i = 0; i < nq; i++) {
        if (pos + 4 > len) {
            return opt_error(c, opt, NBD_REP_ERR_INVALID, "truncated query");
        }
        uint32_t ql = ld_be32(data + pos);
        if (ql > NBD_MAX_STRING || pos + 4 + ql > len) {
            return opt_error(c, opt, NBD_REP_ERR_INVALID, "bad query length");
        }
        pos += 4 + (uint64_t)ql;
    }
    if (pos != len) {
        return opt_error(c, opt, NBD_REP_ERR_INVALID, "bad option length");
    }
    NBDExport *e = export_pin(name);
    if (!e) {
        return opt_error(c, opt, NBD_REP_ERR_UNKNOWN, "export '%s' not found",
                         name);
    }
    _cleanup_free_ bool *sel = calloc((size_t)e->nbitmaps + 1, sizeof(bool));
    _cleanup_free_ uint32_t *ids = calloc((size_t)e->nbitmaps + 1, sizeof(uint32_t));
    if (!sel || !ids) {
        export_unpin(e);
        return OPT_CLOSE;
    }
    if (list && nq == 0) {
        for (int i = 0; i <= e->nbitmaps; i++) {
            sel[i] = true;
        }
    }
    pos = 8 + (uint64_t)namelen;
    for (uint32_t i = 0; i < nq; i++) {
        uint32_t ql = ld_be32(data + pos);
        meta_match(e, (const char *)data + pos + 4, ql, list, sel);
        pos += 4 + (uint64_t)ql;
    }
    int r = OPT_CONTINUE;
    int nsel = 0;
    for (int i = 0; i <= e->nbitmaps && r == OPT_CONTINUE; i++) {
        if (!sel[i]) {
            continue;
        }
        ids[i] = list ? 0 : ++c->next_ctx_id;
        nsel++;
        r = meta_reply(c, opt, ids[i], i == 0 ? META_BASE_ALLOCATION
                                              : e->ctx_names[i - 1]);
    }
    if (r == OPT_CONTINUE) {
        r = opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
    }
    if (r == OPT_CONTINUE && !list) {
        meta_clear(c);
        c->meta_exp = e;
        c->meta_serial = e->serial;
        c->base_id = ids[0];
        c->bitmap_ids = steal_pointer(&ids);
        /* bitmap_ids[i] is the id of bitmap i: shift past base. */
        memmove(c->bitmap_ids, c->bitmap_ids + 1,
                (size_t)e->nbitmaps * sizeof(uint32_t));
        c->nctx = nsel;
    }
    export_unpin(e);
    return r;
}

/* Run the handshake: OPT_TRANSMIT with c->exp pinned, or OPT_CLOSE. */
static int negotiate(NBDClient *c)
{
    uint8_t hello[18];
    st_be64(hello, NBD_MAGIC);
    st_be64(hello + 8, NBD_IHAVEOPT);
    st_be16(hello + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    if (send_buf(c->fd, hello, sizeof(hello)) < 0) {
        return OPT_CLOSE;
    }
    uint8_t cflags[4];
    if (recv_full(c->fd, cflags, 4) < 0) {
        return OPT_CLOSE;
    }
    uint32_t flags = ld_be32(cflags);
    if (flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
        return OPT_CLOSE;   /* the spec says: drop unknown client flags */
    }
    c->no_zeroes = flags & NBD_FLAG_C_NO_ZEROES;

    _cleanup_free_ uint8_t *data = malloc(NBD_MAX_OPT_PAYLOAD);
    if (!data) {
        return OPT_CLOSE;
    }
    for (;;) {
        uint8_t hdr[16];
        if (recv_full(c->fd, hdr, sizeof(hdr)) < 0) {
            return OPT_CLOSE;
        }
        if (ld_be64(hdr) != NBD_IHAVEOPT) {
            return OPT_CLOSE;
        }
        uint32_t opt = ld_be32(hdr + 8);
        uint32_t len = ld_be32(hdr + 12);
        if (len > NBD_MAX_OPT_PAYLOAD) {
            return OPT_CLOSE;   /* invariant 5: never allocate for it */
        }
        if (recv_full(c->fd, data, len) < 0) {
            return OPT_CLOSE;
        }
        int r;
        switch (opt) {
        case NBD_OPT_EXPORT_NAME:
            r = opt_export_name(c, data, len);
            break;
        case NBD_OPT_ABORT:
            opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
            return OPT_CLOSE;
        case NBD_OPT_LIST:
            r = opt_list(c, len);
            break;
        case NBD_OPT_INFO:
        case NBD_OPT_GO:
            r = opt_info_go(c, opt, data, len);
            break;
        case NBD_OPT_STRUCTURED_REPLY:
            if (len != 0) {
                r = opt_error(c, opt, NBD_REP_ERR_INVALID,
                              "NBD_OPT_STRUCTURED_REPLY takes no data");
            } else {
                c->structured = true;
                r = opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
            }
            break;
        case NBD_OPT_LIST_META_CONTEXT:
        case NBD_OPT_SET_META_CONTEXT:
            r = opt_meta(c, opt, data, len);
            break;
        case NBD_OPT_STARTTLS:
            r = opt_error(c, opt, NBD_REP_ERR_POLICY, "TLS is not supported");
            break;
        default:
            r = opt_error(c, opt, NBD_REP_ERR_UNSUP, "option %u unsupported",
                          opt);
            break;
        }
        if (r != OPT_CONTINUE) {
            return r;
        }
    }
}

/* ------------------------------------------------------------------ */
/* Transmission                                                         */

static uint32_t nbd_error_code(int err)
{
    if (err < 0) {
        err = -err;
    }
    switch (err) {
    case 0:
        return NBD_SUCCESS;
    case EPERM:
    case EROFS:
    case EACCES:
        return NBD_EPERM;
    case EIO:
        return NBD_EIO;
    case ENOMEM:
        return NBD_ENOMEM;
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
        return NBD_ENOSPC;
    case EOVERFLOW:
        return NBD_EOVERFLOW;
    case ENOTSUP:
        return NBD_ENOTSUP;
    case ESHUTDOWN:
        return NBD_ESHUTDOWN;
    case EINVAL:
        return NBD_EINVAL;
    default:
        return NBD_EIO;
    }
}

static void client_set_closing(NBDClient *c)
{
    LOCK_GUARD(&c->lock);
    c->closing = true;
    pthread_cond_broadcast(&c->cond);
}

/* Send one whole reply (invariant 1).  A failed send ends the connection. */
static void client_send(NBDClient *c, struct iovec *iov, int niov)
{
    bool failed = false;
    pthread_mutex_lock(&c->send_lock);
    if (!c->send_failed && send_iov(c->fd, iov, niov) < 0) {
        c->send_failed = true;
        shutdown(c->fd, SHUT_RDWR);
    }
    failed = c->send_failed;
    pthread_mutex_unlock(&c->send_lock);
    if (failed) {
        client_set_closing(c);
    }
}

static void put_chunk_header(uint8_t *p, uint16_t flags, uint16_t type,
                             uint64_t handle, uint32_t len)
{
    st_be32(p, NBD_STRUCTURED_REPLY_MAGIC);
    st_be16(p + 4, flags);
    st_be16(p + 6, type);
    st_be64(p + 8, handle);
    st_be32(p + 16, len);
}

static void reply_simple(NBDClient *c, const NBDRequest *req, int err,
                         const void *data, size_t len)
{
    uint8_t hdr[NBD_SIMPLE_REPLY_SIZE];
    st_be32(hdr, NBD_SIMPLE_REPLY_MAGIC);
    st_be32(hdr + 4, nbd_error_code(err));
    st_be64(hdr + 8, req->handle);
    struct iovec iov[2] = {
        { .iov_base = hdr, .iov_len = sizeof(hdr) },
        { .iov_base = (void *)data, .iov_len = len },
    };
    client_send(c, iov, len ? 2 : 1);
}

/* The error reply of a request: an error chunk when structured replies
 * are on, else a simple reply (which carries no data). */
static void reply_error(NBDClient *c, const NBDRequest *req, int err,
                        const char *msg)
{
    if (!c->structured) {
        reply_simple(c, req, err, NULL, 0);
        return;
    }
    size_t ml = msg ? MIN(strlen(msg), (size_t)NBD_MAX_STRING) : 0;
    uint8_t hdr[NBD_CHUNK_HEADER_SIZE + 6];
    put_chunk_header(hdr, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR,
                     req->handle, (uint32_t)(6 + ml));
    st_be32(hdr + NBD_CHUNK_HEADER_SIZE, nbd_error_code(err));
    st_be16(hdr + NBD_CHUNK_HEADER_SIZE + 4, (uint16_t)ml);
    struct iovec iov[2] = {
        { .iov_base = hdr, .iov_len = sizeof(hdr) },
        { .iov_base = (void *)msg, .iov_len = ml },
    };
    client_send(c, iov, ml ? 2 : 1);
}

static void reply_ok(NBDClient *c, const NBDRequest *req)
{
    reply_simple(c, req, 0, NULL, 0);
}

/* Make w->buf hold at least len bytes.  0 or -ENOMEM. */
static int worker_buf(NBDWorker *w, size_t len)
{
    if (len <= w->cap) {
        return 0;
    }
    free(w->buf);
    w->buf = NULL;
    w->cap = 0;
    size_t cap = ROUND_UP(MAX(len, (size_t)65536), (size_t)65536);
    void *p = NULL;
    if (posix_memalign(&p, NBD_BUF_ALIGN, cap) != 0) {
        return -ENOMEM;
    }
    w->buf = p;
    w->cap = cap;
    return 0;
}

static bool in_bounds(const NBDClient *c, const NBDRequest *req)
{
    return req->offset <= c->size && req->len <= c->size - req->offset;
}

/* Flags a command may carry (FUA is accepted everywhere, as the spec
 * requires once NBD_FLAG_SEND_FUA is advertised). */
static uint16_t allowed_flags(const NBDClient *c, uint16_t type)
{
    uint16_t f = NBD_CMD_FLAG_FUA;
    switch (type) {
    case NBD_CMD_READ:
        return f | (c->structured ? NBD_CMD_FLAG_DF : 0);
    case NBD_CMD_WRITE_ZEROES:
        return f | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO;
    case NBD_CMD_BLOCK_STATUS:
        return f | NBD_CMD_FLAG_REQ_ONE;
    default:
        return f;
    }
}

typedef struct ReadSegment {
    uint64_t offset;
    uint32_t len;
    bool hole;
    uint8_t hdr[NBD_CHUNK_HEADER_SIZE + 12];
} ReadSegment;

/* With rflags = BDRV_REQ_NOWAIT, returns false (and sends nothing) when the
 * data is not in the page cache; otherwise the request is answered. */
static bool do_read_structured(NBDClient *c, NBDWorker *w, const NBDRequest *req,
                               int rflags)
{
    BlockDriverState *bs = c->exp->bs;
    ReadSegment seg[NBD_MAX_READ_SEGMENTS];
    int nseg = 0;
    uint64_t pos = req->offset, end = req->offset + req->len;

    /* Find holes unless the client wants a single chunk, or the read is
     * so small that a hole chunk would save little. */
    bool sparse = !(req->flags & NBD_CMD_FLAG_DF) &&
                  req->len >= NBD_SPARSE_READ_MIN;
    while (pos < end && sparse) {
        uint64_t pnum = 0;
        int st = bdrv_block_status(bs, pos, end - pos, &pnum);
        if (st < 0 || pnum == 0) {
            break;
        }
        pnum = MIN(pnum, end - pos);
        bool hole = (st & BDRV_BLOCK_ZERO) != 0;
        if (nseg > 0 && seg[nseg - 1].hole == hole) {
            seg[nseg - 1].len += (uint32_t)pnum;
        } else if (nseg == NBD_MAX_READ_SEGMENTS - 1) {
            break;   /* the rest goes into one data chunk below */
        } else {
            seg[nseg++] = (ReadSegment){ .offset = pos, .len = (uint32_t)pnum,
                                         .hole = hole };
        }
        pos += pnum;
    }
    if (pos < end) {
        if (nseg > 0 && !seg[nseg - 1].hole) {
            seg[nseg - 1].len += (uint32_t)(end - pos);
        } else {
            seg[nseg++] = (ReadSegment){ .offset = pos,
                                         .len = (uint32_t)(end - pos),
                                         .hole = false };
        }
    }

    /* Read every data segment before sending anything, so that an error
     * is reported as the only chunk. */
    for (int i = 0; i < nseg; i++) {
        if (seg[i].hole) {
            continue;
        }
        struct iovec iov = {
            .iov_base = w->buf + (seg[i].offset - req->offset),
            .iov_len = seg[i].len,
        };
        int r = bdrv_preadv(bs, seg[i].offset, seg[i].len, &iov, 1, rflags);
        if (r == -EAGAIN && (rflags & BDRV_REQ_NOWAIT)) {
            return false;
        }
        if (r < 0) {
            reply_error(c, req, r, "read failed");
            return true;
        }
    }

    struct iovec iov[2 * NBD_MAX_READ_SEGMENTS];
    int niov = 0;
    for (int i = 0; i < nseg; i++) {
        uint16_t flags = i == nseg - 1 ? NBD_REPLY_FLAG_DONE : 0;
        uint8_t *h = seg[i].hdr;
        if (seg[i].hole) {
            put_chunk_header(h, flags, NBD_REPLY_TYPE_OFFSET_HOLE, req->handle, 12);
            st_be64(h + NBD_CHUNK_HEADER_SIZE, seg[i].offset);
            st_be32(h + NBD_CHUNK_HEADER_SIZE + 8, seg[i].len);
            iov[niov++] = (struct iovec){ h, NBD_CHUNK_HEADER_SIZE + 12 };
        } else {
            put_chunk_header(h, flags, NBD_REPLY_TYPE_OFFSET_DATA, req->handle,
                             8 + seg[i].len);
            st_be64(h + NBD_CHUNK_HEADER_SIZE, seg[i].offset);
            iov[niov++] = (struct iovec){ h, NBD_CHUNK_HEADER_SIZE + 8 };
            iov[niov++] = (struct iovec){ w->buf + (seg[i].offset - req->offset),
                                          seg[i].len };
        }
    }
    client_send(c, iov, niov);
    return true;
}

/* Answer a read.  rflags as for do_read_structured. */
static bool do_read(NBDClient *c, NBDWorker *w, const NBDRequest *req, int rflags)
{
    if (req->len > NBD_MAX_PAYLOAD) {
        reply_error(c, req, EINVAL, "read larger than 32 MiB");
        return true;
    }
    if (!in_bounds(c, req)) {
        reply_error(c, req, EINVAL, "read past the end of the export");
        return true;
    }
    if (req->len == 0) {
        if (c->structured) {
            uint8_t h[NBD_CHUNK_HEADER_SIZE];
            put_chunk_header(h, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE,
                             req->handle, 0);
            struct iovec iov = { h, sizeof(h) };
            client_send(c, &iov, 1);
        } else {
            reply_ok(c, req);
        }
        return true;
    }
    int r = worker_buf(w, req->len);
    if (r < 0) {
        reply_error(c, req, r, "out of memory");
        return true;
    }
    if (c->structured) {
        return do_read_structured(c, w, req, rflags);
    }
    struct iovec iov = { .iov_base = w->buf, .iov_len = req->len };
    r = bdrv_preadv(c->exp->bs, req->offset, req->len, &iov, 1, rflags);
    if (r == -EAGAIN && (rflags & BDRV_REQ_NOWAIT)) {
        return false;
    }
    if (r < 0) {
        reply_simple(c, req, r, NULL, 0);
    } else {
        reply_simple(c, req, 0, w->buf, req->len);
    }
    return true;
}

/* A small read whose data is in the page cache costs less than handing the
 * connection to another worker: the reader answers it itself, still holding
 * recv_lock (invariant 6).  False when the request must go the normal way:
 * anything unusual, or data that would have to come from the disk. */
static bool try_read_inline(NBDClient *c, NBDWorker *w, const NBDRequest *req)
{
    if (req->type != NBD_CMD_READ || req->len == 0 ||
        req->len > NBD_INLINE_READ_MAX || !in_bounds(c, req) ||
        (req->flags & ~allowed_flags(c, NBD_CMD_READ))) {
        return false;
    }
    return do_read(c, w, req, BDRV_REQ_NOWAIT);
}

/* Fill out (big endian length/flags pairs) with base:allocation extents of
 * [offset, offset+len), merged; at most max of them.  Returns the count or
 * -errno. */
static int extents_allocation(BlockDriverState *bs, uint64_t offset,
                              uint32_t len, uint8_t *out, int max)
{
    uint64_t pos = offset, end = offset + len;
    int n = 0;
    uint32_t last_flags = 0, last_len = 0;
    while (pos < end) {
        uint64_t pnum = 0;
        int st = bdrv_block_status(bs, pos, end - pos, &pnum);
        if (st < 0) {
            if (n == 0) {
                return st;
            }
            break;
        }
        if (pnum == 0) {
            break;
        }
        pnum = MIN(pnum, end - pos);
        uint32_t f = (st & BDRV_BLOCK_DATA ? 0 : NBD_STATE_HOLE) |
                     (st & BDRV_BLOCK_ZERO ? NBD_STATE_ZERO : 0);
        if (n > 0 && f == last_flags) {
            last_len += (uint32_t)pnum;
            st_be32(out + 8 * (n - 1), last_len);
        } else {
            if (n == max) {
                break;
            }
            last_flags = f;
            last_len = (uint32_t)pnum;
            st_be32(out + 8 * n, last_len);
            st_be32(out + 8 * n + 4, last_flags);
            n++;
        }
        pos += pnum;
    }
    if (n == 0) {
        /* Nothing known: status 0 is always a safe answer. */
        st_be32(out, len);
        st_be32(out + 4, 0);
        n = 1;
    }
    return n;
}

static int extents_dirty(BdrvDirtyBitmap *bm, uint64_t offset, uint32_t len,
                         uint8_t *out, int max)
{
    size_t next = 0;
    _cleanup_free_ BdrvDirtyExtent *ext =
        bdrv_dirty_bitmap_extents(bm, offset, len, false, &next);
    if (!ext) {
        return -ENOMEM;
    }
    int n = 0;
    for (size_t i = 0; i < next && n < max; i++) {
        if (ext[i].length == 0) {
            continue;
        }
        st_be32(out + 8 * n, (uint32_t)ext[i].length);
        st_be32(out + 8 * n + 4, ext[i].dirty ? NBD_STATE_DIRTY : 0);
        n++;
    }
    if (n == 0) {
        /* Past the end of the bitmap (a smaller backing node): clean. */
        st_be32(out, len);
        st_be32(out + 4, 0);
        n = 1;
    }
    return n;
}

static void do_block_status(NBDClient *c, const NBDRequest *req)
{
    if (!c->structured || c->nctx == 0) {
        reply_error(c, req, EINVAL, "no metadata context was selected");
        return;
    }
    if (req->len == 0 || !in_bounds(c, req)) {
        reply_error(c, req, EINVAL, "block status range past the end");
        return;
    }
    NBDExport *e = c->exp;
    bool one = req->flags & NBD_CMD_FLAG_REQ_ONE;
    int max = one ? 1 : (int)MIN((uint64_t)NBD_MAX_EXTENTS, req->len / 512 + 2);
    size_t per_ctx = NBD_CHUNK_HEADER_SIZE + 4 + 8 * (size_t)max;
    _cleanup_free_ uint8_t *buf = malloc(per_ctx * (size_t)c->nctx);
    _cleanup_free_ struct iovec *iov = calloc((size_t)c->nctx, sizeof(*iov));
    if (!buf || !iov) {
        reply_error(c, req, ENOMEM, "out of memory");
        return;
    }
    int k = 0;
    for (int i = -1; i < e->nbitmaps; i++) {
        uint32_t id = i < 0 ? c->base_id : c->bitmap_ids[i];
        if (id == 0) {
            continue;
        }
        uint8_t *chunk = buf + per_ctx * (size_t)k;
        uint8_t *desc = chunk + NBD_CHUNK_HEADER_SIZE + 4;
        int n = i < 0 ? extents_allocation(e->bs, req->offset, req->len, desc, max)
                      : extents_dirty(e->bitmaps[i], req->offset, req->len,
                                      desc, max);
        if (n < 0) {
            reply_error(c, req, n, "block status failed");
            return;
        }
        put_chunk_header(chunk, k == c->nctx - 1 ? NBD_REPLY_FLAG_DONE : 0,
                         NBD_REPLY_TYPE_BLOCK_STATUS, req->handle,
                         (uint32_t)(4 + 8 * n));
        st_be32(chunk + NBD_CHUNK_HEADER_SIZE, id);
        iov[k] = (struct iovec){ chunk, NBD_CHUNK_HEADER_SIZE + 4 + 8 * (size_t)n };
        k++;
    }
    client_send(c, iov, k);
}

/* Reply to a command that writes: 0 → ok, else the mapped error. */
static void reply_result(NBDClient *c, const NBDRequest *req, int r,
                         const char *what)
{
    if (r < 0) {
        reply_error(c, req, r, what);
    } else {
        reply_ok(c, req);
    }
}

static void handle_request(NBDClient *c, NBDWorker *w, const NBDRequest *req)
{
    BlockDriverState *bs = c->exp->bs;
    if (req->early_err) {
        reply_error(c, req, req->early_err, "request refused");
        return;
    }
    if (req->flags & ~allowed_flags(c, req->type)) {
        reply_error(c, req, EINVAL, "flag not valid for this command");
        return;
    }
    bool writes = req->type == NBD_CMD_WRITE || req->type == NBD_CMD_TRIM ||
                  req->type == NBD_CMD_WRITE_ZEROES;
    if (writes && !c->exp->writable) {
        reply_error(c, req, EPERM, "export is read-only");
        return;
    }
    if (writes && !in_bounds(c, req)) {
        reply_error(c, req, ENOSPC, "write past the end of the export");
        return;
    }
    bool fua = req->flags & NBD_CMD_FLAG_FUA;
    int r;
    switch (req->type) {
    case NBD_CMD_READ:
        do_read(c, w, req, 0);
        return;
    case NBD_CMD_WRITE: {
        struct iovec iov = { .iov_base = w->buf, .iov_len = req->len };
        r = req->len ? bdrv_pwritev(bs, req->offset, req->len, &iov, 1,
                                    fua ? BDRV_REQ_FUA : 0) : 0;
        reply_result(c, req, r, "write failed");
        return;
    }
    case NBD_CMD_FLUSH:
        reply_result(c, req, bdrv_flush(bs), "flush failed");
        return;
    case NBD_CMD_TRIM:
        r = bdrv_pdiscard(bs, req->offset, req->len);
        if (r >= 0 && fua) {
            r = bdrv_flush(bs);
        }
        reply_result(c, req, r, "trim failed");
        return;
    case NBD_CMD_WRITE_ZEROES: {
        int flags = 0;
        if (!(req->flags & NBD_CMD_FLAG_NO_HOLE)) {
            flags |= BDRV_REQ_MAY_UNMAP;
        }
        if (req->flags & NBD_CMD_FLAG_FAST_ZERO) {
            flags |= BDRV_REQ_NO_FALLBACK;
        }
        r = bdrv_pwrite_zeroes(bs, req->offset, req->len, flags);
        if (r >= 0 && fua) {
            r = bdrv_flush(bs);
        }
        reply_result(c, req, r, r == -ENOTSUP ? "fast zeroing not possible"
                                              : "write zeroes failed");
        return;
    }
    case NBD_CMD_BLOCK_STATUS:
        do_block_status(c, req);
        return;
    default:
        reply_error(c, req, EINVAL, "unknown command");
        return;
    }
}

static void *worker_main(void *opaque);

/* Start one more worker if every current one is busy (c->lock held). */
static void maybe_spawn_worker_locked(NBDClient *c)
{
    if (c->closing || c->busy < c->nworkers || c->nworkers >= srv.max_workers) {
        return;
    }
    NBDWorker *w = &c->workers[c->nworkers];
    *w = (NBDWorker){ .c = c };
    if (pthread_create(&w->thread, NULL, worker_main, w) == 0) {
        c->nworkers++;
    }
}

/* Read the next request under recv_lock.  Returns 1 with *req filled (and
 * its payload in w->buf), or 0 when the connection is closing. */
static int receive_request(NBDClient *c, NBDWorker *w, NBDRequest *req)
{
    LOCK_GUARD(&c->recv_lock);
next:
    {
        LOCK_GUARD(&c->lock);
        if (c->closing) {
            return 0;
        }
    }
    uint8_t h[NBD_REQUEST_SIZE];
    if (client_recv(c, h, sizeof(h)) < 0 ||
        ld_be32(h) != NBD_REQUEST_MAGIC) {
        client_set_closing(c);
        return 0;
    }
    *req = (NBDRequest){
        .flags = ld_be16(h + 4),
        .type = ld_be16(h + 6),
        .handle = ld_be64(h + 8),
        .offset = ld_be64(h + 16),
        .len = ld_be32(h + 24),
    };
    if (try_read_inline(c, w, req)) {
        goto next;
    }
    if (req->type == NBD_CMD_DISC) {
        client_set_closing(c);
        return 0;
    }
    if (req->type == NBD_CMD_WRITE && req->len > NBD_MAX_PAYLOAD) {
        /* Skipping up to 4 GiB is not worth it: drop the client. */
        client_set_closing(c);
        return 0;
    }
    bool payload = req->type == NBD_CMD_WRITE ||
                   (req->type == NBD_CMD_READ && req->len <= NBD_MAX_PAYLOAD);
    req->budget = payload ? req->len : 0;
    {
        LOCK_GUARD(&c->lock);
        while (!c->closing && c->inflight_bytes > 0 &&
               c->inflight_bytes + req->budget > NBD_MAX_INFLIGHT_BYTES) {
            pthread_cond_wait(&c->cond, &c->lock);
        }
        if (c->closing) {
            return 0;
        }
        c->inflight_bytes += req->budget;
        c->busy++;
    }
    if (req->type == NBD_CMD_WRITE && req->len > 0) {
        int r = worker_buf(w, req->len);
        int rr = r < 0 ? client_recv_discard(c, req->len)
                       : client_recv(c, w->buf, req->len);
        if (rr < 0) {
            /* Disconnected mid-payload: this request was never accepted. */
            LOCK_GUARD(&c->lock);
            c->inflight_bytes -= req->budget;
            c->busy--;
            c->closing = true;
            pthread_cond_broadcast(&c->cond);
            return 0;
        }
        req->early_err = r < 0 ? -r : 0;
    }
    LOCK_GUARD(&c->lock);
    maybe_spawn_worker_locked(c);
    return 1;
}

static void worker_loop(NBDWorker *w)
{
    NBDClient *c = w->c;
    NBDRequest req;
    while (receive_request(c, w, &req)) {
        handle_request(c, w, &req);
        if (w->cap > NBD_KEEP_BUF) {
            free(w->buf);
            w->buf = NULL;
            w->cap = 0;
        }
        LOCK_GUARD(&c->lock);
        c->inflight_bytes -= req.budget;
        c->busy--;
        pthread_cond_broadcast(&c->cond);
    }
}

static void *worker_main(void *opaque)
{
    worker_loop(opaque);
    return NULL;
}

static void client_free(NBDClient *c)
{
    pthread_mutex_destroy(&c->recv_lock);
    pthread_mutex_destroy(&c->send_lock);
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->cond);
    free(c->bitmap_ids);
    free(c->rbuf);
    free(c);
}

/* The connection thread: negotiate, serve as worker 0, then wait for the
 * other workers (each answers its request first) and close. */
static void *client_main(void *opaque)
{
    NBDClient *c = opaque;
    c->workers[0] = (NBDWorker){ .c = c, .thread = pthread_self() };
    c->nworkers = 1;
    c->rbuf = malloc(NBD_RECV_BUF);
    if (c->rbuf && negotiate(c) == OPT_TRANSMIT) {
        worker_loop(&c->workers[0]);
    }
    client_set_closing(c);
    int n;
    {
        LOCK_GUARD(&c->lock);
        n = c->nworkers;
    }
    for (int i = 1; i < n; i++) {
        pthread_join(c->workers[i].thread, NULL);
    }
    for (int i = 0; i < n; i++) {
        free(c->workers[i].buf);
    }

    pthread_mutex_lock(&srv.lock);
    for (NBDClient **pp = &srv.clients; *pp; pp = &(*pp)->next) {
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    }
    close(c->fd);
    if (c->exp) {
        c->exp->nclients--;
    }
    srv.nclients--;
    pthread_cond_broadcast(&srv.cond);
    pthread_mutex_unlock(&srv.lock);
    client_free(c);
    return NULL;
}

static void client_start(int fd, bool inet)
{
    if (inet) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    struct timeval tv = { .tv_sec = NBD_SEND_TIMEOUT_SEC };
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    /* Room for a few large read replies without blocking on every one
     * (the kernel caps it at net.core.wmem_max). */
    int sndbuf = NBD_SOCKET_SNDBUF;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));

    NBDClient *c = calloc(1, sizeof(*c));
    if (!c) {
        close(fd);
        return;
    }
    c->fd = fd;
    c->inet = inet;
    /* Adaptive mutexes spin a little before sleeping: the socket locks
     * are held for one recv()/send() at a time. */
    pthread_mutexattr_t ma;
    pthread_mutexattr_init(&ma);
    pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_ADAPTIVE_NP);
    pthread_mutex_init(&c->recv_lock, &ma);
    pthread_mutex_init(&c->send_lock, &ma);
    pthread_mutexattr_destroy(&ma);
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->cond, NULL);

    LOCK_GUARD(&srv.lock);
    if (srv.max_connections && srv.nclients >= srv.max_connections) {
        close(fd);
        client_free(c);
        return;
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t t;
    c->next = srv.clients;
    srv.clients = c;
    srv.nclients++;
    if (pthread_create(&t, &attr, client_main, c) != 0) {
        srv.clients = c->next;
        srv.nclients--;
        close(fd);
        client_free(c);
    }
    pthread_attr_destroy(&attr);
}

static void *accept_main(void *opaque)
{
    for (;;) {
        struct pollfd p[2] = {
            { .fd = srv.listen_fd, .events = POLLIN },
            { .fd = srv.wake_pipe[0], .events = POLLIN },
        };
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR) {
                continue;
            }
            break;
        }
        if (p[1].revents) {
            break;
        }
        if (!(p[0].revents & POLLIN)) {
            continue;
        }
        int fd = accept4(srv.listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS ||
                errno == ENOMEM) {
                poll(NULL, 0, 100);   /* let resources come back */
            }
            continue;
        }
        client_start(fd, srv.inet);
    }
    return NULL;
}

/* ------------------------------------------------------------------ */
/* Server start / stop                                                  */

static const char *addr_str(struct json_object *o, const char *key)
{
    struct json_object *v;
    if (!json_object_object_get_ex(o, key, &v)) {
        return NULL;
    }
    if (json_object_is_type(v, json_type_string)) {
        return json_object_get_string(v);
    }
    return NULL;
}

static int listen_unix(const char *path, Error **errp)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof(sa.sun_path)) {
        error_setg(errp, "UNIX socket path '%s' is too long (max %zu bytes)",
                   path, sizeof(sa.sun_path) - 1);
        return -1;
    }
    strcpy(sa.sun_path, path);
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode)) {
        unlink(path);   /* a stale socket from an earlier run */
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        error_setg_errno(errp, errno, "cannot create socket");
        return -1;
    }
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        error_setg_errno(errp, errno, "cannot bind to '%s'", path);
        close(fd);
        return -1;
    }
    if (listen(fd, 128) < 0) {
        error_setg_errno(errp, errno, "cannot listen on '%s'", path);
        close(fd);
        unlink(path);
        return -1;
    }
    return fd;
}

static int listen_inet(const char *host, const char *port, Error **errp)
{
    struct addrinfo hints = {
        .ai_family = AF_UNSPEC,
        .ai_socktype = SOCK_STREAM,
        .ai_flags = AI_PASSIVE,
    };
    struct addrinfo *res = NULL;
    int r = getaddrinfo(host && *host ? host : NULL, port, &hints, &res);
    if (r != 0) {
        error_setg(errp, "cannot resolve '%s:%s': %s", host ? host : "",
                   port, gai_strerror(r));
        return -1;
    }
    int err = 0;
    int fd = -1;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) {
            err = errno;
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 128) == 0) {
            break;
        }
        err = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) {
        error_setg_errno(errp, err, "cannot listen on '%s:%s'",
                         host ? host : "", port);
    }
    return fd;
}

bool nbd_server_start(struct json_object *addr, unsigned max_connections,
                      Error **errp)
{
    if (nbd_server_is_running()) {
        error_setg(errp, "NBD server already running");
        return false;
    }
    if (!addr || !json_object_is_type(addr, json_type_object)) {
        error_setg(errp, "NBD server address must be an object");
        return false;
    }
    const char *type = addr_str(addr, "type");
    struct json_object *data;
    if (json_object_object_get_ex(addr, "data", &data) &&
        json_object_is_type(data, json_type_object)) {
        addr = data;   /* the legacy {"type": ..., "data": {...}} form */
    }
    if (!type) {
        error_setg(errp, "NBD server address needs 'type'");
        return false;
    }
    int fd;
    bool inet = false;
    _cleanup_free_ char *unix_path = NULL;
    if (strcmp(type, "unix") == 0) {
        const char *path = addr_str(addr, "path");
        if (!path || !*path) {
            error_setg(errp, "NBD server address needs 'path'");
            return false;
        }
        unix_path = strdup(path);
        if (!unix_path) {
            error_setg(errp, "out of memory");
            return false;
        }
        fd = listen_unix(path, errp);
    } else if (strcmp(type, "inet") == 0) {
        const char *host = addr_str(addr, "host");
        struct json_object *pv;
        char port[32];
        if (!json_object_object_get_ex(addr, "port", &pv)) {
            snprintf(port, sizeof(port), "10809");
        } else if (json_object_is_type(pv, json_type_int)) {
            int64_t p = json_object_get_int64(pv);
            if (p < 0 || p > 65535) {
                error_setg(errp, "bad port %lld", (long long)p);
                return false;
            }
            snprintf(port, sizeof(port), "%lld", (long long)p);
        } else if (json_object_is_type(pv, json_type_string) &&
                   strlen(json_object_get_string(pv)) < sizeof(port)) {
            snprintf(port, sizeof(port), "%s", json_object_get_string(pv));
        } else {
            error_setg(errp, "bad 'port'");
            return false;
        }
        fd = listen_inet(host, port, errp);
        inet = true;
    } else {
        error_setg(errp, "unsupported NBD server address type '%s'", type);
        return false;
    }
    if (fd < 0) {
        return false;
    }
    int pfd[2];
    if (pipe2(pfd, O_CLOEXEC) < 0) {
        error_setg_errno(errp, errno, "cannot create pipe");
        close(fd);
        if (unix_path) {
            unlink(unix_path);
        }
        return false;
    }
    LOCK_GUARD(&srv.lock);
    srv.listen_fd = fd;
    srv.wake_pipe[0] = pfd[0];
    srv.wake_pipe[1] = pfd[1];
    srv.inet = inet;
    srv.max_connections = max_connections;
    /* More workers than CPUs only pays while requests wait for a disk; on
     * cached data extra threads just add context switches. */
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    srv.max_workers = (int)MIN(MAX(4 * (ncpu > 0 ? ncpu : 1), 8L),
                               (long)NBD_MAX_WORKERS);
    srv.unix_path = steal_pointer(&unix_path);
    if (pthread_create(&srv.accept_thread, NULL, accept_main, NULL) != 0) {
        error_setg(errp, "cannot start the NBD accept thread");
        close(fd);
        close(pfd[0]);
        close(pfd[1]);
        srv.listen_fd = srv.wake_pipe[0] = srv.wake_pipe[1] = -1;
        if (srv.unix_path) {
            unlink(srv.unix_path);
        }
        free(srv.unix_path);
        srv.unix_path = NULL;
        return false;
    }
    srv.running = true;
    return true;
}

bool nbd_server_is_running(void)
{
    LOCK_GUARD(&srv.lock);
    return srv.running;
}

void nbd_server_stop(void)
{
    pthread_mutex_lock(&srv.lock);
    if (srv.running) {
        srv.running = false;
        ssize_t w;
        do {
            w = write(srv.wake_pipe[1], "x", 1);
        } while (w < 0 && errno == EINTR);
        pthread_mutex_unlock(&srv.lock);
        pthread_join(srv.accept_thread, NULL);
        pthread_mutex_lock(&srv.lock);
        close(srv.listen_fd);
        close(srv.wake_pipe[0]);
        close(srv.wake_pipe[1]);
        srv.listen_fd = srv.wake_pipe[0] = srv.wake_pipe[1] = -1;
        if (srv.unix_path) {
            unlink(srv.unix_path);
            free(srv.unix_path);
            srv.unix_path = NULL;
        }
    }
    /* Disconnect every client: requests already read are answered. */
    for (NBDClient *c = srv.clients; c; c = c->next) {
        shutdown(c->fd, SHUT_RD);
    }
    while (srv.nclients > 0) {
        pthread_cond_wait(&srv.cond, &srv.lock);
    }
    NBDExport *list = srv.exports;
    srv.exports = NULL;
    pthread_mutex_unlock(&srv.lock);
    while (list) {
        NBDExport *next = list->next;
        export_free(list);
        list = next;
    }
}
