/*
 * Helpers the libFuzzer targets of fuzz/ share (docs/fuzzing.md).
 * Header-only so that each target links only the layer it fuzzes.
 */
#ifndef BITBACK_FUZZ_UTIL_H
#define BITBACK_FUZZ_UTIL_H

#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <sys/socket.h>

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

/* Play the client on the connected socket fd: write data to it, then shut
 * it for writing, while reading and dropping what the peer sends, until the
 * peer closes (or resets) the connection.  Aborts if poll fails. */
static inline void fuzz_exchange(int fd, const uint8_t *data, size_t size)
{
    static uint8_t sink[65536];
    size_t off = 0;
    bool writing = true;
    if (size == 0) {
        shutdown(fd, SHUT_WR);
        writing = false;
    }
    for (;;) {
        struct pollfd p = { .fd = fd,
                            .events = POLLIN | (writing ? POLLOUT : 0) };
        if (poll(&p, 1, -1) < 0) {
            if (errno == EINTR) {
                continue;
            }
            perror("fuzz_exchange: poll");
            abort();
        }
        if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t n = recv(fd, sink, sizeof(sink), MSG_DONTWAIT);
            if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
                return;   /* the server closed the connection */
            }
        }
        if (writing && (p.revents & POLLOUT)) {
            ssize_t n = send(fd, data + off, size - off,
                             MSG_DONTWAIT | MSG_NOSIGNAL);
            if (n > 0) {
                off += (size_t)n;
            }
            if (off == size || (n < 0 && errno != EAGAIN && errno != EINTR)) {
                shutdown(fd, SHUT_WR);
                writing = false;
            }
        }
    }
}

#endif
