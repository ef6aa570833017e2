/*
 * Unit tests for the retention rules (src/repo/retention.c,
 * docs/specs/retention.md), table driven:
 *   - hand-checked cases: keep-last, several backups per hour and day,
 *     a week that spans two months (a backup a weekly rule removed is
 *     not kept by the monthly rule: PBS's order), ISO week 53 across a
 *     year boundary, rules that find their periods already covered, the
 *     documented "no rule keeps everything", and local-time grouping
 *     (TZ=Europe/Berlin against TZ=UTC);
 *   - generated calendars (several years, bursts of backups per hour and
 *     per day, random rule sets) against a naive model written here
 *     independently: per-rule loops over strings and linear searches,
 *     periods formatted from struct tm fields with its own ISO week.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <cmocka.h>

#include "repo/retention.h"
#include "util/cutils.h"
#include "test-util.h"

#define MAX_BACKUPS 400

static void set_tz(const char *tz)
{
    setenv("TZ", tz, 1);
    tzset();
}

/* One letter per rule, '-' for removed. */
static char rule_letter(RepoKeepRule r)
{
    static const char letters[REPO_KEEP__MAX] = {
        [REPO_KEEP_NONE] = '-', [REPO_KEEP_LAST] = 'L',
        [REPO_KEEP_HOURLY] = 'H', [REPO_KEEP_DAILY] = 'D',
        [REPO_KEEP_WEEKLY] = 'W', [REPO_KEEP_MONTHLY] = 'M',
        [REPO_KEEP_YEARLY] = 'Y', [REPO_KEEP_ALL] = 'A',
    };
    return letters[r];
}

/* ---- the naive model ---- */

/* ISO 8601 week-numbering year and week of tm, computed from the day of
 * the year and the weekday (not with strftime's %G/%V). */
static void iso_week(const struct tm *tm, int *ret_year, int *ret_week)
{
    int wday = (tm->tm_wday + 6) % 7;          /* Monday 0 .. Sunday 6 */
    int year = tm->tm_year + 1900;
    int week = (tm->tm_yday - wday + 10) / 7;

    if (week < 1) {
        /* The last week of the year before: 52 or 53. */
        int py = year - 1;
        bool leap = (py % 4 == 0 && py % 100) || py % 400 == 0;
        int dec31_wday = (wday - tm->tm_yday - 1 + 7 * 60) % 7;
        int dec31_yday = leap ? 365 : 364;
        week = (dec31_yday - dec31_wday + 10) / 7;
        year = py;
    } else if (week == 53) {
        /* Week 53 only if Dec 31 is a Thursday or later in that week. */
        bool leap = (year % 4 == 0 && year % 100) || year % 400 == 0;
        int days = leap ? 366 : 365;
        int dec31_wday = (wday + (days - 1 - tm->tm_yday)) % 7;
        if (dec31_wday < 3) {
            week = 1;
            year++;
        }
    }
    *ret_year = year;
    *ret_week = week;
}

static void model_key(const char *time_str, unsigned seq, RepoKeepRule r,
                      char *key, size_t len)
{
    time_t t;
    struct tm tm;
    int y, w;

    assert_true(iso8601_utc_parse(time_str, &t));
    assert_non_null(localtime_r(&t, &tm));
    switch (r) {
    case REPO_KEEP_LAST:
        snprintf(key, len, "#%u", seq);
        break;
    case REPO_KEEP_HOURLY:
        snprintf(key, len, "%d-%d-%d-%d", tm.tm_year, tm.tm_mon, tm.tm_mday,
                 tm.tm_hour);
        break;
    case REPO_KEEP_DAILY:
        snprintf(key, len, "%d-%d-%d", tm.tm_year, tm.tm_mon, tm.tm_mday);
        break;
    case REPO_KEEP_WEEKLY:
        iso_week(&tm, &y, &w);
        snprintf(key, len, "W%d-%d", y, w);
        break;
    case REPO_KEEP_MONTHLY:
        snprintf(key, len, "%d-%d", tm.tm_year, tm.tm_mon);
        break;
    default:
        snprintf(key, len, "%d", tm.tm_year);
        break;
    }
}

static bool in_list(char (*list)[32], size_t n, const char *key)
{
    for (size_t i = 0; i < n; i++) {
        if (!strcmp(list[i], key)) {
            return true;
        }
    }
    return false;
}

