/*
 * The write-intent log (write-intent.h, docs/specs/write-intent.md).
 *
 * A node's persistent bitmaps live in memory and reach the image only at a
 * clean close.  This file makes them survive a crash cheaply: a coarse map
 * of regions that may hold unsaved writes is made durable *before* the
 * first write to a region (group commit), and the fine bitmaps are saved
 * lazily in alternating snapshot slots, after which the map is reset to
 * the regions written since.  Recovery is snapshot ∪ marked regions.
 *
 * Locks, always taken in this order (never the other way round):
 *   snap_lock serializes snapshots (slot writes); writers never take it,
 *             so a snapshot being written does not hold up intent syncs
 *   io_lock   serializes writes of the map and the header
 *   bs->lock  see block.h: the bitmaps, and the fields marked "bs->lock"
 *             below (active, durable[], epoch[], cur_epoch, n_marked, the
 *             read-ahead and sync estimates), so checking a region and
 *             setting a write's bits is one step (W2)
 *   mu        pending[], syncing, io_error, the thread's wake-up flags
 * Writers hold only bs->lock or only mu, never across I/O.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "block/block.h"
#include "block/wil-store.h"
#include "block/write-intent.h"
#include "block/dirty-bitmap.h"
#include "util/cleanup.h"
#include "util/bswap.h"
#include "util/cutils.h"
#include "util/log.h"
#include "util/osdep.h"

#define WIL_MAGIC        "BBWIL\0v2"
#define WIL_SLOT_MAGIC   "BBWSNAP2"
#define WIL_HEADER_SIZE  4096u
#define WIL_HEADER_USED  56u
#define WIL_SLOT_HEADER  32u
#define WIL_STATE_INACTIVE 0u
#define WIL_STATE_ACTIVE   1u
#define WIL_MAX_SLOT     (1ull << 34)      /* 16 GiB: more is corruption */
/* A log written for another size than the image's (W11) is read for at
 * most this many bits per bitmap beyond the image's own: 1 GiB of bits. */
#define WIL_RESIZED_MAX_BITS (1ull << 33)

struct WriteIntent {
    BlockDriverState *bs;
    WilStore *store;               /* NULL until activated */
    unsigned shift;
    uint64_t image_size;
    uint64_t n_regions;
    uint64_t map_bytes;            /* padded to 4096 */
    uint64_t slot_off[2];
    uint64_t slot_size;
    int newest_slot;               /* -1: none written in this session */
    uint64_t snap_seq;

    /* bs->lock */
    bool active;
    uint8_t *durable;
    uint32_t *epoch;
    uint32_t cur_epoch;
    uint64_t n_marked;
    uint64_t seq_start, seq_end;   /* the stream of the last tracked write */
    uint64_t ra_start, ra_end;     /* regions last asked for ahead */
    uint64_t rate;                 /* the stream's top speed, bytes/s, decaying */
    uint64_t rate_pos, rate_ns;    /* where and when it was last measured */
    uint64_t sync_ns, sync_at;     /* slowest recent map sync, decaying */

    /* mu */
    pthread_mutex_t mu;
    pthread_cond_t cond;
    uint8_t *pending;
    bool syncing;
    int io_error;
    bool stop;
    bool kick;
    bool readahead_kick;           /* pending[] holds a read-ahead region */
    double last_flush_snapshot;
    double last_snapshot;
    pthread_t thread;
    bool thread_started;

    pthread_mutex_t io_lock;
    pthread_mutex_t snap_lock;

    /* Counters (atomic): write_intent_stats(). */
    uint64_t n_syncs, n_waits, wait_ns, n_snapshots;
};

static inline bool bit_get(const uint8_t *m, uint64_t i)
{
    return m[i >> 3] & (1u << (i & 7));
}

static inline void bit_set(uint8_t *m, uint64_t i)
{
    m[i >> 3] |= (uint8_t)(1u << (i & 7));
}

static inline void bit_clear(uint8_t *m, uint64_t i)
{
    m[i >> 3] &= (uint8_t)~(1u << (i & 7));
}

static char *wil_path(BlockDriverState *bs)
{
    char *p = NULL;

    if (!bs->filename || asprintf(&p, "%s.wil", bs->filename) < 0) {
        return NULL;
    }
    return p;
}

/* ---- the file's header ---- */

typedef struct WilHeader {
    uint32_t state;
    uint32_t shift;
    uint64_t image_size;
    uint64_t slot_off[2];
    uint64_t slot_size;
} WilHeader;

static void header_encode(const WilHeader *h, uint8_t buf[WIL_HEADER_SIZE])
{
    memset(buf, 0, WIL_HEADER_SIZE);
    memcpy(buf, WIL_MAGIC, 8);
    st_le32(buf + 8, h->state);
    st_le32(buf + 12, h->shift);
    st_le64(buf + 16, h->image_size);
    st_le64(buf + 24, h->slot_off[0]);
    st_le64(buf + 32, h->slot_off[1]);
    st_le64(buf + 40, h->slot_size);
    st_le64(buf + 48, XXH64(buf, 48, 0));
}

static bool header_decode(const uint8_t *buf, WilHeader *h)
{
    if (memcmp(buf, WIL_MAGIC, 8) || ld_le64(buf + 48) != XXH64(buf, 48, 0)) {
        return false;
    }
    h->state = ld_le32(buf + 8);
    h->shift = ld_le32(buf + 12);
    h->image_size = ld_le64(buf + 16);
    h->slot_off[0] = ld_le64(buf + 24);
    h->slot_off[1] = ld_le64(buf + 32);
    h->slot_size = ld_le64(buf + 40);
    return h->shift >= WIL_MIN_REGION_SHIFT && h->shift <= WIL_MAX_REGION_SHIFT &&
           h->slot_size >= WIL_SLOT_HEADER && h->slot_size <= WIL_MAX_SLOT;
}

static uint64_t map_bytes_for(uint64_t n_regions)
{
    return ROUND_UP(DIV_ROUND_UP(MAX(n_regions, 1), 8), 4096);
}

/* ---- snapshots ---- */

/* A bitmap's bits in a snapshot (W5 format): u64 nb_bits, u64 run count,
 * then per run of consecutive non-zero words u64 first word, u64 word
 * count and the words (hbitmap_serialize_part of their clusters).  Only
 * the non-zero words are visited (hbitmap_next_nonzero_words), so the size
 * and the time follow what is dirty, not the bitmap's size.  With buf NULL
 * this only returns the length; else it writes that many bytes to buf. */
static size_t snapshot_bits(const HBitmap *hb, uint8_t *buf)
{
    uint64_t first, count, from = 0, runs = 0;
    size_t len = 16;

    while (hbitmap_next_nonzero_words(hb, from, &first, &count)) {
        if (buf) {
            st_le64(buf + len, first);
            st_le64(buf + len + 8, count);
            hbitmap_serialize_part(hb, buf + len + 16, first * 64, count * 64);
        }
        len += 16 + count * 8;
        runs++;
        from = first + count;
    }
    if (buf) {
        st_le64(buf, hbitmap_nb_bits(hb));
        st_le64(buf + 8, runs);
    }
    return len;
}

