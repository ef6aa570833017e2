/*
 * The Prometheus endpoint (metrics.h).
 *
 * libmicrohttpd answers on its internal thread.  The state it reports (the
 * graph, the bitmaps, the jobs) is changed only by the main thread, so a
 * scrape does not read it from the HTTP thread: it schedules
 * metrics_collect() on the main thread (main_loop_schedule), which runs
 * the same queries QMP runs and renders the text, and waits for it, at
 * most METRICS_WAIT_SEC.  A scrape and its scheduled call share a
 * MetricsScrape with two references, so whichever finishes last frees it,
 * and a scrape that gave up (timeout, shutdown) leaves nothing dangling.
 *
 * Metric names follow Prometheus' conventions: bitback_ prefix, base
 * units (bytes, seconds), _total on counters.
 */
#include <errno.h>
#include <microhttpd.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "nbd/server.h"
#include "qmp/metrics.h"
#include "qmp/qmp-internal.h"
#include "util/cleanup.h"
#include "util/keyval.h"
#include "util/log.h"
#include "util/main-loop.h"
#include "util/osdep.h"

#define METRICS_WAIT_SEC   10
#define METRICS_MAX_CONNECTIONS 16
#define METRICS_CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"

typedef struct MetricsScrape {
    int refs;                  /* metrics_lock */
    bool done;                 /* metrics_lock */
    char *text;                /* set with done; NULL: out of memory */
} MetricsScrape;

static struct MHD_Daemon *metrics_daemon;
static pthread_mutex_t metrics_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t metrics_cond = PTHREAD_COND_INITIALIZER;
static bool metrics_stopping;  /* metrics_lock */
static char *metrics_path;     /* the UNIX socket to remove at stop, or NULL */

/* ---- the text, written to an open_memstream ---- */

/* A label value, escaped as the text format wants (\\, \", \n). */
static void out_label(FILE *o, const char *name, const char *value, bool first)
{
    fprintf(o, "%s%s=\"", first ? "" : ",", name);
    for (const char *p = value ? value : ""; *p; p++) {
        if (*p == '\\' || *p == '"') {
            fputc('\\', o);
            fputc(*p, o);
        } else if (*p == '\n') {
            fputs("\\n", o);
        } else {
            fputc(*p, o);
        }
    }
    fputc('"', o);
}

