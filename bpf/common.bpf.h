/* SPDX-License-Identifier: GPL-2.0 */
/*
 * What bpfkeep's three BPF programs share: the maps they all use, the
 * helpers, and the option table as they walk it.  One program per file
 * over this header: sockops.bpf.c (new sockets), setsockopt.bpf.c (what a
 * program sets itself), sweep.bpf.c (sockets that already exist);
 * bpfkeep.bpf.c puts them in the one object bcc builds.  bpfkeep.h is the
 * other header: the structs and constants userspace reads too.
 *
 * One copy of each program is loaded and pinned; sock_ops and setsockopt
 * are attached (bpf_link) to every cgroup that has a policy.  Each
 * attachment finds its own policy and counters through cgroup local
 * storage (keyed by the cgroup id alone, so the sock_ops and setsockopt
 * attachments of one cgroup share them).  Userspace changes a policy by
 * updating the map: new sockets see the new values at once, with no
 * re-attach and no gap; the sweep (an iter/tcp program) brings the
 * sockets that already exist to the new values.
 *
 * Who owns a socket is never kept in shared context fields another tool's
 * program may also write (bpf_sock_ops.reply, the callback flags).  With
 * one policy over a socket's cgroup the owner is that policy; only under
 * nested policies is it written in the socket itself (bk_sk, socket local
 * storage), as is what a program chose itself.  Everything else is told
 * by the values in force (see struct bk_sk): a record costs a connection
 * more than the five options do (bench/: "the pieces").
 *
 * Only UAPI types and constants are used (struct bpf_sock_ops, struct
 * bpf_sockopt, the socket option names), and no field of the kernel's
 * struct sock is read: bcc applies no CO-RE relocation, so any distro
 * kernel header set compiles this, whatever kernel is running.
 */
#ifndef BPFKEEP_COMMON_BPF_H
#define BPFKEEP_COMMON_BPF_H

#include <uapi/linux/bpf.h>
/* The names the option table gives levels and options: IPPROTO_TCP,
 * TCP_KEEPIDLE..., SOL_SOCKET and SO_KEEPALIVE (from the generic socket.h:
 * their values there are those of every architecture bpfkeep supports,
 * the numbers bpfkeep/options.py has). */
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/asm-generic/socket.h>

#include "bpfkeep.h"

/* bcc's BPF_CGROUP_STORAGE keys by (cgroup id, attach type); a bare u64 key
 * makes one storage per cgroup shared by all attach types (Linux 5.9+). */
#define BK_CGROUP_STORAGE(_name, _leaf_type, _kind)                            \
	struct _name##_table_t {                                               \
		__u64 key;                                                     \
		_leaf_type leaf;                                               \
		_leaf_type *(*lookup)(__u64 *);                                \
		int (*update)(__u64 *, _leaf_type *);                          \
		int (*get_local_storage)(u64);                                 \
	};                                                                     \
	__attribute__((                                                        \
		section("maps/" _kind))) struct _name##_table_t _name = {0};   \
	BPF_ANNOTATE_KV_PAIR(_name, __u64, _leaf_type)

BK_CGROUP_STORAGE(bk_policy, struct bk_policy, "cgroup_storage");
BK_CGROUP_STORAGE(bk_counters, struct bk_counters, "percpu_cgroup_storage");
/* The same policies keyed by cgroup id: a socket's record names its owner,
 * and any program (or the sweep) finds the owner's policy here. */
BPF_HASH(bk_policies, __u64, struct bk_policy, BK_MAX_POLICIES);

/* One bk_sk per socket.  BPF_F_CLONE: a listener's record is copied to
 * every socket it accepts (bpf_sk_storage_clone), so an accepted socket
 * knows which policy, and which generation of it, its listener carried. */
struct bk_sk_table_t {
	int key;
	struct bk_sk leaf;
	void *(*sk_storage_get)(void *, void *, int);
	int (*sk_storage_delete)(void *);
	u32 flags;
};
__attribute__((section("maps/sk_storage"))) struct bk_sk_table_t bk_sk = {
	.flags = BPF_F_NO_PREALLOC | BPF_F_CLONE};
