/* SPDX-License-Identifier: GPL-2.0 */
/*
 * connloop: the workload of bpfkeep's benchmarks.  It sets no socket option
 * of its own unless told to with --set, so whatever keepalive a socket has
 * comes from the tool under test (BPF, an LD_PRELOAD library) or from --set
 * (the "changed the application" baseline).
 *
 *   connloop loop [-n N] [-w WARMUP] [--close rst|fin] [--set OPT=VAL]...
 *       N loopback connections, one after the other: socket, connect,
 *       accept, close both (see --close below).  Prints the client and
 *       accepted sockets' options of the first connection, then "result
 *       conns=N seconds=S cpu_seconds=S ns_per_conn=X cpu_ns_per_conn=X"
 *       (wall clock, and the CPU time the process had).
 *   connloop rate -r PER_SECOND -t SECONDS [--set OPT=VAL]...
 *       The same, paced at PER_SECOND connections a second.
 *   connloop hold -n N [--set OPT=VAL]...
 *       Open N loopback connections and keep them (2N sockets, the
 *       accepted ones in a child process) until stdin closes; prints
 *       "held N".  Raises RLIMIT_NOFILE as needed.
 *   connloop deadpeer ADDR PORT [--send BYTES] [--set OPT=VAL]...
 *       Connect, print the socket's options and "connected", wait for a
 *       line on stdin, maybe send BYTES, block in recv and print
 *       "result errno=NAME since_connect=S since_go=S".
 *   connloop serve ADDR PORT
 *       Listen, print "ready", accept connections and keep them until
 *       stdin closes.
 *   connloop cgchurn DIR PORT -n N (-r PER_SECOND | -e MS) [--want OPT=VAL]...
 *                    [--hold MS]
 *       N times, PER_SECOND a second (or every MS): make the cgroup
 *       DIR/cNNNNNN (printing "made i=I t=MONOTONIC"), and a child process
 *       joins it and connects at once to 127.0.0.1:PORT, then reads its
 *       socket's options every millisecond until each --want holds
 *       (keepalive=1 if none given): "covered i=I us=MICROSECONDS" from
 *       the connect's return, or "uncovered i=I" after 5 s; it holds the
 *       connection --hold MS (1000) and exits, and the cgroup is removed.
 *       Ends with "done n=N covered=C".
 *
 * --set applies OPT=VAL with setsockopt to the client socket before
 * connect() and to the listener before listen() (accepted sockets inherit
 * it), in the order given.  OPT: keepalive keepidle keepintvl keepcnt
 * user_timeout syncnt maxseg window_clamp.
 *
 * Sockets are made with a plain socket(AF_INET, SOCK_STREAM, 0): the
 * original libkeepalive wraps socket() and acts only on exactly that.
 * The loop modes put SO_LINGER {1, 0} on their listener (inherited by
 * every accepted socket): the server side closes first with a RST, so
 * neither side goes through TIME_WAIT and ports never run out.  That is
 * the one option connloop sets itself.  "--close fin" (loop mode) is the
 * plain way instead: no SO_LINGER, the client closes first, the
 * connection ends with FIN/ACK both ways and the client socket stays in
 * TIME_WAIT (what a naive workload does; each run listens on a new port, so
 * a few thousand connections a run never run out of ports).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <fcntl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
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
};
#define NOPTS (sizeof(opts) / sizeof(opts[0]))
#define MAXSET 16

struct setting {
	const struct opt *opt;
	int val;
};

static struct setting sets[MAXSET];
static int nsets;
static int close_fin; /* --close fin: no SO_LINGER, client closes first */

static void die(const char *what)
{
	fprintf(stderr, "connloop: %s: %s\n", what, strerror(errno));
	exit(2);
}

