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
#include "util/cleanup.h"

#define QMP_CONN_MAX_LINE (64u << 20)
#define QMP_CONN_MAX_EVENTS 4096

struct QmpConn {
    int fd;
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
        int r = poll(&pfd, 1, timeout_ms);
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
        ssize_t n = read(c->fd, c->buf + c->len, c->cap - c->len);
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
        ssize_t n = send(c->fd, s, len, MSG_NOSIGNAL);
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

QmpConn *qmp_conn_connect(const char *path, Error **errp)
{
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    QmpConn *c;
    struct json_object *greeting, *ret;

    if (strlen(path) >= sizeof(addr.sun_path)) {
        error_setg(errp, "QMP socket path too long: %s", path);
        return NULL;
    }
    strcpy(addr.sun_path, path);
    c = calloc(1, sizeof(*c));
    if (!c) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        error_setg_errno(errp, errno, "cannot connect to QMP socket %s", path);
        qmp_conn_free(c);
        return NULL;
    }
    greeting = read_message(c, 30000, errp);
    if (!greeting || !json_object_object_get_ex(greeting, "QMP", NULL)) {
        json_object_put(greeting);
        if (errp && !*errp) {
            error_setg(errp, "%s: no QMP greeting", path);
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
