/*
 * The backup repository (docs/specs/repository.md): its layout, manifests,
 * per-cluster hashes and Merkle roots, and the two-phase commit.
 *
 * Used by `bitback backup` (writes), `restore`, `verify`, `list` and
 * `prune` (read, and prune rewrites).  Everything here is control code:
 * functions take Error **errp last and report nothing themselves.
 *
 * Ownership: a Repo owns its manifests; pointers returned by the lookup
 * functions stay valid until repo_free() or repo_reload().
 */
#ifndef BITBACK_REPO_REPO_H
#define BITBACK_REPO_REPO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <json-c/json.h>

#include "block/block.h"
#include "repo/storage.h"
#include "util/error.h"

#define REPO_CLUSTER_SIZE   65536u
#define REPO_HASH_LEN       16       /* XXH3-128 */
#define REPO_ROOT_LEN       32       /* SHA-256 */
#define REPO_ID_LEN         16       /* "000001" + NUL, with room */
#define REPO_MAX_NODE_NAME  127

typedef enum RepoLevel {
    REPO_LEVEL_FULL,
    REPO_LEVEL_INC,
    REPO_LEVEL_DIFF,
} RepoLevel;

const char *repo_level_name(RepoLevel level);            /* "full", ... */
bool repo_level_parse(const char *s, RepoLevel *ret);

typedef struct RepoExtent {
    uint64_t start;
    uint64_t length;
} RepoExtent;

typedef struct RepoHash {
    uint64_t cluster;                  /* index: byte offset / cluster size */
    uint8_t hash[REPO_HASH_LEN];
} RepoHash;

/* A dirty bitmap's dirty byte count as a backup's commit saw it
 * (manifest key "bitmap-counts"). */
typedef struct RepoBitmapCount {
    char *name;
    uint64_t count;
} RepoBitmapCount;

/* At most this many entries in "bitmap-counts". */
#define REPO_MAX_BITMAP_COUNTS 4096

typedef struct RepoManifest {
    /* 1: hashes inline (extents, hashes); 2: hashes in the backup's
     * binary index (index.c).  Every manifest written is version 2. */
    unsigned version;
    unsigned seq;                      /* the ID as a number */
    char id[REPO_ID_LEN];              /* "%06u" of seq */
    char *node;
    char *time;                        /* ISO 8601 UTC */
    RepoLevel level;
    bool synthetic;
    unsigned parent_seq;               /* 0 = none (a full) */
    uint64_t image_size;
    uint32_t granularity;
    /* The hash block size: version 1's "cluster-size" (65536), version
     * 2's "hash-size" (repo_hash_size_for). */
    uint32_t cluster_size;
    char *bitmap;                      /* may be NULL */
    char *generation;                  /* may be NULL */
    /* The bitmaps the backup relied on (its sources and its own bitmap)
     * with their counts at commit; none in manifests written before the
     * key existed. */
    RepoBitmapCount *bitmap_counts;
    size_t n_bitmap_counts;
    uint64_t changed_bytes;
    uint64_t stored_bytes;
    RepoExtent *extents;
    size_t n_extents;
    /* Version 1 only (version 2 keeps them in the index file): */
    RepoHash *hashes;                  /* sorted by cluster, unique */
    size_t n_hashes;
    /* Version 2: the records of the index file ("index-records"). */
    uint64_t index_records;
    uint8_t merkle_root[REPO_ROOT_LEN];
} RepoManifest;

void repo_manifest_free(RepoManifest *m);

/* JSON form (the manifest file, and `list --output=json` with
 * full=false: only id, node, level, time, parent, changed-bytes,
 * stored-bytes, synthetic). */
struct json_object *repo_manifest_to_json(const RepoManifest *m, bool full);
/* Parse and validate a manifest: every key present with the right type,
 * id/parent well formed, hashes sorted and inside image-size, extents
 * sorted and inside image-size, root 64 hex digits.  `what` names the
 * file in errors. */
