/*
 * Small helpers for struct iovec arrays, used by the block layer's
 * preadv/pwritev paths.  An "IOV" here is a (const struct iovec *, int) pair.
 */
#ifndef BITBACK_IOV_H
#define BITBACK_IOV_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

size_t iov_size(const struct iovec *iov, int niov);
/* Copy up to `bytes` from the iov (starting at byte `offset` within it)
 * into buf; returns bytes copied. */
size_t iov_to_buf(const struct iovec *iov, int niov, size_t offset, void *buf,
                  size_t bytes);
size_t iov_from_buf(const struct iovec *iov, int niov, size_t offset,
                    const void *buf, size_t bytes);
size_t iov_memset(const struct iovec *iov, int niov, size_t offset, int c,
                  size_t bytes);
/* Describe bytes [offset, offset+bytes) of src in dst (at most dst_max
 * entries, no data copied).  Returns the number of entries used, or -1 if
 * dst_max is too small. */
int iov_slice(const struct iovec *src, int nsrc, size_t offset, size_t bytes,
              struct iovec *dst, int dst_max);

#endif
