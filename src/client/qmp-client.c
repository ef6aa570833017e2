/*
 * QMP client (qmp-client.h).  Messages are newline-delimited JSON objects,
 * as both QEMU and bitbackd send them; each line is parsed with json-c.
 * A reply is recognised by "return" or "error", an event by "event".
 * Limits: a line longer than QMP_CONN_MAX_LINE is a protocol error.
 */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "client/qmp-client.h"
#include "crypto/tls-creds.h"
#include "util/cleanup.h"
#include "util/osdep.h"

#define QMP_CONN_MAX_LINE (64u << 20)
#define QMP_CONN_MAX_EVENTS 4096
#define QMP_CONN_GREETING_MS 30000     /* connect: TLS handshake, greeting */

struct QmpConn {
    int fd;
    TLSSession *tls;                 /* NULL: plain socket */
    bool tcp;
    char *buf;
    size_t len;
    size_t cap;
    struct json_object **events;     /* queue */
    size_t n_events;
};

void qmp_conn_free(QmpConn *c)
{
    if (!c) {
        return;
    }
    tls_session_free(c->tls);
    if (c->fd >= 0) {
        close(c->fd);
    }
    for (size_t i = 0; i < c->n_events; i++) {
        json_object_put(c->events[i]);
    }
    free(c->events);
    free(c->buf);
    free(c);
}

/* Read one message, waiting up to timeout_ms.  Returns the object, NULL
 * on timeout (*ret_err false) or error (errp set). */
static struct json_object *read_message(QmpConn *c, int timeout_ms,
                                        Error **errp)
{
    for (;;) {
        char *nl = c->len ? memchr(c->buf, '\n', c->len) : NULL;

        if (nl) {
            size_t line = nl - c->buf;
            struct json_object *obj;
            enum json_tokener_error jerr;

            *nl = '\0';
            obj = json_tokener_parse_verbose(c->buf, &jerr);
            memmove(c->buf, nl + 1, c->len - line - 1);
            c->len -= line + 1;
            if (!obj && jerr == json_tokener_success) {
                continue;                      /* blank line */
            }
            if (!obj || !json_object_is_type(obj, json_type_object)) {
                json_object_put(obj);
                error_setg(errp, "QMP: malformed message from the server");
                return NULL;
            }
            return obj;
        }
        if (c->len == c->cap) {
            size_t ncap = c->cap ? c->cap * 2 : 65536;
            char *nbuf;

            if (ncap > QMP_CONN_MAX_LINE) {
                error_setg(errp, "QMP: message longer than %u bytes",
                           QMP_CONN_MAX_LINE);
                return NULL;
            }
            nbuf = realloc(c->buf, ncap);
            if (!nbuf) {
                error_setg(errp, "QMP: out of memory");
                return NULL;
            }
            c->buf = nbuf;
            c->cap = ncap;
        }
        struct pollfd pfd = { .fd = c->fd, .events = POLLIN };
        /* TLS: decrypted bytes already buffered are not seen by poll() */
        int r = c->tls && tls_session_pending(c->tls) ? 1
                : poll(&pfd, 1, timeout_ms);
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r < 0) {
            error_setg_errno(errp, errno, "QMP: poll");
            return NULL;
        }
        if (r == 0) {
            return NULL;
        }
        ssize_t n = c->tls ? tls_session_recv(c->tls, c->buf + c->len,
                                              c->cap - c->len)
                           : read(c->fd, c->buf + c->len, c->cap - c->len);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            error_setg_errno(errp, errno, "QMP: read");
            return NULL;
        }
        if (n == 0) {
            error_setg(errp, "QMP: the server closed the connection");
            return NULL;
        }
        c->len += n;
    }
}

static bool send_all(QmpConn *c, const char *s, size_t len, Error **errp)
{
    while (len) {
        ssize_t n = c->tls ? tls_session_send(c->tls, s, len)
                           : send(c->fd, s, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            error_setg_errno(errp, errno, "QMP: send");
            return false;
        }
        s += n;
        len -= n;
    }
    return true;
}

static bool queue_event(QmpConn *c, struct json_object *ev, Error **errp)
{
    struct json_object **n;

    if (c->n_events >= QMP_CONN_MAX_EVENTS) {
        json_object_put(ev);
        error_setg(errp, "QMP: too many unread events");
        return false;
    }
    n = realloc(c->events, (c->n_events + 1) * sizeof(*n));
    if (!n) {
        json_object_put(ev);
        error_setg(errp, "QMP: out of memory");
        return false;
    }
    c->events = n;
    c->events[c->n_events++] = ev;
    return true;
}

struct json_object *qmp_conn_execute(QmpConn *c, const char *command,
                                     struct json_object *args, Error **errp)
{
    _cleanup_json_ struct json_object *msg = json_object_new_object();
    const char *text;

