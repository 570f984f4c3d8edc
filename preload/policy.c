/* SPDX-License-Identifier: MIT */
/*
 * libbpfkeep's option logic: read the environment once, set the options
 * on a TCP socket, cap an application's setsockopt in enforce mode.
 *
 * Driven by BK_OPTION_TABLE from ../bpf/bpfkeep_options.h, generated from
 * bpfkeep/options.py: ranges, defaults, sides and environment names are
 * defined there, once, and every loop below walks that table.
 */
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "policy.h"

/* Table default -1: TCP_USER_TIMEOUT is derived from the keepalive
 * values.  Also the value stored in bk_shim_policy.value[] when that has to be
 * done per socket. */
#define BK_DERIVED (-1)

#define BK_NENV 3

struct bk_option {
	int level;
	int optname;
	const char *name; /* "TCP_KEEPIDLE": for messages */
	long min;	  /* smallest accepted value other than 0 */
	long max;	  /* unit: bpfkeep_options.h, BK_OPT_* */
	int dflt;	  /* 0: kernel default; BK_DERIVED */
	int side;	  /* BK_SIDE_* */
	/* enforce mode caps the application's value (0 keepalive becomes 1;
	 * times above the policy, and a user timeout of 0, are lowered) --
	 * the same rules as bk_setsockopt in bpf/setsockopt.bpf.c */
	int enforce;
	const char *unit; /* "s", "ms", "probes", "bytes", ... */
	/* canonical name (libkeepalive), alias (nginx-upstream shim), legacy
	 * name (original libkeepalive, Debian's libkeepalive0): the first
	 * one set is used */
	const char *env[BK_NENV];
};

#define BK_OPTION(id, lvl, opt, lo, hi, def, sd, enf, unt, env0, env1, env2)   \
	[id] = {.level = (lvl),                                                \
		.optname = (opt),                                              \
		.name = #opt,                                                  \
		.min = (lo),                                                   \
		.max = (hi),                                                   \
		.dflt = (def),                                                 \
		.side = (sd),                                                  \
		.enforce = (enf),                                              \
		.unit = (unt),                                                 \
		.env = {(env0), (env1), (env2)}},
static const struct bk_option bk_options[BK_NOPT] = {
	BK_OPTION_TABLE(BK_OPTION)};
#undef BK_OPTION

void bk_debug(const struct bk_shim_policy *p, const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	int n, m;

	if (!p->debug)
		return;
	n = snprintf(buf, sizeof(buf), "libbpfkeep: ");
	va_start(ap, fmt);
	m = vsnprintf(buf + n, sizeof(buf) - (size_t)n - 1, fmt, ap);
	va_end(ap);
	if (m < 0)
		return;
	n += m;
	if ((size_t)n > sizeof(buf) - 2)
		n = (int)sizeof(buf) - 2;
	buf[n++] = '\n';
	/* One write(2) per line: lines of threads do not interleave. */
	(void)!write(STDERR_FILENO, buf, (size_t)n);
}

/* A whole decimal number: optional sign, digits, nothing else (no
 * blanks).  atoi() would turn "15s" into 15 and "abc" into 0. */
static int parse_long(const char *s, long *out)
{
	char *end;
	long v;

	if (!((*s >= '0' && *s <= '9') || *s == '-' || *s == '+'))
		return 0;
	errno = 0;
	v = strtol(s, &end, 10);
	if (end == s || *end != '\0' || errno == ERANGE)
		return 0;
	*out = v;
	return 1;
}

static void describe_default(const struct bk_option *o, char *buf, size_t len)
{
	if (o->dflt == BK_DERIVED)
		(void)snprintf(buf, len, "the derived value");
	else if (o->dflt == 0)
		(void)snprintf(buf, len, "the kernel default");
	else
		(void)snprintf(buf, len, "%d", o->dflt);
}

/* The value of option `id` from the environment, or its default. */
static int load_option(const struct bk_shim_policy *p, int id)
{
	const struct bk_option *o = &bk_options[id];
	const char *names[BK_NENV + 1] = {o->env[0], o->env[1], o->env[2],
					  NULL};
	const char *name = NULL, *raw = NULL;
	char dflt[32];
	long v;

	for (int k = 0; k < BK_NENV && !raw; k++) {
		name = names[k];
		if (name)
			raw = getenv(name);
	}
	if (!raw)
		return o->dflt;

	describe_default(o, dflt, sizeof(dflt));
	if (!parse_long(raw, &v)) {
		bk_debug(p,
			 "%s=\"%s\" is not a whole number: ignored, using %s",
			 name, raw, dflt);
		return o->dflt;
	}
	if (v == 0)
		return 0; /* leave the kernel default: libkeepalive's meaning */
	if (v == BK_DERIVED && o->dflt == BK_DERIVED)
		return BK_DERIVED; /* libkeepalive: -1 derives it */
	if (v < o->min || v > o->max) {
		bk_debug(p,
			 "%s=\"%s\" is out of range %ld..%ld (or 0 for the "
			 "kernel default): ignored, using %s",
			 name, raw, o->min, o->max, dflt);
		return o->dflt;
	}
	return (int)v;
}

