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
#include <netinet/tcp.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "peers.h"
#include "policy.h"

#define BK_EXPORT __attribute__((visibility("default")))

typedef int (*connect_fn)(int, const struct sockaddr *, socklen_t);
typedef int (*listen_fn)(int, int);
typedef int (*accept_fn)(int, struct sockaddr *, socklen_t *);
typedef int (*accept4_fn)(int, struct sockaddr *, socklen_t *, int);
typedef int (*socket_fn)(int, int, int);
typedef int (*setsockopt_fn)(int, int, int, const void *, socklen_t);
typedef ssize_t (*sendto_fn)(int, const void *, size_t, int,
			     const struct sockaddr *, socklen_t);
typedef ssize_t (*sendmsg_fn)(int, const struct msghdr *, int);
typedef int (*close_fn)(int);
typedef int (*dup2_fn)(int, int);
typedef int (*dup3_fn)(int, int, int);

/* Written once under bk_once, read-only afterwards. */
static struct bk_shim_policy bk_shim;
static connect_fn real_connect;
static listen_fn real_listen;
static accept_fn real_accept;
static accept4_fn real_accept4;
static socket_fn real_socket;
static setsockopt_fn real_setsockopt;
static sendto_fn real_sendto;
static sendmsg_fn real_sendmsg;
static close_fn real_close;
static dup2_fn real_dup2;
static dup3_fn real_dup3;
static pthread_once_t bk_once = PTHREAD_ONCE_INIT;

/*
 * What the shim knows of an fd number, one byte each:
 *
 * BK_FD_FRESH: socket() made it as TCP and it has not connected or
 * listened yet: connect() or listen() on it asks the kernel one question
 * instead of two (one system call is ~1 % of a loopback connection).
 * Every other fd is asked in full.
 *
 * BK_FD_LISTENER: with peer rules, a listener the shim saw listen(); the
 * low bits (1 << option id, the options enforce mode watches) are those
 * the program has set on it since.  In set mode they stand on what it
 * accepts, as the kernel path's record of them does (bk_sk.app):
 * nginx's so_keepalive, set between its two listen()s, keeps its own
 * values.
 *
 * A mark is not trusted alone: an fd can be closed where no wrapper sees
 * it (fclose() of an fdopen()ed FILE and glibc's other internal closes,
 * close_range, closefrom, a raw system call) and its number come back as
 * a socket made without socket() (socketpair, accept, dup, SCM_RIGHTS, a
 * raw system call); see bk_want.  close, dup2, dup3, socket(), accept()
 * and accept4() reset the numbers they see, and a socket that starts to
 * connect or listen starts afresh.  Relaxed atomics: an fd's life is
 * ordered by the system calls themselves.
 */
#define BK_TRACKED_FDS 65536
#define BK_FD_FRESH 0x80u
#define BK_FD_LISTENER 0x40u
#define BK_FD_OWN ((1u << BK_OWN_BITS) - 1)
_Static_assert(BK_FD_OWN < BK_FD_LISTENER, "option bits overlap the flags");
static _Atomic uint8_t bk_fd[BK_TRACKED_FDS];

static void bk_fd_set(int fd, unsigned bits)
{
	if (fd >= 0 && fd < BK_TRACKED_FDS)
		atomic_store_explicit(&bk_fd[fd], (uint8_t)bits,
				      memory_order_relaxed);
}

static unsigned bk_fd_get(int fd)
{
	if (fd < 0 || fd >= BK_TRACKED_FDS)
		return 0;
	return atomic_load_explicit(&bk_fd[fd], memory_order_relaxed);
}

/* The number is another socket now, or none. */
static void bk_forget(int fd)
{
	bk_fd_set(fd, 0);
}

/* The program set option (level, optname) on fd itself: on a listener the
 * shim saw listen() with peer rules, note it.  No system call. */
static void bk_note_own(int fd, int level, int optname)
{
	int id;

	if (!(bk_fd_get(fd) & BK_FD_LISTENER))
		return;
	id = bk_watched_option(level, optname);
	if (id >= 0)
		atomic_fetch_or_explicit(&bk_fd[fd], (uint8_t)(1u << id),
					 memory_order_relaxed);
}

/*
 * Whether connect() or listen() on fd applies the policy: a TCP socket
 * that has neither connected nor listened yet (TCP_CLOSE).  That is once
 * per socket, as on the kernel path, whose TCP_CONNECT_CB and
 * TCP_LISTEN_CB fire once: a non-blocking connect() called again
 * (SYN_SENT, ESTABLISHED) and listen() called again (nginx sets
 * so_keepalive between two) leave the program's own later choices
 * standing in set mode; a connect() retried after a failure (back in
 * TCP_CLOSE) gets the policy again, as on the kernel path.
 *
 * Fresh: one getsockopt, SO_PROTOCOL.  IPPROTO_TCP there is the socket
 * socket() made, not connected yet -- unless its number was closed behind
 * our back and came back as a TCP socket made without socket() (the
 * policy then lands on TCP, once), or as a raw IPPROTO_TCP socket made
 * without socket() (CAP_NET_RAW), the one corner left: its TCP_* options
 * fail and it gets a SO_KEEPALIVE flag, which raw sockets ignore.  UDP,
 * AF_UNIX, MPTCP, SCTP, other raw sockets and non-sockets are turned away.
 * Anything else: the TCP state from TCP_INFO, which only sockets with TCP
 * underneath answer (not UDP, AF_UNIX, SCTP, raw or non-sockets), then
 * SO_PROTOCOL to leave out MPTCP and SMC: two getsockopt.
 */