RepoManifest *repo_manifest_from_json(struct json_object *obj,
                                      const char *what, Error **errp);

#define REPO_UUID_LEN 37                /* "8-4-4-4-12" + NUL */

/* The repository format this bitback writes (bitback-repo.json
 * "version"); version 1 repositories are read as they are and marked
 * version 2 before the first version-2 manifest goes in. */
#define REPO_VERSION 2

typedef struct Repo {
    char *path;
    unsigned version;                  /* bitback-repo.json's */
    const RepoStorage *storage;        /* its files' backend (storage.h) */
    /* The repository's UUID from bitback-repo.json ("" when the file has
     * none and the repository was opened without create). */
    char uuid[REPO_UUID_LEN];
    /* Every committed backup of every node, sorted by (seq, node). */
    RepoManifest **backups;
    size_t n_backups;
    unsigned max_seq;                  /* over manifests, attempts, tmp files */
    struct RepoLock *locks;            /* held through it (lock.c) */
} Repo;

/* Open the repository at path.  create: make the folder and
 * bitback-repo.json (with a new UUID) when missing (an existing non-empty
 * folder without bitback-repo.json is refused), and give an existing
 * repository that has no UUID one, written once by atomic replacement.  Loads every manifest; a manifest that
 * does not parse is an error naming the file. */
Repo *repo_open(const char *path, bool create, Error **errp);
/* The name the block layer opens or creates the data file path (built by
 * repo_data_path / repo_tmp_data_path) of repo by: the path itself for a
 * local repository, an rbd: name inside the repository's pool and
 * namespace for a rados one.  Malloc'd; NULL with errp set. */
char *repo_block_name(Repo *repo, const char *path, Error **errp);
/* Does the block layer open repo's files by name (local), or by the
 * options repo_overlay_options gives (rados: the backing name a header
 * records resolves to no image there)? */
static inline bool repo_opens_by_name(const Repo *repo)
{
    return !repo->storage->overlay_options;
}
/* The options (blockdev-add's form, no node-name; caller owns) that open
 * backup seq of node's not yet committed data file (.ID.qcow2.tmp) for
 * writing over its parent parent_seq (0: none), read-only and opened by
 * the repository, not by the name the header records: see storage.h
 * overlay_options.  NULL with errp set, also for a repository opened by
 * name. */
struct json_object *repo_overlay_options(Repo *repo, const char *node,
                                         unsigned seq, unsigned parent_seq,
                                         Error **errp);
void repo_free(Repo *repo);
/* Mark a version-1 repository version 2 (atomic replacement of
 * bitback-repo.json, keeping its other keys): before a writer puts the
 * first version-2 manifest in, so an older bitback refuses the repository
 * as a whole instead of its new manifests one by one. */
bool repo_upgrade(Repo *repo, Error **errp);
bool repo_reload(Repo *repo, Error **errp);

/* Per-disk locks (lock.c; spec, "Locks"), taken at once or refused with
 * an error that says who holds the disk: READ for restore, verify and
 * serve, BACKUP (creates the disk's folder), PRUNE (excludes both).  A
 * writer reloads the repository after locking: what it planned from
 * before may have changed.  NULL with errp set; repo_unlock(NULL) is a
 * no-op. */
typedef enum RepoLockMode {
    REPO_LOCK_READ,
    REPO_LOCK_BACKUP,
    REPO_LOCK_PRUNE,
} RepoLockMode;
typedef struct RepoLock RepoLock;
RepoLock *repo_lock_node(Repo *repo, const char *node, RepoLockMode mode,
                         Error **errp);
void repo_unlock(RepoLock *l);
/* Whether a write lock held on node through repo is still held: true
 * unless the storage's lock (a repository in a Ceph pool) expired and
 * could not be renewed; renews it.  repo_commit and repo_prune_node call
 * it before they change the disk.  true where no lock is held. */
