/*
 * The NBD server: listens on one UNIX or TCP socket, serves named exports of
 * block nodes with the fixed newstyle handshake, structured replies and the
 * base:allocation and qemu:dirty-bitmap:NAME metadata contexts
 * (NetworkBlockDevice/nbd doc/proto.md).
 *
 * Control functions here are called from the main thread (command line and
 * QMP); the server runs its own threads for connections and requests.
 */
#ifndef BITBACK_NBD_SERVER_H
#define BITBACK_NBD_SERVER_H

#include <stdbool.h>
#include <json-c/json.h>
#include "block/block.h"
#include "util/error.h"

typedef struct NBDExport NBDExport;

/* QEMU's defaults since the fix of CVE-2024-7409 (QEMU 9.1). */
#define NBD_DEFAULT_MAX_CONNECTIONS        100
#define NBD_DEFAULT_HANDSHAKE_MAX_SECONDS  10
/* Daemon-wide request-buffer budget and extra-worker cap (nbd-internal.h
 * invariant 8).  1 GiB holds 32 maximal (32 MiB) requests in flight, far
 * more than a few busy clients need to fill a disk. */
#define NBD_DEFAULT_MAX_REQUEST_MEMORY     (UINT64_C(1) << 30)
#define NBD_DEFAULT_MAX_EXTRA_WORKERS      64

/* Set the request-buffer budget (raised to 32 MiB, so any request fits
 * alone) and the daemon-wide cap on extra worker threads (0: each
 * connection has only its own thread).  Any thread, any time; buffers and
 * threads already there stay until released. */
void nbd_set_resource_limits(uint64_t max_request_memory,
                             unsigned max_extra_workers);

/* Start listening.  addr is a QAPI SocketAddress:
 *   {"type":"unix","path":"/run/x.sock"} or
 *   {"type":"inet","host":"127.0.0.1","port":"10809"} (port as string or int)
 *   or {"type":"fd","str":"3"} (a listening socket the program was given, by
 *   number or activation name: util/listen-fds.h).
 * max_connections 0 means unlimited; a connection over the limit is closed
 * at once.  A connection that has not finished the handshake
 * handshake_max_seconds after it was accepted is disconnected (0: no
 * limit).  Fails if a server is running. */
bool nbd_server_start(struct json_object *addr, unsigned max_connections,
                      unsigned handshake_max_seconds, Error **errp);
/* As nbd_server_start, with TLS: tls_creds names a credentials object
 * with endpoint=server (crypto/tls-creds.h), and the server then refuses
 * every option before NBD_OPT_STARTTLS (no plaintext fallback); tls_authz
 * (only with tls_creds) names an authz object that must allow the
 * client's identity once the TLS handshake is done, or the connection is
 * closed (a line on stderr says why).  Both NULL: plaintext.  The server
 * holds a reference on each object until nbd_server_stop. */
bool nbd_server_start_tls(struct json_object *addr, unsigned max_connections,
                          unsigned handshake_max_seconds,
                          const char *tls_creds, const char *tls_authz,
                          Error **errp);
bool nbd_server_is_running(void);
/* The TCP port the running server listens on (the one the kernel chose
 * for port 0), or -1 when it is not running or listens on a UNIX socket. */
int nbd_server_port(void);
/* Stop listening, disconnect every client (in-flight requests finish and are
 * answered first; a reply still being sent a few seconds later is cut off,
 * so this returns in bounded time), and remove every export, each with its
 * BLOCK_EXPORT_DELETED event (not delivered at daemon shutdown: the monitor
 * is gone by then).  No-op when not running. */
void nbd_server_stop(void);

/* Serve one connected socket (owned from here on: closed when done) on the
 * calling thread, the way nbdkit -s serves stdin: handshake, then requests
 * until the client disconnects, then return.  The same connection code as
 * for an accepted socket (limits, invariants of nbd-internal.h), without a
 * listener.  The server need not be running: without it nothing enforces
 * a handshake deadline, and before the first nbd_server_start the calling
 * thread serves every request alone (no extra workers).  Exports are the
 * ones added with nbd_export_add. */
void nbd_server_serve_fd(int fd);

/* Add an export of bs named `name` (defaults to the node name when NULL).
 * bitmaps: names of dirty bitmaps found on bs or below it in its backing
 * chain, served as qemu:dirty-bitmap:NAME.  Takes a reference on bs.
 * The server need not be running yet (exports from the command line are
 * added before --nbd-server is processed in some orders). */
NBDExport *nbd_export_add(const char *id, BlockDriverState *bs,
                          const char *name, const char *description,
                          bool writable, const char *const *bitmaps,
                          int nbitmaps, Error **errp);
/* Remove an export (block-export-del); never waits for a client (main
 * thread).  force=false is QEMU's mode "safe": fail while any client uses
 * it, connected or still negotiating.  force=true is mode "hard": cut
 * every such client off at once (nothing it sends from now on runs;
 * requests already in the node finish there, unanswered).  An unused
 * export is freed at once; a used one is "shutting down" (still listed,
 * still holding its node and id) until its last client has gone, then
 * freed on the main thread.  Either way BLOCK_EXPORT_DELETED
 * {"id": ...} is emitted when it is freed.  Fails for an unknown id or
 * an export already shutting down.  id may be the export's own id string. */
bool nbd_export_del(const char *id, bool force, Error **errp);
/* The export with this id, shutting down or not (an id stays taken until
 * the export is freed, as in QEMU), or NULL. */
NBDExport *nbd_export_find(const char *id);
NBDExport *nbd_export_find_by_name(const char *name);
/* The export's id (owned by the export, valid until it is removed). */
const char *nbd_export_id(const NBDExport *exp);
/* query-block-exports: a new JSON array of
 * {"type":"nbd","id":...,"node-name":...,"shutting-down":false}. */
struct json_object *nbd_export_query(void);
/* For metrics: [{"id", "name", "node-name", "writable", "clients"}] of
 * every export, clients counting the connections that use it (or still
 * negotiate with it pinned).  A new reference. */
struct json_object *nbd_export_usage(void);
/* True when any export uses node bs, including one still shutting down
 * (blockdev-del refuses then). */
bool nbd_node_is_exported(BlockDriverState *bs);

#endif
