// SPDX-License-Identifier: GPL-2.0
/*
 * bpfkeep's kernel side: TCP keepalive for every TCP socket of a cgroup.
 *
 * One copy of each program is loaded and pinned; it is attached (bpf_link)
 * to every cgroup that has a policy.  Each attachment finds its own policy
 * and counters through cgroup local storage (keyed by the cgroup id alone,
 * so the sock_ops and setsockopt attachments of one cgroup share them).
 * Userspace changes a policy by updating the map: new sockets see the new
 * values at once, with no re-attach and no gap.
 *
 * Only UAPI types are used (struct bpf_sock_ops, struct bpf_sockopt), so any
 * distro kernel header set compiles this, whatever kernel is running.
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
/* The same policies keyed by cgroup id, for the setsockopt program's walk
 * up the cgroup tree (local storage cannot be looked up by key in BPF). */
BPF_HASH(bk_policies, __u64, struct bk_policy, BK_MAX_POLICIES);

/* The mark of a listener bpfkeep configured.  RTO_CB is the most benign
 * callback flag to borrow: it adds a callback only when a retransmission
 * timer fires, which every sock_ops program already ignores or handles. */
#define BK_LISTENER_MARK BPF_SOCK_OPS_RTO_CB_FLAG

#define SOCK_STREAM 1
#define IPPROTO_TCP 6

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

/* Set one option if the policy gives it a value; count the outcome.  A
 * refused option (e.g. TCP_MAXSEG before Linux 6.1) is counted, the others
 * are still applied. */
#define BK_APPLY(ops, p, c, KEY)                                               \
	do {                                                                   \
		int v_ = (p)->val[BK_OPT_##KEY];                               \
		if (v_) {                                                      \
			int err_ = bpf_setsockopt(ops, BK_##KEY##_LEVEL,       \
						  BK_##KEY##_OPTNAME, &v_,     \
						  sizeof(v_));                 \
			if (err_)                                              \
				(c)->failed[BK_OPT_##KEY]                      \
					   [bk_err_bucket(err_)]++;            \
			else                                                   \
				(c)->applied[BK_OPT_##KEY]++;                  \
		}                                                              \
	} while (0)

int bk_sockops(struct bpf_sock_ops *ops)
{
	struct bk_policy *p;
	struct bk_counters *c;
	int cb, on = 0;

	/* Only three callbacks matter.  Options set on a listener are
	 * inherited by the sockets it accepts; PASSIVE_ESTABLISHED catches
	 * listeners that predate the policy.  ACTIVE_ESTABLISHED is not used:
	 * CONNECT already ran for that socket. */
	switch (ops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		cb = BK_CB_CONNECT;
		break;
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		cb = BK_CB_LISTEN;
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		cb = BK_CB_PASSIVE;
		break;
	default:
		return 1;
	}
	/* The kernel runs the socket's own cgroup's programs first, then each
	 * ancestor's, all sharing this ctx.  The first bpfkeep program marks
	 * the callback as handled so that an ancestor's policy cannot
	 * overwrite the most specific one.  These callbacks have no args and
	 * ignore the reply, so the mark changes nothing else. */
	if (ops->reply == BK_CLAIMED || !ops->is_fullsock)
		return 1;
	p = (struct bk_policy *)bk_policy.get_local_storage(0);
	c = (struct bk_counters *)bk_counters.get_local_storage(0);
	if (!p || !c || !(p->flags & BK_F_ACTIVE))
		return 1;
	ops->reply = BK_CLAIMED;
	c->seen[cb]++;

	if (cb == BK_CB_PASSIVE) {
		/* Cloned from a listener that bpfkeep set up: everything was
		 * inherited.  Such a listener carries a mark in its callback
		 * flags, which children inherit (tcp_bpf_clone), so this costs
		 * no helper call -- and in set mode a program that turned
		 * keepalive off on its listener keeps it off.  A listener older
		 * than the policy is asked whether it has keepalive (the
		 * program's own setting wins there too). */
		if (!(ops->bpf_sock_ops_cb_flags & BK_LISTENER_MARK) &&
		    (bpf_getsockopt(ops, BK_KEEPALIVE_LEVEL,
				    BK_KEEPALIVE_OPTNAME, &on, sizeof(on)) ||
		     !on))
			goto apply;
		c->inherited++;
		return 1;
	}

apply:
	/* Times first, SO_KEEPALIVE last: once keepalive is on, each TCP_KEEP*
	 * write re-arms the keepalive timer (measured, KERNEL-NOTES.md). */
	BK_APPLY(ops, p, c, KEEPIDLE);
	BK_APPLY(ops, p, c, KEEPINTVL);
	BK_APPLY(ops, p, c, KEEPCNT);
	BK_APPLY(ops, p, c, USER_TIMEOUT);
	if (cb == BK_CB_CONNECT)
		BK_APPLY(ops, p, c, SYNCNT); /* before the SYN goes out */
	BK_APPLY(ops, p, c, MAXSEG);
	BK_APPLY(ops, p, c, WINDOW_CLAMP);
	BK_APPLY(ops, p, c, KEEPALIVE);
	if (cb == BK_CB_LISTEN)
		bpf_sock_ops_cb_flags_set(ops, ops->bpf_sock_ops_cb_flags |
						       BK_LISTENER_MARK);
	return 1;
}

/* The cgroup id of the most specific bpfkeep policy for the calling task:
 * the deepest of its cgroup and ancestors that has one (0: none).  Every
 * bpfkeep program in the chain finds the same answer, and only the one
 * attached there acts. */
static __always_inline __u64 bk_effective_cgroup(void)
{
	struct bk_policy *p;
	__u64 id, best = 0;
	int level;

#pragma unroll
	for (level = 0; level < BK_MAX_DEPTH; level++) {
		id = bpf_get_current_ancestor_cgroup_id(level);
		if (!id)
			break;
		p = bk_policies.lookup(&id);
		if (p && (p->flags & BK_F_ACTIVE))
			best = id;
	}
	return best;
}

int bk_setsockopt(struct bpf_sockopt *ctx)
{
	struct bk_policy *own;
	struct bk_counters *c;
	struct bpf_sock *sk;
	__u64 eff;
	int id, *v;

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
	/* No policy above the task: the socket is used outside its creator's
	 * cgroup; the socket's own chain (this program) decides. */
	eff = bk_effective_cgroup();
	if ((eff && eff != own->cgroup_id) || !(own->flags & BK_F_ENFORCE))
		goto pass;

	v = ctx->optval;
	if (ctx->optlen < (int)sizeof(*v) || (void *)(v + 1) > ctx->optval_end)
		goto pass;
	if (id == BK_OPT_KEEPALIVE) {
		if (*v != 0)
			goto pass;
		*v = 1;
	} else {
		__u32 cap = own->val[id & 7];
		/* TCP_USER_TIMEOUT 0 means "never": above any cap. */
		if (!cap || (*v > 0 && *v <= (int)cap))
			goto pass;
		if (*v < 0 || (*v == 0 && id != BK_OPT_USER_TIMEOUT))
			goto pass; /* invalid: the kernel refuses it */
		*v = cap;
	}
	c = (struct bk_counters *)bk_counters.get_local_storage(0);
	if (c)
		c->rewritten[id & 7]++;
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
