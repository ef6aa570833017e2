/*
 * What the nbd driver (nbd.c) shares with other libnbd users of the same
 * program (bitback backup --pull reads the fleecing export's dirty bitmap
 * with its own handle): one way to give a libnbd handle TLS credentials.
 */
#ifndef BITBACK_BLOCK_DRIVERS_NBD_H
#define BITBACK_BLOCK_DRIVERS_NBD_H

#include <stdbool.h>
#include <libnbd.h>
#include "crypto/tls-creds.h"

/* Make h require TLS with creds (a client tls-creds-x509: its folder and
 * verify-peer; tls-creds-psk: its key file and username; libnbd reads
 * QEMU's layout).  tls_hostname (may be NULL): the name the server's
 * certificate must carry instead of the host connected to (libnbd 1.22 or
 * later).  creds NULL: h is left as it is.  false with libnbd's error
 * (nbd_get_error) set. */
bool nbd_handle_set_tls(struct nbd_handle *h, const TLSCreds *creds,
                        const char *tls_hostname);

#endif