bool repo_lock_verify(Repo *repo, const char *node, Error **errp);
/* repo_lock_node on each of the NULL-terminated nodes, all or none: a
 * NULL-terminated array for repo_unlock_nodes (which takes NULL too). */
RepoLock **repo_lock_nodes(Repo *repo, const char *const *nodes,
                           RepoLockMode mode, Error **errp);
void repo_unlock_nodes(RepoLock **locks);

/* Names of the nodes that have backups, sorted; NULL-terminated, caller
 * frees the array (not the strings, which the repo owns). */
const char **repo_nodes(Repo *repo);

/* Parse an --at argument: "latest" -> *ret_seq = 0; digits -> the number
 * (leading zeros allowed).  Anything else is an error. */
bool repo_parse_id(const char *s, unsigned *ret_seq, Error **errp);
/* Format seq as an ID into buf (REPO_ID_LEN). */
void repo_format_id(unsigned seq, char *buf);

/* Backup seq of node, or the node's latest when seq == 0.  NULL with a
 * clear error ("no backup 000007 of disk0 in REPO").  node NULL: the
 * repository's only disk (an error naming them when it has several). */
RepoManifest *repo_find(Repo *repo, const char *node, unsigned seq,
                        Error **errp);
/* NULL when the node has none (no error). */
RepoManifest *repo_latest(Repo *repo, const char *node);
RepoManifest *repo_latest_full(Repo *repo, const char *node);
RepoManifest *repo_parent(Repo *repo, const RepoManifest *m);

/* The chain from m down to its full backup: ret[0] = the full,
 * ret[n-1] = m.  Caller frees the array.  Error if a parent is missing. */
RepoManifest **repo_chain(Repo *repo, const RepoManifest *m, size_t *ret_n,
                          Error **errp);

/* ---- Chains (docs/specs/repository.md, R4: a chain is exactly
 * the one its manifests describe) ----
 *
 * (chain.c) The one way to open a backup's chain, for restore, verify, prune and
 * backup.  Every layer is a regular file inside the repository (symbolic
 * links are resolved and must stay inside), opened read-only with its
 * backing disabled; the backing reference its qcow2 header records must be
 * exactly what its manifest says -- none for a full, else its parent's
 * file name "PARENT.qcow2" with format qcow2 (no absolute path, "..",
 * protocol prefix or json: filename can match) -- and the parent's layer,
 * opened the same way from the manifests, is attached by bitback
 * (bdrv_set_backing).  The header's name is never followed.  Errors name
 * the backup (ID and disk) whose link is wrong and how.
 *
 * The one tolerated difference is the window of an interrupted prune
 * (prune.c, step 2): a committed backup whose file has no backing
 * file while its manifest names a parent, and repo_pending_manifest()
 * holds its synthetic full; its file is then the chain's base. */

/* The chain of backup m: the top node (m's file), read-only; releasing it
 * (bdrv_unref) releases the chain.  NULL with errp set when a layer is
 * missing, unreadable, outside the repository or linked otherwise than the
 * manifests say. */
BlockDriverState *repo_open_chain(Repo *repo, const RepoManifest *m,
                                  Error **errp);
/* The file `path` of backup m that is not committed yet (m->node, m->id,
 * m->parent_seq set), opened with flags (0 or BDRV_O_RDWR) and checked
 * the same way, over repo_open_chain() of m's parent when it has one. */
BlockDriverState *repo_open_new(Repo *repo, const RepoManifest *m,
                                const char *path, int flags, Error **errp);
/* The manifest an interrupted prune left pending for m (NODE/.ID.json.tmp):
 * a valid synthetic full of the same backup and disk whose Merkle root
 * matches its hash list; NULL when there is none (caller frees). */
RepoManifest *repo_pending_manifest(Repo *repo, const RepoManifest *m);

/* Paths (caller frees): REPO/NODE, REPO/NODE/ID.qcow2, REPO/NODE/ID.json,
 * REPO/NODE/.ID.qcow2.tmp, REPO/NODE/.ID.json.tmp. */
