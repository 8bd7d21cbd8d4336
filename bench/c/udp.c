/* UDP load generator and target for bench/e2e_udp.py: cheap enough per datagram that
 * the rows measure the path between them, not these programs.
 *
 *   udp serve PORT                      target on 127.0.0.1:PORT (0: any free port); prints
 *                                       the port. Counts every datagram; echoes those that
 *                                       start with 'P' (pings). Each line read on stdin
 *                                       prints "count bytes seconds jitter_us sources" (so
 *                                       far, its CLOCK_MONOTONIC, RFC 3550 jitter of the
 *                                       timestamped datagrams and distinct source
 *                                       addresses); a line "r" then restarts the jitter
 *                                       estimate and the source set.
 *   udp send PORT SECONDS SIZE RATE FLOWS
 *                                       SIZE-byte datagrams from FLOWS sockets in turn at
 *                                       RATE datagrams/s (0: as fast as the kernel takes
 *                                       them, in sendmmsg batches); prints "sent seconds"
 *   udp ping PORT SECONDS SIZE          SIZE-byte ping-pong on one socket, a reply awaited
 *                                       200 ms; prints "samples p50_us p99_us p999_us lost"
 *
 * A data datagram is 'D', 7 spare bytes, its send time (ns, CLOCK_MONOTONIC) and its
 * sequence number; all processes run on one machine, so the target can compute transit
 * times from the sender's clock.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_SAMPLES 2000000
#define MAX_SOURCES 4096
#define BATCH 64
#define HEADER 24

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
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

static int udp_socket(void) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0), size = 8 << 20;
    if (fd < 0) die("socket");
    /* Large buffers, so that a burst is not lost in this program's own socket. */
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    return fd;
}

static int dial(int port) {
    struct sockaddr_in addr = loopback(port);
    int fd = udp_socket();
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
    return fd;
}

/* ---------------------------------------------------------------------------- serve */

__attribute__((noreturn)) static void serve(int port) {
    struct sockaddr_in addr = loopback(port), from[BATCH];
    socklen_t alen = sizeof addr;
    static char bufs[BATCH][65536];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    static struct sockaddr_in sources[MAX_SOURCES];
    int nsources = 0, last = -1;
    long long count = 0, bytes = 0;
    double jitter = 0, prev_transit = 0;
    int have_transit = 0;
    char line[256];
    int fd = udp_socket();
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    getsockname(fd, (struct sockaddr *)&addr, &alen);
    printf("%d\n", ntohs(addr.sin_port));
    fflush(stdout);
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = sizeof bufs[i];
    }
    struct pollfd fds[2] = {{fd, POLLIN, 0}, {0, POLLIN, 0}};
    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            die("poll");
        }
        if (fds[1].revents) {
            if (!fgets(line, sizeof line, stdin)) exit(0); /* the harness went away */
            printf("%lld %lld %.6f %.1f %d\n", count, bytes, now_ns() / 1e9, jitter / 1e3, nsources);
            fflush(stdout);
            if (line[0] == 'r') {
                jitter = 0;
                have_transit = 0;
                nsources = 0;
                last = -1;
            }
        }
        if (!fds[0].revents) continue;
        for (int i = 0; i < BATCH; i++) {
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = &from[i];
            msgs[i].msg_hdr.msg_namelen = sizeof from[i];
        }
        int n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            die("recvmmsg");
        }
        int64_t t = now_ns();
        for (int i = 0; i < n; i++) {
            unsigned len = msgs[i].msg_len;
            const char *buf = bufs[i];
            count++;
            bytes += len;
            if (len && buf[0] == 'P') {
                sendto(fd, buf, len, 0, (struct sockaddr *)&from[i], sizeof from[i]);
                continue;
            }
            /* Distinct sources: the last one first (one flow is the common case). */
            if (last < 0 || sources[last].sin_port != from[i].sin_port ||
                sources[last].sin_addr.s_addr != from[i].sin_addr.s_addr) {
                last = -1;
                for (int s = 0; s < nsources; s++)
                    if (sources[s].sin_port == from[i].sin_port &&
                        sources[s].sin_addr.s_addr == from[i].sin_addr.s_addr) {
                        last = s;
                        break;
                    }
                if (last < 0 && nsources < MAX_SOURCES) {
                    sources[nsources] = from[i];
                    last = nsources++;
                }
            }
            if (len >= HEADER && buf[0] == 'D') {
                int64_t sent;
                memcpy(&sent, buf + 8, sizeof sent);
                double transit = (double)(t - sent);
                if (have_transit) {
                    double d = transit - prev_transit;
                    if (d < 0) d = -d;
                    jitter += (d - jitter) / 16.0; /* RFC 3550, 6.4.1 */
                }
                prev_transit = transit;
                have_transit = 1;
            }
        }
    }
}

/* ---------------------------------------------------------------------------- send */

