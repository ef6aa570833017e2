/*
 * libFuzzer target: util/optfile, the parser of `bitbackd --config FILE`
 * (one long option a line: NAME, NAME VALUE, NAME=VALUE, comments).
 *
 * Input: the file's bytes.  Every accepted entry must have a name of
 * [a-z0-9-]+ and a value without a newline, with a line number inside
 * the input's line count (the harness aborts otherwise).
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "util/error.h"
#include "util/optfile.h"
#include "fuzz-util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    OptFileEntry *ents;
    size_t n;
    Error *err = NULL;
    unsigned lines = 1;

    for (size_t i = 0; i < size; i++) {
        lines += data[i] == '\n';
    }
    if (!optfile_parse((const char *)data, size, "fuzz.conf", &ents, &n,
                       &err)) {
        (void)error_get_pretty(err);
        error_free(err);
        return 0;
    }
    for (size_t i = 0; i < n; i++) {
        const OptFileEntry *e = &ents[i];
        if (!*e->name || strspn(e->name, "abcdefghijklmnopqrstuvwxyz"
                                "0123456789-") != strlen(e->name) ||
            (e->value && strchr(e->value, '\n')) ||
            e->line < 1 || e->line > lines ||
            (i > 0 && e->line <= ents[i - 1].line)) {
            abort();
        }
    }
    optfile_free(ents, n);
    return 0;
}
