/*
 * iothread objects (iothread.h): each one a thread that sleeps until the
 * object is deleted, so that its thread-id is a real thread of the daemon
 * as in QEMU, plus QEMU's event-loop properties, kept and reported but
 * not used: no request runs in it (the NBD server has its own threads).
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>

#include "crypto/crypto-internal.h"
#include "crypto/iothread.h"
#include "crypto/object.h"
#include "util/cleanup.h"

/* QEMU's default poll-max-ns on Linux (util/aio-posix.h). */
#define IOTHREAD_POLL_MAX_NS_DEFAULT 32768

typedef struct IOThread {
    char *id;
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int64_t thread_id;            /* lock: set by the thread, then fixed */
    bool stopping;                /* lock */
    int64_t poll_max_ns, poll_grow, poll_shrink, aio_max_batch;
    int64_t thread_pool_min, thread_pool_max;
    unsigned seq;                 /* creation order, for query-iothreads */
} IOThread;

static unsigned iothread_seq;

static void *iothread_main(void *opaque)
{
    IOThread *t = opaque;
    pthread_mutex_lock(&t->lock);
    t->thread_id = (int64_t)syscall(SYS_gettid);
    pthread_cond_broadcast(&t->cond);
    while (!t->stopping) {
        pthread_cond_wait(&t->cond, &t->lock);
    }
    pthread_mutex_unlock(&t->lock);
    return NULL;
}

void *iothread_new(const char *id, struct json_object *props, Error **errp)
{
    static const struct {
        const char *name;
        size_t off;
        int64_t dflt;
    } ints[] = {
        { "poll-max-ns", offsetof(IOThread, poll_max_ns),
          IOTHREAD_POLL_MAX_NS_DEFAULT },
        { "poll-grow", offsetof(IOThread, poll_grow), 0 },
        { "poll-shrink", offsetof(IOThread, poll_shrink), 0 },
        { "aio-max-batch", offsetof(IOThread, aio_max_batch), 0 },
        { "thread-pool-min", offsetof(IOThread, thread_pool_min), 0 },
        { "thread-pool-max", offsetof(IOThread, thread_pool_max), 64 },
    };
    IOThread *t = calloc(1, sizeof(*t));
    if (!t || !(t->id = strdup(id))) {
        free(t);
        error_setg(errp, "out of memory");
        return NULL;
    }
    for (size_t i = 0; i < ARRAY_SIZE(ints); i++) {
        int64_t *field = (int64_t *)((char *)t + ints[i].off);
        if (!object_prop_int(props, ints[i].name, ints[i].dflt, field, errp)) {
            goto fail;
        }
        if (*field < 0) {
            error_setg(errp, "%s value must be in range [0, %lld]",
                       ints[i].name, (long long)INT64_MAX);
            goto fail;
        }
    }
    if (t->thread_pool_min > t->thread_pool_max) {
        error_setg(errp, "thread-pool-min (%lld) must be less than or equal "
                   "to thread-pool-max (%lld)", (long long)t->thread_pool_min,
                   (long long)t->thread_pool_max);
        goto fail;
    }
    pthread_mutex_init(&t->lock, NULL);
    pthread_cond_init(&t->cond, NULL);
    if (pthread_create(&t->thread, NULL, iothread_main, t) != 0) {
        pthread_cond_destroy(&t->cond);
        pthread_mutex_destroy(&t->lock);
        error_setg(errp, "Failed to create iothread '%s'", id);
        goto fail;
    }
    pthread_mutex_lock(&t->lock);
    while (!t->thread_id) {
        pthread_cond_wait(&t->cond, &t->lock);
    }
    pthread_mutex_unlock(&t->lock);
    t->seq = iothread_seq++;
    return t;

fail:
    free(t->id);
    free(t);
    return NULL;
}

void iothread_free(void *opaque)
{
    IOThread *t = opaque;
    if (!t) {
        return;
    }
    pthread_mutex_lock(&t->lock);
    t->stopping = true;
    pthread_cond_broadcast(&t->cond);
    pthread_mutex_unlock(&t->lock);
    pthread_join(t->thread, NULL);
    pthread_cond_destroy(&t->cond);
    pthread_mutex_destroy(&t->lock);
    free(t->id);
    free(t);
}

static struct json_object *iothread_info(const IOThread *t)
{
    struct json_object *o = json_object_new_object();
    json_object_object_add(o, "id", json_object_new_string(t->id));
    json_object_object_add(o, "thread-id", json_object_new_int64(t->thread_id));
    json_object_object_add(o, "poll-max-ns",
                           json_object_new_int64(t->poll_max_ns));
    json_object_object_add(o, "poll-grow", json_object_new_int64(t->poll_grow));
    json_object_object_add(o, "poll-shrink",
                           json_object_new_int64(t->poll_shrink));
    json_object_object_add(o, "aio-max-batch",
                           json_object_new_int64(t->aio_max_batch));
    return o;
}

static int iothread_cmp(const void *a, const void *b)
{
    const IOThread *x = *(IOThread *const *)a, *y = *(IOThread *const *)b;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

struct json_object *iothread_query_all(void)
{
    struct json_object *arr = json_object_new_array();
    size_t n = object_list_impls("iothread", NULL, 0);
    IOThread **ts = calloc(n ? n : 1, sizeof(*ts));
    if (!ts) {
        abort();
    }
    object_list_impls("iothread", (void **)ts, n);
    qsort(ts, n, sizeof(*ts), iothread_cmp);
    for (size_t i = 0; i < n; i++) {
        json_object_array_add(arr, iothread_info(ts[i]));
    }
    free(ts);
    return arr;
}

bool iothread_check(const char *id, Error **errp)
{
    Object *o = object_find(id);
    if (!o || strcmp(object_type(o), "iothread") != 0) {
        error_setg(errp, "iothread \"%s\" not found", id);
        return false;
    }
    return true;
}