static void send_flows(int port, double seconds, size_t size, double rate, int nflows) {
    static char bufs[BATCH][65536];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    int *fds = malloc(sizeof(int) * (size_t)nflows);
    long long sent = 0, errors = 0;
    uint64_t seq = 0;
    if (!fds) die("malloc");
    if (size < HEADER) size = HEADER;
    if (size > sizeof bufs[0]) size = sizeof bufs[0];
    for (int f = 0; f < nflows; f++) fds[f] = dial(port);
    for (int i = 0; i < BATCH; i++) {
        memset(bufs[i], 'x', size);
        bufs[i][0] = 'D';
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = size;
        memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    int64_t start = now_ns(), end = start + (int64_t)(seconds * 1e9);
    int flow = 0;
    for (;;) {
        int64_t t = now_ns();
        if (t >= end) break;
        int batch = BATCH;
        if (rate > 0) {
            /* Paced: send what is due by now, one datagram per call so that each carries
             * its own send time (the jitter the target computes is the path's). */
            long long due = (long long)((double)(t - start) / 1e9 * rate) - sent;
            if (due <= 0) {
                struct timespec pause = {0, 20000};
                nanosleep(&pause, NULL);
                continue;
            }
            batch = due > BATCH ? BATCH : (int)due;
            for (int i = 0; i < batch; i++) {
                int64_t ti = now_ns();
                memcpy(bufs[0] + 8, &ti, sizeof ti);
                memcpy(bufs[0] + 16, &seq, sizeof seq);
                seq++;
                if (send(fds[flow], bufs[0], size, 0) < 0) errors++;
                else sent++;
                flow = (flow + 1) % nflows;
            }
            continue;
        }
        for (int i = 0; i < batch; i++) {
            memcpy(bufs[i] + 8, &t, sizeof t);
            memcpy(bufs[i] + 16, &seq, sizeof seq);
            seq++;
        }
        int n = sendmmsg(fds[flow], msgs, (unsigned)batch, 0);
        if (n < 0) errors += batch;
        else sent += n;
        flow = (flow + 1) % nflows;
    }
    printf("%lld %.6f %lld\n", sent, (now_ns() - start) / 1e9, errors);
}

/* ---------------------------------------------------------------------------- ping */

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int ping_once(int fd, char *buf, size_t size, uint64_t seq, double *rtt) {
    char reply[65536];
    memcpy(buf + 8, &seq, sizeof seq);
    int64_t t0 = now_ns();
    if (send(fd, buf, size, 0) < 0) return 0;
    for (;;) {
        ssize_t n = recv(fd, reply, sizeof reply, 0);
        if (n < 0) return 0; /* 200 ms without the reply: lost */
        uint64_t got;
        memcpy(&got, reply + 8, sizeof got);
        if ((size_t)n == size && got == seq) {
            *rtt = (now_ns() - t0) / 1e9;
            return 1;
        }
        /* A late reply to an earlier ping: not this one's. */
    }
}

static void ping(int port, double seconds, size_t size) {
    double *samples = malloc(sizeof(double) * MAX_SAMPLES), rtt;
    long count = 0, lost = 0;
    char buf[65536];
    struct timeval timeout = {0, 200000};
    uint64_t seq = 0;
    int fd = dial(port);
    if (!samples) die("malloc");
    if (size < 16) size = 16;
    if (size > sizeof buf) size = sizeof buf;
    memset(buf, 'p', size);
    buf[0] = 'P';
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    for (int i = 0; i < 100; i++) ping_once(fd, buf, size, seq++, &rtt); /* warm-up */
    int64_t end = now_ns() + (int64_t)(seconds * 1e9);
    while (count < MAX_SAMPLES && now_ns() < end) {
        if (ping_once(fd, buf, size, seq++, &rtt)) samples[count++] = rtt;
        else lost++;
    }
    if (count == 0) {
        printf("0 0 0 0 %ld\n", lost);
        return;
    }
    qsort(samples, (size_t)count, sizeof *samples, cmp);
    printf("%ld %.1f %.1f %.1f %ld\n", count, samples[count / 2] * 1e6, samples[(long)(count * 0.99)] * 1e6,
           samples[(long)(count * 0.999)] * 1e6, lost);
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "serve") == 0) serve(atoi(argv[2]));
    if (argc == 7 && strcmp(argv[1], "send") == 0) {
        int flows = atoi(argv[6]);
        send_flows(atoi(argv[2]), atof(argv[3]), (size_t)atoi(argv[4]), atof(argv[5]), flows > 0 ? flows : 1);
        return 0;
    }
    if (argc == 5 && strcmp(argv[1], "ping") == 0) {
        ping(atoi(argv[2]), atof(argv[3]), (size_t)atoi(argv[4]));
        return 0;
    }
    fprintf(stderr, "usage: udp serve PORT | udp send PORT SECONDS SIZE RATE FLOWS | udp ping PORT SECONDS SIZE\n");
    return 2;
}