    json_object_object_add(msg, "execute", json_object_new_string(command));
    if (args) {
        json_object_object_add(msg, "arguments", args);
    }
    text = json_object_to_json_string_ext(msg, JSON_C_TO_STRING_PLAIN);
    /* Two writes, so over TLS two records: qemu-storage-daemon 7.2's TLS
     * chardev handles a record only once the next one arrives, and the
     * newline is that next one (QMP ignores whitespace).  Do not merge. */
    if (!send_all(c, text, strlen(text), errp) ||
        !send_all(c, "\n", 1, errp)) {
        error_prepend(errp, "%s: ", command);
        return NULL;
    }
    for (;;) {
        struct json_object *reply = read_message(c, -1, errp);
        struct json_object *val;

        if (!reply) {
            error_prepend(errp, "%s: ", command);
            return NULL;
        }
        if (json_object_object_get_ex(reply, "event", NULL)) {
            if (!queue_event(c, reply, errp)) {
                return NULL;
            }
            continue;
        }
        if (json_object_object_get_ex(reply, "return", &val)) {
            json_object_get(val);
            json_object_put(reply);
            if (!json_object_is_type(val, json_type_object) &&
                !json_object_is_type(val, json_type_array)) {
                json_object_put(val);
                val = json_object_new_object();
            }
            return val;
        }
        if (json_object_object_get_ex(reply, "error", &val)) {
            struct json_object *desc = NULL;

            json_object_object_get_ex(val, "desc", &desc);
            error_setg(errp, "%s: %s", command,
                       desc ? json_object_get_string(desc) : "unknown error");
            json_object_put(reply);
            return NULL;
        }
        json_object_put(reply);                /* greeting or unknown */
    }
}

struct json_object *qmp_conn_next_event(QmpConn *c, int timeout_ms,
                                        Error **errp)
{
    if (c->n_events) {
        struct json_object *ev = c->events[0];

        memmove(c->events, c->events + 1,
                (c->n_events - 1) * sizeof(*c->events));
        c->n_events--;
        return ev;
    }
    for (;;) {
        struct json_object *msg = read_message(c, timeout_ms, errp);

        if (!msg || json_object_object_get_ex(msg, "event", NULL)) {
            return msg;
        }
        json_object_put(msg);                  /* a stray reply */
    }
}

void qmp_conn_discard_events(QmpConn *c)
{
    for (size_t i = 0; i < c->n_events; i++) {
        json_object_put(c->events[i]);
    }
    c->n_events = 0;
}

bool qmp_address_is_tcp(const char *addr)
{
    if (strncmp(addr, "tcp:", 4) == 0) {
        return true;
    }
    if (strncmp(addr, "unix:", 5) == 0 || strchr(addr, '/')) {
        return false;
    }
    const char *colon = strrchr(addr, ':');
    return colon && colon[1] && strspn(colon + 1, "0123456789") ==
                                strlen(colon + 1);
}

/* A connected socket to the UNIX path, or -1 with errp set. */
static int qmp_connect_unix(const char *path, Error **errp)
{
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof(addr.sun_path)) {
        error_setg(errp, "QMP socket path too long: %s", path);
        return -1;
    }
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        error_setg_errno(errp, errno, "cannot connect to QMP socket %s", path);
        if (fd >= 0) {
            close(fd);
        }
        return -1;
    }
    return fd;
}

/* Connect c to addr (qmp_address_is_tcp decides which kind) and, with
 * creds, do the TLS handshake; false with errp set. */
static bool qmp_conn_open(QmpConn *c, const char *addr, const TLSCreds *creds,
                          Error **errp)
{
    if (!qmp_address_is_tcp(addr)) {
        if (creds) {
            error_setg(errp, "QMP: TLS is only used over TCP (HOST:PORT), "
                       "not on the UNIX socket %s", addr);
            return false;
        }
        if (strncmp(addr, "unix:", 5) == 0) {
            addr += 5;
        }
        c->fd = qmp_connect_unix(addr, errp);
        return c->fd >= 0;
    }
    _cleanup_free_ char *host = NULL, *port = NULL;
    if (!inet_parse_host_port(addr + (strncmp(addr, "tcp:", 4) ? 0 : 4),
                              &host, &port, errp)) {
        return false;
    }
    c->tcp = true;
    c->fd = inet_connect(host, port, errp);
    if (c->fd < 0) {
        error_prepend(errp, "QMP: ");
        return false;
    }
    if (creds) {
        c->tls = tls_session_client(creds, c->fd, host, QMP_CONN_GREETING_MS,
                                    errp);
        if (!c->tls) {
            error_prepend(errp, "QMP over TLS to %s: ", addr);
            return false;
        }
    }
    return true;
}

bool qmp_conn_is_tcp(const QmpConn *c)
{
    return c->tcp;
}

QmpConn *qmp_conn_connect(const char *addr, const TLSCreds *creds,
                          Error **errp)
{
    struct json_object *greeting, *ret;
    QmpConn *c = calloc(1, sizeof(*c));
    if (!c) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    c->fd = -1;
    if (!qmp_conn_open(c, addr, creds, errp)) {
        qmp_conn_free(c);
        return NULL;
    }
    greeting = read_message(c, QMP_CONN_GREETING_MS, errp);
    if (!greeting || !json_object_object_get_ex(greeting, "QMP", NULL)) {
        json_object_put(greeting);
        if (errp && !*errp) {
            error_setg(errp, "%s: no QMP greeting", addr);
        }
        qmp_conn_free(c);
        return NULL;
    }
    json_object_put(greeting);
    ret = qmp_conn_execute(c, "qmp_capabilities", NULL, errp);
    if (!ret) {
        qmp_conn_free(c);
        return NULL;
    }
    json_object_put(ret);
    return c;
}
