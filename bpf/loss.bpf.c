// SPDX-License-Identifier: GPL-2.0
/*
 * Lost connections: when the kernel ends a TCP connection in error, which
 * policy's it was, which peer rule it fell under, why it was lost and how
 * long it had been idle.
 *
 * The hook is the raw tracepoint inet_sk_error_report: the kernel reports
 * there every error that ends a connection a program still holds -- a RST
 * received (tcp_reset), keepalive probes unanswered, data unacknowledged
 * past the user timeout or the retry limit (tcp_write_err) -- after
 * setting sk_err, purging the write queue and moving to TCP_CLOSE
 * (tcp_done_with_error; Linux 6.10, and the stable kernels it was
 * backported to, 6.1 and 5.15 among them).  It runs on errors only, so a
 * healthy connection pays nothing, and no other tool's program can turn it
 * off (a sock_ops state callback depends on callback flags any program may
 * overwrite).  What is no loss: a close the program chose -- a FIN is
 * reported nowhere; an abortive close (SO_LINGER 0, tcp_disconnect) is
 * reported with ECONNRESET, but on a socket already cleared (no round-trip
 * time, no peer port) -- and a connection aborted on this host (ss -K:
 * SOCK_DESTROY, bpf_sock_destroy; tcp_abort, ECONNABORTED): nothing on
 * the path ended it.
 *
 * The socket is read at the running kernel's offsets, given at compile
 * time from its BTF (bpfkeep/progs/loader.py, BK_O_* macros): bcc applies
 * no CO-RE relocation, and the distro header set it compiles against has
 * other offsets.  Without BTF this file compiles to nothing.
 */
#ifdef BK_BTF

#define BK_AF_INET 2
#define BK_ECONNABORTED 103
#define BK_ECONNREFUSED 111
#define BK_ECONNRESET 104
#define BK_EPIPE 32
/* Policies are looked for this many cgroup levels up from the socket's. */
#define BK_LOSS_LEVELS 32

#define BK_READ(dst, base, off)                                                \
	bpf_probe_read_kernel(&(dst), sizeof(dst), (void *)(base) + (off))

/* The deepest cgroup at or above ``cg`` with an active bpfkeep policy: the
 * socket's owner, as its sock_ops programs decide it. */
static __always_inline struct bk_policy *bk_owner_of(void *cg)
{
	int level = 0, i;

	if (!cg || BK_READ(level, cg, BK_O_CG_LEVEL))
		return 0;
#pragma unroll
	for (i = 0; i < BK_LOSS_LEVELS; i++) {
		int at = level - i;
		struct bk_policy *p;
		__u64 id = 0;

		if (at < 0)
			break;
#ifdef BK_O_CG_ANCESTOR_IDS
		if (BK_READ(id, cg, BK_O_CG_ANCESTOR_IDS + at * 8))
			break;
#else
		void *anc = 0, *kn = 0;

		if (BK_READ(anc, cg, BK_O_CG_ANCESTORS + at * 8) || !anc ||
		    BK_READ(kn, anc, BK_O_CG_KN) || !kn ||
		    BK_READ(id, kn, BK_O_KN_ID))
			break;
#endif
		p = bk_policies.lookup(&id);
		if (p && (p->flags & BK_F_ACTIVE))
			return p;
	}
	return 0;
}

/* jiffies -> ms: HZ from bk_config (userspace reads it at load). */
static __always_inline __u32 bk_ms(__u32 jiffies, __u32 hz)
{
	return hz ? (__u32)((__u64)jiffies * 1000 / hz) : 0;
}

/* b - a when b is after a (u32 jiffies, wrapping); else 0 */
static __always_inline __u32 bk_since(__u32 a, __u32 b)
{
	return (__s32)(b - a) > 0 ? b - a : 0;
}

/* When the data still unacknowledged went out, in jiffies.  Not lsndtime:
 * every retransmit moves it, so a connection lost at its user timeout or
 * retry limit would count the retransmitting as idle (minutes, with the
 * kernel's limit).  first_tx_mstamp is the send time (us, the TCP clock:
 * CLOCK_MONOTONIC, as bpf_ktime_get_ns) of what left an empty pipe, moved
 * on by each ACK to the send time of what it acknowledged; retransmits
 * leave it (tcp_rate_skb_sent, tcp_rate_skb_delivered).  Without HZ or a
 * stamp: lsndtime. */
static __always_inline __u32 bk_went_out(__u32 lsnd, __u64 first_tx_us,
					 __u32 now, __u32 hz)
{
	__u64 now_us = bpf_ktime_get_ns() / 1000;

	if (!hz || !first_tx_us)
		return lsnd;
	if (first_tx_us >= now_us) /* a paced departure: just now */
		return now;
	return now - (__u32)((now_us - first_tx_us) * hz / 1000000);
}

