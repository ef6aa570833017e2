/*
 * `bitback list --repo DIR [--output=human|json]`: the backups of a
 * repository (docs/specs/repository.md), oldest first (by ID, then disk).
 *
 * The JSON form is a list of the manifests' short objects (id, node,
 * level, time, parent, changed-bytes, stored-bytes, synthetic), the same
 * keys the manifest files use, so scripts can feed any `id` to `--at`.
 * The human form is a table with sizes as qemu-img prints them.  The
 * command only reads: it never creates or repairs a repository.
 */
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "repo/repo.h"
#include "util/cleanup.h"

static void list_usage(FILE *out)
{
    fprintf(out,
            "Usage: bitback list --repo DIR [--output=human|json]\n"
            "\n"
            "List the backups in a repository, oldest first.\n"
            "\n"
            "Options:\n"
            "  --repo DIR             the backup repository: a folder, or\n"
            "                         rbd:POOL[/NS][:conf=PATH][:id=USER] in Ceph\n"
            "  --output=human|json    a table (default), or a JSON list of\n"
            "                         {id, node, level, time, parent, changed-bytes,\n"
            "                          stored-bytes, synthetic}\n"
            "  -h, --help             show this help\n"
            "\n"
            "Any ID listed is accepted by --at of restore and verify.\n");
}

static void print_table(Repo *repo)
{
    static const char *const head[] = {
        "ID", "NODE", "LEVEL", "TIME", "PARENT", "CHANGED", "STORED",
    };
    enum { NCOL = 7 };
    size_t width[NCOL];
    bool any_synthetic = false;

    if (!repo->n_backups) {
        printf("No backups in %s\n", repo->path);
        return;
    }
    /* Two passes: widths, then rows. */
    for (int pass = 0; pass < 2; pass++) {
        for (size_t c = 0; c < NCOL; c++) {
            if (pass == 0) {
                width[c] = strlen(head[c]);
            } else if (c + 1 < NCOL) {
                printf("%-*s  ", (int)width[c], head[c]);
            } else {
                printf("%s\n", head[c]);
            }
        }
        for (size_t i = 0; i < repo->n_backups; i++) {
            const RepoManifest *m = repo->backups[i];
            char level[16], parent[REPO_ID_LEN], changed[32], stored[32];
            snprintf(level, sizeof(level), "%s%s", repo_level_name(m->level),
                     m->synthetic ? "*" : "");
            any_synthetic |= m->synthetic;
            if (m->parent_seq) {
                repo_format_id(m->parent_seq, parent);
            } else {
                strcpy(parent, "-");
            }
            cli_size_to_str(m->changed_bytes, changed, sizeof(changed));
            cli_size_to_str(m->stored_bytes, stored, sizeof(stored));
            const char *cell[NCOL] = {
                m->id, m->node, level, m->time, parent, changed, stored,
            };
            for (size_t c = 0; c < NCOL; c++) {
                if (pass == 0) {
                    width[c] = MAX(width[c], strlen(cell[c]));
                } else if (c + 1 < NCOL) {
                    printf("%-*s  ", (int)width[c], cell[c]);
                } else {
                    printf("%s\n", cell[c]);
                }
            }
        }
    }
    if (any_synthetic) {
        printf("\n* a synthetic full backup, made by prune from older backups\n");
    }
}

int cli_cmd_list(int argc, char **argv)
{
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"repo", required_argument, NULL, CLI_OPT_REPO},
        {"output", required_argument, NULL, CLI_OPT_OUTPUT},
        {NULL, 0, NULL, 0},
    };
    CliRepoOpts opts = { 0 };
    int c;

    cli_reset_getopt();
    while ((c = getopt_long(argc, argv, "h", long_opts, NULL)) != -1) {
        if (c == 'h') {
            list_usage(stdout);
            return CLI_EXIT_OK;
        } else if (!cli_repo_opt(c, &opts, NULL)) {
            return CLI_EXIT_ERROR;
        }
    }
    const char *repo_path = opts.repo;
    bool json = opts.json;
    Error *err = NULL;
    if (optind < argc) {
        error_report("unexpected argument '%s' (try 'bitback list --help')",
                     argv[optind]);
        return CLI_EXIT_ERROR;
    }
    if (!repo_path) {
        error_report("--repo DIR is required (try 'bitback list --help')");
        return CLI_EXIT_ERROR;
    }

    Repo *repo = repo_open(repo_path, false, &err);
    if (!repo) {
        error_report_err(err);
        return CLI_EXIT_ERROR;
    }
    if (json) {
        _cleanup_json_ struct json_object *list = json_object_new_array();
        for (size_t i = 0; i < repo->n_backups; i++) {
            json_object_array_add(list,
                                  repo_manifest_to_json(repo->backups[i], false));
        }
        cli_print_json(list);
    } else {
        print_table(repo);
    }
    repo_free(repo);
    return CLI_EXIT_OK;
}