static bool bk_want(int fd)
{
	if (bk_fd_get(fd) & BK_FD_FRESH) {
		bk_forget(fd); /* it connects or listens now */
		return bk_proto_is_tcp(fd);
	}
	if (bk_tcp_state(fd) != TCP_CLOSE || !bk_proto_is_tcp(fd))
		return false;
	bk_forget(fd); /* what a socket at this number was is past */
	return true;
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
		bk_debug(&bk_shim,
			 "dlsym(RTLD_NEXT, \"%s\") failed: making "
			 "the system call directly",
			 name);
	return sym;
}

static void bk_init(void)
{
	int saved = errno;

	bk_shim_policy_load(&bk_shim);
	real_connect = (connect_fn)lookup("connect");
	real_listen = (listen_fn)lookup("listen");
	real_accept = (accept_fn)lookup("accept");
	real_accept4 = (accept4_fn)lookup("accept4");
	real_socket = (socket_fn)lookup("socket");
	real_setsockopt = (setsockopt_fn)lookup("setsockopt");
	real_sendto = (sendto_fn)lookup("sendto");
	real_sendmsg = (sendmsg_fn)lookup("sendmsg");
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

/* What connect() (and a send with MSG_FASTOPEN) does before the real call:
 * the options on a TCP socket that has not connected yet, when that hook
 * is on; errno left as it was.  Without peer rules the policy's own
 * values, and the destination is not looked at; with them, its peer
 * rule's values (none for an exempt peer).  The application's address is
 * read without faulting (bk_read_app): a bad pointer still gets the
 * kernel's EFAULT. */
static void bk_before_connect(int fd, const char *call,
			      const struct sockaddr *addr, socklen_t len,
			      const struct msghdr *msg)
{
	bk_ready();
	if (bk_shim.hooks & BK_HOOK_CONNECT) {
		int saved = errno;

		if (bk_want(fd)) {
			const struct bk_values *v = &bk_shim.own;

			if (bk_shim.peers.nrules)
				v = msg ? bk_values_to_msg(&bk_shim, fd, msg)
					: bk_values_to(&bk_shim, fd, call, addr,
						       len);
			if (v)
				bk_apply(&bk_shim, v, fd, BK_SIDE_CONNECT, 0);
		}
		errno = saved;
	}
}

/* Options first, so that TCP_SYNCNT, TCP_USER_TIMEOUT and TCP_MAXSEG
 * govern the handshake.  fd is not checked beyond asking the kernel. */
BK_EXPORT int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
	bk_before_connect(fd, "connect", addr, len, NULL);
	if (real_connect)
		return real_connect(fd, addr, len);
	return (int)syscall(SYS_connect, fd, addr, len);
}

/* Without peer rules accepted sockets inherit the listener's options.
 * With them the listener gets only its own (TCP_DEFER_ACCEPT) and is
 * otherwise left as the program made it, so that an exempt peer's
 * connection inherits exactly what the program set; accept() sets the
 * others per connection. */
BK_EXPORT int listen(int fd, int backlog)
{
	bk_ready();
	if (bk_shim.hooks & BK_HOOK_LISTEN) {
		int saved = errno;

		if (bk_want(fd)) {
			if (bk_shim.peers.nrules) {
				bk_apply(&bk_shim, &bk_shim.own, fd,
					 BK_AT_LISTENER, 0);
				/* from now on, note the program's own */
				bk_fd_set(fd, BK_FD_LISTENER);
			} else {
				bk_apply(&bk_shim, &bk_shim.own, fd,
					 BK_SIDE_LISTEN, 0);
			}
		}
		errno = saved;
	}
	if (real_listen)
		return real_listen(fd, backlog);
	return (int)syscall(SYS_listen, fd, backlog);
}

/*
 * After accept() or accept4() returned fd.  The number is a new
 * connection, not a socket that socket() made: a mark left on it by a
 * close the shim did not see would have connect() (or a send with
 * MSG_FASTOPEN) set the policy on an established connection.
 *
 * With peer rules (and the listen hook on), the values of the client's
 * rule, or none for an exempt client: the policy goes on once per
 * connection here, as at connect() on the other side -- in set mode but
 * for the options the program set on the listener after listen(), which
 * stand, as on the kernel path.  SO_PROTOCOL leaves out AF_UNIX, MPTCP and
 * SMC listeners' connections.  Without peer rules nothing but the mark:
 * no bk_ready() (as in close(); the constructor has set the real functions
 * and the rules by now), no system call.
 */
