/*
 * TLS credentials, QEMU's tls-creds-x509 and tls-creds-psk objects, with
 * QEMU's directory layout so that existing QEMU TLS folders work as they
 * are:
 *
 *   tls-creds-x509,id=ID,dir=DIR,endpoint=server|client[,verify-peer=on|off]
 *       DIR/ca-cert.pem, and for a server DIR/server-cert.pem and
 *       DIR/server-key.pem, for a client (optional) DIR/client-cert.pem and
 *       DIR/client-key.pem; DIR/ca-crl.pem when present.  verify-peer
 *       (default on): a server requires a client certificate the CA
 *       signed; a client checks the server's certificate.
 *   tls-creds-psk,id=ID,dir=DIR,endpoint=server|client[,username=NAME]
 *       DIR/keys.psk, lines "USERNAME:HEXKEY"; a client uses the key of
 *       NAME (default "qemu").
 *
 * endpoint defaults to client, as in QEMU.  Every file is loaded when the
 * object is created (a missing or bad file is an error there).  The server
 * side of a session runs here (tls_session_server); clients hand the
 * folder to libnbd, which reads the same layout.
 */
#ifndef BITBACK_CRYPTO_TLS_CREDS_H
#define BITBACK_CRYPTO_TLS_CREDS_H

#include <stdbool.h>
#include <sys/types.h>
#include "util/error.h"
#include "crypto/authz.h"

typedef struct TLSCreds TLSCreds;
typedef enum TLSCredsKind { TLS_CREDS_X509, TLS_CREDS_PSK } TLSCredsKind;

/* The credentials object id, referenced (object.h), which must have the
 * endpoint asked for; NULL with errp set (QEMU's messages) otherwise.
 * tls_creds_put drops the reference. */
TLSCreds *tls_creds_get(const char *id, bool server, Error **errp);
void tls_creds_put(TLSCreds *creds);

TLSCredsKind tls_creds_kind(const TLSCreds *creds);
/* The dir property (owned by creds). */
const char *tls_creds_dir(const TLSCreds *creds);
bool tls_creds_verify_peer(const TLSCreds *creds);
/* PSK: the client's username (owned by creds); NULL for x509. */
const char *tls_creds_username(const TLSCreds *creds);
/* PSK: DIR/keys.psk (owned by creds); NULL for x509. */
const char *tls_creds_psk_file(const TLSCreds *creds);

/* The server side of one TLS session on the connected socket fd. */
typedef struct TLSSession TLSSession;

/* Run the TLS handshake as a server on fd (blocking; a shutdown() of fd
 * from another thread ends it), check the peer (x509 with verify-peer: a
 * certificate the CA signed) and, with authz, that the peer's identity
 * (its certificate's distinguished name, or its PSK username) is allowed.
 * Returns the session, or NULL with errp set (the connection must then be
 * closed).  An authz without an identity to check (x509, verify-peer=off)
 * refuses every client. */
TLSSession *tls_session_server(const TLSCreds *creds, const Authz *authz,
                               int fd, Error **errp);
/* Session I/O.  One thread may receive while another sends (GnuTLS >=
 * 3.6); not two of either.  recv: bytes read (> 0), 0 at EOF, -1 on error.
 * send: bytes sent (> 0, maybe fewer than len), -1 on error (a send
 * timeout of the socket counts as an error).  errno is EIO after -1. */
ssize_t tls_session_recv(TLSSession *s, void *buf, size_t len);
ssize_t tls_session_send(TLSSession *s, const void *buf, size_t len);
/* Any thread, once no other uses s; NULL is fine.  The socket is not
 * closed. */
void tls_session_free(TLSSession *s);

#endif