/* times[i] is backup seq i+1 (ascending IDs); out[i] its letter. */
static void model(const char *const *times, size_t n,
                  const RepoKeepOptions *o, char *out)
{
    static char already[MAX_BACKUPS][32], included[MAX_BACKUPS][32];
    int mark[MAX_BACKUPS];              /* -1 undecided, else the rule */
    bool any = false;

    for (size_t i = 0; i < n; i++) {
        mark[i] = -1;
    }
    for (int r = REPO_KEEP_LAST; r <= REPO_KEEP_YEARLY; r++) {
        size_t n_already = 0, n_included = 0;
        char key[32];

        if (!o->count[r]) {
            continue;
        }
        any = true;
        for (size_t i = 0; i < n; i++) {
            if (mark[i] > 0) {
                model_key(times[i], (unsigned)i + 1, r, key, sizeof(key));
                strcpy(already[n_already++], key);
            }
        }
        for (size_t i = n; i-- > 0;) {          /* newest first */
            if (mark[i] >= 0) {
                continue;
            }
            model_key(times[i], (unsigned)i + 1, r, key, sizeof(key));
            if (in_list(already, n_already, key)) {
                continue;
            }
            if (in_list(included, n_included, key)) {
                mark[i] = REPO_KEEP_NONE;
                continue;
            }
            if (n_included >= o->count[r]) {
                break;
            }
            strcpy(included[n_included++], key);
            mark[i] = r;
        }
    }
    for (size_t i = 0; i < n; i++) {
        out[i] = !any ? 'A' : rule_letter(mark[i] < 0 ? REPO_KEEP_NONE
                                                      : (RepoKeepRule)mark[i]);
    }
    out[n] = '\0';
}

/* ---- the function under test ---- */

static void compute(const char *const *times, size_t n,
                    const RepoKeepOptions *o, char *out)
{
    RepoRetentionItem items[MAX_BACKUPS];
    Error *err = NULL;

    /* Shuffled input order: the function sorts by ID itself. */
    for (size_t i = 0; i < n; i++) {
        items[i] = (RepoRetentionItem){ .seq = (unsigned)i + 1,
                                        .time = times[i] };
    }
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)rand() % i;
        RepoRetentionItem tmp = items[i - 1];
        items[i - 1] = items[j];
        items[j] = tmp;
    }
    assert_true(repo_retention_compute(items, n, o, &err));
    die_on(err);
    for (size_t i = 0; i < n; i++) {
        out[items[i].seq - 1] = rule_letter(items[i].kept_by);
    }
    out[n] = '\0';
}

/* ---- hand-checked cases ---- */

typedef struct Case {
    const char *name;
    const char *tz;
    const char *times[24];     /* ascending IDs: oldest first */
    RepoKeepOptions keep;
    const char *expect;        /* one letter per backup, in that order */
} Case;

#define K(l, h, d, w, m, y) { .count = { 0, l, h, d, w, m, y } }

