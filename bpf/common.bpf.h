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

/* The options that make up "keepalive": a program that sets its own
 * keepalive keeps all of them in set mode. */
#define BK_BIT(id) (1u << (id))
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

#define BK_AT_POLICY(sk, p)                                                    \
	bk_at(sk, (p)->val[BK_OPT_KEEPIDLE], (p)->val[BK_OPT_KEEPINTVL],       \
	      (p)->val[BK_OPT_KEEPCNT], (p)->val[BK_OPT_USER_TIMEOUT])
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

#endif /* BPFKEEP_COMMON_BPF_H */
