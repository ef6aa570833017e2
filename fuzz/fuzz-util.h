/*
 * Helpers the libFuzzer targets of fuzz/ share (docs/fuzzing.md).
 * Header-only so that each target links only the layer it fuzzes.
 */
#ifndef BITBACK_FUZZ_UTIL_H
#define BITBACK_FUZZ_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A malloc'd NUL-terminated copy of data[0..size) (an embedded NUL ends
 * the string early, as it does for the C strings the parsers take), or
 * NULL when memory is short.  The caller frees. */
static inline char *fuzz_strndup(const uint8_t *data, size_t size)
{
    char *s = malloc(size + 1);
    if (s) {
        memcpy(s, data, size);
        s[size] = '\0';
    }
    return s;
}

#endif
