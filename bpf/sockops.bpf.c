// SPDX-License-Identifier: GPL-2.0
/*
 * sock_ops: the policy on every new TCP socket of an attached cgroup, at
 * connect() (before the SYN), at listen(), and on accepted sockets whose
 * listener did not pass it on.
 */
#include "common.bpf.h"

/* Set the policy's value of one option unless it is 0 or masked; count
 * the outcome in the per-CPU counters c.  A refused option (e.g.
 * TCP_MAXSEG before Linux 6.1) is counted, the others are still applied. */
#define BK_APPLY(sk, vals, c, mask, id, level, optname)                        \
	do {                                                                   \
		int v_ = (vals)[id];                                           \
		if (v_ && !((mask)&BK_BIT(id))) {                              \
			int err_ = bpf_setsockopt(sk, level, optname, &v_,     \
						  sizeof(v_));                 \
			if (err_)                                              \
				(c)->failed[id][bk_err_bucket(err_)]++;        \
			else                                                   \
				(c)->applied[id]++;                            \
		}                                                              \
	} while (0)

/* Is an option of this side of the connection set at this callback?
 * Connect-side options (TCP_SYNCNT) only at TCP_CONNECT_CB: they count the
 * SYN's retransmits, and the SYN has not gone out yet. */
#define BK_ON_SIDE(side, cb)                                                   \
	((side) == BK_SIDE_BOTH ||                                             \
	 ((side) == BK_SIDE_CONNECT && (cb) == BK_CB_CONNECT) ||               \
	 ((side) == BK_SIDE_LISTEN && (cb) == BK_CB_LISTEN))

/* An accepted socket without a record: does it need the policy, or did it
 * inherit what it should from its listener?  Only the values can tell (the
 * listener carried no record either: sk_clone_lock copied its options).
 * Set mode: keepalive off -- a listener bpfkeep never configured -- or the
 * values of the policy before its last change need it; keepalive on with
 * other values is the policy's or the program's own, and stays.  Enforce
 * mode: anything but the policy's values needs it.  Before Linux 6.1
 * bpf_getsockopt cannot read SO_KEEPALIVE here: the policy is set again on
 * every such socket (correct, at the application's cost). */
static __always_inline int bk_passive_needs(struct bpf_sock_ops *ops,
					    struct bk_policy *p)
{
	if (BK_GET(ops, KEEPALIVE) <= 0)
		return 1;
	if (p->flags & BK_F_ENFORCE)
		return !BK_AT_POLICY(ops, p);
	return BK_AT_PREV(ops, p);
}

/* The peer of a connection, as the trie keys it. */
static __always_inline __u16 bk_peer_of_ops(struct bpf_sock_ops *ops,
					    __u8 *addr)
{
	/* remote_port: the port in network byte order, in the upper half */
	__u32 port = ops->remote_port;

	BK_PEER_ADDR(addr, ops->family, ops->remote_ip4, ops->remote_ip6);
	return (__u16)__builtin_bswap32(port);
}

