/*
 * query-blockstats: the I/O counters of every named node (block-acct.h),
 * in the shape of QEMU's BlockStats / BlockDeviceStats (qapi/block-core.json).
 *
 * With "query-nodes": true there is one entry per named node, with its
 * "node-name", its primary child's entry as "parent" (a format node's file
 * node), and for the file driver QEMU's "driver-specific" discard
 * counters.  Without it QEMU lists the named BlockBackends ("devices");
 * qemu-storage-daemon has none (its exports' backends are anonymous) and
 * returns [], and so does bitbackd.
 *
 * Unlike qemu-storage-daemon, whose per-node counters stay 0 (QEMU counts
 * at the device emulation, which a storage daemon does not have), the
 * counters here move: every request is counted at the node it enters.
 * Main thread (the graph does not change under it); the counters are read
 * atomically.
 */
#include <stdio.h>
#include <string.h>

#include "qmp/qmp-internal.h"
#include "util/cleanup.h"
#include "util/cutils.h"

static void add_u64(struct json_object *o, const char *key, uint64_t v)
{
    json_object_object_add(o, key, json_object_new_uint64(v));
}

/* BlockDeviceStats of bs: a new object. */
static struct json_object *device_stats(BlockDriverState *bs)
{
    BlockAcctStats st;
    block_acct_snapshot(&bs->stats, &st);
    struct json_object *o = json_object_new_object();
    static const struct {
        const char *prefix;
        BdrvAcctType type;
    } kinds[] = {
        { "rd", BDRV_ACCT_READ },
        { "wr", BDRV_ACCT_WRITE },
        { "unmap", BDRV_ACCT_UNMAP },
        { "flush", BDRV_ACCT_FLUSH },
    };
    char key[64];
    for (size_t i = 0; i < ARRAY_SIZE(kinds); i++) {
        const char *p = kinds[i].prefix;
        BdrvAcctType t = kinds[i].type;
        if (t != BDRV_ACCT_FLUSH) {
            snprintf(key, sizeof(key), "%s_bytes", p);
            add_u64(o, key, st.bytes[t]);
            snprintf(key, sizeof(key), "%s_merged", p);
            add_u64(o, key, 0);          /* bitbackd merges no requests */
        }
        snprintf(key, sizeof(key), "%s_operations", p);
        add_u64(o, key, st.ops[t]);
        snprintf(key, sizeof(key), "%s_total_time_ns", p);
        add_u64(o, key, st.total_time_ns[t]);
        snprintf(key, sizeof(key), "failed_%s_operations", p);
        add_u64(o, key, st.failed_ops[t]);
        snprintf(key, sizeof(key), "invalid_%s_operations", p);
        add_u64(o, key, st.invalid_ops[t]);
    }
    add_u64(o, "wr_highest_offset", st.wr_highest_offset);
    if (st.last_access_ns) {
        add_u64(o, "idle_time_ns", clock_monotonic_ns() - st.last_access_ns);
    }
    /* Both are always counted, so both accountings are on. */
    json_object_object_add(o, "account_invalid", json_object_new_boolean(true));
    json_object_object_add(o, "account_failed", json_object_new_boolean(true));
    json_object_object_add(o, "timed_stats", json_object_new_array());
    return o;
}

/* BlockStats of bs at node level: a new object. */
static struct json_object *node_stats(BlockDriverState *bs)
{
    struct json_object *o = json_object_new_object();
    if (bs->node_name && *bs->node_name) {
        json_object_object_add(o, "node-name",
                               json_object_new_string(bs->node_name));
    }
    json_object_object_add(o, "stats", device_stats(bs));
    if (strcmp(bs->drv->format_name, "file") == 0) {
        BlockAcctStats st;
        block_acct_snapshot(&bs->stats, &st);
        struct json_object *d = json_object_new_object();
        json_object_object_add(d, "driver", json_object_new_string("file"));
        add_u64(d, "discard-nb-ok", st.ops[BDRV_ACCT_UNMAP]);
        add_u64(d, "discard-nb-failed", st.failed_ops[BDRV_ACCT_UNMAP]);
        add_u64(d, "discard-bytes-ok", st.bytes[BDRV_ACCT_UNMAP]);
        json_object_object_add(o, "driver-specific", d);
    }
    if (bs->file) {
        json_object_object_add(o, "parent", node_stats(bs->file));
    }
    return o;
}

static struct json_object *qmp_query_blockstats(struct json_object *args,
                                                Error **errp)
{
    struct json_object *arr = json_object_new_array();
    if (!json_opt_bool(args, "query-nodes", false)) {
        return arr;
    }
    for (BlockDriverState *bs = bdrv_next_node(NULL); bs;
         bs = bdrv_next_node(bs)) {
        json_object_array_add(arr, node_stats(bs));
    }
    return arr;
}

void qmp_register_stats_commands(void)
{
    static const QmpArgSpec spec[] = {
        { "query-nodes", QMP_ARG_BOOL, true },
        { NULL },
    };
    qmp_register_command_spec("query-blockstats", qmp_query_blockstats, spec);
}