BPF_ANNOTATE_KV_PAIR(bk_sk, int, struct bk_sk);

/* Peer rules (see bpfkeep.h): the trie userspace flattens each set of
 * rules into, and the rules; the keepidle learned per path; what the loss
 * program counts and tells the daemon, and what it needs to know. */
BPF_LPM_TRIE(bk_peers, struct bk_peer_key, struct bk_peer,
	     BK_MAX_PEER_PREFIXES);
BPF_HASH(bk_rules, struct bk_rule_key, struct bk_rule, BK_MAX_PEER_RULES);
BPF_HASH(bk_learned, struct bk_path_key, struct bk_learned, BK_MAX_PATHS);
BPF_HASH(bk_losses, struct bk_loss_key, struct bk_losses, BK_MAX_LOSS_KEYS);
BPF_ARRAY(bk_config, struct bk_config, 1);
BPF_RINGBUF_OUTPUT(bk_loss_events, 16); /* pages: 4096 events of 48 bytes */

/* The options that make up "keepalive": a program that sets its own
 * keepalive keeps all of them in set mode. */
#define BK_BIT(id) (1u << (id))
#define BK_ALL_BITS (BK_BIT(BK_NOPT_BPF) - 1)
#define BK_TIME_BITS                                                           \
	(BK_BIT(BK_OPT_KEEPIDLE) | BK_BIT(BK_OPT_KEEPINTVL) |                  \
	 BK_BIT(BK_OPT_KEEPCNT))
#define BK_KA_BITS                                                             \
	(BK_BIT(BK_OPT_KEEPALIVE) | BK_TIME_BITS | BK_BIT(BK_OPT_USER_TIMEOUT))
#define BK_INT_MAX 0x7fffffff

/* --- the option table, as the programs walk it ----------------------------
 *
 * Every option the programs set, read or cap comes from BK_OPTION_TABLE
 * (bpfkeep_options.h, generated from bpfkeep/options.py), not from a line
 * per option: its id, level and name, its side, whether enforce mode caps
 * it.  The rows are expanded in place rather than walked by a loop at run
 * time, so each option costs what a call written out for it would, and the
 * verifier sees the straight-line code it always did.
 *
 * A program defines BK_ROW(id, level, optname, side, enforce) -- what to do
 * with one option -- around one of the expansions below, which give it
 * the options the BPF programs handle: ids below BK_NOPT_BPF, the size of
 * the per-option arrays in bpfkeep.h.  TCP_DEFER_ACCEPT is not one:
 * bpf_setsockopt refuses it on every kernel (5.10, 6.1, 6.18: the option
 * is missing from net/core/filter.c's list), so only the preload shim
 * sets it. */
_Static_assert(BK_OPT_DEFER_ACCEPT >= BK_NOPT_BPF,
	       "TCP_DEFER_ACCEPT cannot be set from BPF");

#define BK_BY_BPF(id) ((id) < BK_NOPT_BPF)
#define BK_ROW_IF_(cond, id, level, optname, side, enforce)                    \
	if ((cond) && BK_BY_BPF(id))                                           \
		BK_ROW(id, level, optname, side, enforce);
#define BK_ROW_ALL_(id, level, optname, min, max, dflt, side, enforce, ...)    \
	BK_ROW_IF_(1, id, level, optname, side, enforce)
#define BK_ROW_NOT_KA_(id, level, optname, min, max, dflt, side, enforce, ...) \
	BK_ROW_IF_((id) != BK_OPT_KEEPALIVE, id, level, optname, side, enforce)
#define BK_ROW_KA_(id, level, optname, min, max, dflt, side, enforce, ...)     \
	BK_ROW_IF_((id) == BK_OPT_KEEPALIVE, id, level, optname, side, enforce)

/* Each option, in the table's order. */
#define BK_EACH_OPTION                                                         \
	do {                                                                   \
		BK_OPTION_TABLE(BK_ROW_ALL_)                                   \
	} while (0)
