/*
 * QMP NBD and export commands (qapi/block-export.json): nbd-server-start,
 * nbd-server-stop, block-export-add, block-export-del, query-block-exports
 * and the older nbd-server-add / nbd-server-remove.
 *
 * These only translate arguments: the NBD server itself is src/nbd/,
 * behind src/nbd/server.h.  nbd-server-start takes QEMU's SocketAddressLegacy
 * ({"type":"unix","data":{"path":...}}) as well as the flat SocketAddress
 * ({"type":"unix","path":...}) that --nbd-server uses; both become the flat
 * form for nbd_server_start().
 */
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "crypto/iothread.h"
#include "nbd/server.h"
#include "qmp/qmp-internal.h"
#include "util/cleanup.h"

/* NBD limits an export name to 4096 bytes (doc/proto.md). */
#define QMP_NBD_MAX_NAME 4096
#define QMP_EXPORT_MAX_BITMAPS 1024

/* Exports that name an iothread: export id -> iothread id.  An entry
 * whose export is gone is dropped by iothread_exports_reap (an export
 * goes away in src/nbd, possibly later than block-export-del); a new
 * export with that id replaces it. */
static struct json_object *iothread_exports;

static void iothread_exports_reap(void)
{
    if (!iothread_exports) {
        iothread_exports = json_object_new_object();
    }
    size_t n = (size_t)json_object_object_length(iothread_exports), k = 0;
    _cleanup_free_ char **gone = calloc(n ? n : 1, sizeof(*gone));
    if (!gone) {
        abort();
    }
    json_object_object_foreach(iothread_exports, key, val) {
        (void)val;
        if (!nbd_export_find(key)) {
            gone[k++] = key;
        }
    }
    for (size_t i = 0; i < k; i++) {
        json_object_object_del(iothread_exports, gone[i]);
    }
}

bool qmp_iothread_in_use(const char *id, Error **errp)
{
    iothread_exports_reap();
    json_object_object_foreach(iothread_exports, key, val) {
        if (strcmp(json_object_get_string(val), id) == 0) {
            error_setg(errp, "iothread '%s' is in use by export '%s'", id, key);
            return true;
        }
    }
    return false;
}

/* Copy the string member `key` of src into dst; missing -> error. */
static bool qmp_addr_copy_str(struct json_object *dst, struct json_object *src,
                              const char *key, bool allow_int, Error **errp)
{
    struct json_object *v;
    if (!json_object_object_get_ex(src, key, &v)) {
        error_setg(errp, "Parameter 'addr.%s' is missing", key);
        return false;
    }
    if (json_object_is_type(v, json_type_int) && allow_int) {
        char buf[32];
        snprintf(buf, sizeof(buf), "%" PRId64, json_object_get_int64(v));
        json_object_object_add(dst, key, json_object_new_string(buf));
        return true;
    }
    if (!json_object_is_type(v, json_type_string)) {
        error_setg(errp, "Invalid parameter type for 'addr.%s', expected: string",
                   key);
        return false;
    }
    json_object_object_add(dst, key, json_object_get(v));
    return true;
}

/* SocketAddressLegacy or SocketAddress -> a new flat SocketAddress. */
static struct json_object *qmp_socket_address(struct json_object *addr,
                                              Error **errp)
{
    struct json_object *jtype, *data;
    if (!json_object_object_get_ex(addr, "type", &jtype)) {
        error_setg(errp, "Parameter 'addr.type' is missing");
        return NULL;
    }
    if (!json_object_is_type(jtype, json_type_string)) {
        error_setg(errp, "Invalid parameter type for 'addr.type', expected: string");
        return NULL;
    }
    const char *type = json_object_get_string(jtype);
    struct json_object *src = addr;
    if (json_object_object_get_ex(addr, "data", &data)) {
        if (!json_object_is_type(data, json_type_object)) {
            error_setg(errp,
                       "Invalid parameter type for 'addr.data', expected: object");
            return NULL;
        }
        src = data;
    }
    _cleanup_json_ struct json_object *flat = json_object_new_object();
    json_object_object_add(flat, "type", json_object_new_string(type));
    if (strcmp(type, "unix") == 0) {
        if (!qmp_addr_copy_str(flat, src, "path", false, errp)) {
            return NULL;
        }
    } else if (strcmp(type, "inet") == 0) {
        if (!qmp_addr_copy_str(flat, src, "host", false, errp) ||
            !qmp_addr_copy_str(flat, src, "port", true, errp)) {
            return NULL;
        }
    } else if (strcmp(type, "fd") == 0) {
        if (!qmp_addr_copy_str(flat, src, "str", true, errp)) {
            return NULL;
        }
    } else {
        error_setg(errp, "Socket address type '%s' is not supported "
                   "(use 'unix', 'inet' or 'fd')", type);
        return NULL;
    }
    return steal_pointer(&flat);
}