char *repo_node_dir(Repo *repo, const char *node);
char *repo_data_path(Repo *repo, const char *node, unsigned seq);
char *repo_manifest_path(Repo *repo, const char *node, unsigned seq);
char *repo_tmp_data_path(Repo *repo, const char *node, unsigned seq);
char *repo_tmp_manifest_path(Repo *repo, const char *node, unsigned seq);

/* Attempt markers (NODE/ID.attempt), written and synced before a backup's
 * transaction.  repo_attempts returns the seqs of the node's markers whose
 * backup is not committed, ascending (caller frees). */
bool repo_mark_attempt(Repo *repo, const char *node, unsigned seq,
                       Error **errp);
unsigned *repo_attempts(Repo *repo, const char *node, size_t *ret_n);
/* The time partition since backup `from` of node: `from` itself, every later
 * committed backup and every later attempt, ascending (caller frees; NULL
 * with *ret_n = 0 when there are none). */
unsigned *repo_seqs_since(Repo *repo, const char *node, unsigned from,
                          size_t *ret_n);
/* After the transaction ran: the marker now says so.  A marker that does
 * not (the run was killed before its transaction) may have no bitmap. */
bool repo_mark_attempt_started(Repo *repo, const char *node, unsigned seq,
                               Error **errp);
bool repo_attempt_started(Repo *repo, const char *node, unsigned seq);
/* Remove the node's markers with seq < below (after a full removed their
 * bitmaps), and the node's leftover .tmp files. */
void repo_remove_attempts_below(Repo *repo, const char *node, unsigned below);
void repo_remove_tmp_files(Repo *repo, const char *node);
/* Remove the node's index files no committed manifest names (deleted or
 * rewritten backups, runs that died before their commit); a backup with a
 * pending manifest keeps all of its indexes.  The repo must be loaded
 * (repo_reload) after the changes that made them stale. */
void repo_remove_stale_indexes(Repo *repo, const char *node);
/* Remove NODE/ID.attempt and sync the folder: only for a run that leaves
 * no bitmap behind (its transaction never ran, or it was undone). */
bool repo_remove_attempt(Repo *repo, const char *node, unsigned seq,
                         Error **errp);

/* ---- The binary index (index.c; docs/specs/repository.md "Index") ---- */

#define REPO_INDEX_HEADER   64
#define REPO_INDEX_RECORD   24
#define REPO_MERKLE_LEVELS  64
/* Hash block sizes a version-2 manifest may name. */
#define REPO_MIN_HASH_SIZE  (64u * 1024)
#define REPO_MAX_HASH_SIZE  (4u * 1024 * 1024)

/* One record: the hash of block `block` (count 1), or a run of `count`
 * blocks from `block` that all read as zeroes in this backup's layer. */
typedef struct RepoIndexRecord {
    uint64_t block;
    uint64_t count;
    bool zero;
    uint8_t hash[REPO_HASH_LEN];
} RepoIndexRecord;

void repo_index_record_encode(const RepoIndexRecord *r,
                              uint8_t out[REPO_INDEX_RECORD]);

/* The Merkle root, streaming: leaves are SHA-256 of each record's 24
 * bytes (for a hash record that is version 1's leaf), in order; O(64)
 * memory whatever the count. */
typedef struct RepoMerkle {
    uint8_t level[REPO_MERKLE_LEVELS][REPO_ROOT_LEN];
    uint64_t present;
    uint64_t n_leaves;
} RepoMerkle;
void repo_merkle_init(RepoMerkle *mk);
void repo_merkle_add_leaf(RepoMerkle *mk, const uint8_t *data, size_t len);
void repo_merkle_add_record(RepoMerkle *mk, const RepoIndexRecord *r);
void repo_merkle_final(const RepoMerkle *mk, uint8_t out[REPO_ROOT_LEN]);

/* REPO/NODE/ID-XXXXXXXXXXXXXXXX.idx: backup seq's index, named after the
 * first 8 bytes of its Merkle root (caller frees). */
