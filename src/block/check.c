/*
 * BdrvCheckResult (check.h): counting the problems a driver's .check
 * callback finds and keeping a bounded list of their messages.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "block/check.h"
#include "util/cutils.h"

void bdrv_check_report(BdrvCheckResult *res, BdrvCheckProblem kind,
                       const char *fmt, ...)
{
    switch (kind) {
    case BDRV_CHECK_CORRUPTION:
        res->corruptions++;
        break;
    case BDRV_CHECK_LEAK:
        res->leaks++;
        break;
    case BDRV_CHECK_ERROR:
        res->check_errors++;
        break;
    }
    if (res->nb_messages >= res->max_messages) {
        res->messages_dropped++;
        return;
    }
    if (!res->messages) {
        res->messages = calloc(res->max_messages, sizeof(*res->messages));
        if (!res->messages) {
            res->messages_dropped++;
            return;
        }
    }
    va_list ap;
    va_start(ap, fmt);
    char *line = vstrprintf(fmt, ap);
    va_end(ap);
    if (!line) {
        res->messages_dropped++;
        return;
    }
    res->messages[res->nb_messages++] = line;
}

uint64_t bdrv_check_problems(const BdrvCheckResult *res)
{
    return res->corruptions + res->leaks + res->check_errors;
}

void bdrv_check_result_clear(BdrvCheckResult *res)
{
    for (size_t i = 0; i < res->nb_messages; i++) {
        free(res->messages[i]);
    }
    free(res->messages);
    res->messages = NULL;
    res->nb_messages = 0;
}
