/*
 * `bitback prune`: retention for a repository (docs/specs/repository.md).
 *
 *   bitback prune --repo DIR [--keep-last N] [--keep-hourly N] [--keep-daily N]
 *                 [--keep-weekly N] [--keep-monthly N] [--keep-yearly N]
 *                 [--keep N] [--node NODE] [--dry-run] [--progress]
 *                 [--output=json]
 *
 * Per disk, the backups Proxmox Backup Server's retention rules keep
 * stay (docs/specs/retention.md; --keep N is --keep-last N); a kept
 * backup whose parent does not stay becomes a synthetic full (same ID,
 * same content, no backing file), then the others are deleted.  The
 * decision is src/repo/retention.c's, the work and its crash-safe order
 * src/repo/prune.c's (repo_prune_plan, repo_prune_node); this file parses
 * the options, draws the progress bars and prints the plan (--dry-run)
 * or what was done (lines, or a JSON report).
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cli/progress.h"
#include "repo/ops.h"
#include "util/cleanup.h"
#include "util/cutils.h"

static void prune_usage(FILE *out)
{
    fprintf(out,
            "Usage: bitback prune --repo DIR [--keep-last N] [--keep-hourly N]\n"
            "                     [--keep-daily N] [--keep-weekly N] [--keep-monthly N]\n"
            "                     [--keep-yearly N] [--node NODE] [--dry-run]\n"
            "                     [--progress] [--output=json]\n"
            "\n"
            "Apply retention rules to each disk's backups, with Proxmox Backup Server's\n"
            "semantics: walking the backups newest first, --keep-last keeps the newest N;\n"
            "then each of --keep-hourly, -daily, -weekly (ISO weeks), -monthly, -yearly\n"
            "keeps the newest backup of each of N periods (local time) that no earlier\n"
            "rule already covered.  Everything no rule keeps is deleted; the newest backup\n"
            "is always kept.  A kept backup whose parent is deleted is rewritten as a\n"
            "synthetic full backup (same ID, same content, no backing file), so every kept\n"
            "point still restores bit for bit and no source has to be re-read.\n"
            "The rules in full: docs/specs/retention.md.\n"
            "\n"
            "Options:\n"
            "  --repo DIR         the backup repository: a folder, or\n"
            "                     rbd:POOL[/NS][:conf=PATH][:id=USER] in Ceph\n"
            "  --keep-last N      keep the newest N backups\n"
            "  --keep-hourly N    keep the newest backup of each of the last N hours with one\n"
            "  --keep-daily N     ... days\n"
            "  --keep-weekly N    ... ISO weeks (Monday to Sunday)\n"
            "  --keep-monthly N   ... months\n"
            "  --keep-yearly N    ... years\n"
            "  --keep N           the same as --keep-last N\n"
            "                     (N from 0 to 1000000; at least one rule needs N >= 1)\n"
            "  --node NODE        only this disk (default: every disk)\n"
            "  --dry-run          list what would be kept (and by which rule) and what\n"
            "                     would be deleted; change nothing\n"
            "  --progress         draw progress bars even when stdout is not a terminal\n"
            "  --output=FMT       human (default) or json\n"
            "\n"
            "Dirty bitmaps are not changed.  A kill at any point leaves every remaining\n"
            "backup restorable; running prune again finishes the job.\n");
}

/* What prune did to one disk, for the report. */
typedef struct PruneReport {
    bool json;
    struct json_object *merged, *deleted;     /* arrays of IDs (json) */
} PruneReport;

/* RepoPruneEventFn: a line per step (human), or the ID in the report. */
static void prune_event(void *opaque, RepoPruneEvent ev, const char *node,
                        const char *id)
{
    PruneReport *r = opaque;

    switch (ev) {
    case REPO_PRUNE_ROLLED:
        printf("prune: %s: finished making backup %s a synthetic full "
               "(an earlier prune was interrupted)\n", node, id);
        break;
    case REPO_PRUNE_MERGED:
        json_object_array_add(r->merged, json_object_new_string(id));
        if (!r->json) {
            printf("prune: %s: backup %s is now a synthetic full\n", node, id);
        }
        break;
    case REPO_PRUNE_DELETED:
        json_object_array_add(r->deleted, json_object_new_string(id));
        if (!r->json) {
            printf("prune: %s: deleted backup %s\n", node, id);
        }
        break;
    }
}

/* Prune one node.  Adds to the JSON report when report is non-NULL. */
static bool prune_node(Repo *repo, const char *node,
                       const RepoKeepOptions *keep, bool progress,
                       struct json_object *report, Error **errp)
{
    PruneReport r = { .json = report != NULL,
                      .merged = json_object_new_array(),
                      .deleted = json_object_new_array() };
    RepoProgressOps prog;
    RepoPruneResult res;
    bool ok;

