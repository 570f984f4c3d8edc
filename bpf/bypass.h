/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Enforce mode where the cgroup/setsockopt hook does not see the call
 * (bpf/bypass.bpf.c, bpfkeep/daemon/enforce.py): the structs both sides
 * read.  Part of bpfkeep.h (included at its end), so userspace reads the
 * layouts from it like the others' (bpfkeep/progs/header.py).
 */
#ifndef BPFKEEP_BYPASS_H
#define BPFKEEP_BYPASS_H

/* A socket an enforced policy must bring back: the tracing programs note
 * it when a setsockopt left an option it enforces outside the policy, the
 * daemon repairs it (the sweep's APPLY on its cookie) and deletes the
 * note.  One note per socket, however many calls: a program that hammers
 * setsockopt costs one repair per daemon pass. */
struct bk_bypass_key {
	__u64 owner;  /* cgroup id of the enforced policy */
	__u64 cookie; /* the socket's; 0: not known yet (a socket no one
		       * asked the cookie of), or an MPTCP socket, whose TCP
		       * subflows carry the values: every socket of the
		       * policy */
};

struct bk_bypass {
	__u32 opts;  /* bit per option id left outside the policy */
	__u32 calls; /* setsockopt calls that did so since the note */
};
#define BK_MAX_BYPASS 4096 /* sockets noted between two repairs */

/* Per enforced policy (hash by cgroup id). */
struct bk_bypassed {
	__u64 calls[BK_NOPT_BPF]; /* setsockopt calls that left the option
				   * outside the policy, past the cgroup hook
				   * (counted by the tracing programs) */
	__u64 unnoted;		  /* sockets not noted: the note map was full
				   * (the periodic enforce pass repairs them) */
};

/* Per enforced policy (hash by cgroup id), written by the daemon only:
 * sockets it brought back within the policy, by option. */
struct bk_repaired {
	__u64 sockets[BK_NOPT_BPF];
};

#endif /* BPFKEEP_BYPASS_H */
