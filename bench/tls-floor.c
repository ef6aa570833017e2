/*
 * tls-floor: how fast can this machine move bytes through one TLS
 * connection on TCP loopback, with nothing else to do?
 *
 * A forked sender writes TOTAL bytes in CHUNK-sized calls (an NBD read
 * reply's payload) and the parent receives and discards them.  Mode
 * "plain" uses send()/recv(); mode "tls" uses GnuTLS (PSK key exchange,
 * the given priority string) on the same socket.  Both processes share
 * the machine's cores, as bitbackd and `bitback backup --pull` do in
 * bench/pull.py, so the result is a ceiling for a pull over TLS here:
 * whatever NBD, the disk and the repository add can only lower it.
 * Mode "x509" authenticates with certificates in QEMU's folder layout
 * (SERVER_DIR: ca-cert.pem, server-cert.pem, server-key.pem; CLIENT_DIR:
 * ca-cert.pem, client-cert.pem, client-key.pem), as pull-tls does.
 *
 * Prints one line: mode, cipher, seconds, MiB/s, CPU seconds per GiB of
 * the sender, of the receiver, and of both.
 *
 * Usage: tls-floor plain|tls TOTAL_MIB CHUNK_KIB [PRIORITY]
 *        tls-floor x509 TOTAL_MIB CHUNK_KIB PRIORITY SERVER_DIR CLIENT_DIR
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <gnutls/gnutls.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const unsigned char psk_key[32] = {
    0x3a, 0x51, 0x09, 0x7c, 0xee, 0x14, 0x62, 0x8d, 0x21, 0x9f, 0x4b,
    0x70, 0xd3, 0x05, 0x88, 0xb6, 0x1e, 0x43, 0xa9, 0x5f, 0x02, 0xcc,
    0x97, 0x38, 0x6a, 0xf1, 0x2d, 0x84, 0x5b, 0xe0, 0x17, 0xc6,
};

static void die(const char *what, int err)
{
    if (err < 0) {
        fprintf(stderr, "tls-floor: %s: %s\n", what, gnutls_strerror(err));
    } else {
        fprintf(stderr, "tls-floor: %s: %s\n", what, strerror(errno));
    }
    exit(1);
}

static int server_psk(gnutls_session_t s, const char *user,
                      gnutls_datum_t *key)
{
    (void)s;
    (void)user;
    key->data = gnutls_malloc(sizeof(psk_key));
    if (!key->data) {
        return -1;
    }
    memcpy(key->data, psk_key, sizeof(psk_key));
    key->size = sizeof(psk_key);
    return 0;
}

static void x509_creds(gnutls_session_t s, bool server, const char *dir)
{
    gnutls_certificate_credentials_t c;
    char ca[4096], cert[4096], key[4096];
    const char *who = server ? "server" : "client";
    snprintf(ca, sizeof(ca), "%s/ca-cert.pem", dir);
    snprintf(cert, sizeof(cert), "%s/%s-cert.pem", dir, who);
    snprintf(key, sizeof(key), "%s/%s-key.pem", dir, who);
    int r = gnutls_certificate_allocate_credentials(&c);
    if (r >= 0) {
        r = gnutls_certificate_set_x509_trust_file(c, ca, GNUTLS_X509_FMT_PEM);
    }
    if (r >= 0) {
        r = gnutls_certificate_set_x509_key_file(c, cert, key, GNUTLS_X509_FMT_PEM);
    }
    if (r >= 0) {
        r = gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, c);
    }
    if (r < 0) {
        die(dir, r);
    }
    if (server) {
        gnutls_certificate_server_set_request(s, GNUTLS_CERT_REQUIRE);
    }
}

static gnutls_session_t tls_start(int fd, bool server, const char *prio,
                                  const char *x509_dir)
{
    gnutls_session_t s;
    int r = gnutls_init(&s, server ? GNUTLS_SERVER : GNUTLS_CLIENT);
    if (r < 0) {
        die("gnutls_init", r);
    }
    if (x509_dir) {
        x509_creds(s, server, x509_dir);
        r = 0;
    } else if (server) {
        gnutls_psk_server_credentials_t c;
        gnutls_psk_allocate_server_credentials(&c);
        gnutls_psk_set_server_credentials_function(c, server_psk);
        r = gnutls_credentials_set(s, GNUTLS_CRD_PSK, c);
    } else {
        gnutls_psk_client_credentials_t c;
        gnutls_datum_t key = { (unsigned char *)psk_key, sizeof(psk_key) };
        gnutls_psk_allocate_client_credentials(&c);
        gnutls_psk_set_client_credentials(c, "floor", &key, GNUTLS_PSK_KEY_RAW);
        r = gnutls_credentials_set(s, GNUTLS_CRD_PSK, c);
    }
    if (r < 0) {
        die("gnutls_credentials_set", r);
    }
    const char *errpos = NULL;
    r = gnutls_priority_set_direct(s, prio, &errpos);
    if (r < 0) {
        fprintf(stderr, "tls-floor: priority error at: %s\n", errpos ? errpos : "?");
        die("gnutls_priority_set_direct", r);
    }
    gnutls_transport_set_int(s, fd);
    do {
        r = gnutls_handshake(s);
    } while (r < 0 && !gnutls_error_is_fatal(r));
    if (r < 0) {
        die("gnutls_handshake", r);
    }
    return s;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_of(const struct rusage *ru)
{
    return ru->ru_utime.tv_sec + ru->ru_utime.tv_usec / 1e6 +
           ru->ru_stime.tv_sec + ru->ru_stime.tv_usec / 1e6;
}

int main(int argc, char **argv)
{
    bool x509 = argc == 7 && !strcmp(argv[1], "x509");
    if (argc < 4 || (strcmp(argv[1], "plain") && strcmp(argv[1], "tls") && !x509)) {
        fprintf(stderr, "usage: tls-floor plain|tls TOTAL_MIB CHUNK_KIB [PRIORITY]\n"
                        "       tls-floor x509 TOTAL_MIB CHUNK_KIB PRIORITY "
                        "SERVER_DIR CLIENT_DIR\n");
        return 2;
    }
    bool tls = strcmp(argv[1], "plain") != 0;
    const char *server_dir = x509 ? argv[5] : NULL;
    const char *client_dir = x509 ? argv[6] : NULL;
    uint64_t total = strtoull(argv[2], NULL, 10) << 20;
    size_t chunk = strtoull(argv[3], NULL, 10) << 10;
    const char *prio = argc > 4 ? argv[4] : "NORMAL:+ECDHE-PSK:+PSK";
    if (!total || !chunk) {
        fprintf(stderr, "tls-floor: TOTAL_MIB and CHUNK_KIB must be positive\n");
        return 2;
    }
    unsigned char *buf = malloc(chunk);
    if (!buf) {
        die("malloc", 0);
    }
    for (size_t i = 0; i < chunk; i++) {
        buf[i] = (unsigned char)(i * 2654435761u >> 13);
    }
    gnutls_global_init();

    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t alen = sizeof(a);
    if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof(a)) < 0 ||
        listen(ls, 1) < 0 || getsockname(ls, (struct sockaddr *)&a, &alen) < 0) {
        die("listen", 0);
    }

    pid_t pid = fork();
    if (pid < 0) {
        die("fork", 0);
    }
    if (pid == 0) {
        int fd = accept(ls, NULL, NULL);
        if (fd < 0) {
            die("accept", 0);
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        gnutls_session_t s = tls ? tls_start(fd, true, prio, server_dir) : NULL;
        for (uint64_t sent = 0; sent < total;) {
            size_t n = total - sent < chunk ? total - sent : chunk;
            size_t off = 0;
            while (off < n) {
                ssize_t w = tls ? gnutls_record_send(s, buf + off, n - off)
                                : send(fd, buf + off, n - off, 0);
                if (w < 0) {
                    if (tls ? gnutls_error_is_fatal(w) : errno != EINTR) {
                        die("send", tls ? (int)w : 0);
                    }
                    continue;
                }
                off += w;
            }
            sent += n;
        }
        if (tls) {
            gnutls_bye(s, GNUTLS_SHUT_WR);
        }
        close(fd);
        _exit(0);
    }

    close(ls);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
        die("connect", 0);
    }
    gnutls_session_t s = tls ? tls_start(fd, false, prio, client_dir) : NULL;
    const char *cipher = tls ? gnutls_cipher_get_name(gnutls_cipher_get(s)) : "none";
    struct rusage r0, r1, rc;
    getrusage(RUSAGE_SELF, &r0);
    double t0 = now();
    for (uint64_t got = 0; got < total;) {
        ssize_t r = tls ? gnutls_record_recv(s, buf, chunk)
                        : recv(fd, buf, chunk, 0);
        if (r < 0) {
            if (tls ? gnutls_error_is_fatal(r) : errno != EINTR) {
                die("recv", tls ? (int)r : 0);
            }
            continue;
        }
        if (r == 0) {
            fprintf(stderr, "tls-floor: sender stopped early\n");
            return 1;
        }
        got += r;
    }
    double secs = now() - t0;
    getrusage(RUSAGE_SELF, &r1);
    int status;
    if (wait4(pid, &status, 0, &rc) < 0 || !WIFEXITED(status) ||
        WEXITSTATUS(status)) {
        fprintf(stderr, "tls-floor: sender failed\n");
        return 1;
    }
    double gib = total / (double)(1 << 30);
    double recv_cpu = cpu_of(&r1) - cpu_of(&r0);
    double send_cpu = cpu_of(&rc);
    printf("%-5s %-12s %7.2f s %8.0f MiB/s  CPU-s/GiB sender %.2f receiver %.2f both %.2f\n",
           argv[1], cipher, secs, total / 1048576.0 / secs, send_cpu / gib,
           recv_cpu / gib, (send_cpu + recv_cpu) / gib);
    return 0;
}
