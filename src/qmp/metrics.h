/*
 * bitbackd's Prometheus endpoint: GET /metrics over HTTP (libmicrohttpd,
 * on its own thread), in the text exposition format 0.0.4.  The numbers
 * are those of the QMP queries (query-blockstats, query-named-block-nodes,
 * query-jobs) and of the NBD exports, collected on the main thread.
 */
#ifndef BITBACK_METRICS_H
#define BITBACK_METRICS_H

#include <stdbool.h>

#include "util/error.h"

/* Start serving, as --metrics OPTS gives: addr=HOST:PORT,
 * addr.type=inet,addr.host=HOST,addr.port=PORT or
 * addr.type=unix,addr.path=PATH (keyval or JSON).  Any address is
 * allowed; off loopback, anyone who reaches it reads the metrics.  false with errp set (bad options, address in use, already
 * started).  Main thread. */
bool metrics_start(const char *opts, Error **errp);
/* Stop serving (no-op when not started): scrapes waiting for the main
 * thread get 503, then the server thread is joined.  Main thread, after
 * the main loop returned. */
void metrics_stop(void);
/* The exposition text, built now (main thread); free() it. */
char *metrics_render(void);

#endif
