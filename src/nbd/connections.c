/*
 * NBD server connections: the life of one client's connection.  Its
 * thread negotiates (handshake.c) and then serves as worker 0; workers take
 * turns at reading one request under recv_lock (the leader/follower
 * pattern described in nbd-internal.h), and a worker that takes a request
 * while no other is idle starts another, up to nbd_srv.max_workers.
 *
 * Contract: a connection is in nbd_srv.clients and counts in
 * nbd_srv.nclients from nbd_client_start until its thread has joined every
 * worker, closed the socket and dropped its export pin (invariants 3 and
 * 4 in nbd-internal.h).  The bytes of requests in flight stay under
 * NBD_MAX_INFLIGHT_BYTES (invariant 5).  A connection still negotiating
 * at its handshake deadline is shut (invariant 7); disconnecting clients
 * takes bounded time (invariant 3).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "nbd/nbd-internal.h"
#include "util/cleanup.h"
#include "util/cutils.h"

#define NBD_KEEP_BUF           (4u * 1024 * 1024)   /* larger buffers are freed after use */
#define NBD_BUF_ALIGN          4096
#define NBD_STOP_GRACE_SEC     5    /* then replies in progress are cut off */

static void mem_cancel(NBDClient *c);

void nbd_client_set_closing(NBDClient *c)
{
    {
        LOCK_GUARD(&c->lock);
        c->closing = true;
        pthread_cond_broadcast(&c->cond);
    }
    mem_cancel(c);
}

/*
 * The daemon-wide budget for request buffers (invariant 8).  `used` counts
 * every byte of every worker buffer, busy or cached.  A request that needs
 * a larger buffer than its worker has is admitted when
 *   - it is first in the FIFO queue (or the queue is empty) and the budget
 *     has room: used + need <= limit ("budget path"), or
 *   - its client has no other request holding a buffer and need <=
 *     NBD_MEM_FREE_PASS ("free pass"); such a buffer is freed when its
 *     request ends.
 * Budget-path buffers never exceed limit in total (each was admitted with
 * room for everything held then), and each client holds at most one
 * free-pass buffer, so used <= limit + connections * NBD_MEM_FREE_PASS.
 * A waiter holds no buffer of its own (it freed its old one) and frees the
 * cached buffers of its client's idle workers, so a waiting client never
 * holds memory that others wait for; a client with nothing in flight always
 * progresses by the free pass.  Waiters wake when memory is freed, when
 * their client stops having requests in flight, and when their connection
 * is closed or shut (mem_cancel).
 */
#define NBD_MEM_FREE_PASS      (1u << 20)
#define NBD_MEM_GRAIN          ((size_t)65536)

typedef struct NBDMemWaiter {
    struct NBDMemWaiter *next;
} NBDMemWaiter;

static struct {
    pthread_mutex_t lock;         /* leaf: everything here, every worker's
                                   * buf/cap/mem_busy/free_pass and every
                                   * client's mem_inflight/mem_cancel */
    pthread_cond_t cond;
    uint64_t limit;
    uint64_t used;
    NBDMemWaiter *queue;          /* FIFO, first = next to admit */
} nbd_mem = {
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .cond = PTHREAD_COND_INITIALIZER,
    .limit = NBD_DEFAULT_MAX_REQUEST_MEMORY,
};

/* Extra worker threads (beyond each connection's own), daemon-wide. */
static unsigned nbd_extra_workers;                 /* atomic */
static unsigned nbd_max_extra_workers = NBD_DEFAULT_MAX_EXTRA_WORKERS;

void nbd_set_resource_limits(uint64_t max_request_memory,
                             unsigned max_extra_workers)
{
    LOCK_GUARD(&nbd_mem.lock);
    nbd_mem.limit = MAX(max_request_memory, (uint64_t)NBD_MAX_PAYLOAD);
    __atomic_store_n(&nbd_max_extra_workers, max_extra_workers, __ATOMIC_RELAXED);
    pthread_cond_broadcast(&nbd_mem.cond);
}

/* Free w's buffer (nbd_mem.lock held; w idle or owned by the caller). */
static void mem_free_locked(NBDWorker *w)
{
    nbd_mem.used -= w->cap;
    free(w->buf);
    w->buf = NULL;
    w->cap = 0;
    w->free_pass = false;
}

