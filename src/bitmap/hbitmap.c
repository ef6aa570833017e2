/*
 * HBitmap: the hierarchical bitmap behind every dirty bitmap.
 *
 * Level 0 holds one bit per cluster (2^shift bytes of the image) in 64-bit
 * words.  Every upper level holds one bit per word of the level below, set
 * when that word is non-zero, up to a top level of a single word.  A search
 * for the next set bit therefore climbs to the first level where something
 * is set past the start point and walks back down, touching O(levels) words
 * per dirty word found instead of every clean word on the way; an image of
 * 64 TiB at 64 KiB granularity has 2^30 bits but only five levels.  The
 * number of set bits is kept up to date (popcount deltas on every word
 * store), so counting is O(1).  Searching for a clear bit scans forward over
 * full words only, so it too costs time proportional to the dirty data.
 *
 * Invariants (checked by tests/unit/test-hbitmap.c through the public API):
 *   1. levels[0] has one bit per cluster; bits at index >= nb_bits are 0.
 *   2. For l >= 1, bit j of levels[l] is set iff levels[l-1][j] != 0, and
 *      bits at index >= nwords[l-1] are 0.
 *   3. There are at least two levels and the top one is a single word.
 *   4. count == the number of set bits in levels[0].
 * Every change to a level-0 word goes through hb_store(), which keeps 2 and 4.
 *
 * Limits: size must be at most INT64_MAX (offsets are returned as int64_t);
 * size 0 is allowed and gives an empty bitmap on which every operation is a
 * no-op and every search finds nothing.  Offsets are 64-bit throughout, and
 * every shift is of a 64-bit value by less than 64.
 */
#include "bitmap/hbitmap.h"

#include <stdlib.h>
#include <string.h>

#define HB_MAX_LEVELS 12          /* 2^54 bits need 9 */
#define HB_NONE UINT64_MAX        /* "not found" for bit indexes */
#define HB_ONES (~UINT64_C(0))

struct HBitmap {
    uint64_t size;                      /* bytes covered */
    uint64_t nb_bits;                   /* clusters */
    uint64_t count;                     /* set bits in levels[0] */
    unsigned shift;                     /* granularity: log2(cluster bytes) */
    unsigned nlevels;
    uint64_t nwords[HB_MAX_LEVELS];
    uint64_t *levels[HB_MAX_LEVELS];
};

/* Words examined by searches in this thread (see hbitmap_stat_words_visited). */
static _Thread_local uint64_t hb_words_visited;

static inline unsigned hb_popcount(uint64_t x)
{
    return (unsigned)__builtin_popcountll(x);
}

static inline unsigned hb_ctz(uint64_t x)
{
    return (unsigned)__builtin_ctzll(x);   /* x != 0 */
}

/* Bits [lo, hi] of a word, 0 <= lo <= hi <= 63. */
static inline uint64_t hb_mask(unsigned lo, unsigned hi)
{
    return (HB_ONES << lo) & (HB_ONES >> (63 - hi));
}

HBitmap *hbitmap_new(uint64_t size, unsigned granularity_shift)
{
    if (granularity_shift < HBITMAP_MIN_GRANULARITY_SHIFT ||
        granularity_shift > HBITMAP_MAX_GRANULARITY_SHIFT ||
        size > (uint64_t)INT64_MAX) {
        return NULL;
    }
    HBitmap *hb = calloc(1, sizeof(*hb));
    if (!hb) {
        return NULL;
    }
    uint64_t cmask = (UINT64_C(1) << granularity_shift) - 1;
    hb->size = size;
    hb->shift = granularity_shift;
    hb->nb_bits = (size >> granularity_shift) + ((size & cmask) != 0);

    uint64_t bits = hb->nb_bits;        /* bits of the level being built */
    for (unsigned l = 0; ; l++) {
        uint64_t words = bits / 64 + (bits % 64 != 0);
        if (words == 0) {
            words = 1;
        }
        if (l == HB_MAX_LEVELS || words > SIZE_MAX / sizeof(uint64_t)) {
            hbitmap_free(hb);
            return NULL;
        }
        hb->levels[l] = calloc((size_t)words, sizeof(uint64_t));
        if (!hb->levels[l]) {
            hbitmap_free(hb);
            return NULL;
        }
        hb->nwords[l] = words;
        hb->nlevels = l + 1;
        if (l >= 1 && words == 1) {
            break;
        }
        bits = words;
    }
    return hb;
}