int bk_loss(struct bpf_raw_tracepoint_args *ctx)
{
	void *sk = (void *)ctx->args[0];
	struct bk_loss_event ev = {};
	struct bk_loss_key key = {};
	struct bk_losses zero = {}, *st;
	struct bk_config *cfg;
	struct bk_policy *p;
	__u32 snd_una = 0, write_seq = 0, srtt = 0, lsnd = 0, rcvts = 0;
	__u32 lrcv = 0, ut = 0, ka = 0, now, data_idle, path_idle, hz = 0, sent;
	__u64 first_tx = 0;
	__u16 proto = 0, family = 0, dport = 0;
	__u8 probes = 0;
	void *cg = 0;
	int err = 0, idx = 0, i, zero_idx = 0;

	if (BK_READ(proto, sk, BK_O_SK_PROTOCOL) || proto != IPPROTO_TCP)
		return 0;
	if (BK_READ(err, sk, BK_O_SK_ERR) || err == BK_ECONNREFUSED)
		return 0; /* a connect() refused: never established */
	if (err == BK_ECONNABORTED)
		return 0; /* aborted on this host, not lost on the path */
	/* A RST in CLOSE_WAIT (EPIPE): the peer had closed the connection
	 * (FIN) and our data after that was refused -- the peer's choice, not
	 * a loss, and no evidence of the path forgetting anything. */
	if (err == BK_EPIPE)
		return 0;
	if (BK_READ(srtt, sk, BK_O_TP_SRTT_US) || !srtt)
		return 0; /* no round trip measured: never established, or
			   * cleared by the program's abortive close */
	if (BK_READ(cg, sk, BK_O_SK_CGROUP))
		return 0;
	p = bk_owner_of(cg);
	if (!p)
		return 0; /* not under a bpfkeep policy */

	BK_READ(family, sk, BK_O_SK_FAMILY);
	BK_READ(dport, sk, BK_O_SK_DPORT);
	ev.port = __builtin_bswap16(dport);
	if (family == BK_AF_INET) {
		ev.addr[10] = 0xff;
		ev.addr[11] = 0xff;
		BK_READ(*(__u32 *)&ev.addr[12], sk, BK_O_SK_DADDR);
	} else {
		BK_READ(ev.addr, sk, BK_O_SK_V6_DADDR);
	}
	key.owner = p->cgroup_id;
	key.tag = bk_rule_tag(p->peers, ev.addr, ev.port);

	BK_READ(snd_una, sk, BK_O_TP_SND_UNA);
	BK_READ(write_seq, sk, BK_O_TP_WRITE_SEQ);
	BK_READ(lsnd, sk, BK_O_TP_LSNDTIME);
	BK_READ(first_tx, sk, BK_O_TP_FIRST_TX_MSTAMP);
	BK_READ(rcvts, sk, BK_O_TP_RCV_TSTAMP);
	BK_READ(lrcv, sk, BK_O_TP_LRCVTIME);
	BK_READ(ut, sk, BK_O_TP_USER_TIMEOUT);
	BK_READ(ka, sk, BK_O_TP_KEEPALIVE_TIME);
	BK_READ(probes, sk, BK_O_TP_PROBES_OUT);
	now = (__u32)bpf_jiffies64();
	cfg = bk_config.lookup(&zero_idx);
	if (cfg)
		hz = cfg->hz;

	/* Why.  After tcp_done_with_error the write queue is purged, but what
	 * was written and not acknowledged still shows: write_seq past
	 * snd_una.  Nothing outstanding: the keepalive timer ended it (it
	 * probes only then).  Something outstanding: the retransmit (or
	 * zero-window probe) timer, bounded by the user timeout if one is set,
	 * else by the kernel's retry limit. */
	if (err == BK_ECONNRESET)
		ev.reason = BK_LOSS_RESET;
	else if (write_seq == snd_una)
		ev.reason = BK_LOSS_KEEPALIVE;
	else if (ut)
		ev.reason = BK_LOSS_USER_TIMEOUT;
	else
		ev.reason = BK_LOSS_RETRANSMITS;

	/* How long idle.  With data outstanding, the idle time is the one
	 * before that data went out (bk_went_out), since the last data
	 * received (icsk_ack.lrcvtime); else until now.  The path's idle time
	 * counts from the last ACK heard (rcv_tstamp: keepalive probes
	 * answered count, as they do for a middlebox). */
	if (write_seq != snd_una) {
		sent = bk_went_out(lsnd, first_tx, now, hz);
		data_idle = bk_since(lrcv, sent);
		path_idle = bk_since(rcvts, sent);
	} else {
		data_idle =
			bk_since((__s32)(lsnd - lrcv) > 0 ? lsnd : lrcv, now);
		path_idle = bk_since(rcvts, now);
	}
	ev.idle_ms = bk_ms(data_idle, hz);
	ev.path_idle_ms = bk_ms(path_idle, hz);
	ev.keepidle = hz ? ka / hz : 0;
	/* Did the peer's RST, or its silence, answer something we sent? */
	ev.unacked = write_seq != snd_una;
	ev.probes = probes;
	ev.owner = key.owner;
	ev.tag = key.tag;

	st = bk_losses.lookup(&key);
	if (!st) {
		bk_losses.update(&key, &zero);
		st = bk_losses.lookup(&key);
		if (!st)
			return 0;
	}
	__sync_fetch_and_add(&st->lost[ev.reason & (BK_NLOSS - 1)], 1);
	idx = BK_NIDLE - 1;
	if (cfg) {
		idx = cfg->nidle < BK_NIDLE ? cfg->nidle : BK_NIDLE - 1;
#pragma unroll
		for (i = 0; i < BK_NIDLE - 1; i++) {
			if (i < cfg->nidle &&
			    ev.idle_ms <= cfg->idle_le_ms[i]) {
				idx = i;
				break;
			}
		}
	}
	__sync_fetch_and_add(&st->idle[idx & (BK_NIDLE - 1)], 1);
	__sync_fetch_and_add(&st->idle_ms, ev.idle_ms);
	bk_loss_events.ringbuf_output(&ev, sizeof(ev), 0);
	return 0;
}

#endif /* BK_BTF */