/* The bits a snapshot saves for bm (bs->lock held): a bitmap with a
 * successor (a backup job) merged with it, as a failed job would leave it
 * (W9); *ret_tmp owns the merged copy, NULL otherwise.  NULL when memory
 * is short. */
static const HBitmap *snapshot_source(const BdrvDirtyBitmap *bm, HBitmap **ret_tmp)
{
    *ret_tmp = NULL;
    if (!bm->successor) {
        return bm->hb;
    }
    *ret_tmp = hbitmap_copy(bm->hb);
    if (*ret_tmp) {
        hbitmap_merge(*ret_tmp, bm->successor->hb);
    }
    return *ret_tmp;
}

/* The payload of a snapshot of every persistent bitmap (caller holds
 * bs->lock): its length follows the dirty words, not the bitmaps' size. */
static uint8_t *snapshot_payload_locked(BlockDriverState *bs, size_t *ret_len)
{
    size_t len = 4;
    uint32_t count = 0;
    uint8_t *buf = NULL, *p;
    bool ok = true;

    /* Pass 0 measures, pass 1 writes. */
    for (int pass = 0; pass < 2 && ok; pass++) {
        p = buf ? buf + 4 : NULL;
        for (BdrvDirtyBitmap *bm = bs->dirty_bitmaps; bm && ok; bm = bm->next) {
            _cleanup_(hbitmap_freep) HBitmap *tmp = NULL;
            const HBitmap *src;
            size_t nl;

            if (!bm->persistent || bm->inconsistent) {
                continue;
            }
            src = snapshot_source(bm, &tmp);
            if (!src) {
                ok = false;
                break;
            }
            nl = strlen(bm->name);
            if (!p) {
                len += 2 + nl + 44 + snapshot_bits(src, NULL);
                count++;
                continue;
            }
            st_le16(p, (uint16_t)nl);
            memcpy(p + 2, bm->name, nl);
            p += 2 + nl;
            st_le32(p, bm->granularity);
            st_le32(p + 4, bm->disabled ? 1u : 0u);
            if (bm->generation[0]) {
                memcpy(p + 8, bm->generation, 36);
            }
            p += 44;
            p += snapshot_bits(src, p);
        }
        if (pass == 0 && ok) {
            buf = calloc(1, len);
            ok = buf != NULL;
        }
    }
    if (!ok) {
        free(buf);
        return NULL;
    }
    st_le32(buf, count);
    *ret_len = len;
    return buf;
}

/* Write the header (caller holds io_lock). */
static int write_header(WriteIntent *w, uint32_t state)
{
    WilHeader h = {
        .state = state, .shift = w->shift, .image_size = w->image_size,
        .slot_off = { w->slot_off[0], w->slot_off[1] },
        .slot_size = w->slot_size,
    };
    uint8_t buf[WIL_HEADER_SIZE];
    int r;

    header_encode(&h, buf);
    r = wil_store_pwrite(w->store, buf, sizeof(buf), 0);
    if (r == 0) {
        r = wil_store_sync(w->store);
    }
    return r;
}

/* Write payload as the next snapshot (caller holds snap_lock; the header,
 * when the slots grow, is written under io_lock): into the slot
 * that does not hold the newest one, or into two new bigger slots at the
 * end of the file followed by a header pointing at them (W5). */
static int write_snapshot(WriteIntent *w, const uint8_t *payload, size_t len,
                          uint32_t state_after_grow)
{
    _cleanup_free_ uint8_t *slot = NULL;
    int target;
    bool grow = WIL_SLOT_HEADER + len > w->slot_size;
    int r;

    if (grow) {
        uint64_t size = ROUND_UP((WIL_SLOT_HEADER + len) * 2, 4096);
        uint64_t cur, end;

        r = wil_store_get_size(w->store, &cur);
        if (r < 0) {
            return r;
        }
        end = ROUND_UP(MAX(cur,
                           WIL_HEADER_SIZE + w->map_bytes), 4096);
        end = MAX(end, w->slot_off[1] + w->slot_size);
        w->slot_off[0] = end;
        w->slot_off[1] = end + size;
        w->slot_size = size;
        w->newest_slot = -1;
    }
    target = w->newest_slot == 0 ? 1 : 0;
    slot = calloc(1, WIL_SLOT_HEADER + len);
    if (!slot) {
        return -ENOMEM;
    }
    memcpy(slot, WIL_SLOT_MAGIC, 8);
    st_le64(slot + 8, w->snap_seq + 1);
    st_le64(slot + 16, len);
    st_le64(slot + 24, XXH64(payload, len, 0));
    memcpy(slot + WIL_SLOT_HEADER, payload, len);
    r = wil_store_pwrite(w->store, slot, WIL_SLOT_HEADER + len,
                         w->slot_off[target]);
    if (r == 0) {
        r = wil_store_sync(w->store);
    }
    if (r == 0 && grow) {
        pthread_mutex_lock(&w->io_lock);
        r = write_header(w, state_after_grow);
        pthread_mutex_unlock(&w->io_lock);
    }
    if (r == 0) {
        w->snap_seq++;
        w->newest_slot = target;
    }
    return r;
}

/* v after dt_ns, halving every half_ns (linear in between). */
static uint64_t decay(uint64_t v, uint64_t dt_ns, uint64_t half_ns)
{
    uint64_t halvings = dt_ns / half_ns;

    if (halvings >= 64) {
        return 0;
    }
    v >>= halvings;
    return v - (uint64_t)((double)v * (double)(dt_ns % half_ns) / (double)half_ns / 2);
}

/* Note how long a map write took (bs->lock held): the read-ahead reaches
 * further while syncs are slow.  The slowest recent one counts, halving
 * every WIL_READAHEAD_SYNC_HALF_NS since. */
static void sync_latency_locked(WriteIntent *w, uint64_t start, uint64_t now)
{
    w->sync_ns = MAX(decay(w->sync_ns, now - w->sync_at, WIL_READAHEAD_SYNC_HALF_NS),
                     now - start);
    w->sync_at = now;
}

/* Write the intent map: durable (reset: only regions stamped with epoch
 * >= reset_epoch) plus every pending region, sync, and then count the
 * pending ones durable.  Caller holds io_lock (W3 and W4). */
