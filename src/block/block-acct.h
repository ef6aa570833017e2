/*
 * Per-node I/O accounting: the counters of QEMU's BlockDeviceStats
 * (query-blockstats) kept for every node, at the node's entry points
 * (bdrv_preadv, bdrv_pwritev, bdrv_pwrite_zeroes, bdrv_pdiscard,
 * bdrv_flush in block.c).  A request to a format node that goes on to its
 * file child is counted on both, each at its own entry.
 *
 * Every field is updated with relaxed atomic adds from any thread (no
 * lock; a few adds per request) and read the same way, so a reader sees
 * each counter exact but not all counters at one instant.
 */
#ifndef BITBACK_BLOCK_ACCT_H
#define BITBACK_BLOCK_ACCT_H

#include <stdint.h>

typedef enum BdrvAcctType {
    BDRV_ACCT_READ,
    BDRV_ACCT_WRITE,       /* writes and write-zeroes */
    BDRV_ACCT_FLUSH,
    BDRV_ACCT_UNMAP,       /* discards */
    BDRV_ACCT__MAX,
} BdrvAcctType;

typedef struct BlockAcctStats {
    uint64_t bytes[BDRV_ACCT__MAX];         /* of successful requests */
    uint64_t ops[BDRV_ACCT__MAX];           /* successful requests */
    uint64_t failed_ops[BDRV_ACCT__MAX];    /* the driver failed them */
    uint64_t invalid_ops[BDRV_ACCT__MAX];   /* refused before the driver:
                                               out of range, read-only */
    uint64_t total_time_ns[BDRV_ACCT__MAX]; /* of successful requests */
    uint64_t wr_highest_offset;             /* end of the highest write */
    uint64_t last_access_ns;                /* CLOCK_MONOTONIC; 0: never */
} BlockAcctStats;

/* The time a request starts (CLOCK_MONOTONIC ns). */
uint64_t block_acct_start(void);
/* Account a request that began at start_ns and ended with result r
 * (0 or more: done, bytes counted; -errno: failed).  Returns r. */
int block_acct_done(BlockAcctStats *s, BdrvAcctType type, uint64_t offset,
                    uint64_t bytes, uint64_t start_ns, int r);
/* Account a request refused before it started.  Returns r. */
int block_acct_invalid(BlockAcctStats *s, BdrvAcctType type, int r);
/* A copy of every counter, each read atomically. */
void block_acct_snapshot(const BlockAcctStats *s, BlockAcctStats *ret);

#endif
