/*
 * secret objects (secret.h): the bytes are read and decoded once, when the
 * object is created (a bad file or bad base64 is refused there), kept in
 * memory and cleared when the object is deleted.  Base64 is GnuTLS's
 * decoder.  No message ever holds the data.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <gnutls/gnutls.h>

#include "crypto/crypto-internal.h"
#include "crypto/object.h"
#include "crypto/secret.h"
#include "util/cleanup.h"
#include "util/cutils.h"
#include "util/osdep.h"

typedef struct Secret {
    uint8_t *data;
    size_t len;
} Secret;

void secret_free(void *opaque)
{
    Secret *s = opaque;
    if (!s) {
        return;
    }
    if (s->data) {
        explicit_bzero(s->data, s->len);
    }
    free(s->data);
    free(s);
}

/* The whole file path (at most SECRET_MAX_BYTES) into *ret (malloc'd). */
static bool secret_read_file(const char *path, uint8_t **ret, size_t *ret_len,
                             Error **errp)
{
    Error *err = NULL;
    _cleanup_close_ int fd = open_checked(path, O_RDONLY, 0, 0, &err);
    if (fd < 0) {
        error_setg(errp, "Unable to read %s: %s", path, error_get_pretty(err));
        error_free(err);
        return false;
    }
    uint8_t *buf = malloc(SECRET_MAX_BYTES + 1);
    if (!buf) {
        abort();
    }
    ssize_t n = read_upto(fd, buf, SECRET_MAX_BYTES + 1);
    if (n < 0) {
        error_setg_errno(errp, (int)-n, "Unable to read %s", path);
        explicit_bzero(buf, SECRET_MAX_BYTES + 1);   /* what was read */
        free(buf);
        return false;
    }
    size_t len = (size_t)n;
    if (len > SECRET_MAX_BYTES) {
        error_setg(errp, "Unable to read %s: secret files are at most %d "
                   "bytes", path, SECRET_MAX_BYTES);
        explicit_bzero(buf, len);
        free(buf);
        return false;
    }
    *ret = buf;
    *ret_len = len;
    return true;
}

void *secret_new(const char *id, struct json_object *props, Error **errp)
{
    const char *data, *file, *format, *keyid, *iv;
    if (!object_prop_str(props, "data", NULL, &data, errp) ||
        !object_prop_str(props, "file", NULL, &file, errp) ||
        !object_prop_str(props, "format", "raw", &format, errp) ||
        !object_prop_str(props, "keyid", NULL, &keyid, errp) ||
        !object_prop_str(props, "iv", NULL, &iv, errp)) {
        return NULL;
    }
    if (keyid || iv) {
        error_setg(errp, "secret '%s': encrypted secrets ('keyid', 'iv') are "
                   "not supported", id);
        return NULL;
    }
    bool base64 = strcmp(format, "base64") == 0;
    if (!base64 && strcmp(format, "raw") != 0) {
        error_setg(errp, "Parameter 'format' does not accept value '%s'",
                   format);
        return NULL;
    }
    if (data && file) {
        error_setg(errp, "'file' and 'data' are mutually exclusive");
        return NULL;
    }
    if (!data && !file) {
        error_setg(errp, "Either 'file' or 'data' must be provided");
        return NULL;
    }
    Secret *s = calloc(1, sizeof(*s));
    if (!s) {
        abort();
    }
    if (file) {
        if (!secret_read_file(file, &s->data, &s->len, errp)) {
            free(s);
            return NULL;
        }
    } else {
        s->len = strlen(data);
        if (s->len > SECRET_MAX_BYTES) {
            error_setg(errp, "secret '%s': data is longer than %d bytes", id,
                       SECRET_MAX_BYTES);
            free(s);
            return NULL;
        }
        s->data = malloc(s->len + 1);
        if (!s->data) {
            abort();
        }
        memcpy(s->data, data, s->len);
    }
    if (base64) {
        gnutls_datum_t in = { s->data, (unsigned)s->len }, out = { 0 };
        if (s->len == 0 || gnutls_base64_decode2(&in, &out) < 0) {
            error_setg(errp, "Base64 data contains invalid characters");
            secret_free(s);
            return NULL;
        }
        explicit_bzero(s->data, s->len);
        free(s->data);
        s->data = malloc(out.size + 1);
        if (!s->data) {
            abort();
        }
        memcpy(s->data, out.data, out.size);
        s->len = out.size;
        explicit_bzero(out.data, out.size);
        gnutls_free(out.data);
    }
    s->data[s->len] = 0;
    return s;
}

bool secret_lookup(const char *id, uint8_t **ret_data, size_t *ret_len,
                   Error **errp)
{
    Object *o = object_find(id);
    if (!o) {
        error_setg(errp, "No secret with id '%s'", id);
        return false;
    }
    if (strcmp(object_type(o), "secret") != 0) {
        error_setg(errp, "Object with id '%s' is not a secret", id);
        return false;
    }
    const Secret *s = object_impl(o);
    uint8_t *copy = malloc(s->len + 1);
    if (!copy) {
        abort();
    }
    memcpy(copy, s->data, s->len + 1);
    *ret_data = copy;
    *ret_len = s->len;
    return true;
}