static int write_map(WriteIntent *w, bool reset, uint32_t reset_epoch)
{
    BlockDriverState *bs = w->bs;
    _cleanup_free_ uint8_t *map = calloc(1, w->map_bytes);
    _cleanup_free_ uint8_t *take = calloc(1, w->map_bytes);
    uint64_t bytes = DIV_ROUND_UP(w->n_regions, 8);
    uint64_t start;
    int r;

    if (!map || !take) {
        return -ENOMEM;
    }
    pthread_mutex_lock(&bs->lock);
    if (reset) {
        /* Only ever clears: a read-ahead region is stamped before its sync
         * is done, and must not look durable until it is.  What was asked
         * for ahead may go here, so the next write looks again. */
        w->ra_start = w->ra_end = 0;
        for (uint64_t i = 0; i < w->n_regions; i++) {
            if (!w->epoch[i] || (int32_t)(w->epoch[i] - reset_epoch) < 0) {
                bit_clear(w->durable, i);
            }
        }
    }
    pthread_mutex_lock(&w->mu);
    memcpy(take, w->pending, bytes);
    memset(w->pending, 0, bytes);
    pthread_mutex_unlock(&w->mu);
    for (uint64_t i = 0; i < bytes; i++) {
        map[i] = w->durable[i] | take[i];
    }
    pthread_mutex_unlock(&bs->lock);

    start = clock_monotonic_ns();
    r = wil_store_pwrite(w->store, map, w->map_bytes, WIL_HEADER_SIZE);
    if (r == 0) {
        r = wil_store_sync(w->store);
    }

    pthread_mutex_lock(&bs->lock);
    sync_latency_locked(w, start, clock_monotonic_ns());
    if (r == 0) {
        uint64_t n = 0;

        for (uint64_t i = 0; i < bytes; i++) {
            w->durable[i] |= take[i];
            n += (uint64_t)__builtin_popcount(w->durable[i]);
        }
        w->n_marked = n;
    }
    pthread_mutex_unlock(&bs->lock);
    __atomic_add_fetch(&w->n_syncs, 1, __ATOMIC_RELAXED);
    if (r < 0) {
        pthread_mutex_lock(&w->mu);
        w->io_error = r;
        pthread_mutex_unlock(&w->mu);
    }
    return r;
}

/*
 * Take a snapshot: copy the bitmaps and start a new epoch in one critical
 * section (W2), write it, then reset the map to the regions
 * written since.  With activate, this also starts the log (W8):
 * the map is zeroed, the header says active.
 */
static int take_snapshot(WriteIntent *w, bool activate)
{
    BlockDriverState *bs = w->bs;
    _cleanup_free_ uint8_t *payload = NULL;
    size_t len = 0;
    uint32_t epoch;
    int r;

    pthread_mutex_lock(&w->snap_lock);
    pthread_mutex_lock(&bs->lock);
    if (!activate && !w->active) {
        pthread_mutex_unlock(&bs->lock);
        pthread_mutex_unlock(&w->snap_lock);
        return 0;
    }
    payload = snapshot_payload_locked(bs, &len);
    epoch = ++w->cur_epoch;
    if (activate && payload) {
        memset(w->durable, 0, w->map_bytes);
        w->n_marked = 0;
        w->active = true;
    }
    pthread_mutex_unlock(&bs->lock);
    if (!payload) {
        pthread_mutex_unlock(&w->snap_lock);
        return -ENOMEM;
    }
    if (activate) {
        /* A writer arriving now may write the map before the header says
         * active; a crash in that window finds an inactive log, so the
         * bitmaps load inconsistent: the safe side. */
        _cleanup_free_ uint8_t *zero = calloc(1, w->map_bytes);

        pthread_mutex_lock(&w->io_lock);
        r = zero ? wil_store_pwrite(w->store, zero, w->map_bytes, WIL_HEADER_SIZE)
                 : -ENOMEM;
        pthread_mutex_unlock(&w->io_lock);
        if (r == 0) {
            r = write_snapshot(w, payload, len, WIL_STATE_ACTIVE);
        }
        if (r == 0) {
            pthread_mutex_lock(&w->io_lock);
            r = write_header(w, WIL_STATE_ACTIVE);
            pthread_mutex_unlock(&w->io_lock);
        }
    } else {
        r = write_snapshot(w, payload, len, WIL_STATE_ACTIVE);
    }
    if (r == 0) {
        __atomic_add_fetch(&w->n_snapshots, 1, __ATOMIC_RELAXED);
        /* Keep the regions written in this epoch or the one before: a
         * region goes only after a whole snapshot period without writes,
         * so a hot region never pays a sync again (W3). */
        pthread_mutex_lock(&w->io_lock);
        r = write_map(w, true, epoch > 1 ? epoch - 1 : epoch);
        pthread_mutex_unlock(&w->io_lock);
    } else {
        pthread_mutex_lock(&w->mu);
        w->io_error = r;
        pthread_mutex_unlock(&w->mu);
    }
    pthread_mutex_unlock(&w->snap_lock);
    pthread_mutex_lock(&w->mu);
    w->last_snapshot = clock_monotonic_seconds();
    pthread_mutex_unlock(&w->mu);
    return r;
}

/* Is any region waiting to be written to the map?  mu held. */
static bool any_pending_locked(const WriteIntent *w)
{
    for (uint64_t i = 0; i < DIV_ROUND_UP(w->n_regions, 8); i++) {
        if (w->pending[i]) {
            return true;
        }
    }
    return false;
}

/* With mu held and no map write running: write the map with every pending
 * region, then wake whoever waits for it.  Returns with mu held. */
static int write_pending_locked(WriteIntent *w)
{
    int r;

    w->syncing = true;
    pthread_mutex_unlock(&w->mu);
    pthread_mutex_lock(&w->io_lock);
    r = write_map(w, false, 0);
    pthread_mutex_unlock(&w->io_lock);
    pthread_mutex_lock(&w->mu);
    w->syncing = false;
    pthread_cond_broadcast(&w->cond);
    return r;
}

/* ---- the background thread ---- */

