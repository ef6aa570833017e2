/*
 * buf_is_zero(): is a buffer all zero bytes?  One definition for every
 * layer (restore's sparse copy, the backup tools' zero detection).
 */
#ifndef BITBACK_UTIL_BUFZERO_H
#define BITBACK_UTIL_BUFZERO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* True when the len bytes at buf are all zero (len 0: true).  The first
 * byte, then memcmp against the buffer shifted by one: every byte equals
 * its neighbour and the first is zero. */
static inline bool buf_is_zero(const void *buf, size_t len)
{
    const uint8_t *p = buf;

    return len == 0 || (p[0] == 0 && !memcmp(p, p + 1, len - 1));
}

#endif