/* Each option in the order bpfkeep sets them: times first, SO_KEEPALIVE
 * last.  Once keepalive is on, each TCP_KEEP* write re-arms the keepalive
 * timer; set last, keepalive arms it once (measured: cheaper). */
#define BK_EACH_OPTION_IN_SET_ORDER                                            \
	do {                                                                   \
		BK_OPTION_TABLE(BK_ROW_NOT_KA_)                                \
		BK_OPTION_TABLE(BK_ROW_KA_)                                    \
	} while (0)

/* --- helpers ------------------------------------------------------------- */

static __always_inline int bk_err_bucket(int err)
{
	switch (-err) {
	case 1:
		return BK_ERR_EPERM;
	case 22:
		return BK_ERR_EINVAL;
	case 92:
		return BK_ERR_ENOPROTOOPT;
	case 95:
		return BK_ERR_EOPNOTSUPP;
	case 524:
		return BK_ERR_ENOTSUPP;
	case 14:
		return BK_ERR_EFAULT;
	case 16:
		return BK_ERR_EBUSY;
	}
	return BK_ERR_OTHER;
}

/* Does a more specific policy than p own the socket?  The kernel runs the
 * programs of the socket's own cgroup first, then each ancestor's: the
 * deepest bpfkeep policy records itself as the owner (it has
 * BK_F_HAS_ANCESTOR) and the others step aside -- unless that owner has
 * been detached or deactivated meanwhile. */
static __always_inline int bk_yields(struct bk_sk *s, struct bk_policy *p)
{
	struct bk_policy *o;
	__u64 owner = s->owner;

	if (!owner || owner == p->cgroup_id || s->level <= p->level)
		return 0;
	o = bk_policies.lookup(&owner);
	return o && (o->flags & BK_F_ACTIVE);
}

/* The user timeout that matches keepalive times, in ms (capped: the
 * kernel takes an int). */
static __always_inline __u32 bk_derived_ut(__u32 idle, __u32 intvl, __u32 cnt)
{
	__u64 ms = ((__u64)idle + (__u64)intvl * cnt) * 1000;

	return ms > BK_INT_MAX ? BK_INT_MAX : (__u32)ms;
}

/* Read one option; -1 when the kernel does not say.  BK_GET names it by
 * the table's key: BK_GET(sk, KEEPIDLE). */
#define BK_GETSOCKOPT(sk, level, optname)                                      \
	({                                                                     \
		int v_ = -1;                                                   \
		if (bpf_getsockopt(sk, level, optname, &v_, sizeof(v_)))       \
			v_ = -1;                                               \
		v_;                                                            \
	})
#define BK_GET(sk, KEY) BK_GETSOCKOPT(sk, BK_##KEY##_LEVEL, BK_##KEY##_OPTNAME)

/* Does the socket carry these keepalive times and user timeout (0: any
 * value)?  A socket without a record that carries a policy's values got
 * them from bpfkeep (or its program chose exactly those: the same thing to
 * every rule here).  Keepalive itself is checked by the caller. */
static __always_inline int bk_at(void *sk, __u32 idle, __u32 intvl, __u32 cnt,
				 __u32 ut)
{
	if (ut && BK_GET(sk, USER_TIMEOUT) != (int)ut)
		return 0;
	if (idle && BK_GET(sk, KEEPIDLE) != (int)idle)
		return 0;
	if (intvl && BK_GET(sk, KEEPINTVL) != (int)intvl)
		return 0;
	return !cnt || BK_GET(sk, KEEPCNT) == (int)cnt;
}

#define BK_AT_VALS(sk, val)                                                    \
	bk_at(sk, (val)[BK_OPT_KEEPIDLE], (val)[BK_OPT_KEEPINTVL],             \
	      (val)[BK_OPT_KEEPCNT], (val)[BK_OPT_USER_TIMEOUT])
