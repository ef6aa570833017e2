/*
 * The block layer: a graph of nodes.  A node (BlockDriverState) is a driver
 * vtable plus the driver's private state, its children (`file` for the
 * protocol below a format, `backing` for copy-on-write overlays) and its
 * named dirty bitmaps.
 *
 * I/O functions here (bdrv_preadv, bdrv_pwritev, ...) are the only way data
 * enters or leaves a node.  They
 *   1. check the request against the node's length and read-only state,
 *   2. handle request alignment in one place (read-modify-write for writes,
 *      bounce buffers for reads) when the driver needs alignment > 1,
 *   3. for writes, mark every enabled dirty bitmap BEFORE calling the driver
 *      (DESIGN.md D1),
 *   4. call the driver.
 * They are thread-safe: any number of threads may issue requests to the same
 * node at once; drivers protect their own metadata.
 *
 * Data-path functions return 0 or a positive count on success and -errno on
 * failure; they never log.  Setup functions take Error **errp.
 */
#ifndef BITBACK_BLOCK_H
#define BITBACK_BLOCK_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>
#include <json-c/json.h>

#include "block/block-acct.h"
#include "block/check.h"
#include "block/dirty-bitmap.h"
#include "util/error.h"
#include "util/json-opts.h"

/* An internal snapshot as QMP's SnapshotInfo describes it. */
typedef struct BdrvSnapshotInfo {
    char id[32];
    char name[128];
    int64_t date_sec;
    int64_t date_nsec;
} BdrvSnapshotInfo;

/* Receives extents [offset, offset+len); false stops the walk. */
typedef bool BdrvExtentFn(void *opaque, uint64_t offset, uint64_t len);

typedef struct BlockDriver BlockDriver;
typedef struct BlockDriverState BlockDriverState;
typedef struct WilStore WilStore;            /* wil-store.h */

/* Largest request any node accepts (the NBD server splits nothing larger). */
#define BDRV_MAX_REQUEST (64u * 1024 * 1024)
/* Largest image size we accept: 2^63 - 1 would overflow offsets+len; cap at
 * 2^62 bytes (4 EiB). */
#define BDRV_MAX_LENGTH (UINT64_C(1) << 62)

/* Open flags. */
#define BDRV_O_RDWR     0x0001   /* open for writing */
#define BDRV_O_NOCACHE  0x0002   /* O_DIRECT on file nodes */
#define BDRV_O_NO_BACKING 0x0004 /* do not open the image's backing file */
#define BDRV_O_FORCE_SHARE 0x0008 /* read-only, and let others write and
                                     resize every file (force-share=on, -U) */
#define BDRV_O_NO_LOCK  0x0010   /* file nodes default to locking=off (for
                                     files a driver opens on behalf of a
                                     node whose file has locking=off) */

/* Request flags. */
#define BDRV_REQ_FUA          0x0001  /* write: data durable on return */
#define BDRV_REQ_MAY_UNMAP    0x0002  /* write_zeroes: may deallocate */
#define BDRV_REQ_NO_FALLBACK  0x0004  /* write_zeroes: -ENOTSUP unless fast */
#define BDRV_REQ_NOWAIT       0x0008  /* read: -EAGAIN rather than wait for
                                         the disk (data not in page cache) */
/* write: store each cluster compressed (QEMU's flag of the same name).
 * Only drivers with supports_compressed_writes take it (else -ENOTSUP);
 * the request covers whole clusters of the image (the last one may be
 * partial, ending at the image end), cluster-aligned, and every cluster
 * must be unallocated or a zero cluster without data (else -ENOTSUP:
 * a compressed cluster never overwrites data).  A cluster that does not
 * shrink is written plain. */
#define BDRV_REQ_WRITE_COMPRESSED 0x0010
/* With BDRV_REQ_WRITE_COMPRESSED: the compression level (1..255, clamped
 * to what the image's algorithm has; 0: the algorithm's default). */
#define BDRV_MAX_COMPRESS_LEVEL 22   /* zstd's highest; deflate stops at 9 */
#define BDRV_REQ_COMPRESS_LEVEL_SHIFT 16
#define BDRV_REQ_COMPRESS_LEVEL(l) (((int)(l) & 0xff) << BDRV_REQ_COMPRESS_LEVEL_SHIFT)
#define BDRV_REQ_COMPRESS_LEVEL_OF(flags) \
    (((flags) >> BDRV_REQ_COMPRESS_LEVEL_SHIFT) & 0xff)

