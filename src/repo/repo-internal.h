/*
 * Private to src/repo: what the files of the repository library share.
 *
 * Invariants of the on-disk repository that this library keeps
 * (docs/specs/repository.md, "Invariants"); the files cite them by number:
 *   1. A backup exists if and only if NODE/ID.json exists, and that file
 *      parses and validates; anything else in the folder is ignored by
 *      readers (it may still raise max_seq, see 3).  (repo.c, manifest.c)
 *   2. ID.json appears only after ID.qcow2 is durable and in place: commit
 *      is fsync(tmp data), write+fsync(tmp manifest), rename data, rename
 *      manifest, fsync(folder), unlink(ID.attempt).  (commit.c)
 *   3. A new ID is above every ID that any file of any node names:
 *      manifests, attempt markers, temporary files and qcow2 files (a
 *      qcow2 renamed into place whose manifest was not yet renamed when
 *      the run died).  (repo.c, paths.c)
 *   4. A chain is exactly the one its manifests describe: every chain is
 *      opened by repo_open_chain()/repo_open_new() (chain.c), which
 *      check each file's recorded backing reference against its manifest
 *      and attach the parent themselves; a header's backing name is never
 *      followed.
 *
 * Owners, one per on-disk protocol: paths.c (every file name of the
 * repository), manifest.c (the manifest: JSON, validation, the size- and
 * depth-limited reader, the durable writer), hash.c (hashes, Merkle root,
 * the hash thread pool, scanning a backup file), commit.c (attempt
 * markers, leftovers, the two-phase commit), chain.c (opening chains),
 * repo.c (open/create, bitback-repo.json, the list of backups), planner.c
 * (the backup planner), restore.c (restoring a point), verify.c (checking
 * stored backups and targets), prune.c (retention: synthetic fulls and
 * deletion), storage-local.c and storage-rados.c (the file operations:
 * a folder, or a Ceph pool).
 *
 * Everything here is control code: functions take Error **errp last and
 * report nothing themselves.
 */
#ifndef BITBACK_REPO_INTERNAL_H
#define BITBACK_REPO_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "repo/repo.h"

/* Largest ID: nine digits keeps "%06u" and the file names short. */
#define REPO_MAX_SEQ       999999999u

/* The repository marker, in the root. */
#define REPO_MARKER_NAME   "bitback-repo.json"

/* ---- paths.c ---- */

/* Parse 1..9 decimal digits (no sign, no spaces) ending at `end` (or at
 * the NUL when end is NULL).  0 on anything else. */
unsigned repo_parse_seq_digits(const char *s, const char *end);
/* A node folder name: not empty, no '/', does not start with '.', short. */
bool repo_node_name_valid(const char *name);
/* The same, with an error naming the rule. */
bool repo_check_node_name(const char *name, Error **errp);
/* commit.c: create node's folder when missing (its name checked first),
 * and make the new entry durable (the repository folder fsynced). */
bool repo_ensure_node_dir(Repo *repo, const char *node, Error **errp);
/* If name is "%06u" of some seq followed exactly by suffix (and prefix
 * before it), return seq; else 0. */
unsigned repo_match_seq_name(const char *name, const char *prefix,
                             const char *suffix);
/* Which file of the repository's protocol a name in a node folder is. */
typedef enum RepoFileKind {
    REPO_FILE_OTHER,                   /* not ours: readers ignore it */
    REPO_FILE_MANIFEST,                /* ID.json */
    REPO_FILE_DATA,                    /* ID.qcow2 */
    REPO_FILE_ATTEMPT,                 /* ID.attempt */
    REPO_FILE_TMP_DATA,                /* .ID.qcow2.tmp */
    REPO_FILE_TMP_MANIFEST,            /* .ID.json.tmp */
    REPO_FILE_INDEX,                   /* ID-XXXXXXXXXXXXXXXX.idx */
    REPO_FILE_TMP_INDEX,               /* .ID.idx.tmp */
} RepoFileKind;
/* The kind of name and its seq (0 for REPO_FILE_OTHER). */
RepoFileKind repo_file_kind(const char *name, unsigned *ret_seq);
/* asprintf that aborts on out of memory. */
char *repo_path_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* REPO/NODE/ID.attempt and its temporary REPO/NODE/.ID.attempt.tmp. */
char *repo_attempt_path(Repo *repo, const char *node, unsigned seq);
char *repo_tmp_attempt_path(Repo *repo, const char *node, unsigned seq);

/* REPO/NODE/.ID.idx.tmp: an index being written (index.c). */
char *repo_tmp_index_path(Repo *repo, const char *node, unsigned seq);

/* ---- manifest.c ---- */

int repo_hex_value(char c);
/* Parse the NUL-terminated text as one JSON object (json-c nesting
 * limited); trailing data after the object other than white space is an
 * error.  `what` names the source in errors.  The parser of every small
 * JSON file of the repository (and of fuzz/fuzz-manifest.c). */
struct json_object *repo_parse_json_text(const char *text, const char *what,
                                         Error **errp);
/* Read the JSON object in the small file path (at most max bytes; json-c
 * nesting limited) through the repository's storage; trailing data after
 * the object is an error. */
struct json_object *repo_parse_json_file(const RepoStorage *st,
                                         const char *path, uint64_t max,
                                         Error **errp);
/* Read and validate the manifest file path. */
RepoManifest *repo_manifest_load(const RepoStorage *st, const char *path,
                                 Error **errp);

/* ---- repo.c ---- */

/* Committed backup seq of node, or NULL. */
RepoManifest *repo_lookup(Repo *repo, const char *node, unsigned seq);

/* ---- restore.c: the operations' progress (ops.h RepoProgressOps) ---- */

struct RepoProgressOps;
/* p's begin(), or NULL when p or it is NULL. */
void *repo_progress_begin(const struct RepoProgressOps *p, const char *label,
                          uint64_t total);
/* p's end(step), when there is one. */
void repo_progress_end(const struct RepoProgressOps *p, void *step);
/* p's update, or NULL. */
RepoProgressFn *repo_progress_fn(const struct RepoProgressOps *p);

#endif