static const Case cases[] = {
    { "keep-last 3 of 5", "UTC",
      { "2026-01-01T10:00:00Z", "2026-01-01T11:00:00Z", "2026-01-02T10:00:00Z",
        "2026-01-03T10:00:00Z", "2026-01-04T10:00:00Z" },
      K(3, 0, 0, 0, 0, 0), "--LLL" },
    { "keep-last counts backups, even in one second", "UTC",
      { "2026-01-01T10:00:00Z", "2026-01-01T10:00:00Z", "2026-01-01T10:00:00Z" },
      K(2, 0, 0, 0, 0, 0), "-LL" },
    { "hourly: the newest of each hour", "UTC",
      { "2026-01-01T10:05:00Z", "2026-01-01T10:55:00Z", "2026-01-01T11:00:00Z",
        "2026-01-01T11:30:00Z", "2026-01-01T11:59:59Z", "2026-01-01T12:00:00Z" },
      K(0, 2, 0, 0, 0, 0), "----HH" },
    { "daily 3 over days with bursts", "UTC",
      { "2026-01-01T01:00:00Z", "2026-01-01T23:00:00Z", "2026-01-02T08:00:00Z",
        "2026-01-03T08:00:00Z", "2026-01-03T09:00:00Z", "2026-01-03T10:00:00Z",
        "2026-01-05T00:00:00Z" },
      K(0, 0, 3, 0, 0, 0), "--D--DD" },
    { "keep-last 2 then daily 2: days already covered are skipped", "UTC",
      { "2026-01-01T01:00:00Z", "2026-01-02T08:00:00Z", "2026-01-02T09:00:00Z",
        "2026-01-03T08:00:00Z", "2026-01-03T09:00:00Z" },
      K(2, 0, 2, 0, 0, 0), "D-DLL" },
    { "a week over two months: weekly removes, monthly cannot take it", "UTC",
      /* Jan 20 (Tue, week 4); Jan 31 Sat, Feb 1 Sun, Feb 2 Mon: Jan 31
       * and Feb 1 are ISO week 5, Feb 2 week 6. */
      { "2026-01-20T10:00:00Z", "2026-01-30T10:00:00Z", "2026-01-31T10:00:00Z",
        "2026-02-01T10:00:00Z", "2026-02-04T10:00:00Z" },
      K(0, 0, 0, 2, 3, 0), "M--WW" },
    { "ISO week 53 spans 2026 and 2027", "UTC",
      /* 2026-12-27 Sun: week 52; Dec 28 Mon .. 2027-01-03 Sun: 2026-W53;
       * 2027-01-04 Mon: 2027-W01. */
      { "2026-12-27T10:00:00Z", "2026-12-28T10:00:00Z", "2026-12-31T10:00:00Z",
        "2027-01-01T10:00:00Z", "2027-01-03T10:00:00Z", "2027-01-04T10:00:00Z" },
      K(0, 0, 0, 3, 0, 0), "W---WW" },
    { "yearly uses the calendar year, not the ISO year", "UTC",
      { "2025-06-01T10:00:00Z", "2026-12-31T10:00:00Z", "2027-01-01T10:00:00Z" },
      K(0, 0, 0, 0, 0, 2), "-YY" },
    { "yearly 5 over three years keeps three", "UTC",
      { "2024-03-01T10:00:00Z", "2024-12-01T10:00:00Z", "2025-03-01T10:00:00Z",
        "2026-03-01T10:00:00Z", "2026-04-01T10:00:00Z" },
      K(0, 0, 0, 0, 0, 5), "-YY-Y" },
    { "every rule: each takes what the earlier ones left", "UTC",
      { "2025-01-10T10:00:00Z", "2025-07-10T10:00:00Z", "2026-01-05T10:00:00Z",
        "2026-01-10T10:00:00Z", "2026-01-11T09:00:00Z", "2026-01-11T10:00:00Z",
        "2026-01-11T10:30:00Z" },
      K(1, 1, 2, 2, 3, 3), "WWDDH-L" },
    { "no rule keeps everything", "UTC",
      { "2026-01-01T10:00:00Z", "2026-01-02T10:00:00Z" },
      K(0, 0, 0, 0, 0, 0), "AA" },
    { "days in UTC", "UTC",
      { "2026-03-01T12:00:00Z", "2026-03-01T23:30:00Z", "2026-03-02T10:00:00Z" },
      K(0, 0, 2, 0, 0, 0), "-DD" },
    { "days in Berlin: 23:30Z is already the next day", "Europe/Berlin",
      { "2026-03-01T12:00:00Z", "2026-03-01T23:30:00Z", "2026-03-02T10:00:00Z" },
      K(0, 0, 2, 0, 0, 0), "D-D" },
    { "Berlin's DST change: 00:30Z and 01:30Z are hours 01 and 03", "Europe/Berlin",
      { "2026-03-29T00:10:00Z", "2026-03-29T00:50:00Z", "2026-03-29T01:10:00Z" },
      K(0, 2, 0, 0, 0, 0), "-HH" },
};

static void test_hand_cases(void **state)
{
    (void)state;
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        const Case *k = &cases[c];
        char got[MAX_BACKUPS + 1], naive[MAX_BACKUPS + 1];
        size_t n = 0;

        while (n < 24 && k->times[n]) {
            n++;
        }
        set_tz(k->tz);
        compute(k->times, n, &k->keep, got);
        model(k->times, n, &k->keep, naive);
        if (strcmp(got, k->expect) || strcmp(naive, k->expect)) {
            fail_msg("%s: expected %s, got %s (model %s)", k->name,
                     k->expect, got, naive);
        }
    }
    set_tz("UTC");
}