/* block_status result bits. */
#define BDRV_BLOCK_DATA       0x01  /* the range holds data (may be non-zero) */
#define BDRV_BLOCK_ZERO       0x02  /* the range reads as zeroes */
#define BDRV_BLOCK_ALLOCATED  0x04  /* this layer (not backing) decides content */

struct BlockDriver {
    const char *format_name;
    size_t instance_size;          /* bytes of bs->opaque, zero-filled */
    bool is_protocol;              /* true for "file": opened on a filename */
    bool supports_backing;         /* may have bs->backing */
    bool supports_compressed_writes; /* pwritev takes
                                        BDRV_REQ_WRITE_COMPRESSED */
    /* The option naming the child that becomes bs->file, for drivers that
     * are not protocols: "file" when NULL ("image" for blkdebug). */
    const char *child_key;
    bool is_filter;                /* passes requests to bs->file unchanged
                                      (blkdebug): it grows as its file
                                      does, on writes past the end */

    /* Score 0..100: how sure the driver is that buf (the first bytes of
     * the file, len of them) is its format.  Optional. */
    int (*probe)(const uint8_t *buf, size_t len, const char *filename);

    /* Open the node: options is the full blockdev-add object (driver,
     * node-name, file, backing, filename, ...).  For format drivers, block.c
     * has already opened bs->file before calling open.  bs->backing is opened
     * by the driver (it knows where its backing file is named) through
     * bdrv_open_backing(). */
    bool (*open)(BlockDriverState *bs, struct json_object *options, int flags,
                 Error **errp);
    /* The members of a node's options that are the driver's own (beyond
     * bdrv_common_opts): exactly the ones open, and block.c's open path
     * for this driver (its file child, the "filename" shorthand, "backing"),
     * read.  blockdev-add refuses any other (bdrv_check_options), and
     * query-qmp-schema lists them as the driver's variant. */
    const JsonOptSpec *open_opts;
    /* Free driver state.  Persistent bitmaps were already stored. */
    void (*close)(BlockDriverState *bs);
    /* A backing node was attached after open (bdrv_set_backing): the driver
     * checks it can tell its own clusters from the backing node's, and
     * prepares for it.  Optional; false with errp set refuses the link. */
    bool (*backing_attached)(BlockDriverState *bs, Error **errp);

    int64_t (*getlength)(BlockDriverState *bs);
    /* The allocation unit of the format (qcow2: its cluster size), the
     * size of the whole clusters BDRV_REQ_WRITE_COMPRESSED takes.
     * Optional. */
    uint64_t (*get_cluster_size)(BlockDriverState *bs);
    int (*preadv)(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                  const struct iovec *iov, int niov, int flags);
    int (*pwritev)(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                   const struct iovec *iov, int niov, int flags);
    int (*pwrite_zeroes)(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                         int flags);                       /* optional */
    /* Optional: submit a plain write (flags 0) of bytes in the node's
     * range and return 0; cb(opaque, 0 or -errno) then runs exactly once,
     * possibly in another thread and possibly before aio_pwritev returns.
     * iov's array may go once it returns; the data it points to must stay
     * until cb.  -EAGAIN: not now (nothing was submitted, cb never runs;
     * the caller writes with pwritev instead); another -errno: the write
     * failed (cb never runs). */
    int (*aio_pwritev)(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                       const struct iovec *iov, int niov,
                       void (*cb)(void *opaque, int ret), void *opaque);
    /* aio_pwritev only passes the write to bs->file: it is worth trying
     * only where that node has one. */
    bool aio_pwritev_via_file;
    int (*pdiscard)(BlockDriverState *bs, uint64_t offset, uint64_t bytes);
    int (*flush)(BlockDriverState *bs);
    /* Status of the range starting at offset: returns BDRV_BLOCK_* bits and
     * sets *pnum (1 <= *pnum <= bytes) to how far that status holds.
     * A driver without block_status is treated as all data, allocated. */
    int (*block_status)(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                        uint64_t *pnum);

