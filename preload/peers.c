/* SPDX-License-Identifier: MIT */
/*
 * libbpfkeep's peer rules: BPFKEEP_PEERS, parsed once at load, and the
 * rule that applies to a peer.
 *
 *   BPFKEEP_PEERS = ITEM *(";" ITEM)       empty items are skipped
 *   ITEM   = ADDRS *("," FIELD)
 *   ADDRS  = ADDR *("|" ADDR)              one rule's networks
 *   ADDR   = IPV4 ["/" 0..32] | IPV6 ["/" 0..128]
 *   FIELD  = "exempt" | "port=" PORT ["-" PORT] | "mode=" ("set"|"enforce")
 *          | "name=" LABEL | KEY "=" VALUE
 *
 * That is `--peer`'s syntax with addresses only: bpfkeep exec resolves a
 * host name before it starts the program and writes its addresses as
 * alternatives, keeping the name for debug lines (name=).  The shim never
 * resolves a name itself (no getaddrinfo inside connect()).  Blanks around
 * items, fields, '=' and '|' are ignored; anything else unexpected makes
 * the whole item ignored, with a debug line naming it: a rule is applied as
 * written or not at all.
 *
 * The choice is bpfkeep/peers.py's match over flatten, which the kernel
 * also makes: the longest prefix containing the peer, then a rule with
 * ports over one without, then the narrower port range, then the first
 * written.  Here it is a scan of at most BK_PEER_MAX_NETS networks, made
 * only when rules are set.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "peers.h"

#define SHOWN 160 /* bytes of an item quoted in a debug line */

struct span {
	const char *s;
	size_t n;
};

/* What is left to split; more: a separator ended the last piece, so one
 * more (maybe empty) piece follows. */
struct cursor {
	const char *s;
	size_t n;
	bool more;
};

static bool is_blank(char c)
{
	return c == ' ' || c == '\t';
}

static struct span trim(const char *s, size_t n)
{
	while (n && is_blank(*s)) {
		s++;
		n--;
	}
	while (n && is_blank(s[n - 1]))
		n--;
	return (struct span){s, n};
}

/* The next piece up to sep, trimmed; false when none is left. */
static bool split(struct cursor *c, char sep, struct span *out)
{
	const char *end;
	size_t n;

	if (!c->more)
		return false;
	end = memchr(c->s, sep, c->n);
	n = end ? (size_t)(end - c->s) : c->n;
	*out = trim(c->s, n);
	c->more = end != NULL;
	c->s += end ? n + 1 : n;
	c->n -= end ? n + 1 : n;
	return true;
}

static bool span_is(struct span f, const char *word)
{
	return f.n == strlen(word) && !memcmp(f.s, word, f.n);
}

/* ASCII digits only, at most maxdigits of them. */
static bool span_uint(struct span f, size_t maxdigits, unsigned long *out)
{
	unsigned long v = 0;

	if (!f.n || f.n > maxdigits)
		return false;
	for (size_t i = 0; i < f.n; i++) {
		if (f.s[i] < '0' || f.s[i] > '9')
			return false;
		v = v * 10 + (unsigned long)(f.s[i] - '0');
	}
	*out = v;
	return true;
}

static int shown_len(struct span f)
{
	return (int)(f.n > SHOWN ? SHOWN : f.n);
}

