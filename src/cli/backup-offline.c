/*
 * `bitback backup --image`: an offline backup, the steps of backup-cmd.c's
 * opening comment done on the image itself: the bitmaps changed in the
 * image, the data copied by this process.
 */
#include <assert.h>
#include <errno.h>
#include <libgen.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/backup-internal.h"
#include "cli/progress.h"
#include "util/bufzero.h"
#include "util/cleanup.h"
#include "util/cutils.h"

#define BACKUP_COPY_CHUNK (4u << 20)  /* one read or write; a buffer per connection */

static void offline_read_bitmaps(BlockDriverState *bs, Disk *d)
{
    size_t n = 0;

    backup_disk_clear_bitmaps(d);
    for (BdrvDirtyBitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
        n++;
    }
    d->bitmaps = calloc(n ? n : 1, sizeof(*d->bitmaps));
    if (!d->bitmaps) {
        abort();
    }
    for (BdrvDirtyBitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
        BitmapInfo *b = &d->bitmaps[d->n_bitmaps++];

        b->name = backup_strdup(bm->name);
        b->recording = !bm->disabled;
        b->inconsistent = bm->inconsistent;
        b->busy = bm->busy;
        b->granularity = bm->granularity;
        b->count = (int64_t)bdrv_dirty_bitmap_count(bm);
        /* NULL when unknown (""): plan_disk then skips the check. */
        b->generation = bm->persistent && bm->generation[0]
                        ? backup_strdup(bm->generation) : NULL;
        b->prior_generation = bm->persistent && !bm->generation[0] &&
                              bm->prior_generation[0]
                              ? backup_strdup(bm->prior_generation) : NULL;
    }
}

/* Every dirty extent of bm in [0, size), in a malloc'd array (caller
 * frees), asked of the bitmap DIRTY_BATCH at a time.  The copy needs the
 * whole list up front (its total is the progress bar's) and the bitmap is
 * this process's own; aborts when memory is short, as the full copy's list
 * does. */
#define DIRTY_BATCH 4096

static BdrvDirtyExtent *all_dirty_extents(BdrvDirtyBitmap *bm, uint64_t size,
                                          size_t *ret_n)
{
    BdrvDirtyExtent *ext = NULL;
    size_t n = 0, cap = 0, got;
    uint64_t pos = 0;

    do {
        if (cap - n < DIRTY_BATCH) {
            cap = cap ? cap * 2 : DIRTY_BATCH;
            BdrvDirtyExtent *bigger = realloc(ext, cap * sizeof(*ext));
            if (!bigger) {
                abort();
            }
            ext = bigger;
        }
        got = bdrv_dirty_bitmap_extents(bm, pos, size - pos, true, ext + n,
                                        cap - n);
        n += got;
        if (got) {
            pos = ext[n - 1].start + ext[n - 1].length;
        }
    } while (got && pos < size);
    *ret_n = n;
    return ext;
}

/* Compressed writes take whole target clusters: widen each extent (sorted,
 * as block status and the bitmap give them) to cluster boundaries (the
 * image end for the last), merging extents that then meet, so that no
 * cluster is written twice.  Returns the new count. */
static size_t compress_extents(BdrvDirtyExtent *ext, size_t n, uint64_t cs,
                               uint64_t size)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t start = ROUND_DOWN(ext[i].start, cs);
        uint64_t end = MIN(ROUND_UP(ext[i].start + ext[i].length, cs), size);
        if (k && start <= ext[k - 1].start + ext[k - 1].length) {
            uint64_t prev_end = ext[k - 1].start + ext[k - 1].length;
            ext[k - 1].length = MAX(prev_end, end) - ext[k - 1].start;
        } else {
            ext[k] = ext[i];
            ext[k].start = start;
            ext[k].length = end - start;
            k++;
        }
    }
    return k;
}

void extent_list_add(ExtentList *l, uint64_t off, uint64_t len)
{
    if (l->n && l->ext[l->n - 1].start + l->ext[l->n - 1].length == off) {
        l->ext[l->n - 1].length += len;
        return;
    }
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 256;
        BdrvDirtyExtent *bigger = realloc(l->ext, cap * sizeof(*bigger));
        if (!bigger) {
            abort();
        }
        l->ext = bigger;
        l->cap = cap;
    }
    l->ext[l->n++] = (BdrvDirtyExtent){ off, len, true };
}

