/*
 * tls-creds-x509 and tls-creds-psk (tls-creds.h) with GnuTLS, and both
 * sides of a TLS session.  Credentials are loaded once, when the
 * object is created, and never change afterwards, so sessions on
 * connection threads share them without a lock (GnuTLS credentials are
 * safe to share between sessions once set up).
 */
#include <errno.h>
#include <poll.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include "crypto/crypto-internal.h"
#include "crypto/object.h"
#include "crypto/tls-creds.h"
#include "util/cleanup.h"

/* QEMU's default priority is GnuTLS's NORMAL; PSK adds its key exchanges
 * (crypto/tlscredspsk.c in QEMU does the same).  NORMAL ranks
 * ChaCha20-Poly1305 above AES-128-GCM, and a TLS 1.3 session on a PSK
 * cannot use AES-256-GCM (its suite hashes with SHA-384; GnuTLS binds an
 * external PSK to SHA-256), so NORMAL gives every PSK connection
 * ChaCha20: on a CPU with AES instructions about 3.5 times the CPU per
 * byte of AES-GCM (bench/tls-floor.c; docs/performance.md).  Where the CPU
 * has them, the default therefore ranks ChaCha20 last, and a server
 * chooses by its own order (%SERVER_PRECEDENCE), since clients send
 * NORMAL's.  x509 sessions still get AES-256-GCM first.  A priority the
 * user gives is used as given. */
#define TLS_PRIORITY_DEFAULT "NORMAL"
#define TLS_PRIORITY_AES_FIRST "NORMAL:-CHACHA20-POLY1305:+CHACHA20-POLY1305"
#define TLS_PRIORITY_SERVER_ORDER ":%SERVER_PRECEDENCE"
#define TLS_PRIORITY_PSK_SUFFIX ":+ECDHE-PSK:+DHE-PSK:+PSK"
#define TLS_PSK_LINE_MAX 4096

struct TLSCreds {
    Object *obj;                  /* set by tls_creds_get */
    TLSCredsKind kind;
    bool server;
    bool verify_peer;
    char *dir;
    char *priority;
    char *username;               /* PSK client */
    char *psk_file;               /* PSK */
    gnutls_certificate_credentials_t x509;
    gnutls_psk_server_credentials_t psk_server;
    gnutls_psk_client_credentials_t psk_client;
};

struct TLSSession {
    gnutls_session_t sess;
    int fd;
    const TLSCreds *creds;        /* not referenced: the caller holds it */
    bool server;
    char *hostname;               /* client: the name the server's
                                   * certificate must carry; NULL: none */
};

void tls_creds_free(void *opaque)
{
    TLSCreds *c = opaque;
    if (!c) {
        return;
    }
    if (c->x509) {
        gnutls_certificate_free_credentials(c->x509);
    }
    if (c->psk_server) {
        gnutls_psk_free_server_credentials(c->psk_server);
    }
    if (c->psk_client) {
        gnutls_psk_free_client_credentials(c->psk_client);
    }
    free(c->dir);
    free(c->priority);
    free(c->username);
    free(c->psk_file);
    free(c);
}

static void tls_creds_freep(TLSCreds **c)
{
    tls_creds_free(*c);
}

/* DIR/NAME, a new string, or NULL with errp set. */
static char *tls_creds_path(const TLSCreds *c, const char *name, Error **errp)
{
    char *p = NULL;
    if (asprintf(&p, "%s/%s", c->dir, name) < 0) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    return p;
}

/* DIR/NAME as a new string when the file is readable; otherwise NULL, and
 * errp set unless the file is optional and does not exist. */
static char *tls_creds_file(const TLSCreds *c, const char *name,
                            bool required, Error **errp)
{
    char *p = tls_creds_path(c, name, errp);
    if (p && access(p, R_OK) < 0) {
        if (required || errno != ENOENT) {
            error_setg_errno(errp, errno, "Unable to access credentials %s",
                             p);
        }
        free(p);
        return NULL;
    }
    return p;
}

