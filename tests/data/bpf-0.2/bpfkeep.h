/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Structures and constants shared by bpfkeep's BPF programs
 * (keepalive.bpf.c) and its userspace: bpfkeep/bpfmaps.py reads this very
 * file (the installed copy) for the flags, callback and errno names and the
 * struct layouts, and tests/test_layout.py compares them with the BTF of the
 * compiled programs' maps.  So that it can: integer #defines, structs of
 * fixed-width types (__u8..__u64 and arrays of them), no padding holes; the
 * names after BK_CB_ and BK_ERR_ are the metric labels.
 */
#ifndef BPFKEEP_H
#define BPFKEEP_H

#include "bpfkeep_options.h"

/* bk_policy.flags */
#define BK_F_ACTIVE 0x1	 /* the policy is complete: apply it */
#define BK_F_ENFORCE 0x2 /* cgroup/setsockopt caps the application's values */
#define BK_F_MANAGED 0x4 /* owned by bpfkeep daemon (userspace only) */
#define BK_F_UT_DERIVED                                                        \
	0x8 /* val[USER_TIMEOUT] was derived from the three                    \
	     * keepalive times, so it follows them when the                    \
	     * application sets its own */
/* Where other policies are (userspace keeps these current at every attach):
 * with neither, the policy's cgroup owns every socket its programs see and
 * no per-socket record is needed to say so. */
/* an ancestor cgroup has a policy too: record the owner on every socket */
#define BK_F_HAS_ANCESTOR 0x10
/* a descendant has a policy: look for its record and step aside */
#define BK_F_HAS_DESCENDANT 0x20
/* prev[] holds the values sockets got before the last change (an update,
 * or an ancestor's policy) */
#define BK_F_PREV 0x40
/* A complete sweep ran since the last change: every listener of the policy
 * carries its values or a record, so what it accepts needs nothing */
#define BK_F_SWEPT 0x80

/* The keepalive values that tell a socket bpfkeep configured from one whose
 * program chose its own, when the socket carries no record: indexes into
 * bk_policy.prev[] and bk_sweep.fp[] (0: any value). */
#define BK_FP_KEEPIDLE 0
#define BK_FP_KEEPINTVL 1
#define BK_FP_KEEPCNT 2
#define BK_FP_USER_TIMEOUT 3
#define BK_NFP 4

/* The policy of one attached cgroup.  val[] is indexed by option id; 0
 * leaves the kernel default.  val[BK_OPT_KEEPALIVE] is always 1. */
struct bk_policy {
	__u64 cgroup_id; /* the cgroup this policy is attached to */
	__u32 flags;
	__u32 gen;   /* changes whenever the values or the mode change */
	__u32 level; /* depth of the cgroup below the cgroup2 root */
	__u32 val[BK_NOPT_BPF];
	__u32 prev[BK_NFP]; /* BK_F_PREV: what sockets carried before */
	__u32 pad;
};

/* What bpfkeep knows about one socket, where the socket's values alone
 * cannot tell: kept in the socket itself (BPF_MAP_TYPE_SK_STORAGE, cloned
 * to the sockets a listener accepts), so no other tool's program can
 * overwrite it.  Made only when needed (creating, cloning and freeing it
 * is most of what a record costs a connection): under nested policies (the
 * owner: the most specific policy that covers the socket), when a program
 * sets a watched option itself after connect()/listen() (the app bits), and
 * when the sweep leaves a program's own keepalive in place. */
struct bk_sk {
	__u64 owner; /* cgroup id of the owning policy; 0: none yet */
	__u32 gen;   /* the owner's bk_policy.gen last applied; 0: not yet */
	__u16 level; /* the owner's bk_policy.level */
	__u16 app;   /* bit per option id: the application set it itself */
};

/* Socket callbacks counted in bk_counters.seen[]; the metric's callback
 * label is the name in lower case */
#define BK_CB_CONNECT 0 /* BPF_SOCK_OPS_TCP_CONNECT_CB: before the SYN */
#define BK_CB_LISTEN 1	/* BPF_SOCK_OPS_TCP_LISTEN_CB */
#define BK_CB_PASSIVE_ESTABLISHED 2 /* BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB */
#define BK_NCB 3

/* errno buckets of bk_counters.failed[][]; the metric's errno label is
 * the name (OTHER: "other") */
