/*
 * NBD server transmission phase: what one request does.  A request read by
 * connections.c is checked (flags, bounds, writable), run against the
 * export's node and answered: simple replies, or structured replies once
 * negotiated (a read as data and hole chunks, an error as an error chunk).
 * Block status goes to extents.c.
 *
 * Contract: every request handed to nbd_handle_request gets exactly one
 * reply, sent after the node call returned (invariant 2 in
 * nbd-internal.h).  nbd_try_read_inline answers a small read only when its
 * data needs no disk wait (invariant 6), else it sends nothing.  Only this
 * file maps errno values to NBD error codes.  The inline read test is here
 * rather than with the receiver because it is a property of the request
 * (type, flags, size, bounds).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "nbd/nbd-internal.h"
#include "util/cleanup.h"
#include "util/cutils.h"

#define NBD_MAX_READ_SEGMENTS  64                   /* data/hole chunks per read reply */
#define NBD_SPARSE_READ_MIN    (64 * 1024)          /* smaller reads skip hole detection */
#define NBD_INLINE_READ_MAX    (32 * 1024)          /* cached reads the reader answers itself */
_Static_assert(NBD_INLINE_READ_MAX < NBD_SPARSE_READ_MIN,
               "an inline read must not look for holes");

static uint32_t nbd_error_code(int err)
{
    if (err < 0) {
        err = -err;
    }
    switch (err) {
    case 0:
        return NBD_SUCCESS;
    case EPERM:
    case EROFS:
    case EACCES:
        return NBD_EPERM;
    case EIO:
        return NBD_EIO;
    case ENOMEM:
        return NBD_ENOMEM;
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
        return NBD_ENOSPC;
    case EOVERFLOW:
        return NBD_EOVERFLOW;
    case ENOTSUP:
        return NBD_ENOTSUP;
    case ESHUTDOWN:
        return NBD_ESHUTDOWN;
    case EINVAL:
        return NBD_EINVAL;
    default:
        return NBD_EIO;
    }
}

void nbd_put_chunk_header(uint8_t *p, uint16_t flags, uint16_t type,
                          uint64_t handle, uint32_t len)
{
    st_be32(p, NBD_STRUCTURED_REPLY_MAGIC);
    st_be16(p + 4, flags);
    st_be16(p + 6, type);
    st_be64(p + 8, handle);
    st_be32(p + 16, len);
}

static void reply_simple(NBDClient *c, const NBDRequest *req, int err,
                         const void *data, size_t len)
{
    uint8_t hdr[NBD_SIMPLE_REPLY_SIZE];
    st_be32(hdr, NBD_SIMPLE_REPLY_MAGIC);
    st_be32(hdr + 4, nbd_error_code(err));
    st_be64(hdr + 8, req->handle);
    struct iovec iov[2] = {
        { .iov_base = hdr, .iov_len = sizeof(hdr) },
        { .iov_base = (void *)data, .iov_len = len },
    };
    nbd_client_send(c, iov, len ? 2 : 1);
}

/* The error reply of a request: an error chunk when structured replies
 * are on, else a simple reply (which carries no data). */
void nbd_reply_error(NBDClient *c, const NBDRequest *req, int err,
                     const char *msg)
{
    if (!c->structured) {
        reply_simple(c, req, err, NULL, 0);
        return;
    }
    size_t ml = msg ? MIN(strlen(msg), (size_t)NBD_MAX_STRING) : 0;
    uint8_t hdr[NBD_CHUNK_HEADER_SIZE + 6];
    nbd_put_chunk_header(hdr, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR,
                     req->handle, (uint32_t)(6 + ml));
    st_be32(hdr + NBD_CHUNK_HEADER_SIZE, nbd_error_code(err));
    st_be16(hdr + NBD_CHUNK_HEADER_SIZE + 4, (uint16_t)ml);
    struct iovec iov[2] = {
        { .iov_base = hdr, .iov_len = sizeof(hdr) },
        { .iov_base = (void *)msg, .iov_len = ml },
    };
    nbd_client_send(c, iov, ml ? 2 : 1);
}

