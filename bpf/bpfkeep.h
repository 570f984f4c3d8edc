/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Structures and constants shared by bpfkeep's BPF programs (sockops,
 * setsockopt and sweep .bpf.c, over common.bpf.h) and its userspace:
 * bpfkeep/progs/header.py reads this very file (the installed copy) for the
 * flags, callback and errno names and the struct layouts, and
 * tests/test_layout.py compares them with the BTF of the compiled programs'
 * maps.  So that it can: integer #defines, structs of fixed-width types
 * (__u8..__u64 and arrays of them), no padding holes; the names after
 * BK_CB_ and BK_ERR_ are the metric labels.
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
/* keepidle = "auto" (bk_policy or bk_rule): keepidle is the one learned for
 * the socket's path (bk_learned), val[KEEPIDLE] until one is */
#define BK_F_AUTO 0x200
/* Peer rules that a listener's values could not be taken back from (an
 * exempt peer, or a rule that leaves unset an option the policy sets):
 * the policy's listeners stay as the program made them and every accepted
 * socket gets its peer's values at accept.  Without it a per-peer
 * policy's listeners carry its own values, and an accepted socket needs
 * only what its peer's values change. */
#define BK_F_BARE_LISTEN 0x400

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
	__u32 gen;   /* changes whenever the values, the mode or the peer
		      * rules change */
	__u32 level; /* depth of the cgroup below the cgroup2 root */
	__u32 val[BK_NOPT_BPF];
	__u32 prev[BK_NFP]; /* BK_F_PREV: what sockets carried before */
	__u32 pad;
	__u64 peers;	  /* its peer rules: a set in bk_peers and bk_rules,
			   * named by a hash of its content; 0: none */
	__u64 prev_peers; /* BK_F_PREV: the set sockets were configured by */
	__u16 auto_min;	  /* BK_F_AUTO: keepidle's bounds (s), for userspace */
	__u16 auto_max;
	__u32 pad2;
};

/* --- Peer rules ------------------------------------------------------------
 *
 * A set of peer rules (shared by every policy with the same rules) is
 * flattened by userspace into an LPM trie: for each prefix a rule names,
 * the port ranges to try there, most specific first, each naming a rule of
 * the set (bpfkeep/peers.py, flatten).  The longest prefix that contains
 * the peer's address decides; no port range matching there: the policy's
 * own values.  IPv4 peers are looked up as ::ffff:a.b.c.d. */
#define BK_PEER_PORTS 9	 /* port ranges per prefix (8 port rules + 1 any) */
#define BK_PEER_NAME 256 /* bytes of a rule's name (its address as written) */
#define BK_MAX_PEER_PREFIXES 65536
#define BK_MAX_PEER_RULES 65536

/* The trie's key: prefixlen counts the bits of set and addr that must
 * match (64 for the set, then the address's prefix). */
struct bk_peer_key {
	__u32 prefixlen;
	__u8 set[8]; /* the set's id (bk_policy.peers), native byte order */
	__u8 addr[16];
};

struct bk_peer {
	__u16 lo[BK_PEER_PORTS]; /* port range, host byte order */
	__u16 hi[BK_PEER_PORTS];
	__u16 rule[BK_PEER_PORTS]; /* rule number in the set, from 1 */
	__u16 n;		   /* ranges used */
};

struct bk_rule_key {
	__u64 set;
	__u32 rule;
	__u32 pad;
};

/* bk_rule.flags (BK_F_ENFORCE and BK_F_UT_DERIVED as in bk_policy) */
#define BK_R_EXEMPT                                                            \
	0x100 /* leave these connections as the program made them              \
	       */

struct bk_rule {
	__u32 flags;
	__u32 tag; /* a hash of the rule's label: what its losses are counted by
		    */
	__u32 val[BK_NOPT_BPF];
	/* For userspace: */
	__u16 lo; /* its port range (0-0: any port) */
	__u16 hi;
	__u16 auto_min; /* BK_F_AUTO: keepidle's bounds (s) */
	__u16 auto_max;
	__u32 idle_limit; /* s: the path's idle limit, as stated (0: not) */
	__u8 name[BK_PEER_NAME]; /* its address as written */
};

/* --- Learned idle limits (keepidle = "auto") ---------------------------------
 *
 * A path is a peer rule of a policy, or, for the policy's own values, the
 * peer's network (a /24 for IPv4, a /64 for IPv6).  Userspace (the daemon)
 * learns each path's idle limit from its lost connections and writes the
 * keepidle to use; the programs read only that. */
struct bk_path_key {
	__u64 owner;  /* the policy's cgroup id */
	__u32 tag;    /* the peer rule's tag; 0: the policy's own values */
	__u32 plen;   /* tag 0: the network's prefix length (120: a v4 /24) */
	__u8 net[16]; /* tag 0: the network (IPv4 mapped), host bits 0 */
};