/* Free the buffers c's asynchronous writes gave back (nbd_mem.lock). */
static void spares_free_locked(NBDClient *c)
{
    while (c->nspare > 0) {
        c->nspare--;
        nbd_mem.used -= c->spare_cap[c->nspare];
        free(c->spare_buf[c->nspare]);
    }
}

/* Give w a spare buffer of c holding at least len bytes, if there is one
 * (nbd_mem.lock held; w's own, smaller, buffer is freed). */
static bool spare_take_locked(NBDClient *c, NBDWorker *w, size_t len)
{
    for (int i = 0; i < c->nspare; i++) {
        if (c->spare_cap[i] >= len) {
            mem_free_locked(w);
            w->buf = c->spare_buf[i];
            w->cap = c->spare_cap[i];
            c->nspare--;
            c->spare_buf[i] = c->spare_buf[c->nspare];
            c->spare_cap[i] = c->spare_cap[c->nspare];
            return true;
        }
    }
    return false;
}

static void mem_unqueue_locked(NBDMemWaiter *me)
{
    for (NBDMemWaiter **pp = &nbd_mem.queue; *pp; pp = &(*pp)->next) {
        if (*pp == me) {
            *pp = me->next;
            break;
        }
    }
    pthread_cond_broadcast(&nbd_mem.cond);   /* a new first may fit */
}

/* Wake c's worker waiting for memory, if any: its connection is ending. */
static void mem_cancel(NBDClient *c)
{
    LOCK_GUARD(&nbd_mem.lock);
    c->mem_cancel = true;
    pthread_cond_broadcast(&nbd_mem.cond);
}

/* Make w->buf hold len bytes under the budget, waiting as long as needed
 * (recv_lock held).  0, -ECANCELED when the connection is closed or shut
 * while waiting, or -ENOMEM (nothing held then). */
static int mem_acquire(NBDClient *c, NBDWorker *w, size_t len)
{
    if (len == 0) {
        return 0;
    }
    int n;
    {
        LOCK_GUARD(&c->lock);
        n = c->nworkers;
    }
    LOCK_GUARD(&nbd_mem.lock);
    if (len > w->cap && !spare_take_locked(c, w, len)) {
        size_t need = ROUND_UP(MAX(len, NBD_MEM_GRAIN), NBD_MEM_GRAIN);
        NBDMemWaiter me = { NULL };
        bool queued = false;
        mem_free_locked(w);
        for (;;) {
            if (c->mem_cancel) {
                if (queued) {
                    mem_unqueue_locked(&me);
                }
                return -ECANCELED;
            }
            if ((!nbd_mem.queue || nbd_mem.queue == &me) &&
                nbd_mem.used + need <= nbd_mem.limit) {
                break;
            }
            if (c->mem_inflight == 0 && need <= NBD_MEM_FREE_PASS) {
                w->free_pass = true;
                break;
            }
            if (!queued) {
                /* Idle workers of this client cannot touch their buffers
                 * while we hold recv_lock: give their memory back. */
                for (int i = 0; i < n; i++) {
                    if (&c->workers[i] != w && !c->workers[i].mem_busy &&
                        c->workers[i].cap) {
                        mem_free_locked(&c->workers[i]);
                    }
                }
                spares_free_locked(c);
                NBDMemWaiter **pp = &nbd_mem.queue;
                while (*pp) {
                    pp = &(*pp)->next;
                }
                *pp = &me;
                queued = true;
                continue;
            }
            pthread_cond_wait(&nbd_mem.cond, &nbd_mem.lock);
        }
        if (queued) {
            mem_unqueue_locked(&me);
        }
        void *p = NULL;
        if (posix_memalign(&p, NBD_BUF_ALIGN, need) != 0) {
            w->free_pass = false;
            return -ENOMEM;
        }
        w->buf = p;
        w->cap = need;
        nbd_mem.used += need;
    }
    w->mem_busy = true;
    c->mem_inflight++;
    return 0;
}

/* The request of w ended: keep its buffer for the next one only when it is
 * small, not a free pass, and nobody waits for memory. */
