/*
 * Scope-bound cleanup helpers built on __attribute__((cleanup)), as in
 * nbdkit, systemd and QEMU.  Every destructor used here accepts NULL.
 */
#ifndef BITBACK_CLEANUP_H
#define BITBACK_CLEANUP_H

#include <stdlib.h>
#include <unistd.h>
#include <pthread.h>
#include <json-c/json.h>

#define _cleanup_(f) __attribute__((cleanup(f)))

static inline void freep(void *p) { free(*(void **)p); }
#define _cleanup_free_ _cleanup_(freep)

static inline void closep(int *fd) { if (*fd >= 0) { close(*fd); } }
#define _cleanup_close_ _cleanup_(closep)

static inline void json_object_putp(struct json_object **o) { json_object_put(*o); }
#define _cleanup_json_ _cleanup_(json_object_putp)

/* Return *pp and set it to NULL, so a cleanup attribute no longer frees it. */
#define steal_pointer(pp) \
    ({ __typeof__(*(pp)) _ptr_ = *(pp); *(pp) = NULL; _ptr_; })

/* Lock guard: `LOCK_GUARD(&m);` holds m until the end of the scope. */
static inline void mutex_unlockp(pthread_mutex_t **m) { if (*m) { pthread_mutex_unlock(*m); } }
#define LOCK_GUARD_CAT2(a, b) a##b
#define LOCK_GUARD_CAT(a, b) LOCK_GUARD_CAT2(a, b)
/* The guard is used only for its cleanup: marked unused so that clang,
 * which (unlike gcc) warns about such variables, stays quiet. */
#define LOCK_GUARD(m) \
    _cleanup_(mutex_unlockp) __attribute__((unused)) \
    pthread_mutex_t *LOCK_GUARD_CAT(_guard_, __LINE__) = \
        (pthread_mutex_lock(m), (m))

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#ifndef MIN
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#endif
#define DIV_ROUND_UP(n, d) (((n) + (d) - 1) / (d))
#define ROUND_UP(n, d) (DIV_ROUND_UP(n, d) * (d))
#define ROUND_DOWN(n, d) ((n) / (d) * (d))
#define IS_POW2(n) ((n) != 0 && (((n) & ((n) - 1)) == 0))

#endif
