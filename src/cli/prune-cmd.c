/*
 * `bitback prune`: retention for a repository (docs/specs/repository.md).
 *
 *   bitback prune --repo DIR --keep N [--node NODE] [--progress] [--output=json]
 *
 * Per disk, the newest N backups (by ID) stay; a kept backup whose parent
 * does not stay becomes a synthetic full (same ID, same content, no
 * backing file), then the older backups are deleted.  The work, and its
 * crash-safe order, is the repository library's (src/repo/prune.c,
 * repo_prune_node); this file parses the options, draws the progress bars
 * and prints what was done (lines, or a JSON report).
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

/* Most backups one node may have (bounds the arrays below). */
#define PRUNE_MAX_KEEP 1000000u

static void prune_usage(FILE *out)
{
    fprintf(out,
            "Usage: bitback prune --repo DIR --keep N [--node NODE] [--progress]\n"
            "                     [--output=json]\n"
            "\n"
            "Keep the newest N backups of each disk and delete the older ones.  A kept\n"
            "backup whose parent is deleted is rewritten as a synthetic full backup\n"
            "(same ID, same content, no backing file), so every kept point still\n"
            "restores bit for bit and no source has to be re-read.\n"
            "\n"
            "Options:\n"
            "  --repo DIR         the backup repository\n"
            "  --keep N           backups to keep per disk (at least 1)\n"
            "  --node NODE        only this disk (default: every disk)\n"
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
static bool prune_node(Repo *repo, const char *node, unsigned keep,
                       bool progress, struct json_object *report,
                       Error **errp)
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

int cli_cmd_prune(int argc, char **argv)
{
    enum { OPT_KEEP = CLI_OPT_FIRST_FREE };
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"repo", required_argument, NULL, CLI_OPT_REPO},
        {"node", required_argument, NULL, CLI_OPT_NODE},
        {"keep", required_argument, NULL, OPT_KEEP},
        {"progress", no_argument, NULL, CLI_OPT_PROGRESS},
        {"output", required_argument, NULL, CLI_OPT_OUTPUT},
        {NULL, 0, NULL, 0},
    };
    CliRepoOpts opts = { 0 };
    const char *keep_str = NULL;
    Error *err = NULL;
    unsigned long keep;
    char *end;
    int c;

    cli_reset_getopt();
    while ((c = getopt_long(argc, argv, "h", long_opts, NULL)) != -1) {
        if (c == 'h') {
            prune_usage(stdout);
            return CLI_EXIT_OK;
        } else if (c == OPT_KEEP) {
            keep_str = optarg;
        } else if (!cli_repo_opt(c, &opts, prune_usage)) {
            return CLI_EXIT_ERROR;
        }
    }
    const char *repo_path = opts.repo, *node_arg = opts.node;
    bool json = opts.json;
    bool progress = opts.progress;
    if (!repo_path || !keep_str) {
        error_report("prune: --repo DIR and --keep N are required "
                     "(see 'bitback prune --help')");
        return CLI_EXIT_ERROR;
    }
    if (optind != argc) {
        error_report("prune: unexpected argument '%s' (see 'bitback prune --help')",
                     argv[optind]);
        return CLI_EXIT_ERROR;
    }
    errno = 0;
    keep = strtoul(keep_str, &end, 10);
    if (errno || end == keep_str || *end || keep_str[0] == '-' || keep < 1 ||
        keep > PRUNE_MAX_KEEP) {
        error_report("prune: --keep must be a number from 1 to %u, not '%s'",
                     PRUNE_MAX_KEEP, keep_str);
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
    for (size_t i = 0; i < n_nodes; i++) {
        if (node_arg && strcmp(node_arg, names[i])) {
            continue;
        }
        if (!prune_node(repo, names[i], (unsigned)keep, progress, report,
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
    if (err) {
        error_report_err(err);
    }
    repo_free(repo);
    return ret;
}
