/*
 * The result of a consistency check (`bitback img check`), as QEMU's
 * BdrvCheckResult: a format driver's .check callback fills one, and only
 * the CLI formats it (human text or JSON).  Drivers never print.
 *
 * Every problem is counted exactly, in one of three kinds; the message
 * describing it is kept only while fewer than max_messages are kept, so a
 * badly damaged image (one message per cluster) costs bounded memory.  The
 * messages that were not kept are counted in messages_dropped.
 */
#ifndef BITBACK_BLOCK_CHECK_H
#define BITBACK_BLOCK_CHECK_H

#include <stddef.h>
#include <stdint.h>

/* Messages a result keeps by default (BDRV_CHECK_RESULT_INIT). */
#define BDRV_CHECK_MAX_MESSAGES 1000

typedef enum BdrvCheckProblem {
    BDRV_CHECK_CORRUPTION,   /* metadata is wrong: data may be lost */
    BDRV_CHECK_LEAK,         /* space is allocated but unused: harmless */
    BDRV_CHECK_ERROR,        /* part of the image could not be checked */
} BdrvCheckProblem;

typedef struct BdrvCheckResult {
    uint64_t corruptions;
    uint64_t leaks;
    uint64_t check_errors;
    /* Where the image's used space ends, in bytes; 0 when the driver does
     * not know. */
    uint64_t image_end_offset;
    /* Clusters of the virtual disk, and those allocated in this image;
     * both 0 for formats without clusters. */
    uint64_t total_clusters;
    uint64_t allocated_clusters;

    size_t max_messages;      /* set by the caller before the check */
    char **messages;          /* nb_messages malloc'd lines, no '\n' */
    size_t nb_messages;       /* <= max_messages */
    uint64_t messages_dropped;
} BdrvCheckResult;

#define BDRV_CHECK_RESULT_INIT { .max_messages = BDRV_CHECK_MAX_MESSAGES }

/* Count one problem of `kind` and keep its message if there is room.
 * Never fails: a message that cannot be allocated is counted as dropped. */
void bdrv_check_report(BdrvCheckResult *res, BdrvCheckProblem kind,
                       const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* corruptions + leaks + check_errors. */
uint64_t bdrv_check_problems(const BdrvCheckResult *res);

/* Free the messages (the counts stay).  Accepts a zeroed result. */
void bdrv_check_result_clear(BdrvCheckResult *res);

#endif
