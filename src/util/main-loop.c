/*
 * Deferred calls, the wake-up pipe and the event sink (main-loop.h).
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <json-c/json.h>

#include "util/cleanup.h"
#include "util/main-loop.h"

typedef struct Scheduled {
    void (*fn)(void *opaque);
    void *opaque;
    struct Scheduled *next;
} Scheduled;

static pthread_mutex_t sched_lock = PTHREAD_MUTEX_INITIALIZER;
static Scheduled *sched_head, **sched_tail = &sched_head;

static int wake_fds[2] = { -1, -1 };

static EventSink event_sink;

int main_loop_wake_fd(void)
{
    if (wake_fds[0] < 0 && pipe2(wake_fds, O_CLOEXEC | O_NONBLOCK) < 0) {
        perror("pipe2");
        abort();
    }
    return wake_fds[0];
}

void main_loop_wake(void)
{
    int fd = wake_fds[1];
    if (fd >= 0) {
        ssize_t r = write(fd, "x", 1);   /* full pipe: already awake */
        (void)r;
    }
}

void main_loop_wake_drain(void)
{
    char drain[256];
    while (read(wake_fds[0], drain, sizeof(drain)) > 0) {
        /* nothing */
    }
}

void main_loop_schedule(void (*fn)(void *opaque), void *opaque)
{
    Scheduled *s = calloc(1, sizeof(*s));
    if (!s) {
        abort();
    }
    s->fn = fn;
    s->opaque = opaque;
    {
        LOCK_GUARD(&sched_lock);
        *sched_tail = s;
        sched_tail = &s->next;
    }
    main_loop_wake();
}

int main_loop_run_pending(void)
{
    Scheduled *list;
    {
        LOCK_GUARD(&sched_lock);
        list = sched_head;
        sched_head = NULL;
        sched_tail = &sched_head;
    }
    int n = 0;
    while (list) {
        Scheduled *next = list->next;
        list->fn(list->opaque);
        free(list);
        list = next;
        n++;
    }
    return n;
}

void event_sink_set(EventSink sink)
{
    __atomic_store_n(&event_sink, sink, __ATOMIC_RELEASE);
}

void event_emit(const char *name, struct json_object *data)
{
    EventSink sink = __atomic_load_n(&event_sink, __ATOMIC_ACQUIRE);
    if (!sink) {
        json_object_put(data);
        return;
    }
    sink(name, data);
}
