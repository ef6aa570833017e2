/*
 * The backup planner (planner.h): which level a backup can really take
 * and which bitmaps hold the changes since its parent.  Bitmaps are never
 * cleared: each backup N adds PREFIX-N and freezes the older ones, so the
 * changes since backup P are the union of the bitmaps of P and of every
 * later backup and attempt (spec, Bitmaps 3).  When that union cannot be
 * trusted (a bitmap missing, cleared behind bitback's back, inconsistent
 * after a crash, the disk resized), the plan is a full backup with one
 * line saying why.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "repo/planner.h"
#include "repo/repo-internal.h"
#include "util/cleanup.h"
#include "util/cutils.h"

static void push_name(char ***arr, size_t *n, const char *name)
{
    char **a = realloc(*arr, (*n + 1) * sizeof(**arr));

    if (!a) {
        abort();
    }
    *arr = a;
    if (!(a[*n] = strdup(name))) {
        abort();
    }
    (*n)++;
}

const RepoPlanBitmap *repo_plan_find_bitmap(const RepoPlanBitmap *bitmaps,
                                            size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++) {
        if (!strcmp(bitmaps[i].name, name)) {
            return &bitmaps[i];
        }
    }
    return NULL;
}

unsigned repo_bitmap_seq(const char *prefix, const char *name)
{
    size_t pl = strlen(prefix);
    unsigned long v;
    char *end;

    if (strncmp(name, prefix, pl) || name[pl] != '-' ||
        name[pl + 1] < '0' || name[pl + 1] > '9') {
        return 0;
    }
    errno = 0;
    v = strtoul(name + pl + 1, &end, 10);
    if (*end || errno || v == 0 || v > REPO_MAX_SEQ) {
        return 0;
    }
    return (unsigned)v;
}

void repo_bitmap_name(char *buf, const char *prefix, unsigned seq,
                        const char *suffix)
{
    char id[REPO_ID_LEN];

    repo_format_id(seq, id);
    snprintf(buf, BDRV_BITMAP_MAX_NAME + 1, "%s-%s%s", prefix, id, suffix);
}

/* The highest count any manifest of node recorded for bitmap `name`, or
 * -1 when none did.  Counts only grow while bitback keeps a bitmap (it
 * never clears one), so a lower count now means someone cleared it. */
static int64_t recorded_count(Repo *repo, const char *node, const char *name)
{
    int64_t best = -1;

    for (size_t i = 0; i < repo->n_backups; i++) {
        const RepoManifest *m = repo->backups[i];

        if (strcmp(m->node, node)) {
            continue;
        }
        for (size_t j = 0; j < m->n_bitmap_counts; j++) {
            if (!strcmp(m->bitmap_counts[j].name, name)) {
                best = MAX(best, (int64_t)m->bitmap_counts[j].count);
            }
        }
    }
    return best;
}