#define BK_ERR_OTHER 0
#define BK_ERR_EPERM 1
#define BK_ERR_EINVAL 2
#define BK_ERR_ENOPROTOOPT 3
#define BK_ERR_EOPNOTSUPP 4
#define BK_ERR_ENOTSUPP 5
#define BK_ERR_EFAULT 6
#define BK_ERR_EBUSY 7
#define BK_NERR 8

/* Per-CPU counters of one attached cgroup; userspace sums the CPUs. */
struct bk_counters {
	__u64 seen[BK_NCB]; /* sockets handled, by callback */
	__u64 inherited;    /* accepted sockets whose listener carried this
			     * very policy already: nothing to do */
	__u64 applied[BK_NOPT_BPF];
	__u64 failed[BK_NOPT_BPF][BK_NERR];
	__u64 rewritten[BK_NOPT_BPF]; /* enforce: application writes capped */
};

/* The sweep of existing sockets (iter/tcp).  Userspace picks the target
 * sockets by their cookies (inet_diag has each socket's cookie and cgroup
 * id) and puts one bk_sweep per socket in bk_sweep, keyed by the cookie;
 * the iterator acts on the sockets it finds there and writes back what
 * happened and the values in force afterwards. */
#define BK_SWEEP_APPLY 1 /* apply the owner's policy (mode rules apply) */
#define BK_SWEEP_UNDO 2	 /* the owner's policy is gone: back to defaults */
#define BK_SWEEP_READ 3	 /* only read the values in force */

/* bk_sweep.in_flags */
#define BK_SWI_SYN_SENT 0x1 /* still connecting: TCP_SYNCNT matters */
#define BK_SWI_HELD 0x2	    /* made elsewhere, held by the policy's processes */
#define BK_SWI_FP 0x4 /* fp[]: values that were bpfkeep's on this socket */
/* UNDO that keeps the values (a detached policy's established sockets) and
 * records on sockets without a record that they are bpfkeep's, not the
 * program's: a later policy's sweep then brings them to its values */
#define BK_SWI_KEEP 0x8
/* UNDO: bit (BK_SWI_RESET_SHIFT + option index) asks to reset that option
 * to val[option index] */
#define BK_SWI_RESET_SHIFT 16
/* bk_sweep.result */
#define BK_SWR_SEEN 0x1	      /* the iterator found the socket */
#define BK_SWR_APP_OWN 0x2    /* set mode: the program's own values kept */
#define BK_SWR_NO_POLICY 0x4  /* the owner has no active policy */
#define BK_SWR_NO_STORAGE 0x8 /* no room for the socket's record */
#define BK_SWR_CURRENT 0x10   /* already carried this policy: untouched */

struct bk_sweep {
	__u64 owner;	 /* in: cgroup id of the policy (APPLY, UNDO) */
	__u32 action;	 /* in: BK_SWEEP_* */
	__u32 in_flags;	 /* in: BK_SWI_* */
	__u32 result;	 /* out: BK_SWR_* */
	__u16 applied;	 /* out: bit per option id, set by this sweep */
	__u16 failed;	 /* out: bit per option id, refused by the kernel */
	__u64 rec_owner; /* out: the socket's record afterwards */
	__u32 rec_gen;
	__u16 rec_app;
	__u16 rec_level;
	__u32 val[BK_NOPT_BPF]; /* in (UNDO): the host defaults;
				 * out: the values in force afterwards */
	__u32 fp[BK_NFP];	/* in (BK_SWI_FP): keepalive values a socket
				 * without a record got from bpfkeep: the
				 * detached policy's (UNDO), a former owner's */
};

/* Sweep counters of one policy (hash by cgroup id; atomic adds). */
struct bk_sweepstats {
	__u64 swept;   /* sockets the sweep reached */
	__u64 app_own; /* set mode: kept the program's own values */
	__u64 applied[BK_NOPT_BPF];
	__u64 failed[BK_NOPT_BPF][BK_NERR];
};

/* Deepest cgroup level bpfkeep accepts a policy at (the level is kept in
 * a __u16 in bk_sk). */
#define BK_MAX_DEPTH 1024

#define BK_MAX_POLICIES 16384
#define BK_MAX_SWEEP 65536 /* sockets per sweep batch */

#endif /* BPFKEEP_H */