static void reply_ok(NBDClient *c, const NBDRequest *req)
{
    reply_simple(c, req, 0, NULL, 0);
}

bool nbd_in_bounds(const NBDClient *c, const NBDRequest *req)
{
    return req->offset <= c->size && req->len <= c->size - req->offset;
}

/* Flags a command may carry (FUA is accepted everywhere, as the spec
 * requires once NBD_FLAG_SEND_FUA is advertised). */
static uint16_t allowed_flags(const NBDClient *c, uint16_t type)
{
    uint16_t f = NBD_CMD_FLAG_FUA;
    switch (type) {
    case NBD_CMD_READ:
        return f | (c->structured ? NBD_CMD_FLAG_DF : 0);
    case NBD_CMD_WRITE_ZEROES:
        return f | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO;
    case NBD_CMD_BLOCK_STATUS:
        return f | NBD_CMD_FLAG_REQ_ONE;
    default:
        return f;
    }
}

typedef struct ReadSegment {
    uint64_t offset;
    uint32_t len;
    bool hole;
    uint8_t hdr[NBD_CHUNK_HEADER_SIZE + 12];
} ReadSegment;

/* With rflags = BDRV_REQ_NOWAIT, returns false (and sends nothing) when the
 * data is not in the page cache; otherwise the request is answered. */
static bool do_read_structured(NBDClient *c, NBDWorker *w, const NBDRequest *req,
                               int rflags)
{
    BlockDriverState *bs = c->exp->bs;
    ReadSegment seg[NBD_MAX_READ_SEGMENTS];
    int nseg = 0;
    uint64_t pos = req->offset, end = req->offset + req->len;

    /* Find holes unless the client wants a single chunk, or the read is
     * so small that a hole chunk would save little. */
    bool sparse = !(req->flags & NBD_CMD_FLAG_DF) &&
                  req->len >= NBD_SPARSE_READ_MIN;
    while (pos < end && sparse) {
        uint64_t pnum = 0;
        int st = bdrv_block_status(bs, pos, end - pos, &pnum);
        if (st < 0 || pnum == 0) {
            break;
        }
        pnum = MIN(pnum, end - pos);
        bool hole = (st & BDRV_BLOCK_ZERO) != 0;
        if (nseg > 0 && seg[nseg - 1].hole == hole) {
            seg[nseg - 1].len += (uint32_t)pnum;
        } else if (nseg == NBD_MAX_READ_SEGMENTS - 1) {
            break;   /* the rest goes into one data chunk below */
        } else {
            seg[nseg++] = (ReadSegment){ .offset = pos, .len = (uint32_t)pnum,
                                         .hole = hole };
        }
        pos += pnum;
    }
    if (pos < end) {
        if (nseg > 0 && !seg[nseg - 1].hole) {
            seg[nseg - 1].len += (uint32_t)(end - pos);
        } else {
            seg[nseg++] = (ReadSegment){ .offset = pos,
                                         .len = (uint32_t)(end - pos),
                                         .hole = false };
        }
    }

    /* Read every data segment before sending anything, so that an error
     * is reported as the only chunk. */
    for (int i = 0; i < nseg; i++) {
        if (seg[i].hole) {
            continue;
        }
        struct iovec iov = {
            .iov_base = w->buf + (seg[i].offset - req->offset),
            .iov_len = seg[i].len,
        };
        int r = bdrv_preadv(bs, seg[i].offset, seg[i].len, &iov, 1, rflags);
        if (r == -EAGAIN && (rflags & BDRV_REQ_NOWAIT)) {
            return false;
        }
        if (r < 0) {
            nbd_reply_error(c, req, r, "read failed");
            return true;
        }
    }

    struct iovec iov[2 * NBD_MAX_READ_SEGMENTS];
    int niov = 0;
    for (int i = 0; i < nseg; i++) {
        uint16_t flags = i == nseg - 1 ? NBD_REPLY_FLAG_DONE : 0;
        uint8_t *h = seg[i].hdr;
        if (seg[i].hole) {
            nbd_put_chunk_header(h, flags, NBD_REPLY_TYPE_OFFSET_HOLE, req->handle, 12);
            st_be64(h + NBD_CHUNK_HEADER_SIZE, seg[i].offset);
            st_be32(h + NBD_CHUNK_HEADER_SIZE + 8, seg[i].len);
            iov[niov++] = (struct iovec){ h, NBD_CHUNK_HEADER_SIZE + 12 };
        } else {
            nbd_put_chunk_header(h, flags, NBD_REPLY_TYPE_OFFSET_DATA, req->handle,
                             8 + seg[i].len);
            st_be64(h + NBD_CHUNK_HEADER_SIZE, seg[i].offset);
            iov[niov++] = (struct iovec){ h, NBD_CHUNK_HEADER_SIZE + 8 };
            iov[niov++] = (struct iovec){ w->buf + (seg[i].offset - req->offset),
                                          seg[i].len };
        }
    }
    nbd_client_send(c, iov, niov);
    return true;
}