static void mem_release(NBDClient *c, NBDWorker *w)
{
    LOCK_GUARD(&nbd_mem.lock);
    if (w->mem_busy) {
        w->mem_busy = false;
        c->mem_inflight--;
    }
    if (w->free_pass || w->cap > NBD_KEEP_BUF || nbd_mem.queue ||
        nbd_mem.used > nbd_mem.limit) {
        mem_free_locked(w);
    }
    if (nbd_mem.queue) {
        pthread_cond_broadcast(&nbd_mem.cond);
    }
}

static void *worker_main(void *opaque);

/* Count one more extra worker if the daemon-wide cap allows it. */
static bool extra_worker_get(void)
{
    unsigned cur = __atomic_load_n(&nbd_extra_workers, __ATOMIC_RELAXED);
    do {
        if (cur >= __atomic_load_n(&nbd_max_extra_workers, __ATOMIC_RELAXED)) {
            return false;
        }
    } while (!__atomic_compare_exchange_n(&nbd_extra_workers, &cur, cur + 1,
                                          false, __ATOMIC_RELAXED,
                                          __ATOMIC_RELAXED));
    return true;
}

static void extra_worker_put(void)
{
    __atomic_fetch_sub(&nbd_extra_workers, 1, __ATOMIC_RELAXED);
}

/* Start one more worker if every current one is busy and both the
 * connection's and the daemon's caps allow it (c->lock held).  At a cap
 * the connection goes on with the workers it has. */
static void maybe_spawn_worker_locked(NBDClient *c)
{
    if (c->closing || c->busy < c->nworkers || c->nworkers >= nbd_srv.max_workers ||
        !extra_worker_get()) {
        return;
    }
    NBDWorker *w = &c->workers[c->nworkers];
    *w = (NBDWorker){ .c = c };
    if (pthread_create(&w->thread, NULL, worker_main, w) == 0) {
        c->nworkers++;
    } else {
        extra_worker_put();
    }
}

/* A request leaves: give back its budget and its busy count (c->lock
 * held). */
static void request_drop_locked(NBDClient *c, const NBDRequest *req)
{
    c->inflight_bytes -= req->budget;
    c->busy--;
    pthread_cond_broadcast(&c->cond);
}

static bool client_is_closing(NBDClient *c)
{
    LOCK_GUARD(&c->lock);
    return c->closing;
}

/* An asynchronous write (invariant 9): it owns the buffer its worker
 * read the payload into, and holds its budget until its completion. */
typedef struct NBDAsyncWrite {
    NBDClient *c;
    NBDRequest req;
    uint8_t *buf;
    size_t cap;
    bool free_pass;
} NBDAsyncWrite;

/* The node's completion (the driver's thread, or the reader on an
 * immediate failure): reply without waiting, then give back the buffer,
 * the budget and the place in c->async. */
static void async_write_done(void *opaque, int r)
{
    NBDAsyncWrite *a = opaque;
    NBDClient *c = a->c;
    uint8_t reply[NBD_DEFERRED_MAX];

    nbd_client_send_nowait(c, reply, nbd_write_reply(c, &a->req, r, reply));
    {
        /* Kept for the next request on the terms of mem_release. */
        LOCK_GUARD(&nbd_mem.lock);
        c->mem_inflight--;
        if (!a->free_pass && a->cap <= NBD_KEEP_BUF && !nbd_mem.queue &&
            nbd_mem.used <= nbd_mem.limit && !c->mem_cancel &&
            c->nspare < NBD_ASYNC_SPARES) {
            c->spare_buf[c->nspare] = a->buf;
            c->spare_cap[c->nspare++] = a->cap;
        } else {
            nbd_mem.used -= a->cap;
            free(a->buf);
        }
        if (nbd_mem.queue) {
            pthread_cond_broadcast(&nbd_mem.cond);
        }
    }
    LOCK_GUARD(&c->lock);
    c->inflight_bytes -= a->req.budget;
    c->async--;
    pthread_cond_broadcast(&c->cond);
    free(a);
}

/* Submit a received write asynchronously if it may go so (recv_lock
 * held).  1: taken (w no longer holds the request nor its buffer); 0: it
 * goes the normal way, w unchanged. */
