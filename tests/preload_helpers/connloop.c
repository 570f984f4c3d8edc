/* SPDX-License-Identifier: MIT */
/*
 * Cost of the shim per connection: N loopback connect + accept + close,
 * one process; prints nanoseconds per connection.  Not a test: a sanity
 * measurement, e.g.
 *
 *   gcc -O2 -o /tmp/connloop tests/preload_helpers/connloop.c
 *   /tmp/connloop 20000
 *   LD_PRELOAD=$PWD/preload/libbpfkeep.so /tmp/connloop 20000
 */
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	int n = argc > 1 ? atoi(argv[1]) : 20000;
	struct sockaddr_in a;
	socklen_t len = sizeof(a);
	struct timespec t0, t1;
	int ls;

	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	ls = socket(AF_INET, SOCK_STREAM, 0);
	if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof(a)) < 0 ||
	    listen(ls, 128) < 0 ||
	    getsockname(ls, (struct sockaddr *)&a, &len) < 0) {
		perror("listener");
		return 1;
	}
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (int i = 0; i < n; i++) {
		int c = socket(AF_INET, SOCK_STREAM, 0), s;

		if (c < 0 || connect(c, (struct sockaddr *)&a, sizeof(a)) < 0) {
			perror("connect");
			return 1;
		}
		s = accept(ls, NULL, NULL);
		if (s < 0) {
			perror("accept");
			return 1;
		}
		close(s); /* server closes first: TIME_WAIT stays on its side */
		close(c);
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("%.0f\n", ((double)(t1.tv_sec - t0.tv_sec) * 1e9 +
			  (double)(t1.tv_nsec - t0.tv_nsec)) /
				 n);
	return 0;
}