HBitmap *hbitmap_resized_copy(const HBitmap *hb, uint64_t size)
{
    HBitmap *n = hbitmap_new(size, hb->shift);
    if (!n) {
        return NULL;
    }
    uint64_t keep = size < hb->size ? size : hb->size, off = 0, o, len;
    while (off < keep &&
           hbitmap_next_dirty_area(hb, off, keep - off, 0, &o, &len)) {
        hbitmap_set(n, o, len);
        off = o + len;
    }
    return n;
}

void hbitmap_free(HBitmap *hb)
{
    if (!hb) {
        return;
    }
    for (unsigned l = 0; l < HB_MAX_LEVELS; l++) {
        free(hb->levels[l]);
    }
    free(hb);
}

void hbitmap_freep(HBitmap **hb)
{
    hbitmap_free(*hb);
    *hb = NULL;
}

uint64_t hbitmap_size(const HBitmap *hb)
{
    return hb->size;
}

unsigned hbitmap_granularity_shift(const HBitmap *hb)
{
    return hb->shift;
}

uint64_t hbitmap_nb_bits(const HBitmap *hb)
{
    return hb->nb_bits;
}

uint64_t hbitmap_stat_words_visited(void)
{
    return hb_words_visited;
}

/*
 * Word w of level l went from zero to non-zero (nonzero = true) or back:
 * flip its summary bit above, and keep climbing while the summary word
 * itself changes between zero and non-zero.
 */
static void hb_propagate(HBitmap *hb, unsigned l, uint64_t w, bool nonzero)
{
    for (l++; l < hb->nlevels; l++) {
        uint64_t *p = &hb->levels[l][w >> 6];
        uint64_t old = *p;
        uint64_t bit = UINT64_C(1) << (w & 63);
        *p = nonzero ? (old | bit) : (old & ~bit);
        if ((old != 0) == (*p != 0)) {
            break;
        }
        w >>= 6;
    }
}

/* The only way level-0 words change: keeps invariants 2 and 4. */
static void hb_store(HBitmap *hb, uint64_t w, uint64_t val)
{
    uint64_t old = hb->levels[0][w];
    if (old == val) {
        return;
    }
    hb->levels[0][w] = val;
    /* Unsigned wrap-around of the intermediate value is well defined. */
    hb->count = hb->count - hb_popcount(old) + hb_popcount(val);
    if ((old != 0) != (val != 0)) {
        hb_propagate(hb, 0, w, val != 0);
    }
}

/*
 * Index of the first set bit >= bit at level l, or HB_NONE.  Climbs only
 * when the current word has nothing left, so the cost is O(levels).
 */
static uint64_t hb_find_set(const HBitmap *hb, unsigned l, uint64_t bit)
{
    uint64_t w = bit >> 6;
    if (w >= hb->nwords[l]) {
        return HB_NONE;
    }
    hb_words_visited++;
    uint64_t x = hb->levels[l][w] & (HB_ONES << (bit & 63));
    if (x) {
        return (w << 6) | hb_ctz(x);
    }
    if (l + 1 >= hb->nlevels) {
        return HB_NONE;
    }
    uint64_t nw = hb_find_set(hb, l + 1, w + 1);
    if (nw == HB_NONE) {
        return HB_NONE;
    }
    hb_words_visited++;
    /* Invariant 2: a set summary bit means a non-zero word below. */
    return (nw << 6) | hb_ctz(hb->levels[l][nw]);
}

/* First clear cluster in [first, last] (last < nb_bits), or HB_NONE.  Scans
 * only full words before it finds one. */
