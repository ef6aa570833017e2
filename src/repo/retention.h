/*
 * Retention rules (docs/specs/retention.md): which backups of one disk a
 * prune keeps, with Proxmox Backup Server's semantics (keep-last, then
 * keep-hourly, -daily, -weekly, -monthly, -yearly, periods in local
 * time).  A pure function of the backups' IDs and times: no I/O, no
 * repository; prune.c applies its answer, `bitback prune --dry-run`
 * prints it.
 */
#ifndef BITBACK_REPO_RETENTION_H
#define BITBACK_REPO_RETENTION_H

#include <stdbool.h>
#include <stddef.h>

#include "util/error.h"

/* The rules, in the order they are applied; REPO_KEEP_NONE means
 * "removed". */
typedef enum RepoKeepRule {
    REPO_KEEP_NONE = 0,
    REPO_KEEP_LAST,
    REPO_KEEP_HOURLY,
    REPO_KEEP_DAILY,
    REPO_KEEP_WEEKLY,
    REPO_KEEP_MONTHLY,
    REPO_KEEP_YEARLY,
    REPO_KEEP_ALL,      /* no rule given: everything stays (PBS's keep-all) */
    REPO_KEEP__MAX,
} RepoKeepRule;

/* Most periods (or backups) one rule may keep. */
#define REPO_KEEP_MAX_COUNT 1000000u

/* count[rule] is the N of --keep-RULE (0: the rule is not used);
 * count[REPO_KEEP_NONE] and count[REPO_KEEP_ALL] are ignored. */
typedef struct RepoKeepOptions {
    unsigned count[REPO_KEEP__MAX];
} RepoKeepOptions;

/* One backup: its ID number and its manifest's time (ISO 8601 UTC,
 * "2026-11-23T15:11:32Z"); repo_retention_compute sets kept_by. */
typedef struct RepoRetentionItem {
    unsigned seq;
    const char *time;
    RepoKeepRule kept_by;
} RepoRetentionItem;

/* "keep-last", "keep-hourly", ... "keep-yearly", "keep-all"; "remove"
 * for NONE. */
const char *repo_keep_rule_name(RepoKeepRule rule);

/* True if some rule has a count of at least 1. */
bool repo_keep_options_any(const RepoKeepOptions *opts);

/* Decide, for the n backups of one disk in items (any order, distinct
 * seqs), which one each rule keeps: items[i].kept_by is the rule that
 * keeps it, or REPO_KEEP_NONE when it goes (docs/specs/retention.md,
 * invariants 1-6 and 8).  With no rule of count >= 1 every backup is kept
 * (kept_by REPO_KEEP_ALL), as PBS does; callers that must not accept
 * that check repo_keep_options_any() first.  Periods are in local time
 * (TZ).  False with errp set only for a time that is not ISO 8601 UTC
 * or out of memory; items are then unchanged. */
bool repo_retention_compute(RepoRetentionItem *items, size_t n,
                            const RepoKeepOptions *opts, Error **errp);

#endif
