// SPDX-License-Identifier: GPL-2.0
/*
 * cgroup/setsockopt: a program's own setsockopt of a keepalive option, on
 * a TCP socket of an attached cgroup.  Set mode records that the program
 * chose the option (bk_sk.app: bpfkeep's later writes leave it alone);
 * enforce mode caps the value.  Runs before the kernel's handler, on the
 * socket's cgroup (not the caller's).
 */
#include "common.bpf.h"

#define SOCK_STREAM 1
#define BK_TCP_CLOSE 7 /* include/net/tcp_states.h */
#define BK_TCP_LISTEN 10
/* MPTCP sockets copy SO_KEEPALIVE and the keepalive times down to their
 * TCP subflows (net/mptcp/sockopt.c): capped like TCP, or a program could
 * turn keepalive off on every subflow through them. */
#define BK_IPPROTO_MPTCP 262

/* A keepalive time the kernel will accept (TCP_KEEPIDLE, TCP_KEEPINTVL
 * 1..32767 s, TCP_KEEPCNT 1..127): only then does the user timeout follow
 * a time the program writes. */
_Static_assert(BK_KEEPINTVL_MIN == BK_KEEPIDLE_MIN &&
		       BK_KEEPINTVL_MAX == BK_KEEPIDLE_MAX,
	       "bk_valid_time: TCP_KEEPINTVL's range is TCP_KEEPIDLE's");
static __always_inline int bk_valid_time(int id, int v)
{
	if (id == BK_OPT_KEEPCNT)
		return v >= BK_KEEPCNT_MIN && v <= BK_KEEPCNT_MAX;
	return v >= BK_KEEPIDLE_MIN && v <= BK_KEEPIDLE_MAX;
}

/* The peer of a socket (none before connect(): zeros, the policy's own
 * values unless a rule names ::/0). */
static __always_inline __u16 bk_peer_of_sock(struct bpf_sock *sk, __u8 *addr)
{
	__u16 port = sk->dst_port;

	BK_PEER_ADDR(addr, sk->family, sk->dst_ip4, sk->dst_ip6);
	return __builtin_bswap16(port);
}

