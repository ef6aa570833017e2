/*
 * HBitmap: a hierarchical bitmap over a byte range.
 *
 * Each bit of the lowest level stands for 2^granularity_shift bytes (a
 * "cluster").  Upper levels hold one bit per 64-bit word of the level below,
 * set when that word is non-zero, so searching for dirty bits skips clean
 * areas in time proportional to the dirty data, not the image size.
 * The number of set bits is maintained on every change, so counting is O(1).
 *
 * All offsets and lengths are in bytes of the covered image.  A byte range
 * touches every cluster it overlaps.  The bitmap is not thread-safe: callers
 * serialize (dirty-bitmap.c uses the node lock).
 *
 * Serialized form (QBM bitmap files, qcow2 bitmap tables): bit i of the
 * cluster sequence is bit (i % 8) of byte (i / 8), least significant first.
 */
#ifndef BITBACK_HBITMAP_H
#define BITBACK_HBITMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define HBITMAP_MIN_GRANULARITY_SHIFT 9   /* 512 B */
#define HBITMAP_MAX_GRANULARITY_SHIFT 31  /* 2 GiB */

typedef struct HBitmap HBitmap;

/* A new all-clear bitmap covering `size` bytes.  Returns NULL when
 * granularity_shift is out of [9, 31] or memory is short. */
HBitmap *hbitmap_new(uint64_t size, unsigned granularity_shift);
void hbitmap_free(HBitmap *hb);
void hbitmap_freep(HBitmap **hb);

uint64_t hbitmap_size(const HBitmap *hb);            /* bytes covered */
unsigned hbitmap_granularity_shift(const HBitmap *hb);
uint64_t hbitmap_nb_bits(const HBitmap *hb);         /* clusters */

/* Mark / clear every cluster that overlaps [offset, offset+bytes),
 * clipped to the covered size. */
void hbitmap_set(HBitmap *hb, uint64_t offset, uint64_t bytes);
void hbitmap_reset(HBitmap *hb, uint64_t offset, uint64_t bytes);
void hbitmap_reset_all(HBitmap *hb);
void hbitmap_set_all(HBitmap *hb);

/* Is the cluster containing byte `offset` set? */
bool hbitmap_get(const HBitmap *hb, uint64_t offset);

/* Number of set clusters. */
uint64_t hbitmap_count_bits(const HBitmap *hb);
/* Dirty bytes: set clusters times the cluster size, the last (partial)
 * cluster counted only up to the covered size. */
uint64_t hbitmap_count_bytes(const HBitmap *hb);
bool hbitmap_is_empty(const HBitmap *hb);

/* Byte offset of the first set cluster whose start is >= offset rounded
 * down to its cluster, limited to [offset, offset+bytes) (the returned
 * value is max(offset, cluster start)).  -1 when none. */
int64_t hbitmap_next_dirty(const HBitmap *hb, uint64_t offset, uint64_t bytes);
/* Same for the first clear cluster.  -1 when none. */
int64_t hbitmap_next_zero(const HBitmap *hb, uint64_t offset, uint64_t bytes);
/* The first dirty area in [offset, offset+bytes): sets *ret_offset and
 * *ret_bytes (clipped to the range and to max_bytes if max_bytes > 0) and
 * returns true; false when the range is clean. */
bool hbitmap_next_dirty_area(const HBitmap *hb, uint64_t offset, uint64_t bytes,
                             uint64_t max_bytes, uint64_t *ret_offset,
                             uint64_t *ret_bytes);

/* A new bitmap of the same granularity covering `size` bytes, with the
 * bits of hb for [0, min(size, hbitmap_size(hb))) and every other bit
 * clear (a grown bitmap's new area is clean).  NULL when memory is
 * short. */
HBitmap *hbitmap_resized_copy(const HBitmap *hb, uint64_t size);

/* dst |= src.  Both must have the same size and granularity; returns false
 * (dst unchanged) otherwise. */
bool hbitmap_merge(HBitmap *dst, const HBitmap *src);
/* A deep copy, or NULL on allocation failure. */
HBitmap *hbitmap_copy(const HBitmap *hb);

/* Bytes of the serialized form: DIV_ROUND_UP(nb_bits, 8). */
uint64_t hbitmap_serialized_size(const HBitmap *hb);
/* Write the serialized bits of clusters [first_bit, first_bit + nbits) into
 * buf; first_bit must be a multiple of 8, and buf holds DIV_ROUND_UP(nbits, 8)
 * bytes.  Padding bits past the end are written as zero. */
void hbitmap_serialize_part(const HBitmap *hb, uint8_t *buf, uint64_t first_bit,
                            uint64_t nbits);
/* Inverse: OR-free load, the clusters' bits are replaced by buf's.  Bits past
 * nb_bits in buf are ignored. */
void hbitmap_deserialize_part(HBitmap *hb, const uint8_t *buf, uint64_t first_bit,
                              uint64_t nbits);

/* The serialized form as 64-bit words: word w holds clusters [64w, 64w+64)
 * (serialize_part of those 512 bits).  hbitmap_nb_words: DIV_ROUND_UP(nb_bits, 64). */
uint64_t hbitmap_nb_words(const HBitmap *hb);
/* The first run of consecutive non-zero words at or after word `from`:
 * sets *ret_first and *ret_count (>= 1, the run is maximal) and returns
 * true; false when every word from there on is zero.  The upper levels skip
 * zero words, so the cost is O(levels + count), not O(size): walking every
 * run costs what is dirty (write-intent snapshots, sparse stores). */
bool hbitmap_next_nonzero_words(const HBitmap *hb, uint64_t from,
                                uint64_t *ret_first, uint64_t *ret_count);

/* For tests and benchmarks: how many bitmap words the searches (next_dirty,
 * next_zero, next_dirty_area, reset, merge, copy) have examined in the
 * calling thread so far.  Take differences; the absolute value means nothing. */
uint64_t hbitmap_stat_words_visited(void);

#endif
