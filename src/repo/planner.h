/*
 * The backup planner (docs/specs/repository.md, "Bitmaps"): from the
 * repository's state, what a disk's dirty bitmaps say and the options of
 * the run, decide the level a backup can really take, its parent, and the
 * bitmaps whose union holds the changes since that parent -- or the one
 * reason why it must be a full backup.  Also which bitmaps a run may
 * remove afterwards.
 *
 * Pure decisions: it changes nothing, neither in the repository nor on the
 * disk.  It reads the repository's list of backups and, for runs that were
 * killed, their attempt markers (repo_seqs_since, repo_attempt_started).
 * `bitback backup` (live and offline) is its caller; bitbackd can be one.
 */
#ifndef BITBACK_REPO_PLANNER_H
#define BITBACK_REPO_PLANNER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "repo/repo.h"

/* What the planner needs to know about one bitmap of a disk, as the disk
 * (query-block, or the image offline) reports it. */
typedef struct RepoPlanBitmap {
    char *name;
    bool recording;
    bool inconsistent;
    bool busy;
    uint32_t granularity;
    int64_t count;                     /* dirty bytes; -1 when not reported */
    char *generation;                  /* NULL when not reported */
    char *prior_generation;            /* when generation is NULL: the one
                                          bitback knew before another
                                          program wrote the image, or NULL */
} RepoPlanBitmap;

/* The disk to plan. */
typedef struct RepoPlanDisk {
    const char *node;                  /* its name in the repository */
    uint64_t size;
    bool volatile_bitmaps;             /* its bitmaps live in memory only */
    const RepoPlanBitmap *bitmaps;
    size_t n_bitmaps;
} RepoPlanDisk;

typedef struct RepoPlanOpts {
    const char *prefix;                /* this repository's bitmaps: PREFIX-N */
    bool level_auto;                   /* else `level` was asked for */
    RepoLevel level;
} RepoPlanOpts;

typedef struct RepoPlan {
    RepoLevel level;
    unsigned parent_seq;               /* 0 for a full */
    char **sources;                    /* bitmaps whose union is the change */
    size_t n_sources;
    char **freeze;                     /* recording PREFIX-* bitmaps to disable */
    size_t n_freeze;
    uint32_t granularity;              /* of the sources; 0: the default */
    /* Why an inc or diff must be a full (NULL when it need not, or when a
     * full was asked for or is the first backup of an auto run). */
    char *reason;
} RepoPlan;

/* Plan disk d into *ret (which the caller frees with repo_plan_clear).
 * Fails (false) only for conditions a full backup cannot fix either (a
 * bitmap of ours in use by another job). */
bool repo_plan_disk(Repo *repo, const RepoPlanOpts *o, const RepoPlanDisk *d,
                    RepoPlan *ret, Error **errp);
void repo_plan_clear(RepoPlan *p);
/* Free names[0..n) and names (a plan's or repo_plan_stale_bitmaps'). */
void repo_plan_free_names(char **names, size_t n);

/* The bitmap called name among bitmaps[0..n), or NULL. */
const RepoPlanBitmap *repo_plan_find_bitmap(const RepoPlanBitmap *bitmaps,
                                            size_t n, const char *name);

/* If name is "PREFIX-<digits>" (1 to 999999999), that number; else 0. */
unsigned repo_bitmap_seq(const char *prefix, const char *name);
/* "PREFIX-ID" + suffix into buf (BDRV_BITMAP_MAX_NAME + 1 bytes). */
void repo_bitmap_name(char *buf, const char *prefix, unsigned seq,
                      const char *suffix);

/* Names of this repository's bitmaps of d older than its newest full
 * backup (spec, Bitmaps 4): PREFIX-N with N below it, and, unless the
 * prefix was given by the user, the bitmaps of the older naming that its
 * backups below it started.  Never a bitmap of another repository.  NULL
 * with *ret_n = 0 when none; caller frees the strings and the array. */
char **repo_plan_stale_bitmaps(Repo *repo, const RepoPlanOpts *o,
                               bool prefix_given, const RepoPlanDisk *d,
                               size_t *ret_n);

#endif
