/* SPDX-License-Identifier: MIT */
/*
 * C workload for tests/test_preload.py (built in the test's tmp_path,
 * dynamically and with -static).
 *
 *   sockprobe client PORT         connect to 127.0.0.1:PORT, print
 *                                 {"keepalive": N, "keepidle": N}
 *   sockprobe errno OPEN CLOSED   check that the shim leaves errno and
 *                                 return values exactly as the real
 *                                 calls do; one "ok NAME" or
 *                                 "FAIL NAME ..." line per check, and
 *                                 "keepalive N" for the connected socket
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MARK 4242 /* an errno no call sets */

static int failures;

static void check(const char *name, int ret, int want_ret, int err,
		  int want_err)
{
	if (ret == want_ret && err == want_err) {
		printf("ok %s\n", name);
		return;
	}
	printf("FAIL %s: returned %d errno %d (%s), wanted %d errno %d\n", name,
	       ret, err, strerror(err), want_ret, want_err);
	failures++;
}

static struct sockaddr_in loopback(int port)
{
	struct sockaddr_in a;

	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_port = htons((unsigned short)port);
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return a;
}

static int getint(int fd, int level, int name)
{
	int v = -1;
	socklen_t len = sizeof(v);

	if (getsockopt(fd, level, name, &v, &len) < 0)
		return -1;
	return v;
}

static int client(int port)
{
	struct sockaddr_in a = loopback(port);
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		perror("connect");
		return 1;
	}
	printf("{\"keepalive\": %d, \"keepidle\": %d}\n",
	       getint(fd, SOL_SOCKET, SO_KEEPALIVE),
	       getint(fd, IPPROTO_TCP, TCP_KEEPIDLE));
	close(fd);
	return 0;
}

static int errnos(int open_port, int closed_port)
{
	struct sockaddr_in open_a = loopback(open_port);
	struct sockaddr_in closed_a = loopback(closed_port);
	int one = 1, fd, ret, devnull;

	errno = MARK;
	fd = socket(AF_INET, SOCK_STREAM, 0);
	check("socket keeps errno", fd >= 0 ? 0 : -1, 0, errno, MARK);

	errno = MARK;
	ret = connect(fd, (struct sockaddr *)&open_a, sizeof(open_a));
	check("connect keeps errno", ret, 0, errno, MARK);
	printf("keepalive %d\n", getint(fd, SOL_SOCKET, SO_KEEPALIVE));

	errno = MARK;
	ret = setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
	check("setsockopt keeps errno", ret, 0, errno, MARK);
	close(fd);

	fd = socket(AF_INET, SOCK_STREAM, 0);
	errno = 0;
	ret = connect(fd, (struct sockaddr *)&closed_a, sizeof(closed_a));
	check("refused", ret, -1, errno, ECONNREFUSED);
	close(fd);

	fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	errno = 0;
	ret = connect(fd, (struct sockaddr *)&open_a, sizeof(open_a));
	check("non-blocking", ret, -1, errno, EINPROGRESS);
	close(fd);

	errno = 0;
	ret = connect(-1, (struct sockaddr *)&open_a, sizeof(open_a));
	check("bad fd", ret, -1, errno, EBADF);

	devnull = open("/dev/null", O_RDONLY);
	errno = 0;
	ret = connect(devnull, (struct sockaddr *)&open_a, sizeof(open_a));
	check("not a socket", ret, -1, errno, ENOTSOCK);
	close(devnull);

	/* The shim must not read addr: the kernel answers EFAULT. */
	fd = socket(AF_INET, SOCK_STREAM, 0);
	errno = 0;
	ret = connect(fd, (struct sockaddr *)8, sizeof(open_a));
	check("bad address", ret, -1, errno, EFAULT);
	close(fd);

	fd = socket(AF_INET, SOCK_STREAM, 0);
	errno = MARK;
	ret = listen(fd, 1);
	check("listen keeps errno", ret, 0, errno, MARK);
	close(fd);

	fd = socket(AF_INET, SOCK_DGRAM, 0);
	errno = 0;
	ret = listen(fd, 1);
	check("udp listen", ret, -1, errno, EOPNOTSUPP);
	close(fd);

	return failures ? 1 : 0;
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "client"))
		return client(atoi(argv[2]));
	if (argc == 4 && !strcmp(argv[1], "errno"))
		return errnos(atoi(argv[2]), atoi(argv[3]));
	fprintf(stderr, "usage: sockprobe client PORT | errno OPEN CLOSED\n");
	return 2;
}
