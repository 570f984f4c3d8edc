// SPDX-License-Identifier: GPL-2.0
/*
 * Enforce mode where the cgroup/setsockopt hook does not see the call.
 *
 * The kernel runs no cgroup/setsockopt program for a 32-bit system call
 * (every call of a 32-bit binary, int $0x80 from a 64-bit one) nor for
 * io_uring's setsockopt on a ring a 32-bit call set up: net/socket.c skips
 * the hook for compat calls (__sys_setsockopt in 6.1, do_sock_setsockopt
 * since 6.8).  A neighbour's cgroup program that runs after ours may also
 * write a weaker value than ours.  Whatever the path, the option then
 * reaches the protocol's handler, with the value the kernel applies: these
 * programs run when the handler returns (fexit) and read what is in force
 * on the socket.  An option an enforced policy caps that is now outside it
 * is noted in bk_bypass (one note per socket, however many calls) and the
 * daemon is woken (bk_bypass_bell); it brings the socket back with the
 * sweep's APPLY on its cookie (bpfkeep/daemon/enforce.py).
 *
 * Only the setsockopt path is traced: the system call's handlers
 * (sock_setsockopt for SOL_SOCKET, tcp_setsockopt, mptcp_setsockopt), not
 * the functions bpf_setsockopt goes through, so a new connection -- whose
 * options bpfkeep's own programs set -- pays nothing.  A setsockopt of
 * any other option returns after two compares.  The tracing programs need
 * BTF, trampolines (fexit) and struct arguments in them (sockptr_t: Linux
 * 6.1); where they cannot load, the daemon's periodic enforce pass is the
 * bound (bpfkeep/progs/loader.py says so once).
 *
 * The socket is read at the running kernel's offsets, from its BTF
 * (bpfkeep/progs/btfdefs.py), as loss.bpf.c does, whose owner lookup these
 * programs share.
 */
#include "common.bpf.h"

/* The maps exist with or without the programs: userspace reads them
 * alike (empty), and the daemon writes bk_repaired. */
BPF_HASH(bk_bypass, struct bk_bypass_key, struct bk_bypass, BK_MAX_BYPASS);
BPF_HASH(bk_bypassed, __u64, struct bk_bypassed, BK_MAX_POLICIES);
BPF_HASH(bk_repaired, __u64, struct bk_repaired, BK_MAX_POLICIES);
/* The daemon's doorbell: one record (the note's key) per new note. */
BPF_RINGBUF_OUTPUT(bk_bypass_bell, 1);

#if defined(BK_BTF) && defined(BK_BYPASS_BTF)

#define BK_TCP_LISTEN 10

/* Is option id of the socket carrying the values (vsk, a TCP socket)
 * outside the values val[] allow?  Times are kept in jiffies. */
static __always_inline int bk_outside(void *vsk, int id, const __u32 *val,
				      __u32 hz)
{
	__u32 cap = val[id & (BK_NOPT_BPF - 1)], t = 0;
	unsigned long flags = 0;
	__u8 n = 0;

	switch (id) {
	case BK_OPT_KEEPALIVE:
		if (BK_READ(flags, vsk, BK_O_SK_FLAGS))
			return 0;
		return !(flags & (1UL << BK_SOCK_KEEPOPEN));
	case BK_OPT_KEEPIDLE:
		if (!cap || !hz || BK_READ(t, vsk, BK_O_TP_KEEPALIVE_TIME))
			return 0;
		return t > cap * hz; /* 0: the sysctl, never written */
	case BK_OPT_KEEPINTVL:
		if (!cap || !hz || BK_READ(t, vsk, BK_O_TP_KEEPALIVE_INTVL))
			return 0;
		return t > cap * hz;
	case BK_OPT_KEEPCNT:
		if (!cap || BK_READ(n, vsk, BK_O_TP_KEEPALIVE_PROBES))
			return 0;
		return n > cap;
	case BK_OPT_USER_TIMEOUT:
		/* 0 is "never": above any cap */
		if (!cap || BK_READ(t, vsk, BK_O_TP_USER_TIMEOUT))
			return 0;
		return !t || t > cap;
	}
	return 0;
}

/* The option a (level, optname) names, among those enforce mode caps;
 * -1 for any other. */
static __always_inline int bk_enforced_option(int level, int optname)
{
#define BK_ENFORCED_(id_, lvl, name, min, max, dflt, side, enforce, ...)       \
	if (BK_BY_BPF(id_) && (enforce) && level == (lvl) &&                   \
	    optname == (name))                                                 \
		return (id_);
	BK_OPTION_TABLE(BK_ENFORCED_)
#undef BK_ENFORCED_
	return -1;
}

/* Note the socket for the daemon (once until it repairs it) and count the
 * call. */