    cli_progress_ops(&prog, progress);
    ok = repo_prune_node(repo, node, keep, &prog, prune_event, &r, &res,
                         errp);
    if (ok && report) {
        struct json_object *o = json_object_new_object();
        json_object_object_add(o, "node", json_object_new_string(node));
        json_object_object_add(o, "kept", json_object_new_int64((int64_t)res.kept));
        json_object_object_add(o, "merged", json_object_get(r.merged));
        json_object_object_add(o, "deleted", json_object_get(r.deleted));
        json_object_array_add(report, o);
    } else if (ok) {
        printf("prune: %s: kept %zu backup%s, merged %u into synthetic "
               "fulls, deleted %u\n", node, res.kept, res.kept == 1 ? "" : "s",
               res.merged + res.rolled, res.deleted);
    }
    json_object_put(r.merged);
    json_object_put(r.deleted);
    return ok;
}

/* --dry-run for one node: the plan, as lines or in the JSON report. */
static bool prune_dry_run(Repo *repo, const char *node,
                          const RepoKeepOptions *keep,
                          struct json_object *report, Error **errp)
{
    _cleanup_free_ RepoRetentionItem *items = NULL;
    struct json_object *kept, *removed, *o;
    size_t n, n_kept = 0;

    if (!repo_prune_plan(repo, node, keep, &items, &n, errp)) {
        return false;
    }
    kept = json_object_new_array();
    removed = json_object_new_array();
    for (size_t k = n; k-- > 0;) {               /* newest first, as PBS */
        char id[REPO_ID_LEN];
        bool stays = items[k].kept_by != REPO_KEEP_NONE;

        repo_format_id(items[k].seq, id);
        n_kept += stays;
        if (!report) {
            printf("prune: %s: %s %s %s%s%s\n", node,
                   stays ? "would keep  " : "would delete", id, items[k].time,
                   stays ? " " : "",
                   stays ? repo_keep_rule_name(items[k].kept_by) : "");
            continue;
        }
        o = json_object_new_object();
        json_object_object_add(o, "id", json_object_new_string(id));
        json_object_object_add(o, "time",
                               json_object_new_string(items[k].time));
        if (stays) {
            json_object_object_add(o, "rule", json_object_new_string(
                repo_keep_rule_name(items[k].kept_by)));
        }
        json_object_array_add(stays ? kept : removed, o);
    }
    if (report) {
        o = json_object_new_object();
        json_object_object_add(o, "node", json_object_new_string(node));
        json_object_object_add(o, "dry-run", json_object_new_boolean(true));
        json_object_object_add(o, "keep", kept);
        json_object_object_add(o, "delete", removed);
        json_object_array_add(report, o);
    } else {
        json_object_put(kept);
        json_object_put(removed);
        printf("prune: %s: would keep %zu backup%s, delete %zu (dry run: "
               "nothing changed)\n", node, n_kept, n_kept == 1 ? "" : "s",
               n - n_kept);
    }
    return true;
}

/* The value of --keep-RULE: 0 to REPO_KEEP_MAX_COUNT (reported). */
static bool parse_keep_count(const char *opt, const char *arg,
                             unsigned *ret)
{
    unsigned long v;
    char *end;

    errno = 0;
    v = strtoul(arg, &end, 10);
    if (errno || end == arg || *end || arg[0] == '-' || arg[0] == '+' ||
        v > REPO_KEEP_MAX_COUNT) {
        error_report("prune: --%s must be a number from 0 to %u, not '%s'",
                     opt, REPO_KEEP_MAX_COUNT, arg);
        return false;
    }
    *ret = (unsigned)v;
    return true;
}

