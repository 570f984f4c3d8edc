// SPDX-License-Identifier: GPL-2.0
/*
 * bpfkeep's kernel side: TCP keepalive for every TCP socket of a cgroup.
 *
 * One copy of each program is loaded and pinned; sock_ops and setsockopt
 * are attached (bpf_link) to every cgroup that has a policy.  Each
 * attachment finds its own policy and counters through cgroup local
 * storage (keyed by the cgroup id alone, so the sock_ops and setsockopt
 * attachments of one cgroup share them).  Userspace changes a policy by
 * updating the map: new sockets see the new values at once, with no
 * re-attach and no gap; the sweep (bk_sweep_tcp, an iter/tcp program)
 * brings the sockets that already exist to the new values.
 *
 * Who owns a socket is never kept in shared context fields another tool's
 * program may also write (bpf_sock_ops.reply, the callback flags).  With
 * one policy over a socket's cgroup the owner is that policy; only under
 * nested policies is it written in the socket itself (bk_sk, socket local
 * storage), as is what a program chose itself.  Everything else is told
 * by the values in force (see struct bk_sk): a record costs a connection
 * more than the five options do (bench/: "the pieces").
 *
 * Only UAPI types are used (struct bpf_sock_ops, struct bpf_sockopt), and
 * no field of the kernel's struct sock is read: bcc applies no CO-RE
 * relocation, so any distro kernel header set compiles this, whatever
 * kernel is running.
 */
#include <uapi/linux/bpf.h>

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

/* The sweep's work list (cookie -> bk_sweep) and its counters. */
BPF_HASH(bk_sweep, __u64, struct bk_sweep, BK_MAX_SWEEP);
BPF_HASH(bk_sweepstats, __u64, struct bk_sweepstats, BK_MAX_POLICIES);

#define SOCK_STREAM 1
#define IPPROTO_TCP 6
#define BK_TCP_CLOSE 7 /* include/net/tcp_states.h */

/* The options that make up "keepalive": a program that sets its own
 * keepalive keeps all of them in set mode. */
#define BK_BIT(id) (1u << (id))
#define BK_TIME_BITS                                                           \
	(BK_BIT(BK_OPT_KEEPIDLE) | BK_BIT(BK_OPT_KEEPINTVL) |                  \
	 BK_BIT(BK_OPT_KEEPCNT))
#define BK_KA_BITS                                                             \
	(BK_BIT(BK_OPT_KEEPALIVE) | BK_TIME_BITS | BK_BIT(BK_OPT_USER_TIMEOUT))
#define BK_INT_MAX 0x7fffffff

/* bcc declares bpf_get_socket_cookie as returning u32; cookies are u64. */
static __u64 (*bk_socket_cookie)(void *sk) = (void *)BPF_FUNC_get_socket_cookie;

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

/* A keepalive time the kernel will accept (TCP_KEEPIDLE, TCP_KEEPINTVL
 * 1..32767 s, TCP_KEEPCNT 1..127): only then does the user timeout follow. */
static __always_inline int bk_valid_time(int id, int v)
{
	if (id == BK_OPT_KEEPCNT)
		return v >= BK_KEEPCNT_MIN && v <= BK_KEEPCNT_MAX;
	return v >= BK_KEEPIDLE_MIN && v <= BK_KEEPIDLE_MAX;
}

/* Read one option; -1 when the kernel does not say. */
#define BK_GET(sk, KEY)                                                        \
	({                                                                     \
		int v_ = -1;                                                   \
		if (bpf_getsockopt(sk, BK_##KEY##_LEVEL, BK_##KEY##_OPTNAME,   \
				   &v_, sizeof(v_)))                           \
			v_ = -1;                                               \
		v_;                                                            \
	})

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

#define BK_AT_POLICY(sk, p)                                                    \
	bk_at(sk, (p)->val[BK_OPT_KEEPIDLE], (p)->val[BK_OPT_KEEPINTVL],       \
	      (p)->val[BK_OPT_KEEPCNT], (p)->val[BK_OPT_USER_TIMEOUT])
#define BK_AT_FP(sk, fp)                                                       \
	bk_at(sk, (fp)[BK_FP_KEEPIDLE], (fp)[BK_FP_KEEPINTVL],                 \
	      (fp)[BK_FP_KEEPCNT], (fp)[BK_FP_USER_TIMEOUT])
/* The values the policy's sockets carried before its last change (userspace
 * sets BK_F_PREV only when they differ from the policy's). */
#define BK_AT_PREV(sk, p) (((p)->flags & BK_F_PREV) && BK_AT_FP(sk, (p)->prev))

