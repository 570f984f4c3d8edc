// SPDX-License-Identifier: GPL-2.0
/*
 * What each piece of a keepalive sock_ops program costs a connection: one
 * program, compiled once per piece list (bench/parts.py passes -DBK_PARTS).
 * Keepalive is set on the client at CONNECT and on the listener at LISTEN
 * (accepted sockets inherit it), as bpfkeep does; no policy lookup, no
 * counters: only the kernel work each piece asks for.
 */
#include <uapi/linux/bpf.h>

#define BK_P_KEEPALIVE 0x1 /* SO_KEEPALIVE */
#define BK_P_FOUR 0x2	 /* TCP_KEEPIDLE, _KEEPINTVL, _KEEPCNT, _USER_TIMEOUT */
#define BK_P_GETKA 0x4	 /* accept: bpf_getsockopt(SO_KEEPALIVE) */
#define BK_P_LOOKUP 0x8	 /* connect, accept: socket storage lookup */
#define BK_P_CREATE 0x10 /* connect: socket storage created */
#define BK_P_CLONE 0x20	 /* listen: storage created, cloned to each child */

#ifndef BK_PARTS
#define BK_PARTS 0
#endif

struct bk_rec {
	__u64 owner;
	__u32 gen;
	__u16 level;
	__u16 app;
};

#define BK_SK_STORAGE(_name, _flags)                                           \
	struct _name##_table_t {                                               \
		int key;                                                       \
		struct bk_rec leaf;                                            \
		void *(*sk_storage_get)(void *, void *, int);                  \
		int (*sk_storage_delete)(void *);                              \
		u32 flags;                                                     \
	};                                                                     \
	__attribute__((                                                        \
		section("maps/sk_storage"))) struct _name##_table_t _name = {  \
		.flags = (_flags)};                                            \
	BPF_ANNOTATE_KV_PAIR(_name, int, struct bk_rec)

BK_SK_STORAGE(bk_rec, BPF_F_NO_PREALLOC);
BK_SK_STORAGE(bk_recc, BPF_F_NO_PREALLOC | BPF_F_CLONE);

#define SET(ops, level, name, val)                                             \
	do {                                                                   \
		int v_ = (val);                                                \
		bpf_setsockopt(ops, level, name, &v_, sizeof(v_));             \
	} while (0)

int bk_parts(struct bpf_sock_ops *ops)
{
	struct bpf_sock *sk;
	struct bk_rec *r;
	int on = 0;

	switch (ops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		if (!ops->is_fullsock)
			return 1;
		sk = ops->sk;
		if (!sk)
			return 1;
		if ((BK_PARTS & BK_P_LOOKUP) &&
		    ops->op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
			r = bk_rec.sk_storage_get(sk, 0, 0);
			if (r)
				r->app = 0;
		}
		if ((BK_PARTS & BK_P_CREATE) &&
		    ops->op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
			r = bk_rec.sk_storage_get(sk, 0,
						  BPF_SK_STORAGE_GET_F_CREATE);
			if (r)
				r->gen = 1;
		}
		if ((BK_PARTS & BK_P_CLONE) &&
		    ops->op == BPF_SOCK_OPS_TCP_LISTEN_CB) {
			r = bk_recc.sk_storage_get(sk, 0,
						   BPF_SK_STORAGE_GET_F_CREATE);
			if (r)
				r->gen = 1;
		}
		if (BK_PARTS & BK_P_FOUR) {
			SET(ops, 6, 4, 15);	 /* TCP_KEEPIDLE */
			SET(ops, 6, 5, 15);	 /* TCP_KEEPINTVL */
			SET(ops, 6, 6, 9);	 /* TCP_KEEPCNT */
			SET(ops, 6, 18, 150000); /* TCP_USER_TIMEOUT */
		}
		if (BK_PARTS & BK_P_KEEPALIVE)
			SET(ops, 1, 9, 1); /* SO_KEEPALIVE */
		return 1;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		if (!ops->is_fullsock)
			return 1;
		sk = ops->sk;
		if (!sk)
			return 1;
		if (BK_PARTS & BK_P_LOOKUP) {
			r = bk_rec.sk_storage_get(sk, 0, 0);
			if (r)
				r->app = 0;
		}
		if (BK_PARTS & BK_P_GETKA)
			bpf_getsockopt(ops, 1, 9, &on, sizeof(on));
		return 1;
	}
	return 1;
}