/* (keepidle s + keepintvl s * keepcnt) in ms, at most INT_MAX:
 * (32767 + 32767 * 127) * 1000 does not fit in an int. */
static int derive_user_timeout(long idle, long intvl, long cnt)
{
	long long ms = ((long long)idle + (long long)intvl * cnt) * 1000;

	return ms > INT_MAX ? INT_MAX : (int)ms;
}

static int env_truthy(const struct bk_shim_policy *p, const char *name)
{
	static const char *const yes[] = {"1", "yes", "true", "on", "enforce"};
	static const char *const no[] = {"", "0", "no", "false", "off"};
	const char *raw = getenv(name);

	if (!raw)
		return 0;
	for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++)
		if (!strcasecmp(raw, yes[i]))
			return 1;
	for (size_t i = 0; i < sizeof(no) / sizeof(no[0]); i++)
		if (!strcasecmp(raw, no[i]))
			return 0;
	bk_debug(p, "%s=\"%s\" is not one of 1, yes, true, on: ignored", name,
		 raw);
	return 0;
}

/* BPFKEEP_HOOK: a list of connect, listen, socket separated by commas,
 * colons or blanks.  Unset, empty or nothing valid: connect,listen.  One
 * debug line at most. */
static unsigned parse_hooks(const struct bk_shim_policy *p)
{
	static const struct {
		const char *name;
		unsigned bit;
	} known[] = {{"connect", BK_HOOK_CONNECT},
		     {"listen", BK_HOOK_LISTEN},
		     {"socket", BK_HOOK_SOCKET}};
	const size_t nknown = sizeof(known) / sizeof(known[0]);
	const char *raw = getenv("BPFKEEP_HOOK"), *s, *bad = NULL;
	size_t badlen = 0;
	unsigned hooks = 0;

	if (!raw)
		return BK_HOOK_DEFAULT;
	for (s = raw; *s; s += strcspn(s, ",: \t")) {
		size_t len, i;

		s += strspn(s, ",: \t");
		len = strcspn(s, ",: \t");
		if (!len)
			break;
		for (i = 0; i < nknown; i++)
			if (strlen(known[i].name) == len &&
			    !strncasecmp(s, known[i].name, len))
				break;
		if (i < nknown) {
			hooks |= known[i].bit;
		} else if (!bad) {
			bad = s;
			badlen = len;
		}
	}
	if (bad)
		bk_debug(p,
			 "BPFKEEP_HOOK=\"%s\": unknown hook \"%.*s\" ignored "
			 "(use connect, listen, socket)%s",
			 raw, (int)badlen, bad,
			 hooks ? "" : "; using connect,listen");
	return hooks ? hooks : BK_HOOK_DEFAULT;
}

void bk_shim_policy_load(struct bk_shim_policy *p)
{
	const char *legacy;
	int *v = p->value;

	memset(p, 0, sizeof(*p));
	p->debug = getenv("LIBKEEPALIVE_DEBUG") || getenv("BPFKEEP_DEBUG");
	p->hooks = parse_hooks(p);
	p->enforce = env_truthy(p, "BPFKEEP_ENFORCE");
	for (int id = 0; id < BK_NOPT; id++)
		v[id] = load_option(p, id);

	/* Derived from the values in force: ours, or when one of them is 0
	 * the kernel's (per network namespace), read from each socket. */
	if (v[BK_OPT_USER_TIMEOUT] == BK_DERIVED && v[BK_OPT_KEEPIDLE] &&
	    v[BK_OPT_KEEPINTVL] && v[BK_OPT_KEEPCNT])
		v[BK_OPT_USER_TIMEOUT] = derive_user_timeout(
			v[BK_OPT_KEEPIDLE], v[BK_OPT_KEEPINTVL],
			v[BK_OPT_KEEPCNT]);

	/* The original libkeepalive's switch: KEEPALIVE=off leaves sockets
	 * alone.  Here it turns the whole shim off, enforce mode included. */
	legacy = getenv("KEEPALIVE");
	if (legacy && !strcasecmp(legacy, "off")) {
		bk_debug(p, "KEEPALIVE=off: not touching any socket");
		p->hooks = 0;
		p->enforce = 0;
	}
}

static int getsockopt_int(int fd, int level, int optname, int *out)
{
	socklen_t len = sizeof(*out);

	return getsockopt(fd, level, optname, out, &len) == 0 &&
	       len == sizeof(*out);
}

int bk_tcp_state(int fd)
{
	unsigned char state;
	socklen_t len = sizeof(state);

	/* struct tcp_info begins with tcpi_state; the kernel copies only
	 * the bytes asked for. */
	if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &state, &len) < 0 ||
	    len != sizeof(state))
		return -1;
	return state;
}

bool bk_proto_is_tcp(int fd)
{
	int proto;

	return getsockopt_int(fd, SOL_SOCKET, SO_PROTOCOL, &proto) &&
	       proto == IPPROTO_TCP;
}