/* The priority string when the user gives none (see above). */
static const char *tls_priority_default(bool server)
{
#if defined(__x86_64__) || defined(__i386__)
    if (__builtin_cpu_supports("aes") && __builtin_cpu_supports("pclmul")) {
        return server ? TLS_PRIORITY_AES_FIRST TLS_PRIORITY_SERVER_ORDER
                      : TLS_PRIORITY_AES_FIRST;
    }
#endif
    (void)server;
    return TLS_PRIORITY_DEFAULT;
}

/* The properties both kinds share. */
static TLSCreds *tls_creds_common(const char *id, const char *type,
                                  struct json_object *props, TLSCredsKind kind,
                                  Error **errp)
{
    const char *dir, *endpoint, *priority;
    bool verify_peer;
    if (!object_prop_str(props, "dir", NULL, &dir, errp) ||
        !object_prop_str(props, "endpoint", "client", &endpoint, errp) ||
        !object_prop_str(props, "priority", NULL, &priority, errp) ||
        !object_prop_bool(props, "verify-peer", true, &verify_peer, errp)) {
        return NULL;
    }
    if (!dir || !*dir) {
        error_setg(errp, "%s '%s': Missing 'dir' property value", type, id);
        return NULL;
    }
    if (strcmp(endpoint, "server") != 0 && strcmp(endpoint, "client") != 0) {
        error_setg(errp, "Parameter 'endpoint' does not accept value '%s'",
                   endpoint);
        return NULL;
    }
    _cleanup_(tls_creds_freep) TLSCreds *c = calloc(1, sizeof(*c));
    if (!c) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    c->kind = kind;
    c->server = endpoint[0] == 's';
    c->verify_peer = verify_peer;
    c->dir = strdup(dir);
    if (!priority) {
        priority = tls_priority_default(c->server);
    }
    if (asprintf(&c->priority, "%s%s", priority,
                 kind == TLS_CREDS_PSK ? TLS_PRIORITY_PSK_SUFFIX : "") < 0) {
        c->priority = NULL;
    }
    if (!c->dir || !c->priority) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    const char *err_pos = NULL;
    gnutls_priority_t prio;
    int r = gnutls_priority_init(&prio, c->priority, &err_pos);
    if (r < 0) {
        error_setg(errp, "%s '%s': bad priority string at '%s': %s", type, id,
                   err_pos ? err_pos : "", gnutls_strerror(r));
        return NULL;
    }
    gnutls_priority_deinit(prio);
    return steal_pointer(&c);
}

void *tls_creds_x509_new(const char *id, struct json_object *props,
                         Error **errp)
{
    _cleanup_(tls_creds_freep) TLSCreds *c =
        tls_creds_common(id, "tls-creds-x509", props, TLS_CREDS_X509, errp);
    if (!c) {
        return NULL;
    }
    const char *cert_name = c->server ? "server-cert.pem" : "client-cert.pem";
    const char *key_name = c->server ? "server-key.pem" : "client-key.pem";
    _cleanup_free_ char *ca = tls_creds_file(c, "ca-cert.pem", true, errp);
    if (!ca) {
        return NULL;
    }
    Error *local_err = NULL;
    _cleanup_free_ char *crl = tls_creds_file(c, "ca-crl.pem", false,
                                              &local_err);
    _cleanup_free_ char *cert = NULL, *key = NULL;
    if (!local_err) {
        cert = tls_creds_file(c, cert_name, c->server, &local_err);
    }
    if (!local_err) {
        key = tls_creds_file(c, key_name, c->server || cert, &local_err);
    }
    if (local_err) {
        error_propagate(errp, local_err);
        return NULL;
    }
    if (key && !cert) {
        error_setg(errp, "Unable to access credentials %s/%s: %s", c->dir,
                   cert_name, strerror(ENOENT));
        return NULL;
    }
    int r = gnutls_certificate_allocate_credentials(&c->x509);
    if (r < 0) {
        c->x509 = NULL;
        error_setg(errp, "Cannot allocate credentials: %s", gnutls_strerror(r));
        return NULL;
    }
    r = gnutls_certificate_set_x509_trust_file(c->x509, ca, GNUTLS_X509_FMT_PEM);
    if (r <= 0) {
        error_setg(errp, "Cannot load CA certificate %s: %s", ca,
                   r < 0 ? gnutls_strerror(r) : "no certificate in it");
        return NULL;
    }
    if (crl && (r = gnutls_certificate_set_x509_crl_file(
                    c->x509, crl, GNUTLS_X509_FMT_PEM)) < 0) {
        error_setg(errp, "Cannot load CRL %s: %s", crl, gnutls_strerror(r));
        return NULL;
    }
    if (cert && (r = gnutls_certificate_set_x509_key_file(
                     c->x509, cert, key, GNUTLS_X509_FMT_PEM)) < 0) {
        error_setg(errp, "Cannot load certificate %s & key %s: %s", cert, key,
                   gnutls_strerror(r));
        return NULL;
    }
    if (c->server) {
        gnutls_certificate_set_known_dh_params(c->x509, GNUTLS_SEC_PARAM_MEDIUM);
    }
    return steal_pointer(&c);
}

