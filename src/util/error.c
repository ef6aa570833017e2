/*
 * Error objects for control and setup paths (see error.h for the rules).
 * An Error is a heap-allocated message plus a QMP error class.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/cutils.h"
#include "util/error.h"

struct Error {
    char *msg;
    ErrorClass cls;
};

const char *error_progname = "bitback";

static void error_setv(Error **errp, ErrorClass cls, const char *fmt, va_list ap,
                       int errnum)
{
    if (!errp) {
        return;
    }
    Error *err = calloc(1, sizeof(*err));
    if (!err) {
        abort();
    }
    char *msg = vstrprintf(fmt, ap);
    if (!msg) {
        abort();
    }
    if (errnum) {
        char *full = NULL;
        if (asprintf(&full, "%s: %s", msg, strerror(errnum)) < 0) {
            abort();
        }
        free(msg);
        msg = full;
    }
    err->msg = msg;
    err->cls = cls;
    if (*errp) {
        /* Caller bug: an error is already set.  Keep the first one. */
        error_free(err);
        return;
    }
    *errp = err;
}

void error_setg(Error **errp, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    error_setv(errp, ERROR_CLASS_GENERIC_ERROR, fmt, ap, 0);
    va_end(ap);
}

void error_setg_errno(Error **errp, int errnum, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    error_setv(errp, ERROR_CLASS_GENERIC_ERROR, fmt, ap, errnum < 0 ? -errnum : errnum);
    va_end(ap);
}

void error_set(Error **errp, ErrorClass cls, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    error_setv(errp, cls, fmt, ap, 0);
    va_end(ap);
}

void error_prepend(Error **errp, const char *fmt, ...)
{
    if (!errp || !*errp) {
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    char *prefix = vstrprintf(fmt, ap);
    va_end(ap);
    if (!prefix) {
        abort();
    }
    char *full = NULL;
    if (asprintf(&full, "%s%s", prefix, (*errp)->msg) < 0) {
        abort();
    }
    free(prefix);
    free((*errp)->msg);
    (*errp)->msg = full;
}

void error_propagate(Error **dst, Error *err)
{
    if (!err) {
        return;
    }
    if (!dst || *dst) {
        error_free(err);
        return;
    }
    *dst = err;
}

const char *error_get_pretty(const Error *err)
{
    return err ? err->msg : "";
}

ErrorClass error_get_class(const Error *err)
{
    return err ? err->cls : ERROR_CLASS_GENERIC_ERROR;
}

const char *error_class_name(ErrorClass cls)
{
    switch (cls) {
    case ERROR_CLASS_COMMAND_NOT_FOUND: return "CommandNotFound";
    case ERROR_CLASS_DEVICE_NOT_ACTIVE: return "DeviceNotActive";
    case ERROR_CLASS_DEVICE_NOT_FOUND: return "DeviceNotFound";
    case ERROR_CLASS_KVM_MISSING_CAP: return "KVMMissingCap";
    case ERROR_CLASS_GENERIC_ERROR:
    default: return "GenericError";
    }
}

void error_free(Error *err)
{
    if (err) {
        free(err->msg);
        free(err);
    }
}

void error_freep(Error **errp)
{
    error_free(*errp);
    *errp = NULL;
}

void error_report_err(Error *err)
{
    if (err) {
        fprintf(stderr, "%s: %s\n", error_progname, err->msg);
        error_free(err);
    }
}

void error_report(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: ", error_progname);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}