bool bk_is_tcp_fd(int fd)
{
	int type;

	/* SO_PROTOCOL first: it alone turns away UDP, AF_UNIX (0), MPTCP,
	 * SCTP and non-sockets.  IPPROTO_TCP with SOCK_STREAM is TCP over
	 * IPv4 or IPv6: no other family gives a stream socket protocol number
	 * 6 (raw sockets can, hence SO_TYPE), so SO_DOMAIN needs no third
	 * call. */
	return bk_proto_is_tcp(fd) &&
	       getsockopt_int(fd, SOL_SOCKET, SO_TYPE, &type) &&
	       type == SOCK_STREAM;
}

bool bk_is_tcp_args(int domain, int type, int protocol)
{
	return (domain == AF_INET || domain == AF_INET6) &&
	       (type & ~(SOCK_NONBLOCK | SOCK_CLOEXEC)) == SOCK_STREAM &&
	       (protocol == 0 || protocol == IPPROTO_TCP);
}

/* The policy's value of option id for socket fd; 0: not set. */
static int effective(const struct bk_shim_policy *p, int fd, int id)
{
	static const int keep[] = {BK_OPT_KEEPIDLE, BK_OPT_KEEPINTVL,
				   BK_OPT_KEEPCNT};
	int k[3];

	if (p->value[id] != BK_DERIVED)
		return p->value[id];
	for (int i = 0; i < 3; i++) {
		const struct bk_option *o = &bk_options[keep[i]];

		k[i] = p->value[keep[i]];
		if (!k[i] && !getsockopt_int(fd, o->level, o->optname, &k[i]))
			return 0;
	}
	return derive_user_timeout(k[0], k[1], k[2]);
}

static void apply_one(const struct bk_shim_policy *p, int fd, int id, int at)
{
	const struct bk_option *o = &bk_options[id];
	int v;

	if (o->side != BK_SIDE_BOTH && at != BK_AT_SOCKET && at != o->side)
		return;
	v = effective(p, fd, id);
	if (!v)
		return;
	if (bk_real_setsockopt(fd, o->level, o->optname, &v, sizeof(v)) < 0)
		bk_debug(p, "setsockopt(%d, %s, %d): %s", fd, o->name, v,
			 strerror(errno));
}

void bk_apply(const struct bk_shim_policy *p, int fd, int at)
{
	for (int id = 0; id < BK_NOPT; id++)
		if (id != BK_OPT_KEEPALIVE)
			apply_one(p, fd, id, at);
	/* Last: on a connected socket, every TCP_KEEP* set after
	 * SO_KEEPALIVE re-arms the keepalive timer. */
	apply_one(p, fd, BK_OPT_KEEPALIVE, at);
}

/*
 * Copy the int at the application's optval without ever faulting on it:
 * a bad pointer must get the kernel's EFAULT, not a SIGSEGV in the shim.
 * process_vm_readv on our own process reads through the kernel's
 * copy_from_user, like setsockopt itself; reading our own memory passes
 * the ptrace access check unconditionally (same thread group).  False
 * when not all four bytes are readable (the kernel will refuse them too)
 * or when the call is refused (a seccomp filter returning an errno): then
 * the application's call goes to the kernel unchanged.
 */
static bool read_app_int(const void *optval, int *out)
{
	struct iovec local = {.iov_base = out, .iov_len = sizeof(*out)};
	struct iovec remote = {.iov_base = (void *)(uintptr_t)optval,
			       .iov_len = sizeof(*out)};

	return process_vm_readv(getpid(), &local, 1, &remote, 1, 0) ==
	       (ssize_t)sizeof(*out);
}

bool bk_enforce(const struct bk_shim_policy *p, int fd, int level, int optname,
		const void *optval, socklen_t optlen, int *out)
{
	const struct bk_option *o = NULL;
	int id, v, cap;

	for (id = 0; id < BK_NOPT; id++) {
		if (bk_options[id].enforce && bk_options[id].level == level &&
		    bk_options[id].optname == optname) {
			o = &bk_options[id];
			break;
		}
	}
	/* Too short: the kernel refuses it (EINVAL) whatever we do.  An
	 * optval the kernel cannot read: it answers EFAULT, untouched. */
	if (!o || !optval || optlen < sizeof(int) || !read_app_int(optval, &v))
		return false;

	if (id == BK_OPT_KEEPALIVE) {
		if (v != 0)
			return false;
	} else {
		if (!p->value[id])
			return false; /* kernel default: no cap */
		if (v < 0 || (v == 0 && id != BK_OPT_USER_TIMEOUT))
			return false; /* invalid: the kernel refuses it */
	}
	if (!bk_is_tcp_fd(fd))
		return false;
	if (id == BK_OPT_KEEPALIVE) {
		cap = 1;
	} else {
		/* TCP_USER_TIMEOUT 0 means "never": above any cap. */
		cap = effective(p, fd, id);
		if (!cap || (v > 0 && v <= cap))
			return false;
	}
	bk_debug(p, "enforce: setsockopt(%d, %s, %d) made %d", fd, o->name, v,
		 cap);
	*out = cap;
	return true;
}
