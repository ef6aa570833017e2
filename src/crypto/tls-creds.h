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
 * object is created (a missing or bad file is an error there).  Both sides
 * of a session run here (tls_session_server for the NBD server and the
 * QMP monitor, tls_session_client for bitback's QMP client); NBD clients
 * hand the folder to libnbd, which reads the same layout.
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
/* For _cleanup_(tls_creds_putp). */
static inline void tls_creds_putp(TLSCreds **creds)
{
    tls_creds_put(*creds);
}

/* A TLS server's objects by id (either may be NULL): *ret_creds (a
 * server endpoint) and *ret_authz, referenced, NULL for a NULL id.
 * tls_authz needs tls_creds ("'tls-authz' is only allowed with
 * 'tls-creds'", QEMU's message).  false with errp set and nothing held. */
bool tls_server_objects_get(const char *tls_creds, const char *tls_authz,
                            TLSCreds **ret_creds, Authz **ret_authz,
                            Error **errp);

TLSCredsKind tls_creds_kind(const TLSCreds *creds);
/* The dir property (owned by creds). */
const char *tls_creds_dir(const TLSCreds *creds);
bool tls_creds_verify_peer(const TLSCreds *creds);
/* PSK: the client's username (owned by creds); NULL for x509. */
const char *tls_creds_username(const TLSCreds *creds);
/* PSK: DIR/keys.psk (owned by creds); NULL for x509. */
const char *tls_creds_psk_file(const TLSCreds *creds);

/* One TLS session on a connected socket fd, either side (the creds'
 * endpoint decides). */
typedef struct TLSSession TLSSession;

/* A session on fd, its handshake not started: for a nonblocking socket
 * (the QMP monitor) driven by tls_session_handshake.  hostname (client
 * only, may be NULL): the name the server's x509 certificate must carry,
 * also sent as SNI.  creds must outlive the session.  NULL with errp set. */
TLSSession *tls_session_new(const TLSCreds *creds, int fd,
                            const char *hostname, Error **errp);
/* One step of the handshake: 1 when it is done and the peer checked (as
 * tls_session_server / tls_session_client describe; authz: server side
 * only, may be NULL), 0 when the socket would block (wait for
 * tls_session_wants_write() ? POLLOUT : POLLIN, then call again), -1 with
 * errp set (the connection must then be closed). */
int tls_session_handshake(TLSSession *s, const Authz *authz, Error **errp);
/* Which way the last call that returned 0 / EAGAIN waits. */
/* After the handshake: its version, key exchange, authentication and
 * cipher, as GnuTLS names them ("(TLS1.3)-(ECDHE-SECP256R1)-...-(AES-256-GCM)"),
 * malloc'd; NULL if out of memory. */
char *tls_session_desc(const TLSSession *s);
bool tls_session_wants_write(const TLSSession *s);
/* Bytes already decrypted and buffered in the session: a reader that
 * waits with poll() must consume these first (poll cannot see them). */
size_t tls_session_pending(const TLSSession *s);

/* Run the TLS handshake as a server on fd (blocking; a shutdown() of fd
 * from another thread ends it), check the peer (x509 with verify-peer: a
 * certificate the CA signed) and, with authz, that the peer's identity
 * (its certificate's distinguished name, or its PSK username) is allowed.
 * Returns the session, or NULL with errp set (the connection must then be
 * closed).  An authz without an identity to check (x509, verify-peer=off)
 * refuses every client. */
TLSSession *tls_session_server(const TLSCreds *creds, const Authz *authz,
                               int fd, Error **errp);
/* The client side, blocking: the handshake on fd (each wait for the
 * server at most timeout_ms, -1: no limit), then (x509 with
 * verify-peer, the default) the server's certificate must be signed by
 * the CA and, when hostname is not NULL, carry it; PSK: the key of the
 * creds' username.  The session, or NULL with errp set. */
TLSSession *tls_session_client(const TLSCreds *creds, int fd,
                               const char *hostname, int timeout_ms,
                               Error **errp);
/* Session I/O.  One thread may receive while another sends (GnuTLS >=
 * 3.6); not two of either.  recv: bytes read (> 0), 0 at EOF, -1 on error.
 * send: bytes sent (> 0, maybe fewer than len), -1 on error (a send
 * timeout of the socket counts as an error).  errno is EIO after -1, or
 * EAGAIN when the socket would block (a nonblocking socket, or a timeout):
 * a send must then be repeated with the same buffer and length. */
ssize_t tls_session_recv(TLSSession *s, void *buf, size_t len);
ssize_t tls_session_send(TLSSession *s, const void *buf, size_t len);
/* Any thread, once no other uses s; NULL is fine.  The socket is not
 * closed. */
void tls_session_free(TLSSession *s);

#endif
