/*
 * Retention (docs/specs/retention.md): the keep/remove decision of a
 * prune, with the semantics of Proxmox Backup Server's prune
 * (pbs-datastore's compute_prune_info), written from its description.
 *
 * The backups are walked newest first (highest ID first).  Each rule
 * in turn -- keep-last, hourly, daily, weekly, monthly, yearly -- maps a
 * backup to a period: keep-last to the backup itself, the others to its
 * local time's hour (%Y/%m/%d/%H), day (%Y/%m/%d), ISO week (%G/%V),
 * month (%Y/%m) or year (%Y).  A rule with count N:
 *   - skips every backup an earlier rule already decided (kept or removed);
 *   - skips every backup whose period holds a backup an earlier rule kept;
 *   - keeps the first (newest) backup of each other period, until it has
 *     kept N periods: it stops at the first backup of an (N+1)-th period;
 *   - marks the other backups of the periods it kept as removed, so no
 *     later rule can keep them.
 * Whatever no rule kept is removed.  No rule at all keeps everything.
 *
 * Periods are compared as integers: per rule the backups' period strings
 * are sorted once and numbered, so a rule costs O(n log n), not O(n^2).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "repo/retention.h"
#include "util/cleanup.h"
#include "util/cutils.h"

/* Longest period string ("2026/11/23/15") plus its NUL, with room. */
#define PERIOD_LEN 16

/* The strftime format of each rule's period; keep-last has none (every
 * backup is its own period). */
static const char *const period_format[REPO_KEEP__MAX] = {
    [REPO_KEEP_HOURLY] = "%Y/%m/%d/%H",
    [REPO_KEEP_DAILY] = "%Y/%m/%d",
    [REPO_KEEP_WEEKLY] = "%G/%V",
    [REPO_KEEP_MONTHLY] = "%Y/%m",
    [REPO_KEEP_YEARLY] = "%Y",
};

const char *repo_keep_rule_name(RepoKeepRule rule)
{
    static const char *const names[REPO_KEEP__MAX] = {
        [REPO_KEEP_NONE] = "remove",
        [REPO_KEEP_LAST] = "keep-last",
        [REPO_KEEP_HOURLY] = "keep-hourly",
        [REPO_KEEP_DAILY] = "keep-daily",
        [REPO_KEEP_WEEKLY] = "keep-weekly",
        [REPO_KEEP_MONTHLY] = "keep-monthly",
        [REPO_KEEP_YEARLY] = "keep-yearly",
        [REPO_KEEP_ALL] = "keep-all",
    };

    return (unsigned)rule < REPO_KEEP__MAX ? names[rule] : "?";
}

bool repo_keep_options_any(const RepoKeepOptions *opts)
{
    for (int r = REPO_KEEP_LAST; r <= REPO_KEEP_YEARLY; r++) {
        if (opts->count[r]) {
            return true;
        }
    }
    return false;
}

/* One backup while deciding. */
typedef struct Slot {
    size_t item;                 /* index into the caller's items */
    unsigned seq;
    struct tm local;
    RepoKeepRule mark;           /* decided by a rule: kept_by */
    bool decided;                /* kept or removed by some rule */
    size_t period;               /* this rule's period number */
} Slot;

/* For numbering the periods of one rule. */
typedef struct PeriodKey {
    char text[PERIOD_LEN];
    size_t slot;
} PeriodKey;

static int cmp_slot_newest_first(const void *a, const void *b)
{
    const Slot *x = a, *y = b;

    return x->seq < y->seq ? 1 : x->seq > y->seq ? -1 : 0;
}

static int cmp_period_key(const void *a, const void *b)
{
    return strcmp(((const PeriodKey *)a)->text, ((const PeriodKey *)b)->text);
}