/* The hex key of username's line in the PSK file ("NAME:HEXKEY"), a new
 * string, or NULL with errp set. */
static char *psk_file_key(const char *path, const char *username,
                          Error **errp)
{
    FILE *f = fopen(path, "re");
    if (!f) {
        error_setg_errno(errp, errno, "Unable to read %s", path);
        return NULL;
    }
    char line[TLS_PSK_LINE_MAX];
    size_t ul = strlen(username);
    char *key = NULL;
    bool found = false;
    while (!found && fgets(line, sizeof(line), f)) {
        found = strncmp(line, username, ul) == 0 && line[ul] == ':';
        if (found) {
            line[strcspn(line, "\r\n")] = '\0';
            key = strdup(line + ul + 1);
        }
    }
    fclose(f);
    if (!found) {
        error_setg(errp, "Username %s not found in %s", username, path);
    } else if (!key) {
        error_setg(errp, "out of memory");
    }
    return key;
}

void *tls_creds_psk_new(const char *id, struct json_object *props,
                        Error **errp)
{
    const char *username;
    if (!object_prop_str(props, "username", "qemu", &username, errp)) {
        return NULL;
    }
    _cleanup_(tls_creds_freep) TLSCreds *c =
        tls_creds_common(id, "tls-creds-psk", props, TLS_CREDS_PSK, errp);
    if (!c) {
        return NULL;
    }
    c->psk_file = tls_creds_file(c, "keys.psk", true, errp);
    if (!c->psk_file) {
        return NULL;
    }
    if (!c->server) {
        c->username = strdup(username);
        if (!c->username) {
            error_setg(errp, "out of memory");
            return NULL;
        }
        _cleanup_free_ char *hex = psk_file_key(c->psk_file, username, errp);
        if (!hex) {
            return NULL;
        }
        int r = gnutls_psk_allocate_client_credentials(&c->psk_client);
        if (r < 0) {
            c->psk_client = NULL;
            error_setg(errp, "Cannot allocate credentials: %s",
                       gnutls_strerror(r));
            return NULL;
        }
        gnutls_datum_t key = { (unsigned char *)hex, strlen(hex) };
        r = gnutls_psk_set_client_credentials(c->psk_client, username, &key,
                                              GNUTLS_PSK_KEY_HEX);
        explicit_bzero(hex, strlen(hex));
        if (r < 0) {
            error_setg(errp, "Cannot set PSK client credentials from %s: %s",
                       c->psk_file, gnutls_strerror(r));
            return NULL;
        }
        return steal_pointer(&c);
    }
    int r = gnutls_psk_allocate_server_credentials(&c->psk_server);
    if (r < 0) {
        c->psk_server = NULL;
        error_setg(errp, "Cannot allocate credentials: %s", gnutls_strerror(r));
        return NULL;
    }
    r = gnutls_psk_set_server_credentials_file(c->psk_server, c->psk_file);
    if (r < 0) {
        error_setg(errp, "Cannot set PSK server credentials from %s: %s",
                   c->psk_file, gnutls_strerror(r));
        return NULL;
    }
    gnutls_psk_set_server_known_dh_params(c->psk_server,
                                          GNUTLS_SEC_PARAM_MEDIUM);
    return steal_pointer(&c);
}

