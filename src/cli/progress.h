/*
 * Progress bars for the backup tools: one line on stderr, redrawn at most
 * ten times a second, with bytes done, total, percentage and rate.
 *
 * Shown only when wanted: stdout is a terminal, or --progress forces it
 * (cli_progress_wanted).  A disabled CliProgress accepts every call and
 * prints nothing, so callers never test for it.
 */
#ifndef BITBACK_CLI_PROGRESS_H
#define BITBACK_CLI_PROGRESS_H

#include <stdbool.h>
#include <stdint.h>

typedef struct CliProgress CliProgress;

/* True when progress should be drawn: force, or stdout is a TTY. */
bool cli_progress_wanted(bool force);

/* A bar labelled `label` ("disk0 backup") for `total` bytes (may be 0 and
 * set later).  Never NULL. */
CliProgress *cli_progress_new(const char *label, uint64_t total, bool enabled);
void cli_progress_update(CliProgress *p, uint64_t done, uint64_t total);
/* Draw the final state, end the line and free.  Accepts NULL. */
void cli_progress_finish(CliProgress *p);

/* A RepoProgressFn-shaped callback: opaque is the CliProgress. */
void cli_progress_cb(void *opaque, uint64_t done, uint64_t total);

#endif
