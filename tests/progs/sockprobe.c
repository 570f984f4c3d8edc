/*
 * sockprobe: a workload for bpfkeep's tests that sets no socket option of
 * its own unless told to.  Build it dynamic and with -static.
 *
 *   sockprobe connect ADDR PORT [set OPT=VAL]... [hold [abort]]
 *                                       (abort: close with a reset once
 *                                        stdin closes, SO_LINGER 0)
 *   sockprobe listen ADDR PORT [set OPT=VAL]... [late] [hold]
 *                                       (late: the sets after listen())
 *   sockprobe accept ADDR PORT [hold]   (listen now, accept after a line on
 *                                        stdin)
 *   sockprobe wait ADDR PORT [set OPT=VAL]... [send N]
 *                                       (connect, set, wait for a line on
 *                                        stdin, maybe send N bytes, block in
 *                                        recv)
 *   sockprobe activated - 0 [hold]      (systemd socket activation: the
 *                                        listener passed as fd 3 with
 *                                        LISTEN_FDS=1, LISTEN_PID=own pid;
 *                                        accepts after a line "accept")
 *   sockprobe churn ADDR PORT [set OPT=VAL]...
 *                                       (listen, then connect to itself
 *                                        again and again until a line or
 *                                        EOF on stdin; see churn())
 *
 * Prints "ready PORT" once listening / connected, then one line per socket:
 *   <role> keepalive=.. keepidle=.. keepintvl=.. keepcnt=.. user_timeout=..
 *          syncnt=.. maxseg=.. window_clamp=..
 * "set" lines report each setsockopt: "set OPT=VAL rc=0|errno".
 * "gated" waits for a line on stdin before it makes its socket.
 * "hold" keeps the sockets open until stdin closes (for ss from outside);
 * each line read meanwhile prints "now-<role> ..." again for every socket,
 * with the values in force at that moment.
 * "wait" prints "recv rc=.. errno=NAME elapsed=SECONDS".
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

struct opt {
	const char *name;
	int level, optname;
};

static const struct opt opts[] = {
	{"keepalive", SOL_SOCKET, SO_KEEPALIVE},
	{"keepidle", IPPROTO_TCP, TCP_KEEPIDLE},
	{"keepintvl", IPPROTO_TCP, TCP_KEEPINTVL},
	{"keepcnt", IPPROTO_TCP, TCP_KEEPCNT},
	{"user_timeout", IPPROTO_TCP, TCP_USER_TIMEOUT},
	{"syncnt", IPPROTO_TCP, TCP_SYNCNT},
	{"maxseg", IPPROTO_TCP, TCP_MAXSEG},
	{"window_clamp", IPPROTO_TCP, TCP_WINDOW_CLAMP},
	{"defer_accept", IPPROTO_TCP, TCP_DEFER_ACCEPT},
};
#define NOPTS (sizeof(opts) / sizeof(opts[0]))

static void die(const char *what)
{
	fprintf(stderr, "sockprobe: %s: %s\n", what, strerror(errno));
	exit(2);
}

static void report(const char *role, int fd)
{
	printf("%s", role);
	for (size_t i = 0; i < NOPTS; i++) {
		int v = -1;
		socklen_t len = sizeof(v);
		if (getsockopt(fd, opts[i].level, opts[i].optname, &v, &len))
			v = -errno;
		printf(" %s=%d", opts[i].name, v);
	}
	printf("\n");
	fflush(stdout);
}

static void apply_sets(int fd, int argc, char **argv, int quiet)
{
	for (int i = 0; i < argc; i++) {
		if (strcmp(argv[i], "set") || i + 1 >= argc)
			continue;
		char name[64];
		int val;
		if (sscanf(argv[i + 1], "%63[a-z_]=%d", name, &val) != 2)
			continue;
		for (size_t k = 0; k < NOPTS; k++) {
			if (strcmp(opts[k].name, name))
				continue;
			int rc = setsockopt(fd, opts[k].level, opts[k].optname,
					    &val, sizeof(val));
			if (!quiet)
				printf("set %s=%d rc=%d\n", name, val,
				       rc ? errno : 0);
		}
	}
	fflush(stdout);
}

static int has(int argc, char **argv, const char *word)
{
	for (int i = 0; i < argc; i++)
		if (!strcmp(argv[i], word))
			return 1;
	return 0;
}

static int make_addr(const char *host, int port, struct sockaddr_storage *ss,
		     socklen_t *len)
{
	struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
	struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;

	memset(ss, 0, sizeof(*ss));
	if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
		a4->sin_family = AF_INET;
		a4->sin_port = htons(port);
		*len = sizeof(*a4);
		return AF_INET;
	}
	if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
		a6->sin6_family = AF_INET6;
		a6->sin6_port = htons(port);
		*len = sizeof(*a6);
		return AF_INET6;
	}
	fprintf(stderr, "sockprobe: bad address %s\n", host);
	exit(2);
}

static void hold(const char *role1, int fd1, const char *role2, int fd2)
{
	char buf[256], name[64];

	while (fgets(buf, sizeof(buf), stdin)) {
		snprintf(name, sizeof(name), "now-%s", role1);
		report(name, fd1);
		if (fd2 >= 0) {
			snprintf(name, sizeof(name), "now-%s", role2);
			report(name, fd2);
		}
	}
}

/* tcpi_segs_out: every segment the socket sent, pure ACKs, keepalive
 * probes and resets included.  glibc's struct tcp_info stops before it;
 * in the kernel's (uapi linux/tcp.h, stable ABI) it is at byte 136. */