TLSCreds *tls_creds_get(const char *id, bool server, Error **errp)
{
    Object *o = object_find(id);
    if (!o) {
        error_setg(errp, "No TLS credentials with id '%s'", id);
        return NULL;
    }
    if (strncmp(object_type(o), "tls-creds-", 10) != 0) {
        error_setg(errp, "Object with id '%s' is not TLS credentials", id);
        return NULL;
    }
    TLSCreds *c = object_impl(o);
    if (c->server != server) {
        error_setg(errp, "Expecting TLS credentials with a %s endpoint",
                   server ? "server" : "client");
        return NULL;
    }
    c->obj = o;
    object_ref(o);
    return c;
}

bool tls_server_objects_get(const char *tls_creds, const char *tls_authz,
                            TLSCreds **ret_creds, Authz **ret_authz,
                            Error **errp)
{
    *ret_creds = NULL;
    *ret_authz = NULL;
    if (tls_authz && !tls_creds) {
        error_setg(errp, "'tls-authz' is only allowed with 'tls-creds'");
        return false;
    }
    _cleanup_(tls_creds_putp) TLSCreds *creds = NULL;
    if (tls_creds && !(creds = tls_creds_get(tls_creds, true, errp))) {
        return false;
    }
    if (tls_authz && !(*ret_authz = authz_get(tls_authz, errp))) {
        return false;
    }
    *ret_creds = steal_pointer(&creds);
    return true;
}

void tls_creds_put(TLSCreds *c)
{
    if (c) {
        object_unref(c->obj);
    }
}

TLSCredsKind tls_creds_kind(const TLSCreds *c)
{
    return c->kind;
}

const char *tls_creds_dir(const TLSCreds *c)
{
    return c->dir;
}

bool tls_creds_verify_peer(const TLSCreds *c)
{
    return c->verify_peer;
}

const char *tls_creds_username(const TLSCreds *c)
{
    return c->username;
}

const char *tls_creds_psk_file(const TLSCreds *c)
{
    return c->psk_file;
}

void tls_session_free(TLSSession *s)
{
    if (s) {
        if (s->sess) {
            gnutls_deinit(s->sess);
        }
        free(s->hostname);
        free(s);
    }
}

static void tls_session_freep(TLSSession **s)
{
    tls_session_free(*s);
}

/* The peer's x509 certificate chain is signed by the CA (and not
 * revoked, not expired) and, when hostname is not NULL, names it; who
 * ("client", "server") is for the message.  false with errp set. */
static bool tls_session_verify_peer(TLSSession *s, const char *hostname,
                                    const char *who, Error **errp)
{
    unsigned status = 0;
    int r = gnutls_certificate_verify_peers3(s->sess, hostname, &status);
    if (r < 0) {
        error_setg(errp, "Verify failed: %s", gnutls_strerror(r));
        return false;
    }
    if (status) {
        gnutls_datum_t out = { 0 };
        gnutls_certificate_verification_status_print(
            status, GNUTLS_CRT_X509, &out, 0);
        error_setg(errp, "The %s certificate is not trusted: %s", who,
                   out.data ? (const char *)out.data : "unknown reason");
        gnutls_free(out.data);
        return false;
    }
    return true;
}

/* The distinguished name of the peer's (verified) certificate, a new
 * string, or NULL with errp set. */
static char *tls_session_peer_dn(TLSSession *s, Error **errp)
{
    unsigned n = 0;
    const gnutls_datum_t *certs = gnutls_certificate_get_peers(s->sess, &n);
    if (!certs || n == 0) {
        error_setg(errp, "No certificate was found");
        return NULL;
    }
    gnutls_x509_crt_t crt;
    if (gnutls_x509_crt_init(&crt) < 0) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    char *dn = NULL;
    size_t len = 0;
    int r = gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER);
    if (r == 0) {
        r = gnutls_x509_crt_get_dn(crt, NULL, &len);
        if (r == GNUTLS_E_SHORT_MEMORY_BUFFER && (dn = malloc(len + 1))) {
            r = gnutls_x509_crt_get_dn(crt, dn, &len);
        }
    }
    gnutls_x509_crt_deinit(crt);
    if (r < 0 || !dn) {
        free(dn);
        error_setg(errp, "Cannot read the peer certificate's name: %s",
                   r < 0 ? gnutls_strerror(r) : "out of memory");
        return NULL;
    }
    dn[len] = '\0';
    return dn;
}

