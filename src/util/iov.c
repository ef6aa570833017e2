/*
 * struct iovec helpers for the block layer (copying in and out of
 * scatter/gather lists and describing a byte range of one as another).
 */
#include <string.h>

#include "util/iov.h"

size_t iov_size(const struct iovec *iov, int niov)
{
    size_t n = 0;
    for (int i = 0; i < niov; i++) {
        n += iov[i].iov_len;
    }
    return n;
}

/* Walk the iov from byte `offset`, calling op on each piece. */
#define IOV_WALK(iov, niov, offset, bytes, BODY)                       \
    size_t done = 0;                                                   \
    for (int i = 0; i < (niov) && done < (bytes); i++) {               \
        size_t len = (iov)[i].iov_len;                                 \
        if ((offset) >= len) {                                         \
            (offset) -= len;                                           \
            continue;                                                  \
        }                                                              \
        char *base = (char *)(iov)[i].iov_base + (offset);             \
        size_t n = len - (offset);                                     \
        if (n > (bytes) - done) {                                      \
            n = (bytes) - done;                                        \
        }                                                              \
        BODY;                                                          \
        done += n;                                                     \
        (offset) = 0;                                                  \
    }                                                                  \
    return done;

size_t iov_to_buf(const struct iovec *iov, int niov, size_t offset, void *buf,
                  size_t bytes)
{
    IOV_WALK(iov, niov, offset, bytes, memcpy((char *)buf + done, base, n))
}

size_t iov_from_buf(const struct iovec *iov, int niov, size_t offset,
                    const void *buf, size_t bytes)
{
    IOV_WALK(iov, niov, offset, bytes, memcpy(base, (const char *)buf + done, n))
}

size_t iov_memset(const struct iovec *iov, int niov, size_t offset, int c,
                  size_t bytes)
{
    IOV_WALK(iov, niov, offset, bytes, memset(base, c, n))
}

int iov_slice(const struct iovec *src, int nsrc, size_t offset, size_t bytes,
              struct iovec *dst, int dst_max)
{
    int used = 0;
    size_t done = 0;
    for (int i = 0; i < nsrc && done < bytes; i++) {
        size_t len = src[i].iov_len;
        if (offset >= len) {
            offset -= len;
            continue;
        }
        size_t n = len - offset;
        if (n > bytes - done) {
            n = bytes - done;
        }
        if (used == dst_max) {
            return -1;
        }
        dst[used].iov_base = (char *)src[i].iov_base + offset;
        dst[used].iov_len = n;
        used++;
        done += n;
        offset = 0;
    }
    return used;
}