bool backup_data_extents(BlockDriverState *src, const Disk *d,
                         BdrvDirtyExtent **ret_ext, size_t *ret_n,
                         Error **errp)
{
    ExtentList l = { 0 };
    uint64_t off = 0;

    while (off < d->size) {
        uint64_t pnum = 0;
        int st = bdrv_block_status(src, off, d->size - off, &pnum);
        if (st < 0 || pnum == 0) {
            error_setg_errno(errp, st < 0 ? -st : EIO,
                             "%s: block status at %llu", d->node,
                             (unsigned long long)off);
            free(l.ext);
            return false;
        }
        if (!(st & BDRV_BLOCK_ZERO)) {
            extent_list_add(&l, off, pnum);
        }
        off += pnum;
    }
    *ret_ext = l.ext;
    *ret_n = l.n;
    return true;
}

/* The union of d's source bitmaps in src, as extents (caller frees). */
static bool bitmap_extents(BlockDriverState *src, Disk *d,
                           BdrvDirtyExtent **ret_ext, size_t *ret_n,
                           Error **errp)
{
    BdrvDirtyBitmap *u = bdrv_create_dirty_bitmap(src, d->granularity,
                                                  d->src_bitmap, errp);
    BdrvDirtyBitmap *srcs[BACKUP_MAX_DISKS * 64];
    int ns = 0;

    if (!u) {
        return false;
    }
    for (size_t i = 0; i < d->n_sources && ns < (int)(sizeof(srcs) / sizeof(*srcs)); i++) {
        srcs[ns] = bdrv_find_dirty_bitmap(src, d->sources[i]);
        if (!srcs[ns]) {
            error_setg(errp, "%s: bitmap '%s' vanished", d->node, d->sources[i]);
            bdrv_release_dirty_bitmap(u);
            return false;
        }
        ns++;
    }
    if (!bdrv_merge_dirty_bitmaps(u, srcs, ns, errp)) {
        bdrv_release_dirty_bitmap(u);
        return false;
    }
    *ret_ext = all_dirty_extents(u, d->size, ret_n);
    bdrv_release_dirty_bitmap(u);
    return true;
}

bool backup_copy_image(const BackupOpts *o, BlockDriverState *src, Disk *d,
                       Error **errp)
{
    BdrvDirtyExtent *ext = NULL;
    size_t n_ext = 0;

    if (d->level == REPO_LEVEL_FULL
        ? !backup_data_extents(src, d, &ext, &n_ext, errp)
        : !bitmap_extents(src, d, &ext, &n_ext, errp)) {
        return false;
    }
    return backup_copy_extents(o, &src, 1, d, ext, n_ext, NULL, errp);
}

/* What the copy threads of backup_copy_extents share.  lock guards next,
 * done, r, the progress bar and every access to dst (one writer at a
 * time: the reads, from separate connections, are what runs in
 * parallel). */
typedef struct CopyShared {
    pthread_mutex_t lock;
    BlockDriverState *dst;
    const BdrvDirtyExtent *ext;
    size_t n_ext;
    uint64_t size;
    int flags;
    size_t next;                        /* next extent to hand out */
    uint64_t next_off;                  /* where in it */
    uint64_t done;
    int r;                              /* first error, or 0 */
    const volatile sig_atomic_t *stop;
    CliProgress *p;
} CopyShared;

typedef struct CopyWorker {
    CopyShared *sh;
    BlockDriverState *src;
    pthread_t tid;
} CopyWorker;

/* Hand out the next piece (at most BACKUP_COPY_CHUNK, inside one extent,
 * so compressed writes keep whole clusters).  false: nothing left, or
 * the copy failed or was stopped.  Caller holds sh->lock. */
static bool copy_next_locked(CopyShared *sh, uint64_t *ret_off,
                             uint64_t *ret_len)
{
    while (sh->r == 0 && sh->next < sh->n_ext) {
        const BdrvDirtyExtent *e = &sh->ext[sh->next];
        uint64_t end = MIN(e->start + e->length, sh->size);
        uint64_t off = MAX(e->start, sh->next_off);

        if (off >= end) {
            sh->next++;
            continue;
        }
        if (sh->stop && *sh->stop) {
            sh->r = -EINTR;
            return false;
        }
        *ret_off = off;
        *ret_len = MIN(end - off, BACKUP_COPY_CHUNK);
        sh->next_off = off + *ret_len;
        return true;
    }
    return false;
}