static void out_family(FILE *o, const char *name, const char *type,
                       const char *help)
{
    fprintf(o, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static uint64_t member_u64(struct json_object *obj, const char *key)
{
    struct json_object *v;
    if (!json_object_object_get_ex(obj, key, &v)) {
        return 0;
    }
    return json_object_is_type(v, json_type_boolean)
        ? (uint64_t)json_object_get_boolean(v)
        : (uint64_t)json_object_get_uint64(v);
}

/* The per-node counters, from query-blockstats' BlockDeviceStats. */
static const struct {
    const char *key;           /* in BlockDeviceStats */
    const char *name;
    const char *type;
    const char *help;
    bool ns;                   /* nanoseconds, shown as seconds */
} node_metrics[] = {
    { "rd_bytes", "bitback_node_read_bytes_total", "counter",
      "Bytes read from the node", false },
    { "wr_bytes", "bitback_node_written_bytes_total", "counter",
      "Bytes written to the node (writes and write-zeroes)", false },
    { "unmap_bytes", "bitback_node_discarded_bytes_total", "counter",
      "Bytes discarded on the node", false },
    { "rd_operations", "bitback_node_read_operations_total", "counter",
      "Read requests completed", false },
    { "wr_operations", "bitback_node_write_operations_total", "counter",
      "Write and write-zeroes requests completed", false },
    { "flush_operations", "bitback_node_flush_operations_total", "counter",
      "Flush requests completed", false },
    { "unmap_operations", "bitback_node_discard_operations_total", "counter",
      "Discard requests completed", false },
    { "failed_rd_operations", "bitback_node_failed_read_operations_total",
      "counter", "Read requests that failed", false },
    { "failed_wr_operations", "bitback_node_failed_write_operations_total",
      "counter", "Write requests that failed", false },
    { "failed_flush_operations", "bitback_node_failed_flush_operations_total",
      "counter", "Flush requests that failed", false },
    { "failed_unmap_operations", "bitback_node_failed_discard_operations_total",
      "counter", "Discard requests that failed", false },
    { "invalid_rd_operations", "bitback_node_invalid_read_operations_total",
      "counter", "Read requests refused (out of range)", false },
    { "invalid_wr_operations", "bitback_node_invalid_write_operations_total",
      "counter", "Write requests refused (out of range, read-only)", false },
    { "invalid_unmap_operations",
      "bitback_node_invalid_discard_operations_total", "counter",
      "Discard requests refused (out of range, read-only)", false },
    { "rd_total_time_ns", "bitback_node_read_seconds_total", "counter",
      "Time spent in completed reads", true },
    { "wr_total_time_ns", "bitback_node_write_seconds_total", "counter",
      "Time spent in completed writes", true },
    { "flush_total_time_ns", "bitback_node_flush_seconds_total", "counter",
      "Time spent in completed flushes", true },
    { "unmap_total_time_ns", "bitback_node_discard_seconds_total", "counter",
      "Time spent in completed discards", true },
    { "wr_highest_offset", "bitback_node_write_highest_offset_bytes", "gauge",
      "End of the highest write to the node", false },
};

static void render_nodes(FILE *o)
{
    _cleanup_json_ struct json_object *args = json_object_new_object();
    json_object_object_add(args, "query-nodes", json_object_new_boolean(true));
    _cleanup_json_ struct json_object *stats =
        qmp_execute("query-blockstats", args, false, NULL);
    size_t n = stats ? json_object_array_length(stats) : 0;
    for (size_t m = 0; m < ARRAY_SIZE(node_metrics); m++) {
        out_family(o, node_metrics[m].name, node_metrics[m].type,
                   node_metrics[m].help);
        for (size_t i = 0; i < n; i++) {
            struct json_object *e = json_object_array_get_idx(stats, i), *s;
            if (!json_object_object_get_ex(e, "stats", &s)) {
                continue;
            }
            uint64_t v = member_u64(s, node_metrics[m].key);
            fprintf(o, "%s{", node_metrics[m].name);
            out_label(o, "node", json_opt_str(e, "node-name"), true);
            if (node_metrics[m].ns) {
                fprintf(o, "} %.9f\n", v / 1e9);
            } else {
                fprintf(o, "} %llu\n", (unsigned long long)v);
            }
        }
    }
}

static void render_exports(FILE *o)
{
    _cleanup_json_ struct json_object *exps = nbd_export_usage();
    size_t n = json_object_array_length(exps);
    out_family(o, "bitback_export_clients", "gauge",
               "NBD connections using the export");
    for (size_t i = 0; i < n; i++) {
        struct json_object *e = json_object_array_get_idx(exps, i);
        fprintf(o, "bitback_export_clients{");
        out_label(o, "export", json_opt_str(e, "id"), true);
        out_label(o, "name", json_opt_str(e, "name"), false);
        out_label(o, "node", json_opt_str(e, "node-name"), false);
        out_label(o, "writable", json_opt_bool(e, "writable", false) ?
                  "true" : "false", false);
        fprintf(o, "} %llu\n",
                   (unsigned long long)member_u64(e, "clients"));
    }
}

/* Bitmaps and write-intent logs, from query-named-block-nodes. */
static void render_bitmaps(FILE *o)
{
    static const struct {
        const char *key;
        const char *name;
        const char *help;
    } bm_metrics[] = {
        { "count", "bitback_dirty_bitmap_dirty_bytes",
          "Bytes the dirty bitmap marks as changed" },
        { "granularity", "bitback_dirty_bitmap_granularity_bytes",
          "Bytes each bit of the bitmap covers" },
        { "persistent", "bitback_dirty_bitmap_persistent",
          "1 when the bitmap is stored in the image" },
        { "recording", "bitback_dirty_bitmap_recording",
          "1 when the bitmap records writes" },
        { "inconsistent", "bitback_dirty_bitmap_inconsistent",
          "1 when the bitmap could not be loaded as consistent" },
    };
    _cleanup_json_ struct json_object *args = json_object_new_object();
    _cleanup_json_ struct json_object *nodes =
        qmp_execute("query-named-block-nodes", args, false, NULL);
    size_t n = nodes ? json_object_array_length(nodes) : 0;
    for (size_t m = 0; m < ARRAY_SIZE(bm_metrics); m++) {
        out_family(o, bm_metrics[m].name, "gauge", bm_metrics[m].help);
        for (size_t i = 0; i < n; i++) {
            struct json_object *node = json_object_array_get_idx(nodes, i);
            struct json_object *bms;
            if (!json_object_object_get_ex(node, "dirty-bitmaps", &bms)) {
                continue;
            }
            for (size_t j = 0; j < json_object_array_length(bms); j++) {
                struct json_object *bm = json_object_array_get_idx(bms, j);
                fprintf(o, "%s{", bm_metrics[m].name);
                out_label(o, "node", json_opt_str(node, "node-name"), true);
                out_label(o, "bitmap", json_opt_str(bm, "name"), false);
                fprintf(o, "} %llu\n", (unsigned long long)
                           member_u64(bm, bm_metrics[m].key));
            }
        }
    }
    out_family(o, "bitback_write_intent_syncs_total", "counter",
               "Syncs of the node's write-intent log map (crash-safe "
               "bitmaps)");
    for (size_t i = 0; i < n; i++) {
        struct json_object *node = json_object_array_get_idx(nodes, i), *cs;
        if (json_object_object_get_ex(node, "crash-safe", &cs)) {
            fprintf(o, "bitback_write_intent_syncs_total{");
            out_label(o, "node", json_opt_str(node, "node-name"), true);
            fprintf(o, "} %llu\n",
                       (unsigned long long)member_u64(cs, "intent-syncs"));
        }
    }
}

static void render_jobs(FILE *o)
{
    _cleanup_json_ struct json_object *args = json_object_new_object();
    _cleanup_json_ struct json_object *jobs =
        qmp_execute("query-jobs", args, false, NULL);
    size_t n = jobs ? json_object_array_length(jobs) : 0;
    static const struct {
        const char *key;
        const char *name;
        const char *help;
    } job_metrics[] = {
        { "current-progress", "bitback_job_progress_current",
          "Work the job has done (its own unit, bytes for backups)" },
        { "total-progress", "bitback_job_progress_total",
          "Work the job expects to do in all" },
    };
    for (size_t m = 0; m < ARRAY_SIZE(job_metrics); m++) {
        out_family(o, job_metrics[m].name, "gauge", job_metrics[m].help);
        for (size_t i = 0; i < n; i++) {
            struct json_object *j = json_object_array_get_idx(jobs, i);
            fprintf(o, "%s{", job_metrics[m].name);
            out_label(o, "id", json_opt_str(j, "id"), true);
            out_label(o, "type", json_opt_str(j, "type"), false);
            fprintf(o, "} %llu\n", (unsigned long long)
                       member_u64(j, job_metrics[m].key));
        }
    }
    out_family(o, "bitback_job_status", "gauge",
               "1 for the job's current status (QEMU's JobStatus)");
    for (size_t i = 0; i < n; i++) {
        struct json_object *j = json_object_array_get_idx(jobs, i);
        fprintf(o, "bitback_job_status{");
        out_label(o, "id", json_opt_str(j, "id"), true);
        out_label(o, "type", json_opt_str(j, "type"), false);
        out_label(o, "status", json_opt_str(j, "status"), false);
        fprintf(o, "} 1\n");
    }
}

char *metrics_render(void)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *o = open_memstream(&buf, &len);
    if (!o) {
        return NULL;
    }
    render_nodes(o);
    render_exports(o);
    render_bitmaps(o);
    render_jobs(o);
    bool failed = ferror(o);
    if (fclose(o) != 0 || failed) {
        free(buf);
        return NULL;
    }
    return buf;
}

/* ---- serving ---- */

static void scrape_unref_locked(MetricsScrape *s)
{
    if (--s->refs == 0) {
        free(s->text);
        free(s);
    }
}

/* On the main thread: render for a waiting scrape. */
static void metrics_collect(void *opaque)
{
    MetricsScrape *s = opaque;
    char *text = metrics_render();
    LOCK_GUARD(&metrics_lock);
    s->text = text;
    s->done = true;
    pthread_cond_broadcast(&metrics_cond);
    scrape_unref_locked(s);
}

static enum MHD_Result reply(struct MHD_Connection *conn, unsigned status,
                             const char *text, bool own)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(
        strlen(text), (void *)text,
        own ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_PERSISTENT);
    if (!r) {
        if (own) {
            free((void *)text);
        }
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE,
                            status == MHD_HTTP_OK ? METRICS_CONTENT_TYPE
                                                  : "text/plain");
    if (status == MHD_HTTP_METHOD_NOT_ALLOWED) {
        MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, "GET, HEAD");
    }
    enum MHD_Result ret = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return ret;
}