#define BK_AT_POLICY(sk, p) BK_AT_VALS(sk, (p)->val)
#define BK_AT_FP(sk, fp)                                                       \
	bk_at(sk, (fp)[BK_FP_KEEPIDLE], (fp)[BK_FP_KEEPINTVL],                 \
	      (fp)[BK_FP_KEEPCNT], (fp)[BK_FP_USER_TIMEOUT])
/* The values the policy's sockets carried before its last change (userspace
 * sets BK_F_PREV only when they differ from the policy's). */
#define BK_AT_PREV(sk, p) (((p)->flags & BK_F_PREV) && BK_AT_FP(sk, (p)->prev))

/* When the program sets its own keepalive times and the policy's user
 * timeout was derived from the policy's times, the user timeout follows
 * the times in force: a dead peer is then dropped after keepidle +
 * keepintvl * keepcnt of the socket, whoever chose them.  Returns the
 * helper's result, or 1 when there was nothing to do. */
static __always_inline int bk_follow_ut(void *sk, __u32 flags, const __u32 *val,
					__u16 app)
{
	int idle, intvl, cnt, ut;

	if (!(flags & BK_F_UT_DERIVED) || !val[BK_OPT_USER_TIMEOUT] ||
	    !(app & BK_TIME_BITS) || (app & BK_BIT(BK_OPT_USER_TIMEOUT)))
		return 1;
	idle = BK_GET(sk, KEEPIDLE);
	intvl = BK_GET(sk, KEEPINTVL);
	cnt = BK_GET(sk, KEEPCNT);
	if (idle <= 0 || intvl <= 0 || cnt <= 0)
		return 1;
	ut = bk_derived_ut(idle, intvl, cnt);
	return bpf_setsockopt(sk, BK_USER_TIMEOUT_LEVEL,
			      BK_USER_TIMEOUT_OPTNAME, &ut, sizeof(ut));
}

/* --- peer rules ------------------------------------------------------------
 */

#define BK_AF_INET 2
#define BK_AF_INET6 10

/* The peer's address as the trie keys it: 16 bytes, IPv4 mapped. */
static __always_inline void bk_addr4(__u8 *addr, __u32 ip4)
{
	__builtin_memset(addr, 0, 10);
	addr[10] = 0xff;
	addr[11] = 0xff;
	__builtin_memcpy(addr + 12, &ip4, 4);
}

/* The peer's address from a context's fields (bpf_sock_ops: remote_*,
 * bpf_sock: dst_*), every field read at once before a compiler barrier:
 * the verifier refuses a load through a context pointer the compiler has
 * moved (clang would otherwise compute &ctx->field in one branch and load
 * it in another). */
#define BK_PEER_ADDR(addr, family, ip4, ip6)                                   \
	do {                                                                   \
		__u32 f_ = (family), a_ = (ip4);                               \
		__u32 w_[4] = {(ip6)[0], (ip6)[1], (ip6)[2], (ip6)[3]};        \
		asm volatile("" ::: "memory");                                 \
		if (f_ == BK_AF_INET)                                          \
			bk_addr4(addr, a_);                                    \
		else                                                           \
			__builtin_memcpy(addr, w_, 16);                        \
	} while (0)

/* The rule of set ``set`` for a peer at addr:port (host byte order), or
 * NULL: the policy's own values.  The longest prefix decides; its ranges
 * are tried in order (userspace put the most specific first). */
static __always_inline struct bk_rule *bk_peer_rule(__u64 set, const __u8 *addr,
						    __u16 port)
{
	struct bk_peer_key k = {.prefixlen = 64 + 128};
	struct bk_rule_key rk = {.set = set};
	struct bk_peer *e;
	int i;

	if (!set)
		return 0;
	__builtin_memcpy(k.set, &set, 8);
	__builtin_memcpy(k.addr, addr, 16);
	e = bk_peers.lookup(&k);
	if (!e)
		return 0;
#pragma unroll
	for (i = 0; i < BK_PEER_PORTS; i++) {
		if (i >= e->n)
			return 0;
		if (port >= e->lo[i] && port <= e->hi[i]) {
			rk.rule = e->rule[i];
			return bk_rules.lookup(&rk);
		}
	}
	return 0;
}

