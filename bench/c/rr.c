/* A load generator and echo target that cost a few microseconds per round trip, so
 * that latency rows measure the tunnel rather than the client (bench/e2e_tools.py).
 *
 *   rr serve PORT                  epoll echo server on 127.0.0.1:PORT (0: any free port);
 *                                  prints the port, then serves until killed
 *   rr rr PORT SECONDS SIZE        SIZE-byte request/response on one kept connection
 *   rr connect PORT SECONDS        connect, send 1 byte, read it back, close; repeat
 *
 * The client modes print one line: "samples p50_us p99_us p999_us".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_SAMPLES 2000000

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return addr;
}

static int dial(int port) {
    struct sockaddr_in addr = loopback(port);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    if (fd < 0) die("socket");
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
    return fd;
}

static int read_full(int fd, char *buf, size_t len) {
    size_t got = 0;
    while (got < len) {
        ssize_t n = read(fd, buf + got, len - got);
        if (n <= 0) return -1;
        got += (size_t)n;
    }
    return 0;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void report(double *samples, long count) {
    if (count == 0) {
        printf("0 0 0 0\n");
        return;
    }
    qsort(samples, (size_t)count, sizeof *samples, cmp);
    printf("%ld %.1f %.1f %.1f\n", count, samples[count / 2] * 1e6,
           samples[(long)(count * 0.99)] * 1e6, samples[(long)(count * 0.999)] * 1e6);
}

__attribute__((noreturn)) static void serve(int port) {
    struct sockaddr_in addr = loopback(port);
    socklen_t alen = sizeof addr;
    int one = 1, ep, lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    struct epoll_event ev, events[256];
    static char buf[1 << 16];
    if (lfd < 0) die("socket");
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (listen(lfd, 4096) < 0) die("listen");
    getsockname(lfd, (struct sockaddr *)&addr, &alen);
    printf("%d\n", ntohs(addr.sin_port));
    fflush(stdout);
    ep = epoll_create1(0);
    ev.events = EPOLLIN;
    ev.data.fd = lfd;
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == lfd) {
                int c;
                while ((c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    ev.events = EPOLLIN;
                    ev.data.fd = c;
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
                }
                continue;
            }
            ssize_t got = read(fd, buf, sizeof buf);
            if (got <= 0) {
                if (got < 0 && errno == EAGAIN) continue;
                close(fd);
                continue;
            }
            /* Echoes are small (a request at a time): a blocking-style loop is enough. */
            for (ssize_t off = 0; off < got;) {
                ssize_t w = write(fd, buf + off, (size_t)(got - off));
                if (w < 0) {
                    if (errno == EAGAIN) continue;
                    close(fd);
                    break;
                }
                off += w;
            }
        }
    }
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "serve") == 0) serve(atoi(argv[2]));
    if (argc < 4) {
        fprintf(stderr, "usage: rr serve PORT | rr rr PORT SECONDS SIZE | rr connect PORT SECONDS\n");
        return 2;
    }
    int port = atoi(argv[2]);
    double seconds = atof(argv[3]), end;
    double *samples = malloc(sizeof(double) * MAX_SAMPLES);
    long count = 0;
    char buf[65536];
    if (!samples) die("malloc");
    if (strcmp(argv[1], "rr") == 0 && argc == 5) {
        size_t size = (size_t)atoi(argv[4]);
        int fd = dial(port);
        if (size == 0 || size > sizeof buf) size = 64;
        memset(buf, 'x', size);
        /* Warm up the path before the clock starts. */
        for (int i = 0; i < 100; i++)
            if (write(fd, buf, size) != (ssize_t)size || read_full(fd, buf, size) < 0) die("warm-up");
        end = now() + seconds;
        while (count < MAX_SAMPLES) {
            double t0 = now();
            if (t0 > end) break;
            if (write(fd, buf, size) != (ssize_t)size || read_full(fd, buf, size) < 0) die("round trip");
            samples[count++] = now() - t0;
        }
        close(fd);
    } else if (strcmp(argv[1], "connect") == 0) {
        end = now() + seconds;
        while (count < MAX_SAMPLES) {
            double t0 = now();
            if (t0 > end) break;
            int fd = dial(port);
            if (write(fd, "x", 1) != 1 || read_full(fd, buf, 1) < 0) die("first byte");
            samples[count++] = now() - t0;
            close(fd);
        }
    } else {
        fprintf(stderr, "rr: unknown mode %s\n", argv[1]);
        return 2;
    }
    report(samples, count);
    return 0;
}