static int try_write_async(NBDClient *c, NBDWorker *w, const NBDRequest *req)
{
    if (!nbd_write_async_ok(c, req) || !w->mem_busy ||
        !bdrv_can_aio_pwritev(c->exp->bs)) {
        return 0;
    }
    NBDAsyncWrite *a = malloc(sizeof(*a));
    if (!a) {
        return 0;
    }
    bool free_pass;
    {
        LOCK_GUARD(&nbd_mem.lock);
        *a = (NBDAsyncWrite){ .c = c, .req = *req, .buf = w->buf,
                              .cap = w->cap };
        free_pass = w->free_pass;
        a->free_pass = free_pass;
        w->buf = NULL;
        w->cap = 0;
        w->mem_busy = false;
        w->free_pass = false;
    }
    {
        /* Before the submission: the completion may run before it
         * returns. */
        LOCK_GUARD(&c->lock);
        c->busy--;
        c->async++;
    }
    struct iovec iov = { .iov_base = a->buf, .iov_len = req->len };
    int r = bdrv_client_aio_pwritev(c->exp->bs, req->offset, req->len, &iov,
                                    1, async_write_done, a);
    if (r < 0) {
        async_write_done(a, r);
    }
    if (r != 0) {
        return 1;
    }
    {
        LOCK_GUARD(&nbd_mem.lock);
        w->buf = a->buf;
        w->cap = a->cap;
        w->mem_busy = true;
        w->free_pass = free_pass;
    }
    {
        LOCK_GUARD(&c->lock);
        c->busy++;
        c->async--;
    }
    free(a);
    return 0;
}

/* The deferred-reply sender of a connection (invariant 9). */
static void *flusher_main(void *opaque)
{
    NBDClient *c = opaque;
    for (;;) {
        nbd_client_flush_deferred(c);
        LOCK_GUARD(&c->lock);
        /* Under c->lock, where a kick looks at flusher_running: a reply
         * deferred after this check finds the flag false and starts a
         * new sender. */
        if (nbd_client_deferred_empty(c)) {
            c->flusher_running = false;
            c->async--;
            pthread_cond_broadcast(&c->cond);
            return NULL;
        }
    }
}

void nbd_client_kick_flusher(NBDClient *c)
{
    LOCK_GUARD(&c->lock);
    if (c->flusher_running) {
        return;
    }
    pthread_attr_t attr;
    pthread_t t;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    c->flusher_running = true;
    c->async++;
    if (pthread_create(&t, &attr, flusher_main, c) != 0) {
        /* Deferred replies could never be sent: end the connection. */
        c->flusher_running = false;
        c->async--;
        c->closing = true;
        pthread_cond_broadcast(&c->cond);
        shutdown(c->fd, SHUT_RDWR);
    }
    pthread_attr_destroy(&attr);
}

/* Read the next request under recv_lock.  Returns 1 with *req filled (and
 * its payload in w->buf), or 0 when the connection is closing.  A request
 * is dispatched (answered inline, or returned) only if the connection was
 * not closing once it was read: a hard export delete marks it closing
 * (invariant 3), and nothing that arrives after that may run. */
