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

#include "peers.h"
#include "policy.h"

/* Table default -1: TCP_USER_TIMEOUT is derived from the keepalive
 * values.  Also the value stored in bk_values.value[] when that has to be
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

/* Every watched option fits in libbpfkeep.c's byte per fd. */
#define BK_FITS(id, lvl, opt, lo, hi, def, sd, enf, ...)                       \
	_Static_assert(!(enf) || (id) < BK_OWN_BITS,                           \
		       #opt " is watched: it needs a bit below BK_OWN_BITS");
BK_OPTION_TABLE(BK_FITS)
#undef BK_FITS

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

/* The option whose key (a policy key: its name without "TCP_" or "SO_",
 * in lower case; '-' for '_' accepted, as on the command line) is key[0..
 * len); -1 for none. */
static int option_by_key(const char *key, size_t len)
{
	for (int id = 0; id < BK_NOPT; id++) {
		const char *name = strchr(bk_options[id].name, '_') + 1;
		size_t i;

		if (strlen(name) != len)
			continue;
		for (i = 0; i < len; i++) {
			char k = key[i] == '-' ? '_' : key[i];
			char n = name[i];

			if (n >= 'A' && n <= 'Z')
				n = (char)(n - 'A' + 'a');
			if (k != n)
				break;
		}
		if (i == len)
			return id;
	}
	return -1;
}

bool bk_rule_option(struct bk_values *v, const char *key, size_t klen,
		    const char *val, size_t vlen, int *idp, char *why,
		    size_t whylen)
{
	int id = option_by_key(key, klen);
	const struct bk_option *o;
	char buf[24];
	long x;

	if (id < 0 || id == BK_OPT_KEEPALIVE) { /* keepalive: always on */
		(void)snprintf(why, whylen, "unknown key \"%.*s\"",
			       (int)(klen > 40 ? 40 : klen), key);
		return false;
	}
	o = &bk_options[id];
	if (o->side == BK_SIDE_LISTEN) {
		(void)snprintf(why, whylen,
			       "%s is a listener's option, not a "
			       "connection's: it is not set per peer",
			       o->name);
		return false;
	}
	/* Whole numbers as peers.py takes them: ASCII digits, maybe a minus
	 * (no plus, no blanks inside). */
	if (vlen && vlen < sizeof(buf) && val[0] != '+') {
		memcpy(buf, val, vlen);
		buf[vlen] = '\0';
	} else {
		buf[0] = '\0';
	}
	if (!parse_long(buf, &x) ||
	    (x && !(x == BK_DERIVED && o->dflt == BK_DERIVED) &&
	     (x < o->min || x > o->max))) {
		(void)snprintf(why, whylen,
			       "%.*s=\"%.*s\" is not a whole number %ld..%ld "
			       "(%s), or 0 for the kernel default",
			       (int)(klen > 40 ? 40 : klen), key,
			       (int)(vlen > 40 ? 40 : vlen), val, o->min,
			       o->max, o->unit);
		return false;
	}
	v->value[id] = (int)x;
	*idp = id;
	return true;
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

void bk_values_resolve(struct bk_values *v)
{
	int *x = v->value;

	/* Derived from the values in force: ours, or when one of them is 0
	 * the kernel's (per network namespace), read from each socket. */
	if (x[BK_OPT_USER_TIMEOUT] == BK_DERIVED && x[BK_OPT_KEEPIDLE] &&
	    x[BK_OPT_KEEPINTVL] && x[BK_OPT_KEEPCNT])
		x[BK_OPT_USER_TIMEOUT] = derive_user_timeout(
			x[BK_OPT_KEEPIDLE], x[BK_OPT_KEEPINTVL],
			x[BK_OPT_KEEPCNT]);
}

/* BPFKEEP_PEERS: parsed only when it is set and can apply; without it
 * nothing differs from a shim that knows no peer rules. */
static void load_peers(struct bk_shim_policy *p)
{
	const char *raw = getenv("BPFKEEP_PEERS");

	if (!raw)
		return;
	if (p->hooks & BK_HOOK_SOCKET) {
		/* At socket() the peer is not known yet: an exempt peer's
		 * connection would get the policy all the same. */
		bk_debug(p,
			 "BPFKEEP_PEERS ignored: BPFKEEP_HOOK=socket sets the "
			 "options before the peer is known");
		return;
	}
	bk_peers_load(p, raw);
	for (unsigned i = 0; i < p->peers.nrules; i++)
		p->enforce_any |= p->peers.rules[i].values.enforce;
}

void bk_shim_policy_load(struct bk_shim_policy *p)
{
	const char *legacy;

	memset(p, 0, sizeof(*p));
	p->debug = getenv("LIBKEEPALIVE_DEBUG") || getenv("BPFKEEP_DEBUG");
	p->hooks = parse_hooks(p);
	p->own.enforce = env_truthy(p, "BPFKEEP_ENFORCE");
	p->enforce_any = p->own.enforce;
	for (int id = 0; id < BK_NOPT; id++)
		p->own.value[id] = load_option(p, id);

	/* The original libkeepalive's switch: KEEPALIVE=off leaves sockets
	 * alone.  Here it turns the whole shim off, enforce mode included. */
	legacy = getenv("KEEPALIVE");
	if (legacy && !strcasecmp(legacy, "off")) {
		bk_debug(p, "KEEPALIVE=off: not touching any socket");
		p->hooks = 0;
		p->own.enforce = p->enforce_any = false;
	} else {
		/* Before the policy's own user timeout is resolved: a rule
		 * that gives none derives its own from its own times when the
		 * policy's is derived, as in bpfkeep/peers.py. */
		load_peers(p);
	}
	bk_values_resolve(&p->own);
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

/* The value of option id in v for socket fd; 0: not set. */
static int effective(const struct bk_values *v, int fd, int id)
{
	static const int keep[] = {BK_OPT_KEEPIDLE, BK_OPT_KEEPINTVL,
				   BK_OPT_KEEPCNT};
	int k[3];

	if (v->value[id] != BK_DERIVED)
		return v->value[id];
	for (int i = 0; i < 3; i++) {
		const struct bk_option *o = &bk_options[keep[i]];

		k[i] = v->value[keep[i]];
		if (!k[i] && !getsockopt_int(fd, o->level, o->optname, &k[i]))
			return 0;
	}
	return derive_user_timeout(k[0], k[1], k[2]);
}

/* Whether an option of this side is set at call site `at`. */
static bool applies_at(int side, int at)
{
	switch (at) {
	case BK_AT_SOCKET: /* the role is not known yet: everything */
		return true;
	case BK_AT_ACCEPT: /* a connection: the options of both sides */
		return side == BK_SIDE_BOTH;
	case BK_AT_LISTENER: /* with peer rules: the listener's own only */
		return side == BK_SIDE_LISTEN;
	default: /* BK_SIDE_CONNECT, BK_SIDE_LISTEN */
		return side == BK_SIDE_BOTH || side == at;
	}
}

static void apply_one(const struct bk_shim_policy *p, const struct bk_values *v,
		      int fd, int id, int at, unsigned keep)
{
	const struct bk_option *o = &bk_options[id];
	int x;

	if (!applies_at(o->side, at) || (keep & (1u << id)))
		return;
	x = effective(v, fd, id);
	if (!x)
		return;
	if (bk_real_setsockopt(fd, o->level, o->optname, &x, sizeof(x)) < 0)
		bk_debug(p, "setsockopt(%d, %s, %d): %s", fd, o->name, x,
			 strerror(errno));
}

void bk_apply(const struct bk_shim_policy *p, const struct bk_values *v, int fd,
	      int at, unsigned keep)
{
	for (int id = 0; id < BK_NOPT; id++)
		if (id != BK_OPT_KEEPALIVE)
			apply_one(p, v, fd, id, at, keep);
	/* Last: on a connected socket, every TCP_KEEP* set after
	 * SO_KEEPALIVE re-arms the keepalive timer. */
	apply_one(p, v, fd, BK_OPT_KEEPALIVE, at, keep);
}

/*
 * The application's memory without ever faulting on it: a bad pointer
 * must get the kernel's EFAULT, not a SIGSEGV in the shim.
 * process_vm_readv on our own process reads through the kernel's
 * copy_from_user, like setsockopt and connect themselves; reading our own
 * memory passes the ptrace access check unconditionally (same thread
 * group).  False when not all of it is readable (the kernel will refuse it
 * too) or when the call is refused (a seccomp filter returning an errno).
 */
bool bk_read_app(const void *src, void *dst, size_t len)
{
	struct iovec local = {.iov_base = dst, .iov_len = len};
	struct iovec remote = {.iov_base = (void *)(uintptr_t)src,
			       .iov_len = len};

	return process_vm_readv(getpid(), &local, 1, &remote, 1, 0) ==
	       (ssize_t)len;
}

/* The values enforce mode caps fd by: NULL when none. */
static const struct bk_values *enforced(const struct bk_shim_policy *p, int fd)
{
	const struct bk_values *v;
	bool known;

	if (!p->peers.nrules)
		return p->own.enforce ? &p->own : NULL;
	/* With peer rules a socket is capped once it has a peer: before
	 * that, connect() will set its peer's values (or none: exempt), and
	 * a listener is left as the program made it. */
	v = bk_values_of(p, fd, NULL, &known);
	return known && v && v->enforce ? v : NULL;
}

int bk_watched_option(int level, int optname)
{
	for (int id = 0; id < BK_NOPT; id++)
		if (bk_options[id].enforce && bk_options[id].level == level &&
		    bk_options[id].optname == optname)
			return id;
	return -1;
}

bool bk_enforce(const struct bk_shim_policy *p, int fd, int level, int optname,
		const void *optval, socklen_t optlen, int *out)
{
	int id = bk_watched_option(level, optname);
	const struct bk_option *o = id >= 0 ? &bk_options[id] : NULL;
	const struct bk_values *values;
	int v, cap;

	/* Too short: the kernel refuses it (EINVAL) whatever we do.  An
	 * optval the kernel cannot read: it answers EFAULT, untouched. */
	if (!o || !optval || optlen < sizeof(int) ||
	    !bk_read_app(optval, &v, sizeof(v)))
		return false;

	if (id == BK_OPT_KEEPALIVE) {
		if (v != 0)
			return false;
	} else {
		if (!p->peers.nrules && !p->own.value[id])
			return false; /* kernel default: no cap */
		if (v < 0 || (v == 0 && id != BK_OPT_USER_TIMEOUT))
			return false; /* invalid: the kernel refuses it */
	}
	if (!bk_is_tcp_fd(fd))
		return false;
	values = enforced(p, fd);
	if (!values)
		return false;
	if (id == BK_OPT_KEEPALIVE) {
		cap = 1;
	} else {
		/* TCP_USER_TIMEOUT 0 means "never": above any cap. */
		cap = effective(values, fd, id);
		if (!cap || (v > 0 && v <= cap))
			return false;
	}
	bk_debug(p, "enforce: setsockopt(%d, %s, %d) made %d", fd, o->name, v,
		 cap);
	*out = cap;
	return true;
}