static struct json_object *qmp_cmd_nbd_server_start(struct json_object *args,
                                                    Error **errp)
{
    struct json_object *addr;
    if (nbd_server_is_running()) {
        error_setg(errp, "NBD server already running");
        return NULL;
    }
    int64_t maxc = json_opt_int(args, "max-connections",
                                NBD_DEFAULT_MAX_CONNECTIONS);
    if (maxc > UINT_MAX) {
        error_setg(errp, "Parameter 'max-connections' is too large");
        return NULL;
    }
    int64_t hs = json_opt_int(args, "handshake-max-seconds",
                              NBD_DEFAULT_HANDSHAKE_MAX_SECONDS);
    if (hs > UINT32_MAX) {
        error_setg(errp, "Parameter 'handshake-max-seconds' is too large");
        return NULL;
    }
    json_object_object_get_ex(args, "addr", &addr);
    _cleanup_json_ struct json_object *flat = qmp_socket_address(addr, errp);
    if (!flat || !nbd_server_start_tls(flat, (unsigned)maxc, (unsigned)hs,
                                       json_opt_str(args, "tls-creds"),
                                       json_opt_str(args, "tls-authz"), errp)) {
        return NULL;
    }
    return json_object_new_object();
}

static struct json_object *qmp_cmd_nbd_server_stop(struct json_object *args,
                                                   Error **errp)
{
    if (!nbd_server_is_running()) {
        error_setg(errp, "NBD server not running");
        return NULL;
    }
    /* Each export's BLOCK_EXPORT_DELETED comes from src/nbd as it goes. */
    nbd_server_stop();
    return json_object_new_object();
}

/* block-export-add's discriminator, checked before the members that
 * depend on it: a fuse export's `mountpoint` must not hide that fuse
 * exports are not supported. */
static bool qmp_export_check_type(struct json_object *args, Error **errp)
{
    struct json_object *jt;
    if (!json_object_object_get_ex(args, "type", &jt) ||
        !json_object_is_type(jt, json_type_string)) {
        return true;     /* missing or mistyped: the spec check says so */
    }
    const char *type = json_object_get_string(jt);
    if (strcmp(type, "nbd") == 0) {
        return true;
    }
    if (strcmp(type, "fuse") == 0 || strcmp(type, "vhost-user-blk") == 0 ||
        strcmp(type, "vduse-blk") == 0) {
        error_setg(errp, "Export type '%s' is not supported (only 'nbd')",
                   type);
    } else {
        error_setg(errp, "Parameter 'type' does not accept value '%s'", type);
    }
    return false;
}

