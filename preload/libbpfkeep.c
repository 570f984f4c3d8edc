/* SPDX-License-Identifier: MIT */
/*
 * libbpfkeep: bpfkeep's unprivileged fallback, an LD_PRELOAD shim that
 * turns TCP keepalive on for a dynamically linked program's sockets.
 *
 * This file holds only the interposers: the lookup of the real functions
 * and thin wrappers around them.  What to set, and how, is policy.c.
 *
 * Every wrapper fails open and is invisible: the shim's own failures are
 * ignored (reported with LIBKEEPALIVE_DEBUG), errno and the return value
 * are exactly what the real call left, and when dlsym cannot find the
 * real function the raw system call is made instead.
 */
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <fcntl.h>
#include <stdbool.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "policy.h"

#define BK_EXPORT __attribute__((visibility("default")))

typedef int (*connect_fn)(int, const struct sockaddr *, socklen_t);
typedef int (*listen_fn)(int, int);
typedef int (*socket_fn)(int, int, int);
typedef int (*setsockopt_fn)(int, int, int, const void *, socklen_t);
typedef int (*close_fn)(int);
typedef int (*dup2_fn)(int, int);
typedef int (*dup3_fn)(int, int, int);

/* Written once under bk_once, read-only afterwards. */
static struct bk_policy bk_policy;
static connect_fn real_connect;
static listen_fn real_listen;
static socket_fn real_socket;
static setsockopt_fn real_setsockopt;
static close_fn real_close;
static dup2_fn real_dup2;
static dup3_fn real_dup3;
static pthread_once_t bk_once = PTHREAD_ONCE_INIT;

/*
 * The fds that socket() (below) created as TCP: connect() and listen() on
 * them need one getsockopt, not two, to tell what they are (one system
 * call is ~2.5 % of a loopback connection).  A mark is cleared before the
 * fd is closed or replaced through close/dup2/dup3, and by socket() when
 * the number comes back as anything else; fds made any other way (accept,
 * raw system calls) and fds beyond BK_TRACKED_FDS are checked with the
 * kernel in full.  Relaxed atomics: an fd's life is ordered by the system
 * calls themselves.
 */
#define BK_TRACKED_FDS 65536
#define BK_WORD_BITS (8 * sizeof(unsigned long))
static _Atomic unsigned long bk_tcp_fds[BK_TRACKED_FDS / BK_WORD_BITS];

static void bk_mark(int fd, bool tcp)
{
	unsigned long bit;

	if (fd < 0 || fd >= BK_TRACKED_FDS)
		return;
	bit = 1UL << ((unsigned)fd % BK_WORD_BITS);
	if (tcp)
		atomic_fetch_or_explicit(
			&bk_tcp_fds[(unsigned)fd / BK_WORD_BITS], bit,
			memory_order_relaxed);
	else
		atomic_fetch_and_explicit(
			&bk_tcp_fds[(unsigned)fd / BK_WORD_BITS], ~bit,
			memory_order_relaxed);
}

/*
 * A mark alone is not proof: the fd may have been closed where no wrapper
 * sees it (fclose() of an fdopen()ed FILE and glibc's other internal
 * closes, close_range, closefrom, a raw system call) and its number reused
 * by a socket made without socket() (socketpair, accept, dup, SCM_RIGHTS,
 * a raw system call).  So a marked fd is asked SO_PROTOCOL: IPPROTO_TCP
 * there is TCP, except for a raw IPPROTO_TCP socket (CAP_NET_RAW, made
 * without socket() into a number closed behind our back), on which the
 * TCP_* options fail (ENOPROTOOPT) and SO_KEEPALIVE is a flag raw sockets
 * ignore.  UDP, AF_UNIX, MPTCP, SCTP, other raw sockets and non-sockets
 * are turned away, and their mark dropped.
 */
static bool bk_is_tcp(int fd)
{
	if (fd >= 0 && fd < BK_TRACKED_FDS &&
	    (atomic_load_explicit(&bk_tcp_fds[(unsigned)fd / BK_WORD_BITS],
				  memory_order_relaxed) >>
	     ((unsigned)fd % BK_WORD_BITS)) &
		    1UL) {
		if (bk_proto_is_tcp(fd))
			return true;
		bk_mark(fd, false);
		return false;
	}
	return bk_is_tcp_fd(fd);
}

static void *lookup(const char *name)
{
#ifdef BK_TEST_NO_DLSYM
	/* Test build: exercise the system call fallback. */
	void *sym = NULL;
#else
	void *sym = dlsym(RTLD_NEXT, name);
#endif
	if (!sym)
		bk_debug(&bk_policy,
			 "dlsym(RTLD_NEXT, \"%s\") failed: making "
			 "the system call directly",
			 name);
	return sym;
}