    /* Persistent bitmaps (optional; a node whose driver lacks them refuses
     * persistent=true).  Called with bs->lock NOT held.
     * can_store_persistent_bitmaps: for a driver whose nodes differ (raw
     * over an RBD image owns the image's bitmaps, raw over a file has
     * none); without it, having persistent_bitmap_add is the answer. */
    bool (*can_store_persistent_bitmaps)(BlockDriverState *bs);
    bool (*persistent_bitmap_add)(BlockDriverState *bs, BdrvDirtyBitmap *bm,
                                  Error **errp);
    bool (*persistent_bitmap_remove)(BlockDriverState *bs, const char *name,
                                     Error **errp);
    /* Write every persistent bitmap durably and mark it clean.  Called by
     * bdrv_close() before close, and by bdrv_store_bitmaps(). */
    bool (*store_bitmaps)(BlockDriverState *bs, Error **errp);
    /* Where the node's write-intent log lives (write-intent.c,
     * wil-store.h), for a driver whose image has no file next to which
     * IMAGE.wil could sit (an RBD image: a RADOS object beside it).
     * create false: the log to recover from, opened without a lock, *ret
     * NULL when there is none; create true: for writing, created if
     * missing and locked so that no other process writes it.  False with
     * errp set on failure (*ret NULL).  Optional: without it the log is
     * the file IMAGE.wil (and a protocol node keeps none). */
    bool (*open_intent_store)(BlockDriverState *bs, bool create,
                              WilStore **ret, Error **errp);

    /* Create an image file (img create).  opts holds the -o options as
     * strings.  Optional. */
    bool (*create)(const char *filename, uint64_t size,
                   struct json_object *opts, Error **errp);
    /* Create an image of a format driver in the empty protocol node file
     * (QMP blockdev-create with "file": NODE; opts as for create).
     * Optional. */
    bool (*create_on_node)(BlockDriverState *file, uint64_t size,
                           struct json_object *opts, Error **errp);
    /* Change the image's length to size bytes (QMP block_resize): grow
     * (the new area reads as zeroes) or shrink.  Called by block.c with
     * every node drained; a format driver resizes its file child with
     * bdrv_truncate_child.  Optional: without it the node refuses. */
    bool (*truncate)(BlockDriverState *bs, uint64_t size, Error **errp);
    /* Add format-specific fields to `info` (the "data" object of qemu-img
     * info's "format-specific").  Optional. */
    void (*info)(BlockDriverState *bs, struct json_object *data);
    /* Consistency check: counts every problem found in *res (the caller
     * initializes it with BDRV_CHECK_RESULT_INIT and clears it), with a
     * message each as room allows (check.h).  Returns 0 when the check ran,
     * whatever it found, or -errno if it could not run.  Never prints.
     * Optional. */
    int (*check)(BlockDriverState *bs, BdrvCheckResult *res);

    /* Internal snapshots (rbd: RBD snapshots of the image).  Optional;
     * block.c passes them from raw and filter nodes to their file child
     * (bdrv_snapshot_*).  snapshot_delete fills *ret (its id, name and
     * creation time) before deleting. */
    bool (*snapshot_create)(BlockDriverState *bs, const char *name,
                            Error **errp);
    bool (*snapshot_delete)(BlockDriverState *bs, const char *name,
                            BdrvSnapshotInfo *ret, Error **errp);
    /* Call fn for extents of [0, size) covering every byte whose content
     * may differ between snapshot `name` and the node now (a superset:
     * written, discarded, zeroed).  fn returns false to stop (the call
     * then fails with -ENOMEM's message). */
    bool (*snapshot_changed)(BlockDriverState *bs, const char *name,
                             BdrvExtentFn *fn, void *opaque, Error **errp);
    /* The snapshots, malloc'ed into *ret (caller frees): their count, or
     * -errno. */
    int (*snapshot_list)(BlockDriverState *bs, BdrvSnapshotInfo **ret);
};