static int receive_request(NBDClient *c, NBDWorker *w, NBDRequest *req)
{
    LOCK_GUARD(&c->recv_lock);
next:
    if (client_is_closing(c)) {
        return 0;
    }
    uint8_t h[NBD_REQUEST_SIZE];
    errno = 0;
    if (nbd_client_recv(c, h, sizeof(h)) < 0) {
        if (errno) {
            nbd_client_note_close(c, LOG_LEVEL_WARNING, "I/O error: %s",
                                  strerror(errno));
        } else {
            nbd_client_note_close(c, LOG_LEVEL_NOTICE,
                                  "closed the connection without NBD_CMD_DISC");
        }
        nbd_client_set_closing(c);
        return 0;
    }
    if (ld_be32(h) != NBD_REQUEST_MAGIC) {
        nbd_client_note_close(c, LOG_LEVEL_WARNING, "protocol error: bad "
                              "request magic 0x%08x", ld_be32(h));
        nbd_client_set_closing(c);
        return 0;
    }
    if (client_is_closing(c)) {
        return 0;   /* cut off while it came in: never answer it inline */
    }
    *req = (NBDRequest){
        .flags = ld_be16(h + 4),
        .type = ld_be16(h + 6),
        .handle = ld_be64(h + 8),
        .offset = ld_be64(h + 16),
        .len = ld_be32(h + 24),
    };
    if (nbd_try_read_inline(c, w, req)) {
        goto next;
    }
    if (req->type == NBD_CMD_DISC) {
        nbd_client_set_closing(c);
        return 0;
    }
    if (req->type == NBD_CMD_WRITE && req->len > NBD_MAX_PAYLOAD) {
        /* Skipping up to 4 GiB is not worth it: drop the client. */
        nbd_client_note_close(c, LOG_LEVEL_WARNING, "protocol error: write "
                              "of %u bytes (at most %u)", req->len,
                              (unsigned)NBD_MAX_PAYLOAD);
        nbd_client_set_closing(c);
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
    int r = mem_acquire(c, w, req->budget);
    if (r == -ECANCELED) {
        goto drop;
    }
    req->early_err = r < 0 ? -r : 0;
    if (req->type == NBD_CMD_WRITE && req->len > 0) {
        errno = 0;
        int rr = r < 0 ? nbd_client_recv_discard(c, req->len)
                       : nbd_client_recv(c, w->buf, req->len);
        if (rr < 0) {
            nbd_client_note_close(c, LOG_LEVEL_WARNING, "I/O error: the "
                                  "payload of a write was cut short: %s",
                                  errno ? strerror(errno) : "end of file");
            goto drop;
        }
    }
    if (!client_is_closing(c) && try_write_async(c, w, req)) {
        goto next;
    }
    {
        LOCK_GUARD(&c->lock);
        if (!c->closing) {
            maybe_spawn_worker_locked(c);
            return 1;
        }
    }
    /* Cut off while its payload came in: never run it. */

drop:
    /* Disconnected or cut off before the request was whole: it was never
     * accepted. */
    mem_release(c, w);
    LOCK_GUARD(&c->lock);
    c->closing = true;
    request_drop_locked(c, req);
    return 0;
}

static void worker_loop(NBDWorker *w)
{
    NBDClient *c = w->c;
    NBDRequest req;
    while (receive_request(c, w, &req)) {
        nbd_handle_request(c, w, &req);
        mem_release(c, w);
        LOCK_GUARD(&c->lock);
        request_drop_locked(c, &req);
    }
}

/* An extra worker's place under the daemon-wide cap is given back by
 * client_main once the thread is joined, not when its loop ends: a
 * thread still exiting is still a thread. */
static void *worker_main(void *opaque)
{
    worker_loop(opaque);
    return NULL;
}

static void client_free(NBDClient *c)
{
    pthread_mutex_destroy(&c->recv_lock);
    pthread_mutex_destroy(&c->send_lock);
    pthread_mutex_destroy(&c->defer_lock);
    while (c->defer_head) {
        NBDDeferred *d = c->defer_head;
        c->defer_head = d->next;
        free(d);
    }
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->cond);
    free(c->bitmap_ids);
    free(c->rbuf);
    tls_session_free(c->tls);
    free(c);
}

/* Take c out of nbd_srv.clients, close its socket, drop its export pin
 * and free it (the end of a connection, invariants 3 and 4). */
static void client_remove(NBDClient *c)
{
    pthread_mutex_lock(&nbd_srv.lock);
    for (NBDClient **pp = &nbd_srv.clients; *pp; pp = &(*pp)->next) {
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    }
    close(c->fd);
    bool reap = nbd_export_unpin_locked(c);
    nbd_srv.nclients--;
    pthread_cond_broadcast(&nbd_srv.cond);
    pthread_mutex_unlock(&nbd_srv.lock);
    client_free(c);
    if (reap) {
        nbd_exports_reap_later();
    }
}

void nbd_client_note_close(NBDClient *c, LogLevel level, const char *fmt, ...)
{
    LOCK_GUARD(&c->lock);
    if (c->close_reason[0] || c->closing) {
        return;    /* the first reason, and none once the server closes */
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->close_reason, sizeof(c->close_reason), fmt, ap);
    va_end(ap);
    c->close_level = level;
}