struct bk_learned {
	__u32 keepidle; /* s: for the path's connections (0: none learned) */
	__u32 limit;	/* s: the path's idle limit as known (0: unknown) */
	__u32 upper_ms; /* the shortest idle after which one was lost (0: none)
			 */
	__u32 lower_ms; /* the longest idle one survived */
	__u64 upper_at; /* when upper_ms was learned (s since the epoch) */
	__u32 losses;	/* losses taken as evidence */
	__u32 ignored;	/* losses set aside (busy, unsolicited, a failing peer)
			 */
};
#define BK_MAX_PATHS 65536

/* --- Lost connections ------------------------------------------------------
 *
 * Counted when the kernel ends a connection of a policy in error (the
 * inet_sk_error_report tracepoint), by the reason, and how long the
 * connection had been idle.  The names after BK_LOSS_ are the metric's
 * reason labels. */
#define BK_LOSS_KEEPALIVE 0    /* keepalive probes unanswered: a dead peer */
#define BK_LOSS_USER_TIMEOUT 1 /* data unacknowledged past TCP_USER_TIMEOUT */
#define BK_LOSS_RETRANSMITS                                                    \
	2		/* the kernel's own retry limit (tcp_retries2)         \
			 */
#define BK_LOSS_RESET 3 /* a RST from the peer or a middlebox */
#define BK_NLOSS 4
#define BK_NIDLE 16 /* idle-time histogram buckets (bounds: bk_config) */

struct bk_loss_key {
	__u64 owner; /* cgroup id of the policy */
	__u32 tag;   /* bk_rule.tag of the peer rule; 0: the policy's own */
	__u32 pad;
};

struct bk_losses {
	__u64 lost[BK_NLOSS];
	__u64 idle[BK_NIDLE]; /* losses per idle bucket (not cumulative) */
	__u64 idle_ms;	      /* sum of the idle times */
};

/* Written once by userspace when the programs are loaded. */
struct bk_config {
	__u32 hz;		    /* the kernel's jiffies per second */
	__u32 nidle;		    /* bounds used in idle_le_ms[] */
	__u32 idle_le_ms[BK_NIDLE]; /* upper bound of each idle bucket */
};

/* One loss, for the daemon (a ring buffer): what the learning of idle
 * limits reads. */
struct bk_loss_event {
	__u64 owner;
	__u32 tag;
	__u32 reason;	    /* BK_LOSS_* */
	__u32 idle_ms;	    /* no data either way before the loss */
	__u32 path_idle_ms; /* nothing heard from the peer before it */
	__u32 keepidle;	    /* s, in force on the socket (0: the sysctl) */
	__u16 port;	    /* the peer's, host byte order */
	__u8 unacked;	    /* data we sent was not acknowledged */
	__u8 probes;	    /* keepalive probes out, unanswered */
	__u8 addr[16];	    /* the peer's, IPv4 mapped */
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
	__u64 exempt; /* new sockets of an exempt peer: left as they were */
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
/* APPLY: check the values even on a socket current with the policy (its
 * learned keepidle changed, which changes no generation) */
#define BK_SWI_RECHECK 0x10
/* APPLY on a listener (of a policy whose values depend on the peer: its
 * own values off it, to val[] as UNDO does) */
#define BK_SWI_LISTEN 0x20
/* The caller only counts: the values in force afterwards and the record
 * are not read back (val[], rec_*: left as they were) */
#define BK_SWI_QUIET 0x40
/* UNDO: bit (BK_SWI_RESET_SHIFT + option index) asks to reset that option
 * to val[option index] */
#define BK_SWI_RESET_SHIFT 16
/* bk_sweep.result */
#define BK_SWR_SEEN 0x1	      /* the iterator found the socket */
#define BK_SWR_APP_OWN 0x2    /* set mode: the program's own values kept */
#define BK_SWR_NO_POLICY 0x4  /* the owner has no active policy */
#define BK_SWR_NO_STORAGE 0x8 /* no room for the socket's record */
#define BK_SWR_CURRENT 0x10   /* already carried this policy: untouched */
#define BK_SWR_EXEMPT 0x20    /* its peer is exempt: left as it is */

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
	__u8 peer[16];		/* in: the peer's address (IPv4 mapped), whose
				 * peer rule applies */
	__u16 port;		/* in: the peer's port */
	__u16 rule;		/* out: 1 if a peer rule applied (0: the
				 * policy's own values) */
	__u32 pad;
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
#define BK_MAX_LOSS_KEYS 65536
#define BK_MAX_SWEEP 131072 /* sockets per sweep batch */

/* Enforce mode past the cgroup hook. */
#include "bypass.h"

#endif /* BPFKEEP_H */