char *repo_index_path(Repo *repo, const char *node, unsigned seq,
                      const uint8_t root[REPO_ROOT_LEN]);

/* Writing an index: records in ascending order (a bug otherwise: abort),
 * into .ID.idx.tmp; finish makes it durable, renames it to its final name
 * and syncs the folder, returning the root and the record count.  abort
 * (also after finish) releases the writer and removes a temporary file. */
typedef struct RepoIndexWriter RepoIndexWriter;
RepoIndexWriter *repo_index_writer_new(Repo *repo, const char *node,
                                       unsigned seq, uint64_t image_size,
                                       uint32_t hash_size, Error **errp);
void repo_index_writer_add(RepoIndexWriter *w, const RepoIndexRecord *r);
bool repo_index_writer_finish(RepoIndexWriter *w, uint8_t root[REPO_ROOT_LEN],
                              uint64_t *ret_records, Error **errp);
void repo_index_writer_abort(RepoIndexWriter *w);

/* Reading the records of backup m, in order, validated as they come
 * (a version-1 manifest's inline list reads the same way).  next: 1 a
 * record, 0 the end, -1 an error (a short, malformed or unordered
 * file). */
typedef struct RepoIndexReader RepoIndexReader;
RepoIndexReader *repo_index_open(Repo *repo, const RepoManifest *m,
                                 Error **errp);
/* The same for an index file named by path (fuzz/, tests). */
RepoIndexReader *repo_index_open_file(const RepoStorage *st, const char *path,
                                      unsigned seq, uint64_t image_size,
                                      uint32_t hash_size, uint64_t n_records,
                                      Error **errp);
int repo_index_next(RepoIndexReader *r, RepoIndexRecord *rec, Error **errp);
void repo_index_close(RepoIndexReader *r);
/* The Merkle root of m's records as stored (its index, or its v1 list). */
bool repo_index_root(Repo *repo, const RepoManifest *m,
                     uint8_t root[REPO_ROOT_LEN], Error **errp);

/* The hash block size of a new backup of node with parent_seq (0: a full)
 * and image_size: its parent's, so a chain shares one; for a full 64 KiB,
 * doubled while the image would have more than 2^28 blocks (64 TiB:
 * 256 KiB), at most REPO_MAX_HASH_SIZE. */
uint32_t repo_hash_size_for(Repo *repo, const char *node, unsigned parent_seq,
                            uint64_t image_size);

/* ---- Hashes ---- */

void repo_hash_cluster(const void *buf, size_t len,
                       uint8_t out[REPO_HASH_LEN]);
/* The hash of a cluster of zeroes of len bytes. */
void repo_hash_zero_cluster(size_t len, uint8_t out[REPO_HASH_LEN]);
void repo_merkle_root(const RepoHash *hashes, size_t n,
                      uint8_t out[REPO_ROOT_LEN]);

/* Progress callback: called with bytes done so far and the total. */
typedef void RepoProgressFn(void *opaque, uint64_t done, uint64_t total);

/* Threads that hash (repo_hash_extents, repo_scan_node): the caller says how
 * many (capped at REPO_MAX_HASH_THREADS), or 0 for the default,
 * repo_hash_threads(): the number of online CPUs, at most
 * REPO_DEFAULT_HASH_THREADS.  The result never depends on it. */
#define REPO_DEFAULT_HASH_THREADS 8
#define REPO_MAX_HASH_THREADS     64
unsigned repo_hash_threads(void);

/* Data path: read the blocks of bs in ext[0..n_ext) (sorted, disjoint,
 * starting on block_size boundaries, ending on one or at the end of bs)
 * and hash them on `threads` threads (0: the default), the caller's
 * included.  out[] receives one entry per block, in offset order (the
 * caller sizes it: the sum of DIV_ROUND_UP(length, block_size));
 * block_size divides 4 MiB.  progress, if not NULL, is called from the
 * calling thread only with base + bytes done (monotonic) and total.
 * Returns 0 or -errno; on a read error *ret_err_offset (if not NULL) is
 * the offset of the lowest failed batch. */
