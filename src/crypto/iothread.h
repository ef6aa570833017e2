/*
 * iothread objects (qom-type "iothread", qapi/qom.json): QEMU's named
 * event-loop threads.  bitbackd serves each NBD connection from its own
 * worker threads (src/nbd), so an export never runs in one event loop;
 * an iothread is a real, idle thread with QEMU's properties, which
 * query-iothreads lists, exports may name (block-export-add's
 * `iothread`, an unknown id refused as in QEMU) and object-del refuses to
 * delete while an export names it (docs/qmp.md, "iothread").
 *
 * Threads: created, queried and deleted on the main thread.
 */
#ifndef BITBACK_CRYPTO_IOTHREAD_H
#define BITBACK_CRYPTO_IOTHREAD_H

#include <json-c/json.h>
#include "util/error.h"

/* query-iothreads: [{"id", "thread-id", "poll-max-ns", "poll-grow",
 * "poll-shrink", "aio-max-batch"}, ...] in creation order; a new
 * reference. */
struct json_object *iothread_query_all(void);
/* true when id names an iothread object; false with QEMU's error
 * ("iothread \"ID\" not found") otherwise. */
bool iothread_check(const char *id, Error **errp);

#endif