static void *wil_thread(void *opaque)
{
    WriteIntent *w = opaque;

    pthread_mutex_lock(&w->mu);
    while (!w->stop) {
        struct timespec ts;
        bool due;

        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += WIL_SNAPSHOT_INTERVAL_MS / 1000;
        /* While a writer syncs the map, wait for it (it broadcasts when
         * done): its sync may well take the read-ahead region too. */
        if (!w->kick && !(w->readahead_kick && !w->syncing)) {
            pthread_cond_timedwait(&w->cond, &w->mu, &ts);
        }
        if (w->stop) {
            break;
        }
        if (w->readahead_kick && !w->syncing) {
            /* A sequential writer is about to enter a new region: make it
             * durable now, so the writer finds it so (W10). */
            w->readahead_kick = false;
            if (!w->io_error && any_pending_locked(w)) {
                write_pending_locked(w);
            }
        }
        due = w->kick ||
              clock_monotonic_seconds() - w->last_snapshot >= WIL_SNAPSHOT_INTERVAL_MS / 1000.0;
        w->kick = false;
        pthread_mutex_unlock(&w->mu);
        if (due) {
            bool marked;

            pthread_mutex_lock(&w->bs->lock);
            marked = w->active && w->n_marked > 0;
            pthread_mutex_unlock(&w->bs->lock);
            if (marked || __atomic_exchange_n(&w->bs->bitmaps_changed, false,
                                              __ATOMIC_SEQ_CST)) {
                take_snapshot(w, false);
            }
        }
        pthread_mutex_lock(&w->mu);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

/* Kick the thread unless a snapshot finished less than gap seconds ago:
 * the marked-regions trigger must not turn every write into a snapshot. */
static void kick_if_idle(WriteIntent *w, double gap)
{
    pthread_mutex_lock(&w->mu);
    if (clock_monotonic_seconds() - w->last_snapshot >= gap) {
        w->kick = true;
        pthread_cond_broadcast(&w->cond);
    }
    pthread_mutex_unlock(&w->mu);
}

/* ---- the write path ---- */

/* Ask for regions [r0, r1] to become durable; returns when a map write that
 * may include them finished (the caller re-checks). */
static int request_regions(WriteIntent *w, uint64_t r0, uint64_t r1)
{
    int r;

    pthread_mutex_lock(&w->mu);
    if (w->io_error) {
        r = w->io_error;
        pthread_mutex_unlock(&w->mu);
        return r;
    }
    for (uint64_t i = r0; i <= r1; i++) {
        bit_set(w->pending, i);
    }
    if (w->syncing) {
        /* Someone is writing the map: wait, then the caller re-checks (it
         * may have taken our regions, else we become the next writer). */
        while (w->syncing) {
            pthread_cond_wait(&w->cond, &w->mu);
        }
        r = w->io_error;
        pthread_mutex_unlock(&w->mu);
        return r;
    }
    r = write_pending_locked(w);
    pthread_mutex_unlock(&w->mu);
    return r;
}

/* How far ahead of a stream its regions are kept durable or asked for
 * (bs->lock held): what it writes in WIL_READAHEAD_TIME_MS at the top speed
 * it has shown (decaying), or in 3 times the slowest recent map sync if
 * that is longer (the page cache writing back makes syncs slow), at least
 * half a region, at most WIL_READAHEAD_MAX_BYTES.  A stream gets more than half a region only
 * once it has moved on WIL_READAHEAD_STREAM_MIN: random writes in a small
 * span also "continue" each other. */
static uint64_t readahead_lead_locked(const WriteIntent *w)
{
    uint64_t half = 1ull << (w->shift - 1);
    uint64_t ns = MAX((uint64_t)WIL_READAHEAD_TIME_MS * 1000000ull, 3 * w->sync_ns);
    uint64_t lead;

    if (w->seq_end < w->seq_start + WIL_READAHEAD_STREAM_MIN) {
        return half;
    }
    lead = (uint64_t)((double)w->rate * (double)ns / 1e9);
    return MIN(MAX(lead, half), MAX(WIL_READAHEAD_MAX_BYTES, half));
}

/* Read-ahead (bs->lock held, the write's regions durable): a write that
 * continues the previous one keeps the regions up to a lead past its end
 * durable or asked for (readahead_lead_locked), so that a sequential
 * writer does not stop at a region boundary to wait for a sync.  It asks
 * once less than half the lead is asked for, for the whole lead at once,
 * so that one sync covers many regions.
 * Every region of the lead is stamped with the current epoch, so that a
 * reset keeps it for the writer that is about to arrive.  Sets
 * [*first, *last] and returns true when there is something to ask the
 * thread for. */
static bool readahead_range_locked(WriteIntent *w, uint64_t offset, uint64_t bytes,
                                   uint64_t r1, uint64_t *first, uint64_t *last)
{
    uint64_t end = offset + bytes, prev = w->seq_end;
    uint64_t now = clock_monotonic_ns();
    uint64_t lead, from = r1 + 1, to;
    bool any = false;

    w->seq_end = end;
    if (offset + WIL_READAHEAD_WINDOW < prev || offset > prev + WIL_READAHEAD_WINDOW) {
        w->seq_start = offset;             /* a new stream, if any */
        w->rate = 0;
        w->rate_pos = end;
        w->rate_ns = now;
        return false;
    }
    if (now - w->rate_ns >= WIL_READAHEAD_RATE_NS) {
        uint64_t moved = end > w->rate_pos ? end - w->rate_pos : 0;
        uint64_t r = (uint64_t)((double)moved * 1e9 / (double)(now - w->rate_ns));

        w->rate = MAX(r, decay(w->rate, now - w->rate_ns, WIL_READAHEAD_RATE_HALF_NS));
        w->rate_pos = end;
        w->rate_ns = now;
    }
    lead = readahead_lead_locked(w);
    to = MIN((end - 1 + lead) >> w->shift, w->n_regions - 1);
    if (from >= w->ra_start && from < w->ra_end) {
        if ((w->ra_end << w->shift) >= end + lead / 2 || w->ra_end > to) {
            return false;                  /* enough asked for ahead */
        }
        from = w->ra_end;
    }
    if (from > to) {
        return false;
    }
    w->ra_start = r1 + 1;
    w->ra_end = to + 1;
    for (uint64_t i = from; i <= to; i++) {
        w->epoch[i] = w->cur_epoch;
        if (!bit_get(w->durable, i)) {
            if (!any) {
                *first = i;
            }
            *last = i;
            any = true;
        }
    }
    return any;
}

static void request_readahead(WriteIntent *w, uint64_t first, uint64_t last)
{
    pthread_mutex_lock(&w->mu);
    if (!w->io_error) {
        for (uint64_t i = first; i <= last; i++) {
            bit_set(w->pending, i);
        }
        w->readahead_kick = true;
        pthread_cond_broadcast(&w->cond);
    }
    pthread_mutex_unlock(&w->mu);
}

static int mark(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                bool nowait)
{
    WriteIntent *w = bs->wil;
    uint64_t r0, r1, waited_from = 0;
    bool over = false;

    if (!w || bytes == 0) {
        bdrv_set_dirty(bs, offset, bytes);
        return 0;
    }
    r0 = offset >> w->shift;
    r1 = (offset + bytes - 1) >> w->shift;
    if (r1 >= w->n_regions) {
        r1 = w->n_regions - 1;
    }
    for (;;) {
        bool all = true;
        int r;

        pthread_mutex_lock(&bs->lock);
        if (!w->active) {
            bdrv_set_dirty_locked(bs, offset, bytes);
            pthread_mutex_unlock(&bs->lock);
            return 0;
        }
        for (uint64_t i = r0; i <= r1 && r0 < w->n_regions; i++) {
            if (!bit_get(w->durable, i)) {
                all = false;
                break;
            }
        }
        if (all) {
            uint64_t ra_first = 0, ra_last = 0;
            bool ahead;

            for (uint64_t i = r0; i <= r1 && r0 < w->n_regions; i++) {
                w->epoch[i] = w->cur_epoch;
            }
            bdrv_set_dirty_locked(bs, offset, bytes);
            over = w->n_marked > WIL_MAX_MARKED_REGIONS;
            ahead = readahead_range_locked(w, offset, bytes, r1, &ra_first, &ra_last);
            pthread_mutex_unlock(&bs->lock);
            if (ahead) {
                request_readahead(w, ra_first, ra_last);
            }
            if (over) {
                kick_if_idle(w, WIL_MIN_SNAPSHOT_GAP_MS / 1000.0);
            }
            if (waited_from) {
                __atomic_add_fetch(&w->n_waits, 1, __ATOMIC_RELAXED);
                __atomic_add_fetch(&w->wait_ns, clock_monotonic_ns() - waited_from,
                                   __ATOMIC_RELAXED);
            }
            return 0;
        }
        pthread_mutex_unlock(&bs->lock);
        if (nowait) {
            return -EAGAIN;
        }
        if (!waited_from) {
            waited_from = clock_monotonic_ns();
        }
        r = request_regions(w, r0, r1);
        if (r < 0) {
            return r;
        }
    }
}

int write_intent_mark(BlockDriverState *bs, uint64_t offset, uint64_t bytes)
{
    return mark(bs, offset, bytes, false);
}

int write_intent_mark_nowait(BlockDriverState *bs, uint64_t offset,
                             uint64_t bytes)
{
    return mark(bs, offset, bytes, true);
}

void write_intent_flushed(BlockDriverState *bs)
{
    WriteIntent *w = bs->wil;
    bool due;

    if (!w) {
        return;
    }
    pthread_mutex_lock(&w->mu);
    due = clock_monotonic_seconds() - w->last_flush_snapshot >= 1.0;
    if (due) {
        w->last_flush_snapshot = clock_monotonic_seconds();
        w->kick = true;
        pthread_cond_broadcast(&w->cond);
    }
    pthread_mutex_unlock(&w->mu);
}

/* ---- open, recovery, close ---- */

static bool has_persistent_bitmaps(BlockDriverState *bs)
{
    bool any = false;

    pthread_mutex_lock(&bs->lock);
    for (BdrvDirtyBitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
        any |= bm->persistent;
    }
    pthread_mutex_unlock(&bs->lock);
    return any;
}

/* The newest valid snapshot of the file (malloc'd payload) or NULL.  No
 * payload longer than max_len is read (a snapshot of this node's bitmaps
 * cannot be longer): when the newest slot claims more, there is no snapshot
 * to use, since an older one would lack what the newer covered (W3, W5).
 * *ret_seq: the highest sequence number of a slot that may be valid. */
static uint8_t *read_newest_snapshot(WilStore *s, const WilHeader *h,
                                     uint64_t file_size, uint64_t max_len,
                                     size_t *ret_len, uint64_t *ret_seq)
{
    uint64_t seq[2] = { 0, 0 }, len[2] = { 0, 0 }, sum[2] = { 0, 0 };
    bool ok[2] = { false, false };

    for (int i = 0; i < 2; i++) {
        uint8_t sh[WIL_SLOT_HEADER];

        if (h->slot_off[i] < WIL_HEADER_SIZE ||
            h->slot_off[i] > file_size ||
            file_size - h->slot_off[i] < WIL_SLOT_HEADER ||
            wil_store_pread(s, sh, sizeof(sh), h->slot_off[i]) < 0 ||
            memcmp(sh, WIL_SLOT_MAGIC, 8)) {
            continue;
        }
        seq[i] = ld_le64(sh + 8);
        len[i] = ld_le64(sh + 16);
        sum[i] = ld_le64(sh + 24);
        ok[i] = len[i] <= h->slot_size - WIL_SLOT_HEADER &&
                len[i] <= file_size - h->slot_off[i] - WIL_SLOT_HEADER;
        if (ok[i]) {
            *ret_seq = MAX(*ret_seq, seq[i]);
        }
    }
    /* Newest first; the older slot only when the newer one is torn. */
    int order[2] = { 0, 1 };
    if (ok[1] && (!ok[0] || seq[1] > seq[0])) {
        order[0] = 1;
        order[1] = 0;
    }
    for (int k = 0; k < 2; k++) {
        int i = order[k];
        if (!ok[i]) {
            continue;
        }
        if (len[i] > max_len) {
            return NULL;
        }
        uint8_t *p = malloc(len[i] ? len[i] : 1);
        if (!p) {
            return NULL;
        }
        if (wil_store_pread(s, p, len[i], h->slot_off[i] + WIL_SLOT_HEADER) == 0 &&
            XXH64(p, len[i], 0) == sum[i]) {
            *ret_len = len[i];
            return p;
        }
        free(p);
    }
    return NULL;
}

/* The longest record snapshot_bits writes for hb: its runs are maximal, so
 * at most every other word starts one. */
static uint64_t snapshot_words_max(uint64_t nwords)
{
    return 16 + 8 * nwords + 16 * DIV_ROUND_UP(nwords, 2);
}

/* Check a bitmap's bits in a snapshot (snapshot_bits' format) at p, with
 * avail bytes left in the payload: every run inside the bitmap (as its
 * nb_bits field says), non-empty, after the one before, and inside avail.
 * Returns the record's length, or 0 when it is malformed.  The loop is
 * bounded by avail: every run takes at least 24 bytes. */
static size_t snapshot_bits_check(const uint8_t *p, size_t avail)
{
    uint64_t nwords, runs, next = 0;
    size_t len = 16;

    if (avail < 16) {
        return 0;
    }
    nwords = DIV_ROUND_UP(ld_le64(p), 64);
    runs = ld_le64(p + 8);
    for (uint64_t i = 0; i < runs; i++) {
        uint64_t first, count;

        if (avail - len < 16) {
            return 0;
        }
        first = ld_le64(p + len);
        count = ld_le64(p + len + 8);
        if (first < next || first >= nwords || count == 0 ||
            count > nwords - first || count > (avail - len - 16) / 8) {
            return 0;
        }
        len += 16 + count * 8;
        next = first + count;
    }
    return len;
}

/* Load a record that snapshot_bits_check accepted into hb (of its nb_bits):
 * hb's bits become exactly the record's. */
static void snapshot_bits_load(HBitmap *hb, const uint8_t *p)
{
    uint64_t runs = ld_le64(p + 8);
    size_t len = 16;

    hbitmap_reset_all(hb);
    for (uint64_t i = 0; i < runs; i++) {
        uint64_t first = ld_le64(p + len), count = ld_le64(p + len + 8);

        hbitmap_deserialize_part(hb, p + len + 16, first * 64, count * 64);
        len += 16 + count * 8;
    }
}

/* hb (the node's size) becomes old's bits (the log's size, old_size)
 * where both reach, and, when the node grew, every bit past old_size: a
 * write there after the resize would have been in a rewritten log, but
 * the area is not what the last backup saw, so it is dirty (W6). */
static void recover_resized(HBitmap *hb, const HBitmap *old, uint64_t old_size)
{
    _cleanup_(hbitmap_freep) HBitmap *c = hbitmap_resized_copy(old, hbitmap_size(hb));

    hbitmap_reset_all(hb);
    if (c) {
        hbitmap_merge(hb, c);
    } else {
        hbitmap_set_all(hb);                /* out of memory: all dirty */
    }
    if (hbitmap_size(hb) > old_size) {
        hbitmap_set(hb, old_size, hbitmap_size(hb) - old_size);
    }
}

/* Apply a snapshot and the marked regions to the bitmaps the format could
 * not load cleanly (W6).  Returns how many were recovered. */
static int recover(BlockDriverState *bs, const WilHeader *h, const uint8_t *map,
                   uint64_t n_regions, const uint8_t *payload, size_t len)
{
    const uint8_t *p = payload, *end = payload + len;
    uint32_t count;
    int recovered = 0;

    if (len < 4) {
        return 0;
    }
    count = ld_le32(p);
    p += 4;
    for (uint32_t k = 0; k < count; k++) {
        char name[BDRV_BITMAP_MAX_NAME + 1];
        uint16_t nl;
        uint32_t gran, flags;
        char gen[UUID_STR_LEN];
        size_t sz;
        BdrvDirtyBitmap *bm;

        if (end - p < 2) {
            return recovered;
        }
        nl = ld_le16(p);
        if (nl > BDRV_BITMAP_MAX_NAME || (size_t)(end - p) < 2u + nl + 44u) {
            return recovered;
        }
        memcpy(name, p + 2, nl);
        name[nl] = '\0';
        p += 2 + nl;
        gran = ld_le32(p);
        flags = ld_le32(p + 4);
        memcpy(gen, p + 8, 36);
        gen[36] = '\0';
        p += 44;
        sz = snapshot_bits_check(p, (size_t)(end - p));
        if (!sz) {
            return recovered;
        }
        bool applied = false;
        uint64_t before = 0, added = 0;
        /* The snapshot's bits at the log's size; a log written for another
         * size than the image's now (a resize that stopped before it
         * rewrote the log, W11) loads through a bitmap of that size. */
        _cleanup_(hbitmap_freep) HBitmap *old = NULL;
        bool resized = h->image_size != bs->size;
        if (resized && IS_POW2(gran) &&
            ld_le64(p) == DIV_ROUND_UP(h->image_size, gran) &&
            ld_le64(p) <= MAX(DIV_ROUND_UP(bs->size, gran), WIL_RESIZED_MAX_BITS)) {
            old = hbitmap_new(h->image_size, (unsigned)__builtin_ctz(gran));
        }
        pthread_mutex_lock(&bs->lock);
        bm = bdrv_find_dirty_bitmap_locked(bs, name);
        if (bm && bm->persistent && bm->inconsistent && bm->granularity == gran &&
            (resized ? old != NULL : hbitmap_nb_bits(bm->hb) == ld_le64(p))) {
            if (resized) {
                snapshot_bits_load(old, p);
                recover_resized(bm->hb, old, h->image_size);
            } else {
                snapshot_bits_load(bm->hb, p);
            }
            before = hbitmap_count_bytes(bm->hb);
            for (uint64_t r = 0; r < n_regions; r++) {
                if (bit_get(map, r)) {
                    uint64_t off = r << h->shift;
                    uint64_t size = hbitmap_size(bm->hb);

                    if (off < size) {
                        hbitmap_set(bm->hb, off, MIN(1ull << h->shift, size - off));
                    }
                }
            }
            bm->inconsistent = false;
            free(bm->inconsistent_reason);
            bm->inconsistent_reason = NULL;
            bm->disabled = flags & 1;
            if (uuid_is_valid_str(gen)) {
                memcpy(bm->generation, gen, UUID_STR_LEN);
            } else {
                bm->generation[0] = '\0';
            }
            bm->recovered = true;
            bm->recovered_bytes = added = hbitmap_count_bytes(bm->hb) - before;
            recovered++;
            applied = true;
        }
        pthread_mutex_unlock(&bs->lock);
        if (applied) {
            log_msg(LOG_LEVEL_NOTICE, "bitmap '%s' on node '%s' recovered "
                    "after an unclean stop: the write-intent log's snapshot "
                    "(%llu dirty bytes) plus the regions it marked since "
                    "(%llu more dirty bytes)%s", name, bdrv_node_label(bs),
                    (unsigned long long)before, (unsigned long long)added,
                    resized ? "; the log was written before a resize that "
                    "stopped, and any area the resize added counts as dirty"
                    : "");
        }
        p += sz;
    }
    return recovered;
}

/* The format still holds a recovered bitmap as it found it (not stored
 * cleanly), and drivers never rewrite such an entry.  On a writable node,
 * replace it: remove the stale entry and add the bitmap anew, so the next
 * store writes it.  A failure leaves the stale entry, which the next open
 * again finds unclean: the safe side. */
static void refresh_recovered(BlockDriverState *bs)
{
    if (bs->read_only || !bs->drv->persistent_bitmap_remove ||
        !bs->drv->persistent_bitmap_add) {
        return;
    }
    for (BdrvDirtyBitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
        Error *err = NULL;

        if (!bm->recovered || !bm->persistent) {
            continue;
        }
        if (!bs->drv->persistent_bitmap_remove(bs, bm->name, &err) ||
            !bs->drv->persistent_bitmap_add(bs, bm, &err)) {
            log_msg(LOG_LEVEL_WARNING, "recovered bitmap '%s' on node '%s' "
                    "could not be rewritten in its image: %s", bm->name,
                    bdrv_node_label(bs),
                    error_get_pretty(err));
            error_free(err);
        }
    }
}

/* write_intent_recover_fd's recovery, on a log in any store.  When the
 * log is corrupt (no valid header, or active with no valid snapshot),
 * *ret_why says so (a static string); otherwise it is left alone. */
static int recover_store(BlockDriverState *bs, WilStore *s, uint64_t *ret_seq,
                         const char **ret_why)
{
    uint8_t hbuf[WIL_HEADER_SIZE];
    WilHeader h;
    uint64_t file_size;
    uint64_t n_regions, map_bytes;
    _cleanup_free_ uint8_t *map = NULL;
    _cleanup_free_ uint8_t *payload = NULL;
    size_t len = 0;
    bool any_inconsistent = false;

    *ret_seq = 0;
    if (wil_store_get_size(s, &file_size) < 0 ||
        wil_store_pread(s, hbuf, sizeof(hbuf), 0) < 0 || !header_decode(hbuf, &h)) {
        *ret_why = "it has no valid version-2 header";
        return 0;
    }
    /* The longest snapshot this node's bitmaps can have: one longer is not
     * read (an explicit bound on what a crafted log can make us allocate). */
    uint64_t max_len = 4;
    pthread_mutex_lock(&bs->lock);
    for (BdrvDirtyBitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
        any_inconsistent |= bm->persistent && bm->inconsistent;
        if (bm->persistent) {
            /* At the larger of the image's and the log's size (W11). */
            uint64_t bits = MAX(hbitmap_nb_bits(bm->hb),
                                MIN(DIV_ROUND_UP(h.image_size, bm->granularity),
                                    WIL_RESIZED_MAX_BITS));
            max_len += 2 + BDRV_BITMAP_MAX_NAME + 44 +
                       snapshot_words_max(DIV_ROUND_UP(bits, 64));
        }
    }
    pthread_mutex_unlock(&bs->lock);
    payload = read_newest_snapshot(s, &h, file_size, max_len,
                                   &len, ret_seq);
    if (h.state == WIL_STATE_ACTIVE && !payload) {
        *ret_why = "no snapshot slot in it is valid";
    }
    if (h.state != WIL_STATE_ACTIVE || bs->bitmaps_foreign_writes || !payload) {
        return 0;
    }
    if (!any_inconsistent) {
        return 0;                      /* a clean format wins (W7) */
    }
    n_regions = DIV_ROUND_UP(h.image_size, 1ull << h.shift);
    map_bytes = map_bytes_for(n_regions);
    if (file_size < WIL_HEADER_SIZE + map_bytes) {
        return 0;
    }
    map = malloc(map_bytes);
    if (!map || wil_store_pread(s, map, map_bytes, WIL_HEADER_SIZE) < 0) {
        return 0;
    }
    return recover(bs, &h, map, n_regions, payload, len);
}

int write_intent_recover_fd(BlockDriverState *bs, int fd, uint64_t *ret_seq)
{
    _cleanup_wil_store_ WilStore *s = wil_store_fd(fd);
    const char *why = NULL;

    *ret_seq = 0;
    return s ? recover_store(bs, s, ret_seq, &why) : 0;
}

/* The node's log: the driver's store (BlockDriver.open_intent_store) or
 * the file IMAGE.wil.  As wil_store_file_open: create false opens it to
 * recover from (*ret NULL when there is none), create true for writing,
 * locked as the image is. */
static bool intent_store_open(BlockDriverState *bs, bool create,
                              WilStore **ret, Error **errp)
{
    _cleanup_free_ char *path = NULL;

    if (bs->drv->open_intent_store) {
        return bs->drv->open_intent_store(bs, create, ret, errp);
    }
    path = wil_path(bs);
    if (!path) {
        *ret = NULL;
        error_setg(errp, "out of memory");
        return false;
    }
    return wil_store_file_open(path, create, bs->locking, bs->open_flags,
                               ret, errp);
}

/* A corrupt log was not used: say so in the reason of every bitmap it
 * could have recovered (persistent, inconsistent), so `info` and QMP show
 * why the bitmap stays inconsistent. */
static void note_log_refused(BlockDriverState *bs, const char *log,
                             const char *why)
{
    LOCK_GUARD(&bs->lock);
    for (BdrvDirtyBitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
        char *reason = NULL;

        if (!bm->persistent || !bm->inconsistent) {
            continue;
        }
        if (asprintf(&reason, "%s; the write-intent log '%s' was not used: %s",
                     bm->inconsistent_reason ? bm->inconsistent_reason : "unknown",
                     log, why) >= 0) {
            free(bm->inconsistent_reason);
            bm->inconsistent_reason = reason;
        }
    }
}

/* Recover from the node's log if it is active (recover_store).  A log
 * that cannot be opened or is corrupt only means no recovery (the safe
 * side); a corrupt one is named in the bitmaps' reasons.  *ret_seq: the
 * newest snapshot's seq. */
static void try_recover(BlockDriverState *bs, uint64_t *ret_seq)
{
    _cleanup_wil_store_ WilStore *s = NULL;
    Error *err = NULL;
    const char *why = NULL;

    *ret_seq = 0;
    if (!intent_store_open(bs, false, &s, &err)) {
        error_free(err);
        return;
    }
    if (s && recover_store(bs, s, ret_seq, &why) == 0 && why) {
        log_msg(LOG_LEVEL_WARNING, "the write-intent log '%s' of node '%s' "
                "was not used: %s", s->name,
                bdrv_node_label(bs), why);
        note_log_refused(bs, s->name, why);
    }
}

static void wil_free(WriteIntent *w)
{
    if (!w) {
        return;
    }
    wil_store_close(w->store);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cond);
    pthread_mutex_destroy(&w->io_lock);
    pthread_mutex_destroy(&w->snap_lock);
    free(w->durable);
    free(w->epoch);
    free(w->pending);
    free(w);
}

/* Open the log for writing and start it (W8). */
static bool activate(WriteIntent *w, Error **errp)
{
    int r;

    if (!w->store) {
        if (!intent_store_open(w->bs, true, &w->store, errp)) {
            return false;
        }
        /* Slots after the map; sized on first use.  What the file held
         * beyond the map (an older session's slots, a v1 log's full
         * bitmaps) is dropped: recovery has read it, and a crash before
         * the first snapshot below then finds no valid slot, so the
         * bitmaps load inconsistent (the safe side, as in W8). */
        r = wil_store_set_size(w->store, WIL_HEADER_SIZE + w->map_bytes);
        if (r < 0) {
            error_setg_errno(errp, -r, "cannot truncate the write-intent log '%s'",
                             w->store->name);
            wil_store_close(w->store);
            w->store = NULL;
            return false;
        }
        w->slot_off[0] = w->slot_off[1] = WIL_HEADER_SIZE + w->map_bytes;
        w->slot_size = 0;
        w->newest_slot = -1;
    }
    r = take_snapshot(w, true);
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot write the write-intent log '%s'",
                         w->store->name);
        return false;
    }
    if (!w->thread_started) {
        if (pthread_create(&w->thread, NULL, wil_thread, w) != 0) {
            error_setg(errp, "cannot start the write-intent log thread");
            return false;
        }
        w->thread_started = true;
    }
    return true;
}

