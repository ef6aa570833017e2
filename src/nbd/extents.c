/*
 * NBD server block status (NBD_CMD_BLOCK_STATUS): the extents of the
 * metadata contexts a client selected, base:allocation from the node's
 * block status and qemu:dirty-bitmap:NAME from an exported bitmap
 * (qemu-nbd -B semantics: flag 1 = dirty).
 *
 * Contract: one reply per request, one chunk per selected context, each
 * with at least one and at most NBD_MAX_EXTENTS descriptors (one with
 * NBD_CMD_FLAG_REQ_ONE); a range the node or the bitmap knows nothing
 * about is reported with status 0.
 */
#include <errno.h>
#include <stdlib.h>

#include "nbd/nbd-internal.h"
#include "util/cleanup.h"
#include "util/cutils.h"

#define NBD_MAX_EXTENTS        16384                /* descriptors per context and reply */

/* Fill out (big endian length/flags pairs) with base:allocation extents of
 * [offset, offset+len), merged; at most max of them.  Returns the count or
 * -errno. */
static int extents_allocation(BlockDriverState *bs, uint64_t offset,
                              uint32_t len, uint8_t *out, int max)
{
    uint64_t pos = offset, end = offset + len;
    int n = 0;
    uint32_t last_flags = 0, last_len = 0;
    while (pos < end) {
        uint64_t pnum = 0;
        int st = bdrv_block_status(bs, pos, end - pos, &pnum);
        if (st < 0) {
            if (n == 0) {
                return st;
            }
            break;
        }
        if (pnum == 0) {
            break;
        }
        pnum = MIN(pnum, end - pos);
        uint32_t f = (st & BDRV_BLOCK_DATA ? 0 : NBD_STATE_HOLE) |
                     (st & BDRV_BLOCK_ZERO ? NBD_STATE_ZERO : 0);
        if (n > 0 && f == last_flags) {
            last_len += (uint32_t)pnum;
            st_be32(out + 8 * (n - 1), last_len);
        } else {
            if (n == max) {
                break;
            }
            last_flags = f;
            last_len = (uint32_t)pnum;
            st_be32(out + 8 * n, last_len);
            st_be32(out + 8 * n + 4, last_flags);
            n++;
        }
        pos += pnum;
    }
    if (n == 0) {
        /* Nothing known: status 0 is always a safe answer. */
        st_be32(out, len);
        st_be32(out + 4, 0);
        n = 1;
    }
    return n;
}

/* The same for qemu:dirty-bitmap:NAME: the bitmap is asked for no more
 * than max extents, so a request over a fragmented bitmap costs O(max)
 * memory and bs->lock is never held for the whole range. */
static int extents_dirty(BdrvDirtyBitmap *bm, uint64_t offset, uint32_t len,
                         uint8_t *out, int max)
{
    _cleanup_free_ BdrvDirtyExtent *ext = calloc((size_t)max, sizeof(*ext));
    if (!ext) {
        return -ENOMEM;
    }
    int n = (int)bdrv_dirty_bitmap_extents(bm, offset, len, false, ext,
                                           (size_t)max);
    for (int i = 0; i < n; i++) {
        st_be32(out + 8 * i, (uint32_t)ext[i].length);
        st_be32(out + 8 * i + 4, ext[i].dirty ? NBD_STATE_DIRTY : 0);
    }
    if (n == 0) {
        /* Past the end of the bitmap (a smaller backing node): clean. */
        st_be32(out, len);
        st_be32(out + 4, 0);
        n = 1;
    }
    return n;
}

void nbd_do_block_status(NBDClient *c, const NBDRequest *req)
{
    if (!c->structured || c->nctx == 0) {
        nbd_reply_error(c, req, EINVAL, "no metadata context was selected");
        return;
    }
    if (req->len == 0 || !nbd_in_bounds(c, req)) {
        nbd_reply_error(c, req, EINVAL, "block status range past the end");
        return;
    }
    NBDExport *e = c->exp;
    bool one = req->flags & NBD_CMD_FLAG_REQ_ONE;
    int max = one ? 1 : (int)MIN((uint64_t)NBD_MAX_EXTENTS, req->len / 512 + 2);
    size_t per_ctx = NBD_CHUNK_HEADER_SIZE + 4 + 8 * (size_t)max;
    _cleanup_free_ uint8_t *buf = malloc(per_ctx * (size_t)c->nctx);
    _cleanup_free_ struct iovec *iov = calloc((size_t)c->nctx, sizeof(*iov));
    if (!buf || !iov) {
        nbd_reply_error(c, req, ENOMEM, "out of memory");
        return;
    }
    int k = 0;
    for (int i = -1; i < e->nbitmaps; i++) {
        uint32_t id = i < 0 ? c->base_id : c->bitmap_ids[i];
        if (id == 0) {
            continue;
        }
        uint8_t *chunk = buf + per_ctx * (size_t)k;
        uint8_t *desc = chunk + NBD_CHUNK_HEADER_SIZE + 4;
        int n = i < 0 ? extents_allocation(e->bs, req->offset, req->len, desc, max)
                      : extents_dirty(e->bitmaps[i], req->offset, req->len,
                                      desc, max);
        if (n < 0) {
            nbd_reply_error(c, req, n, "block status failed");
            return;
        }
        nbd_put_chunk_header(chunk, k == c->nctx - 1 ? NBD_REPLY_FLAG_DONE : 0,
                         NBD_REPLY_TYPE_BLOCK_STATUS, req->handle,
                         (uint32_t)(4 + 8 * n));
        st_be32(chunk + NBD_CHUNK_HEADER_SIZE, id);
        iov[k] = (struct iovec){ chunk, NBD_CHUNK_HEADER_SIZE + 4 + 8 * (size_t)n };
        k++;
    }
    nbd_client_send(c, iov, k);
}
