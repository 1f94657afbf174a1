/*
 * Load generators for the agent benchmarks (compiled by bench/netload.py with the system C compiler).
 *
 *   netload pp-server IP PORT              TCP ping-pong server: echoes every message back
 *   netload pp-client IP PORT N SIZE       N round trips of SIZE bytes on one connection (TCP_NODELAY);
 *                                          prints every round-trip time in ns, one per line
 *   netload cc-server IP PORT              accepts connections, reads one byte and closes them
 *   netload cc-client IP PORT RATE SECS    opens RATE connections per second for SECS seconds (at most 3*SECS
 *                                          of wall time), each one connect + 1-byte write + wait for the
 *                                          server's close + close; prints "done N failed F"
 *   netload udp-server IP PORT             receives UDP datagrams and discards them
 *   netload udp-client IP PORT RATE SECS [FLOWS]  sends RATE 64-byte datagrams per second for SECS seconds,
 *                                          spread over FLOWS source ports; prints "sent N"
 *
 * Every loop is bounded (N, SECS); the servers exit when their parent closes stdin.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static struct sockaddr_in addr_of(const char *ip, int port)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
	inet_pton(AF_INET, ip, &a.sin_addr);
	return a;
}

static int listener(const char *ip, int port)
{
	struct sockaddr_in a = addr_of(ip, port);
	int one = 1, fd = socket(AF_INET, SOCK_STREAM, 0);
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) || listen(fd, 4096)) {
		perror("bind/listen");
		exit(1);
	}
	printf("ready\n");
	fflush(stdout);
	return fd;
}

static void *stdin_watch(void *arg)
{
	char buf[64];
	(void)arg;
	while (read(0, buf, sizeof(buf)) > 0)
		;
	exit(0);
}

static void *pp_conn(void *arg)
{
	int fd = (int)(intptr_t)arg, one = 1;
	char buf[65536];
	ssize_t n;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	while ((n = read(fd, buf, sizeof(buf))) > 0)
		if (write(fd, buf, n) != n)
			break;
	close(fd);
	return NULL;
}

static void *cc_conn(void *arg)
{
	int fd = (int)(intptr_t)arg;
	char buf[64];
	/* read the client's byte, then close first: TIME_WAIT stays on this side, the client's ports are free */
	(void)read(fd, buf, sizeof(buf));
	close(fd);
	return NULL;
}

static __attribute__((noreturn)) void serve(const char *ip, int port, void *(*fn)(void *), int inline_conn)
{
	pthread_t t;
	int lfd = listener(ip, port);
	pthread_create(&t, NULL, stdin_watch, NULL);
	for (;;) {
		int fd = accept(lfd, NULL, NULL);
		if (fd < 0)
			continue;
		if (inline_conn) {
			fn((void *)(intptr_t)fd);
		} else {
			pthread_create(&t, NULL, fn, (void *)(intptr_t)fd);
			pthread_detach(t);
		}
	}
}

static int pp_client(const char *ip, int port, long n, int size)
{
	struct sockaddr_in a = addr_of(ip, port);
	int one = 1, fd = socket(AF_INET, SOCK_STREAM, 0);
	char *buf = calloc(1, size);
	uint64_t *rtt = calloc(n, sizeof(uint64_t));
	if (connect(fd, (struct sockaddr *)&a, sizeof(a))) {
		perror("connect");
		return 1;
	}
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	for (long i = 0; i < n; i++) {
		uint64_t t0 = now_ns();
		int got = 0;
		if (write(fd, buf, size) != size)
			return 1;
		while (got < size) {
			ssize_t r = read(fd, buf + got, size - got);
			if (r <= 0)
				return 1;
			got += r;
		}
		rtt[i] = now_ns() - t0;
	}
	close(fd);
	for (long i = 0; i < n; i++)
		printf("%llu\n", (unsigned long long)rtt[i]);
	return 0;
}

static int cc_client(const char *ip, int port, long rate, int secs)
{
	struct sockaddr_in a = addr_of(ip, port);
	uint64_t start = now_ns(), step = 1000000000ull / rate;
	long total = rate * secs, done = 0, failed = 0;
	for (long i = 0; i < total; i++) {
		uint64_t due = start + i * step, t;
		char buf[16];
		if (now_ns() - start > 3ull * secs * 1000000000ull)
			break; /* far behind schedule: stop anyway, the count says how many were made */
		while ((t = now_ns()) < due) {
			struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)(due - t)};
			nanosleep(&ts, NULL);
		}
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		if (connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0 && write(fd, "x", 1) == 1) {
			while (read(fd, buf, sizeof(buf)) > 0)
				; /* the server closes first */
			done++;
		} else {
			failed++;
		}
		close(fd);
	}
	printf("done %ld failed %ld\n", done, failed);
	return 0;
}

static int udp_server(const char *ip, int port)
{
	struct sockaddr_in a = addr_of(ip, port);
	int fd = socket(AF_INET, SOCK_DGRAM, 0), size = 8 << 20;
	pthread_t t;
	char buf[2048];
	setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
	if (bind(fd, (struct sockaddr *)&a, sizeof(a))) {
		perror("bind");
		return 1;
	}
	printf("ready\n");
	fflush(stdout);
	pthread_create(&t, NULL, stdin_watch, NULL);
	for (;;)
		recv(fd, buf, sizeof(buf), 0);
}

static int udp_client(const char *ip, int port, long rate, int secs, int flows)
{
	struct sockaddr_in a = addr_of(ip, port);
	int fds[256];
	char buf[64] = {0};
	uint64_t start = now_ns();
	long total = rate * secs, sent = 0;
	if (flows < 1 || flows > 256)
		flows = 1;
	for (int i = 0; i < flows; i++) {
		fds[i] = socket(AF_INET, SOCK_DGRAM, 0);
		connect(fds[i], (struct sockaddr *)&a, sizeof(a));
	}
	for (long i = 0; i < total; i++) {
		/* paced in bursts of 64; sleeps (not spins) while ahead, so the sender leaves CPU to the rest */
		if ((i & 63) == 0) {
			uint64_t due = start + (uint64_t)((double)i * 1e9 / rate), t;
			while ((t = now_ns()) < due) {
				struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)(due - t)};
				nanosleep(&ts, NULL);
			}
		}
		if (send(fds[i % flows], buf, sizeof(buf), 0) == sizeof(buf))
			sent++;
	}
	printf("sent %ld elapsed_ns %llu\n", sent, (unsigned long long)(now_ns() - start));
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 4 && !strcmp(argv[1], "pp-server"))
		serve(argv[2], atoi(argv[3]), pp_conn, 0);
	if (argc >= 6 && !strcmp(argv[1], "pp-client"))
		return pp_client(argv[2], atoi(argv[3]), atol(argv[4]), atoi(argv[5]));
	if (argc >= 4 && !strcmp(argv[1], "cc-server"))
		serve(argv[2], atoi(argv[3]), cc_conn, 1);
	if (argc >= 6 && !strcmp(argv[1], "cc-client"))
		return cc_client(argv[2], atoi(argv[3]), atol(argv[4]), atoi(argv[5]));
	if (argc >= 4 && !strcmp(argv[1], "udp-server"))
		return udp_server(argv[2], atoi(argv[3]));
	if (argc >= 6 && !strcmp(argv[1], "udp-client"))
		return udp_client(argv[2], atoi(argv[3]), atol(argv[4]), atoi(argv[5]), argc > 6 ? atoi(argv[6]) : 1);
	fprintf(stderr, "usage: see the comment at the top of netload.c\n");
	return 2;
}