static void usage(void)
{
	fprintf(stderr,
		"usage: connloop loop [-n N] [-w WARMUP] [--close rst|fin] "
		"[--set OPT=VAL]...\n"
		"       connloop rate -r PER_SECOND -t SECONDS [--set ...]\n"
		"       connloop hold -n N [--set ...]\n"
		"       connloop deadpeer ADDR PORT [--send BYTES] [--set "
		"...]\n"
		"       connloop serve ADDR PORT\n"
		"       connloop cgchurn DIR PORT -n N (-r PER_SECOND | -e MS) "
		"[--want OPT=VAL]... [--hold MS]\n");
	exit(2);
}

static long number(const char *s)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (!*s || *end || errno || v < 0) {
		fprintf(stderr, "connloop: %s is not a whole number >= 0\n", s);
		exit(2);
	}
	return v;
}

static void add_set(const char *arg)
{
	char name[32];
	const char *eq = strchr(arg, '=');
	size_t len = eq ? (size_t)(eq - arg) : 0;

	if (!eq || len >= sizeof(name) || nsets == MAXSET)
		usage();
	memcpy(name, arg, len);
	name[len] = '\0';
	for (size_t i = 0; i < NOPTS; i++) {
		if (!strcmp(opts[i].name, name)) {
			sets[nsets].opt = &opts[i];
			sets[nsets++].val = (int)number(eq + 1);
			return;
		}
	}
	fprintf(stderr, "connloop: unknown option %s\n", name);
	exit(2);
}

static void apply_sets(int fd)
{
	for (int i = 0; i < nsets; i++)
		if (setsockopt(fd, sets[i].opt->level, sets[i].opt->optname,
			       &sets[i].val, sizeof(sets[i].val)))
			die(sets[i].opt->name);
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

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* CPU time of this process: the time it really ran, whatever else the
 * host was doing meanwhile.  Loopback packets are processed in softirq
 * right in the sending syscall, so they are counted too. */
static double cpu_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void make_addr(const char *host, long port, struct sockaddr_in *a)
{
	memset(a, 0, sizeof(*a));
	a->sin_family = AF_INET;
	a->sin_port = htons((unsigned short)port);
	if (inet_pton(AF_INET, host, &a->sin_addr) != 1) {
		fprintf(stderr, "connloop: bad IPv4 address %s\n", host);
		exit(2);
	}
}

/* A loopback listener on an ephemeral port; *a gets its address. */
static int loop_listener(struct sockaddr_in *a, int backlog)
{
	struct linger lg = {.l_onoff = 1, .l_linger = 0};
	socklen_t len = sizeof(*a);
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	if (fd < 0)
		die("socket");
	make_addr("127.0.0.1", 0, a);
	if (bind(fd, (struct sockaddr *)a, sizeof(*a)))
		die("bind");
	if (!close_fin &&
	    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg)))
		die("SO_LINGER");
	apply_sets(fd);
	if (listen(fd, backlog))
		die("listen");
	if (getsockname(fd, (struct sockaddr *)a, &len))
		die("getsockname");
	return fd;
}

/* One connection: connect, accept; returns the two sockets. */
static void connect_pair(int lfd, const struct sockaddr_in *a, int *cfd,
			 int *afd)
{
	*cfd = socket(AF_INET, SOCK_STREAM, 0);
	if (*cfd < 0)
		die("socket");
	apply_sets(*cfd);
	if (connect(*cfd, (const struct sockaddr *)a, sizeof(*a)))
		die("connect");
	*afd = accept(lfd, NULL, NULL);
	if (*afd < 0)
		die("accept");
}

/* Server side first: its RST (SO_LINGER 0, inherited) closes both.  With
 * --close fin the client closes first, then the server: FIN both ways. */
static void close_pair(int cfd, int afd)
{
	if (close_fin) {
		close(cfd);
		close(afd);
		return;
	}
	close(afd);
	close(cfd);
}

