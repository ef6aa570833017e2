/*
 * NBD server exports: the registry of named exports of block nodes, and
 * the dirty bitmaps each one serves as qemu:dirty-bitmap:NAME.
 *
 * The list lives in nbd_srv.exports under nbd_srv.lock.  An export is
 * found by id (QMP) or by name (clients; the empty name is the first
 * export).  A client pins the export it negotiates (nbd_export_pin counts
 * it in nclients and records it in c->exp) and the export is freed only
 * once nclients is 0 (invariant 4 in nbd-internal.h).  nbd_export_del
 * never waits for a client: it frees an unused export at once; a hard
 * delete of a used one marks it shutting down (hidden from new clients,
 * still listed by query-block-exports and still holding its node), cuts
 * every pinning client off, and returns; the last client to leave has the
 * main thread free it and emit BLOCK_EXPORT_DELETED.  An exported bitmap
 * is marked busy until the export is freed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "nbd/nbd-internal.h"
#include "util/cleanup.h"
#include "util/main-loop.h"

/* The export whose id is id, shutting down or not (as QEMU, an id stays
 * taken until its export is freed), or NULL (nbd_srv.lock held). */
static NBDExport *export_find_id_locked(const char *id)
{
    for (NBDExport *e = nbd_srv.exports; e; e = e->next) {
        if (strcmp(e->id, id) == 0) {
            return e;
        }
    }
    return NULL;
}

/* The export (not being removed) named exactly name, or NULL (nbd_srv.lock
 * held). */
static NBDExport *export_find_name_locked(const char *name)
{
    for (NBDExport *e = nbd_srv.exports; e; e = e->next) {
        if (!e->removing && strcmp(e->name, name) == 0) {
            return e;
        }
    }
    return NULL;
}

/* As a client names it: the empty name is the default export. */
static NBDExport *export_find_locked(const char *name)
{
    NBDExport *found = export_find_name_locked(name);
    if (found) {
        return found;
    }
    if (name[0] == '\0') {
        /* The default export: the first one added. */
        for (NBDExport *e = nbd_srv.exports; e; e = e->next) {
            if (!e->removing) {
                return e;
            }
        }
    }
    return NULL;
}

/* Find an export by name and count c as a user of it (invariant 4). */
NBDExport *nbd_export_pin(NBDClient *c, const char *name)
{
    LOCK_GUARD(&nbd_srv.lock);
    NBDExport *e = export_find_locked(name);
    if (e) {
        e->nclients++;
        c->exp = e;
    }
    return e;
}

bool nbd_export_unpin_locked(NBDClient *c)
{
    NBDExport *e = c->exp;
    if (!e) {
        return false;
    }
    c->exp = NULL;
    e->nclients--;
    pthread_cond_broadcast(&nbd_srv.cond);
    return e->removing && e->nclients == 0;
}

void nbd_export_unpin(NBDClient *c)
{
    bool reap;
    {
        LOCK_GUARD(&nbd_srv.lock);
        reap = nbd_export_unpin_locked(c);
    }
    if (reap) {
        nbd_exports_reap_later();
    }
}

bool nbd_export_is_open(NBDExport *e)
{
    LOCK_GUARD(&nbd_srv.lock);
    return !e->removing;
}

/* Unlink e from nbd_srv.exports (nbd_srv.lock held). */
static void export_unlink_locked(NBDExport *e)
{
    for (NBDExport **pp = &nbd_srv.exports; *pp; pp = &(*pp)->next) {
        if (*pp == e) {
            *pp = e->next;
            break;
        }
    }
}

void nbd_export_finish(NBDExport *e)
{
    struct json_object *data = json_object_new_object();
    json_object_object_add(data, "id", json_object_new_string(e->id));
    log_msg(LOG_LEVEL_INFO, "export '%s' removed (NBD name '%s')", e->id,
            e->name);
    nbd_export_free(e);
    event_emit("BLOCK_EXPORT_DELETED", data);
}

/* Free every export that is shutting down and pinned by nobody (main
 * thread).  An export that nbd_server_stop freed meanwhile is simply no
 * longer in the list. */
static void exports_reap(void *opaque)
{
    (void)opaque;
    NBDExport *done = NULL;
    {
        LOCK_GUARD(&nbd_srv.lock);
        NBDExport **pp = &nbd_srv.exports;
        while (*pp) {
            NBDExport *e = *pp;
            if (e->removing && e->nclients == 0) {
                *pp = e->next;
                e->next = done;
                done = e;
            } else {
                pp = &e->next;
            }
        }
    }
    while (done) {
        NBDExport *next = done->next;
        nbd_export_finish(done);
        done = next;
    }
}

