/*
 * The main thread's neutral services, for layers that must not know who
 * runs the main loop or who listens to events (the job layer, and the
 * daemon's QMP monitor that provides both).
 *
 * Deferred calls: any thread may ask for fn(opaque) to run on the main
 * thread, soon, in the order asked.  The main loop (qmp/monitor.c in the
 * daemon; the unit tests by hand) runs them with main_loop_run_pending().
 * Calls scheduled before a main loop exists, or after it stopped, wait
 * for the next main_loop_run_pending().
 *
 * Wake-up: a pipe whose read end the main loop polls; main_loop_wake()
 * makes it readable.  Scheduling a call wakes the loop.
 *
 * Events: event_emit() hands a named event to the sink that the event
 * consumer registered (the QMP monitor).  Without a sink, events are
 * dropped: programs without a monitor (the offline CLI, unit tests) have
 * nobody to tell.
 */
#ifndef BITBACK_MAIN_LOOP_H
#define BITBACK_MAIN_LOOP_H

struct json_object;

/* Run fn(opaque) on the main thread, soon, in the order scheduled.
 * Thread-safe. */
void main_loop_schedule(void (*fn)(void *opaque), void *opaque);
/* Run the calls scheduled so far (main thread).  Returns how many ran. */
int main_loop_run_pending(void);

/* The read end of the wake-up pipe, created on the first call (main
 * thread). */
int main_loop_wake_fd(void);
/* Make the wake-up pipe readable.  Thread- and async-signal-safe; does
 * nothing before main_loop_wake_fd() created the pipe. */
void main_loop_wake(void);
/* Empty the wake-up pipe (main thread, after poll() found it readable). */
void main_loop_wake_drain(void);

/* An event consumer: takes ownership of data (may be NULL).  Called from
 * any thread, so it must be thread-safe. */
typedef void (*EventSink)(const char *name, struct json_object *data);
/* Register the consumer (NULL: none; events are then dropped). */
void event_sink_set(EventSink sink);
/* Emit an event to the registered sink.  Takes ownership of data (may be
 * NULL).  Thread-safe. */
void event_emit(const char *name, struct json_object *data);

#endif