bool write_intent_open(BlockDriverState *bs, Error **errp)
{
    WriteIntent *w;
    uint64_t seq = 0;

    if (!bs->crash_safe || !bs->drv->store_bitmaps ||
        !bdrv_can_store_persistent_bitmaps(bs)) {
        return true;
    }
    /* IMAGE.wil needs an image file to sit next to. */
    if (!bs->drv->open_intent_store && (!bs->filename || bs->drv->is_protocol)) {
        return true;
    }
    try_recover(bs, &seq);
    if (bs->read_only) {
        return true;
    }
    refresh_recovered(bs);
    w = calloc(1, sizeof(*w));
    if (!w) {
        error_setg(errp, "out of memory");
        return false;
    }
    w->bs = bs;
    w->shift = bs->wil_region_shift ? bs->wil_region_shift
                                    : WIL_DEFAULT_REGION_SHIFT;
    w->image_size = bs->size;
    w->n_regions = MAX(DIV_ROUND_UP(bs->size, 1ull << w->shift), 1);
    w->map_bytes = map_bytes_for(w->n_regions);
    w->snap_seq = seq;
    w->newest_slot = -1;
    w->durable = calloc(1, w->map_bytes);
    w->pending = calloc(1, w->map_bytes);
    w->epoch = calloc(w->n_regions, sizeof(*w->epoch));
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cond, NULL);
    pthread_mutex_init(&w->io_lock, NULL);
    pthread_mutex_init(&w->snap_lock, NULL);
    if (!w->durable || !w->pending || !w->epoch) {
        wil_free(w);
        error_setg(errp, "out of memory");
        return false;
    }
    bs->wil = w;
    if (has_persistent_bitmaps(bs) && !activate(w, errp)) {
        bs->wil = NULL;
        wil_free(w);
        return false;
    }
    __atomic_store_n(&bs->bitmaps_changed, false, __ATOMIC_SEQ_CST);
    return true;
}

