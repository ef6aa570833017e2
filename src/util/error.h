/*
 * Error reporting for control and setup code (QEMU's error.h rules).
 *
 * Functions that can fail take `Error **errp` as their last argument and
 * return bool / pointer / non-negative int.  They set *errp only on failure.
 * errp may be NULL when the caller does not care about the message.
 * Context is added with error_prepend(); an error is reported (printed or
 * turned into a QMP reply) in exactly one place and then freed.
 *
 * The data path never uses Error: it returns -errno.
 */
#ifndef BITBACK_ERROR_H
#define BITBACK_ERROR_H

#include <stdbool.h>

typedef enum ErrorClass {
    ERROR_CLASS_GENERIC_ERROR = 0,
    ERROR_CLASS_COMMAND_NOT_FOUND,
    ERROR_CLASS_DEVICE_NOT_ACTIVE,
    ERROR_CLASS_DEVICE_NOT_FOUND,
    ERROR_CLASS_KVM_MISSING_CAP,
} ErrorClass;

typedef struct Error Error;

/* Set *errp (if errp != NULL) to a new GenericError; *errp must be NULL. */
void error_setg(Error **errp, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Like error_setg() with ": strerror(errnum)" appended. */
void error_setg_errno(Error **errp, int errnum, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Set an error with a specific QMP class. */
void error_set(Error **errp, ErrorClass cls, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Prefix the message of *errp (no-op when errp or *errp is NULL). */
void error_prepend(Error **errp, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Move err into *dst (frees err if dst is NULL or *dst already set). */
void error_propagate(Error **dst, Error *err);

const char *error_get_pretty(const Error *err);
ErrorClass error_get_class(const Error *err);
/* QMP class name, e.g. "GenericError", "DeviceNotFound". */
const char *error_class_name(ErrorClass cls);

void error_free(Error *err);
void error_freep(Error **errp);
/* Print "PROGNAME: message" on stderr and free err. */
void error_report_err(Error *err);
/* Print a formatted line "PROGNAME: ..." on stderr. */
void error_report(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Program name used by error_report*(); set once in main(). */
extern const char *error_progname;

#endif