/* A name rather than a malformed address: letters and no colon. */
static bool looks_like_name(const char *s)
{
	bool letter = false;

	for (; *s; s++) {
		if (*s == ':')
			return false;
		if ((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z'))
			letter = true;
	}
	return letter;
}

static void mask(unsigned char *addr, unsigned prefixlen)
{
	for (unsigned i = 0; i < 16; i++) {
		unsigned keep = prefixlen > 8 * i ? prefixlen - 8 * i : 0;

		if (keep < 8)
			addr[i] &= (unsigned char)(0xff00u >> keep);
	}
}

static void map_v4(unsigned char *addr, const void *v4)
{
	memset(addr, 0, 10);
	addr[10] = addr[11] = 0xff;
	memcpy(addr + 12, v4, 4);
}

/* ADDR: an IPv4 or IPv6 address, maybe with a prefix length; host bits
 * are cleared (10.1.2.3/8 is 10.0.0.0/8, as in peers.py). */
static bool parse_net(struct span a, struct bk_peer_net *net, char *why,
		      size_t whylen)
{
	char buf[INET6_ADDRSTRLEN + 1];
	const char *slash = memchr(a.s, '/', a.n);
	size_t alen = slash ? (size_t)(slash - a.s) : a.n;
	unsigned char v4[4];
	unsigned long plen;
	unsigned max, base;

	if (!alen || alen >= sizeof(buf)) {
		(void)snprintf(why, whylen, "\"%.*s\" is not an address",
			       shown_len(a), a.s);
		return false;
	}
	memcpy(buf, a.s, alen);
	buf[alen] = '\0';
	if (inet_pton(AF_INET, buf, v4) == 1) {
		map_v4(net->addr, v4);
		max = 32;
		base = 96;
	} else if (inet_pton(AF_INET6, buf, net->addr) == 1) {
		max = 128;
		base = 0;
	} else if (looks_like_name(buf)) {
		(void)snprintf(why, whylen,
			       "\"%s\" is a host name: the shim resolves none "
			       "(bpfkeep exec --peer does, before the program "
			       "starts)",
			       buf);
		return false;
	} else {
		(void)snprintf(why, whylen,
			       "\"%s\" is not an IPv4 or IPv6 address", buf);
		return false;
	}
	plen = max;
	if (slash &&
	    (!span_uint((struct span){slash + 1, a.n - alen - 1}, 3, &plen) ||
	     plen > max)) {
		(void)snprintf(why, whylen,
			       "\"%.*s\": the prefix length is not 0..%u",
			       shown_len(a), a.s, max);
		return false;
	}
	net->prefixlen = (unsigned char)(base + plen);
	mask(net->addr, net->prefixlen);
	return true;
}

/* port=P or port=LO-HI, 1..65535. */
static bool parse_ports(struct span v, struct bk_peer_rule *r)
{
	const char *dash = memchr(v.s, '-', v.n);
	unsigned long lo, hi;

	if (dash) {
		size_t n = (size_t)(dash - v.s);

		if (!span_uint(trim(v.s, n), 5, &lo) ||
		    !span_uint(trim(dash + 1, v.n - n - 1), 5, &hi))
			return false;
	} else {
		if (!span_uint(v, 5, &lo))
			return false;
		hi = lo;
	}
	if (lo < 1 || lo > hi || hi > 65535)
		return false;
	r->ported = true;
	r->lo = (unsigned short)lo;
	r->hi = (unsigned short)hi;
	return true;
}

static void set_label(struct bk_peer_rule *r, struct span text)
{
	if (text.n < sizeof(r->label)) {
		memcpy(r->label, text.s, text.n);
		r->label[text.n] = '\0';
	} else {
		(void)snprintf(r->label, sizeof(r->label), "%.*s...",
			       (int)sizeof(r->label) - 4, text.s);
	}
}

/* ADDRS into nets (room of them). */
static bool parse_addrs(struct span addrs, struct bk_peer_net *nets,
			unsigned room, unsigned *n, char *why, size_t whylen)
{
	struct cursor c = {addrs.s, addrs.n, true};
	struct span a;

	*n = 0;
	while (split(&c, '|', &a)) {
		if (!a.n) {
			(void)snprintf(why, whylen, "an empty address");
			return false;
		}
		if (*n == room) {
			(void)snprintf(why, whylen,
				       "more than %d addresses in all rules",
				       BK_PEER_MAX_NETS);
			return false;
		}
		if (!parse_net(a, &nets[*n], why, whylen))
			return false;
		(*n)++;
	}
	return true;
}

/* One FIELD into r.  seen: the fields given so far (bits: the option ids,
 * then the words below), each at most once. */
enum { SEEN_EXEMPT = BK_NOPT, SEEN_PORT, SEEN_NAME, SEEN_MODE };

static bool parse_field(struct span f, struct bk_peer_rule *r,
			unsigned long *seen, char *why, size_t whylen)
{
	const char *eq = memchr(f.s, '=', f.n);
	struct span key = f, val;
	int bit;

	if (span_is(f, "exempt")) {
		bit = SEEN_EXEMPT;
		r->exempt = true;
	} else if (!eq) {
		(void)snprintf(why, whylen,
			       "\"%.*s\" is not KEY=VALUE or exempt",
			       shown_len(f), f.s);
		return false;
	} else {
		key = trim(f.s, (size_t)(eq - f.s));
		val = trim(eq + 1, (size_t)(f.s + f.n - eq - 1));
		if (span_is(key, "port")) {
			bit = SEEN_PORT;
			if (!parse_ports(val, r)) {
				(void)snprintf(why, whylen,
					       "port \"%.*s\" is not a port "
					       "1..65535 or a range LO-HI",
					       shown_len(val), val.s);
				return false;
			}
		} else if (span_is(key, "name")) {
			bit = SEEN_NAME;
			if (!val.n) {
				(void)snprintf(why, whylen, "an empty name");
				return false;
			}
			set_label(r, val);
		} else if (span_is(key, "mode")) {
			bit = SEEN_MODE;
			if (span_is(val, "enforce")) {
				r->values.enforce = true;
			} else if (span_is(val, "set")) {
				r->values.enforce = false;
			} else {
				(void)snprintf(why, whylen,
					       "mode \"%.*s\" is not set or "
					       "enforce",
					       shown_len(val), val.s);
				return false;
			}
		} else if (!bk_rule_option(&r->values, key.s, key.n, val.s,
					   val.n, &bit, why, whylen)) {
			return false;
		}
	}
	if (*seen & (1ul << bit)) {
		(void)snprintf(why, whylen, "\"%.*s\" given twice",
			       shown_len(key), key.s);
		return false;
	}
	*seen |= 1ul << bit;
	return true;
}

static bool parse_item(const struct bk_shim_policy *p, struct span item,
		       struct bk_peer_rule *r, struct bk_peer_net *nets,
		       unsigned room, unsigned *nnets, char *why, size_t whylen)
{
	struct cursor c = {item.s, item.n, true};
	unsigned long seen = 0;
	struct span addrs, f;

	memset(r, 0, sizeof(*r));
	r->values = p->own; /* its user timeout still -1 when derived */
	(void)split(&c, ',', &addrs);
	if (!parse_addrs(addrs, nets, room, nnets, why, whylen))
		return false;
	set_label(r, addrs);
	while (split(&c, ',', &f)) {
		if (!f.n) {
			(void)snprintf(why, whylen, "an empty field");
			return false;
		}
		if (!parse_field(f, r, &seen, why, whylen))
			return false;
	}
	if (r->exempt && (seen & ~((1ul << SEEN_EXEMPT) | (1ul << SEEN_PORT) |
				   (1ul << SEEN_NAME)))) {
		(void)snprintf(why, whylen,
			       "an exempt peer takes no values (its "
			       "connections are left as the program made "
			       "them)");
		return false;
	}
	if (r->exempt)
		memset(&r->values, 0, sizeof(r->values));
	else
		bk_values_resolve(&r->values);
	return true;
}

void bk_peers_load(struct bk_shim_policy *p, const char *raw)
{
	struct bk_peers *t = &p->peers;
	struct cursor c = {raw, strlen(raw), true};
	struct span item, first_over = {NULL, 0};
	unsigned over = 0;

	while (split(&c, ';', &item)) {
		struct bk_peer_rule r;
		char why[256];
		unsigned n;

		if (!item.n)
			continue;
		if (t->nrules == BK_PEER_MAX_RULES) {
			if (!over++)
				first_over = item;
			continue;
		}
		if (!parse_item(p, item, &r, t->nets + t->nnets,
				BK_PEER_MAX_NETS - t->nnets, &n, why,
				sizeof(why))) {
			bk_debug(p,
				 "BPFKEEP_PEERS item \"%.*s%s\": %s: ignored",
				 shown_len(item), item.s,
				 item.n > SHOWN ? "..." : "", why);
			continue;
		}
		for (unsigned k = 0; k < n; k++)
			t->nets[t->nnets + k].rule = (unsigned char)t->nrules;
		t->nnets += n;
		t->rules[t->nrules++] = r;
	}
	if (over)
		bk_debug(p,
			 "BPFKEEP_PEERS: more than %d rules: the %u item(s) "
			 "from \"%.*s%s\" on are ignored",
			 BK_PEER_MAX_RULES, over, shown_len(first_over),
			 first_over.s, first_over.n > SHOWN ? "..." : "");
}

static bool contains(const struct bk_peer_net *net, const unsigned char *addr)
{
	unsigned full = net->prefixlen / 8u, rest = net->prefixlen % 8u;

	if (memcmp(net->addr, addr, full))
		return false;
	return !rest || !((net->addr[full] ^ addr[full]) &
			  (unsigned char)(0xff00u >> rest));
}

/* Whether network a's rule is more specific than network b's (both
 * contain the peer, and both rules' ports take it). */
static bool better(const struct bk_peers *t, const struct bk_peer_net *a,
		   const struct bk_peer_net *b)
{
	const struct bk_peer_rule *ra = &t->rules[a->rule];
	const struct bk_peer_rule *rb = &t->rules[b->rule];

	if (a->prefixlen != b->prefixlen)
		return a->prefixlen > b->prefixlen;
	if (ra->ported != rb->ported)
		return ra->ported;
	if (ra->ported && ra->hi - ra->lo != rb->hi - rb->lo)
		return ra->hi - ra->lo < rb->hi - rb->lo;
	return a->rule < b->rule;
}

unsigned bk_peer_match(const struct bk_peers *t, const unsigned char *addr,
		       unsigned port)
{
	const struct bk_peer_net *best = NULL;

	for (unsigned i = 0; i < t->nnets; i++) {
		const struct bk_peer_net *net = &t->nets[i];
		const struct bk_peer_rule *r = &t->rules[net->rule];

		if (!contains(net, addr))
			continue;
		if (r->ported && (port < r->lo || port > r->hi))
			continue;
		if (!best || better(t, net, best))
			best = net;
	}
	return best ? best->rule + 1u : 0;
}

/* An AF_INET or AF_INET6 socket address (len bytes of it) as a mapped
 * address and a port.  The kernel's own minimum lengths: a whole
 * sockaddr_in; sockaddr_in6 without its scope id (SIN6_LEN_RFC2133). */
static bool peer_of_sockaddr(const void *sa, size_t len, unsigned char *addr,
			     unsigned *port)
{
	sa_family_t family;

	if (len < sizeof(family))
		return false;
	memcpy(&family, sa, sizeof(family));
	if (family == AF_INET && len >= sizeof(struct sockaddr_in)) {
		struct sockaddr_in a;

		memcpy(&a, sa, sizeof(a));
		map_v4(addr, &a.sin_addr);
		*port = ntohs(a.sin_port);
		return true;
	}
	if (family == AF_INET6 &&
	    len >= offsetof(struct sockaddr_in6, sin6_scope_id)) {
		struct sockaddr_in6 a;

		memcpy(&a, sa, offsetof(struct sockaddr_in6, sin6_scope_id));
		memcpy(addr, &a.sin6_addr, 16);
		*port = ntohs(a.sin6_port);
		return true;
	}
	return false;
}

static void show_addr(const unsigned char *addr, char *buf, size_t len)
{
	static const unsigned char v4mapped[12] = {0, 0, 0, 0, 0,    0,
						   0, 0, 0, 0, 0xff, 0xff};

	if (!memcmp(addr, v4mapped, sizeof(v4mapped)))
		(void)inet_ntop(AF_INET, addr + 12, buf, (socklen_t)len);
	else
		(void)inet_ntop(AF_INET6, addr, buf, (socklen_t)len);
}

/* The rule for the peer, as values; a debug line (call: the caller's name,
 * NULL for none). */
static const struct bk_values *decide(const struct bk_shim_policy *p, int fd,
				      const char *call,
				      const unsigned char *addr, unsigned port)
{
	unsigned n = bk_peer_match(&p->peers, addr, port);
	const struct bk_peer_rule *r = n ? &p->peers.rules[n - 1] : NULL;

	if (p->debug && call) {
		char shown[INET6_ADDRSTRLEN], ports[24] = "";

		show_addr(addr, shown, sizeof(shown));
		if (r && r->ported && r->lo == r->hi)
			(void)snprintf(ports, sizeof(ports), " port %u", r->lo);
		else if (r && r->ported)
			(void)snprintf(ports, sizeof(ports), " port %u-%u",
				       r->lo, r->hi);
		if (r)
			bk_debug(p,
				 "%s(%d): peer %s port %u: peer rule %u "
				 "(%s%s)%s",
				 call, fd, shown, port, n, r->label, ports,
				 r->exempt ? ": exempt, left as the program "
					     "made it"
					   : "");
		else
			bk_debug(p,
				 "%s(%d): peer %s port %u: no peer rule: the "
				 "policy's values",
				 call, fd, shown, port);
	}
	if (!r)
		return &p->own;
	return r->exempt ? NULL : &r->values;
}

const struct bk_values *bk_values_to(const struct bk_shim_policy *p, int fd,
				     const char *call,
				     const struct sockaddr *addr, socklen_t len)
{
	struct sockaddr_in6 buf; /* the larger of sockaddr_in and _in6 */
	size_t n = len < sizeof(buf) ? len : sizeof(buf);
	unsigned char peer[16];
	unsigned port;

	if (!addr || !bk_read_app(addr, &buf, n) ||
	    !peer_of_sockaddr(&buf, n, peer, &port)) {
		bk_debug(p,
			 "%s(%d): no IPv4 or IPv6 address could be read: the "
			 "policy's values",
			 call, fd);
		return &p->own;
	}
	return decide(p, fd, call, peer, port);
}

const struct bk_values *bk_values_to_msg(const struct bk_shim_policy *p, int fd,
					 const struct msghdr *msg)
{
	struct msghdr m;

	if (!msg || !bk_read_app(msg, &m, sizeof(m)))
		m.msg_name = NULL;
	return bk_values_to(p, fd, "sendmsg", m.msg_name,
			    m.msg_name ? m.msg_namelen : 0);
}

/* fd's peer from the kernel.  getpeername() refuses while the socket is
 * still connecting (SYN_SENT); SO_PEERNAME answers then (inet_getname with
 * peer == 2), but only into a buffer no larger than the address (EINVAL
 * otherwise): sockaddr_in first, sockaddr_in6 when that says AF_INET6. */
static bool peer_of_fd(int fd, unsigned char *addr, unsigned *port)
{
	struct sockaddr_in6 sa;
	socklen_t len = sizeof(sa);

	if (getpeername(fd, (struct sockaddr *)&sa, &len) == 0)
		return peer_of_sockaddr(
			&sa, len < sizeof(sa) ? len : sizeof(sa), addr, port);
	if (errno != ENOTCONN)
		return false;
	len = sizeof(struct sockaddr_in);
	if (getsockopt(fd, SOL_SOCKET, SO_PEERNAME, &sa, &len))
		return false;
	if (sa.sin6_family == AF_INET6) {
		len = sizeof(sa);
		if (getsockopt(fd, SOL_SOCKET, SO_PEERNAME, &sa, &len))
			return false;
	}
	return peer_of_sockaddr(&sa, len, addr, port);
}

const struct bk_values *bk_values_of(const struct bk_shim_policy *p, int fd,
				     const char *call, bool *known)
{
	unsigned char peer[16];
	unsigned port;

	*known = peer_of_fd(fd, peer, &port);
	if (!*known) {
		if (call)
			bk_debug(p,
				 "%s(%d): no peer address: the policy's values",
				 call, fd);
		return &p->own;
	}
	return decide(p, fd, call, peer, port);
}
