/*
 * Per-node I/O accounting (block-acct.h): relaxed atomic counters, so the
 * data path pays a clock read and a few adds per request and takes no
 * lock.
 */
#include "block/block-acct.h"
#include "util/cutils.h"

#define ADD(p, v) __atomic_fetch_add((p), (v), __ATOMIC_RELAXED)
#define LOAD(p) __atomic_load_n((p), __ATOMIC_RELAXED)

uint64_t block_acct_start(void)
{
    return clock_monotonic_ns();
}

int block_acct_done(BlockAcctStats *s, BdrvAcctType type, uint64_t offset,
                    uint64_t bytes, uint64_t start_ns, int r)
{
    uint64_t now = clock_monotonic_ns();
    if (r < 0) {
        ADD(&s->failed_ops[type], 1);
    } else {
        ADD(&s->ops[type], 1);
        ADD(&s->bytes[type], bytes);
        ADD(&s->total_time_ns[type], now - start_ns);
        if (type == BDRV_ACCT_WRITE) {
            uint64_t end = offset + bytes;
            uint64_t cur = LOAD(&s->wr_highest_offset);
            while (end > cur &&
                   !__atomic_compare_exchange_n(&s->wr_highest_offset, &cur,
                                                end, false, __ATOMIC_RELAXED,
                                                __ATOMIC_RELAXED)) {
            }
        }
    }
    __atomic_store_n(&s->last_access_ns, now, __ATOMIC_RELAXED);
    return r;
}

int block_acct_invalid(BlockAcctStats *s, BdrvAcctType type, int r)
{
    ADD(&s->invalid_ops[type], 1);
    __atomic_store_n(&s->last_access_ns, clock_monotonic_ns(), __ATOMIC_RELAXED);
    return r;
}

void block_acct_snapshot(const BlockAcctStats *s, BlockAcctStats *ret)
{
    for (int t = 0; t < BDRV_ACCT__MAX; t++) {
        ret->bytes[t] = LOAD(&s->bytes[t]);
        ret->ops[t] = LOAD(&s->ops[t]);
        ret->failed_ops[t] = LOAD(&s->failed_ops[t]);
        ret->invalid_ops[t] = LOAD(&s->invalid_ops[t]);
        ret->total_time_ns[t] = LOAD(&s->total_time_ns[t]);
    }
    ret->wr_highest_offset = LOAD(&s->wr_highest_offset);
    ret->last_access_ns = LOAD(&s->last_access_ns);
}