/* The metrics text from the main thread, or NULL (timeout, shutdown,
 * out of memory). */
static char *scrape(void)
{
    MetricsScrape *s = calloc(1, sizeof(*s));
    if (!s) {
        return NULL;
    }
    s->refs = 2;
    main_loop_schedule(metrics_collect, s);       /* wakes the main loop */
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += METRICS_WAIT_SEC;
    LOCK_GUARD(&metrics_lock);
    while (!s->done && !metrics_stopping) {
        if (pthread_cond_timedwait(&metrics_cond, &metrics_lock,
                                   &deadline) == ETIMEDOUT) {
            break;
        }
    }
    char *text = s->done ? steal_pointer(&s->text) : NULL;
    scrape_unref_locked(s);
    return text;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn,
                                  const char *url, const char *method,
                                  const char *version, const char *data,
                                  size_t *data_size, void **state)
{
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        return reply(conn, MHD_HTTP_METHOD_NOT_ALLOWED,
                     "only GET is allowed\n", false);
    }
    if (*data_size) {
        return MHD_NO;             /* a GET with a body */
    }
    if (strcmp(url, "/metrics") != 0) {
        return reply(conn, MHD_HTTP_NOT_FOUND, "not found: try /metrics\n",
                     false);
    }
    char *text = scrape();
    if (!text) {
        return reply(conn, MHD_HTTP_SERVICE_UNAVAILABLE,
                     "the daemon did not answer in time\n", false);
    }
    return reply(conn, MHD_HTTP_OK, text, true);
}