static unsigned segs_out(int fd)
{
	unsigned char info[256];
	socklen_t len = sizeof(info);
	unsigned v = 0;
	memset(info, 0, sizeof(info));
	if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, info, &len) == 0 &&
	    len >= 140)
		memcpy(&v, info + 136, sizeof(v));
	return v;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The values of every option on a socket, as report() prints them. */
static void values_of(int fd, int *v)
{
	for (size_t i = 0; i < NOPTS; i++) {
		socklen_t len = sizeof(v[i]);
		if (getsockopt(fd, opts[i].level, opts[i].optname, &v[i], &len))
			v[i] = -errno;
	}
}

#define CHURN_KINDS 16

/* Distinct sets of values and how many sockets had each. */
struct tally {
	int kinds;
	struct {
		int v[NOPTS];
		long n;
	} kind[CHURN_KINDS];
	long other; /* sockets of kinds beyond CHURN_KINDS */
};

static void count(struct tally *t, const int *v)
{
	int k;

	for (k = 0; k < t->kinds; k++)
		if (!memcmp(t->kind[k].v, v, sizeof(t->kind[k].v)))
			break;
	if (k == CHURN_KINDS) {
		t->other++;
		return;
	}
	if (k == t->kinds)
		memcpy(t->kind[t->kinds++].v, v, sizeof(t->kind[k].v));
	t->kind[k].n++;
}

static void print_tally(const char *role, const struct tally *t)
{
	for (int k = 0; k < t->kinds; k++) {
		printf("%s n=%ld", role, t->kind[k].n);
		for (size_t i = 0; i < NOPTS; i++)
			printf(" %s=%d", opts[i].name, t->kind[k].v[i]);
		printf("\n");
	}
	if (t->other)
		printf("%s-other n=%ld\n", role, t->other);
}

/* churn: new connections without a pause, for watching a change of the
 * programs under a workload: each client socket's values right after
 * connect() ("churn") and after the sets ("churn-after") are tallied, and
 * each distinct set of values is printed once with its count when a line
 * or EOF arrives on stdin -- a policy missing for a moment is a second
 * line; then "done".  "ready PORT" once the first connection is counted.
 * Clients close with a reset: no TIME_WAIT piles up. */
