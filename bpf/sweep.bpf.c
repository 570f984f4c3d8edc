// SPDX-License-Identifier: GPL-2.0
/*
 * iter/tcp: the sweep of sockets that already exist.  The iterator walks
 * every TCP socket of the network namespace it was created in, with the
 * socket locked, and may call bpf_setsockopt on it (Linux 5.15+;
 * bpf_getsockopt(SO_KEEPALIVE) 6.1+).  Userspace picks the target sockets
 * by their cookies (inet_diag) and writes one bk_sweep per socket in
 * bk_sweep; the iterator acts on those it finds there and writes back
 * what happened and the values in force afterwards.
 */
#include "common.bpf.h"

/* The sweep's work list (cookie -> bk_sweep) and its counters. */
BPF_HASH(bk_sweep, __u64, struct bk_sweep, BK_MAX_SWEEP);
BPF_HASH(bk_sweepstats, __u64, struct bk_sweepstats, BK_MAX_POLICIES);

/* bcc declares bpf_get_socket_cookie as returning u32; cookies are u64. */
static __u64 (*bk_socket_cookie)(void *sk) = (void *)BPF_FUNC_get_socket_cookie;

/* The iterator's context (bcc has no declaration of it). */
struct bpf_iter_meta;
struct sock_common;
struct bpf_iter__tcp {
	struct bpf_iter_meta *meta;
	struct sock_common *sk_common;
	__u32 uid;
};

/* Set one option to want[id] unless that is -1, the option is masked or
 * the socket carries the value already; note the outcome in the entry e
 * and, when st is given, in the policy's sweep counters. */
#define BK_SWEEP_SET(tp, e, st, mask, want, id, level, optname)                \
	do {                                                                   \
		int v_ = (want)[id];                                           \
		if (v_ >= 0 && !((mask)&BK_BIT(id)) &&                         \
		    BK_GETSOCKOPT(tp, level, optname) != v_) {                 \
			int err_ = bpf_setsockopt(tp, level, optname, &v_,     \
						  sizeof(v_));                 \
			if (err_) {                                            \
				(e)->failed |= BK_BIT(id);                     \
				if (st)                                        \
					__sync_fetch_and_add(                  \
						&(st)->failed[id]              \
							     [bk_err_bucket(   \
								     err_)],   \
						1);                            \
			} else {                                               \
				(e)->applied |= BK_BIT(id);                    \
				if (st)                                        \
					__sync_fetch_and_add(                  \
						&(st)->applied[id], 1);        \
			}                                                      \
		}                                                              \
	} while (0)

/* In enforce mode a value the program chose that is already within the
 * policy's bound stays; everything else ends at the policy. */
static __always_inline int bk_within(int cur, __u32 cap, int id)
{
	if (id == BK_OPT_USER_TIMEOUT && cur == 0)
		return 0; /* 0 is "never" */
	return cur > 0 && cur <= (int)cap;
}