/* Set the policy's value of one option unless it is 0 or masked; count
 * the outcome in the per-CPU counters c.  A refused option (e.g.
 * TCP_MAXSEG before Linux 6.1) is counted, the others are still applied. */
#define BK_APPLY(sk, p, c, mask, KEY)                                          \
	do {                                                                   \
		int v_ = (p)->val[BK_OPT_##KEY];                               \
		if (v_ && !((mask)&BK_BIT(BK_OPT_##KEY))) {                    \
			int err_ = bpf_setsockopt(sk, BK_##KEY##_LEVEL,        \
						  BK_##KEY##_OPTNAME, &v_,     \
						  sizeof(v_));                 \
			if (err_)                                              \
				(c)->failed[BK_OPT_##KEY]                      \
					   [bk_err_bucket(err_)]++;            \
			else                                                   \
				(c)->applied[BK_OPT_##KEY]++;                  \
		}                                                              \
	} while (0)

/* When the program sets its own keepalive times and the policy's user
 * timeout was derived from the policy's times, the user timeout follows
 * the times in force: a dead peer is then dropped after keepidle +
 * keepintvl * keepcnt of the socket, whoever chose them.  Returns the
 * helper's result, or 1 when there was nothing to do. */
static __always_inline int bk_follow_ut(void *sk, struct bk_policy *p,
					__u16 app)
{
	int idle, intvl, cnt, ut;

	if (!(p->flags & BK_F_UT_DERIVED) || !p->val[BK_OPT_USER_TIMEOUT] ||
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

int bk_sockops(struct bpf_sock_ops *ops)
{
	struct bk_policy *p;
	struct bk_counters *c;
	struct bk_sk *s;
	struct bpf_sock *sk;
	__u16 mask = 0;
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
	if (cb == BK_CB_PASSIVE_ESTABLISHED &&
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
	/* CONNECT, LISTEN: the policy replaces what the program set before;
	 * what it sets afterwards is its own (set mode). */
	if (s) {
		s->app = mask;
		s->owner = p->cgroup_id;
		s->level = p->level;
		s->gen = p->gen;
	}

	/* Times first, SO_KEEPALIVE last: once keepalive is on, each TCP_KEEP*
	 * write re-arms the keepalive timer (measured: cheaper). */
	BK_APPLY(ops, p, c, mask, KEEPIDLE);
	BK_APPLY(ops, p, c, mask, KEEPINTVL);
	BK_APPLY(ops, p, c, mask, KEEPCNT);
	BK_APPLY(ops, p, c, mask, USER_TIMEOUT);
	if (cb == BK_CB_CONNECT)
		BK_APPLY(ops, p, c, mask, SYNCNT); /* before the SYN goes out */
	BK_APPLY(ops, p, c, mask, MAXSEG);
	BK_APPLY(ops, p, c, mask, WINDOW_CLAMP);
	BK_APPLY(ops, p, c, mask, KEEPALIVE);
	if (mask)
		bk_follow_ut(ops, p, mask); /* UT counted above already */
	return 1;
}

int bk_setsockopt(struct bpf_sockopt *ctx)
{
	struct bk_policy *own;
	struct bk_counters *c;
	struct bk_sk *s;
	struct bpf_sock *sk;
	int id, *v, rewritten;

	if (ctx->level == BK_KEEPALIVE_LEVEL &&
	    ctx->optname == BK_KEEPALIVE_OPTNAME)
		id = BK_OPT_KEEPALIVE;
	else if (ctx->level == IPPROTO_TCP &&
		 ctx->optname == BK_KEEPIDLE_OPTNAME)
		id = BK_OPT_KEEPIDLE;
	else if (ctx->level == IPPROTO_TCP &&
		 ctx->optname == BK_KEEPINTVL_OPTNAME)
		id = BK_OPT_KEEPINTVL;
	else if (ctx->level == IPPROTO_TCP &&
		 ctx->optname == BK_KEEPCNT_OPTNAME)
		id = BK_OPT_KEEPCNT;
	else if (ctx->level == IPPROTO_TCP &&
		 ctx->optname == BK_USER_TIMEOUT_OPTNAME)
		id = BK_OPT_USER_TIMEOUT;
	else
		goto pass;

	sk = ctx->sk;
	if (!sk || sk->type != SOCK_STREAM || sk->protocol != IPPROTO_TCP)
		goto pass;
	own = (struct bk_policy *)bk_policy.get_local_storage(0);
	if (!own || !(own->flags & BK_F_ACTIVE))
		goto pass;
	v = ctx->optval;
	if (ctx->optlen < (int)sizeof(*v) || (void *)(v + 1) > ctx->optval_end)
		goto pass;
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
				 BK_AT_POLICY(sk, own);

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
	rewritten = 0;
	if (own->flags & BK_F_ENFORCE) {
		if (id == BK_OPT_KEEPALIVE) {
			if (*v != 0)
				goto pass;
			*v = 1;
		} else {
			__u32 cap = own->val[id & 7];
			/* TCP_USER_TIMEOUT 0 means "never": above any cap. */
			if (!cap || (*v > 0 && *v <= (int)cap))
				goto follow;
			if (*v < 0 || (*v == 0 && id != BK_OPT_USER_TIMEOUT))
				goto pass; /* invalid: the kernel refuses it */
			*v = cap;
		}
		rewritten = 1;
		c = (struct bk_counters *)bk_counters.get_local_storage(0);
		if (c)
			c->rewritten[id & 7]++;
	}
follow:
	/* The kernel applies the program's value after this hook returns:
	 * derive the user timeout from the value being written and the
	 * socket's other two times. */
	if (s && (BK_TIME_BITS & BK_BIT(id)) &&
	    (own->flags & BK_F_UT_DERIVED) && own->val[BK_OPT_USER_TIMEOUT] &&
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
	 * says how much of it to use: a rewritten value must not be lost. */
	if (ctx->optlen > 4096)
		ctx->optlen = rewritten ? (int)sizeof(*v) : 0;
	return 1;

pass:
	/* Above a page the program sees a truncated copy; optlen 0 tells the
	 * kernel to use the application's buffer (Documentation/bpf/
	 * prog_cgroup_sockopt.rst).  Below that optlen is left alone so that
	 * programs running after ours still see the value. */
	if (ctx->optlen > 4096)
		ctx->optlen = 0;
	return 1;
}

/* --- the sweep of existing sockets ---------------------------------------
 *
 * An iter/tcp program walks every TCP socket of the network namespace the
 * iterator was created in, with the socket locked, and may call
 * bpf_setsockopt on it (Linux 5.15+; bpf_getsockopt(SO_KEEPALIVE) 6.1+). */

struct bpf_iter_meta;
struct sock_common;
struct bpf_iter__tcp {
	struct bpf_iter_meta *meta;
	struct sock_common *sk_common;
	__u32 uid;
};

#define BK_SWEEP_SET(tp, e, st, mask, KEY)                                     \
	do {                                                                   \
		int v_ = want[BK_OPT_##KEY];                                   \
		if (v_ >= 0 && !((mask)&BK_BIT(BK_OPT_##KEY)) &&               \
		    BK_GET(tp, KEY) != v_) {                                   \
			int err_ = bpf_setsockopt(tp, BK_##KEY##_LEVEL,        \
						  BK_##KEY##_OPTNAME, &v_,     \
						  sizeof(v_));                 \
			if (err_) {                                            \
				(e)->failed |= BK_BIT(BK_OPT_##KEY);           \
				if (st)                                        \
					__sync_fetch_and_add(                  \
						&(st)->failed[BK_OPT_##KEY]    \
							     [bk_err_bucket(   \
								     err_)],   \
						1);                            \
			} else {                                               \
				(e)->applied |= BK_BIT(BK_OPT_##KEY);          \
				if (st)                                        \
					__sync_fetch_and_add(                  \
						&(st)->applied[BK_OPT_##KEY],  \
						1);                            \
			}                                                      \
		}                                                              \
	} while (0)

#define BK_SWEEP_READ_ALL(tp, e)                                               \
	do {                                                                   \
		(e)->val[BK_OPT_KEEPALIVE] = BK_GET(tp, KEEPALIVE);            \
		(e)->val[BK_OPT_KEEPIDLE] = BK_GET(tp, KEEPIDLE);              \
		(e)->val[BK_OPT_KEEPINTVL] = BK_GET(tp, KEEPINTVL);            \
		(e)->val[BK_OPT_KEEPCNT] = BK_GET(tp, KEEPCNT);                \
		(e)->val[BK_OPT_USER_TIMEOUT] = BK_GET(tp, USER_TIMEOUT);      \
		(e)->val[BK_OPT_SYNCNT] = BK_GET(tp, SYNCNT);                  \
		(e)->val[BK_OPT_MAXSEG] = BK_GET(tp, MAXSEG);                  \
		(e)->val[BK_OPT_WINDOW_CLAMP] = BK_GET(tp, WINDOW_CLAMP);      \
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
	struct bk_policy *p;
	struct bk_sweep *e;
	struct tcp_sock *tp;
	struct bk_sk *s;
	int want[BK_NOPT_BPF];
	__u64 cookie, owner;
	__u16 mask = 0, known;
	int i, ka, enforce, own;

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
		BK_SWEEP_SET(tp, e, st, mask, KEEPIDLE);
		BK_SWEEP_SET(tp, e, st, mask, KEEPINTVL);
		BK_SWEEP_SET(tp, e, st, mask, KEEPCNT);
		BK_SWEEP_SET(tp, e, st, mask, USER_TIMEOUT);
		BK_SWEEP_SET(tp, e, st, mask, MAXSEG);
		BK_SWEEP_SET(tp, e, st, mask, WINDOW_CLAMP);
		BK_SWEEP_SET(tp, e, st, mask, KEEPALIVE);
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
	enforce = p->flags & BK_F_ENFORCE;
	ka = BK_GET(tp, KEEPALIVE);
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
		 * handed-over listener) may have changed them. */
		e->result |= BK_SWR_CURRENT;
		if (!enforce)
			goto read;
	} else if (!known && ka > 0 && BK_AT_POLICY(tp, p)) {
		e->result |= BK_SWR_CURRENT;
		if (!(p->flags & BK_F_HAS_ANCESTOR))
			goto read; /* nothing to set, nothing to record */
	} else {
		if (st)
			__sync_fetch_and_add(&st->swept, 1);
		own = !known && ka > 0 && !BK_AT_PREV(tp, p) &&
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
		want[i] = p->val[i] ? (int)p->val[i] : -1;
	if (!(e->in_flags & BK_SWI_SYN_SENT))
		want[BK_OPT_SYNCNT] = -1; /* only counts before the handshake */
	if (enforce) {
		/* A tighter value the program chose itself while bpfkeep
		 * watched stands.  A socket whose history is unknown (made
		 * before any bpfkeep program saw it) ends at the policy. */
		int cur;

		cur = BK_GET(tp, KEEPIDLE);
		if (known && (s->app & BK_BIT(BK_OPT_KEEPIDLE)) &&
		    bk_within(cur, p->val[BK_OPT_KEEPIDLE], BK_OPT_KEEPIDLE))
			want[BK_OPT_KEEPIDLE] = -1;
		cur = BK_GET(tp, KEEPINTVL);
		if (known && (s->app & BK_BIT(BK_OPT_KEEPINTVL)) &&
		    bk_within(cur, p->val[BK_OPT_KEEPINTVL], BK_OPT_KEEPINTVL))
			want[BK_OPT_KEEPINTVL] = -1;
		cur = BK_GET(tp, KEEPCNT);
		if (known && (s->app & BK_BIT(BK_OPT_KEEPCNT)) &&
		    bk_within(cur, p->val[BK_OPT_KEEPCNT], BK_OPT_KEEPCNT))
			want[BK_OPT_KEEPCNT] = -1;
		cur = BK_GET(tp, USER_TIMEOUT);
		if (known && (s->app & BK_BIT(BK_OPT_USER_TIMEOUT)) &&
		    bk_within(cur, p->val[BK_OPT_USER_TIMEOUT],
			      BK_OPT_USER_TIMEOUT))
			want[BK_OPT_USER_TIMEOUT] = -1;
		if (ka > 0)
			want[BK_OPT_KEEPALIVE] = -1;
	}
	if (s) {
		s->owner = owner;
		s->level = p->level;
		s->gen = p->gen;
	}
	BK_SWEEP_SET(tp, e, st, mask, KEEPIDLE);
	BK_SWEEP_SET(tp, e, st, mask, KEEPINTVL);
	BK_SWEEP_SET(tp, e, st, mask, KEEPCNT);
	BK_SWEEP_SET(tp, e, st, mask, USER_TIMEOUT);
	BK_SWEEP_SET(tp, e, st, mask, SYNCNT);
	BK_SWEEP_SET(tp, e, st, mask, MAXSEG);
	BK_SWEEP_SET(tp, e, st, mask, WINDOW_CLAMP);
	BK_SWEEP_SET(tp, e, st, mask, KEEPALIVE);
	if (!enforce && bk_follow_ut(tp, p, mask) == 0)
		e->applied |= BK_BIT(BK_OPT_USER_TIMEOUT);

read:
	s = bk_sk.sk_storage_get(tp, 0, 0);
	if (s) {
		e->rec_owner = s->owner;
		e->rec_gen = s->gen;
		e->rec_app = s->app;
		e->rec_level = s->level;
	}
	BK_SWEEP_READ_ALL(tp, e);
	return 0;
}
