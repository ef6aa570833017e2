/*
 * NBD server internals, shared by the files of the server
 * (NetworkBlockDevice/nbd doc/proto.md): one listening socket, named
 * exports of block nodes, fixed newstyle negotiation, simple and structured
 * replies, and the base:allocation and qemu:dirty-bitmap:NAME metadata
 * contexts (the latter with qemu-nbd -B semantics: flag 1 = dirty).  The
 * public API is server.h; the wire constants are nbd-proto.h.
 *
 * The files, split the way nbdkit splits its server/ folder, each answering
 * one question:
 *   socket-io.c    how bytes cross the socket: whole reads and writes,
 *                  the buffered and busy-polled transmission-phase reads,
 *                  one whole reply under send_lock, socket options
 *   exports.c      which exports exist: add, find, pin, delete, query
 *   handshake.c    the newstyle negotiation: every NBD_OPT_*
 *   protocol.c     what a request does: request checks, simple and
 *                  structured replies, reads (inline or not), writes,
 *                  errno to NBD error mapping
 *   extents.c      NBD_CMD_BLOCK_STATUS: base:allocation and
 *                  qemu:dirty-bitmap:NAME extents
 *   connections.c  a client's connection: its thread, its workers, the
 *                  receiver that reads one request at a time
 *   listen.c       the server state, the listening socket, the accept
 *                  thread, server start and stop
 *
 * Threads.  An accept thread hands every connection to a thread of its own,
 * which negotiates and then becomes worker 0 of that connection.  Workers
 * follow the leader/follower pattern: a worker takes the connection's
 * recv_lock, reads ONE request (header and, for writes, payload), drops the
 * lock, runs the request against the node and sends the reply under the
 * connection's send_lock.  When a worker takes a request and no other worker
 * is idle, it starts another one (up to 4 per CPU, 8..32, and up to the
 * daemon-wide cap of invariant 8), so several
 * requests of one client run in parallel without a hand-off queue and
 * without any lock shared between connections on the data path.  Each
 * worker owns a reusable buffer; no request allocates memory of its own
 * except block status replies, and an asynchronous write (invariant 9),
 * which takes its worker's buffer with it (still counted in the budget of
 * invariant 8 until it ends).
 *
 * Small reads (up to NBD_INLINE_READ_MAX) are first tried with
 * BDRV_REQ_NOWAIT: when the data is in the page cache, the worker that read
 * the request answers it on the spot and goes on reading, with no hand-off
 * to another thread.  A hand-off (a futex wake and a context switch) costs
 * more than a cached 4 KiB read, and on a small machine the extra wake-ups
 * steal CPU from the client.  A read that would wait for the disk goes the
 * normal way, so a cold read never stalls the connection's other requests.
 *
 * Invariants (the server's files cite them as "invariant N"):
 *  1. Only the worker holding recv_lock reads the socket; all writes to the
 *     socket happen under send_lock, one whole reply (all chunks) at a time.
 *     On a TLS connection the same locks guard the TLS session's
 *     gnutls_record_recv and gnutls_record_send (GnuTLS allows one thread
 *     in each at once); the session is made by STARTTLS on the connection
 *     thread before any other worker exists, and freed after all joined.
 *  2. A reply is sent only after the node call returned, so an answered
 *     write is in the node (and in its dirty bitmaps, block.c invariant).
 *  3. A connection ends (closing = true) on EOF, NBD_CMD_DISC, a protocol
 *     violation (bad magic, oversized write payload), a failed send, or a
 *     shutdown(SHUT_RD) from nbd_server_stop.  Requests already read
 *     still run and are answered before the socket closes.  A hard
 *     nbd_export_del cuts its clients off at once instead: it marks them
 *     closing under c->lock and shuts their sockets both ways, so no
 *     request is dispatched after that (the receiver checks closing under
 *     c->lock after reading a request and before running it); requests
 *     already running finish in the node, their replies are dropped.
 *     nbd_server_stop shuts the sockets of connections still open
 *     NBD_STOP_GRACE_SEC later both ways (SHUT_RDWR): a reply still being
 *     sent to a slow reader is cut off (the write it answers is in the
 *     node already, invariant 2), so stopping takes bounded time.
 *  4. A connection counts in an export's nclients exactly while c->exp
 *     points to it (both change together under nbd_srv.lock): from
 *     nbd_export_pin (NBD_OPT_INFO, GO, EXPORT_NAME, the META options)
 *     until the option ends, and from GO (or EXPORT_NAME) on until its
 *     socket is closed.  So every connection using an export, at any
 *     stage of negotiation or transmission, is found by walking
 *     nbd_srv.clients for c->exp == e.  An export is freed only when
 *     nclients is 0, so no connection ever sees a freed export.  A
 *     removed export that still has connections stays in the list as
 *     "shutting down" (removing: no new pins, no GO completes on it); the
 *     connection that drops the last pin schedules its freeing on the
 *     main thread (nbd_exports_reap), which also emits
 *     BLOCK_EXPORT_DELETED.  Nothing ever waits for a connection's
 *     thread to free an export, so the monitor never waits on a client.
 *  5. Payload and option sizes are checked against NBD_MAX_PAYLOAD and
 *     NBD_MAX_OPT_PAYLOAD before anything is allocated; the bytes of
 *     requests in flight on one connection stay under
 *     NBD_MAX_INFLIGHT_BYTES (one oversized request may run alone), and
 *     of all connections under the budget of invariant 8.
 *  6. A request answered inline (under recv_lock) never waits for the disk
 *     (BDRV_REQ_NOWAIT) or for another request; recv_lock is taken before
 *     send_lock, never the other way round.
 *  7. A connection that has not finished negotiating handshake_max_ns
 *     after it was accepted is shut (SHUT_RDWR) by the accept thread, so
 *     idle or trickling sockets cannot hold max_connections slots; the
 *     connection ends and frees its slot as on EOF.  A connection over
 *     max_connections is closed at accept, never queued.
 *  8. Memory and threads are bounded daemon-wide.  Every worker buffer
 *     (busy or cached, and the spares of invariant 9) counts in the
 *     request-memory budget
 *     (--nbd-max-request-memory, at least NBD_MAX_PAYLOAD); a request
 *     needing a larger buffer WAITS, never fails: FIFO for the budget, or
 *     at once by the free pass (its client has no other request holding a
 *     buffer and it needs at most 1 MiB; that buffer is freed after the
 *     request).  So buffers stay under budget + connections x 1 MiB, a
 *     client with nothing in flight always progresses, and a waiter holds
 *     no buffer (its client's idle caches are freed when it queues).  A
 *     connection closed or shut while it waits stops waiting and ends; its
 *     request, never accepted, is not answered.  Extra workers (beyond
 *     each connection's thread) are capped daemon-wide
 *     (--nbd-max-workers): threads <= connections + cap + fixed ones.
 *  9. A plain write to a node that can write asynchronously
 *     (bdrv_client_aio_pwritev: an RBD image) is submitted by the worker
 *     that read it, still under recv_lock (it never waits: the write
 *     intent is durable already and no hook runs, else it goes the normal
 *     way), which then reads the next request; no hand-off, no thread
 *     waiting per request.  The request keeps its buffer, its budget and
 *     its place in c->async until the node's completion, which runs in
 *     the driver's thread, replies, and releases them.  That thread serves
 *     every request of the image, so it never waits on a client: it sends
 *     its reply only if it gets send_lock at once and the socket takes
 *     the bytes without blocking; otherwise the reply is deferred (a list
 *     under defer_lock), and the holder of send_lock sends deferred
 *     replies first and checks the list again after unlocking.  Where the
 *     socket was full, one sender thread of the connection waits for room
 *     (counted in c->async).  So a peer that stops reading stalls only
 *     itself, and until the send timeout.  TLS connections write
 *     synchronously.
 *
 * Only protocol.c maps errno values to NBD error codes.
 */