/* ---- generated calendars against the model ---- */

static void test_generated(void **state)
{
    static char bufs[MAX_BACKUPS][ISO8601_UTC_BUF];
    const char *times[MAX_BACKUPS];
    static const char *const zones[] = { "UTC", "Europe/Berlin",
                                         "America/New_York" };

    (void)state;
    srand(18);
    for (int round = 0; round < 600; round++) {
        /* Start anywhere 2020-2030, then steps from seconds to months:
         * bursts within an hour and a day, and gaps over weeks and years
         * (ISO week 53 years: 2020, 2026). */
        time_t t = 1577836800 + (time_t)(rand() % (10 * 365)) * 86400 +
                   rand() % 86400;
        size_t n = 1 + (size_t)rand() % (round % 10 == 0 ? MAX_BACKUPS : 60);
        RepoKeepOptions o = { 0 };
        char got[MAX_BACKUPS + 1], naive[MAX_BACKUPS + 1];

        for (size_t i = 0; i < n; i++) {
            static const int steps[] = { 1, 60, 600, 1800, 3600, 5 * 3600,
                                         86400, 3 * 86400, 7 * 86400,
                                         30 * 86400, 200 * 86400 };
            int s = steps[rand() % 11];
            t += s / 2 + rand() % (s + 1);
            iso8601_utc_format(t, bufs[i]);
            times[i] = bufs[i];
        }
        for (int r = REPO_KEEP_LAST; r <= REPO_KEEP_YEARLY; r++) {
            if (rand() % 2) {
                o.count[r] = (unsigned)(rand() % 6);
            }
        }
        set_tz(zones[round % 3]);
        compute(times, n, &o, got);
        model(times, n, &o, naive);
        if (strcmp(got, naive)) {
            fail_msg("round %d (TZ %s, n %zu): got %s, model %s", round,
                     zones[round % 3], n, got, naive);
        }
        /* Any rule of count >= 1 keeps the newest. */
        if (repo_keep_options_any(&o)) {
            assert_true(got[n - 1] != '-');
        }
    }
    set_tz("UTC");
}

/* The model's ISO week against strftime's, over every day 2019-2032. */
static void test_model_iso_week(void **state)
{
    (void)state;
    set_tz("UTC");
    for (time_t t = 1546300800; t < 1956528000; t += 86400) {
        struct tm tm;
        char want[32], have[32];   /* room for any two ints: -O3 checks */
        int y, w;

        gmtime_r(&t, &tm);
        strftime(want, sizeof(want), "%G/%V", &tm);
        iso_week(&tm, &y, &w);
        snprintf(have, sizeof(have), "%d/%02d", y, w);
        assert_string_equal(have, want);
    }
}

static void test_bad_input(void **state)
{
    RepoRetentionItem items[2] = {
        { .seq = 1, .time = "2026-01-01T10:00:00Z" },
        { .seq = 2, .time = "2026-02-30T10:00:00Z" },
    };
    RepoKeepOptions o = K(1, 0, 0, 0, 0, 0);
    Error *err = NULL;
    time_t t;

    (void)state;
    expect_error(repo_retention_compute(items, 2, &o, &err), &err,
                 "2026-02-30T10:00:00Z");
    assert_true(repo_retention_compute(items, 0, &o, &err));
    assert_false(iso8601_utc_parse("2026-01-01 10:00:00Z", &t));
    assert_false(iso8601_utc_parse("2026-13-01T10:00:00Z", &t));
    assert_false(iso8601_utc_parse("2026-01-01T24:00:00Z", &t));
    assert_false(iso8601_utc_parse("2026-01-01T10:00:00", &t));
    assert_true(iso8601_utc_parse("2024-02-29T23:59:59Z", &t));
    assert_int_equal(t, 1709251199);
    assert_false(repo_keep_options_any(&(RepoKeepOptions){ 0 }));
    assert_string_equal(repo_keep_rule_name(REPO_KEEP_WEEKLY), "keep-weekly");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_model_iso_week),
        cmocka_unit_test(test_hand_cases),
        cmocka_unit_test(test_generated),
        cmocka_unit_test(test_bad_input),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