bool write_intent_resize(BlockDriverState *bs, uint64_t size, Error **errp)
{
    WriteIntent *w = bs->wil;
    if (!w) {
        return true;
    }
    uint64_t n = MAX(DIV_ROUND_UP(size, 1ull << w->shift), 1);
    uint64_t mb = map_bytes_for(n);
    uint8_t *durable = calloc(1, mb), *pending = calloc(1, mb);
    uint32_t *epoch = calloc(n, sizeof(*epoch));
    if (!durable || !pending || !epoch) {
        free(durable);
        free(pending);
        free(epoch);
        error_setg(errp, "out of memory");
        return false;
    }
    /* W11.  The node is drained: no write marks a region meanwhile.
     * snap_lock keeps the thread's snapshots out while the maps change,
     * io_lock its map writes, which size their buffers by the map they
     * find. */
    pthread_mutex_lock(&w->snap_lock);
    pthread_mutex_lock(&w->io_lock);
    pthread_mutex_lock(&bs->lock);
    pthread_mutex_lock(&w->mu);
    uint8_t *old_durable = w->durable, *old_pending = w->pending;
    uint32_t *old_epoch = w->epoch;
    w->durable = durable;
    w->pending = pending;
    w->epoch = epoch;
    w->image_size = size;
    w->n_regions = n;
    w->map_bytes = mb;
    w->n_marked = 0;
    w->seq_start = w->seq_end = 0;
    w->ra_start = w->ra_end = 0;
    w->readahead_kick = false;
    pthread_mutex_unlock(&w->mu);
    /* The old slots may lie where the new map now reaches: the next
     * snapshot goes to new slots past the end of the log and of the map. */
    w->slot_size = 0;
    w->newest_slot = -1;
    pthread_mutex_unlock(&bs->lock);
    pthread_mutex_unlock(&w->io_lock);
    pthread_mutex_unlock(&w->snap_lock);
    free(old_durable);
    free(old_pending);
    free(old_epoch);
    /* An active log: a snapshot of the bitmaps (already at the new size,
     * bdrv_truncate_child) in new slots, then the header that names them
     * with the new size, then the (empty) map.  A crash before the header
     * leaves the old log, whose size recovery reconciles (W6).  Inactive:
     * nothing (0). */
    int r = take_snapshot(w, false);
    if (r < 0) {
        error_setg_errno(errp, -r, "Cannot rewrite the write-intent log '%s' "
                         "of node '%s' for its new size", w->store->name,
                         bs->node_name);
        return false;
    }
    return true;
}

