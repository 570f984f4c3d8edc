/* SPDX-License-Identifier: MIT */
/*
 * The shim's own peer-rule code (preload/policy.c and peers.c compiled in,
 * not a copy) on the environment, for tests/test_preload.py to compare
 * with bpfkeep/peers.py:
 *
 *   peermatch rules      one line per rule the shim kept, in order:
 *                        "exempt" or "KEY=VALUE ... mode=set|enforce"
 *                        (user_timeout -1: derived per socket)
 *   peermatch match      for each "ADDRESS PORT" line on stdin, one line:
 *                        the rule number (from 1; 0: the policy's own)
 */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "peers.h"

/* libbpfkeep.c's, which this harness does not link. */
int bk_real_setsockopt(int fd, int level, int optname, const void *optval,
		       socklen_t optlen)
{
	return setsockopt(fd, level, optname, optval, optlen);
}

static const char *const keys[BK_NOPT] = {
	[BK_OPT_KEEPALIVE] = "keepalive",
	[BK_OPT_KEEPIDLE] = "keepidle",
	[BK_OPT_KEEPINTVL] = "keepintvl",
	[BK_OPT_KEEPCNT] = "keepcnt",
	[BK_OPT_USER_TIMEOUT] = "user_timeout",
	[BK_OPT_SYNCNT] = "syncnt",
	[BK_OPT_MAXSEG] = "maxseg",
	[BK_OPT_WINDOW_CLAMP] = "window_clamp",
	[BK_OPT_DEFER_ACCEPT] = "defer_accept",
};

static struct bk_shim_policy policy; /* 20 kB: not on the stack */

static void rules(void)
{
	for (unsigned i = 0; i < policy.peers.nrules; i++) {
		const struct bk_peer_rule *r = &policy.peers.rules[i];

		if (r->exempt) {
			printf("exempt\n");
			continue;
		}
		for (int id = 0; id < BK_NOPT; id++)
			if (id != BK_OPT_KEEPALIVE && id != BK_OPT_DEFER_ACCEPT)
				printf("%s=%d ", keys[id], r->values.value[id]);
		printf("mode=%s\n", r->values.enforce ? "enforce" : "set");
	}
}

static int match(void)
{
	char line[256], host[128];
	unsigned char addr[16];
	unsigned port;

	while (fgets(line, sizeof(line), stdin)) {
		if (sscanf(line, "%127s %u", host, &port) != 2)
			return 2;
		if (inet_pton(AF_INET, host, addr + 12) == 1) {
			memset(addr, 0, 10);
			addr[10] = addr[11] = 0xff;
		} else if (inet_pton(AF_INET6, host, addr) != 1) {
			fprintf(stderr, "peermatch: bad address %s\n", host);
			return 2;
		}
		printf("%u\n", bk_peer_match(&policy.peers, addr, port));
	}
	return 0;
}

int main(int argc, char **argv)
{
	bk_shim_policy_load(&policy);
	if (argc == 2 && !strcmp(argv[1], "rules")) {
		rules();
		return 0;
	}
	if (argc == 2 && !strcmp(argv[1], "match"))
		return match();
	fprintf(stderr, "usage: peermatch rules|match\n");
	return 2;
}