/* Answer a read.  rflags as for do_read_structured. */
static bool do_read(NBDClient *c, NBDWorker *w, const NBDRequest *req, int rflags)
{
    if (req->len > NBD_MAX_PAYLOAD) {
        nbd_reply_error(c, req, EINVAL, "read larger than 32 MiB");
        return true;
    }
    if (!nbd_in_bounds(c, req)) {
        nbd_reply_error(c, req, EINVAL, "read past the end of the export");
        return true;
    }
    if (req->len == 0) {
        if (c->structured) {
            uint8_t h[NBD_CHUNK_HEADER_SIZE];
            nbd_put_chunk_header(h, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE,
                             req->handle, 0);
            struct iovec iov = { h, sizeof(h) };
            nbd_client_send(c, &iov, 1);
        } else {
            reply_ok(c, req);
        }
        return true;
    }
    if (w->cap < req->len) {   /* admitted reads have their buffer */
        nbd_reply_error(c, req, ENOMEM, "out of memory");
        return true;
    }
    int r;
    if (c->structured) {
        return do_read_structured(c, w, req, rflags);
    }
    struct iovec iov = { .iov_base = w->buf, .iov_len = req->len };
    r = bdrv_preadv(c->exp->bs, req->offset, req->len, &iov, 1, rflags);
    if (r == -EAGAIN && (rflags & BDRV_REQ_NOWAIT)) {
        return false;
    }
    if (r < 0) {
        reply_simple(c, req, r, NULL, 0);
    } else {
        reply_simple(c, req, 0, w->buf, req->len);
    }
    return true;
}

/* A small read whose data is in the page cache costs less than handing the
 * connection to another worker: the reader answers it itself, still holding
 * recv_lock (invariant 6).  False when the request must go the normal way:
 * anything unusual, or data that would have to come from the disk. */
bool nbd_try_read_inline(NBDClient *c, NBDWorker *w, const NBDRequest *req)
{
    if (req->type != NBD_CMD_READ || req->len == 0 ||
        req->len > NBD_INLINE_READ_MAX || req->len > w->cap ||
        !nbd_in_bounds(c, req) ||
        (req->flags & ~allowed_flags(c, NBD_CMD_READ))) {
        return false;
    }
    return do_read(c, w, req, BDRV_REQ_NOWAIT);
}
/* Reply to a command that writes: 0 → ok, else the mapped error. */
static void reply_result(NBDClient *c, const NBDRequest *req, int r,
                         const char *what)
{
    if (r < 0) {
        nbd_reply_error(c, req, r, what);
    } else {
        reply_ok(c, req);
    }
}

bool nbd_write_async_ok(const NBDClient *c, const NBDRequest *req)
{
    return req->type == NBD_CMD_WRITE && req->flags == 0 && req->len > 0 &&
           !req->early_err && !c->tls && c->exp->writable &&
           nbd_in_bounds(c, req);
}

