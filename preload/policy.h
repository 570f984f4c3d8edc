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
 * applies there.  With peer rules a server's connections get their values
 * at accept() (the options of both sides) and the listener only the
 * listener's own (TCP_DEFER_ACCEPT). */
#define BK_AT_SOCKET 3
#define BK_AT_ACCEPT 4
#define BK_AT_LISTENER 5

/* BPFKEEP_HOOK bits */
#define BK_HOOK_CONNECT 0x1u
#define BK_HOOK_LISTEN 0x2u
#define BK_HOOK_SOCKET 0x4u
#define BK_HOOK_DEFAULT (BK_HOOK_CONNECT | BK_HOOK_LISTEN)

/* Values to set on one socket: the policy's own, or a peer rule's. */
struct bk_values {
	/* Per option id, in the option's unit (see bpfkeep_options.h).
	 * 0: leave the kernel default (the option is not set at all).
	 * -1 (value[BK_OPT_USER_TIMEOUT] only): derive it for each socket,
	 * because keepidle, keepintvl or keepcnt is 0 and only the kernel
	 * knows its value for that socket's network namespace. */
	int value[BK_NOPT];
	bool enforce; /* the setsockopt wrapper caps these sockets' values */
};

/* Peer rules (BPFKEEP_PEERS, peers.c): at most this many rules, holding
 * at most this many networks between them (a host name that bpfkeep exec
 * resolved is one rule with an address each).  bpfkeep/preload.py has
 * the same two numbers (a test keeps them equal). */
#define BK_PEER_MAX_RULES 64
#define BK_PEER_MAX_NETS 256
#define BK_PEER_LABEL 64 /* bytes of a rule's name in debug lines */

struct bk_peer_rule {
	struct bk_values values;   /* the policy's, with the rule's keys */
	bool exempt;		   /* no values: left as the program made it */
	bool ported;		   /* applies to the ports lo..hi only */
	unsigned short lo, hi;	   /* port range, host byte order */
	char label[BK_PEER_LABEL]; /* name= or the addresses as written */
};

/* A rule's network: an IPv6 prefix, IPv4 mapped (::ffff:a.b.c.d/96+n). */
struct bk_peer_net {
	unsigned char addr[16];	 /* host bits zero */
	unsigned char prefixlen; /* 0..128 */
	unsigned char rule;	 /* index into bk_peers.rules */
};

struct bk_peers {
	unsigned nrules, nnets; /* 0 rules: no peer rules at all */
	struct bk_peer_rule rules[BK_PEER_MAX_RULES];
	struct bk_peer_net nets[BK_PEER_MAX_NETS];
};

/* The environment, parsed once at load time.  Nothing is allocated. */
struct bk_shim_policy {
	struct bk_values
		own; /* the policy's values: every peer without a rule */
	struct bk_peers peers; /* BPFKEEP_PEERS */
	/* The setsockopt wrapper looks at calls: BPFKEEP_ENFORCE, or a peer
	 * rule with mode=enforce. */
	bool enforce_any;
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

/* Set values v (the policy's own or a peer rule's) on fd for the call
 * site `at` (BK_SIDE_CONNECT, BK_SIDE_LISTEN, BK_AT_*): TCP_* first,
 * SO_KEEPALIVE last, but for the options in keep (1 << option id: the
 * program's own, which stand in set mode).  The caller has checked that fd
 * is TCP.  Failures are reported (debug) and otherwise ignored; errno is
 * clobbered, the caller restores it. */
void bk_apply(const struct bk_shim_policy *p, const struct bk_values *v, int fd,
	      int at, unsigned keep);

/* The options enforce mode watches (the table's enforce column) have ids
 * below this: libbpfkeep.c keeps them in a byte per fd. */
#define BK_OWN_BITS 6

/* The id of option (level, optname) if enforce mode watches it, else -1. */
int bk_watched_option(int level, int optname);

/* Enforce mode: if the application's setsockopt(fd, level, optname,
 * optval, optlen) would weaken the values in force for fd (SO_KEEPALIVE 0,
 * or TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT, TCP_USER_TIMEOUT above
 * them), store the value to use in *out and return true.  With peer rules
 * the values are those of fd's peer's rule: none for an exempt peer, and
 * none before fd has a peer (connect() applies them then).  errno is
 * clobbered. */
bool bk_enforce(const struct bk_shim_policy *p, int fd, int level, int optname,
		const void *optval, socklen_t optlen, int *out);

/* Copy len bytes of the application's memory at src into dst without ever
 * faulting on it (process_vm_readv on our own process): false when not all
 * of it is readable, or when the call is refused (seccomp). */
bool bk_read_app(const void *src, void *dst, size_t len);

/* For peers.c: the option KEY=VALUE of a peer rule into v (the option id
 * in *id).  False, with the reason in why, for an unknown key, an option
 * that is not per connection (TCP_DEFER_ACCEPT: a listener's), or a value
 * that is not a whole number in the option's range (0: the kernel default;
 * -1 for user_timeout: derived from the rule's own times). */
bool bk_rule_option(struct bk_values *v, const char *key, size_t klen,
		    const char *val, size_t vlen, int *id, char *why,
		    size_t whylen);

/* A derived user timeout (-1) computed from v's keepalive times when all
 * three are set; left -1 (derived per socket) otherwise. */
void bk_values_resolve(struct bk_values *v);

/* One "libbpfkeep: ..." line on stderr when debug is on; write(2) of a
 * stack buffer, no stdio, no allocation. */
void bk_debug(const struct bk_shim_policy *p, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/* The real setsockopt, provided by libbpfkeep.c: the wrapper must not see
 * the shim's own calls. */
int bk_real_setsockopt(int fd, int level, int optname, const void *optval,
		       socklen_t optlen);

#endif /* BPFKEEP_PRELOAD_POLICY_H */
