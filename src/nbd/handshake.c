/*
 * NBD server handshake: the fixed newstyle negotiation of one connection,
 * on the connection's thread before any worker exists, so it reads and
 * writes the socket directly.  Options: EXPORT_NAME, ABORT, LIST, INFO,
 * GO, STRUCTURED_REPLY, LIST_META_CONTEXT, SET_META_CONTEXT and STARTTLS;
 * anything else is unsupported.
 *
 * TLS (doc/proto.md, "TLS support", the server's "FORCEDTLS" mode): on a
 * server with TLS credentials every option before STARTTLS is refused
 * with NBD_REP_ERR_TLS_REQD, except ABORT, and EXPORT_NAME (which cannot
 * carry an error) closes the connection, so nothing but the greeting and
 * those refusals ever crosses the wire in the clear.  STARTTLS is
 * acknowledged in the clear, then the TLS handshake runs, then the peer's
 * identity is checked against the server's authz object; a failure closes
 * the connection and says why on stderr.  From then on every byte goes
 * through the session (socket-io.c's nbd_conn_*).  Without credentials
 * STARTTLS is refused with NBD_REP_ERR_POLICY.
 *
 * Contract: nbd_negotiate returns OPT_TRANSMIT with c->exp pinned (from GO
 * or EXPORT_NAME, invariant 4 in nbd-internal.h), c->size, c->tflags and
 * the metadata context selection set for that export; or OPT_CLOSE, with
 * no export pinned.  An option's length is checked against
 * NBD_MAX_OPT_PAYLOAD before its data is read (invariant 5).
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nbd/nbd-internal.h"
#include "util/cleanup.h"
#include "util/cutils.h"

static uint16_t export_tflags(const NBDExport *e, bool structured)
{
    uint16_t f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA |
                 NBD_FLAG_CAN_MULTI_CONN;
    if (e->writable) {
        f |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES |
             NBD_FLAG_SEND_FAST_ZERO;
    } else {
        f |= NBD_FLAG_READ_ONLY;
    }
    if (structured) {
        f |= NBD_FLAG_SEND_DF;
    }
    return f;
}

static int opt_reply(NBDClient *c, uint32_t opt, uint32_t type,
                     const void *data, uint32_t len)
{
    uint8_t hdr[20];
    st_be64(hdr, NBD_REP_MAGIC);
    st_be32(hdr + 8, opt);
    st_be32(hdr + 12, type);
    st_be32(hdr + 16, len);
    struct iovec iov[2] = {
        { .iov_base = hdr, .iov_len = sizeof(hdr) },
        { .iov_base = (void *)data, .iov_len = len },
    };
    return nbd_conn_send_iov(c, iov, len ? 2 : 1) < 0 ? OPT_CLOSE : OPT_CONTINUE;
}

/* An error reply with a human readable message. */
static int opt_error(NBDClient *c, uint32_t opt, uint32_t type,
                     const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int opt_error(NBDClient *c, uint32_t opt, uint32_t type,
                     const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (n < 0) {
        n = 0;
    }
    return opt_reply(c, opt, type, msg, (uint32_t)MIN((size_t)n, sizeof(msg) - 1));
}

static int opt_info_export(NBDClient *c, uint32_t opt, NBDExport *e,
                           uint64_t size)
{
    uint8_t d[12];
    st_be16(d, NBD_INFO_EXPORT);
    st_be64(d + 2, size);
    st_be16(d + 10, export_tflags(e, c->structured));
    return opt_reply(c, opt, NBD_REP_INFO, d, sizeof(d));
}

static int opt_info_string(NBDClient *c, uint32_t opt, uint16_t type,
                           const char *s)
{
    size_t len = strlen(s);
    uint8_t d[2 + NBD_MAX_STRING];
    len = MIN(len, (size_t)NBD_MAX_STRING);
    st_be16(d, type);
    memcpy(d + 2, s, len);
    return opt_reply(c, opt, NBD_REP_INFO, d, (uint32_t)(2 + len));
}

static int opt_info_block_size(NBDClient *c, uint32_t opt)
{
    uint8_t d[14];
    st_be16(d, NBD_INFO_BLOCK_SIZE);
    st_be32(d + 2, 1);
    st_be32(d + 6, 4096);
    st_be32(d + 10, NBD_MAX_PAYLOAD);
    return opt_reply(c, opt, NBD_REP_INFO, d, sizeof(d));
}

/* Forget the metadata context selection. */
static void meta_clear(NBDClient *c)
{
    free(c->bitmap_ids);
    c->bitmap_ids = NULL;
    c->base_id = 0;
    c->nctx = 0;
    c->meta_exp = NULL;
    c->meta_serial = 0;
}

/* Negotiation is over: the client uses export e (pinned in c->exp, the
 * pin is kept) from now on.  Meta contexts chosen for another export, or
 * for an earlier export of the same name, are dropped.  Returns
 * OPT_TRANSMIT. */
static int client_enter_transmission(NBDClient *c, NBDExport *e, uint64_t size)
{
    c->size = size;
    c->tflags = export_tflags(e, c->structured);
    if (c->meta_exp != e || c->meta_serial != e->serial) {
        meta_clear(c);
    }
    return OPT_TRANSMIT;
}

/* NBD_OPT_INFO and NBD_OPT_GO.  Data: u32 name length, name, u16 count,
 * count x u16 info requests. */
static int opt_info_go(NBDClient *c, uint32_t opt, const uint8_t *data,
                       uint32_t len)
{
    if (len < 6) {
        return opt_error(c, opt, NBD_REP_ERR_INVALID, "option too short");
    }
    uint32_t namelen = ld_be32(data);
    if (namelen > NBD_MAX_STRING || namelen > len - 6) {
        return opt_error(c, opt, NBD_REP_ERR_INVALID, "bad export name length");
    }
    uint16_t nreq = ld_be16(data + 4 + namelen);
    if ((uint64_t)len != 6 + (uint64_t)namelen + 2 * (uint64_t)nreq) {
        return opt_error(c, opt, NBD_REP_ERR_INVALID, "bad option length");
    }
    char name[NBD_MAX_STRING + 1];
    memcpy(name, data + 4, namelen);
    name[namelen] = '\0';
    if (memchr(name, '\0', namelen)) {
        return opt_error(c, opt, NBD_REP_ERR_INVALID, "export name holds NUL");
    }
    bool want_name = false, want_desc = false;
    for (uint16_t i = 0; i < nreq; i++) {
        uint16_t t = ld_be16(data + 6 + namelen + 2 * i);
        want_name |= t == NBD_INFO_NAME;
        want_desc |= t == NBD_INFO_DESCRIPTION;
    }
    NBDExport *e = nbd_export_pin(c, name);
    if (!e) {
        return opt_error(c, opt, NBD_REP_ERR_UNKNOWN, "export '%s' not found",
                         name);
    }
    int64_t size = bdrv_getlength(e->bs);
    int r = OPT_CONTINUE;
    if (size < 0) {
        r = opt_error(c, opt, NBD_REP_ERR_PLATFORM, "cannot get export size");
        nbd_export_unpin(c);
        return r;
    }
    if (want_name) {
        r = opt_info_string(c, opt, NBD_INFO_NAME, e->name);
    }
    if (r == OPT_CONTINUE && want_desc && e->description) {
        r = opt_info_string(c, opt, NBD_INFO_DESCRIPTION, e->description);
    }
    if (r == OPT_CONTINUE) {
        r = opt_info_block_size(c, opt);
    }
    if (r == OPT_CONTINUE) {
        r = opt_info_export(c, opt, e, (uint64_t)size);
    }
    if (r == OPT_CONTINUE && !nbd_export_is_open(e)) {
        /* Removed while we answered: no GO completes on it (a removal
         * that comes after this check cuts the connection off). */
        r = opt_error(c, opt, NBD_REP_ERR_UNKNOWN, "export '%s' not found",
                      name);
        nbd_export_unpin(c);
        return r;
    }
    if (r == OPT_CONTINUE) {
        r = opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
    }
    if (r != OPT_CONTINUE || opt == NBD_OPT_INFO) {
        nbd_export_unpin(c);
        return r;
    }
    /* GO: keep the pin, enter transmission. */
    return client_enter_transmission(c, e, (uint64_t)size);
}

static int opt_export_name(NBDClient *c, const uint8_t *data, uint32_t len)
{
    if (len > NBD_MAX_STRING) {
        return OPT_CLOSE;
    }
    char name[NBD_MAX_STRING + 1];
    memcpy(name, data, len);
    name[len] = '\0';
    NBDExport *e = nbd_export_pin(c, name);
    if (!e) {
        return OPT_CLOSE;   /* this option cannot carry an error */
    }
    int64_t size = bdrv_getlength(e->bs);
    if (size < 0) {
        nbd_export_unpin(c);
        return OPT_CLOSE;
    }
    uint8_t reply[8 + 2 + 124] = { 0 };
    st_be64(reply, (uint64_t)size);
    st_be16(reply + 8, export_tflags(e, c->structured));
    if (!nbd_export_is_open(e) ||
        nbd_conn_send_buf(c, reply, c->no_zeroes ? 10 : sizeof(reply)) < 0) {
        nbd_export_unpin(c);
        return OPT_CLOSE;
    }
    return client_enter_transmission(c, e, (uint64_t)size);
}

static int opt_list(NBDClient *c, uint32_t len)
{
    if (len != 0) {
        return opt_error(c, NBD_OPT_LIST, NBD_REP_ERR_INVALID,
                         "NBD_OPT_LIST takes no data");
    }
    /* Copy the names out so that nothing is sent under nbd_srv.lock. */
    size_t n = 0;
    _cleanup_free_ uint8_t *buf = NULL;
    size_t used = 0, cap = 0;
    _cleanup_free_ size_t *ends = NULL;
    {
        LOCK_GUARD(&nbd_srv.lock);
        for (NBDExport *e = nbd_srv.exports; e; e = e->next) {
            if (!e->removing) {
                n++;
            }
        }
        ends = calloc(n + 1, sizeof(*ends));
        if (!ends) {
            return OPT_CLOSE;
        }
        n = 0;
        for (NBDExport *e = nbd_srv.exports; e; e = e->next) {
            if (e->removing) {
                continue;
            }
            size_t nl = strlen(e->name);
            size_t dl = e->description ? strlen(e->description) : 0;
            size_t need = 4 + nl + dl;
            if (used + need > cap) {
                size_t ncap = MAX(cap * 2, used + need + 256);
                uint8_t *nb = realloc(buf, ncap);
                if (!nb) {
                    return OPT_CLOSE;
                }
                buf = nb;
                cap = ncap;
            }
            st_be32(buf + used, (uint32_t)nl);
            memcpy(buf + used + 4, e->name, nl);
            if (dl) {
                memcpy(buf + used + 4 + nl, e->description, dl);
            }
            used += need;
            ends[n++] = used;
        }
    }
    size_t start = 0;
    for (size_t i = 0; i < n; i++) {
        if (opt_reply(c, NBD_OPT_LIST, NBD_REP_SERVER, buf + start,
                      (uint32_t)(ends[i] - start)) != OPT_CONTINUE) {
            return OPT_CLOSE;
        }
        start = ends[i];
    }
    return opt_reply(c, NBD_OPT_LIST, NBD_REP_ACK, NULL, 0);
}

/* Mark in sel[] (index 0: base:allocation, 1 + i: bitmap i) the contexts
 * of e that query q selects.  LIST also takes namespace queries
 * ("base:", "qemu:", "qemu:dirty-bitmap:"). */
static void meta_match(const NBDExport *e, const char *q, size_t qlen,
                       bool list, bool *sel)
{
#define QEQ(lit) (qlen == sizeof(lit) - 1 && memcmp(q, lit, qlen) == 0)
    if (QEQ(META_BASE_ALLOCATION) || (list && QEQ("base:"))) {
        sel[0] = true;
        return;
    }
    if (list && (QEQ("qemu:") || QEQ(META_DIRTY_PREFIX))) {
        for (int i = 0; i < e->nbitmaps; i++) {
            sel[1 + i] = true;
        }
        return;
    }
    for (int i = 0; i < e->nbitmaps; i++) {
        if (strlen(e->ctx_names[i]) == qlen &&
            memcmp(e->ctx_names[i], q, qlen) == 0) {
            sel[1 + i] = true;
        }
    }
#undef QEQ
}

static int meta_reply(NBDClient *c, uint32_t opt, uint32_t id,
                      const char *name)
{
    size_t nl = strlen(name);
    _cleanup_free_ uint8_t *d = malloc(4 + nl);
    if (!d) {
        return OPT_CLOSE;
    }
    st_be32(d, id);
    memcpy(d + 4, name, nl);
    return opt_reply(c, opt, NBD_REP_META_CONTEXT, d, (uint32_t)(4 + nl));
}

/* NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.  Data: u32 name
 * length, name, u32 query count, then per query u32 length and string. */
static int opt_meta(NBDClient *c, uint32_t opt, const uint8_t *data,
                    uint32_t len)
{
    bool list = opt == NBD_OPT_LIST_META_CONTEXT;
    if (!c->structured) {
        return opt_error(c, opt, NBD_REP_ERR_INVALID,
                         "structured replies must be negotiated first");
    }
    if (len < 8) {
        return opt_error(c, opt, NBD_REP_ERR_INVALID, "option too short");
    }
    uint32_t namelen = ld_be32(data);
    if (namelen > NBD_MAX_STRING || namelen > len - 8) {
        return opt_error(c, opt, NBD_REP_ERR_INVALID, "bad export name length");
    }
    char name[NBD_MAX_STRING + 1];
    memcpy(name, data + 4, namelen);
    name[namelen] = '\0';
    uint32_t nq = ld_be32(data + 4 + namelen);
    /* Validate every query before acting on any. */
    uint64_t pos = 8 + (uint64_t)namelen;
    for (uint32_t i = 0; i < nq; i++) {
        if (pos + 4 > len) {
            return opt_error(c, opt, NBD_REP_ERR_INVALID, "truncated query");
        }
        uint32_t ql = ld_be32(data + pos);
        if (ql > NBD_MAX_STRING || pos + 4 + ql > len) {
            return opt_error(c, opt, NBD_REP_ERR_INVALID, "bad query length");
        }
        pos += 4 + (uint64_t)ql;
    }
    if (pos != len) {
        return opt_error(c, opt, NBD_REP_ERR_INVALID, "bad option length");
    }
    NBDExport *e = nbd_export_pin(c, name);
    if (!e) {
        return opt_error(c, opt, NBD_REP_ERR_UNKNOWN, "export '%s' not found",
                         name);
    }
    _cleanup_free_ bool *sel = calloc((size_t)e->nbitmaps + 1, sizeof(bool));
    _cleanup_free_ uint32_t *ids = calloc((size_t)e->nbitmaps + 1, sizeof(uint32_t));
    if (!sel || !ids) {
        nbd_export_unpin(c);
        return OPT_CLOSE;
    }
    if (list && nq == 0) {
        for (int i = 0; i <= e->nbitmaps; i++) {
            sel[i] = true;
        }
    }
    pos = 8 + (uint64_t)namelen;
    for (uint32_t i = 0; i < nq; i++) {
        uint32_t ql = ld_be32(data + pos);
        meta_match(e, (const char *)data + pos + 4, ql, list, sel);
        pos += 4 + (uint64_t)ql;
    }
    int r = OPT_CONTINUE;
    int nsel = 0;
    for (int i = 0; i <= e->nbitmaps && r == OPT_CONTINUE; i++) {
        if (!sel[i]) {
            continue;
        }
        ids[i] = list ? 0 : ++c->next_ctx_id;
        nsel++;
        r = meta_reply(c, opt, ids[i], i == 0 ? META_BASE_ALLOCATION
                                              : e->ctx_names[i - 1]);
    }
    if (r == OPT_CONTINUE) {
        r = opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
    }
    if (r == OPT_CONTINUE && !list) {
        meta_clear(c);
        c->meta_exp = e;
        c->meta_serial = e->serial;
        c->base_id = ids[0];
        c->bitmap_ids = steal_pointer(&ids);
        /* bitmap_ids[i] is the id of bitmap i: shift past base. */
        memmove(c->bitmap_ids, c->bitmap_ids + 1,
                (size_t)e->nbitmaps * sizeof(uint32_t));
        c->nctx = nsel;
    }
    nbd_export_unpin(c);
    return r;
}

/* NBD_OPT_STARTTLS: acknowledge, run the TLS handshake and the authz
 * check on the socket.  OPT_CONTINUE with c->tls set, or OPT_CLOSE. */
static int opt_starttls(NBDClient *c, uint32_t len)
{
    if (len != 0) {
        return opt_error(c, NBD_OPT_STARTTLS, NBD_REP_ERR_INVALID,
                         "NBD_OPT_STARTTLS takes no data");
    }
    if (!c->tls_creds) {
        return opt_error(c, NBD_OPT_STARTTLS, NBD_REP_ERR_POLICY,
                         "TLS not configured");
    }
    if (c->tls) {
        return opt_error(c, NBD_OPT_STARTTLS, NBD_REP_ERR_INVALID,
                         "TLS is already active");
    }
    if (opt_reply(c, NBD_OPT_STARTTLS, NBD_REP_ACK, NULL, 0) != OPT_CONTINUE) {
        return OPT_CLOSE;
    }
    Error *err = NULL;
    c->tls = tls_session_server(c->tls_creds, c->tls_authz, c->fd, &err);
    if (!c->tls) {
        log_msg(LOG_LEVEL_WARNING, "NBD client refused: %s (from %s)",
                error_get_pretty(err), c->peer);
        nbd_client_note_close(c, LOG_LEVEL_INFO, "refused by TLS or authz");
        error_free(err);
        return OPT_CLOSE;
    }
    _cleanup_free_ char *desc = tls_session_desc(c->tls);
    log_msg(LOG_LEVEL_INFO, "NBD client %s: TLS session %s", c->peer,
            desc ? desc : "(no description)");
    return OPT_CONTINUE;
}

/* Before STARTTLS on a server that requires TLS: the answer to opt, an
 * option other than STARTTLS and ABORT (whose data was read). */
static int opt_before_tls(NBDClient *c, uint32_t opt)
{
    if (opt == NBD_OPT_EXPORT_NAME) {
        return OPT_CLOSE;   /* it cannot carry an error */
    }
    return opt_error(c, opt, NBD_REP_ERR_TLS_REQD,
                     "Option 0x%x not permitted before TLS", opt);
}

/* Run the handshake: OPT_TRANSMIT with c->exp pinned, or OPT_CLOSE. */
int nbd_negotiate(NBDClient *c)
{
    uint8_t hello[18];
    st_be64(hello, NBD_MAGIC);
    st_be64(hello + 8, NBD_IHAVEOPT);
    st_be16(hello + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    if (nbd_conn_send_buf(c, hello, sizeof(hello)) < 0) {
        return OPT_CLOSE;
    }
    uint8_t cflags[4];
    if (nbd_conn_recv_full(c, cflags, 4) < 0) {
        return OPT_CLOSE;
    }
    uint32_t flags = ld_be32(cflags);
    if (flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
        return OPT_CLOSE;   /* the spec says: drop unknown client flags */
    }
    c->no_zeroes = flags & NBD_FLAG_C_NO_ZEROES;

    _cleanup_free_ uint8_t *data = malloc(NBD_MAX_OPT_PAYLOAD);
    if (!data) {
        return OPT_CLOSE;
    }
    for (;;) {
        uint8_t hdr[16];
        if (nbd_conn_recv_full(c, hdr, sizeof(hdr)) < 0) {
            return OPT_CLOSE;
        }
        if (ld_be64(hdr) != NBD_IHAVEOPT) {
            return OPT_CLOSE;
        }
        uint32_t opt = ld_be32(hdr + 8);
        uint32_t len = ld_be32(hdr + 12);
        if (len > NBD_MAX_OPT_PAYLOAD) {
            return OPT_CLOSE;   /* invariant 5: never allocate for it */
        }
        if (nbd_conn_recv_full(c, data, len) < 0) {
            return OPT_CLOSE;
        }
        int r;
        if (c->tls_creds && !c->tls && opt != NBD_OPT_STARTTLS &&
            opt != NBD_OPT_ABORT) {
            r = opt_before_tls(c, opt);
            if (r != OPT_CONTINUE) {
                return r;
            }
            continue;
        }
        switch (opt) {
        case NBD_OPT_EXPORT_NAME:
            r = opt_export_name(c, data, len);
            break;
        case NBD_OPT_ABORT:
            opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
            return OPT_CLOSE;
        case NBD_OPT_LIST:
            r = opt_list(c, len);
            break;
        case NBD_OPT_INFO:
        case NBD_OPT_GO:
            r = opt_info_go(c, opt, data, len);
            break;
        case NBD_OPT_STRUCTURED_REPLY:
            if (len != 0) {
                r = opt_error(c, opt, NBD_REP_ERR_INVALID,
                              "NBD_OPT_STRUCTURED_REPLY takes no data");
            } else {
                c->structured = true;
                r = opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
            }
            break;
        case NBD_OPT_LIST_META_CONTEXT:
        case NBD_OPT_SET_META_CONTEXT:
            r = opt_meta(c, opt, data, len);
            break;
        case NBD_OPT_STARTTLS:
            r = opt_starttls(c, len);
            break;
        default:
            r = opt_error(c, opt, NBD_REP_ERR_UNSUP, "option %u unsupported",
                          opt);
            break;
        }
        if (r != OPT_CONTINUE) {
            return r;
        }
    }
}
