/* tcpload: a tiny TCP load generator for the datapath bench (compiled with cc at bench time).
 *
 *   tcpload serve PORT SECONDS      accept connections one after another for at most SECONDS;
 *                                   echo every request back until the peer closes
 *   tcpload crr IP PORT N SIZE      N times: connect, send SIZE bytes, read SIZE bytes, close
 *                                   (like netperf TCP_CRR)
 *   tcpload rr IP PORT N SIZE       one connection, N round trips of SIZE bytes (like TCP_RR)
 *
 * The client prints "ok <seconds>" (wall time of the N transactions only) or
 * "error <what> <errno text>" and exits 1. Every blocking call has a 2 s
 * timeout, so a dropped packet ends the run instead of hanging it.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MAX_SIZE 4096

static double now(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void timeouts(int fd) {
	struct timeval tv = {.tv_sec = 2, .tv_usec = 0};
	int one = 1;
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

static int fail(const char *what) {
	printf("error %s %s\n", what, strerror(errno));
	return 1;
}

/* read exactly len bytes; 0 on success, -1 on error or early EOF */
static int read_full(int fd, char *buf, int len) {
	int got = 0;
	while (got < len) {
		ssize_t r = recv(fd, buf + got, len - got, 0);
		if (r <= 0) {
			if (r == 0)
				errno = ECONNRESET;
			return -1;
		}
		got += r;
	}
	return 0;
}

static int serve(int port, int seconds) {
	int srv = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = INADDR_ANY};
	char buf[MAX_SIZE];
	double deadline = now() + seconds;

	setsockopt(srv, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(srv, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(srv, 1024) < 0)
		return fail("bind");
	printf("READY\n");
	fflush(stdout);
	while (now() < deadline) {
		struct pollfd p = {.fd = srv, .events = POLLIN};
		if (poll(&p, 1, 1000) <= 0)
			continue;
		int c = accept(srv, NULL, NULL);
		if (c < 0)
			continue;
		timeouts(c);
		for (;;) {
			ssize_t r = recv(c, buf, sizeof(buf), 0);
			if (r <= 0 || send(c, buf, r, MSG_NOSIGNAL) != r)
				break;
		}
		close(c);
	}
	return 0;
}

static int client(int crr, const char *ip, int port, long n, int size) {
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
	char req[MAX_SIZE], resp[MAX_SIZE];
	int fd = -1;

	if (size < 1 || size > MAX_SIZE || inet_pton(AF_INET, ip, &addr.sin_addr) != 1) {
		printf("error arguments\n");
		return 1;
	}
	memset(req, 'x', size);
	double t0 = now();
	for (long i = 0; i < n; i++) {
		if (fd < 0) {
			fd = socket(AF_INET, SOCK_STREAM, 0);
			timeouts(fd);
			if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
				return fail("connect");
		}
		if (send(fd, req, size, MSG_NOSIGNAL) != size)
			return fail("send");
		if (read_full(fd, resp, size) < 0)
			return fail("recv");
		if (crr) {
			close(fd);
			fd = -1;
		}
	}
	double elapsed = now() - t0;
	if (fd >= 0)
		close(fd);
	printf("ok %.6f\n", elapsed);
	return 0;
}

int main(int argc, char **argv) {
	if (argc == 4 && strcmp(argv[1], "serve") == 0)
		return serve(atoi(argv[2]), atoi(argv[3]));
	if (argc == 6 && (strcmp(argv[1], "crr") == 0 || strcmp(argv[1], "rr") == 0))
		return client(strcmp(argv[1], "crr") == 0, argv[2], atoi(argv[3]), atol(argv[4]), atoi(argv[5]));
	fprintf(stderr, "usage: tcpload serve PORT SECONDS | crr|rr IP PORT N SIZE\n");
	return 2;
}