struct BlockDriverState {
    const BlockDriver *drv;
    void *opaque;                  /* drv->instance_size bytes */
    char *node_name;               /* unique in the graph */
    char *filename;                /* for info: the image's file name */
    BlockDriverState *file;        /* protocol child (formats only), owned */
    BlockDriverState *backing;     /* backing child or NULL, owned */
    char *backing_file;            /* the backing file name the image itself
                                      records (what its driver passed to
                                      bdrv_open_backing), NULL when none;
                                      set whether or not that file was
                                      opened (BDRV_O_NO_BACKING, "backing") */
    char *backing_format;          /* its recorded format, or NULL */
    bool read_only;
    int open_flags;
    int open_depth;                /* how deep in the graph being opened it
                                      was opened (0: by the user); set
                                      before the driver's open, which opens
                                      the backing one deeper */
    bool locking;                  /* its files hold QEMU's lock bytes
                                      (file-lock.h): the file node's
                                      "locking" option; a format node
                                      copies its file child's */
    uint32_t request_alignment;    /* set by the driver's open; default 1 */
    int supported_read_flags;      /* BDRV_REQ_NOWAIT if preadv honours it
                                      (set by the driver's open); without
                                      it a NOWAIT read fails with -EAGAIN */
    bool auto_node_name;           /* node_name was generated */
    bool user_owned;               /* opened by the user (blockdev-add,
                                      --blockdev, the CLI), not as a child */
    int refcnt;                    /* users: owner 1, parents, exports, jobs */
    uint64_t size;                 /* length in bytes, cached at open; protocol
                                      nodes grow it on writes past the end */
    pthread_rwlock_t rmw_lock;     /* unaligned read-modify-write excludes
                                      other writes (only when alignment > 1) */

    /* bs->lock, the node's bitmap lock.  The one definition; the other
     * comments point here, docs/DESIGN.md "Locks" gives the global order.
     * Guards: the list dirty_bitmaps and every field of its bitmaps (bits,
     * flags, generations, successors; dirty-bitmap.h), and the in-memory
     * map of the write-intent log (the WriteIntent fields write-intent.c
     * marks "bs->lock"), so that checking a write's region and setting
     * its bits are one step (W2).  Nothing else: not the graph, not a
     * driver's metadata.
     * Rules: never held across I/O or a sleep (qbm's open reads bitmap
     * files under it before the node is in use); nothing is taken under
     * it but the log's mu; two nodes' locks are never held at once; a
     * driver may take it inside its own metadata lock.  The list and the
     * flags change only on the main thread (under the lock), which may
     * therefore read them without it; the bits change in every writer and
     * are read under it everywhere.  Drivers' bitmap callbacks are called
     * without it. */
    pthread_mutex_t lock;
    BdrvDirtyBitmap *dirty_bitmaps;

    BlockDriverState *next_node;   /* global list of named nodes */

    BlockAcctStats stats;          /* I/O counters (atomic, block-acct.h) */

    /* Drain and I/O hooks (see "Drained sections" below). */
    unsigned in_flight;            /* client writes/zero/discards in
                                      progress (atomic; bdrv_client_*) */
    int quiesce_counter;           /* > 0: new client writes wait */
    pthread_mutex_t drain_lock;    /* with drain_cond: waiting on either */
    pthread_cond_t drain_cond;
    pthread_rwlock_t hooks_lock;   /* requests hold it shared while they
                                      run hooks; add/remove hold it
                                      exclusively.  Prefers readers: it
                                      may be taken shared again, on the
                                      same node or in either order between
                                      a job's nodes (DESIGN.md "Locks") */
    struct BdrvIoHook *hooks;      /* list, protected by hooks_lock */
    const char *job_blocker;       /* non-NULL while a job uses the node:
                                      the job's id, for "in use" errors
                                      (main thread) */

    /* Crash-safe bitmaps (write-intent.h). */
    bool crash_safe;               /* option "crash-safe" (default on) */
    bool discard_ignore;           /* option "discard": "ignore" (default
                                      "unmap": discards reach the driver) */
    unsigned wil_region_shift;     /* "crash-safe-region-size", log2 */
    bool bitmaps_foreign_writes;   /* set by a driver's open when another
                                      program may have written the image
                                      since our last session: no recovery */
    bool bitmaps_changed;          /* (atomic) a bitmap was added, removed,
                                      cleared, enabled, disabled, merged:
                                      the log must save it */
    struct WriteIntent *wil;       /* NULL: not crash-safe or read-only */
};

/* Option getters for drivers' open: the member key of opts as a JSON
 * value or, as the daemon's command line gives every value, a string
 * ("on"/"off"/..., decimal).  Absent or null: *ret = def.  Mistyped or
 * (for bdrv_opt_uint) above max: false with errp naming key. */