static int cmd_loop(long n, long warmup)
{
	struct sockaddr_in a;
	int lfd = loop_listener(&a, 64), cfd, afd;
	double t0, c0, t, c;

	for (long i = 0; i < warmup + 1; i++) {
		connect_pair(lfd, &a, &cfd, &afd);
		if (i == 0) {
			report("client", cfd);
			report("accepted", afd);
		}
		close_pair(cfd, afd);
	}
	c0 = cpu_now();
	t0 = now();
	for (long i = 0; i < n; i++) {
		connect_pair(lfd, &a, &cfd, &afd);
		close_pair(cfd, afd);
	}
	t = now() - t0;
	c = cpu_now() - c0;
	printf("result conns=%ld seconds=%.6f cpu_seconds=%.6f "
	       "ns_per_conn=%.1f "
	       "cpu_ns_per_conn=%.1f\n",
	       n, t, c, n ? t * 1e9 / (double)n : 0.0,
	       n ? c * 1e9 / (double)n : 0.0);
	return 0;
}

static int cmd_rate(long per_second, long seconds)
{
	struct sockaddr_in a;
	int lfd = loop_listener(&a, 64), cfd, afd;
	long total = per_second * seconds, done = 0;
	/* Batches every millisecond (or per connection below 1000/s). */
	long batch = per_second >= 1000 ? per_second / 1000 : 1;
	double step = (double)batch / (double)per_second, t0 = now(), t;
	struct timespec next;

	clock_gettime(CLOCK_MONOTONIC, &next);
	while (done < total) {
		for (long i = 0; i < batch && done < total; i++, done++) {
			connect_pair(lfd, &a, &cfd, &afd);
			close_pair(cfd, afd);
		}
		long ns = next.tv_nsec + (long)(step * 1e9);
		next.tv_sec += ns / 1000000000L;
		next.tv_nsec = ns % 1000000000L;
		while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next,
				       NULL) == EINTR)
			;
	}
	t = now() - t0;
	printf("result conns=%ld seconds=%.6f per_second=%.1f\n", done, t,
	       (double)done / t);
	return 0;
}

/* Raise the soft RLIMIT_NOFILE to want, or as far as the hard limit goes. */
static void raise_nofile(rlim_t want)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl))
		die("getrlimit");
	if (rl.rlim_cur >= want)
		return;
	rl.rlim_cur = want < rl.rlim_max ? want : rl.rlim_max;
	if (setrlimit(RLIMIT_NOFILE, &rl))
		die("setrlimit RLIMIT_NOFILE");
}

static void wait_stdin_eof(void)
{
	char buf[256];

	while (fgets(buf, sizeof(buf), stdin))
		;
}

/* The accepting side runs in a child process, so that each process needs
 * only n file descriptors (hosts often cap RLIMIT_NOFILE at 20000).  The
 * child dies with its parent. */
static int cmd_hold(long n)
{
	struct sockaddr_in a;
	int lfd, cfd;
	pid_t child;

	raise_nofile((rlim_t)(n + 64));
	lfd = loop_listener(&a, 4096);
	child = fork();
	if (child < 0)
		die("fork");
	if (child == 0) {
		if (prctl(PR_SET_PDEATHSIG, SIGKILL))
			die("prctl");
		for (long i = 0; i < n; i++) {
			int afd = accept(lfd, NULL, NULL);

			if (afd < 0)
				die("accept");
			if (i == 0)
				report("accepted", afd);
		}
		for (;;)
			pause();
	}
	close(lfd);
	for (long i = 0; i < n; i++) {
		cfd = socket(AF_INET, SOCK_STREAM, 0);
		if (cfd < 0)
			die("socket");
		apply_sets(cfd);
		if (connect(cfd, (const struct sockaddr *)&a, sizeof(a)))
			die("connect");
		if (i == 0)
			report("client", cfd);
	}
	printf("held %ld\n", n);
	fflush(stdout);
	wait_stdin_eof();
	kill(child, SIGKILL);
	waitpid(child, NULL, 0);
	return 0; /* exit closes them all */
}

