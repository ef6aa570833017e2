/*
 * Authorization objects (QEMU's authz-simple and authz-list): is the
 * identity a TLS session proved (an x509 client certificate's
 * distinguished name as gnutls_x509_crt_get_dn prints it, or a PSK
 * username) allowed?
 *
 *   authz-simple,id=ID,identity=NAME       exactly NAME is allowed
 *   authz-list,id=ID,policy=allow|deny,rules.N.match=M,rules.N.policy=P
 *              [,rules.N.format=exact|glob]
 *                                          the first rule that matches
 *                                          decides; none: policy (default
 *                                          deny)
 */
#ifndef BITBACK_CRYPTO_AUTHZ_H
#define BITBACK_CRYPTO_AUTHZ_H

#include <stdbool.h>
#include "util/error.h"

typedef struct Authz Authz;

/* The authz object id, referenced (object.h); NULL with errp set when
 * there is none or it is of another type.  authz_put drops it. */
Authz *authz_get(const char *id, Error **errp);
void authz_put(Authz *a);
/* For _cleanup_(authz_putp). */
static inline void authz_putp(Authz **a)
{
    authz_put(*a);
}
/* Any thread, while referenced. */
bool authz_is_allowed(const Authz *a, const char *identity);

#endif