void nbd_exports_reap_later(void)
{
    main_loop_schedule(exports_reap, NULL);
}

void nbd_export_free(NBDExport *e)
{
    if (!e) {
        return;
    }
    for (int i = 0; i < e->nbitmaps; i++) {
        if (e->bitmaps[i]) {
            bdrv_dirty_bitmap_set_busy(e->bitmaps[i], false);
        }
        free(e->ctx_names[i]);
    }
    free(e->bitmaps);
    free(e->ctx_names);
    if (e->bs) {
        bdrv_unref(e->bs);
    }
    free(e->id);
    free(e->name);
    free(e->description);
    free(e);
}

/* A bitmap named `name` on bs or down its backing chain. */
static BdrvDirtyBitmap *find_bitmap_in_chain(BlockDriverState *bs,
                                             const char *name)
{
    for (BlockDriverState *cur = bs; cur; cur = cur->backing) {
        BdrvDirtyBitmap *bm = bdrv_find_dirty_bitmap(cur, name);
        if (bm) {
            return bm;
        }
    }
    return NULL;
}

NBDExport *nbd_export_add(const char *id, BlockDriverState *bs,
                          const char *name, const char *description,
                          bool writable, const char *const *bitmaps,
                          int nbitmaps, Error **errp)
{
    if (!id || !*id) {
        error_setg(errp, "export id must not be empty");
        return NULL;
    }
    if (!name) {
        name = bs->node_name;
    }
    if (!name || strlen(name) > NBD_MAX_STRING) {
        error_setg(errp, "export name must be at most %d bytes", NBD_MAX_STRING);
        return NULL;
    }
    if (description && strlen(description) > NBD_MAX_STRING) {
        error_setg(errp, "export description must be at most %d bytes",
                   NBD_MAX_STRING);
        return NULL;
    }
    if (nbitmaps < 0 || (nbitmaps > 0 && !bitmaps)) {
        error_setg(errp, "bad bitmap list");
        return NULL;
    }
    if (writable && bs->read_only) {
        error_setg(errp, "node '%s' is read-only: cannot export it writable",
                   bs->node_name ? bs->node_name : "?");
        return NULL;
    }
    {
        LOCK_GUARD(&nbd_srv.lock);
        for (NBDExport *e = nbd_srv.exports; e; e = e->next) {
            if (strcmp(e->id, id) == 0) {
                error_setg(errp, "export id '%s' is already in use", id);
                return NULL;
            }
            if (!e->removing && strcmp(e->name, name) == 0) {
                error_setg(errp, "NBD export '%s' already exists", name);
                return NULL;
            }
        }
    }

    NBDExport *e = calloc(1, sizeof(*e));
    if (!e) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    e->id = strdup(id);
    e->name = strdup(name);
    e->description = description ? strdup(description) : NULL;
    e->writable = writable;
    e->bitmaps = calloc((size_t)nbitmaps + 1, sizeof(*e->bitmaps));
    e->ctx_names = calloc((size_t)nbitmaps + 1, sizeof(*e->ctx_names));
    if (!e->id || !e->name || (description && !e->description) ||
        !e->bitmaps || !e->ctx_names) {
        nbd_export_free(e);
        error_setg(errp, "out of memory");
        return NULL;
    }
    for (int i = 0; i < nbitmaps; i++) {
        const char *bname = bitmaps[i];
        if (!bname) {
            nbd_export_free(e);
            error_setg(errp, "bad bitmap list");
            return NULL;
        }
        for (int j = 0; j < i; j++) {
            if (strcmp(bitmaps[j], bname) == 0) {
                nbd_export_free(e);
                error_setg(errp, "bitmap '%s' is listed twice", bname);
                return NULL;
            }
        }
        BdrvDirtyBitmap *bm = find_bitmap_in_chain(bs, bname);
        if (!bm) {
            nbd_export_free(e);
            error_setg(errp, "Bitmap '%s' is not found", bname);
            return NULL;
        }
        if (!bdrv_dirty_bitmap_check(bm, BDRV_BITMAP_DEFAULT | BDRV_BITMAP_ALLOW_RO,
                                     errp)) {
            nbd_export_free(e);
            return NULL;
        }
        /* As QEMU: a read-only export of a node that others may still
         * write would show a bitmap that changes under the client. */
        if (!writable && !bs->read_only && !bm->disabled) {
            nbd_export_free(e);
            error_setg(errp, "Enabled bitmap '%s' incompatible with readonly "
                       "export", bname);
            return NULL;
        }
        if (asprintf(&e->ctx_names[i], META_DIRTY_PREFIX "%s", bname) < 0) {
            e->ctx_names[i] = NULL;
            nbd_export_free(e);
            error_setg(errp, "out of memory");
            return NULL;
        }
        bdrv_dirty_bitmap_set_busy(bm, true);
        e->bitmaps[i] = bm;
        e->nbitmaps = i + 1;
    }
    bdrv_ref(bs);
    e->bs = bs;

    LOCK_GUARD(&nbd_srv.lock);
    e->serial = ++nbd_srv.next_serial;
    NBDExport **pp = &nbd_srv.exports;
    while (*pp) {
        pp = &(*pp)->next;
    }
    *pp = e;
    log_msg(LOG_LEVEL_INFO, "export '%s' added: NBD name '%s', node '%s', %s",
            e->id, e->name, bdrv_node_label(bs),
            e->writable ? "writable" : "read-only");
    return e;
}