/* Where to listen, from the options: a TCP host and port, or a UNIX
 * socket path (the others NULL); new strings. */
typedef struct MetricsAddr {
    char *host, *port, *path;
} MetricsAddr;

static void metrics_addr_clear(MetricsAddr *a)
{
    free(a->host);
    free(a->port);
    free(a->path);
}

/* A member of addr that must be a string, as a new string. */
static bool addr_member(struct json_object *addr, const char *key,
                        char **ret, Error **errp)
{
    struct json_object *v;
    if (!json_object_object_get_ex(addr, key, &v)) {
        error_setg(errp, "Parameter 'addr.%s' is missing", key);
        return false;
    }
    if (!json_object_is_type(v, json_type_string) &&
        !json_object_is_type(v, json_type_int)) {
        error_setg(errp, "Invalid parameter type for 'addr.%s', expected: "
                   "string", key);
        return false;
    }
    *ret = strdup(json_object_get_string(v));
    if (!*ret) {
        abort();
    }
    return true;
}

static bool metrics_parse_addr(const char *arg, MetricsAddr *a, Error **errp)
{
    _cleanup_json_ struct json_object *o = keyval_parse_or_json(arg, NULL, errp);
    if (!o) {
        return false;
    }
    struct json_object *addr = NULL;
    json_object_object_foreach(o, key, val) {
        if (strcmp(key, "addr") != 0) {
            error_setg(errp, "Parameter '%s' is unexpected", key);
            return false;
        }
        addr = val;
    }
    if (!addr) {
        error_setg(errp, "Parameter 'addr' is missing (addr=HOST:PORT)");
        return false;
    }
    if (json_object_is_type(addr, json_type_string)) {
        return inet_parse_host_port(json_object_get_string(addr), &a->host,
                                    &a->port, errp);
    }
    if (!json_object_is_type(addr, json_type_object)) {
        error_setg(errp, "'addr' must be HOST:PORT or an address object");
        return false;
    }
    const char *type = json_opt_str(addr, "type");
    static const char *const inet_keys[] = { "type", "host", "port", NULL };
    static const char *const unix_keys[] = { "type", "path", NULL };
    const char *const *keys;
    if (type && strcmp(type, "inet") == 0) {
        keys = inet_keys;
    } else if (type && strcmp(type, "unix") == 0) {
        keys = unix_keys;
    } else {
        error_setg(errp, "addr.type must be 'inet' or 'unix'");
        return false;
    }
    json_object_object_foreach(addr, k, v) {
        (void)v;
        size_t i = 0;
        while (keys[i] && strcmp(keys[i], k) != 0) {
            i++;
        }
        if (!keys[i]) {
            error_setg(errp, "Parameter 'addr.%s' is unexpected", k);
            return false;
        }
    }
    if (keys == unix_keys) {
        return addr_member(addr, "path", &a->path, errp);
    }
    return addr_member(addr, "host", &a->host, errp) &&
           addr_member(addr, "port", &a->port, errp);
}