/* What a socket gets: the policy's own values or its peer rule's, with
 * the keepidle learned for its path when keepidle is "auto".  val points
 * at the policy's or the rule's values, or at own[] (the learned keepidle
 * written in). */
struct bk_view {
	const __u32 *val;
	__u32 flags; /* the rule's ENFORCE, UT_DERIVED and AUTO, else the
			policy's */
	__u32 tag;   /* the rule's tag; 0: the policy's own values */
	__u32 own[BK_NOPT_BPF];
};
#define BK_RULE_FLAGS (BK_F_ENFORCE | BK_F_UT_DERIVED | BK_F_AUTO)

/* Does the policy look at each socket's peer?  Without peer rules and
 * learning, every socket gets the policy's values: nothing to look up. */
#define BK_PER_PEER(p) ((p)->peers || ((p)->flags & BK_F_AUTO))

static __always_inline void
bk_learned_keepidle(struct bk_policy *p, struct bk_view *v, const __u8 *addr)
{
	struct bk_path_key k = {.owner = p->cgroup_id, .tag = v->tag};
	struct bk_learned *l;
	int i;

	if (!v->tag) {
		/* The policy's own values: the peer's network is the path, a
		 * /24 for IPv4 (mapped: 120 bits), a /64 for IPv6. */
		int v4 = addr[10] == 0xff && addr[11] == 0xff &&
			 !(addr[0] | addr[1] | addr[2] | addr[3] | addr[4] |
			   addr[5] | addr[6] | addr[7] | addr[8] | addr[9]);

		k.plen = v4 ? 120 : 64;
		if (v4)
			__builtin_memcpy(k.net, addr, 15);
		else
			__builtin_memcpy(k.net, addr, 8);
	}
	l = bk_learned.lookup(&k);
	if (!l || !l->keepidle)
		return;
#pragma unroll
	for (i = 0; i < BK_NOPT_BPF; i++)
		v->own[i] = v->val[i];
	v->own[BK_OPT_KEEPIDLE] = l->keepidle;
	if ((v->flags & BK_F_UT_DERIVED) && v->own[BK_OPT_USER_TIMEOUT])
		v->own[BK_OPT_USER_TIMEOUT] =
			bk_derived_ut(l->keepidle, v->own[BK_OPT_KEEPINTVL],
				      v->own[BK_OPT_KEEPCNT]);
	v->val = v->own;
}

/* Fill *v for a socket of policy p whose peer is addr:port; 0 when that
 * peer is exempt (the socket is left as the program made it). */
static __always_inline int bk_view_of(struct bk_policy *p, const __u8 *addr,
				      __u16 port, struct bk_view *v)
{
	struct bk_rule *r;

	v->val = p->val;
	v->flags = p->flags;
	v->tag = 0;
	if (!BK_PER_PEER(p))
		return 1;
	r = bk_peer_rule(p->peers, addr, port);
	if (r) {
		if (r->flags & BK_R_EXEMPT)
			return 0;
		v->val = r->val;
		v->flags = (p->flags & ~BK_RULE_FLAGS) |
			   (r->flags & BK_RULE_FLAGS);
		v->tag = r->tag;
	}
	if (v->flags & BK_F_AUTO)
		bk_learned_keepidle(p, v, addr);
	return 1;
}

/* The options whose values differ between a and b (a bit per option). */
static __always_inline __u16 bk_differs(const __u32 *a, const __u32 *b)
{
	__u16 d = 0;
	int i;

#pragma unroll
	for (i = 0; i < BK_NOPT_BPF; i++)
		if (a[i] != b[i])
			d |= BK_BIT(i);
	return d;
}

/* The rule tag a peer of p falls under (0: the policy's own values). */
static __always_inline __u32 bk_rule_tag(__u64 set, const __u8 *addr,
					 __u16 port)
{
	struct bk_rule *r = bk_peer_rule(set, addr, port);

	return r ? r->tag : 0;
}

#endif /* BPFKEEP_COMMON_BPF_H */
