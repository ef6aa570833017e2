/*
 * Byte order: loads and stores of 16/32/64-bit integers at any (possibly
 * unaligned) address, in big-endian (qcow2, NBD) or little-endian (QBM
 * bitmap files, the write-intent log) order.  The one family of such
 * helpers in the tree: ld_be32(p) reads, st_le64(p, v) writes.
 */
#ifndef BITBACK_UTIL_BSWAP_H
#define BITBACK_UTIL_BSWAP_H

#include <endian.h>
#include <stdint.h>
#include <string.h>

#define BSWAP_DEFINE(bits, order, to_host, from_host)                         \
    static inline uint##bits##_t ld_##order##bits(const void *p)              \
    {                                                                         \
        uint##bits##_t v;                                                     \
        memcpy(&v, p, sizeof(v));                                             \
        return to_host(v);                                                    \
    }                                                                         \
    static inline void st_##order##bits(void *p, uint##bits##_t v)            \
    {                                                                         \
        v = from_host(v);                                                     \
        memcpy(p, &v, sizeof(v));                                             \
    }

BSWAP_DEFINE(16, be, be16toh, htobe16)
BSWAP_DEFINE(32, be, be32toh, htobe32)
BSWAP_DEFINE(64, be, be64toh, htobe64)
BSWAP_DEFINE(16, le, le16toh, htole16)
BSWAP_DEFINE(32, le, le32toh, htole32)
BSWAP_DEFINE(64, le, le64toh, htole64)

#undef BSWAP_DEFINE

#endif
