/*
 * Progress bars (progress.h).  One line on stderr, redrawn in place with
 * "\r" at most ten times a second, so a fast copy does not spend its time
 * printing.  stderr keeps stdout clean for --output=json.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli/cli.h"
#include "util/cutils.h"
#include "cli/progress.h"

struct CliProgress {
    bool enabled;
    char label[64];
    uint64_t done;
    uint64_t total;
    double start;
    double last_draw;
    bool drawn;
};

bool cli_progress_wanted(bool force)
{
    return force || isatty(STDOUT_FILENO);
}

CliProgress *cli_progress_new(const char *label, uint64_t total, bool enabled)
{
    CliProgress *p = calloc(1, sizeof(*p));

    if (!p) {
        abort();
    }
    p->enabled = enabled;
    snprintf(p->label, sizeof(p->label), "%s", label);
    p->total = total;
    p->start = p->last_draw = clock_monotonic_seconds();
    return p;
}

static void draw(CliProgress *p, double now)
{
    char done_s[32], total_s[32], rate_s[32];
    double elapsed = now - p->start;
    unsigned pct = p->total ? (unsigned)(p->done * 100 / p->total) : 0;
    char bar[21];
    unsigned fill = pct / 5;

    memset(bar, '=', fill);
    memset(bar + fill, ' ', 20 - fill);
    bar[20] = '\0';
    cli_size_to_str(p->done, done_s, sizeof(done_s));
    cli_size_to_str(p->total, total_s, sizeof(total_s));
    cli_size_to_str(elapsed > 0 ? (uint64_t)(p->done / elapsed) : 0, rate_s,
                    sizeof(rate_s));
    fprintf(stderr, "\r%s [%s] %3u%% %s / %s, %s/s\033[K", p->label, bar, pct,
            done_s, total_s, rate_s);
    fflush(stderr);
    p->drawn = true;
    p->last_draw = now;
}

void cli_progress_update(CliProgress *p, uint64_t done, uint64_t total)
{
    double now;

    if (!p || !p->enabled) {
        return;
    }
    p->done = done;
    if (total) {
        p->total = total;
    }
    if (p->done > p->total) {
        p->total = p->done;
    }
    now = clock_monotonic_seconds();
    if (p->drawn && now - p->last_draw < 0.1) {
        return;
    }
    draw(p, now);
}

void cli_progress_finish(CliProgress *p)
{
    if (!p) {
        return;
    }
    if (p->enabled) {
        if (p->done < p->total) {
            p->done = p->total;
        }
        draw(p, clock_monotonic_seconds());
        fputc('\n', stderr);
    }
    free(p);
}

void cli_progress_cb(void *opaque, uint64_t done, uint64_t total)
{
    cli_progress_update(opaque, done, total);
}