/* The peer's address for the log (nbd_srv.lock held): the server's socket
 * path for a UNIX connection (its peer has no name), IP:PORT for TCP. */
static void client_peer_name_locked(NBDClient *c)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    char host[INET6_ADDRSTRLEN];
    snprintf(c->peer, sizeof(c->peer), "unknown");
    if (!c->inet) {
        snprintf(c->peer, sizeof(c->peer), "unix:%.120s",
                 nbd_srv.unix_path ? nbd_srv.unix_path : "(inherited socket)");
        return;
    }
    if (getpeername(c->fd, (struct sockaddr *)&ss, &len) < 0) {
        return;
    }
    if (ss.ss_family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)&ss;
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
        snprintf(c->peer, sizeof(c->peer), "%s:%u", host, ntohs(in->sin_port));
    } else if (ss.ss_family == AF_INET6) {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
        snprintf(c->peer, sizeof(c->peer), "[%s]:%u", host,
                 ntohs(in6->sin6_port));
    }
}

/* The connection's last log line: why it ended and which export it used. */
static void client_log_close(NBDClient *c, bool transmitted)
{
    const char *exp = transmitted && c->exp ? c->exp->name : NULL;
    char where[160] = "";
    if (exp) {
        snprintf(where, sizeof(where), " (export '%s')", exp);
    }
    if (c->close_reason[0] && !transmitted) {
        log_msg(c->close_level, "NBD client %s disconnected during the "
                "handshake: %s", c->peer, c->close_reason);
    } else if (c->close_reason[0]) {
        log_msg(c->close_level, "NBD client %s%s disconnected: %s", c->peer,
                where, c->close_reason);
    } else if (transmitted) {
        log_msg(LOG_LEVEL_INFO, "NBD client %s%s disconnected", c->peer, where);
    } else {
        log_msg(LOG_LEVEL_INFO, "NBD client %s disconnected during the "
                "handshake", c->peer);
    }
}

/* The connection thread: negotiate, serve as worker 0, then wait for the
 * other workers (each answers its request first) and close. */
static void *client_main(void *opaque)
{
    NBDClient *c = opaque;
    bool transmitted = false;
    c->workers[0] = (NBDWorker){ .c = c, .thread = pthread_self() };
    c->nworkers = 1;
    c->rbuf = malloc(NBD_RECV_BUF);
    if (c->rbuf && nbd_negotiate(c) == OPT_TRANSMIT) {
        {
            LOCK_GUARD(&nbd_srv.lock);
            c->handshake_deadline_ns = 0;   /* invariant 7 no longer applies */
        }
        transmitted = true;
        log_msg(LOG_LEVEL_INFO, "NBD client %s opened export '%s'%s", c->peer,
                c->exp->name, c->exp->writable ? " (writable)" : "");
        worker_loop(&c->workers[0]);
    }
    nbd_client_set_closing(c);
    int n;
    {
        LOCK_GUARD(&c->lock);
        n = c->nworkers;
    }
    for (int i = 1; i < n; i++) {
        pthread_join(c->workers[i].thread, NULL);
        extra_worker_put();
    }
    {
        /* Asynchronous writes end in their node (bounded like any
         * request), and the sender of deferred replies with the socket's
         * send timeout (invariant 9). */
        LOCK_GUARD(&c->lock);
        while (c->async > 0) {
            pthread_cond_wait(&c->cond, &c->lock);
        }
    }
    for (int i = 0; i < n; i++) {
        LOCK_GUARD(&nbd_mem.lock);
        mem_free_locked(&c->workers[i]);
    }
    {
        LOCK_GUARD(&nbd_mem.lock);
        spares_free_locked(c);
    }

    client_log_close(c, transmitted);
    client_remove(c);
    return NULL;
}

/* A new connection for the socket fd (owned from here on), counted in
 * nbd_srv.clients and nclients, with its handshake deadline set; NULL
 * (fd closed) when over max_connections or out of memory. */