/* The identity the peer proved: its certificate's DN (x509, verified) or
 * its PSK username, a new string; NULL with errp set when the peer is
 * not trusted.  *ret_none: true (and NULL returned, errp untouched) when
 * there is nothing to identify (x509 without verify-peer). */
static char *tls_session_peer_identity(TLSSession *s, const TLSCreds *c,
                                       bool *ret_none, Error **errp)
{
    *ret_none = false;
    if (c->kind == TLS_CREDS_PSK) {
        const char *user = gnutls_psk_server_get_username(s->sess);
        char *u = user ? strdup(user) : NULL;
        if (!u) {
            error_setg(errp, "No PSK username from the client");
        }
        return u;
    }
    if (!c->verify_peer) {
        *ret_none = true;
        return NULL;
    }
    if (!tls_session_verify_peer(s, NULL, "client", errp)) {
        return NULL;
    }
    return tls_session_peer_dn(s, errp);
}

static bool host_is_ip_literal(const char *host)
{
    unsigned char addr[sizeof(struct in6_addr)];
    return inet_pton(AF_INET, host, addr) == 1 ||
           inet_pton(AF_INET6, host, addr) == 1;
}

TLSSession *tls_session_new(const TLSCreds *c, int fd, const char *hostname,
                            Error **errp)
{
    _cleanup_(tls_session_freep) TLSSession *s = calloc(1, sizeof(*s));
    if (!s) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    s->creds = c;
    s->fd = fd;
    s->server = c->server;
    if (!c->server && hostname && !(s->hostname = strdup(hostname))) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    int r = gnutls_init(&s->sess, c->server ? GNUTLS_SERVER : GNUTLS_CLIENT);
    if (r < 0) {
        s->sess = NULL;
        error_setg(errp, "Cannot start a TLS session: %s", gnutls_strerror(r));
        return NULL;
    }
    r = gnutls_priority_set_direct(s->sess, c->priority, NULL);
    if (r >= 0) {
        if (c->kind == TLS_CREDS_X509) {
            r = gnutls_credentials_set(s->sess, GNUTLS_CRD_CERTIFICATE,
                                       c->x509);
            if (c->server) {
                gnutls_certificate_server_set_request(
                    s->sess, c->verify_peer ? GNUTLS_CERT_REQUIRE
                                            : GNUTLS_CERT_IGNORE);
            }
        } else {
            r = gnutls_credentials_set(s->sess, GNUTLS_CRD_PSK,
                                       c->server ? (void *)c->psk_server
                                                 : (void *)c->psk_client);
        }
    }
    if (r >= 0 && s->hostname && c->kind == TLS_CREDS_X509 &&
        !host_is_ip_literal(s->hostname)) {
        /* SNI, as QEMU's client sends it (never an address: RFC 6066) */
        r = gnutls_server_name_set(s->sess, GNUTLS_NAME_DNS, s->hostname,
                                   strlen(s->hostname));
    }
    if (r < 0) {
        error_setg(errp, "Cannot set up the TLS session: %s",
                   gnutls_strerror(r));
        return NULL;
    }
    gnutls_transport_set_int(s->sess, fd);
    return steal_pointer(&s);
}

/* Client side: the server's certificate is signed by the CA and carries
 * s->hostname (x509 with verify-peer); PSK proved itself in the
 * handshake.  false with errp set. */
static bool tls_session_check_server(TLSSession *s, Error **errp)
{
    const TLSCreds *c = s->creds;
    if (c->kind == TLS_CREDS_PSK || !c->verify_peer) {
        return true;
    }
    return tls_session_verify_peer(s, s->hostname, "server", errp);
}

