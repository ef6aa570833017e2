/*
 * What the nbd driver (nbd.c) shares with other libnbd users of the same
 * program (bitback backup --pull reads the fleecing export's dirty bitmap
 * with its own handle): one way to give a libnbd handle TLS credentials,
 * and one bounded wait for its connection.
 */
#ifndef BITBACK_BLOCK_DRIVERS_NBD_H
#define BITBACK_BLOCK_DRIVERS_NBD_H

#include <stdbool.h>
#include <stdint.h>
#include <libnbd.h>
#include "crypto/tls-creds.h"
#include "util/error.h"

/* Open of a node, and --pull's own handle: connecting plus the whole
 * handshake take at most this many seconds (one attempt). */
#define NBD_OPEN_ATTEMPT_SECONDS 10

/* Make h require TLS with creds (a client tls-creds-x509: its folder and
 * verify-peer; tls-creds-psk: its key file and username; libnbd reads
 * QEMU's layout).  tls_hostname (may be NULL): the name the server's
 * certificate must carry instead of the host connected to (libnbd 1.22 or
 * later).  creds NULL: h is left as it is.  false with libnbd's error
 * (nbd_get_error) set. */
bool nbd_handle_set_tls(struct nbd_handle *h, const TLSCreds *creds,
                        const char *tls_hostname);

/* Finish the connection an nbd_aio_connect_* call began (r: its result)
 * up to a ready handle, polling h's socket never past deadline_ns (a
 * server that accepts but never completes its handshake cannot hold the
 * caller longer).  false with errp set ("Failed to connect to NBD server
 * at 'where': ..."; limit_s is the bound the message names). */
bool nbd_handle_wait_connected(struct nbd_handle *h, int r, const char *where,
                               uint64_t deadline_ns, uint64_t limit_s,
                               Error **errp);

#endif