bool bdrv_opt_bool(struct json_object *opts, const char *key, bool def,
                   bool *ret, Error **errp);
/* The "locking" option of protocol nodes (file, rbd): "on" or "auto"
 * (*ret_on true), "off" (false); absent: def. */
bool bdrv_opt_locking(struct json_object *opts, bool def, bool *ret_on,
                      Error **errp);
bool bdrv_opt_uint(struct json_object *opts, const char *key, uint64_t def,
                   uint64_t max, uint64_t *ret, Error **errp);

/* The members of every node's options, whatever its driver (block.c's
 * open path reads them): driver, node-name, read-only, force-share,
 * cache (direct, no-flush), crash-safe, crash-safe-region-size, discard,
 * detect-zeroes, auto-read-only. */
extern const JsonOptSpec bdrv_common_opts[];
/* The "locking" member of protocol nodes (bdrv_opt_locking). */
extern const char *const bdrv_locking_values[];
extern const char *const bdrv_discard_values[];
extern const char *const bdrv_detect_zeroes_values[];
extern const char *const bdrv_aio_values[];
/* The string member key of opts, one of values (NULL-ended) or absent
 * (def); QEMU's errors otherwise.  *ret points into values or is def. */
bool bdrv_opt_enum(struct json_object *opts, const char *key,
                   const char *const *values, const char *def,
                   const char **ret, Error **errp);
/* Check a node's options (blockdev-add's arguments) before opening: every
 * member must be a common one or its driver's (open_opts), at any depth
 * (a child given as options is checked for its own driver, its members
 * named "file.x"), and have the type the spec gives; strings are accepted
 * for bool and int members (the command line's values; the readers parse
 * them).  An absent or unknown driver is left to bdrv_open_options.
 * False with errp set (QEMU's texts: "Parameter 'x' is unexpected"). */
bool bdrv_check_options(struct json_object *options, Error **errp);

/* Registry of drivers (file, raw, qbm, ...). */
const BlockDriver *bdrv_find_format(const char *name);
/* Driver names, NULL-terminated. */
const char *const *bdrv_format_names(void);

/* Open a node from a blockdev-add style options object:
 *   {"driver": "qbm", "node-name": "d0", "read-only": false,
 *    "file": {"driver":"file","filename":"x.qbm"} | "existing-node-name",
 *    "backing": "node" | {...} | null,  ...driver options}
 * Shorthand accepted for format drivers: "file" may be omitted when
 * "filename" is given (opens a file node under it, or an rbd node for an
 * "rbd:" name).
 * The node joins the global graph with refcnt 1.  Not thread-safe with other
 * graph changes (callers are the main thread). */
BlockDriverState *bdrv_open_options(struct json_object *options, int flags,
                                    Error **errp);
/* Open an image by file name: format NULL means probe (qbm descriptor,
 * qcow2 magic, else raw).  The returned node is a format node over a file
 * node (an rbd node for "rbd:" names, which are not probed: raw unless
 * format says otherwise). */
BlockDriverState *bdrv_open_image(const char *filename, const char *format,
                                  int flags, Error **errp);
/* Does filename look like an NBD URI (nbd://, nbd+unix://, ...)?  Such
 * names open an "nbd" node (bdrv_open_image) and cannot be created. */
bool bdrv_filename_is_nbd_uri(const char *filename);
/* Does filename name an RBD image ("rbd:pool/image...", rbd.c)?  Such a
 * name, given by the user to bdrv_open_image, to a format node's
 * "filename" shorthand or to img create, opens or makes an "rbd" node
 * (raw data unless a format is given); a backing file name an image
 * records never does. */
bool bdrv_filename_is_rbd(const char *filename);
/* For drivers: record `backing_name` and `backing_fmt` (the image's own
 * backing reference; NULL or "" = none) in bs->backing_file and
 * bs->backing_format, then open that image (relative names resolve
 * against the folder of bs->filename) with format `backing_fmt` (NULL =
 * probe), read-only, unless options has "backing" (a node name string, an
 * object, or null), which wins, or bs was opened with BDRV_O_NO_BACKING
 * (nothing is opened).  Sets bs->backing. */
