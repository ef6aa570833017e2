/*
 * A small QMP client for `bitback backup --connect`: it talks to bitbackd
 * or qemu-storage-daemon over a UNIX socket or TCP (optionally TLS, with
 * a tls-creds object of crypto/tls-creds.h), one JSON object per line.
 *
 * Replies and events share the socket.  qmp_conn_execute() waits for its
 * reply and queues any event that arrives first; qmp_conn_next_event()
 * returns queued events before reading more.
 */
#ifndef BITBACK_CLIENT_QMP_CLIENT_H
#define BITBACK_CLIENT_QMP_CLIENT_H

#include <json-c/json.h>
#include "crypto/tls-creds.h"
#include "util/error.h"

typedef struct QmpConn QmpConn;

/* True when addr names a TCP address: "tcp:HOST:PORT", or "HOST:PORT" /
 * "[V6ADDR]:PORT" without a '/' and with a numeric port; anything else
 * (also "unix:PATH") is a UNIX socket path. */
bool qmp_address_is_tcp(const char *addr);

/* Connect to addr, with TLS when creds (endpoint=client, TCP only; the
 * server's certificate must carry the host of addr), read the greeting
 * and negotiate capabilities.  Each wait of the connection (handshake,
 * greeting) is bounded.  creds must outlive the connection.  NULL with
 * errp set. */
QmpConn *qmp_conn_connect(const char *addr, const TLSCreds *creds,
                          Error **errp);
/* True when the connection is TCP (the daemon may be on another host). */
bool qmp_conn_is_tcp(const QmpConn *c);
void qmp_conn_free(QmpConn *c);

/* Run `command` with `args` (consumed; NULL for none).  Returns the
 * "return" value (caller owns a reference; an empty object when the reply
 * has none) or NULL with errp set to "COMMAND: desc". */
struct json_object *qmp_conn_execute(QmpConn *c, const char *command,
                                     struct json_object *args, Error **errp);

/* The next event (caller owns it), waiting up to timeout_ms (-1 forever).
 * NULL on timeout (errp untouched) or on a connection error (errp set). */
struct json_object *qmp_conn_next_event(QmpConn *c, int timeout_ms,
                                        Error **errp);

/* Drop every queued event (those of jobs that ended before a point the
 * caller knows, e.g. a job of a killed run that was cancelled). */
void qmp_conn_discard_events(QmpConn *c);

#endif
