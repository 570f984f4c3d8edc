/*
 * sockhole: a workload that sets keepalive options by the ways the
 * cgroup/setsockopt hook may not see, for tests/test_bypass.py.  x86_64
 * only (the 32-bit system call is `int $0x80`); build it with -static
 * -no-pie, so that its globals -- the option values the 32-bit calls point
 * at -- sit below 4 GiB, where a 32-bit pointer reaches.
 *
 *   sockhole connect ADDR PORT [mptcp] STEP... [hold]
 *
 * connects a TCP socket (IPPROTO_MPTCP with "mptcp") to ADDR:PORT, then
 * runs each STEP in order:
 *
 *   set OPT=VAL        setsockopt(2), the 64-bit system call
 *   set32 OPT=VAL      setsockopt through int $0x80 (i386 number 366): what
 *                      every call of a 32-bit binary is
 *   uring OPT=VAL      io_uring's SOCKET_URING_OP_SETSOCKOPT (Linux 6.7+),
 *                      on a ring set up by the 64-bit io_uring_setup
 *   uring32 OPT=VAL    the same on a ring set up through int $0x80 (i386
 *                      number 425): a "compat" ring
 *   race OPT=A/B N     up to N setsockopt(OPT, A) calls with a buffer
 *                      above a page, while a second thread flips its first
 *                      int between A and B; stops once B is in force
 *   bench OPT=VAL N    N setsockopt(OPT, VAL) calls, timed
 *
 * and prints one line per step ("set OPT=VAL via=KIND rc=0|errno", "race
 * OPT won=0|1 calls=N", "bench OPT calls=N ns=NS_PER_CALL"), then "ready
 * PORT LOCAL_PORT" and the values in force:
 *   client keepalive=.. keepidle=.. keepintvl=.. keepcnt=.. user_timeout=..
 * "hold" keeps the socket until stdin closes; each line read meanwhile
 * prints "now-client ..." again with the values in force at that moment.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/io_uring.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef IPPROTO_MPTCP
#define IPPROTO_MPTCP 262
#endif
/* Linux 6.7 (include/uapi/linux/io_uring.h): not in older headers. */
#define SOCKET_URING_OP_SETSOCKOPT 3
#define NR32_SETSOCKOPT 366
#define NR32_IO_URING_SETUP 425

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
	{"nodelay", IPPROTO_TCP, TCP_NODELAY}, /* one bpfkeep leaves alone */
};
#define NOPTS (sizeof(opts) / sizeof(opts[0]))

/* The values the 32-bit calls point at: globals of a static non-PIE
 * binary, so below 4 GiB. */
static int value32;
static struct io_uring_params params32;

static void die(const char *what)
{
	fprintf(stderr, "sockhole: %s: %s\n", what, strerror(errno));
	exit(2);
}