BPF_ITER(tcp)
{
	struct sock_common *skc = ctx->sk_common;
	struct bk_sweepstats *st;
	struct bk_rule *prev_rule = 0;
	struct bk_policy *p;
	struct bk_view v;
	struct bk_sweep *e;
	struct tcp_sock *tp;
	struct bk_sk *s;
	int want[BK_NOPT_BPF];
	__u64 cookie, owner;
	__u16 mask = 0, known;
	int i, ka, enforce, own, at_prev;

	if (!skc)
		return 0;
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0; /* TIME_WAIT, NEW_SYN_RECV: not full sockets */
	cookie = bk_socket_cookie(tp);
	e = bk_sweep.lookup(&cookie);
	if (!e)
		return 0;
	e->result = BK_SWR_SEEN;
	owner = e->owner;

	if (e->action == BK_SWEEP_READ)
		goto read;

	if (e->action == BK_SWEEP_UNDO) {
		/* Only the options userspace asked to reset, and only on a
		 * socket this policy owns: its record says so, or, without
		 * one, its values are the policy's (e->fp). */
		s = bk_sk.sk_storage_get(tp, 0, 0);
		if (s) {
			if (s->owner != owner)
				goto read;
			mask = s->app;
		} else if (BK_GET(tp, KEEPALIVE) <= 0 ||
			   !(e->in_flags & BK_SWI_FP) || !BK_AT_FP(tp, e->fp)) {
			goto read; /* never configured, or the program's own */
		}
		if (e->in_flags & BK_SWI_KEEP) {
			/* The values stay; the record says whose they were (an
			 * owner without a policy, generation 0). */
			if (!s)
				s = bk_sk.sk_storage_get(
					tp, 0, BPF_SK_STORAGE_GET_F_CREATE);
			if (!s) {
				e->result |= BK_SWR_NO_STORAGE;
				goto read;
			}
			s->owner = owner;
			s->gen = 0;
			goto read;
		}
#pragma unroll
		for (i = 0; i < BK_NOPT_BPF; i++)
			want[i] =
				(e->in_flags & (1u << (BK_SWI_RESET_SHIFT + i)))
					? (int)e->val[i]
					: -1;
		st = 0;
		/* Connect-side options (TCP_SYNCNT) are not reset: they only
		 * count before the handshake. */
#define BK_ROW(id, level, optname, side, enforce)                              \
	do {                                                                   \
		if ((side) != BK_SIDE_CONNECT)                                 \
			BK_SWEEP_SET(tp, e, st, mask, want, id, level,         \
				     optname);                                 \
	} while (0)
		BK_EACH_OPTION_IN_SET_ORDER;
#undef BK_ROW
		if (s)
			bk_sk.sk_storage_delete(tp);
		goto read;
	}

	p = bk_policies.lookup(&owner);
	if (!p || !(p->flags & BK_F_ACTIVE)) {
		e->result |= BK_SWR_NO_POLICY;
		goto read;
	}
	s = bk_sk.sk_storage_get(tp, 0, 0);
	st = bk_sweepstats.lookup(&owner);
	ka = BK_GET(tp, KEEPALIVE);
	if (BK_PER_PEER(p) && (e->in_flags & BK_SWI_LISTEN) &&
	    (p->flags & BK_F_BARE_LISTEN)) {
		/* A listener of a policy whose values depend on the peer stays
		 * as the program made it (each accepted socket gets its peer's
		 * values): what bpfkeep gave it under earlier values goes back
		 * to the defaults userspace sent, the program's own stays. */
		if (s && s->owner == owner) {
			mask = s->app;
		} else if (ka <= 0 ||
			   !(BK_AT_POLICY(tp, p) || BK_AT_PREV(tp, p))) {
			e->result |= BK_SWR_CURRENT;
			goto read;
		}
#pragma unroll
		for (i = 0; i < BK_NOPT_BPF; i++)
			want[i] =
				(e->in_flags & (1u << (BK_SWI_RESET_SHIFT + i)))
					? (int)e->val[i]
					: -1;
#define BK_ROW(id, level, optname, side, enforce)                              \
	do {                                                                   \
		if ((side) != BK_SIDE_CONNECT)                                 \
			BK_SWEEP_SET(tp, e, st, mask, want, id, level,         \
				     optname);                                 \
	} while (0)
		BK_EACH_OPTION_IN_SET_ORDER;
#undef BK_ROW
		if (s) {
			s->level = p->level;
			s->gen = p->gen;
		}
		goto read;
	}
	if (e->in_flags & BK_SWI_LISTEN) {
		/* A listener of a per-peer policy: its own values (each
		 * accepted socket gets what its peer's change). */
		v.val = p->val;
		v.flags = p->flags;
		v.tag = 0;
	} else if (!bk_view_of(p, e->peer, e->port, &v)) {
		e->result |= BK_SWR_EXEMPT; /* left as the program made it */
		goto read;
	}
	enforce = v.flags & BK_F_ENFORCE;
	/* The values bpfkeep gave before the policy's last change: the
	 * previous set's rule for this peer, or the policy's own then. */
	if ((p->flags & BK_F_PREV) && p->prev_peers &&
	    !(e->in_flags & BK_SWI_LISTEN))
		prev_rule = bk_peer_rule(p->prev_peers, e->peer, e->port);
	at_prev = (p->flags & BK_F_PREV) &&
		  (prev_rule ? !(prev_rule->flags & BK_R_EXEMPT) &&
				       BK_AT_VALS(tp, prev_rule->val)
			     : BK_AT_FP(tp, p->prev));
	/* Which options the program chose itself is known for sockets with a
	 * record.  Without one, the values tell: the policy's (current), the
	 * ones bpfkeep gave before (the policy's before its last change, or a
	 * former owner's: e->fp), or keepalive the program turned on itself. */
	known = s && s->owner;
	own = 0;
	if ((e->in_flags & BK_SWI_HELD) && known && s->owner != owner) {
		/* Held by a process of this policy, but made in a cgroup whose
		 * own (active) policy owns it: that one rules.  (Without a
		 * record, userspace tells from the socket's cgroup.) */
		struct bk_policy *o = bk_policies.lookup(&s->owner);

		if (o && (o->flags & BK_F_ACTIVE)) {
			e->result |= BK_SWR_CURRENT;
			goto read;
		}
	}
	if (known && s->owner == owner && s->gen == p->gen) {
		/* Already under this very policy (its callbacks or an earlier
		 * sweep).  Set mode: what the program did since stands. Enforce
		 * mode checks the values every time (only what differs is set):
		 * a socket whose cgroup has no setsockopt hook (accepted from a
		 * handed-over listener) may have changed them.  So does a sweep
		 * after a learned keepidle changed (BK_SWI_RECHECK). */
		e->result |= BK_SWR_CURRENT;
		if (!enforce && !(e->in_flags & BK_SWI_RECHECK))
			goto read;
	} else if (!known && ka > 0 && BK_AT_VALS(tp, v.val)) {
		e->result |= BK_SWR_CURRENT;
		if (!(p->flags & BK_F_HAS_ANCESTOR))
			goto read; /* nothing to set, nothing to record */
	} else {
		if (st)
			__sync_fetch_and_add(&st->swept, 1);
		own = !known && ka > 0 && !at_prev &&
		      !((e->in_flags & BK_SWI_FP) && BK_AT_FP(tp, e->fp));
	}
	if (!enforce) {
		mask = known ? s->app : (own ? BK_KA_BITS : 0);
		if (mask & BK_KA_BITS) {
			e->result |= BK_SWR_APP_OWN;
			if (st)
				__sync_fetch_and_add(&st->app_own, 1);
		}
	}
	/* A record is kept where the values will not tell: the program's own
	 * keepalive (set mode), the owner under an ancestor's policy. */
	if (!s && ((own && !enforce) || (p->flags & BK_F_HAS_ANCESTOR))) {
		s = bk_sk.sk_storage_get(tp, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (!s) {
			e->result |= BK_SWR_NO_STORAGE;
			goto read;
		}
		s->app = mask;
	}
#pragma unroll
	for (i = 0; i < BK_NOPT_BPF; i++)
		want[i] = v.val[i] ? (int)v.val[i] : -1;
		/* Connect-side options (TCP_SYNCNT) only count before the
		 * handshake: they are set on sockets still connecting. */
#define BK_ROW(id, level, optname, side, enforce)                              \
	do {                                                                   \
		if ((side) == BK_SIDE_CONNECT &&                               \
		    !(e->in_flags & BK_SWI_SYN_SENT))                          \
			want[id] = -1;                                         \
	} while (0)
	BK_EACH_OPTION;
#undef BK_ROW
	if (enforce) {
		/* A tighter value the program chose itself while bpfkeep
		 * watched stands.  A socket whose history is unknown (made
		 * before any bpfkeep program saw it) ends at the policy.  The
		 * options enforce mode caps are the table's enforce ones;
		 * keepalive on is never weaker than the policy. */
		int cur;

#define BK_ROW(id, level, optname, side, enf)                                  \
	do {                                                                   \
		if ((enf) && (id) != BK_OPT_KEEPALIVE) {                       \
			cur = BK_GETSOCKOPT(tp, level, optname);               \
			if (known && (s->app & BK_BIT(id)) &&                  \
			    bk_within(cur, v.val[id], id))                     \
				want[id] = -1;                                 \
		}                                                              \
	} while (0)
		BK_EACH_OPTION;
#undef BK_ROW
		if (ka > 0)
			want[BK_OPT_KEEPALIVE] = -1;
	}
	if (s) {
		s->owner = owner;
		s->level = p->level;
		s->gen = p->gen;
	}
#define BK_ROW(id, level, optname, side, enforce)                              \
	BK_SWEEP_SET(tp, e, st, mask, want, id, level, optname)
	BK_EACH_OPTION_IN_SET_ORDER;
#undef BK_ROW
	if (!enforce && bk_follow_ut(tp, v.flags, v.val, mask) == 0)
		e->applied |= BK_BIT(BK_OPT_USER_TIMEOUT);
	e->rule = v.tag ? 1 : 0;

read:
	if (e->in_flags & BK_SWI_QUIET)
		return 0;
	s = bk_sk.sk_storage_get(tp, 0, 0);
	if (s) {
		e->rec_owner = s->owner;
		e->rec_gen = s->gen;
		e->rec_app = s->app;
		e->rec_level = s->level;
	}
#define BK_ROW(id, level, optname, side, enforce)                              \
	e->val[id] = BK_GETSOCKOPT(tp, level, optname)
	BK_EACH_OPTION;
#undef BK_ROW
	return 0;
}