bool repo_plan_disk(Repo *repo, const RepoPlanOpts *o, const RepoPlanDisk *d,
                    RepoPlan *ret, Error **errp)
{
    RepoManifest *latest = repo_latest(repo, d->node);
    RepoManifest *parent;
    _cleanup_free_ unsigned *seqs = NULL;
    size_t n_seqs = 0;
    const RepoPlanBitmap *newest = NULL;
    char reason[BDRV_BITMAP_MAX_NAME + 2 * REPO_MAX_NODE_NAME + 512] = "";

    *ret = (RepoPlan){ .level = REPO_LEVEL_FULL };

    /* Bitmaps of ours that record writes are frozen by the transaction,
     * whatever the level; one busy in another job stops the run. */
    for (size_t i = 0; i < d->n_bitmaps; i++) {
        const RepoPlanBitmap *b = &d->bitmaps[i];

        if (!repo_bitmap_seq(o->prefix, b->name)) {
            continue;
        }
        if (b->busy) {
            error_setg(errp, "%s: bitmap '%s' is in use by another job",
                       d->node, b->name);
            return false;
        }
        if (b->recording) {
            push_name(&ret->freeze, &ret->n_freeze, b->name);
        }
    }

    if (!o->level_auto && o->level == REPO_LEVEL_FULL) {
        return true;
    }
    if (!latest) {
        if (!o->level_auto) {
            snprintf(reason, sizeof(reason), "no earlier backup of %s in %s",
                     d->node, repo->path);
        }
        goto full;
    }
    parent = (!o->level_auto && o->level == REPO_LEVEL_DIFF)
             ? repo_latest_full(repo, d->node) : latest;
    if (!parent) {
        snprintf(reason, sizeof(reason), "no full backup of %s in %s",
                 d->node, repo->path);
        goto full;
    }
    if (latest->image_size != d->size) {
        snprintf(reason, sizeof(reason),
                 "the disk's size changed from %llu to %llu bytes",
                 (unsigned long long)latest->image_size,
                 (unsigned long long)d->size);
        goto full;
    }

    /* The time partition since the parent: its own bitmap, every later
     * committed backup's, and every later attempt's (spec, Bitmaps 3). */
    seqs = repo_seqs_since(repo, d->node, parent->seq, &n_seqs);

    for (size_t i = 0; i < n_seqs; i++) {
        char name[BDRV_BITMAP_MAX_NAME + 1];
        const RepoPlanBitmap *b;
        RepoManifest *m = repo_find(repo, d->node, seqs[i], NULL);
        int64_t rec;

        repo_bitmap_name(name, o->prefix, seqs[i], "");
        if (m && m->bitmap && strcmp(m->bitmap, name)) {
            /* A bitmap of another naming (before repository UUIDs, or
             * another --bitmap): nothing shows that this repository
             * still owns it (spec, Bitmaps 5). */
            snprintf(reason, sizeof(reason),
                     "backup %s of %s started bitmap '%s', not '%s' (bitmaps "
                     "are now named after the repository; the old one may "
                     "belong to another repository)", m->id, d->node,
                     m->bitmap, name);
            goto full;
        }
        b = repo_plan_find_bitmap(d->bitmaps, d->n_bitmaps, name);
        if (!b && !m && !repo_attempt_started(repo, d->node, seqs[i])) {
            /* A run killed before its transaction: it made no bitmap and
             * froze nothing, so it adds no writes. */
            continue;
        }
        if (!b) {
            snprintf(reason, sizeof(reason), "bitmap '%s' is missing on %s%s",
                     name, d->node, d->volatile_bitmaps
                     ? " (its bitmaps live in the daemon's memory only: "
                       "was the daemon restarted?)" : "");
            goto full;
        }
        if (b->inconsistent) {
            snprintf(reason, sizeof(reason),
                     "bitmap '%s' on %s is inconsistent (not stored cleanly)",
                     name, d->node);
            goto full;
        }
        if (m && m->generation && b->generation &&
            strcmp(m->generation, b->generation)) {
            snprintf(reason, sizeof(reason),
                     "bitmap '%s' on %s was cleared or replaced since backup %s",
                     name, d->node, m->id);
            goto full;
        }
        /* Unknown now (another program wrote the image), but already
         * different before that: cleared since the backup. */
        if (m && m->generation && !b->generation && b->prior_generation &&
            strcmp(m->generation, b->prior_generation)) {
            snprintf(reason, sizeof(reason),
                     "bitmap '%s' on %s was cleared since backup %s (before "
                     "another program wrote the image)", name, d->node, m->id);
            goto full;
        }
        rec = recorded_count(repo, d->node, name);
        if (rec >= 0 && b->count >= 0 && b->count < rec) {
            snprintf(reason, sizeof(reason),
                     "bitmap '%s' on %s was cleared behind bitback's back (it "
                     "marks %lld bytes, a backup recorded %lld)", name,
                     d->node, (long long)b->count, (long long)rec);
            goto full;
        }
        if (ret->granularity && b->granularity != ret->granularity) {
            snprintf(reason, sizeof(reason),
                     "bitmap '%s' on %s has granularity %u, not %u",
                     name, d->node, b->granularity, ret->granularity);
            goto full;
        }
        ret->granularity = b->granularity;
        push_name(&ret->sources, &ret->n_sources, name);
        newest = b;
    }
    /* The newest bitmap must still record: else writes since it stopped
     * are nowhere. */
    if (!newest || !newest->recording) {
        snprintf(reason, sizeof(reason),
                 "bitmap '%s' on %s stopped recording; later writes are "
                 "unknown", newest ? newest->name : "?", d->node);
        goto full;
    }
    ret->parent_seq = parent->seq;
    ret->level = (!o->level_auto && o->level == REPO_LEVEL_DIFF)
               ? REPO_LEVEL_DIFF : REPO_LEVEL_INC;
    return true;

full:
    for (size_t i = 0; i < ret->n_sources; i++) {
        free(ret->sources[i]);
    }
    ret->n_sources = 0;
    ret->level = REPO_LEVEL_FULL;
    ret->parent_seq = 0;
    if (reason[0]) {
        if (!(ret->reason = strdup(reason))) {
            abort();
        }
    }
    return true;
}

/* Did a backup of node below seq `below` start bitmap `name` (a name of
 * the naming before repository UUIDs, which the planner no longer uses)? */
static bool legacy_bitmap_below(Repo *repo, const char *node,
                                const char *name, unsigned below)
{
    for (size_t i = 0; i < repo->n_backups; i++) {
        const RepoManifest *m = repo->backups[i];

        if (m->seq < below && m->bitmap && !strcmp(m->node, node) &&
            !strcmp(m->bitmap, name)) {
            return true;
        }
    }
    return false;
}

char **repo_plan_stale_bitmaps(Repo *repo, const RepoPlanOpts *o,
                               bool prefix_given, const RepoPlanDisk *d,
                               size_t *ret_n)
{
    RepoManifest *full = repo_latest_full(repo, d->node);
    char **names = NULL;

    *ret_n = 0;
    if (!full) {
        return NULL;
    }
    for (size_t i = 0; i < d->n_bitmaps; i++) {
        const char *name = d->bitmaps[i].name;
        unsigned s = repo_bitmap_seq(o->prefix, name);

        if (s ? s < full->seq : !prefix_given &&
                                legacy_bitmap_below(repo, d->node, name,
                                                    full->seq)) {
            push_name(&names, ret_n, name);
        }
    }
    return names;
}

void repo_plan_free_names(char **names, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(names[i]);
    }
    free(names);
}

void repo_plan_clear(RepoPlan *p)
{
    repo_plan_free_names(p->sources, p->n_sources);
    repo_plan_free_names(p->freeze, p->n_freeze);
    free(p->reason);
    *p = (RepoPlan){ 0 };
}