static const struct opt *find_opt(const char *spec, int *val)
{
	const char *eq = strchr(spec, '=');

	if (!eq)
		return NULL;
	for (size_t i = 0; i < NOPTS; i++) {
		if (strlen(opts[i].name) == (size_t)(eq - spec) &&
		    !strncmp(spec, opts[i].name, eq - spec)) {
			char *end;
			long v = strtol(eq + 1, &end, 10);

			if (*end && *end != '/')
				return NULL;
			*val = (int)v;
			return &opts[i];
		}
	}
	return NULL;
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

#if defined(__x86_64__)
/* The i386 system call from a 64-bit process: six 32-bit arguments in
 * ebx, ecx, edx, esi, edi, ebp; the kernel runs it as a compat call
 * (in_compat_syscall() is true). */
static long int80(long nr, long a, long b, long c, long d, long e)
{
	long ret;

	__asm__ volatile("int $0x80"
			 : "=a"(ret)
			 : "a"(nr), "b"(a), "c"(b), "d"(c), "S"(d), "D"(e)
			 : "memory", "r8", "r9", "r10", "r11");
	return ret;
}
#else
static long int80(long nr, long a, long b, long c, long d, long e)
{
	(void)nr, (void)a, (void)b, (void)c, (void)d, (void)e;
	return -ENOSYS;
}
#endif

static int set32(int fd, const struct opt *o, int v)
{
	long r;

	value32 = v;
	r = int80(NR32_SETSOCKOPT, fd, o->level, o->optname,
		  (long)(unsigned long)&value32, sizeof(value32));
	return r < 0 ? (int)-r : 0;
}

/* One SOCKET_URING_OP_SETSOCKOPT on a fresh ring; the ring is set up by
 * the 64-bit io_uring_setup, or by the 32-bit one ("compat" ring). */
static int set_uring(int fd, const struct opt *o, int v, int compat)
{
	struct io_uring_params *p = &params32;
	struct io_uring_sqe *sqes;
	struct io_uring_cqe *cqe;
	unsigned *sq_tail, *sq_array, *cq_head, *cq_tail, *sq_mask, *cq_mask;
	void *sq, *cq;
	size_t sq_len, cq_len;
	int ring, res, err = 0;
	unsigned char *sqe;
	long r;

	memset(p, 0, sizeof(*p));
	if (compat)
		r = int80(NR32_IO_URING_SETUP, 4, (long)(unsigned long)p, 0, 0,
			  0);
	else
		r = syscall(__NR_io_uring_setup, 4, p) < 0 ? -errno : 0;
	if (r < 0)
		return (int)-r;
	ring = compat ? (int)r : (int)syscall(__NR_io_uring_setup, 4, p);
	if (!compat && ring < 0)
		return errno;
	if (compat && r == 0)
		return EINVAL;
	sq_len = p->sq_off.array + p->sq_entries * sizeof(unsigned);
	cq_len = p->cq_off.cqes + p->cq_entries * sizeof(struct io_uring_cqe);
	sq = mmap(NULL, sq_len, PROT_READ | PROT_WRITE, MAP_SHARED, ring,
		  IORING_OFF_SQ_RING);
	cq = mmap(NULL, cq_len, PROT_READ | PROT_WRITE, MAP_SHARED, ring,
		  IORING_OFF_CQ_RING);
	sqes = mmap(NULL, p->sq_entries * sizeof(*sqes), PROT_READ | PROT_WRITE,
		    MAP_SHARED, ring, IORING_OFF_SQES);
	if (sq == MAP_FAILED || cq == MAP_FAILED || sqes == MAP_FAILED) {
		err = errno;
		goto out;
	}
	sq_tail = (unsigned *)((char *)sq + p->sq_off.tail);
	sq_mask = (unsigned *)((char *)sq + p->sq_off.ring_mask);
	sq_array = (unsigned *)((char *)sq + p->sq_off.array);
	cq_head = (unsigned *)((char *)cq + p->cq_off.head);
	cq_tail = (unsigned *)((char *)cq + p->cq_off.tail);
	cq_mask = (unsigned *)((char *)cq + p->cq_off.ring_mask);

	value32 = v;
	/* struct io_uring_sqe as Linux 6.7 has it for socket commands:
	 * cmd_op at 8, level and optname at 16, optlen at 44, optval at 48. */
	sqe = (unsigned char *)&sqes[*sq_tail & *sq_mask];
	memset(sqe, 0, sizeof(*sqes));
	sqe[0] = IORING_OP_URING_CMD;
	*(int *)(sqe + 4) = fd;
	*(unsigned *)(sqe + 8) = SOCKET_URING_OP_SETSOCKOPT;
	*(unsigned *)(sqe + 16) = o->level;
	*(unsigned *)(sqe + 20) = o->optname;
	*(unsigned *)(sqe + 44) = sizeof(value32);
	*(unsigned long long *)(sqe + 48) = (unsigned long)&value32;
	sq_array[*sq_tail & *sq_mask] = *sq_tail & *sq_mask;
	__atomic_store_n(sq_tail, *sq_tail + 1, __ATOMIC_RELEASE);
	if (syscall(__NR_io_uring_enter, ring, 1, 1, IORING_ENTER_GETEVENTS,
		    NULL, 0) < 0) {
		err = errno;
		goto out;
	}
	if (__atomic_load_n(cq_tail, __ATOMIC_ACQUIRE) == *cq_head) {
		err = EAGAIN;
		goto out;
	}
	cqe = (struct io_uring_cqe *)((char *)cq + p->cq_off.cqes) +
	      (*cq_head & *cq_mask);
	res = cqe->res;
	__atomic_store_n(cq_head, *cq_head + 1, __ATOMIC_RELEASE);
	err = res < 0 ? -res : 0;
out:
	close(ring);
	return err;
}

/* The race: the cgroup hook reads the first page of a buffer above a page;
 * what the kernel then reads is the application's buffer again. */
struct flipper {
	volatile int *slot;
	int a, b;
	volatile int stop;
};

static void *flip(void *arg)
{
	struct flipper *f = arg;

	while (!f->stop) {
		*f->slot = f->b;
		*f->slot = f->a;
	}
	return NULL;
}

static int current(int fd, const struct opt *o)
{
	int v = -1;
	socklen_t len = sizeof(v);

	if (getsockopt(fd, o->level, o->optname, &v, &len))
		return -errno;
	return v;
}

static void race(int fd, const struct opt *o, int a, int b, long n)
{
	static int buf[8192 / sizeof(int)];
	struct flipper f = {buf, a, b, 0};
	pthread_t t;
	long i;
	int won = 0;

	buf[0] = a;
	if (pthread_create(&t, NULL, flip, &f))
		die("pthread_create");
	for (i = 1; i <= n && !won; i++) {
		setsockopt(fd, o->level, o->optname, buf, sizeof(buf));
		won = current(fd, o) == b;
	}
	f.stop = 1;
	pthread_join(t, NULL);
	printf("race %s won=%d calls=%ld\n", o->name, won, i - 1);
	fflush(stdout);
}

static void bench(int fd, const struct opt *o, int v, long n)
{
	struct timespec t0, t1;
	long i;

	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (i = 0; i < n; i++)
		setsockopt(fd, o->level, o->optname, &v, sizeof(v));
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("bench %s calls=%ld ns=%.1f\n", o->name, n,
	       ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) /
		       (double)n);
	fflush(stdout);
}