bool write_intent_snapshot(BlockDriverState *bs, Error **errp)
{
    WriteIntent *w = bs->wil;
    int r;

    if (!w) {
        return true;
    }
    r = take_snapshot(w, false);
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot write the write-intent log '%s'",
                         w->store ? w->store->name : "");
        return false;
    }
    return true;
}

bool write_intent_sync_metadata(BlockDriverState *bs, Error **errp)
{
    WriteIntent *w = bs->wil;
    bool active;

    if (!w) {
        return true;
    }
    pthread_mutex_lock(&bs->lock);
    active = w->active;
    pthread_mutex_unlock(&bs->lock);
    if (!active) {
        return has_persistent_bitmaps(bs) ? activate(w, errp) : true;
    }
    return write_intent_snapshot(bs, errp);
}

bool write_intent_sync_changed(BlockDriverState *bs)
{
    if (!bs->wil ||
        !__atomic_exchange_n(&bs->bitmaps_changed, false, __ATOMIC_SEQ_CST)) {
        return true;
    }
    Error *err = NULL;
    if (!write_intent_sync_metadata(bs, &err)) {
        /* Not durable yet: keep it pending for the next call. */
        __atomic_store_n(&bs->bitmaps_changed, true, __ATOMIC_SEQ_CST);
        log_msg(LOG_LEVEL_ERR, "node '%s': bitmap changes not recorded in the "
                "write-intent log: %s",
                bdrv_node_label(bs),
                error_get_pretty(err));
        error_free(err);
        return false;
    }
    return true;
}

