/*
 * QMP: the QEMU Machine Protocol, as qemu-storage-daemon speaks it.
 * JSON objects over a stream socket: a greeting, then
 *   {"execute": NAME, "arguments": {...}, "id": ANY}
 *   -> {"return": ...,"id": ANY} | {"error": {"class": C, "desc": D}, "id": ANY}
 * and asynchronous {"event": NAME, "data": {...}, "timestamp": {...}}.
 *
 * Command handlers run on the main thread, one at a time.
 */
#ifndef BITBACK_QMP_H
#define BITBACK_QMP_H

#include <stdbool.h>
#include <json-c/json.h>
#include "util/error.h"

/* A command handler: args is the "arguments" object (never NULL; an empty
 * object when absent).  On success it returns a new reference to the
 * return value (an empty object for commands that return nothing); on
 * failure it returns NULL with errp set. */
typedef struct json_object *(*QmpCommandFunc)(struct json_object *args,
                                              Error **errp);

/* Register a command (at start-up, before the monitor runs). */
void qmp_register_command(const char *name, QmpCommandFunc fn);
/* Dispatch one request object; returns the reply object (new ref).  Used by
 * the monitor and by `transaction`-style callers and tests. */
struct json_object *qmp_dispatch(struct json_object *request);

/* Emit an event to every connected monitor that has finished capabilities
 * negotiation.  Takes ownership of data (may be NULL).  Thread-safe: jobs
 * and NBD threads may call it; delivery happens from the main loop. */
void qmp_event_emit(const char *name, struct json_object *data);

/* Listen on a UNIX socket path (from --chardev socket,path=...,server=on). */
bool qmp_monitor_add_unix(const char *path, Error **errp);
/* Run the main loop until quit is requested (by `quit` or a signal). */
void qmp_main_loop(void);
/* Ask the main loop to return (async-signal-safe). */
void qmp_request_quit(void);

#endif
