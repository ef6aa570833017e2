/*
 * Shared declarations of the `bitback` tool (src/cli).
 *
 * Each sub-command lives in its own file and has the signature of main():
 * it parses its own options with getopt_long (argv[0] is the sub-command
 * name), reports every failure exactly once on stderr with error_report*()
 * and returns the process exit status.
 *
 *   img.c         img create / info / map / check   (qemu-img flags)
 *   bitmap-cmd.c  bitmap --add/--remove/...         (qemu-img bitmap flags)
 *   io.c          io -c 'write ...' ...             (qemu-io commands)
 *   cli-util.c    helpers: sizes, JSON output, opening images
 */
#ifndef BITBACK_CLI_H
#define BITBACK_CLI_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <json-c/json.h>

#include "block/block.h"
#include "util/error.h"

/* Exit statuses (qemu-img check uses 2 for corruption, 3 for leaks). */
#define CLI_EXIT_OK          0
#define CLI_EXIT_ERROR       1
#define CLI_EXIT_CORRUPT     2
#define CLI_EXIT_CHECK_WARN  3

int cli_cmd_img(int argc, char **argv);
int cli_cmd_bitmap(int argc, char **argv);
int cli_cmd_io(int argc, char **argv);
/* The backup tools (docs/specs/repository.md); exit 0 ok, 1 failure,
 * 2 verification mismatch. */
int cli_cmd_backup(int argc, char **argv);      /* backup-cmd.c */
int cli_cmd_list(int argc, char **argv);        /* repo-cmd.c */
int cli_cmd_restore(int argc, char **argv);     /* restore-cmd.c */
int cli_cmd_serve(int argc, char **argv);       /* serve-cmd.c */
int cli_cmd_verify(int argc, char **argv);      /* verify-cmd.c */
int cli_cmd_prune(int argc, char **argv);       /* prune-cmd.c */
#define CLI_EXIT_MISMATCH    2

void cli_img_usage(FILE *out);
void cli_bitmap_usage(FILE *out);
void cli_io_usage(FILE *out);

/* --object TYPE,id=ID,... (keyval or JSON): create the object as
 * bitbackd's --object does (crypto/object.h: tls-creds-x509,
 * tls-creds-psk, authz-*).  false with errp set. */
bool cli_object_add(const char *arg, Error **errp);

/* Reset getopt so a sub-command can parse its own argv. */
void cli_reset_getopt(void);

/* Parse a size or offset with K/M/G/T/P/E suffixes; `what` names it in the
 * error ("size", "offset", "length").  Rejects values above BDRV_MAX_LENGTH. */
bool cli_parse_size(const char *str, const char *what, uint64_t *ret,
                    Error **errp);

/* Parse --output=human|json into *ret_json. */
bool cli_parse_output(const char *arg, bool *ret_json, Error **errp);
/* The same for an option being parsed: reports the error (false). */
bool cli_output_opt(const char *arg, bool *ret_json);

/* The options the repository tools (list, restore, verify, prune) share;
 * each tool lists in its long options the ones it takes, with these
 * codes, and gives the others codes from CLI_OPT_FIRST_FREE. */
enum {
    CLI_OPT_REPO = 256,                /* --repo DIR */
    CLI_OPT_NODE,                      /* --node NODE */
    CLI_OPT_AT,                        /* --at ID */
    CLI_OPT_PROGRESS,                  /* --progress */
    CLI_OPT_OUTPUT,                    /* --output=FMT */
    CLI_OPT_FIRST_FREE,
};
typedef struct CliRepoOpts {
    const char *repo, *node, *at;
    bool progress, json;
} CliRepoOpts;
/* Store option c (getopt_long's result) in *o.  False when c is not one
 * of them (usage, if not NULL, is printed on stderr) or its value is bad
 * (reported): the tool then exits with CLI_EXIT_ERROR. */
bool cli_repo_opt(int c, CliRepoOpts *o, void (*usage)(FILE *out));

/* Progress bars (progress.h) as the repository operations' progress
 * callbacks (repo/ops.h): one bar per step, drawn when enabled. */
struct RepoProgressOps;
void cli_progress_ops(struct RepoProgressOps *ops, bool enabled);

/* Human-readable size as qemu-img prints it ("1 MiB", "2.93 KiB").
 * Writes into buf (at least 32 bytes) and returns it. */
char *cli_size_to_str(uint64_t bytes, char *buf, size_t len);

/* Print a JSON value pretty-printed with a trailing newline. */
void cli_print_json(struct json_object *obj);

/* Open FILE with format (NULL = probe).  Checks the format name first so
 * the error is "Unknown file format 'x'". */
BlockDriverState *cli_open_image(const char *filename, const char *format,
                                 int flags, Error **errp);

/* Close bs, storing persistent bitmaps; reports a store error on stderr
 * and returns false. */
bool cli_close_image(BlockDriverState *bs);

/* The bitmap as a JSON object for `img info`:
 * {name, granularity, flags, count, inconsistent, [inconsistent-reason],
 *  generation, persistent}. */
struct json_object *cli_bitmap_info(BdrvDirtyBitmap *bm);

#endif