static void *copy_worker(void *opaque)
{
    CopyWorker *w = opaque;
    CopyShared *sh = w->sh;
    _cleanup_free_ void *buf = aligned_alloc(4096, BACKUP_COPY_CHUNK);
    uint64_t off, len;

    pthread_mutex_lock(&sh->lock);
    if (!buf && !sh->r) {
        sh->r = -ENOMEM;
    }
    while (copy_next_locked(sh, &off, &len)) {
        int r;

        pthread_mutex_unlock(&sh->lock);
        r = bdrv_pread(w->src, off, buf, len);
        pthread_mutex_lock(&sh->lock);
        if (r >= 0 && sh->r == 0) {
            if (buf_is_zero(buf, len)) {
                r = bdrv_pwrite_zeroes(sh->dst, off, len, 0);
            } else {
                r = bdrv_pwrite(sh->dst, off, buf, len, sh->flags);
            }
        }
        if (r < 0 && !sh->r) {
            sh->r = r;
        }
        sh->done += len;
        cli_progress_update(sh->p, sh->done, 0);
    }
    pthread_mutex_unlock(&sh->lock);
    return NULL;
}

bool backup_copy_extents(const BackupOpts *o, BlockDriverState **srcs,
                         size_t n_src, Disk *d, BdrvDirtyExtent *ext,
                         size_t n_ext, const volatile sig_atomic_t *stop,
                         Error **errp)
{
    CopyShared sh = { .ext = ext, .size = d->size, .stop = stop };
    CopyWorker w[BACKUP_MAX_COPY_CONNS];
    size_t n_started = 0;
    uint64_t total = 0;
    int r;

    assert(n_src >= 1 && n_src <= BACKUP_MAX_COPY_CONNS);
    /* Where the recorded backing name resolves to no file (a rados
     * repository), the repository's options name the parent. */
    sh.dst = d->tmp_options
        ? bdrv_open_options(d->tmp_options, BDRV_O_RDWR, errp)
        : bdrv_open_image(d->tmp_block, "qcow2", BDRV_O_RDWR, errp);
    if (!sh.dst) {
        free(ext);
        return false;
    }
    if (o->compress) {
        /* create_target made a zstd qcow2 with the default clusters. */
        uint64_t cs = bdrv_get_cluster_size(sh.dst);
        assert(cs && BACKUP_COPY_CHUNK % cs == 0);
        n_ext = compress_extents(ext, n_ext, cs, d->size);
        sh.flags = BDRV_REQ_WRITE_COMPRESSED |
                   BDRV_REQ_COMPRESS_LEVEL(o->compress_level);
    }
    sh.n_ext = n_ext;
    for (size_t i = 0; i < n_ext; i++) {
        total += ext[i].length;
    }
    sh.p = cli_progress_new("backup", total, cli_progress_wanted(o->progress));
    pthread_mutex_init(&sh.lock, NULL);
    for (size_t i = 1; i < n_src; i++) {
        w[n_started] = (CopyWorker){ .sh = &sh, .src = srcs[i] };
        if (pthread_create(&w[n_started].tid, NULL, copy_worker,
                           &w[n_started])) {
            break;                      /* fewer threads: still correct */
        }
        n_started++;
    }
    {
        CopyWorker self = { .sh = &sh, .src = srcs[0] };
        copy_worker(&self);
    }
    for (size_t i = 0; i < n_started; i++) {
        pthread_join(w[i].tid, NULL);
    }
    pthread_mutex_destroy(&sh.lock);
    cli_progress_finish(sh.p);
    free(ext);
    r = sh.r;
    if (r >= 0) {
        r = bdrv_flush(sh.dst);
    }
    if (!bdrv_close(sh.dst, errp)) {
        return false;
    }
    if (r == -EINTR) {
        error_setg(errp, "%s: interrupted", d->node);
        return false;
    }
    if (r < 0) {
        error_setg_errno(errp, -r, "%s: copying to %s", d->node, d->tmp_path);
        return false;
    }
    return true;
}

/* The bitmap half of the transaction, done in the image: add PREFIX-ID
 * (persistent, recording) and freeze the older ones, then close so the
 * image is stored cleanly before any data is copied. */
static bool offline_bitmaps(const BackupOpts *o, Disk *d, Error **errp)
{
    BlockDriverState *bs = cli_open_image(o->image, o->format, BDRV_O_RDWR, errp);

    if (!bs) {
        return false;
    }
    if (!bdrv_dirty_bitmap_add(bs, d->new_bitmap,
                               d->granularity ? d->granularity
                                              : bdrv_default_bitmap_granularity(bs),
                               true, false, errp)) {
        bdrv_close(bs, NULL);
        return false;
    }
    for (size_t i = 0; i < d->n_freeze; i++) {
        BdrvDirtyBitmap *bm = bdrv_find_dirty_bitmap(bs, d->freeze[i]);

        if (bm && !bdrv_disable_dirty_bitmap(bm, errp)) {
            bdrv_close(bs, NULL);
            return false;
        }
    }
    return bdrv_close(bs, errp);
}