/* Number slot[i].period for rule: equal numbers iff equal periods. */
static void number_periods(Slot *slot, size_t n, RepoKeepRule rule,
                           PeriodKey *keys)
{
    if (!period_format[rule]) {              /* keep-last */
        for (size_t i = 0; i < n; i++) {
            slot[i].period = i;
        }
        return;
    }
    for (size_t i = 0; i < n; i++) {
        if (!strftime(keys[i].text, PERIOD_LEN, period_format[rule],
                      &slot[i].local)) {
            keys[i].text[0] = '\0';          /* cannot happen: years < 10000 */
        }
        keys[i].slot = i;
    }
    qsort(keys, n, sizeof(*keys), cmp_period_key);
    for (size_t i = 0, id = 0; i < n; i++) {
        if (i && strcmp(keys[i].text, keys[i - 1].text)) {
            id++;
        }
        slot[keys[i].slot].period = id;
    }
}

/* One rule over the slots (newest first); covered and taken are scratch
 * arrays of n flags indexed by period number. */
static void apply_rule(Slot *slot, size_t n, RepoKeepRule rule,
                       unsigned count, bool *covered, bool *taken)
{
    unsigned periods = 0;

    memset(covered, 0, n * sizeof(*covered));
    memset(taken, 0, n * sizeof(*taken));
    /* Periods already holding a kept backup are not this rule's. */
    for (size_t i = 0; i < n; i++) {
        if (slot[i].decided && slot[i].mark != REPO_KEEP_NONE) {
            covered[slot[i].period] = true;
        }
    }
    for (size_t i = 0; i < n; i++) {
        Slot *s = &slot[i];

        if (s->decided || covered[s->period]) {
            continue;
        }
        if (taken[s->period]) {
            s->decided = true;               /* an older one of a kept period */
            s->mark = REPO_KEEP_NONE;
            continue;
        }
        if (periods >= count) {
            break;
        }
        periods++;
        taken[s->period] = true;
        s->decided = true;
        s->mark = rule;
    }
}

bool repo_retention_compute(RepoRetentionItem *items, size_t n,
                            const RepoKeepOptions *opts, Error **errp)
{
    _cleanup_free_ Slot *slot = NULL;
    _cleanup_free_ PeriodKey *keys = NULL;
    _cleanup_free_ bool *covered = NULL;
    _cleanup_free_ bool *taken = NULL;
    bool any = repo_keep_options_any(opts);

    if (!n) {
        return true;
    }
    slot = calloc(n, sizeof(*slot));
    keys = calloc(n, sizeof(*keys));
    covered = calloc(n, sizeof(*covered));
    taken = calloc(n, sizeof(*taken));
    if (!slot || !keys || !covered || !taken) {
        error_setg(errp, "out of memory");
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        time_t t;

        if (!items[i].time || !iso8601_utc_parse(items[i].time, &t)) {
            error_setg(errp, "backup %06u: time '%s' is not ISO 8601 UTC "
                       "like 2026-11-23T15:11:32Z", items[i].seq,
                       items[i].time ? items[i].time : "(none)");
            return false;
        }
        slot[i].item = i;
        slot[i].seq = items[i].seq;
        if (!localtime_r(&t, &slot[i].local)) {
            error_setg(errp, "backup %06u: cannot convert %s to local time",
                       items[i].seq, items[i].time);
            return false;
        }
    }
    qsort(slot, n, sizeof(*slot), cmp_slot_newest_first);
    for (int r = REPO_KEEP_LAST; any && r <= REPO_KEEP_YEARLY; r++) {
        if (!opts->count[r]) {
            continue;
        }
        number_periods(slot, n, (RepoKeepRule)r, keys);
        apply_rule(slot, n, (RepoKeepRule)r, opts->count[r], covered, taken);
    }
    for (size_t i = 0; i < n; i++) {
        items[slot[i].item].kept_by = !any ? REPO_KEEP_ALL :
            slot[i].decided ? slot[i].mark : REPO_KEEP_NONE;
    }
    return true;
}
