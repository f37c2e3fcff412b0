/* SPDX-License-Identifier: Apache-2.0 */
/* rr: netperf's TCP_RR and TCP_CRR, the two tests the datapath benchmark needs
 * (netperf is not in Debian main).
 *
 *   rr server PORT [spin]              answer every byte with a byte, on every connection
 *   rr rr  HOST PORT SECONDS [spin]    TCP_RR: 1-byte request, 1-byte response, one
 *                                      connection, as fast as possible
 *   rr crr HOST PORT SECONDS           TCP_CRR: connect, 1-byte request, 1-byte response,
 *                                      close, over and over
 *
 * "spin" busy-polls the socket (non-blocking reads in a loop) instead of sleeping in
 * read(): the CPU never goes idle, so the figure is the network path's cost without the
 * wake-up latency of an idle CPU (large in a VM). Off by default, as in netperf.
 *
 * The client prints one JSON line: {"mode", "transactions", "seconds", "rate", "errors"}.
 * The server serves one connection at a time, which is all either test needs (each is
 * one client doing one thing at a time), and keeps going until it is killed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	fprintf(stderr, "rr: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void nodelay(int fd)
{
	int one = 1;

	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

static ssize_t read1(int fd, char *c, int spin)
{
	ssize_t n;

	if (!spin)
		return read(fd, c, 1);
	while ((n = recv(fd, c, 1, MSG_DONTWAIT)) < 0 && errno == EAGAIN)
		;
	return n;
}

static void __attribute__((noreturn)) serve(int port, int spin)
{
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(port) };
	int one = 1, lfd;

	signal(SIGPIPE, SIG_IGN);
	lfd = socket(AF_INET, SOCK_STREAM, 0);
	if (lfd < 0)
		die("socket");
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		die("bind");
	if (listen(lfd, 4096) < 0)
		die("listen");
	for (;;) {
		int fd = accept(lfd, NULL, NULL);
		char c;

		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			die("accept");
		}
		nodelay(fd);
		while (read1(fd, &c, spin) == 1)
			if (write(fd, &c, 1) != 1)
				break;
		close(fd);
	}
}

static int dial(const struct sockaddr_in *addr)
{
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	if (fd < 0)
		die("socket");
	nodelay(fd);
	if (connect(fd, (const struct sockaddr *)addr, sizeof(*addr)) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

static int ping(int fd, int spin)
{
	char c = 'x';

	return write(fd, &c, 1) == 1 && read1(fd, &c, spin) == 1;
}

int main(int argc, char **argv)
{
	struct sockaddr_in addr = { .sin_family = AF_INET };
	long transactions = 0, errors = 0;
	double seconds, start, end, t;
	int crr, spin, fd = -1;

	if ((argc == 3 || argc == 4) && !strcmp(argv[1], "server"))
		serve(atoi(argv[2]), argc == 4 && !strcmp(argv[3], "spin"));
	if ((argc != 5 && argc != 6) || (strcmp(argv[1], "rr") && strcmp(argv[1], "crr"))) {
		fprintf(stderr, "usage: rr server PORT [spin] | rr {rr|crr} HOST PORT SECONDS [spin]\n");
		return 2;
	}
	crr = !strcmp(argv[1], "crr");
	spin = argc == 6 && !strcmp(argv[5], "spin");
	if (inet_pton(AF_INET, argv[2], &addr.sin_addr) != 1) {
		fprintf(stderr, "rr: bad IPv4 address %s\n", argv[2]);
		return 2;
	}
	addr.sin_port = htons(atoi(argv[3]));
	seconds = atof(argv[4]);
	signal(SIGPIPE, SIG_IGN);

	if (!crr) {
		fd = dial(&addr);
		if (fd < 0)
			die("connect");
	}
	start = now();
	end = start + seconds;
	do {
		if (crr) {
			fd = dial(&addr);
			if (fd < 0) {
				/* Out of ports or the server's backlog: count it, and do not
				 * let a storm of failures pass for transactions. */
				if (++errors > 1000)
					die("connect (1000 failures)");
				continue;
			}
		}
		if (!ping(fd, spin))
			die("request/response");
		transactions++;
		if (crr)
			close(fd);
	} while ((t = now()) < end);
	if (!crr)
		close(fd);
	t -= start;
	printf("{\"mode\": \"%s%s\", \"transactions\": %ld, \"seconds\": %.6f, "
	       "\"rate\": %.1f, \"errors\": %ld}\n",
	       argv[1], spin ? "_spin" : "", transactions, t, transactions / t, errors);
	return 0;
}