bool metrics_start(const char *opts, Error **errp)
{
    _cleanup_(metrics_addr_clear) MetricsAddr a = { 0 };
    if (metrics_daemon) {
        error_setg(errp, "the metrics endpoint is already running");
        return false;
    }
    if (!metrics_parse_addr(opts, &a, errp)) {
        return false;
    }
    int fd = a.path ? unix_listen(a.path, errp)
                    : inet_listen(a.host, a.port, 0, errp);
    if (fd < 0) {
        return false;
    }
    metrics_stopping = false;
    metrics_daemon = MHD_start_daemon(
        MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG, 0, NULL, NULL,
        on_request, NULL,
        MHD_OPTION_LISTEN_SOCKET, fd,
        MHD_OPTION_CONNECTION_LIMIT, (unsigned)METRICS_MAX_CONNECTIONS,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)(METRICS_WAIT_SEC + 5),
        MHD_OPTION_END);
    if (!metrics_daemon) {
        close(fd);
        if (a.path) {
            unlink(a.path);
        }
        error_setg(errp, "cannot start the HTTP server for metrics");
        return false;
    }
    metrics_path = steal_pointer(&a.path);
    if (metrics_path) {
        log_msg(LOG_LEVEL_INFO, "metrics served on unix:%s, path /metrics",
                metrics_path);
    } else {
        log_msg(LOG_LEVEL_INFO, "metrics served on http://%s:%s/metrics%s",
                *a.host ? a.host : "*", a.port,
                inet_host_is_loopback(a.host) ? "" : " (not only loopback: "
                "anyone who reaches it reads them)");
    }
    return true;
}

void metrics_stop(void)
{
    if (!metrics_daemon) {
        return;
    }
    {
        LOCK_GUARD(&metrics_lock);
        metrics_stopping = true;
        pthread_cond_broadcast(&metrics_cond);
    }
    MHD_stop_daemon(metrics_daemon);     /* closes the listening socket */
    metrics_daemon = NULL;
    if (metrics_path) {
        unlink(metrics_path);
        free(metrics_path);
        metrics_path = NULL;
    }
    /* Collections scheduled for scrapes that gave up hold the last
     * reference of their scrape. */
    main_loop_run_pending();
}