#ifndef BITBACK_NBD_INTERNAL_H
#define BITBACK_NBD_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "crypto/authz.h"
#include "crypto/tls-creds.h"
#include "nbd/server.h"
#include "nbd/nbd-proto.h"
#include "util/log.h"

#define NBD_MAX_PAYLOAD        (32u * 1024 * 1024)  /* read/write data */
#define NBD_MAX_OPT_PAYLOAD    (64u * 1024)         /* option data */
#define NBD_MAX_WORKERS        32                   /* per connection, at most */
#define NBD_MAX_INFLIGHT_BYTES (UINT64_C(256) * 1024 * 1024)
#define NBD_RECV_BUF           (64 * 1024)          /* buffered request headers */
#define NBD_ASYNC_SPARES       8                    /* kept buffers per connection */

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
    unsigned nclients;            /* connections pinning it (nbd_srv.lock) */
    /* Shutting down (nbd_srv.lock): hidden from new connections, never
     * entered by a GO; freed once nclients is 0 (invariant 4). */
    bool removing;
    uint64_t serial;              /* unique per export ever added */
    NBDExport *next;
};

typedef struct NBDClient NBDClient;

typedef struct NBDWorker {
    NBDClient *c;
    pthread_t thread;
    uint8_t *buf;                 /* NBD_BUF_ALIGN aligned; counted in the */
    size_t cap;                   /* budget (invariant 8) */
    bool mem_busy;                /* buf holds a request's data */
    bool free_pass;               /* buf was admitted over the budget */
} NBDWorker;