size_t nbd_write_reply(const NBDClient *c, const NBDRequest *req, int r,
                       uint8_t *buf)
{
    static const char msg[] = "write failed";
    if (r >= 0 || !c->structured) {
        st_be32(buf, NBD_SIMPLE_REPLY_MAGIC);
        st_be32(buf + 4, nbd_error_code(r));
        st_be64(buf + 8, req->handle);
        return NBD_SIMPLE_REPLY_SIZE;
    }
    size_t ml = sizeof(msg) - 1;
    _Static_assert(NBD_CHUNK_HEADER_SIZE + 6 + sizeof(msg) - 1 <=
                   NBD_DEFERRED_MAX, "a write's error chunk is deferrable");
    nbd_put_chunk_header(buf, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR,
                         req->handle, (uint32_t)(6 + ml));
    st_be32(buf + NBD_CHUNK_HEADER_SIZE, nbd_error_code(r));
    st_be16(buf + NBD_CHUNK_HEADER_SIZE + 4, (uint16_t)ml);
    memcpy(buf + NBD_CHUNK_HEADER_SIZE + 6, msg, ml);
    return NBD_CHUNK_HEADER_SIZE + 6 + ml;
}

void nbd_handle_request(NBDClient *c, NBDWorker *w, const NBDRequest *req)
{
    BlockDriverState *bs = c->exp->bs;
    if (req->early_err) {
        nbd_reply_error(c, req, req->early_err, "request refused");
        return;
    }
    if (req->flags & ~allowed_flags(c, req->type)) {
        nbd_reply_error(c, req, EINVAL, "flag not valid for this command");
        return;
    }
    bool writes = req->type == NBD_CMD_WRITE || req->type == NBD_CMD_TRIM ||
                  req->type == NBD_CMD_WRITE_ZEROES;
    if (writes && !c->exp->writable) {
        nbd_reply_error(c, req, EPERM, "export is read-only");
        return;
    }
    if (writes && !nbd_in_bounds(c, req)) {
        nbd_reply_error(c, req, ENOSPC, "write past the end of the export");
        return;
    }
    bool fua = req->flags & NBD_CMD_FLAG_FUA;
    int r;
    switch (req->type) {
    case NBD_CMD_READ:
        do_read(c, w, req, 0);
        return;
    case NBD_CMD_WRITE: {
        struct iovec iov = { .iov_base = w->buf, .iov_len = req->len };
        r = req->len ? bdrv_client_pwritev(bs, req->offset, req->len, &iov, 1,
                                           fua ? BDRV_REQ_FUA : 0) : 0;
        reply_result(c, req, r, "write failed");
        return;
    }
    case NBD_CMD_FLUSH:
        reply_result(c, req, bdrv_flush(bs), "flush failed");
        return;
    case NBD_CMD_TRIM:
        r = bdrv_client_pdiscard(bs, req->offset, req->len);
        if (r >= 0 && fua) {
            r = bdrv_flush(bs);
        }
        reply_result(c, req, r, "trim failed");
        return;
    case NBD_CMD_WRITE_ZEROES: {
        int flags = 0;
        if (!(req->flags & NBD_CMD_FLAG_NO_HOLE)) {
            flags |= BDRV_REQ_MAY_UNMAP;
        }
        if (req->flags & NBD_CMD_FLAG_FAST_ZERO) {
            flags |= BDRV_REQ_NO_FALLBACK;
        }
        r = bdrv_client_pwrite_zeroes(bs, req->offset, req->len, flags);
        if (r >= 0 && fua) {
            r = bdrv_flush(bs);
        }
        reply_result(c, req, r, r == -ENOTSUP ? "fast zeroing not possible"
                                              : "write zeroes failed");
        return;
    }
    case NBD_CMD_BLOCK_STATUS:
        nbd_do_block_status(c, req);
        return;
    default:
        nbd_reply_error(c, req, EINVAL, "unknown command");
        return;
    }
}