static int cmd_deadpeer(const char *host, long port, long send_bytes)
{
	static char data[65536];
	struct sockaddr_in a;
	char line[64], buf[16];
	double t_conn, t_go, t_end;
	int fd = socket(AF_INET, SOCK_STREAM, 0), err;
	ssize_t rc;

	if (fd < 0)
		die("socket");
	make_addr(host, port, &a);
	apply_sets(fd);
	if (connect(fd, (struct sockaddr *)&a, sizeof(a)))
		die("connect");
	t_conn = now();
	report("client", fd);
	printf("connected\n");
	fflush(stdout);
	if (!fgets(line, sizeof(line), stdin))
		return 2;
	t_go = now();
	if (send_bytes > 0) {
		size_t len = (size_t)send_bytes < sizeof(data)
				     ? (size_t)send_bytes
				     : sizeof(data);
		memset(data, 'x', len);
		if (send(fd, data, len, 0) < 0)
			die("send");
	}
	rc = recv(fd, buf, sizeof(buf), 0);
	err = rc < 0 ? errno : 0;
	t_end = now();
	printf("result rc=%zd errno=%s since_connect=%.3f since_go=%.3f\n", rc,
	       err == ETIMEDOUT ? "ETIMEDOUT"
	       : err		? strerror(err)
				: "0",
	       t_end - t_conn, t_end - t_go);
	return 0;
}

static int cmd_serve(const char *host, long port)
{
	struct sockaddr_in a;
	int one = 1, fd = socket(AF_INET, SOCK_STREAM, 0);

	if (fd < 0)
		die("socket");
	make_addr(host, port, &a);
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)))
		die("bind");
	if (listen(fd, 128))
		die("listen");
	printf("ready %ld\n", port);
	fflush(stdout);
	/* Accept whatever comes while stdin stays open; keep what is
	 * accepted (the kernel holds the connections for us). */
	for (;;) {
		struct pollfd p[2] = {{.fd = 0, .events = POLLIN},
				      {.fd = fd, .events = POLLIN}};
		char buf[256];

		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (p[1].revents & POLLIN && accept(fd, NULL, NULL) < 0)
			die("accept");
		if (p[0].revents && read(0, buf, sizeof(buf)) <= 0)
			return 0;
	}
}

/* cgchurn: one child, in a new cgroup, connecting at once; 0 if its
 * socket came to carry every wanted value within 5 s. */
static int churn_child(const char *cg, long i, long port, long hold_ms)
{
	char path[4096], pid[32];
	struct sockaddr_in a;
	double t0, t;
	int fd, pfd, n;

	snprintf(path, sizeof(path), "%s/cgroup.procs", cg);
	pfd = open(path, O_WRONLY);
	n = snprintf(pid, sizeof(pid), "%d", (int)getpid());
	if (pfd < 0 || write(pfd, pid, (size_t)n) != n)
		die("joining the cgroup");
	close(pfd);
	fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		die("socket");
	make_addr("127.0.0.1", port, &a);
	if (connect(fd, (struct sockaddr *)&a, sizeof(a)))
		die("connect");
	t0 = now();
	for (t = t0; t - t0 < 5.0; t = now()) {
		int ok = 1;

		for (int i = 0; i < nsets && ok; i++) {
			int v = -1;
			socklen_t len = sizeof(v);

			if (getsockopt(fd, sets[i].opt->level,
				       sets[i].opt->optname, &v, &len) ||
			    v != sets[i].val)
				ok = 0;
		}
		if (ok) {
			printf("covered i=%ld us=%.0f\n", i, (t - t0) * 1e6);
			fflush(stdout);
			usleep((useconds_t)(hold_ms * 1000));
			return 0;
		}
		usleep(1000);
	}
	return 1;
}