int repo_hash_extents(BlockDriverState *bs, const RepoExtent *ext,
                      size_t n_ext, uint32_t block_size, RepoHash *out,
                      unsigned threads, RepoProgressFn *progress, void *opaque,
                      uint64_t base, uint64_t total, uint64_t *ret_err_offset);

/* A consumer of index records, in order (an index writer, verify's
 * comparison).  false with errp set stops the scan. */
typedef bool RepoRecordSink(void *opaque, const RepoIndexRecord *r,
                            Error **errp);

/* Scan a backup's layer: bs is the top of a chain repo_open_chain or
 * repo_open_new opened (path names it in errors), size its size (checked)
 * and bsize the hash block size.  Produces the layer's index records in
 * order (docs/specs/repository.md "Index": blocks the layer allocates
 * none of are left out, blocks it allocates wholly as zeroes form zero
 * runs, the others are hashed from the content read through the chain)
 * into sink.  Block status is walked in the driver's biggest steps, so
 * holes cost nothing per block; memory is bounded by a 256 MiB window of
 * blocks (hashes only) and the pool's buffers.  *ret_changed: bytes the
 * layer allocates; *ret_read (may be NULL): bytes read and hashed.  The
 * result does not depend on `threads` (0: the default). */
bool repo_scan_layer(BlockDriverState *bs, const char *path, uint64_t size,
                     uint32_t bsize, unsigned threads, RepoRecordSink *sink,
                     void *sink_opaque, RepoProgressFn *progress,
                     void *opaque, uint64_t *ret_changed, uint64_t *ret_read,
                     Error **errp);
/* Scan bs (backup m's file at path, opened as above) into m's index file:
 * sets m->version 2, image_size (when 0; else checked), cluster_size
 * (when 0: repo_hash_size_for), changed_bytes, index_records and
 * merkle_root.  The index is durable and in place (ID-ROOT.idx) on
 * return; the manifest is the caller's to write. */
bool repo_scan_to_index(Repo *repo, BlockDriverState *bs, const char *path,
                        RepoManifest *m, RepoProgressFn *progress,
                        void *opaque, Error **errp);
/* repo_scan_to_index on the file qcow2_path of backup m, not committed
 * yet (backup's and prune's .ID.qcow2.tmp), opened by repo_open_new with
 * flags (BDRV_O_NOCACHE: read it with O_DIRECT): m->seq, m->id, m->node
 * and m->parent_seq must be set. */
bool repo_scan_backup(Repo *repo, const char *qcow2_path, RepoManifest *m,
                      int flags, RepoProgressFn *progress, void *opaque,
                      Error **errp);

/* Commit: m describes the file at repo_tmp_data_path(); fill stored_bytes,
 * write the manifest to a tmp file, fsync both, rename the qcow2 then the
 * manifest into place, fsync the folder, remove the attempt marker.  On
 * return true the backup exists; the repo's list is reloaded. */
bool repo_commit(Repo *repo, RepoManifest *m, Error **errp);

/* Write manifest m durably to path (a temporary name, .ID.json.tmp):
 * validated first as a reader would (a manifest readers would refuse is
 * never written), then written and synced through repo's storage.  The
 * one writer of manifests, for commit and prune. */
bool repo_manifest_write(Repo *repo, const char *path, const RepoManifest *m,
                         Error **errp);

/* The text repo_manifest_write writes for m (malloc'd), after validating it
 * as a reader would; NULL with an error if it does not validate or would be
 * longer than max bytes (readers refuse longer manifests). */
char *repo_manifest_text(const RepoManifest *m, const char *path,
                         uint64_t max, Error **errp);

/* fsync a file by path (used for the qcow2 files the daemon wrote). */
bool repo_fsync_path(const char *path, Error **errp);

#endif