static void bk_init(void)
{
	int saved = errno;

	bk_policy_load(&bk_policy);
	real_connect = (connect_fn)lookup("connect");
	real_listen = (listen_fn)lookup("listen");
	real_socket = (socket_fn)lookup("socket");
	real_setsockopt = (setsockopt_fn)lookup("setsockopt");
	real_close = (close_fn)lookup("close");
	real_dup2 = (dup2_fn)lookup("dup2");
	real_dup3 = (dup3_fn)lookup("dup3");
	errno = saved;
}

/* Most programs get here first, before any thread exists; the wrappers
 * also go through bk_once, for calls made by constructors that ran
 * before this one. */
__attribute__((constructor)) static void bk_constructor(void)
{
	(void)pthread_once(&bk_once, bk_init);
}

static inline void bk_ready(void)
{
	(void)pthread_once(&bk_once, bk_init);
}

int bk_real_setsockopt(int fd, int level, int optname, const void *optval,
		       socklen_t optlen)
{
	if (real_setsockopt)
		return real_setsockopt(fd, level, optname, optval, optlen);
	return (int)syscall(SYS_setsockopt, fd, level, optname, optval, optlen);
}

/* What connect() and listen() do before the real call: the policy's options
 * on a TCP socket, when that hook is on; errno left as it was. */
static void bk_before(int fd, unsigned hook, int side)
{
	bk_ready();
	if (bk_policy.hooks & hook) {
		int saved = errno;

		if (bk_is_tcp(fd))
			bk_apply(&bk_policy, fd, side);
		errno = saved;
	}
}

/* Options first, so that TCP_SYNCNT, TCP_USER_TIMEOUT and TCP_MAXSEG
 * govern the handshake.  fd is not checked beyond asking the kernel;
 * addr is never read (a bad pointer must give EFAULT, not a crash). */
BK_EXPORT int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
	bk_before(fd, BK_HOOK_CONNECT, BK_SIDE_CONNECT);
	if (real_connect)
		return real_connect(fd, addr, len);
	return (int)syscall(SYS_connect, fd, addr, len);
}

/* Accepted sockets inherit the listener's options. */
BK_EXPORT int listen(int fd, int backlog)
{
	bk_before(fd, BK_HOOK_LISTEN, BK_SIDE_LISTEN);
	if (real_listen)
		return real_listen(fd, backlog);
	return (int)syscall(SYS_listen, fd, backlog);
}

/* BPFKEEP_HOOK=socket: for programs whose connect/listen another preload
 * library already wraps without passing the call on. */
BK_EXPORT int socket(int domain, int type, int protocol)
{
	int fd;

	bk_ready();
	if (real_socket)
		fd = real_socket(domain, type, protocol);
	else
		fd = (int)syscall(SYS_socket, domain, type, protocol);
	if (fd >= 0) {
		bool tcp = bk_is_tcp_args(domain, type, protocol);

		bk_mark(fd, tcp);
		if (tcp && (bk_policy.hooks & BK_HOOK_SOCKET)) {
			int saved = errno;

			bk_apply(&bk_policy, fd, BK_AT_SOCKET);
			errno = saved;
		}
	}
	return fd;
}

/* Only to forget fds (above).  No bk_ready(): close() must stay
 * async-signal-safe; the constructor has set real_close by now. */
BK_EXPORT int close(int fd)
{
	bk_mark(fd, false);
	if (real_close)
		return real_close(fd);
	return (int)syscall(SYS_close, fd);
}

BK_EXPORT int dup2(int oldfd, int newfd)
{
	if (oldfd != newfd)
		bk_mark(newfd, false);
	if (real_dup2)
		return real_dup2(oldfd, newfd);
	if (oldfd == newfd) /* dup3 refuses this; dup2 checks oldfd */
		return (int)syscall(SYS_fcntl, oldfd, F_GETFD) < 0 ? -1 : newfd;
	return (int)syscall(SYS_dup3, oldfd, newfd, 0);
}

BK_EXPORT int dup3(int oldfd, int newfd, int flags)
{
	if (oldfd != newfd)
		bk_mark(newfd, false);
	if (real_dup3)
		return real_dup3(oldfd, newfd, flags);
	return (int)syscall(SYS_dup3, oldfd, newfd, flags);
}

/* BPFKEEP_ENFORCE: the application cannot weaken the policy. */
BK_EXPORT int setsockopt(int fd, int level, int optname, const void *optval,
			 socklen_t optlen)
{
	int capped;

	bk_ready();
	if (bk_policy.enforce) {
		int saved = errno;
		bool rewrite = bk_enforce(&bk_policy, fd, level, optname,
					  optval, optlen, &capped);

		errno = saved;
		if (rewrite) {
			optval = &capped;
			optlen = sizeof(capped);
		}
	}
	return bk_real_setsockopt(fd, level, optname, optval, optlen);
}