/* A small reply (a write's) that a thread which must not wait could not
 * send at once; sent, oldest first, by the next holder of send_lock. */
#define NBD_DEFERRED_MAX       64
typedef struct NBDDeferred {
    struct NBDDeferred *next;
    uint16_t len, off;            /* off: bytes already sent */
    uint8_t data[NBD_DEFERRED_MAX];
} NBDDeferred;

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
    /* TLS: the server's credentials (NULL: plaintext) and authz, fixed
     * for the connection's life; tls is the session once STARTTLS is done
     * (set by the connection thread before any worker exists).  Every
     * byte after STARTTLS goes through it (socket-io.c). */
    const TLSCreds *tls_creds;
    const Authz *tls_authz;
    TLSSession *tls;
    NBDClient *next;              /* nbd_srv.clients */
    /* CLOCK_MONOTONIC ns by which negotiation must end (invariant 7);
     * 0 once it ended or when there is no limit (nbd_srv.lock). */
    uint64_t handshake_deadline_ns;

    /* Negotiated state (fixed once transmission starts). */
    /* The export pinned (counted in its nclients, invariant 4); set and
     * cleared under nbd_srv.lock; fixed from GO on, so the data path reads
     * it without the lock. */
    NBDExport *exp;
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
    /* Replies deferred by nbd_client_send_nowait (invariant 9): appended
     * under defer_lock (a leaf), sent and removed only by the holder of
     * send_lock, head first.  defer_head is stored with release order, so
     * "is anything deferred?" is one atomic load (every reply asks it). */
    pthread_mutex_t defer_lock;
    NBDDeferred *defer_head, *defer_tail;

    pthread_mutex_t lock;         /* the fields below */
    pthread_cond_t cond;
    bool closing;
    int nworkers;
    int busy;                     /* workers holding a request */
    /* Asynchronous writes in flight plus a running deferred-reply sender
     * (invariant 9); the connection ends only once it is 0. */
    int async;
    bool flusher_running;
    uint64_t inflight_bytes;
    NBDWorker workers[NBD_MAX_WORKERS];
    /* Guarded by the request-memory lock of connections.c (invariant 8). */
    int mem_inflight;             /* workers with mem_busy, and
                                   * asynchronous writes */
    bool mem_cancel;              /* closed or shut: stop waiting */
    /* Buffers asynchronous writes gave back (invariant 9), counted in the
     * budget like a worker's cached buffer, for the next request that
     * needs one: no allocation (and no page faults) per write. */
    uint8_t *spare_buf[NBD_ASYNC_SPARES];
    size_t spare_cap[NBD_ASYNC_SPARES];
    int nspare;

    /* For the log: the peer ("unix:PATH" of the server socket, or
     * "IP:PORT"), fixed at accept; and why the connection ends, the first
     * reason noted (c->lock; empty: a clean NBD_CMD_DISC or the server's
     * own close) at close_level. */
    char peer[128];
    char close_reason[160];
    LogLevel close_level;
};

/* Note why c ends (the first reason wins), logged at `level` when the
 * connection closes (connections.c). */
