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
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "policy.h"

#define BK_EXPORT __attribute__((visibility("default")))

typedef int (*connect_fn)(int, const struct sockaddr *, socklen_t);
typedef int (*listen_fn)(int, int);
typedef int (*socket_fn)(int, int, int);
typedef int (*setsockopt_fn)(int, int, int, const void *, socklen_t);

/* Written once under bk_once, read-only afterwards. */
static struct bk_policy bk_policy;
static connect_fn real_connect;
static listen_fn real_listen;
static socket_fn real_socket;
static setsockopt_fn real_setsockopt;
static pthread_once_t bk_once = PTHREAD_ONCE_INIT;

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

/* Options first, so that TCP_SYNCNT, TCP_USER_TIMEOUT and TCP_MAXSEG
 * govern the handshake.  fd is not checked beyond asking the kernel;
 * addr is never read (a bad pointer must give EFAULT, not a crash). */
BK_EXPORT int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
	bk_ready();
	if (bk_policy.hooks & BK_HOOK_CONNECT) {
		int saved = errno;

		if (bk_is_tcp_fd(fd))
			bk_apply(&bk_policy, fd, BK_SIDE_CONNECT);
		errno = saved;
	}
	if (real_connect)
		return real_connect(fd, addr, len);
	return (int)syscall(SYS_connect, fd, addr, len);
}

/* Accepted sockets inherit the listener's options. */
BK_EXPORT int listen(int fd, int backlog)
{
	bk_ready();
	if (bk_policy.hooks & BK_HOOK_LISTEN) {
		int saved = errno;

		if (bk_is_tcp_fd(fd))
			bk_apply(&bk_policy, fd, BK_SIDE_LISTEN);
		errno = saved;
	}
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
	if (fd >= 0 && (bk_policy.hooks & BK_HOOK_SOCKET) &&
	    bk_is_tcp_args(domain, type, protocol)) {
		int saved = errno;

		bk_apply(&bk_policy, fd, BK_AT_SOCKET);
		errno = saved;
	}
	return fd;
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