static uint64_t hb_find_clear(const HBitmap *hb, uint64_t first, uint64_t last)
{
    uint64_t w = first >> 6;
    uint64_t x = ~hb->levels[0][w] & (HB_ONES << (first & 63));
    for (;;) {
        hb_words_visited++;
        if (x) {
            uint64_t bit = (w << 6) | hb_ctz(x);
            return bit <= last ? bit : HB_NONE;
        }
        w++;
        if (w > (last >> 6)) {
            return HB_NONE;
        }
        x = ~hb->levels[0][w];
    }
}

/* Clusters [*first, *last] overlapped by a byte range clipped to the size;
 * false when that is empty.  *end gets the clipped end of the byte range. */
static bool hb_clusters(const HBitmap *hb, uint64_t offset, uint64_t bytes,
                        uint64_t *first, uint64_t *last, uint64_t *end)
{
    if (bytes == 0 || offset >= hb->size) {
        return false;
    }
    uint64_t e = bytes > hb->size - offset ? hb->size : offset + bytes;
    *first = offset >> hb->shift;
    *last = (e - 1) >> hb->shift;
    if (end) {
        *end = e;
    }
    return true;
}

static void hb_set_bits(HBitmap *hb, uint64_t first, uint64_t last)
{
    uint64_t fw = first >> 6, lw = last >> 6;
    for (uint64_t w = fw; w <= lw; w++) {
        unsigned lo = w == fw ? (unsigned)(first & 63) : 0;
        unsigned hi = w == lw ? (unsigned)(last & 63) : 63;
        hb_store(hb, w, hb->levels[0][w] | hb_mask(lo, hi));
    }
}

/* Visits only the non-zero words of the range. */
static void hb_reset_bits(HBitmap *hb, uint64_t first, uint64_t last)
{
    uint64_t fw = first >> 6, lw = last >> 6;
    for (uint64_t w = hb_find_set(hb, 1, fw); w != HB_NONE && w <= lw;
         w = hb_find_set(hb, 1, w + 1)) {
        unsigned lo = w == fw ? (unsigned)(first & 63) : 0;
        unsigned hi = w == lw ? (unsigned)(last & 63) : 63;
        hb_store(hb, w, hb->levels[0][w] & ~hb_mask(lo, hi));
    }
}

void hbitmap_set(HBitmap *hb, uint64_t offset, uint64_t bytes)
{
    uint64_t first, last;
    if (hb_clusters(hb, offset, bytes, &first, &last, NULL)) {
        hb_set_bits(hb, first, last);
    }
}

void hbitmap_reset(HBitmap *hb, uint64_t offset, uint64_t bytes)
{
    uint64_t first, last;
    if (hb_clusters(hb, offset, bytes, &first, &last, NULL)) {
        hb_reset_bits(hb, first, last);
    }
}

void hbitmap_reset_all(HBitmap *hb)
{
    if (hb->count) {
        hb_reset_bits(hb, 0, hb->nb_bits - 1);
    }
}

/* Set bits [0, nbits) of an array of words, nbits >= 1. */
static void hb_fill(uint64_t *words, uint64_t nbits)
{
    uint64_t full = nbits / 64;
    memset(words, 0xff, (size_t)full * sizeof(uint64_t));
    if (nbits % 64) {
        words[full] = hb_mask(0, (unsigned)(nbits % 64) - 1);
    }
}

void hbitmap_set_all(HBitmap *hb)
{
    if (hb->nb_bits == 0) {
        return;
    }
    /* Every level-0 word holds at least one valid bit, so every word of
     * every level becomes non-zero. */
    hb_fill(hb->levels[0], hb->nb_bits);
    for (unsigned l = 1; l < hb->nlevels; l++) {
        hb_fill(hb->levels[l], hb->nwords[l - 1]);
    }
    hb->count = hb->nb_bits;
}

bool hbitmap_get(const HBitmap *hb, uint64_t offset)
{
    if (offset >= hb->size) {
        return false;
    }
    uint64_t bit = offset >> hb->shift;
    return (hb->levels[0][bit >> 6] >> (bit & 63)) & 1;
}

uint64_t hbitmap_count_bits(const HBitmap *hb)
{
    return hb->count;
}