static bool offline_remove_stale(Repo *repo, const BackupOpts *o, Disk *d,
                                 Error **errp)
{
    size_t n_stale = 0;
    char **stale = backup_stale_bitmaps(repo, o, d, &n_stale);
    BlockDriverState *bs;
    bool ok = true;

    if (!n_stale) {
        return true;
    }
    bs = cli_open_image(o->image, o->format, BDRV_O_RDWR, errp);
    for (size_t i = 0; i < n_stale; i++) {
        if (bs && ok && !bdrv_dirty_bitmap_remove(bs, stale[i], errp)) {
            ok = false;
        }
    }
    repo_plan_free_names(stale, n_stale);
    if (!bs) {
        return false;
    }
    if (!bdrv_close(bs, ok ? errp : NULL)) {
        return false;
    }
    return ok;
}

char *backup_offline_node(const BackupOpts *o)
{
    assert(o->image);
    if (o->n_nodes) {
        return backup_strdup(o->nodes[0]);
    }
    _cleanup_free_ char *copy = backup_strdup(o->image);
    char *base = basename(copy), *dot = strrchr(base, '.');

    if (dot && dot != base) {
        *dot = '\0';
    }
    return backup_strdup(base);
}

int backup_offline(const BackupOpts *o, Repo *repo)
{
    Error *err = NULL;
    Disk d = {0};
    BlockDriverState *bs;
    RepoManifest *made = NULL;
    unsigned seq = 0;
    int ret = CLI_EXIT_ERROR;
    _cleanup_free_ char *time_iso = NULL;
    int64_t len;

    d.node = backup_offline_node(o);
    /* Read-only first: plan without touching the image. */
    bs = cli_open_image(o->image, o->format, 0, &err);
    if (!bs) {
        goto out;
    }
    len = bdrv_getlength(bs);
    offline_read_bitmaps(bs, &d);
    bdrv_close(bs, NULL);
    if (len < 0) {
        error_setg_errno(&err, (int)-len, "%s: cannot get its size", o->image);
        goto out;
    }
    d.size = (uint64_t)len;
    if (!backup_prepare_disks(repo, o, &d, 1, &seq, &err) ||
        !offline_bitmaps(o, &d, &err)) {
        goto out_tmp;
    }
    time_iso = backup_now_iso(o);
    backup_mark_started(repo, &d, 1);
    backup_announce(&d, 1);
    bs = cli_open_image(o->image, o->format, 0, &err);
    if (!bs) {
        goto out_tmp;
    }
    {
        BdrvDirtyBitmap *nb = bdrv_find_dirty_bitmap(bs, d.new_bitmap);

        if (nb) {
            d.granularity = nb->granularity;
            d.generation = nb->generation[0] ? backup_strdup(nb->generation)
                                             : NULL;
        }
    }
    d.copy_seconds = clock_monotonic_seconds();
    if (!backup_copy_image(o, bs, &d, &err)) {
        bdrv_close(bs, NULL);
        goto out_tmp;
    }
    offline_read_bitmaps(bs, &d);      /* the counts for the manifest */
    bdrv_close(bs, NULL);
    d.copy_seconds = clock_monotonic_seconds() - d.copy_seconds;
    made = backup_commit_disk(repo, o, &d, seq, time_iso, &err);
    if (!made) {
        goto out_tmp;
    }
    {
        RepoManifest *full = repo_latest_full(repo, d.node);

        if (!offline_remove_stale(repo, o, &d, &err)) {
            error_prepend(&err, "warning: backup %s is committed, but removing "
                          "old bitmaps failed: ", made->id);
            error_report_err(err);
            err = NULL;
        }
        if (full) {
            repo_remove_attempts_below(repo, d.node, full->seq);
        }
    }
    backup_print_result(o, &d, &made, 1);
    ret = CLI_EXIT_OK;
    goto out;

out_tmp:
    if (d.tmp_path) {
        repo->storage->remove(d.tmp_path);
    }
out:
    if (err) {
        error_report_err(err);
    }
    repo_manifest_free(made);
    backup_disk_free(&d);
    return ret;
}
