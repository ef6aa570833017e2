/*
 * secret objects (qom-type "secret", qapi/qom.json): passwords and keys
 * given to the daemon by value (`data`) or in a file (`file`), as raw
 * bytes or base64 (`format`), for the features that need one by id.
 * Secrets encrypted with another secret (`keyid`, `iv`) are refused.
 * Secret bytes are never printed: errors name the object, not its data.
 *
 * Threads: created and deleted on the main thread; secret_lookup too.
 */
#ifndef BITBACK_CRYPTO_SECRET_H
#define BITBACK_CRYPTO_SECRET_H

#include <stddef.h>
#include <stdint.h>
#include "util/error.h"

/* The largest secret, in bytes (a secret file longer is refused). */
#define SECRET_MAX_BYTES (64 * 1024)

/* A copy of the bytes of secret `id`: true with *ret_data (malloc'd, a
 * NUL after the *ret_len bytes; the caller clears and frees it) set;
 * false with errp set ("No secret with id 'X'", or the object is no
 * secret). */
bool secret_lookup(const char *id, uint8_t **ret_data, size_t *ret_len,
                   Error **errp);

#endif
