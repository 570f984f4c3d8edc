/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Structures shared by bpfkeep's BPF programs (keepalive.bpf.c) and its
 * userspace (bpfkeep/bpfmaps.py mirrors them with ctypes; a test checks
 * the sizes agree).  Fixed-width types only, no padding holes.
 */
#ifndef BPFKEEP_H
#define BPFKEEP_H

#include "bpfkeep_options.h"

/* bk_policy.flags */
#define BK_F_ACTIVE 0x1	 /* the policy is complete: apply it */
#define BK_F_ENFORCE 0x2 /* cgroup/setsockopt caps the application's values */
#define BK_F_MANAGED 0x4 /* owned by bpfkeep daemon (userspace only) */

/* The policy of one attached cgroup.  val[] is indexed by option id; 0
 * leaves the kernel default.  val[BK_OPT_KEEPALIVE] is always 1. */
struct bk_policy {
	__u64 cgroup_id; /* the cgroup this policy is attached to */
	__u32 flags;
	__u32 val[BK_NOPT_BPF];
	__u32 pad;
};

/* Socket callbacks counted in bk_counters.seen[] */
#define BK_CB_CONNECT 0 /* BPF_SOCK_OPS_TCP_CONNECT_CB: before the SYN */
#define BK_CB_LISTEN 1	/* BPF_SOCK_OPS_TCP_LISTEN_CB */
#define BK_CB_PASSIVE 2 /* BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB */
#define BK_NCB 3

/* errno buckets of bk_counters.failed[][] (bpfkeep/bpfmaps.py names them) */
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
	__u64 inherited;    /* accepted sockets that already had keepalive
			     * from their listener: nothing to do */
	__u64 applied[BK_NOPT_BPF];
	__u64 failed[BK_NOPT_BPF][BK_NERR];
	__u64 rewritten[BK_NOPT_BPF]; /* enforce: application writes capped */
};

/* Written into bpf_sock_ops.reply (the only writable field there) by the first
 * (most specific) bpfkeep program that handles a socket callback; see
 * keepalive.bpf.c. */
#define BK_CLAIMED 0x6b656570 /* "keep" */

/* Deepest cgroup level the setsockopt program looks at. */
#define BK_MAX_DEPTH 32

#define BK_MAX_POLICIES 16384

#endif /* BPFKEEP_H */
