/*
 * bitbackd under a service manager: systemd's readiness protocol
 * (sd_notify), socket activation (sd_listen_fds_with_names), and the
 * --config option file.
 */
#ifndef BITBACKD_SERVICE_H
#define BITBACKD_SERVICE_H

#include <getopt.h>
#include <stdbool.h>
#include "util/error.h"

/* Register the sockets passed with LISTEN_FDS / LISTEN_PID /
 * LISTEN_FDNAMES (util/listen-fds.h) and unset those variables.  Nothing
 * when they are absent or LISTEN_PID is another process's.  false with
 * errp set for variables that do not parse. */
bool service_listen_fds_init(Error **errp);
/* A warning on stderr for each passed socket no option used. */
void service_warn_unused_fds(void);

/* READY=1 (with MAINPID and STATUS) to $NOTIFY_SOCKET, when set: every
 * option was processed. */
void service_notify_ready(void);
/* STOPPING=1: shutdown begins. */
void service_notify_stopping(void);

/* argv with every `--config FILE` (or --config=FILE) replaced by FILE's
 * options (util/optfile.h) as `--NAME[=VALUE]` arguments, each checked
 * against `options` (unknown, nested --config, missing or unexpected
 * value: an error naming FILE:LINE).  *ret_argv (NULL-terminated) and
 * *ret_origin (for each argument, "FILE:LINE" or NULL for one from the
 * command line) are freed with config_argv_free.  false with errp set. */
bool config_expand_argv(int argc, char **argv, const struct option *options,
                        int *ret_argc, char ***ret_argv, char ***ret_origin,
                        Error **errp);
void config_argv_free(int argc, char **argv, char **origin);

#endif
