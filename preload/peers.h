/* SPDX-License-Identifier: MIT */
/*
 * Peer rules in libbpfkeep: BPFKEEP_PEERS parsed once, and the rule for a
 * peer's address and port -- the same choice as bpfkeep/peers.py's match
 * over flatten, and as the kernel's.  Hidden, like all of policy.h.
 */
#ifndef BPFKEEP_PRELOAD_PEERS_H
#define BPFKEEP_PRELOAD_PEERS_H

#include <stdbool.h>
#include <sys/socket.h>

#include "policy.h"

/* Fill p->peers from raw (BPFKEEP_PEERS), every rule starting from
 * p->own (whose user timeout is still -1 when it is derived: a rule that
 * does not give one derives its own).  Bad items are ignored, each with a
 * debug line; host names are never resolved. */
void bk_peers_load(struct bk_shim_policy *p, const char *raw);

/* The rule for a peer at addr (16 bytes, IPv4 mapped as ::ffff:a.b.c.d)
 * and port: its number, from 1 in the order written; 0 when none applies
 * (the policy's own values).  The longest prefix wins, then a rule with
 * ports over one without, then the narrower port range, then the first
 * written. */
unsigned bk_peer_match(const struct bk_peers *t, const unsigned char *addr,
		       unsigned port);

/* The values for a connection fd makes to the address the application
 * passed to call (connect, sendto: addr and len, its memory, read without
 * faulting; sendmsg: msg->msg_name): a rule's, the policy's own (no rule,
 * or the address cannot be read), or NULL for an exempt peer.  A debug
 * line says which. */
const struct bk_values *bk_values_to(const struct bk_shim_policy *p, int fd,
				     const char *call,
				     const struct sockaddr *addr,
				     socklen_t len);
const struct bk_values *bk_values_to_msg(const struct bk_shim_policy *p, int fd,
					 const struct msghdr *msg);

/* The values for fd's peer as the kernel knows it (getpeername, or
 * SO_PEERNAME while it is still connecting); NULL for an exempt peer.
 * *known is false when fd has no peer yet: the policy's own values are
 * returned then.  call: the debug line's name for the caller (NULL: no
 * line). */
const struct bk_values *bk_values_of(const struct bk_shim_policy *p, int fd,
				     const char *call, bool *known);

#endif /* BPFKEEP_PRELOAD_PEERS_H */