static int cmd_cgchurn(const char *dir, long port, long n, long rate,
		       long every_ms, long hold_ms)
{
	double start = now(),
	       interval = every_ms > 0 ? every_ms / 1000.0 : 1.0 / (double)rate;
	char(*cgs)[4096] = calloc((size_t)n, sizeof(*cgs));
	pid_t *kids = calloc((size_t)n, sizeof(*kids));
	long made = 0, left = 0, covered = 0;

	if (!cgs || !kids)
		die("calloc");
	if (!nsets)
		add_set("keepalive=1");
	while (made < n || left) {
		int status;
		pid_t got;

		while ((got = waitpid(-1, &status, WNOHANG)) > 0) {
			for (long i = 0; i < made; i++) {
				if (kids[i] != got)
					continue;
				kids[i] = 0;
				if (WIFEXITED(status) && !WEXITSTATUS(status)) {
					covered++;
				} else {
					printf("uncovered i=%ld\n", i);
				}
				while (rmdir(cgs[i]) && errno == EBUSY)
					usleep(1000); /* the child's exit
							 settles */
				left--;
			}
		}
		if (made < n && now() >= start + (double)made * interval) {
			pid_t kid;

			snprintf(cgs[made], sizeof(cgs[made]), "%s/c%06ld", dir,
				 made);
			if (mkdir(cgs[made], 0755))
				die("mkdir");
			printf("made i=%ld t=%.6f\n", made, now());
			kid = fork();
			if (kid < 0)
				die("fork");
			if (kid == 0)
				_exit(churn_child(cgs[made], made, port,
						  hold_ms));
			kids[made++] = kid;
			left++;
			continue;
		}
		usleep(500);
	}
	printf("done n=%ld covered=%ld\n", n, covered);
	free(cgs);
	free(kids);
	return 0;
}

int main(int argc, char **argv)
{
	long n = 20000, warmup = 500, rate = 0, seconds = 0, send_bytes = 0;
	long every_ms = 0, hold_ms = 1000;
	const char *pos[2] = {NULL, NULL};
	int npos = 0;

	if (argc < 2)
		usage();
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (int i = 2; i < argc; i++) {
		const char *a = argv[i];

		if (i + 1 < argc &&
		    (!strcmp(a, "--set") || !strcmp(a, "--want")))
			add_set(argv[++i]);
		else if (i + 1 < argc && !strcmp(a, "-e"))
			every_ms = number(argv[++i]);
		else if (i + 1 < argc && !strcmp(a, "--hold"))
			hold_ms = number(argv[++i]);
		else if (i + 1 < argc && !strcmp(a, "-n"))
			n = number(argv[++i]);
		else if (i + 1 < argc && !strcmp(a, "-w"))
			warmup = number(argv[++i]);
		else if (i + 1 < argc && !strcmp(a, "-r"))
			rate = number(argv[++i]);
		else if (i + 1 < argc && !strcmp(a, "-t"))
			seconds = number(argv[++i]);
		else if (i + 1 < argc && !strcmp(a, "--close")) {
			const char *how = argv[++i];

			if (strcmp(how, "fin") && strcmp(how, "rst"))
				usage();
			close_fin = !strcmp(how, "fin");
		} else if (i + 1 < argc && !strcmp(a, "--send"))
			send_bytes = number(argv[++i]);
		else if (a[0] != '-' && npos < 2)
			pos[npos++] = a;
		else
			usage();
	}
	if (!strcmp(argv[1], "loop") && !npos)
		return cmd_loop(n, warmup);
	if (!strcmp(argv[1], "rate") && !npos && rate > 0 && seconds > 0)
		return cmd_rate(rate, seconds);
	if (!strcmp(argv[1], "hold") && !npos)
		return cmd_hold(n);
	if (!strcmp(argv[1], "deadpeer") && npos == 2)
		return cmd_deadpeer(pos[0], number(pos[1]), send_bytes);
	if (!strcmp(argv[1], "serve") && npos == 2)
		return cmd_serve(pos[0], number(pos[1]));
	if (!strcmp(argv[1], "cgchurn") && npos == 2 && n > 0 &&
	    (rate > 0 || every_ms > 0))
		return cmd_cgchurn(pos[0], number(pos[1]), n, rate, every_ms,
				   hold_ms);
	usage();
	return 2;
}