bool bdrv_open_backing(BlockDriverState *bs, struct json_object *options,
                       const char *backing_name, const char *backing_fmt,
                       Error **errp);
/* For drivers' open: a child of parent other than its file and backing
 * (qbm's "data-file"): ref is a node name (that node, with a new
 * reference; refused when flags ask for writing and it is read-only) or
 * an options object (a new node, opened one level deeper than parent). */
BlockDriverState *bdrv_open_child(BlockDriverState *parent,
                                  struct json_object *ref, int flags,
                                  Error **errp);
/* Make `backing` the backing node of bs, which has none (opened with
 * BDRV_O_NO_BACKING or "backing": null): the caller chose it, whatever
 * bs->backing_file says.  Takes a reference to backing (the caller keeps
 * its own).  Refused when bs's driver takes no backing, bs already has
 * one, bs is in backing's chain (a loop) or the chain would be deeper
 * than the block layer follows.  Main thread, before any I/O on bs. */
bool bdrv_set_backing(BlockDriverState *bs, BlockDriverState *backing,
                      Error **errp);

/* Take / drop a reference.  Dropping the last one closes the node:
 * persistent bitmaps are stored (errors reported on stderr), the driver's
 * close runs, children are unref'd. */
void bdrv_ref(BlockDriverState *bs);
void bdrv_unref(BlockDriverState *bs);
/* Close a node now, reporting bitmap-store errors through errp.  The node
 * is freed whatever the result. */
bool bdrv_close(BlockDriverState *bs, Error **errp);

BlockDriverState *bdrv_find_node(const char *node_name);
/* bs's node name for messages and logs: "(anonymous)" when it has none. */
const char *bdrv_node_label(const BlockDriverState *bs);
/* Iterate the graph: first with NULL. */
BlockDriverState *bdrv_next_node(BlockDriverState *bs);

int64_t bdrv_getlength(BlockDriverState *bs);
/* The node's driver's cluster size (get_cluster_size), 0 when it has
 * none. */
uint64_t bdrv_get_cluster_size(BlockDriverState *bs);

/* I/O.  Requests must lie within the node's length and be at most
 * BDRV_MAX_REQUEST bytes (-EINVAL otherwise); writes to read-only nodes
 * fail with -EPERM. */
int bdrv_preadv(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                const struct iovec *iov, int niov, int flags);
int bdrv_pwritev(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                 const struct iovec *iov, int niov, int flags);
int bdrv_pread(BlockDriverState *bs, uint64_t offset, void *buf, uint64_t bytes);
/* For drivers: read `bytes` at `offset` of `child` into iov from byte
 * iov_off on, where only the first `avail` bytes exist in child (the rest,
 * past its end, read as zeroes).  0 or -errno. */
int bdrv_preadv_zero_tail(BlockDriverState *child, uint64_t offset,
                          uint64_t bytes, uint64_t avail,
                          const struct iovec *iov, int niov, size_t iov_off);
/* For format drivers: what an unallocated range of bs shows -- its backing
 * image's data, zeroes past the backing's end or without a backing. */
int bdrv_preadv_backing(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                        const struct iovec *iov, int niov, size_t iov_off);
int bdrv_pwrite(BlockDriverState *bs, uint64_t offset, const void *buf,
                uint64_t bytes, int flags);
/* Without driver support (or with BDRV_REQ_NO_FALLBACK missing) falls back
 * to writing a zero buffer.  With NO_FALLBACK and no fast path: -ENOTSUP. */
int bdrv_pwrite_zeroes(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                       int flags);
int bdrv_pdiscard(BlockDriverState *bs, uint64_t offset, uint64_t bytes);
int bdrv_flush(BlockDriverState *bs);

/* Status of this node's content at offset, following the backing chain:
 * DATA/ZERO describe what a read returns; ALLOCATED says whether this top
 * layer holds it.  Sets *pnum as the driver hook does. */
int bdrv_block_status(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                      uint64_t *pnum);
/* For drivers that show their file child's bytes unchanged (raw,
 * blkdebug): the child's DATA/ZERO bits, and ALLOCATED (such a node has
 * no backing layer below it). */
int bdrv_block_status_from_file(BlockDriverState *bs, uint64_t offset,
                                uint64_t bytes, uint64_t *pnum);