uint64_t hbitmap_count_bytes(const HBitmap *hb)
{
    /* count <= nb_bits, and nb_bits << shift <= INT64_MAX + 2^31: no wrap. */
    uint64_t bytes = hb->count << hb->shift;
    uint64_t cmask = (UINT64_C(1) << hb->shift) - 1;
    uint64_t tail = hb->size & cmask;
    if (tail && hbitmap_get(hb, hb->size - 1)) {
        bytes -= (cmask + 1) - tail;
    }
    return bytes;
}

bool hbitmap_is_empty(const HBitmap *hb)
{
    return hb->count == 0;
}

int64_t hbitmap_next_dirty(const HBitmap *hb, uint64_t offset, uint64_t bytes)
{
    uint64_t first, last;
    if (!hb_clusters(hb, offset, bytes, &first, &last, NULL)) {
        return -1;
    }
    uint64_t bit = hb_find_set(hb, 0, first);
    if (bit == HB_NONE || bit > last) {
        return -1;
    }
    uint64_t start = bit << hb->shift;
    return (int64_t)(start > offset ? start : offset);
}

int64_t hbitmap_next_zero(const HBitmap *hb, uint64_t offset, uint64_t bytes)
{
    uint64_t first, last;
    if (!hb_clusters(hb, offset, bytes, &first, &last, NULL)) {
        return -1;
    }
    uint64_t bit = hb_find_clear(hb, first, last);
    if (bit == HB_NONE) {
        return -1;
    }
    uint64_t start = bit << hb->shift;
    return (int64_t)(start > offset ? start : offset);
}

bool hbitmap_next_dirty_area(const HBitmap *hb, uint64_t offset, uint64_t bytes,
                             uint64_t max_bytes, uint64_t *ret_offset,
                             uint64_t *ret_bytes)
{
    uint64_t first, last, end;
    if (!hb_clusters(hb, offset, bytes, &first, &last, &end)) {
        return false;
    }
    uint64_t bit = hb_find_set(hb, 0, first);
    if (bit == HB_NONE || bit > last) {
        return false;
    }
    uint64_t start = bit << hb->shift;
    if (start < offset) {
        start = offset;
    }
    /* The area ends at the next clear cluster, which lies after `bit`, so
     * the area is never empty. */
    uint64_t zbit = bit < last ? hb_find_clear(hb, bit + 1, last) : HB_NONE;
    uint64_t area_end = zbit == HB_NONE ? end : zbit << hb->shift;
    uint64_t len = area_end - start;
    if (max_bytes > 0 && len > max_bytes) {
        len = max_bytes;
    }
    *ret_offset = start;
    *ret_bytes = len;
    return true;
}

bool hbitmap_merge(HBitmap *dst, const HBitmap *src)
{
    if (dst->size != src->size || dst->shift != src->shift) {
        return false;
    }
    if (dst == src) {
        return true;
    }
    for (uint64_t w = hb_find_set(src, 1, 0); w != HB_NONE;
         w = hb_find_set(src, 1, w + 1)) {
        hb_store(dst, w, dst->levels[0][w] | src->levels[0][w]);
    }
    return true;
}

HBitmap *hbitmap_copy(const HBitmap *hb)
{
    HBitmap *c = hbitmap_new(hb->size, hb->shift);
    if (!c) {
        return NULL;
    }
    /* Every level but the top (one word) is copied word by word where it
     * is non-zero, as the level above says (invariant 2), so a sparse
     * bitmap's fresh (calloc'd) pages stay untouched and the time follows
     * the non-zero words, not the size (2 MiB of upper levels at 64 TiB). */
    for (unsigned l = 0; l + 1 < hb->nlevels; l++) {
        for (uint64_t w = hb_find_set(hb, l + 1, 0); w != HB_NONE;
             w = hb_find_set(hb, l + 1, w + 1)) {
            c->levels[l][w] = hb->levels[l][w];
        }
    }
    memcpy(c->levels[hb->nlevels - 1], hb->levels[hb->nlevels - 1],
           (size_t)hb->nwords[hb->nlevels - 1] * sizeof(uint64_t));
    c->count = hb->count;
    return c;
}

uint64_t hbitmap_serialized_size(const HBitmap *hb)
{
    return hb->nb_bits / 8 + (hb->nb_bits % 8 != 0);
}

