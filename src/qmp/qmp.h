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
#include <stdint.h>
#include <json-c/json.h>
#include "util/error.h"
#include "util/json-opts.h"

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
 * negotiation.  Takes ownership of data (may be NULL).  Thread-safe;
 * delivery happens from the main loop.  The first monitor registers it as
 * the event sink (util/main-loop.h), so lower layers' event_emit() reaches
 * it. */
void qmp_event_emit(const char *name, struct json_object *data);

/* Listen on a UNIX socket path (from --chardev socket,path=...,server=on). */
bool qmp_monitor_add_unix(const char *path, Error **errp);
/* Listen on TCP host:port (--chardev socket,host=H,port=P,server=on).
 * tls_creds (may be NULL): the id of a tls-creds object with
 * endpoint=server; every client must then do TLS from its first byte, and
 * with tls_authz (an authz object's id) only the identities it allows
 * are served.  Without TLS on an address that is not loopback a warning
 * goes to stderr.  false with errp set. */
bool qmp_monitor_add_inet(const char *host, const char *port,
                          const char *tls_creds, const char *tls_authz,
                          Error **errp);
/* Serve QMP on a listening socket the daemon was given (--chardev
 * socket,fd=STR,server=on): STR is an fd number or an activation name
 * (util/listen-fds.h).  TLS as qmp_monitor_add_inet.  false with errp
 * set, for a name or number that is not a listening stream socket too. */
bool qmp_monitor_add_fd(const char *str, const char *tls_creds,
                        const char *tls_authz, Error **errp);
/* Run the main loop until quit is requested (by `quit` or a signal). */
void qmp_main_loop(void);
/* Ask the main loop to return (async-signal-safe). */
void qmp_request_quit(void);

/* ---- Argument schemas, shared by QMP and the daemon's command line ---- */

/* A command's arguments are a member spec (util/json-opts.h): an array of
 * {name, type, optional} ended by {NULL}. */
typedef JsonOptType QmpArgType;
#define QMP_ARG_STR JSON_OPT_STR
#define QMP_ARG_BOOL JSON_OPT_BOOL
#define QMP_ARG_INT JSON_OPT_INT          /* int64 */
#define QMP_ARG_UINT JSON_OPT_UINT        /* uint64 (non-negative) */
#define QMP_ARG_OBJECT JSON_OPT_OBJECT
#define QMP_ARG_ARRAY JSON_OPT_ARRAY
#define QMP_ARG_ANY JSON_OPT_ANY
typedef JsonOptSpec QmpArgSpec;

/* Register a command whose arguments are checked against spec before fn
 * runs: missing, unexpected and mistyped members get QEMU's GenericError
 * messages ("Parameter 'x' is missing", ...).  spec NULL = no check. */
void qmp_register_command_spec(const char *name, QmpCommandFunc fn,
                               const QmpArgSpec *spec);
/* A check of a union's discriminator (QAPI checks `type` before the members
 * that depend on it), run before spec's checks: returns false with errp set
 * for a value the command does not take. */
typedef bool (*QmpArgPrecheck)(struct json_object *args, Error **errp);
/* As qmp_register_command_spec, with a precheck run first. */
void qmp_register_command_checked(const char *name, QmpCommandFunc fn,
                                  const QmpArgSpec *spec,
                                  QmpArgPrecheck precheck);
bool qmp_check_args(struct json_object *args, const QmpArgSpec *spec,
                    Error **errp);
/* Command-line (keyval) values are strings: convert members that spec says
 * are bool/int in place ("on" -> true, "10" -> 10). */
bool qmp_coerce_keyval_args(struct json_object *args, const QmpArgSpec *spec,
                            Error **errp);
/* Run a registered command directly (the daemon's --blockdev/--export...).
 * from_keyval: coerce string arguments first.  Returns the new return value
 * or NULL with errp set (CommandNotFound for an unknown name). */
struct json_object *qmp_execute(const char *name, struct json_object *args,
                                bool from_keyval, Error **errp);
/* Register every command of src/qmp (control, block, bitmap, export). */
void qmp_init_commands(void);
/* True once quit was requested. */
bool qmp_quit_requested(void);
/* Serve one connected socket (owned from here on) as a monitor client on
 * the calling (main) thread: greeting, capabilities negotiation, commands,
 * with the same framing and limits as an accepted client, running the main
 * loop (and every other client and listener) until this client is gone --
 * EOF, an error, a backlog over the limit -- or quit was requested. */
void qmp_monitor_serve_fd(int fd);

/* Close every monitor socket and client, unlink the socket paths. */
void qmp_monitor_cleanup(void);

/* Argument getters for handlers whose args were checked by a spec are
 * json_opt_str, json_opt_bool and json_opt_int (util/json-opts.h). */
bool qmp_arg_has(struct json_object *args, const char *name);

#endif