struct json_object *qmp_export_add(struct json_object *args,
                                   bool require_server, Error **errp)
{
    const char *id = json_opt_str(args, "id");
    const char *node = json_opt_str(args, "node-name");
    const char *name = json_opt_str(args, "name");
    struct json_object *list = NULL;

    if (!qmp_export_check_type(args, errp)) {
        return NULL;
    }
    if (json_opt_bool(args, "allocation-depth", false)) {
        error_setg(errp, "allocation-depth is not supported");
        return NULL;
    }
    /* As QEMU: fixed-iothread matters only with an iothread, and the
     * iothread must exist; the export's requests run in the NBD server's
     * own threads either way (docs/qmp.md, "iothread"). */
    const char *iothread = json_opt_str(args, "iothread");
    if (iothread && !iothread_check(iothread, errp)) {
        return NULL;
    }
    if (require_server && !nbd_server_is_running()) {
        error_setg(errp, "NBD server not running");
        return NULL;
    }
    if (nbd_export_find(id)) {
        error_setg(errp, "Block export id '%s' is already in use", id);
        return NULL;
    }
    if (!name) {
        name = node;
    }
    if (strlen(name) > QMP_NBD_MAX_NAME) {
        error_setg(errp, "export name '%.64s...' too long", name);
        return NULL;
    }
    if (nbd_export_find_by_name(name)) {
        error_setg(errp, "NBD server already has export named '%s'", name);
        return NULL;
    }
    BlockDriverState *bs = qmp_lookup_node(node, errp);
    if (!bs) {
        return NULL;
    }
    size_t n = 0;
    if (json_object_object_get_ex(args, "bitmaps", &list)) {
        n = json_object_array_length(list);
    }
    if (n > QMP_EXPORT_MAX_BITMAPS) {
        error_setg(errp, "Too many bitmaps (at most %d)", QMP_EXPORT_MAX_BITMAPS);
        return NULL;
    }
    _cleanup_free_ const char **names = calloc(n + 1, sizeof(*names));
    if (!names) {
        abort();
    }
    for (size_t i = 0; i < n; i++) {
        struct json_object *e = json_object_array_get_idx(list, i), *jn;
        if (json_object_is_type(e, json_type_string)) {
            names[i] = json_object_get_string(e);
        } else if (json_object_is_type(e, json_type_object) &&
                   json_object_object_get_ex(e, "name", &jn) &&
                   json_object_is_type(jn, json_type_string)) {
            names[i] = json_object_get_string(jn);
        } else {
            error_setg(errp, "Invalid parameter type for 'bitmaps[%zu]', "
                       "expected: string or {\"node\", \"name\"}", i);
            return NULL;
        }
    }
    if (!nbd_export_add(id, bs, name, json_opt_str(args, "description"),
                        json_opt_bool(args, "writable", false),
                        (const char *const *)names, (int)n, errp)) {
        return NULL;
    }
    iothread_exports_reap();
    if (iothread) {
        json_object_object_add(iothread_exports, id,
                               json_object_new_string(iothread));
    } else {
        json_object_object_del(iothread_exports, id);
    }
    return json_object_new_object();
}

static struct json_object *qmp_cmd_block_export_add(struct json_object *args,
                                                    Error **errp)
{
    return qmp_export_add(args, true, errp);
}

/* mode "safe" (default) or "hard" -> *ret_force. */
static bool qmp_export_mode(struct json_object *args, bool *ret_force,
                            Error **errp)
{
    const char *mode = json_opt_str(args, "mode");
    *ret_force = false;
    if (!mode || strcmp(mode, "safe") == 0) {
        return true;
    }
    if (strcmp(mode, "hard") == 0) {
        *ret_force = true;
        return true;
    }
    error_setg(errp, "Parameter 'mode' does not accept value '%s'", mode);
    return false;
}

static struct json_object *qmp_export_del(const char *id,
                                          struct json_object *args,
                                          Error **errp)
{
    bool force;
    if (!qmp_export_mode(args, &force, errp)) {
        return NULL;
    }
    /* BLOCK_EXPORT_DELETED comes from src/nbd, now or once the last
     * client of a hard-deleted export has gone. */
    if (!nbd_export_del(id, force, errp)) {
        return NULL;
    }
    return json_object_new_object();
}

static struct json_object *qmp_cmd_block_export_del(struct json_object *args,
                                                    Error **errp)
{
    return qmp_export_del(json_opt_str(args, "id"), args, errp);
}

static struct json_object *qmp_cmd_query_block_exports(struct json_object *args,
                                                       Error **errp)
{
    return nbd_export_query();
}

static struct json_object *qmp_cmd_nbd_server_add(struct json_object *args,
                                                  Error **errp)
{
    const char *device = json_opt_str(args, "device");
    const char *name = json_opt_str(args, "name");
    const char *bitmap = json_opt_str(args, "bitmap");
    const char *desc = json_opt_str(args, "description");
    _cleanup_json_ struct json_object *eargs = json_object_new_object();

    if (!name) {
        name = device;
    }
    json_object_object_add(eargs, "type", json_object_new_string("nbd"));
    json_object_object_add(eargs, "id", json_object_new_string(name));
    json_object_object_add(eargs, "node-name", json_object_new_string(device));
    json_object_object_add(eargs, "name", json_object_new_string(name));
    if (desc) {
        json_object_object_add(eargs, "description", json_object_new_string(desc));
    }
    json_object_object_add(eargs, "writable", json_object_new_boolean(
                               json_opt_bool(args, "writable", false)));
    if (bitmap) {
        struct json_object *arr = json_object_new_array();
        json_object_array_add(arr, json_object_new_string(bitmap));
        json_object_object_add(eargs, "bitmaps", arr);
    }
    return qmp_export_add(eargs, true, errp);
}