uint64_t hbitmap_nb_words(const HBitmap *hb)
{
    return hb->nb_bits / 64 + (hb->nb_bits % 64 != 0);
}

bool hbitmap_next_nonzero_words(const HBitmap *hb, uint64_t from,
                                uint64_t *ret_first, uint64_t *ret_count)
{
    /* Level 1 has one bit per level-0 word (invariant 2). */
    uint64_t w = hb->nlevels > 1 ? hb_find_set(hb, 1, from) : HB_NONE;
    uint64_t n = 1;

    if (w == HB_NONE || w >= hb->nwords[0]) {
        return false;
    }
    while (w + n < hb->nwords[0] && hb->levels[0][w + n]) {
        n++;
    }
    hb_words_visited += n;
    *ret_first = w;
    *ret_count = n;
    return true;
}

/* 64 clusters' bits starting at cluster `bit` (any alignment); clusters at
 * or past nb_bits read as 0 (invariant 1). */
static uint64_t hb_extract64(const HBitmap *hb, uint64_t bit)
{
    if (bit >= hb->nb_bits) {
        return 0;
    }
    uint64_t w = bit >> 6;
    unsigned s = (unsigned)(bit & 63);
    uint64_t v = hb->levels[0][w] >> s;
    if (s && w + 1 < hb->nwords[0]) {
        v |= hb->levels[0][w + 1] << (64 - s);
    }
    return v;
}

void hbitmap_serialize_part(const HBitmap *hb, uint8_t *buf, uint64_t first_bit,
                            uint64_t nbits)
{
    uint64_t nbytes = nbits / 8 + (nbits % 8 != 0);
    for (uint64_t i = 0; i < nbytes; i += 8) {
        /* Cluster index first_bit + 8 * i, guarded against wrap-around. */
        uint64_t v = 0;
        if (first_bit < hb->nb_bits && i < (hb->nb_bits - first_bit + 7) / 8) {
            v = hb_extract64(hb, first_bit + 8 * i);
        }
        for (uint64_t k = 0; k < 8 && i + k < nbytes; k++) {
            buf[i + k] = (uint8_t)(v >> (8 * k));
        }
    }
    if (nbits % 8) {
        buf[nbytes - 1] &= (uint8_t)((1u << (nbits % 8)) - 1);
    }
}

/* 64 bits of buf (nbytes long) starting at bit p, LSB first; bytes past the
 * end read as 0. */
static uint64_t hb_buf_bits64(const uint8_t *buf, uint64_t nbytes, uint64_t p)
{
    uint64_t byte = p >> 3;
    unsigned s = (unsigned)(p & 7);
    uint64_t v = 0;
    for (unsigned k = 0; k < 8 && byte + k < nbytes; k++) {
        v |= (uint64_t)buf[byte + k] << (8 * k);
    }
    if (s) {
        v >>= s;
        if (byte + 8 < nbytes) {
            v |= (uint64_t)buf[byte + 8] << (64 - s);
        }
    }
    return v;
}

void hbitmap_deserialize_part(HBitmap *hb, const uint8_t *buf, uint64_t first_bit,
                              uint64_t nbits)
{
    if (nbits == 0 || first_bit >= hb->nb_bits) {
        return;
    }
    uint64_t nbytes = nbits / 8 + (nbits % 8 != 0);
    uint64_t avail = hb->nb_bits - first_bit;
    uint64_t lim = first_bit + (nbits < avail ? nbits : avail);  /* exclusive */
    uint64_t fw = first_bit >> 6, lw = (lim - 1) >> 6;
    for (uint64_t w = fw; w <= lw; w++) {
        uint64_t lo = w == fw ? first_bit : w << 6;
        uint64_t hi = w == lw ? lim : (w << 6) + 64;          /* exclusive */
        unsigned shift = (unsigned)(lo & 63);
        uint64_t mask = hb_mask(shift, shift + (unsigned)(hi - lo) - 1);
        uint64_t v = (hb_buf_bits64(buf, nbytes, lo - first_bit) << shift) & mask;
        hb_store(hb, w, (hb->levels[0][w] & ~mask) | v);
    }
}