bool write_intent_sync_all_changed(void)
{
    bool ok = true;

    for (BlockDriverState *bs = bdrv_next_node(NULL); bs; bs = bdrv_next_node(bs)) {
        ok &= write_intent_sync_changed(bs);
    }
    return ok;
}

void write_intent_close_begin(BlockDriverState *bs)
{
    WriteIntent *w = bs->wil;

    if (!w || !w->thread_started) {
        return;
    }
    pthread_mutex_lock(&w->mu);
    w->stop = true;
    pthread_cond_broadcast(&w->cond);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->thread, NULL);
    w->thread_started = false;
}

void write_intent_close_end(BlockDriverState *bs, bool stored_ok)
{
    WriteIntent *w = bs->wil;

    if (!w) {
        return;
    }
    write_intent_close_begin(bs);
    if (stored_ok && w->store) {
        pthread_mutex_lock(&w->io_lock);
        write_header(w, WIL_STATE_INACTIVE);
        pthread_mutex_unlock(&w->io_lock);
    }
    bs->wil = NULL;
    wil_free(w);
}

bool write_intent_stats(BlockDriverState *bs, WriteIntentStats *st)
{
    WriteIntent *w = bs->wil;

    if (!w) {
        return false;
    }
    *st = (WriteIntentStats){
        .region_size = UINT64_C(1) << w->shift,
        .marked_regions = write_intent_marked_regions(bs),
        .intent_syncs = __atomic_load_n(&w->n_syncs, __ATOMIC_RELAXED),
        .writer_waits = __atomic_load_n(&w->n_waits, __ATOMIC_RELAXED),
        .writer_wait_ns = __atomic_load_n(&w->wait_ns, __ATOMIC_RELAXED),
        .snapshots = __atomic_load_n(&w->n_snapshots, __ATOMIC_RELAXED),
    };
    return true;
}

uint64_t write_intent_marked_regions(BlockDriverState *bs)
{
    WriteIntent *w = bs->wil;
    uint64_t n;

    if (!w) {
        return 0;
    }
    pthread_mutex_lock(&bs->lock);
    n = w->active ? w->n_marked : 0;
    pthread_mutex_unlock(&bs->lock);
    return n;
}