/* Server side: the peer proved an identity that authz allows. */
static bool tls_session_check_client(TLSSession *s, const Authz *authz,
                                     Error **errp)
{
    bool none;
    Error *local_err = NULL;
    _cleanup_free_ char *identity =
        tls_session_peer_identity(s, s->creds, &none, &local_err);
    if (local_err) {
        error_propagate(errp, local_err);
        return false;
    }
    if (authz && (none || !authz_is_allowed(authz, identity))) {
        error_setg(errp, "TLS %s authz check for %s is denied",
                   s->creds->kind == TLS_CREDS_X509 ? "x509" : "PSK",
                   none ? "a client without a verified certificate" : identity);
        return false;
    }
    return true;
}

int tls_session_handshake(TLSSession *s, const Authz *authz, Error **errp)
{
    int r = gnutls_handshake(s->sess);
    if (r == GNUTLS_E_INTERRUPTED || r == GNUTLS_E_AGAIN) {
        return 0;
    }
    if (r < 0) {
        error_setg(errp, "TLS handshake failed: %s", gnutls_strerror(r));
        return -1;
    }
    bool ok = s->server ? tls_session_check_client(s, authz, errp)
                        : tls_session_check_server(s, errp);
    return ok ? 1 : -1;
}

char *tls_session_desc(const TLSSession *s)
{
    char *g = gnutls_session_get_desc(s->sess);
    char *d = g ? strdup(g) : NULL;
    gnutls_free(g);
    return d;
}

bool tls_session_wants_write(const TLSSession *s)
{
    return gnutls_record_get_direction(s->sess) == 1;
}

size_t tls_session_pending(const TLSSession *s)
{
    return gnutls_record_check_pending(s->sess);
}

/* tls_session_new, then the whole handshake on fd, waiting in poll() at
 * most timeout_ms (-1: no limit) each time the socket would block. */
static TLSSession *tls_session_blocking(const TLSCreds *c, const Authz *authz,
                                        int fd, const char *hostname,
                                        int timeout_ms, Error **errp)
{
    _cleanup_(tls_session_freep) TLSSession *s =
        tls_session_new(c, fd, hostname, errp);
    if (!s) {
        return NULL;
    }
    for (;;) {
        int r = tls_session_handshake(s, authz, errp);
        if (r != 0) {
            return r > 0 ? steal_pointer(&s) : NULL;
        }
        struct pollfd pfd = {
            .fd = fd, .events = tls_session_wants_write(s) ? POLLOUT : POLLIN,
        };
        r = poll(&pfd, 1, timeout_ms);
        if (r == 0) {
            error_setg(errp, "TLS handshake timed out");
            return NULL;
        }
        if (r < 0 && errno != EINTR) {
            error_setg_errno(errp, errno, "TLS handshake: poll");
            return NULL;
        }
    }
}

TLSSession *tls_session_server(const TLSCreds *c, const Authz *authz, int fd,
                               Error **errp)
{
    return tls_session_blocking(c, authz, fd, NULL, -1, errp);
}

TLSSession *tls_session_client(const TLSCreds *c, int fd, const char *hostname,
                               int timeout_ms, Error **errp)
{
    return tls_session_blocking(c, NULL, fd, hostname, timeout_ms, errp);
}

/* A gnutls_record_recv/send result as read(2)/write(2) give it: the
 * count (0 included), or -1 with errno EAGAIN or EIO.  False for
 * GNUTLS_E_INTERRUPTED: the caller asks again. */
static bool tls_record_result(ssize_t n, ssize_t *ret)
{
    if (n == GNUTLS_E_INTERRUPTED) {
        return false;
    }
    if (n < 0) {
        errno = n == GNUTLS_E_AGAIN ? EAGAIN : EIO;
        n = -1;
    }
    *ret = n;
    return true;
}

ssize_t tls_session_recv(TLSSession *s, void *buf, size_t len)
{
    ssize_t r;
    while (!tls_record_result(gnutls_record_recv(s->sess, buf, len), &r)) {
    }
    return r;
}

ssize_t tls_session_send(TLSSession *s, const void *buf, size_t len)
{
    ssize_t r;
    while (!tls_record_result(gnutls_record_send(s->sess, buf, len), &r)) {
    }
    return r;
}
