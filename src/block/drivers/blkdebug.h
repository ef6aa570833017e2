/*
 * The "blkdebug" filter driver: fault injection for tests, after QEMU's
 * blkdebug.  A blkdebug node passes every request to its child ("image")
 * unless an armed rule fails it with an errno first; the child never sees
 * a failed request.  Rules come from the node's "inject-error" option at
 * open, or are armed and cleared later on a running node (the QMP
 * commands x-blkdebug-inject and x-blkdebug-clear).  docs/qmp.md lists
 * the options.
 */
#ifndef BITBACK_BLKDEBUG_H
#define BITBACK_BLKDEBUG_H

#include <json-c/json.h>

#include "block/block.h"

/* Arm one rule on bs, a blkdebug node: `rule` is an inject-error entry
 * ({"event": ..., "errno": ..., "once": ..., "immediately": ...,
 * "after": ..., "sector": ...}); it starts counting requests now.  Main
 * thread.  False with errp set when bs is not a blkdebug node or the
 * rule is invalid. */
bool blkdebug_inject(BlockDriverState *bs, struct json_object *rule,
                     Error **errp);
/* Disarm every rule of bs, a blkdebug node.  Main thread. */
bool blkdebug_clear(BlockDriverState *bs, Error **errp);

#endif