static int churn(int fd, struct sockaddr_storage *ss, socklen_t len, int argc,
		 char **argv)
{
	static struct tally at, after;
	struct linger reset = {.l_onoff = 1, .l_linger = 0};
	struct pollfd in = {.fd = 0, .events = POLLIN};
	int v[NOPTS];

	if (bind(fd, (struct sockaddr *)ss, len) || listen(fd, 64))
		die("listen");
	len = sizeof(*ss);
	if (getsockname(fd, (struct sockaddr *)ss, &len))
		die("getsockname");
	for (long i = 0;; i++) {
		int c = socket(ss->ss_family, SOCK_STREAM, 0);
		if (c < 0 || connect(c, (struct sockaddr *)ss, len))
			die("connect");
		values_of(c, v);
		count(&at, v);
		apply_sets(c, argc, argv, 1);
		values_of(c, v);
		count(&after, v);
		int a = accept(fd, NULL, NULL);
		if (a < 0)
			die("accept");
		setsockopt(c, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
		close(c);
		close(a);
		if (i == 0)
			printf("ready %d\n",
			       ntohs(((struct sockaddr_in *)ss)->sin_port));
		if (poll(&in, 1, 0) > 0)
			break;
	}
	print_tally("churn", &at);
	print_tally("churn-after", &after);
	printf("done\n");
	return 0;
}

int main(int argc, char **argv)
{
	struct sockaddr_storage ss;
	socklen_t len;
	char line[64];

	if (argc < 4) {
		fprintf(stderr, "usage: sockprobe connect|listen|accept|wait|"
				"churn ADDR PORT ...\n");
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!strcmp(argv[1], "activated")) {
		const char *pid = getenv("LISTEN_PID");
		const char *n = getenv("LISTEN_FDS");
		if (!pid || atoi(pid) != getpid() || !n || atoi(n) != 1) {
			fprintf(stderr, "sockprobe: no LISTEN_FDS=1 for me\n");
			return 2;
		}
		printf("ready activated\n");
		report("listener", 3);
		/* "accept" on stdin accepts; any other line reports again. */
		while (fgets(line, sizeof(line), stdin) &&
		       strncmp(line, "accept", 6))
			report("now-listener", 3);
		int c = accept(3, NULL, NULL);
		if (c < 0)
			die("accept");
		report("accepted", c);
		if (has(argc, argv, "hold"))
			hold("accepted", c, "listener", 3);
		return 0;
	}
	int fam = make_addr(argv[2], atoi(argv[3]), &ss, &len);
	/* gated: make the socket only after a line on stdin (the test moves the
	 * process to a fresh cgroup first) */
	if (has(argc, argv, "gated") && !fgets(line, sizeof(line), stdin))
		return 2;
	int fd = socket(fam, SOCK_STREAM, 0);
	if (fd < 0)
		die("socket");
	if (!strcmp(argv[1], "churn"))
		return churn(fd, &ss, len, argc - 4, argv + 4);

	if (!strcmp(argv[1], "connect") || !strcmp(argv[1], "wait")) {
		if (connect(fd, (struct sockaddr *)&ss, len))
			die("connect");
		printf("ready %s\n", argv[3]);
		if (!strcmp(argv[1], "connect")) {
			report("client", fd);
			apply_sets(fd, argc - 4, argv + 4, 0);
			report("client-after", fd);
			if (has(argc, argv, "hold"))
				hold("client", fd, NULL, -1);
			if (has(argc, argv, "abort")) {
				struct linger reset = {.l_onoff = 1,
						       .l_linger = 0};
				setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset,
					   sizeof(reset));
			}
			close(fd);
			printf("closed\n");
			return 0;
		}
		apply_sets(fd, argc - 4, argv + 4, 0);
		report("client", fd);
		if (!fgets(line, sizeof(line), stdin))
			return 2;
		double t0 = now();
		for (int i = 4; i + 1 < argc; i++) {
			if (!strcmp(argv[i], "send")) {
				static char data[65536];
				size_t n = (size_t)atoi(argv[i + 1]);
				if (n > sizeof(data))
					n = sizeof(data);
				memset(data, 'x', n);
				if (send(fd, data, n, 0) < 0)
					die("send");
			}
		}
		char buf[16];
		unsigned segs0 = segs_out(fd);
		ssize_t rc = recv(fd, buf, sizeof(buf), 0);
		int err = rc < 0 ? errno : 0;
		/* segs: segments the socket sent while it waited (keepalive
		 * probes, then the reset it ends with). */
		printf("recv rc=%zd errno=%s elapsed=%.3f segs=%u\n", rc,
		       err == ETIMEDOUT ? "ETIMEDOUT"
		       : err		? strerror(err)
					: "0",
		       now() - t0, segs_out(fd) - segs0);
		return 0;
	}

	int one = 1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&ss, len))
		die("bind");
	int late = has(argc, argv, "late");
	if (!late)
		apply_sets(fd, argc - 4, argv + 4, 0);
	if (listen(fd, 16))
		die("listen");
	if (late) /* as nginx does: options after listen() */
		apply_sets(fd, argc - 4, argv + 4, 0);
	struct sockaddr_storage me;
	socklen_t melen = sizeof(me);
	getsockname(fd, (struct sockaddr *)&me, &melen);
	int port = ntohs(((struct sockaddr_in *)&me)->sin_port);
	printf("ready %d\n", port);
	report("listener", fd);
	if (!strcmp(argv[1], "accept") && !fgets(line, sizeof(line), stdin))
		return 2;
	int c = accept(fd, NULL, NULL);
	if (c < 0)
		die("accept");
	report("accepted", c);
	if (has(argc, argv, "hold"))
		hold("accepted", c, "listener", fd);
	return 0;
}
