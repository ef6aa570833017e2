/*
 * `bitback backup` pulling over NBD: what the run asks of the fleecing
 * export itself, through libnbd.  The data is read through the block
 * layer's nbd driver (backup-live.c's pull_copy); this file answers the
 * two questions the driver does not: whether the server allows several
 * connections to the export (multi-conn), and which extents the exported
 * dirty bitmap (the `qemu:dirty-bitmap:NAME` metadata context, as QEMU and
 * bitbackd serve it) marks dirty -- the data of an incremental.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libnbd.h>

#include "block/drivers/nbd.h"
#include "cli/backup-internal.h"
#include "util/cleanup.h"
#include "util/cutils.h"

/* Largest length of one block status request: the wire field is 32 bits;
 * a round, aligned value below it. */
#define PULL_STATUS_MAX_LEN (1u << 30)

/* Bit 0 of a qemu:dirty-bitmap:NAME extent's flags: dirty. */
#define PULL_STATE_DIRTY 1u

typedef struct DirtyCollect {
    const char *context;
    ExtentList list;
    uint64_t size;
    uint64_t end;                       /* where the replies reached */
} DirtyCollect;

/* libnbd's extent callback: entries are (length, flags) pairs from
 * offset on; only the bitmap's context counts. */
static int dirty_cb(void *opaque, const char *metacontext, uint64_t offset,
                    uint32_t *entries, size_t nr_entries, int *error)
{
    DirtyCollect *c = opaque;

    (void)error;
    if (strcmp(metacontext, c->context)) {
        return 0;
    }
    for (size_t i = 0; i + 1 < nr_entries; i += 2) {
        uint64_t len = MIN((uint64_t)entries[i], c->size - MIN(offset, c->size));

        if (!len) {
            break;
        }
        if (entries[i + 1] & PULL_STATE_DIRTY) {
            extent_list_add(&c->list, offset, len);
        }
        offset += len;
    }
    c->end = MAX(c->end, offset);
    return 0;
}

bool pull_probe_export(const char *uri, const TLSCreds *tls,
                       const char *bitmap, uint64_t size,
                       bool *ret_multi_conn, BdrvDirtyExtent **ret_ext,
                       size_t *ret_n, Error **errp)
{
    struct nbd_handle *h = nbd_create();
    _cleanup_free_ char *context = NULL;
    DirtyCollect c = { .size = size };
    bool ok = false;
    int64_t esize;

    if (!h) {
        error_setg(errp, "libnbd: %s", nbd_get_error());
        return false;
    }
    if (bitmap) {
        if (asprintf(&context, "qemu:dirty-bitmap:%s", bitmap) < 0) {
            abort();
        }
        c.context = context;
        if (nbd_add_meta_context(h, context) < 0) {
            error_setg(errp, "libnbd: %s", nbd_get_error());
            goto out;
        }
    }
    if (!nbd_handle_set_tls(h, tls, NULL)) {
        error_setg(errp, "libnbd: %s", nbd_get_error());
        goto out;
    }
    uint64_t deadline = clock_monotonic_ns() +
                        NBD_OPEN_ATTEMPT_SECONDS * UINT64_C(1000000000);
    if (!nbd_handle_wait_connected(h, nbd_aio_connect_uri(h, uri), uri,
                                   deadline, NBD_OPEN_ATTEMPT_SECONDS, errp)) {
        goto out;
    }
    esize = nbd_get_size(h);
    if (esize < 0 || (uint64_t)esize != size) {
        error_setg(errp, "%s: the export's size is not the disk's", uri);
        goto out;
    }
    *ret_multi_conn = nbd_can_multi_conn(h) == 1;
    if (bitmap) {
        if (nbd_can_meta_context(h, context) != 1) {
            error_setg(errp, "%s: the server does not offer %s", uri, context);
            goto out;
        }
        /* The server may answer fewer bytes than asked: go on from where
         * its replies reached. */
        while (c.end < size) {
            uint64_t at = c.end;
            nbd_extent_callback cb = { .callback = dirty_cb, .user_data = &c };

            if (nbd_block_status(h, MIN(size - at, PULL_STATUS_MAX_LEN), at,
                                 cb, 0) < 0) {
                error_setg(errp, "%s: block status at %llu: %s", uri,
                           (unsigned long long)at, nbd_get_error());
                goto out;
            }
            if (c.end <= at) {
                error_setg(errp, "%s: block status at %llu made no progress",
                           uri, (unsigned long long)at);
                goto out;
            }
        }
    }
    *ret_ext = steal_pointer(&c.list.ext);
    *ret_n = c.list.n;
    ok = true;
out:
    free(c.list.ext);
    nbd_shutdown(h, 0);
    nbd_close(h);
    return ok;
}