int main(int argc, char **argv)
{
	int fd, port, proto = 0, hold = 0, i = 4;
	struct sockaddr_in6 a6 = {.sin6_family = AF_INET6};
	struct sockaddr_in a4 = {.sin_family = AF_INET};
	struct sockaddr *sa;
	socklen_t salen;
	char line[256];

	if (argc < 4 || strcmp(argv[1], "connect")) {
		fprintf(stderr, "usage: sockhole connect ADDR PORT [mptcp] "
				"STEP... [hold]\n");
		return 2;
	}
	port = atoi(argv[3]);
	if (inet_pton(AF_INET, argv[2], &a4.sin_addr) == 1) {
		a4.sin_port = htons(port);
		sa = (struct sockaddr *)&a4;
		salen = sizeof(a4);
	} else if (inet_pton(AF_INET6, argv[2], &a6.sin6_addr) == 1) {
		a6.sin6_port = htons(port);
		sa = (struct sockaddr *)&a6;
		salen = sizeof(a6);
	} else {
		fprintf(stderr, "sockhole: bad address %s\n", argv[2]);
		return 2;
	}
	if (i < argc && !strcmp(argv[i], "mptcp")) {
		proto = IPPROTO_MPTCP;
		i++;
	}
	fd = socket(sa->sa_family, SOCK_STREAM, proto);
	if (fd < 0)
		die("socket");
	if (connect(fd, sa, salen))
		die("connect");
	for (; i < argc; i++) {
		const struct opt *o;
		int v, rc;

		if (!strcmp(argv[i], "hold")) {
			hold = 1;
			continue;
		}
		if (i + 1 >= argc || !(o = find_opt(argv[i + 1], &v))) {
			fprintf(stderr, "sockhole: bad step %s\n", argv[i]);
			return 2;
		}
		if (!strcmp(argv[i], "bench")) {
			if (i + 2 >= argc)
				return 2;
			bench(fd, o, v, atol(argv[i + 2]));
			i += 2;
			continue;
		}
		if (!strcmp(argv[i], "race")) {
			const char *slash = strchr(argv[i + 1], '/');

			if (!slash || i + 2 >= argc)
				return 2;
			race(fd, o, v, atoi(slash + 1), atol(argv[i + 2]));
			i += 2;
			continue;
		}
		if (!strcmp(argv[i], "set"))
			rc = setsockopt(fd, o->level, o->optname, &v, sizeof(v))
				     ? errno
				     : 0;
		else if (!strcmp(argv[i], "set32"))
			rc = set32(fd, o, v);
		else if (!strcmp(argv[i], "uring"))
			rc = set_uring(fd, o, v, 0);
		else if (!strcmp(argv[i], "uring32"))
			rc = set_uring(fd, o, v, 1);
		else
			return 2;
		printf("set %s via=%s rc=%d\n", argv[i + 1], argv[i], rc);
		i++;
	}
	salen = sizeof(a6);
	if (getsockname(fd, (struct sockaddr *)&a6, &salen))
		die("getsockname");
	printf("ready %d %d\n", port, ntohs(a6.sin6_port));
	report("client", fd);
	while (hold && fgets(line, sizeof(line), stdin))
		report("now-client", fd);
	close(fd);
	return 0;
}