NBDExport *nbd_export_find(const char *id)
{
    LOCK_GUARD(&nbd_srv.lock);
    return export_find_id_locked(id);
}

const char *nbd_export_id(const NBDExport *exp)
{
    return exp->id;
}

NBDExport *nbd_export_find_by_name(const char *name)
{
    LOCK_GUARD(&nbd_srv.lock);
    return export_find_name_locked(name);
}

bool nbd_export_del(const char *id, bool force, Error **errp)
{
    NBDExport *e = NULL;
    {
        LOCK_GUARD(&nbd_srv.lock);
        e = export_find_id_locked(id);
        if (!e) {
            error_set(errp, ERROR_CLASS_GENERIC_ERROR,
                      "Export '%s' is not found", id);
            return false;
        }
        if (e->removing) {
            error_setg(errp, "Export '%s' is already shutting down", id);
            return false;
        }
        /* Negotiating connections that pinned it count too (invariant 4). */
        if (e->nclients > 0 && !force) {
            error_setg(errp, "export '%s' still in use (%u connection%s); "
                       "use mode 'hard' to disconnect", id, e->nclients,
                       e->nclients == 1 ? "" : "s");
            return false;
        }
        e->removing = true;
        if (e->nclients > 0) {
            /* Its last connection to leave frees it (invariant 4). */
            nbd_clients_cut_off_locked(e);
            return true;
        }
        export_unlink_locked(e);
    }
    nbd_export_finish(e);
    return true;
}

struct json_object *nbd_export_query(void)
{
    struct json_object *arr = json_object_new_array();
    LOCK_GUARD(&nbd_srv.lock);
    for (NBDExport *e = nbd_srv.exports; e; e = e->next) {
        struct json_object *o = json_object_new_object();
        json_object_object_add(o, "type", json_object_new_string("nbd"));
        json_object_object_add(o, "id", json_object_new_string(e->id));
        json_object_object_add(o, "node-name",
                               json_object_new_string(e->bs->node_name ?
                                                      e->bs->node_name : ""));
        json_object_object_add(o, "shutting-down",
                               json_object_new_boolean(e->removing));
        json_object_array_add(arr, o);
    }
    return arr;
}

struct json_object *nbd_export_usage(void)
{
    struct json_object *arr = json_object_new_array();
    LOCK_GUARD(&nbd_srv.lock);
    for (NBDExport *e = nbd_srv.exports; e; e = e->next) {
        struct json_object *o = json_object_new_object();
        json_object_object_add(o, "id", json_object_new_string(e->id));
        json_object_object_add(o, "name", json_object_new_string(e->name));
        json_object_object_add(o, "node-name",
                               json_object_new_string(e->bs->node_name ?
                                                      e->bs->node_name : ""));
        json_object_object_add(o, "writable",
                               json_object_new_boolean(e->writable));
        json_object_object_add(o, "clients",
                               json_object_new_int64(e->nclients));
        json_object_array_add(arr, o);
    }
    return arr;
}

bool nbd_node_is_exported(BlockDriverState *bs)
{
    LOCK_GUARD(&nbd_srv.lock);
    for (NBDExport *e = nbd_srv.exports; e; e = e->next) {
        if (e->bs == bs) {
            return true;
        }
    }
    return false;
}
