/* SPDX-License-Identifier: MIT */
/*
 * The option logic of libbpfkeep, kept apart from the interposers
 * (libbpfkeep.c) so that it exists once, whichever call triggers it.
 * Everything here is hidden (-fvisibility=hidden); only the wrappers in
 * libbpfkeep.c are exported.
 */
#ifndef BPFKEEP_PRELOAD_POLICY_H
#define BPFKEEP_PRELOAD_POLICY_H

#include <stdbool.h>
#include <sys/socket.h>

#include "bpfkeep_options.h"

/* Where the options are applied: a call site.  BK_SIDE_CONNECT and
 * BK_SIDE_LISTEN (from the generated header) name the connect() and
 * listen() hooks; at socket() the role is not known yet, so every option
 * applies there. */
#define BK_AT_SOCKET 3

/* BPFKEEP_HOOK bits */
#define BK_HOOK_CONNECT 0x1u
#define BK_HOOK_LISTEN 0x2u
#define BK_HOOK_SOCKET 0x4u
#define BK_HOOK_DEFAULT (BK_HOOK_CONNECT | BK_HOOK_LISTEN)

/* The environment, parsed once at load time.  Nothing is allocated. */
struct bk_shim_policy {
	/* Per option id, in the option's unit (see bpfkeep_options.h).
	 * 0: leave the kernel default (the option is not set at all).
	 * -1 (value[BK_OPT_USER_TIMEOUT] only): derive it for each socket,
	 * because keepidle, keepintvl or keepcnt is 0 and only the kernel
	 * knows its value for that socket's network namespace. */
	int value[BK_NOPT];
	bool enforce;	/* BPFKEEP_ENFORCE: the setsockopt wrapper caps */
	bool debug;	/* LIBKEEPALIVE_DEBUG / BPFKEEP_DEBUG set */
	unsigned hooks; /* BK_HOOK_* */
};

/* Fill *p from the process environment; report bad values when debug is
 * on.  Called once, from the library constructor (or the first wrapper). */
void bk_shim_policy_load(struct bk_shim_policy *p);

/* True for an AF_INET/AF_INET6 SOCK_STREAM IPPROTO_TCP socket (asks the
 * kernel: SO_TYPE, SO_DOMAIN, SO_PROTOCOL).  False for anything else,
 * MPTCP and SCTP included, and for a bad fd. */
bool bk_is_tcp_fd(int fd);

/* The TCP state of fd (TCP_CLOSE, TCP_LISTEN, ... from <netinet/tcp.h>),
 * read from the first byte of TCP_INFO: one system call.  -1 when fd
 * does not answer SOL_TCP: UDP, AF_UNIX, raw (whatever its protocol),
 * SCTP, packet sockets, non-sockets, bad fds.  TCP answers, and so do
 * MPTCP and SMC, which run TCP underneath (SO_PROTOCOL tells them
 * apart). */
int bk_tcp_state(int fd);

/* SO_PROTOCOL is IPPROTO_TCP: one system call. */
bool bk_proto_is_tcp(int fd);

/* The same, from socket()'s arguments. */
bool bk_is_tcp_args(int domain, int type, int protocol);

/* Set the policy's options on fd for the call site `at` (BK_SIDE_CONNECT,
 * BK_SIDE_LISTEN or BK_AT_SOCKET): TCP_* first, SO_KEEPALIVE last.  The
 * caller has checked that fd is TCP.  Failures are reported (debug) and
 * otherwise ignored; errno is clobbered, the caller restores it. */
void bk_apply(const struct bk_shim_policy *p, int fd, int at);

/* Enforce mode: if the application's setsockopt(fd, level, optname,
 * optval, optlen) would weaken the policy (SO_KEEPALIVE 0, or
 * TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT, TCP_USER_TIMEOUT above the
 * policy's value), store the value to use in *out and return true.
 * errno is clobbered. */
bool bk_enforce(const struct bk_shim_policy *p, int fd, int level, int optname,
		const void *optval, socklen_t optlen, int *out);

/* One "libbpfkeep: ..." line on stderr when debug is on; write(2) of a
 * stack buffer, no stdio, no allocation. */
void bk_debug(const struct bk_shim_policy *p, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/* The real setsockopt, provided by libbpfkeep.c: the wrapper must not see
 * the shim's own calls. */
int bk_real_setsockopt(int fd, int level, int optname, const void *optval,
		       socklen_t optlen);

#endif /* BPFKEEP_PRELOAD_POLICY_H */