/* Only this layer: BDRV_BLOCK_ALLOCATED when bs itself holds
 * [offset, +*pnum), with DATA or ZERO saying how; 0 when it leaves the
 * range to its backing chain.  Like bdrv_block_status, 0 and *pnum 0 at
 * or past the end. */
int bdrv_layer_status(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                      uint64_t *pnum);
/* Only this layer: is [offset, +*pnum) allocated in bs itself? */
int bdrv_is_allocated(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                      uint64_t *pnum);

/* Persistent bitmap management through the driver. */
bool bdrv_can_store_persistent_bitmaps(BlockDriverState *bs);
/* Add a named bitmap as QMP's block-dirty-bitmap-add does. */
BdrvDirtyBitmap *bdrv_dirty_bitmap_add(BlockDriverState *bs, const char *name,
                                       uint32_t granularity, bool persistent,
                                       bool disabled, Error **errp);
/* Remove a bitmap (also from the image when persistent). */
bool bdrv_dirty_bitmap_remove(BlockDriverState *bs, const char *name,
                              Error **errp);
bool bdrv_store_bitmaps(BlockDriverState *bs, Error **errp);

/* Default granularity for a new bitmap on bs: 64 KiB. */
uint32_t bdrv_default_bitmap_granularity(BlockDriverState *bs);

/* QMP block_resize: make node bs size bytes long, and every dirty bitmap
 * on it (and on the children resized with it) cover the new length, a new
 * area clean.  Refused (false, errp set) for a read-only node, a node a
 * job uses, a child of another node (resize the parent), a node whose
 * driver cannot resize, and one with persistent bitmaps or a write-intent
 * log (their on-disk sizes are not changed).  Main thread; drains every
 * node around the change.  (QMP refuses exported nodes, as QEMU does.) */
bool bdrv_truncate(BlockDriverState *bs, uint64_t size, Error **errp);
/* For a driver's truncate: resize its child `child` the same way (driver,
 * cached length, bitmaps). */
bool bdrv_truncate_child(BlockDriverState *child, uint64_t size,
                         Error **errp);

/* Forget the node's cached length and ask the driver again. */
int64_t bdrv_refresh_length(BlockDriverState *bs);

/* Image creation through a driver (img create). */
/* For a driver's create: every key of opts is one of known[0..n) and has a
 * string value; otherwise an error naming the key (and the format). */
bool bdrv_check_create_opts(struct json_object *opts, const char *const *known,
                            size_t n, const char *format, Error **errp);
bool bdrv_img_create(const char *filename, const char *format, uint64_t size,
                     struct json_object *opts, Error **errp);
/* The same into the empty protocol node file (blockdev-create); file must
 * be writable and used by nothing else while this runs (any thread). */
bool bdrv_img_create_on_node(BlockDriverState *file, const char *format,
                             uint64_t size, struct json_object *opts,
                             Error **errp);

/* ---- Drained sections and I/O hooks (for backup jobs) ----
 *
 * A drained section fixes a point in time: bdrv_drain_all_begin() makes new
 * client writes, zero-writes and discards on every node wait at entry
 * (before their dirty bits are set), and returns once none is in progress.
 * Everything done before bdrv_drain_all_end() (creating successor bitmaps,
 * installing hooks, clearing bitmaps in a transaction) happens atomically
 * with respect to the writers.  Reads are never blocked.
 *
 * Only *client* requests are gated: those made with bdrv_client_pwritev,
 * bdrv_client_pwrite_zeroes and bdrv_client_pdiscard, which the NBD server
 * uses for its clients' writes (QEMU's BlockBackend requests play this
 * part).  Every request made with bdrv_* (a driver writing its children, a
 * hook copying before a write, a job, the monitor, the CLI) is never
 * gated, so a drain cannot wait for a request that waits for the drain.
 * The thread inside a drained section must not make client requests.
 *
 * Sections nest (a counter per node).  Main thread only.
 */
void bdrv_drain_all_begin(void);
void bdrv_drain_all_end(void);

/* The same as bdrv_pwritev, bdrv_pwrite_zeroes and bdrv_pdiscard, for a
 * request from outside the graph: it waits (before its dirty bits are set)
 * while bs is in a drained section, and is counted in bs->in_flight until
 * it finishes, so bdrv_drain_all_begin waits for it. */