void nbd_client_note_close(NBDClient *c, LogLevel level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* The one server of the process (defined in listen.c). */
typedef struct NBDServer {
    pthread_mutex_t lock;         /* everything here */
    pthread_cond_t cond;          /* nclients / exp->nclients changes */
    bool running;
    int listen_fd;
    int wake_pipe[2];
    pthread_t accept_thread;
    char *unix_path;              /* to unlink on stop */
    bool inet;
    unsigned max_connections;     /* 0: unlimited */
    uint64_t handshake_max_ns;    /* 0: no handshake deadline */
    unsigned nclients;
    NBDClient *clients;
    NBDExport *exports;
    uint64_t next_serial;
    int max_workers;              /* per connection, set at start */
    /* TLS (NULL: plaintext), referenced from start to stop; a connection
     * copies them when it is added and ends before stop drops them. */
    TLSCreds *tls_creds;
    Authz *tls_authz;
} NBDServer;

extern NBDServer nbd_srv;

/* Results of option handlers and of nbd_negotiate. */
enum { OPT_CONTINUE = 0, OPT_TRANSMIT = 1, OPT_CLOSE = -1 };

/* socket-io.c.  Reads and writes return 0, or -1 on EOF or error. */
int nbd_recv_full(int fd, void *buf, size_t len);
int nbd_send_iov(int fd, struct iovec *iov, int niov);
int nbd_send_buf(int fd, const void *buf, size_t len);
/* The same on a connection: on its TLS session once there is one, on its
 * socket before (the handshake uses these). */
int nbd_conn_recv_full(NBDClient *c, void *buf, size_t len);
int nbd_conn_send_iov(NBDClient *c, struct iovec *iov, int niov);
int nbd_conn_send_buf(NBDClient *c, const void *buf, size_t len);
/* Transmission phase, recv_lock held (invariant 1). */
int nbd_client_recv(NBDClient *c, void *dst, size_t len);
int nbd_client_recv_discard(NBDClient *c, uint64_t len);
/* One whole reply under send_lock; a failed send ends the connection. */
void nbd_client_send(NBDClient *c, struct iovec *iov, int niov);
/* The same for a reply of at most NBD_DEFERRED_MAX bytes, from a thread
 * that must never wait for the socket or for send_lock (invariant 9). */
void nbd_client_send_nowait(NBDClient *c, const void *reply, size_t len);
/* connections.c: keep c alive (c->async) while a thread of
 * nbd_client_send_nowait's sends what is deferred, waiting as long as
 * needed; at most one such thread per connection. */
void nbd_client_kick_flusher(NBDClient *c);
/* The sender thread's one round (socket-io.c): send every deferred reply,
 * waiting for room.  More may be deferred meanwhile: the sender stops
 * only when nbd_client_deferred_empty (an atomic load, no lock) says so
 * under c->lock. */
void nbd_client_flush_deferred(NBDClient *c);
bool nbd_client_deferred_empty(NBDClient *c);
void nbd_socket_setup(int fd, bool inet);

/* exports.c.  pin/unpin count c as a user of an export in c->exp
 * (invariant 4); c pins at most one at a time.  nbd_export_pin returns
 * NULL (and pins nothing) when no export that is not shutting down has
 * that name. */
NBDExport *nbd_export_pin(NBDClient *c, const char *name);
void nbd_export_unpin(NBDClient *c);
/* As nbd_export_unpin, nbd_srv.lock held.  Returns true when c was the
 * last user of an export that is shutting down: the caller must then call
 * nbd_exports_reap_later() after dropping the lock. */
bool nbd_export_unpin_locked(NBDClient *c);
/* Schedule the freeing of the shut-down exports nobody pins any more on
 * the main thread (which emits BLOCK_EXPORT_DELETED for each). */
void nbd_exports_reap_later(void);
/* False once e is shutting down (takes nbd_srv.lock). */
bool nbd_export_is_open(NBDExport *e);
void nbd_export_free(NBDExport *e);
/* The end of a removed export (main thread, unlinked, no pins): free it
 * (the node reference, the bitmaps' busy marks) and say so, as QEMU's
 * BLOCK_EXPORT_DELETED {"id": ...}. */
void nbd_export_finish(NBDExport *e);

/* handshake.c: OPT_TRANSMIT with c->exp pinned, or OPT_CLOSE. */
int nbd_negotiate(NBDClient *c);

/* protocol.c */
void nbd_put_chunk_header(uint8_t *p, uint16_t flags, uint16_t type,
                          uint64_t handle, uint32_t len);
void nbd_reply_error(NBDClient *c, const NBDRequest *req, int err,
                     const char *msg);
bool nbd_in_bounds(const NBDClient *c, const NBDRequest *req);
bool nbd_try_read_inline(NBDClient *c, NBDWorker *w, const NBDRequest *req);
void nbd_handle_request(NBDClient *c, NBDWorker *w, const NBDRequest *req);
/* Whether req is a write that may go asynchronously (invariant 9):
 * a plain, valid write with data, on a connection without TLS. */
bool nbd_write_async_ok(const NBDClient *c, const NBDRequest *req);
/* The reply to a write that ended with r (0 or -errno), into buf (at least
 * NBD_DEFERRED_MAX bytes); returns its length. */
size_t nbd_write_reply(const NBDClient *c, const NBDRequest *req, int r,
                       uint8_t *buf);

/* extents.c: answer NBD_CMD_BLOCK_STATUS. */
void nbd_do_block_status(NBDClient *c, const NBDRequest *req);

/* connections.c */
void nbd_client_set_closing(NBDClient *c);
/* Serve an accepted socket (owned from here on) on a thread of its own. */
void nbd_client_start(int fd, bool inet);
/* Shut every connection whose handshake deadline is past (invariant 7)
 * and return the nearest deadline still ahead, 0 if none (accept thread). */
uint64_t nbd_clients_expire_handshakes(void);
/* Disconnect every connection and wait, nbd_srv.lock held, until
 * *count is 0 (invariant 3: bounded). */
void nbd_clients_disconnect_locked(const unsigned *count);
/* Cut off, at once, every connection that pins e (at any stage,
 * invariant 4): mark it closing and shut its socket both ways
 * (invariant 3).  Does not wait (nbd_srv.lock held; takes c->lock). */
void nbd_clients_cut_off_locked(const NBDExport *e);

#endif