static __always_inline void bk_note(__u64 owner, __u64 cookie, int id)
{
	struct bk_bypass_key k = {.owner = owner, .cookie = cookie};
	struct bk_bypass first = {.opts = BK_BIT(id), .calls = 1}, *b;
	struct bk_bypassed zero = {}, *n;

	n = bk_bypassed.lookup_or_try_init(&owner, &zero);
	if (n)
		__sync_fetch_and_add(&n->calls[id & (BK_NOPT_BPF - 1)], 1);
	b = bk_bypass.lookup(&k);
	if (b) {
		/* Noted already: the daemon's next pass takes it. */
		b->opts |= BK_BIT(id);
		__sync_fetch_and_add(&b->calls, 1);
		return;
	}
	if (bk_bypass.insert(&k, &first) == 0)
		bk_bypass_bell.ringbuf_output(&k, sizeof(k), 0);
	else if (!bk_bypass.lookup(&k) && n)
		__sync_fetch_and_add(&n->unnoted, 1); /* the map is full */
}

/* After a setsockopt of (level, optname) on sk: is the option, as vsk
 * carries it, within sk's enforced policy?  sk decides the policy (its
 * cgroup) and the peer rule (its peer); vsk carries the values (sk
 * itself, or an MPTCP socket's first TCP subflow).  ``whole``: note every
 * socket of the policy rather than sk by its cookie. */
static __always_inline int bk_check(void *sk, void *vsk, int id, int whole)
{
	struct bk_config *cfg;
	struct bk_policy *p;
	struct bk_view v;
	__u64 cookie = 0;
	__u8 state = 0, addr[16] = {};
	__u16 family = 0, dport = 0;
	void *cg = 0;
	int zero = 0;

	if (BK_READ(cg, sk, BK_O_SK_CGROUP))
		return 0;
	p = bk_owner_of(cg);
	if (!p)
		return 0; /* no bpfkeep policy */
	v.val = p->val;
	v.flags = p->flags;
	BK_READ(state, sk, BK_O_SK_STATE);
	if (BK_PER_PEER(p) && state != BK_TCP_LISTEN) {
		/* As the cgroup hook decides it (setsockopt.bpf.c). */
		BK_READ(family, sk, BK_O_SK_FAMILY);
		BK_READ(dport, sk, BK_O_SK_DPORT);
		if (family == BK_AF_INET) {
			addr[10] = 0xff;
			addr[11] = 0xff;
			BK_READ(*(__u32 *)&addr[12], sk, BK_O_SK_DADDR);
		} else {
			BK_READ(addr, sk, BK_O_SK_V6_DADDR);
		}
		if (!bk_view_of(p, addr, __builtin_bswap16(dport), &v))
			return 0; /* an exempt peer: the program's to set */
	}
	if (!(v.flags & BK_F_ENFORCE))
		return 0;
	cfg = bk_config.lookup(&zero);
	if (!bk_outside(vsk, id, v.val, cfg ? cfg->hz : 0))
		return 0;
	if (!whole)
		BK_READ(cookie, sk, BK_O_SK_COOKIE); /* 0: none made yet */
	bk_note(p->cgroup_id, cookie, id);
	return 0;
}

/* fexit programs: ctx holds the arguments (sockptr_t, a struct, takes two
 * slots after optname), then the return value.  What was applied is read
 * from the socket, whatever the call returned. */

/* tcp_setsockopt(struct sock *sk, int level, int optname, sockptr_t optval,
 *		  unsigned int optlen): SOL_TCP options of TCP sockets. */
int kretfunc__tcp_setsockopt(unsigned long long *ctx)
{
	int id = bk_enforced_option((int)ctx[1], (int)ctx[2]);
	void *sk = (void *)ctx[0];

	if (id < 0)
		return 0;
	return bk_check(sk, sk, id, 0);
}

/* sock_setsockopt(struct socket *sock, int level, int optname, sockptr_t
 *		   optval, unsigned int optlen): SOL_SOCKET options of every
 * socket but those with their own (MPTCP). */
int kretfunc__sock_setsockopt(unsigned long long *ctx)
{
	int id = bk_enforced_option((int)ctx[1], (int)ctx[2]);
	__u16 proto = 0;
	void *sk = 0;

	if (id < 0)
		return 0;
	if (BK_READ(sk, (void *)ctx[0], BK_O_SOCKET_SK) || !sk ||
	    BK_READ(proto, sk, BK_O_SK_PROTOCOL) || proto != IPPROTO_TCP)
		return 0;
	return bk_check(sk, sk, id, 0);
}

#ifdef BK_O_MSK_FIRST
/* mptcp_setsockopt(struct sock *sk, int level, int optname, sockptr_t
 *		    optval, unsigned int optlen): an MPTCP socket copies the
 * keepalive options down to its TCP subflows (net/mptcp/sockopt.c); its
 * first subflow shows what they got.  The subflows are TCP sockets the
 * sweep reaches, by cookie, not the MPTCP socket: every socket of the
 * policy is noted. */
int kretfunc__mptcp_setsockopt(unsigned long long *ctx)
{
	int id = bk_enforced_option((int)ctx[1], (int)ctx[2]);
	void *msk = (void *)ctx[0], *ssk = 0;

	if (id < 0)
		return 0;
	if (BK_READ(ssk, msk, BK_O_MSK_FIRST) || !ssk)
		return 0;
	return bk_check(msk, ssk, id, 1);
}
#endif

#endif /* BK_BTF && BK_BYPASS_BTF */