static struct json_object *qmp_cmd_nbd_server_remove(struct json_object *args,
                                                     Error **errp)
{
    /* QEMU looks nbd-server-remove's name up as the NBD export name, which
     * differs from the id for exports made by block-export-add. */
    const char *name = json_opt_str(args, "name");
    NBDExport *exp = nbd_export_find_by_name(name);
    return qmp_export_del(exp ? nbd_export_id(exp) : name, args, errp);
}

static const QmpArgSpec spec_nbd_server_start[] = {
    { "addr", QMP_ARG_OBJECT, false },
    { "tls-creds", QMP_ARG_STR, true },
    { "tls-authz", QMP_ARG_STR, true },
    { "max-connections", QMP_ARG_UINT, true },
    { "handshake-max-seconds", QMP_ARG_UINT, true },
    { NULL },
};
/* block-export-add's arguments: QEMU's BlockExportOptions, a union on
 * "type" whose one case here is nbd. */
static const QmpArgSpec export_add_common[] = {
    { "type", QMP_ARG_STR, false },
    { "id", QMP_ARG_STR, false },
    { "node-name", QMP_ARG_STR, false },
    { "writable", QMP_ARG_BOOL, true },
    { "writethrough", QMP_ARG_BOOL, true },
    { "fixed-iothread", QMP_ARG_BOOL, true },
    { "iothread", QMP_ARG_STR, true },
    { NULL },
};
static const QmpArgSpec export_add_nbd[] = {
    { "name", QMP_ARG_STR, true },
    { "description", QMP_ARG_STR, true },
    { "bitmaps", QMP_ARG_ARRAY, true },
    { "allocation-depth", QMP_ARG_BOOL, true },
    { NULL },
};
static const QmpArgSpec *export_add_variant(size_t i, const char **ret_name)
{
    if (i > 0) {
        return NULL;
    }
    *ret_name = "nbd";
    return export_add_nbd;
}
static const QmpUnion union_block_export_add = {
    .common = export_add_common,
    .tag = "type",
    .variant = export_add_variant,
};
static const QmpArgSpec spec_block_export_del[] = {
    { "id", QMP_ARG_STR, false },
    { "mode", QMP_ARG_STR, true },
    { NULL },
};
static const QmpArgSpec spec_nbd_server_add[] = {
    { "device", QMP_ARG_STR, false },
    { "name", QMP_ARG_STR, true },
    { "description", QMP_ARG_STR, true },
    { "writable", QMP_ARG_BOOL, true },
    { "bitmap", QMP_ARG_STR, true },
    { NULL },
};
static const QmpArgSpec spec_nbd_server_remove[] = {
    { "name", QMP_ARG_STR, false },
    { "mode", QMP_ARG_STR, true },
    { NULL },
};

void qmp_register_export_commands(void)
{
    qmp_register_command_spec("nbd-server-start", qmp_cmd_nbd_server_start,
                              spec_nbd_server_start);
    qmp_register_command_spec("nbd-server-stop", qmp_cmd_nbd_server_stop,
                              qmp_spec_none);
    qmp_register_command_union("block-export-add", qmp_cmd_block_export_add,
                               &union_block_export_add, qmp_export_check_type);
    qmp_register_command_spec("block-export-del", qmp_cmd_block_export_del,
                              spec_block_export_del);
    qmp_register_command_spec("query-block-exports",
                              qmp_cmd_query_block_exports, qmp_spec_none);
    qmp_register_command_spec("nbd-server-add", qmp_cmd_nbd_server_add,
                              spec_nbd_server_add);
    qmp_register_command_spec("nbd-server-remove", qmp_cmd_nbd_server_remove,
                              spec_nbd_server_remove);
}