int bk_sockops(struct bpf_sock_ops *ops)
{
	struct bk_policy *p;
	struct bk_counters *c;
	struct bk_view v;
	struct bk_sk *s;
	struct bpf_sock *sk;
	__u8 addr[16];
	__u16 mask = 0, skip = 0;
	int cb;

	/* Only three callbacks matter.  Options set on a listener are
	 * inherited by the sockets it accepts; PASSIVE_ESTABLISHED catches
	 * listeners that carry another policy or none.  ACTIVE_ESTABLISHED is
	 * not used: CONNECT already ran for that socket. */
	switch (ops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		cb = BK_CB_CONNECT;
		break;
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		cb = BK_CB_LISTEN;
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		cb = BK_CB_PASSIVE_ESTABLISHED;
		break;
	default:
		return 1;
	}
	if (!ops->is_fullsock)
		return 1;
	sk = ops->sk;
	if (!sk)
		return 1;
	p = (struct bk_policy *)bk_policy.get_local_storage(0);
	c = (struct bk_counters *)bk_counters.get_local_storage(0);
	if (!p || !c || !(p->flags & BK_F_ACTIVE))
		return 1;
	if (cb == BK_CB_PASSIVE_ESTABLISHED && !BK_PER_PEER(p) &&
	    (p->flags & (BK_F_SWEPT | BK_F_HAS_ANCESTOR |
			 BK_F_HAS_DESCENDANT)) == BK_F_SWEPT) {
		/* Every listener of this policy was configured by it, swept
		 * since its last change or recorded (the program's own):
		 * an accepted socket inherited all it should.  Nothing to
		 * look at -- the common case, free as it was before records. */
		c->seen[cb]++;
		c->inherited++;
		return 1;
	}
	/* A record exists only where it says something the values cannot
	 * (see struct bk_sk).  Under an ancestor's policy every socket gets
	 * one, so that the ancestor's programs, which run after ours, step
	 * aside. */
	s = bk_sk.sk_storage_get(sk, 0,
				 (p->flags & BK_F_HAS_ANCESTOR)
					 ? BPF_SK_STORAGE_GET_F_CREATE
					 : 0);
	if (s && bk_yields(s, p))
		return 1;
	v.val = p->val;
	v.flags = p->flags;
	if (BK_PER_PEER(p)) {
		/* Peer rules, or keepidle learned per path: the values depend
		 * on the peer.  A listener has none: it gets the policy's own
		 * values, and each accepted socket only what its peer's change
		 * -- or, under BK_F_BARE_LISTEN, the listener stays as the
		 * program made it and each accepted socket gets all its peer's
		 * values (an exempt peer's keeps what the listener passed on:
		 * the program's). */
		if (cb == BK_CB_LISTEN) {
			if (!(p->flags & BK_F_BARE_LISTEN)) {
				c->seen[cb]++;
				goto apply;
			}
			c->seen[cb]++;
			if (s) {
				s->owner = p->cgroup_id;
				s->level = p->level;
				s->gen = p->gen;
				s->app = 0;
			}
			return 1;
		}
		if (!bk_view_of(p, addr, bk_peer_of_ops(ops, addr), &v)) {
			c->exempt++;
			return 1;
		}
		/* Set mode: what the program chose on its listener (the record
		 * came with it) stands on what it accepts. */
		if (cb == BK_CB_PASSIVE_ESTABLISHED && s &&
		    !(v.flags & BK_F_ENFORCE))
			mask = s->app;
		if (cb == BK_CB_PASSIVE_ESTABLISHED &&
		    !(p->flags & BK_F_BARE_LISTEN) &&
		    (s ? s->owner == p->cgroup_id && s->gen == p->gen
		       : (p->flags & (BK_F_SWEPT | BK_F_HAS_ANCESTOR |
				      BK_F_HAS_DESCENDANT)) == BK_F_SWEPT ||
				     (BK_GET(ops, KEEPALIVE) > 0 &&
				      BK_AT_POLICY(ops, p)))) {
			/* The listener carried this policy's own values: only
			 * what the peer's change (the common case: nothing). */
			skip = ~bk_differs(v.val, p->val);
			if (!(~(skip | mask) & BK_ALL_BITS)) {
				c->seen[cb]++;
				c->inherited++;
				return 1;
			}
		}
		c->seen[cb]++;
		goto apply;
	}
	c->seen[cb]++;

	if (cb == BK_CB_PASSIVE_ESTABLISHED) {
		if (s && s->owner) {
			/* The record came with the listener (BPF_F_CLONE).  A
			 * listener that carries this very policy passed every
			 * value on: nothing to do. */
			if (s->owner == p->cgroup_id && s->gen == p->gen) {
				c->inherited++;
				return 1;
			}
			/* Set mode: what the program chose on its listener
			 * stands. */
			mask = (p->flags & BK_F_ENFORCE) ? 0 : s->app;
		} else if (!bk_passive_needs(ops, p)) {
			if (s) {
				s->owner = p->cgroup_id;
				s->level = p->level;
				s->gen = p->gen;
				s->app = 0;
			}
			c->inherited++;
			return 1;
		}
	}
apply:
	/* CONNECT, LISTEN: the policy replaces what the program set before;
	 * what it sets afterwards is its own (set mode). */
	if (s) {
		s->app = mask;
		s->owner = p->cgroup_id;
		s->level = p->level;
		s->gen = p->gen;
	}

	/* Every option of the policy, times first and SO_KEEPALIVE last;
	 * connect-side ones (TCP_SYNCNT) only at CONNECT. */
#define BK_ROW(id, level, optname, side, enforce)                              \
	do {                                                                   \
		if (BK_ON_SIDE(side, cb))                                      \
			BK_APPLY(ops, v.val, c, mask | skip, id, level,        \
				 optname);                                     \
	} while (0)
	BK_EACH_OPTION_IN_SET_ORDER;
#undef BK_ROW
	if (mask) /* UT counted above already */
		bk_follow_ut(ops, v.flags, v.val, mask);
	return 1;
}
