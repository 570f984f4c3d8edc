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
 *   sockprobe badptr PORT         setsockopt with pointers the kernel
 *                                 cannot read (EFAULT), on a socket
 *                                 connected to 127.0.0.1:PORT; the same
 *                                 "ok"/"FAIL" lines, then "keepalive N
 *                                 keepidle N" after weakening attempts
 *                                 with good pointers
 *   sockprobe reuse PORT          TCP fds closed behind a shim's back
 *                                 (fclose(fdopen()), close_range) whose
 *                                 number comes back as a socketpair, a
 *                                 raw socket or a connection accept()
 *                                 returned, all made without socket();
 *                                 connect() and listen() on those; one
 *                                 "reuse CLOSER FILLER same=0|1
 *                                 keepalive=N" line each
 */
#define _GNU_SOURCE /* close_range */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
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

/* setsockopt with optval pointers the kernel refuses with EFAULT: a
 * preload shim must not read them itself (a crash), nor change the answer.
 * Only the options enforce mode looks at, where it would read the value. */
static int badptr(int port)
{
	static const struct {
		int level, name;
		const char *label;
	} opts[] = {{SOL_SOCKET, SO_KEEPALIVE, "SO_KEEPALIVE"},
		    {IPPROTO_TCP, TCP_KEEPIDLE, "TCP_KEEPIDLE"},
		    {IPPROTO_TCP, TCP_KEEPINTVL, "TCP_KEEPINTVL"},
		    {IPPROTO_TCP, TCP_KEEPCNT, "TCP_KEEPCNT"},
		    {IPPROTO_TCP, TCP_USER_TIMEOUT, "TCP_USER_TIMEOUT"}};
	struct sockaddr_in a = loopback(port);
	long page = sysconf(_SC_PAGESIZE);
	char *map, name[96];
	int fd, ret, zero = 0, big = 10000;
	const void *bad[3];

	/* A readable page followed by an inaccessible one: the last two bytes
	 * of the first are a pointer whose int straddles into the second. */
	map = mmap(NULL, (size_t)page * 2, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (map == MAP_FAILED ||
	    mprotect(map + page, (size_t)page, PROT_NONE)) {
		perror("mmap");
		return 1;
	}
	bad[0] = (const void *)1;
	bad[1] = map + page; /* mapped, PROT_NONE */
	bad[2] = map + page - 2;

	fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		perror("connect");
		return 1;
	}
	for (size_t i = 0; i < sizeof(opts) / sizeof(opts[0]); i++) {
		for (size_t j = 0; j < sizeof(bad) / sizeof(bad[0]); j++) {
			snprintf(name, sizeof(name), "%s bad pointer %zu",
				 opts[i].label, j);
			errno = 0;
			ret = setsockopt(fd, opts[i].level, opts[i].name,
					 bad[j], sizeof(int));
			check(name, ret, -1, errno, EFAULT);
		}
	}
	/* Good pointers still go through enforce mode's rules. */
	(void)setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &zero, sizeof(zero));
	(void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &big, sizeof(big));
	printf("keepalive %d keepidle %d\n",
	       getint(fd, SOL_SOCKET, SO_KEEPALIVE),
	       getint(fd, IPPROTO_TCP, TCP_KEEPIDLE));
	close(fd);
	return failures ? 1 : 0;
}

/* Close fd the ways a close() wrapper does not see. */
static void close_behind(int fd, const char *how)
{
	if (!strcmp(how, "fclose")) {
		FILE *f = fdopen(fd, "r+");

		if (f)
			fclose(f); /* glibc closes with its internal __close */
	} else {
		close_range((unsigned)fd, (unsigned)fd, 0);
	}
}

/* A TCP socket made by system calls a shim does not wrap: listening on
 * 127.0.0.1 (port 0: any), or connected to port. */
static int raw_tcp(int port, int do_listen)
{
	struct sockaddr_in a = loopback(port);
	int fd = (int)syscall(SYS_socket, AF_INET, SOCK_STREAM, 0);

	if (fd < 0)
		return -1;
	if (do_listen ? syscall(SYS_bind, fd, &a, sizeof(a)) ||
				syscall(SYS_listen, fd, 4)
		      : syscall(SYS_connect, fd, &a, sizeof(a))) {
		syscall(SYS_close, fd);
		return -1;
	}
	return fd;
}

/* A socket on the lowest free fd, made without socket(): a socketpair
 * (AF_UNIX stream), a raw ICMP socket (needs CAP_NET_RAW; -1 without it),
 * or the TCP connection accept() takes from listener. */
static int fill(const char *what, int *peer, int listener)
{
	int sv[2];

	*peer = -1;
	if (!strcmp(what, "socketpair")) {
		if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0)
			return -1;
		*peer = sv[1];
		return sv[0];
	}
	if (!strcmp(what, "accept"))
		return accept(listener, NULL, NULL);
	return (int)syscall(SYS_socket, AF_INET, SOCK_RAW, IPPROTO_ICMP);
}

static int reuse(int port)
{
	static const char *const closers[] = {"fclose", "close_range"};
	static const char *const fillers[] = {"socketpair", "raw", "accept"};
	struct sockaddr_in a = loopback(port), me;
	socklen_t melen = sizeof(me);
	/* No policy on it (no listen() seen): what it accepts has none. */
	int listener = raw_tcp(0, 1);

	if (listener < 0 ||
	    getsockname(listener, (struct sockaddr *)&me, &melen) < 0) {
		perror("listener");
		return 1;
	}
	for (size_t i = 0; i < 2; i++) {
		for (size_t j = 0; j < 3; j++) {
			int tcp = socket(AF_INET, SOCK_STREAM, 0), peer = -1;
			int client = -1, fd;

			/* accept() gives the lowest free number: the client
			 * connects first, taking a number above tcp's. */
			if (!strcmp(fillers[j], "accept"))
				client = raw_tcp(ntohs(me.sin_port), 0);
			close_behind(tcp, closers[i]);
			fd = fill(fillers[j], &peer, listener);
			if (fd < 0) {
				printf("reuse %s %s unavailable\n", closers[i],
				       fillers[j]);
				continue;
			}
			/* The calls the shim hooks; their errors do not
			 * matter here, only that they leave fd alone. */
			(void)connect(fd, (struct sockaddr *)&a, sizeof(a));
			(void)listen(fd, 1);
			printf("reuse %s %s same=%d keepalive=%d\n", closers[i],
			       fillers[j], fd == tcp,
			       getint(fd, SOL_SOCKET, SO_KEEPALIVE));
			close(fd);
			if (peer >= 0)
				close(peer);
			if (client >= 0)
				close(client);
		}
	}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "client"))
		return client(atoi(argv[2]));
	if (argc == 4 && !strcmp(argv[1], "errno"))
		return errnos(atoi(argv[2]), atoi(argv[3]));
	if (argc == 3 && !strcmp(argv[1], "badptr"))
		return badptr(atoi(argv[2]));
	if (argc == 3 && !strcmp(argv[1], "reuse"))
		return reuse(atoi(argv[2]));
	fprintf(stderr, "usage: sockprobe client PORT | errno OPEN CLOSED | "
			"badptr PORT | reuse PORT\n");
	return 2;
}