int cli_cmd_prune(int argc, char **argv)
{
    /* Each --keep-RULE's code is CLI_OPT_FIRST_FREE + its RepoKeepRule;
     * --keep (keep-last's old name) follows them. */
    enum {
        OPT_KEEP_RULE = CLI_OPT_FIRST_FREE,
        OPT_KEEP = OPT_KEEP_RULE + REPO_KEEP__MAX,
        OPT_DRY_RUN,
    };
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"repo", required_argument, NULL, CLI_OPT_REPO},
        {"node", required_argument, NULL, CLI_OPT_NODE},
        {"keep", required_argument, NULL, OPT_KEEP},
        {"keep-last", required_argument, NULL, OPT_KEEP_RULE + REPO_KEEP_LAST},
        {"keep-hourly", required_argument, NULL,
         OPT_KEEP_RULE + REPO_KEEP_HOURLY},
        {"keep-daily", required_argument, NULL, OPT_KEEP_RULE + REPO_KEEP_DAILY},
        {"keep-weekly", required_argument, NULL,
         OPT_KEEP_RULE + REPO_KEEP_WEEKLY},
        {"keep-monthly", required_argument, NULL,
         OPT_KEEP_RULE + REPO_KEEP_MONTHLY},
        {"keep-yearly", required_argument, NULL,
         OPT_KEEP_RULE + REPO_KEEP_YEARLY},
        {"dry-run", no_argument, NULL, OPT_DRY_RUN},
        {"progress", no_argument, NULL, CLI_OPT_PROGRESS},
        {"output", required_argument, NULL, CLI_OPT_OUTPUT},
        {NULL, 0, NULL, 0},
    };
    CliRepoOpts opts = { 0 };
    RepoKeepOptions keep = { 0 };
    bool rule_given[REPO_KEEP__MAX] = { false };
    bool dry_run = false;
    Error *err = NULL;
    int c;

    cli_reset_getopt();
    while ((c = getopt_long(argc, argv, "h", long_opts, NULL)) != -1) {
        if (c == 'h') {
            prune_usage(stdout);
            return CLI_EXIT_OK;
        } else if (c == OPT_DRY_RUN) {
            dry_run = true;
        } else if (c == OPT_KEEP ||
                   (c > OPT_KEEP_RULE + REPO_KEEP_NONE &&
                    c <= OPT_KEEP_RULE + REPO_KEEP_YEARLY)) {
            RepoKeepRule r = c == OPT_KEEP ? REPO_KEEP_LAST
                                           : (RepoKeepRule)(c - OPT_KEEP_RULE);
            const char *name = c == OPT_KEEP ? "keep"
                                             : repo_keep_rule_name(r);

            if (rule_given[r]) {
                error_report("prune: --%s given twice (--keep is "
                             "--keep-last)", name);
                return CLI_EXIT_ERROR;
            }
            rule_given[r] = true;
            if (!parse_keep_count(name, optarg, &keep.count[r])) {
                return CLI_EXIT_ERROR;
            }
        } else if (!cli_repo_opt(c, &opts, prune_usage)) {
            return CLI_EXIT_ERROR;
        }
    }
    const char *repo_path = opts.repo, *node_arg = opts.node;
    bool json = opts.json;
    bool progress = opts.progress;
    if (!repo_path) {
        error_report("prune: --repo DIR is required (see 'bitback prune "
                     "--help')");
        return CLI_EXIT_ERROR;
    }
    if (!repo_keep_options_any(&keep)) {
        error_report("prune: no rule keeps anything: give at least one of "
                     "--keep-last (or --keep), --keep-hourly, --keep-daily, "
                     "--keep-weekly, --keep-monthly, --keep-yearly with N >= 1 "
                     "(see 'bitback prune --help')");
        return CLI_EXIT_ERROR;
    }
    if (optind != argc) {
        error_report("prune: unexpected argument '%s' (see 'bitback prune --help')",
                     argv[optind]);
        return CLI_EXIT_ERROR;
    }
    progress = cli_progress_wanted(progress) && !json;

    Repo *repo = repo_open(repo_path, false, &err);
    if (!repo) {
        error_report_err(err);
        return CLI_EXIT_ERROR;
    }
    int ret = CLI_EXIT_ERROR;
    _cleanup_free_ const char **nodes = repo_nodes(repo);
    _cleanup_json_ struct json_object *report =
        json ? json_object_new_array() : NULL;
    size_t n_nodes = 0;
    char **names = NULL;
    RepoLock **locks = NULL;

    if (node_arg && !repo_pick_node(repo, node_arg, &err)) {
        goto out;
    }
    /* Copy the names: the repo's strings go away when it reloads. */
    while (nodes && nodes[n_nodes]) {
        n_nodes++;
    }
    names = calloc(n_nodes + 1, sizeof(*names));
    if (!names) {
        error_setg(&err, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n_nodes; i++) {
        names[i] = strdup(nodes[i]);
        if (!names[i]) {
            error_setg(&err, "out of memory");
            goto out;
        }
    }
    /* Every disk it prunes, locked first (spec, "Locks"; a dry run only
     * reads), then the repository read again under the locks. */
    const char *one[2] = { node_arg, NULL };
    locks = repo_lock_nodes(repo, node_arg ? one : (const char *const *)names,
                            dry_run ? REPO_LOCK_READ : REPO_LOCK_PRUNE, &err);
    if (!locks) {
        goto out;
    }
    if (!repo_reload(repo, &err)) {
        goto out;
    }
    for (size_t i = 0; i < n_nodes; i++) {
        if (node_arg && strcmp(node_arg, names[i])) {
            continue;
        }
        if (dry_run ? !prune_dry_run(repo, names[i], &keep, report, &err)
                    : !prune_node(repo, names[i], &keep, progress, report,
                                  &err)) {
            goto out;
        }
    }
    if (report) {
        cli_print_json(report);
    }
    ret = CLI_EXIT_OK;

out:
    if (names) {
        for (size_t i = 0; i < n_nodes; i++) {
            free(names[i]);
        }
        free(names);
    }
    repo_unlock_nodes(locks);
    if (err) {
        error_report_err(err);
    }
    repo_free(repo);
    return ret;
}