int bk_setsockopt(struct bpf_sockopt *ctx)
{
	struct bk_policy *own;
	struct bk_counters *c;
	struct bk_view view;
	struct bk_sk *s;
	struct bpf_sock *sk;
	__u8 addr[16];
	int id, *v, pin = 0;

	/* The options the hook watches are those the table marks enforce:
	 * enforce mode caps them, set mode notes that the program chose them
	 * (bk_sk.app) and leaves them to it.  An else-if chain over the
	 * table: id is the first row that matches, else `otherwise` runs. */
#define BK_WATCH(id_, lvl, name, min, max, dflt, side, enforce, ...)           \
	if (BK_BY_BPF(id_) && (enforce) && ctx->level == (lvl) &&              \
	    ctx->optname == (name))                                            \
		id = (id_);                                                    \
	else
#define BK_WATCHED_OR(otherwise) BK_OPTION_TABLE(BK_WATCH) otherwise
	BK_WATCHED_OR(goto pass);
#undef BK_WATCHED_OR
#undef BK_WATCH

	sk = ctx->sk;
	if (!sk || sk->type != SOCK_STREAM ||
	    (sk->protocol != IPPROTO_TCP && sk->protocol != BK_IPPROTO_MPTCP))
		goto pass;
	own = (struct bk_policy *)bk_policy.get_local_storage(0);
	if (!own || !(own->flags & BK_F_ACTIVE))
		goto pass;
	view.val = own->val;
	view.flags = own->flags;
	if (BK_PER_PEER(own) && sk->state != BK_TCP_LISTEN &&
	    !bk_view_of(own, addr, bk_peer_of_sock(sk, addr), &view))
		goto pass; /* an exempt peer: the program's to set */
	v = ctx->optval;
	if (ctx->optlen < (int)sizeof(*v) || (void *)(v + 1) > ctx->optval_end)
		goto pass;
	/* From here on the kernel must apply the value this hook looked at.
	 * Above a page the hook gets a copy of the first one, and optlen 0
	 * would have the kernel read the application's buffer again: a
	 * second thread changing it in between would set a value no program
	 * saw (a race won within a few thousand calls).  An int is all these
	 * options read (sk_setsockopt, do_tcp_setsockopt). */
	pin = 1;
	s = 0;
	if (sk->state != BK_TCP_CLOSE) {
		/* This hook runs on the socket's cgroup (not the caller's),
		 * most specific first; a record says which policy owns the
		 * socket.  Before connect() or listen() nothing is recorded:
		 * those set the policy over whatever is written now. */
		s = bk_sk.sk_storage_get(sk, 0, 0);
		if (s && bk_yields(s, own))
			goto pass;
		if (!s) {
			/* The first option the program sets itself: from now
			 * on the socket needs a record of it.  Were its values
			 * the policy's until now?  Then it is current. */
			int at = BK_GET(sk, KEEPALIVE) > 0 &&
				 BK_AT_VALS(sk, view.val);

			s = bk_sk.sk_storage_get(sk, 0,
						 BPF_SK_STORAGE_GET_F_CREATE);
			if (!s)
				goto pass;
			s->owner = own->cgroup_id;
			s->level = own->level;
			s->gen = at ? own->gen : 0;
			s->app = 0;
		} else if (s->owner != own->cgroup_id) {
			s->owner = own->cgroup_id;
			s->level = own->level;
			s->gen = 0; /* the policy's values were not applied */
		}
		s->app |= BK_BIT(id);
	}
	if (view.flags & BK_F_ENFORCE) {
		if (id == BK_OPT_KEEPALIVE) {
			if (*v != 0)
				goto pass;
			*v = 1;
		} else {
			__u32 cap = view.val[id & 7];
			/* TCP_USER_TIMEOUT 0 means "never": above any cap. */
			if (!cap || (*v > 0 && *v <= (int)cap))
				goto follow;
			if (*v < 0 || (*v == 0 && id != BK_OPT_USER_TIMEOUT))
				goto pass; /* invalid: the kernel refuses it */
			*v = cap;
		}
		c = (struct bk_counters *)bk_counters.get_local_storage(0);
		if (c)
			c->rewritten[id & 7]++;
	}
follow:
	/* The kernel applies the program's value after this hook returns:
	 * derive the user timeout from the value being written and the
	 * socket's other two times. */
	if (s && (BK_TIME_BITS & BK_BIT(id)) &&
	    (view.flags & BK_F_UT_DERIVED) && view.val[BK_OPT_USER_TIMEOUT] &&
	    !(s->app & BK_BIT(BK_OPT_USER_TIMEOUT)) && bk_valid_time(id, *v)) {
		int idle = id == BK_OPT_KEEPIDLE ? *v : BK_GET(sk, KEEPIDLE);
		int intvl = id == BK_OPT_KEEPINTVL ? *v : BK_GET(sk, KEEPINTVL);
		int cnt = id == BK_OPT_KEEPCNT ? *v : BK_GET(sk, KEEPCNT);

		if (idle > 0 && intvl > 0 && cnt > 0) {
			int ut = bk_derived_ut(idle, intvl, cnt);

			bpf_setsockopt(sk, BK_USER_TIMEOUT_LEVEL,
				       BK_USER_TIMEOUT_OPTNAME, &ut,
				       sizeof(ut));
		}
	}
	/* Above a page the kernel ignores the program's buffer unless optlen
	 * says how much of it to use: the value checked (and maybe rewritten)
	 * is what it must apply. */
	if (ctx->optlen > 4096)
		ctx->optlen = (int)sizeof(*v);
	return 1;

pass:
	/* Above a page the program sees a truncated copy; optlen 0 tells the
	 * kernel to use the application's buffer (Documentation/bpf/
	 * prog_cgroup_sockopt.rst) -- unless the value was looked at (pin).
	 * Below a page optlen is left alone so that programs running after
	 * ours still see the value. */
	if (ctx->optlen > 4096)
		ctx->optlen = pin ? (int)sizeof(int) : 0;
	return 1;
}