static void bk_accepted(int listener, int fd, const char *call)
{
	unsigned own = bk_fd_get(listener);

	if (fd < 0)
		return;
	bk_forget(fd);
	if (bk_shim.peers.nrules && (bk_shim.hooks & BK_HOOK_LISTEN)) {
		int saved = errno;

		if (bk_proto_is_tcp(fd)) {
			bool known;
			const struct bk_values *v =
				bk_values_of(&bk_shim, fd, call, &known);

			own = (own & BK_FD_LISTENER) ? own & BK_FD_OWN : 0;
			if (v)
				bk_apply(&bk_shim, v, fd, BK_AT_ACCEPT,
					 v->enforce ? 0 : own);
		}
		errno = saved;
	}
}

BK_EXPORT int accept(int fd, struct sockaddr *addr, socklen_t *len)
{
	int c;

	if (real_accept)
		c = real_accept(fd, addr, len);
	else /* accept() is accept4() without flags; aarch64 has only that */
		c = (int)syscall(SYS_accept4, fd, addr, len, 0);
	bk_accepted(fd, c, "accept");
	return c;
}

BK_EXPORT int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
	int c;

	if (real_accept4)
		c = real_accept4(fd, addr, len, flags);
	else
		c = (int)syscall(SYS_accept4, fd, addr, len, flags);
	bk_accepted(fd, c, "accept4");
	return c;
}

/*
 * TCP Fast Open: sendto() or sendmsg() with MSG_FASTOPEN connects without
 * connect() (the kernel path sees it as TCP_CONNECT_CB).  Every other send
 * passes straight through after one flag test: no bk_ready() (the
 * constructor has set the real function by now; if not, the system call
 * is made), no errno work, nothing read from buf, addr or msg.
 */
BK_EXPORT ssize_t sendto(int fd, const void *buf, size_t len, int flags,
			 const struct sockaddr *addr, socklen_t alen)
{
	if (flags & MSG_FASTOPEN)
		bk_before_connect(fd, "sendto", addr, alen, NULL);
	if (real_sendto)
		return real_sendto(fd, buf, len, flags, addr, alen);
	return syscall(SYS_sendto, fd, buf, len, flags, addr, alen);
}

BK_EXPORT ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
	if (flags & MSG_FASTOPEN)
		bk_before_connect(fd, "sendmsg", NULL, 0, msg);
	if (real_sendmsg)
		return real_sendmsg(fd, msg, flags);
	return syscall(SYS_sendmsg, fd, msg, flags);
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

		bk_fd_set(fd, tcp ? BK_FD_FRESH : 0);
		if (tcp && (bk_shim.hooks & BK_HOOK_SOCKET)) {
			int saved = errno;

			bk_apply(&bk_shim, &bk_shim.own, fd, BK_AT_SOCKET, 0);
			errno = saved;
		}
	}
	return fd;
}

/* Only to forget fds (above).  No bk_ready(): close() must stay
 * async-signal-safe; the constructor has set real_close by now. */
BK_EXPORT int close(int fd)
{
	bk_forget(fd);
	if (real_close)
		return real_close(fd);
	return (int)syscall(SYS_close, fd);
}

BK_EXPORT int dup2(int oldfd, int newfd)
{
	if (oldfd != newfd)
		bk_forget(newfd);
	if (real_dup2)
		return real_dup2(oldfd, newfd);
	if (oldfd == newfd) /* dup3 refuses this; dup2 checks oldfd */
		return (int)syscall(SYS_fcntl, oldfd, F_GETFD) < 0 ? -1 : newfd;
	return (int)syscall(SYS_dup3, oldfd, newfd, 0);
}

BK_EXPORT int dup3(int oldfd, int newfd, int flags)
{
	if (oldfd != newfd)
		bk_forget(newfd);
	if (real_dup3)
		return real_dup3(oldfd, newfd, flags);
	return (int)syscall(SYS_dup3, oldfd, newfd, flags);
}

/* BPFKEEP_ENFORCE (or a peer rule's mode=enforce): the application
 * cannot weaken the policy.  With peer rules, also note the options the
 * program sets itself on a listener (bk_fd): no system call for that. */
BK_EXPORT int setsockopt(int fd, int level, int optname, const void *optval,
			 socklen_t optlen)
{
	int capped, ret;

	bk_ready();
	if (bk_shim.enforce_any) {
		int saved = errno;
		bool rewrite = bk_enforce(&bk_shim, fd, level, optname, optval,
					  optlen, &capped);

		errno = saved;
		if (rewrite) {
			optval = &capped;
			optlen = sizeof(capped);
		}
	}
	ret = bk_real_setsockopt(fd, level, optname, optval, optlen);
	if (ret == 0 && bk_shim.peers.nrules)
		bk_note_own(fd, level, optname);
	return ret;
}