int bdrv_client_pwritev(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                        const struct iovec *iov, int niov, int flags);
int bdrv_client_pwrite_zeroes(BlockDriverState *bs, uint64_t offset,
                              uint64_t bytes, int flags);
int bdrv_client_pdiscard(BlockDriverState *bs, uint64_t offset, uint64_t bytes);

/* bdrv_client_pwritev without waiting, where the node allows it: a plain
 * write (no flags) to a node whose driver has aio_pwritev, with no I/O
 * hooks, no drain in progress and no write-intent I/O needed (the regions
 * are durable already).  Returns
 *   1: submitted, with its dirty bits set; cb(opaque, 0 or -errno) runs
 *      exactly once later, possibly in another thread, possibly before
 *      this returns; iov's data must stay until then;
 *   0: not possible without waiting; nothing was done (the caller writes
 *      with bdrv_client_pwritev);
 *   -errno: the write failed at once (cb never runs).
 * Never blocks on I/O of its own. */
typedef void BdrvAioCb(void *opaque, int ret);
/* Whether bdrv_client_aio_pwritev can ever take a write of bs (its driver,
 * or the node it passes writes to, writes asynchronously): callers skip
 * their own preparation where it cannot. */
bool bdrv_can_aio_pwritev(BlockDriverState *bs);
/* The same for a request inside the graph (a format node passing a
 * client's write to its child), not gated by drains. */
int bdrv_aio_pwritev(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                     const struct iovec *iov, int niov, BdrvAioCb *cb,
                     void *opaque);
int bdrv_client_aio_pwritev(BlockDriverState *bs, uint64_t offset,
                            uint64_t bytes, const struct iovec *iov, int niov,
                            BdrvAioCb *cb, void *opaque);

/* A hook sees requests to one node.  before_write runs for every write,
 * zero-write and discard of [offset, offset+bytes) after the node's dirty
 * bitmaps are marked and before the driver (or the alignment code) touches
 * data; a negative return fails the request with that errno.
 * before_read/after_read bracket every read of the node (after_read runs
 * whenever before_read returned 0).  Any callback may be NULL.  Hooks run
 * in the requesting thread, may block, and may issue I/O to other nodes.
 * Add and remove only inside a drained section (main thread): removal waits
 * until no request is running the hook. */
typedef struct BdrvIoHook {
    int (*before_write)(struct BdrvIoHook *hook, BlockDriverState *bs,
                        uint64_t offset, uint64_t bytes);
    int (*before_read)(struct BdrvIoHook *hook, BlockDriverState *bs,
                       uint64_t offset, uint64_t bytes);
    void (*after_read)(struct BdrvIoHook *hook, BlockDriverState *bs,
                       uint64_t offset, uint64_t bytes);
    void *opaque;
    struct BdrvIoHook *next;       /* owned by the node's list */
} BdrvIoHook;
void bdrv_add_io_hook(BlockDriverState *bs, BdrvIoHook *hook);
void bdrv_remove_io_hook(BlockDriverState *bs, BdrvIoHook *hook);

/* Is `base` bs itself or a node in bs's backing chain? */
bool bdrv_chain_contains(BlockDriverState *bs, BlockDriverState *base);

/* Internal snapshots of the image under bs (BlockDriver.snapshot_*): bs or,
 * through raw and filter nodes, the first file child whose driver has
 * them.  Each fails with QEMU's message when no node there has snapshots
 * ("Block format 'F' used by device 'N' does not support internal
 * snapshots").  create refuses an existing name and a read-only node;
 * delete of a missing name fails. */
bool bdrv_snapshot_create(BlockDriverState *bs, const char *name, Error **errp);
bool bdrv_snapshot_delete(BlockDriverState *bs, const char *name,
                          BdrvSnapshotInfo *ret, Error **errp);
bool bdrv_snapshot_changed(BlockDriverState *bs, const char *name,
                           BdrvExtentFn *fn, void *opaque, Error **errp);
/* The internal snapshots under bs (caller frees *ret): their count, 0 when
 * none or when nothing under bs has snapshots, or -errno. */
int bdrv_snapshot_list(BlockDriverState *bs, BdrvSnapshotInfo **ret);

#endif