static NBDClient *client_add(int fd, bool inet)
{
    nbd_socket_setup(fd, inet);

    NBDClient *c = calloc(1, sizeof(*c));
    if (!c) {
        close(fd);
        return NULL;
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
    pthread_mutex_init(&c->defer_lock, NULL);
    pthread_cond_init(&c->cond, NULL);

    LOCK_GUARD(&nbd_srv.lock);
    client_peer_name_locked(c);
    if (nbd_srv.max_connections && nbd_srv.nclients >= nbd_srv.max_connections) {
        log_msg(LOG_LEVEL_WARNING, "NBD client %s refused: already %u "
                "connections (max-connections)", c->peer, nbd_srv.nclients);
        close(fd);
        client_free(c);
        return NULL;
    }
    if (nbd_srv.handshake_max_ns) {
        c->handshake_deadline_ns = clock_monotonic_ns() + nbd_srv.handshake_max_ns;
    }
    c->tls_creds = nbd_srv.tls_creds;
    c->tls_authz = nbd_srv.tls_authz;
    c->next = nbd_srv.clients;
    nbd_srv.clients = c;
    nbd_srv.nclients++;
    return c;
}

void nbd_client_start(int fd, bool inet)
{
    NBDClient *c = client_add(fd, inet);
    if (!c) {
        return;
    }
    log_msg(LOG_LEVEL_INFO, "NBD client %s connected", c->peer);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t t;
    if (pthread_create(&t, &attr, client_main, c) != 0) {
        client_remove(c);
    }
    pthread_attr_destroy(&attr);
}

void nbd_server_serve_fd(int fd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    bool inet = getsockname(fd, (struct sockaddr *)&ss, &len) == 0 &&
                (ss.ss_family == AF_INET || ss.ss_family == AF_INET6);
    NBDClient *c = client_add(fd, inet);
    if (c) {
        client_main(c);
    }
}

uint64_t nbd_clients_expire_handshakes(void)
{
    uint64_t now = clock_monotonic_ns();
    uint64_t next = 0;
    LOCK_GUARD(&nbd_srv.lock);
    for (NBDClient *c = nbd_srv.clients; c; c = c->next) {
        if (!c->handshake_deadline_ns) {
            continue;
        }
        if (c->handshake_deadline_ns <= now) {
            /* Unblocks the connection thread's recv() or send(); it then
             * ends the connection as on EOF and frees its slot. */
            nbd_client_note_close(c, LOG_LEVEL_WARNING, "handshake not "
                                  "finished within handshake-max-seconds");
            shutdown(c->fd, SHUT_RDWR);
            c->handshake_deadline_ns = 0;
        } else if (!next || c->handshake_deadline_ns < next) {
            next = c->handshake_deadline_ns;
        }
    }
    return next;
}

/* Shut the socket of every connection. */
static void clients_shutdown_locked(int how)
{
    for (NBDClient *c = nbd_srv.clients; c; c = c->next) {
        shutdown(c->fd, how);
        mem_cancel(c);   /* a request waiting for memory goes too */
    }
}

void nbd_clients_cut_off_locked(const NBDExport *e)
{
    for (NBDClient *c = nbd_srv.clients; c; c = c->next) {
        if (c->exp == e) {
            /* closing first: whatever the socket still holds is never
             * dispatched (invariant 3); it also wakes a request waiting
             * for memory. */
            nbd_client_set_closing(c);
            shutdown(c->fd, SHUT_RDWR);
        }
    }
}

void nbd_clients_disconnect_locked(const unsigned *count)
{
    /* Requests already read are answered first (invariant 3)... */
    clients_shutdown_locked(SHUT_RD);
    struct timespec grace;
    clock_gettime(CLOCK_REALTIME, &grace);   /* nbd_srv.cond's clock */
    grace.tv_sec += NBD_STOP_GRACE_SEC;
    while (*count > 0) {
        if (pthread_cond_timedwait(&nbd_srv.cond, &nbd_srv.lock,
                                   &grace) == ETIMEDOUT) {
            break;
        }
    }
    /* ...but a peer that reads a large reply slowly, or not at all until
     * the send timeout, must not hold the stop up: cut its replies off. */
    if (*count > 0) {
        clients_shutdown_locked(SHUT_RDWR);
    }
    while (*count > 0) {
        pthread_cond_wait(&nbd_srv.cond, &nbd_srv.lock);
    }
}
