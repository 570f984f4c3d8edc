"""Peer rules: what a policy gives the connections to some peers.

What kills an idle connection is the path to its peer (a NAT gateway, a
load balancer, a firewall), so a policy can say, per peer: other values,
or nothing at all (exempt).  A rule names the peer by a CIDR (IPv4 or
IPv6), one address, or a host name, optionally with a port or a port
range; keys it does not give come from the policy.

The peer is the other end: the server of an outgoing connection, the
client of an accepted one.  The most specific rule wins: the longest
prefix, then a port over no port (then the narrower port range, then the
first written).  IPv4 addresses are looked up as IPv4-mapped IPv6
(``::ffff:a.b.c.d``), so an IPv4 rule also matches an IPv6 socket talking
to an IPv4 peer -- and an IPv6 rule that contains ``::ffff:0:0/96``
(``::/0``) matches IPv4 peers too.

The rules are flattened once per policy into what the kernel looks up (an
LPM trie: prefix -> the port ranges that apply there, each naming a rule),
and the same flattened table answers ``match`` here: the kernel, the sweep
and the audit agree by construction.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping

from bpfkeep.errors import UsageError
from bpfkeep.options import BY_KEY, LEARNING_KEYS, Policy, show_value

# Port-specific rules that may apply at one address, nested prefixes
# included: the kernel scans this many entries (BK_PEER_PORTS in bpfkeep.h).
MAX_PORT_RULES = 8
MAX_RULES = 1000  # peer rules per policy
HOST_TTL = 60.0  # seconds: host names are resolved again this often
_HOST = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
# Keys of a peer rule besides the policy's option keys.
RULE_KEYS = ("address", "port", "exempt", "mode", *LEARNING_KEYS)
V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")

Network = ipaddress.IPv6Network


@dataclasses.dataclass(frozen=True)
class Peer:
    """One peer rule of a policy."""

    address: str  # as written: a CIDR, an address or a host name
    ports: tuple[int, int] | None = None  # inclusive range; None: every port
    policy: Policy | None = None  # the values for these peers; None: exempt
    # Where the address leads: a CIDR or an address is itself; a host name
    # is resolved by the caller (resolve_names) -- () until then.
    networks: tuple[Network, ...] = ()

    @property
    def exempt(self) -> bool:
        return self.policy is None

    @property
    def is_name(self) -> bool:
        return parse_network(self.address) is None

    @property
    def label(self) -> str:
        """The rule's name in metrics and status: its address, and its
        ports when it has some (two rules of one address stay apart)."""
        if self.ports is None:
            return self.address
        lo, hi = self.ports
        return f"{self.address} port {lo}" if lo == hi else f"{self.address} port {lo}-{hi}"

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"address": self.address, "label": self.label}
        if self.ports is not None:
            lo, hi = self.ports
            d["port"] = lo if lo == hi else f"{lo}-{hi}"
        if self.policy is None:
            d["exempt"] = True
        else:
            d.update(self.policy.as_dict())
        d["networks"] = [show_network(n) for n in self.networks]
        return d


def show_network(net: Network) -> str:
    """A network as people write it: IPv4 ones as IPv4, one address bare."""
    shown: ipaddress.IPv4Network | ipaddress.IPv6Network = net
    if net.prefixlen >= 96 and net.subnet_of(V4_MAPPED):
        v4 = ipaddress.IPv4Address(int(net.network_address) & 0xFFFFFFFF)
        shown = ipaddress.IPv4Network(f"{v4}/{net.prefixlen - 96}")
    if shown.prefixlen == shown.max_prefixlen:
        return str(shown.network_address)
    return str(shown)


# -- parsing ---------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def parse_network(text: str) -> Network | None:
    """A CIDR or an address as the IPv6 network it is looked up as (IPv4
    mapped into ::ffff:0:0/96); None if ``text`` is neither.  (Kept: the
    daemon asks for each rule of each cgroup's policy, ~30 us a parse.)"""
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    if isinstance(net, ipaddress.IPv4Network):
        mapped = ipaddress.IPv6Address(int(V4_MAPPED.network_address) | int(net.network_address))
        return ipaddress.IPv6Network(f"{mapped}/{96 + net.prefixlen}")
    mapped4 = net.network_address.ipv4_mapped
    if mapped4 is not None and net.prefixlen >= 96:
        return net  # ::ffff:10.0.0.0/104 is 10.0.0.0/8
    return net


def check_address(raw: object) -> str:
    """A rule's ``address``: a CIDR, an address or a host name.  (Errors
    say what is wrong; the caller says where.)"""
    if not isinstance(raw, str) or not raw.strip():
        raise UsageError(
            'expected a CIDR, an address or a host name, e.g. "10.20.0.0/16", '
            f"got {show_value(raw)}"
        )
    text = raw.strip()
    if parse_network(text) is not None:
        return text
    if "/" in text or ":" in text or not _HOST.fullmatch(text) or text.replace(".", "").isdigit():
        raise UsageError(
            f"{show_value(raw)} is not a CIDR, an address or a host name "
            '(e.g. "10.20.0.0/16", "::1", "db.internal")'
        )
    return text


def parse_ports(raw: object) -> tuple[int, int]:
    """``port``: one port (5432) or a range ("5432-5439").  (Errors say
    what is wrong; the caller says where.)"""
    lo = hi = None
    if isinstance(raw, int) and not isinstance(raw, bool):
        lo = hi = raw
    elif isinstance(raw, str):
        m = re.fullmatch(r"\s*([0-9]{1,5})\s*(?:-\s*([0-9]{1,5})\s*)?", raw)
        if m:
            lo = int(m.group(1))
            hi = int(m.group(2) or m.group(1))
    if lo is None or hi is None or not (1 <= lo <= hi <= 65535):
        raise UsageError(f'expected a port 1..65535 or a range "LO-HI", got {show_value(raw)}')
    return lo, hi


def build(
    policy_values: Mapping[str, object],
    tables: Iterable[Mapping[str, object]],
    where: Callable[[int, str], str] = lambda i, key: f"peer[{i}].{key}",
) -> tuple[Peer, ...]:
    """Peer rules from their tables (config ``[[policy.peer]]`` or parsed
    ``--peer`` specs), each completed with the policy's values for the keys
    it does not give.  ``where(i, key)`` names a rule's key in messages."""
    peers: list[Peer] = []
    seen: dict[tuple[str, tuple[int, int] | None], int] = {}
    for i, table in enumerate(tables):
        if "address" not in table:
            raise UsageError(f"{where(i, 'address')}: missing (every peer rule names its peer)")
        values: dict[str, object] = {}
        exempt = False
        for key, value in table.items():
            if key == "exempt":
                if not isinstance(value, bool):
                    raise UsageError(
                        f"{where(i, key)}: expected true or false, got {show_value(value)}"
                    )
                exempt = value
            elif key == "keepalive":
                # An option, but not a value: taken in, it was dropped
                # without a word (Policy has no keepalive field).
                raise UsageError(
                    f"{where(i, key)}: keepalive is always on; exempt leaves these "
                    "peers' connections as the program made them"
                )
            elif key not in RULE_KEYS and key not in BY_KEY:
                raise UsageError(f"{where(i, key)}: unknown key in a peer rule")
            elif key in BY_KEY and not BY_KEY[key].bpf:
                raise UsageError(
                    f"{where(i, key)}: the kernel refuses it from BPF; "
                    "only the LD_PRELOAD shim sets it"
                )
            elif key not in ("address", "port"):
                values[key] = value
        # where() only for a message: in a config it finds the line, a
        # pass over the whole file (0.4 s at 10,000 policies).
        try:
            address = check_address(table["address"])
        except UsageError as e:
            raise UsageError(f"{where(i, 'address')}: {e}") from None
        try:
            ports = parse_ports(table["port"]) if "port" in table else None
        except UsageError as e:
            raise UsageError(f"{where(i, 'port')}: {e}") from None
        if exempt and values:
            raise UsageError(
                f"{where(i, sorted(values)[0])}: an exempt peer takes no values "
                "(its connections are left as the program made them)"
            )
        dup = (address.lower(), ports)
        if dup in seen:
            raise UsageError(
                f"{where(i, 'address')}: {address} (port {ports or 'any'}) is named by "
                f"peer rule {seen[dup]} already"
            )
        seen[dup] = i
        policy = None
        if not exempt:
            merged = {
                k: v
                for k, v in policy_values.items()
                if k in BY_KEY or k in ("mode", "keepidle_min", "keepidle_max")
            }
            # A user timeout the policy derived follows the rule's own times.
            if "user_timeout" not in table and _derived(policy_values):
                merged.pop("user_timeout", None)
            # A stated idle limit derives keepidle, unless the rule gives one.
            if (
                "idle_limit" in table
                and "keepidle" not in table
                and merged.get("keepidle") != "auto"
            ):
                merged.pop("keepidle", None)
            merged.update(values)
            try:
                policy = Policy.from_mapping(merged)
            except UsageError as e:
                key, _, msg = str(e).partition(": ")
                raise UsageError(f"{where(i, key)}: {msg}") from None
        net = parse_network(address)
        peers.append(Peer(address, ports, policy, (net,) if net is not None else ()))
    if len(peers) > MAX_RULES:
        raise UsageError(
            f"{where(MAX_RULES, 'address')}: more than {MAX_RULES} peer rules in one policy"
        )
    flatten(peers, where=lambda p: where(peers.index(p), "port"))  # refuse what cannot be looked up
    return tuple(peers)


def _derived(values: Mapping[str, object]) -> bool:
    return values.get("user_timeout") is None


def parse_spec(spec: str) -> dict[str, object]:
    """``ADDRESS[,port=P][,KEY=VALUE]...`` or ``ADDRESS,exempt`` (the
    command line's ``--peer``) as the table a config would have."""
    parts = [p.strip() for p in spec.split(",")]
    if not parts or not parts[0]:
        raise UsageError(f"--peer {show_value(spec)}: expected ADDRESS[,port=P][,KEY=VALUE]...")
    table: dict[str, object] = {"address": parts[0]}
    for part in parts[1:]:
        if part == "exempt":
            table["exempt"] = True
            continue
        key, eq, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise UsageError(
                f"--peer {show_value(spec)}: {show_value(part)} is not KEY=VALUE or exempt"
            )
        table[key] = value.strip()
    return table


# -- the flattened table ------------------------------------------------------------

Entry = tuple[int, int, int]  # (low port, high port, rule number: 1-based index; 0: none)


def flatten(
    peers: list[Peer] | tuple[Peer, ...], where: Callable[[Peer], str] | None = None
) -> dict[Network, tuple[Entry, ...]]:
    """Network -> the port ranges to try there, most specific first, each
    with its rule's number (index + 1).  A network's list holds its own
    port rules, then its own portless rule -- or, without one, the same for
    the next shorter network of the policy that contains it, and so on: the
    kernel finds the longest prefix and scans one list.  No entry matching:
    the policy's own values."""
    by_net: dict[Network, list[tuple[int, Peer]]] = {}
    for i, p in enumerate(peers):
        for n in p.networks:
            by_net.setdefault(n, []).append((i + 1, p))
    nets = sorted(by_net, key=lambda n: n.prefixlen, reverse=True)
    out: dict[Network, tuple[Entry, ...]] = {}
    for n in nets:
        entries: list[Entry] = []
        for m in nets:
            if m.prefixlen > n.prefixlen or not n.subnet_of(m):
                continue
            rules = by_net[m]
            ported = sorted(
                (r for r in rules if r[1].ports is not None),
                key=lambda r: (r[1].ports[1] - r[1].ports[0], r[0]),  # type: ignore[index]
            )
            entries += [(p.ports[0], p.ports[1], idx) for idx, p in ported]  # type: ignore[index]
            anyport = [r for r in rules if r[1].ports is None]
            if anyport:
                entries.append((0, 65535, anyport[0][0]))
                break
        if len(entries) > MAX_PORT_RULES + 1 or (
            len(entries) == MAX_PORT_RULES + 1 and entries[-1][:2] != (0, 65535)
        ):
            first = by_net[n][0][1]
            at = where(first) if where else f"peer {first.label}"
            raise UsageError(
                f"{at}: more than {MAX_PORT_RULES} port rules apply to {n}; "
                "merge them into port ranges"
            )
        out[n] = tuple(entries)
    return out


@functools.lru_cache(maxsize=256)
def _table(rules: tuple[Peer, ...]) -> dict[Network, tuple[Entry, ...]]:
    return flatten(rules)


def match(table: Mapping[Network, tuple[Entry, ...]], address: str, port: int) -> int:
    """The rule number (1-based; 0: the policy's own values) for a peer at
    ``address``:``port``, from a flattened table."""
    addr = _as_v6(address)
    if addr is None:
        return 0
    best: Network | None = None
    for n in table:
        if addr in n and (best is None or n.prefixlen > best.prefixlen):
            best = n
    if best is None:
        return 0
    for lo, hi, idx in table[best]:
        if lo <= port <= hi:
            return idx
    return 0


def _as_v6(address: str) -> ipaddress.IPv6Address | None:
    try:
        a = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return None
    if isinstance(a, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(int(V4_MAPPED.network_address) | int(a))
    return a


def endpoint(text: str) -> tuple[bytes, int] | None:
    """A remote end as ss and inet_diag show it ("10.0.0.1:80",
    "[::1]:80") as (16 bytes, IPv4 mapped; port); None if it is none."""
    address, _, port = text.rpartition(":")
    a = _as_v6(address)
    if a is None or not port.isdigit():
        return None
    return a.packed, int(port)


# -- host names -------------------------------------------------------------------


class Resolver:
    """Host names to addresses (IPv4 and IPv6), kept for HOST_TTL seconds
    (the system resolver does not tell a record's TTL).  A name that does
    not resolve has no addresses until it does."""

    def __init__(
        self,
        lookup: Callable[[str], list[str]] | None = None,
        ttl: float = HOST_TTL,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._lookup = lookup or _getaddrinfo
        self.ttl = ttl
        self._clock = clock
        self._cache: dict[str, tuple[float, tuple[Network, ...], str | None]] = {}
        # resolve_names: id of a policy with host names -> (the policy,
        # which rules name hosts, their addresses, the policy with them):
        # one object for every cgroup that has it.  (By identity: comparing
        # policies with their rules costs more than resolving.)
        self.resolved: dict[int, tuple[Policy, tuple[int, ...], tuple, Policy]] = {}

    def networks(self, name: str) -> tuple[tuple[Network, ...], str | None]:
        """(the name's addresses as /32 or /128 networks, the error if it
        did not resolve)."""
        now = self._clock()
        hit = self._cache.get(name)
        if hit is not None and now < hit[0]:
            return hit[1], hit[2]
        try:
            addrs = self._lookup(name)
            nets = tuple(sorted({n for a in addrs if (n := parse_network(a)) is not None}))
            err = None if nets else "no addresses"
        except OSError as e:
            nets, err = (), str(e.strerror or e)
        self._cache[name] = (now + self.ttl, nets, err)
        return nets, err


def _getaddrinfo(name: str) -> list[str]:
    infos = socket.getaddrinfo(name, None, socket.AF_UNSPEC, socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def resolve_names(
    policy: Policy, resolver: Resolver, failed: Callable[[str, str], None] | None = None
) -> Policy:
    """``policy`` with its host-name rules' addresses filled in (the same
    object when it has none); ``failed(name, why)`` for each that did not
    resolve (its rule then applies to nobody until it does).  The same
    policy object and addresses give the same object back: the daemon asks
    once per cgroup, and compares what it gets with what it wrote."""
    hit = resolver.resolved.get(id(policy))
    if hit is not None and hit[0] is policy:
        named = hit[1]
    else:
        named, hit = tuple(i for i, p in enumerate(policy.peers) if p.is_name), None
        if not named:
            _keep(resolver, policy, (), (), policy)
    if not named:
        return policy
    answers = []
    for i in named:
        name = policy.peers[i].address
        nets, err = resolver.networks(name)
        if err and failed is not None:
            failed(name, err)
        answers.append(nets)
    if hit is not None and hit[2] == tuple(answers):
        return hit[3]
    peers = list(policy.peers)
    for i, nets in zip(named, answers, strict=True):
        peers[i] = dataclasses.replace(peers[i], networks=nets)
    out = policy.with_peers(tuple(peers))
    _keep(resolver, policy, named, tuple(answers), out)
    return out


def _keep(resolver: Resolver, policy: Policy, named: tuple, answers: tuple, out: Policy) -> None:
    if len(resolver.resolved) >= 1024:
        resolver.resolved.clear()  # policies no longer in the config
    resolver.resolved[id(policy)] = (policy, named, answers, out)


# -- what a socket gets ----------------------------------------------------------

ANY = "*"  # the label of the policy's own values (no peer rule)


def show_address(address16: bytes) -> str:
    """A peer's 16 bytes (IPv4 mapped) as people write it."""
    a = ipaddress.IPv6Address(address16)
    return str(a.ipv4_mapped or a)


def path_network(address16: bytes) -> tuple[int, bytes]:
    """The path of a peer under a policy's own values, for learned idle
    limits: its /24 (IPv4, mapped: 120 bits) or its /64 (IPv6), as the
    kernel keys it (struct bk_path_key: prefix length, network)."""
    if address16[:12] == V4_MAPPED.network_address.packed[:12]:
        return 120, address16[:15] + bytes(1)
    return 64, address16[:8] + bytes(8)


def path_of(address16: bytes) -> Network:
    """The network ``path_network`` gives (``show_network`` shows it)."""
    plen, net = path_network(address16)
    return Network((net, plen))


def effective(
    policy: Policy,
    address: str,
    port: int,
    learned: Callable[[str, bytes], int | None] = lambda _label, _addr: None,
) -> tuple[str, Policy | None]:
    """(the label of the rule a peer falls under -- ANY for the policy's own
    values --, the values it gets; None: exempt), the keepidle learned for
    its path in (``learned(label, address16)``: keepidle = "auto").  The
    same choice the kernel makes (bk_view_of in bpf/common.bpf.h)."""
    chosen, label = policy, ANY
    addr = _as_v6(address)
    if policy.peers and addr is not None:
        from_table = match(_table(policy.peers), address, port)
        if from_table:
            rule = policy.peers[from_table - 1]
            chosen, label = rule.policy, rule.label
    if chosen is None or not chosen.auto or addr is None:
        return label, chosen
    keepidle = learned(label, addr.packed)
    if not keepidle:
        return label, chosen
    return label, chosen.with_keepidle(keepidle)
