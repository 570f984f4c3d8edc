"""Every bk_* value userspace writes or reads, encoded and decoded in one
place from the layouts of bpf/bpfkeep.h (progs.header): policies
(``struct bk_policy``), the sweep's work items (``struct bk_sweep``) and
the counters (``struct bk_counters``, ``struct bk_sweepstats``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import ipaddress
import secrets
import struct
import sys
import zlib
from collections.abc import Sequence

from bpfkeep import peers
from bpfkeep.options import AUTO_MAX, AUTO_MIN, BPF_OPTIONS, Policy, default_user_timeout
from bpfkeep.progs.header import HeaderError, header

# -- what the programs and this side share ------------------------------------------

_H = header()
NOPT = _H.define("BK_NOPT_BPF")
if len(BPF_OPTIONS) != NOPT:
    raise HeaderError(
        f"bpfkeep.h has {NOPT} BPF options, the option table {len(BPF_OPTIONS)}: reinstall bpfkeep"
    )
# bk_policy.flags
F_ACTIVE = _H.define("BK_F_ACTIVE")
F_ENFORCE = _H.define("BK_F_ENFORCE")
F_MANAGED = _H.define("BK_F_MANAGED")  # owned by the daemon; the BPF programs ignore it
F_UT_DERIVED = _H.define("BK_F_UT_DERIVED")  # the user timeout follows the times in force
F_HAS_ANCESTOR = _H.define("BK_F_HAS_ANCESTOR")  # an ancestor has a policy: sockets get a record
F_HAS_DESCENDANT = _H.define("BK_F_HAS_DESCENDANT")  # a descendant has one: its records count
F_PREV = _H.define("BK_F_PREV")  # prev[]: the values sockets carried before the last change
F_SWEPT = _H.define("BK_F_SWEPT")  # a complete sweep ran since the last change
F_AUTO = _H.define("BK_F_AUTO")  # keepidle = "auto": the one learned per path
F_BARE_LISTEN = _H.define("BK_F_BARE_LISTEN")  # listeners stay as the program made them
F_NESTING = F_HAS_ANCESTOR | F_HAS_DESCENDANT
# bk_policy.prev[] and bk_sweep.fp[]: the keepalive values that tell
# bpfkeep's sockets from those whose program chose its own (BK_FP_*)
FP_KEYS = tuple(n.lower() for n in _H.enumerate("BK_FP_"))
NFP = _H.define("BK_NFP")
if len(FP_KEYS) != NFP:
    raise HeaderError("bpfkeep.h: BK_NFP does not count the BK_FP_* constants")

# bk_counters.seen[] index -> metric label ("connect", "listen", ...)
CALLBACKS = tuple(n.lower() for n in _H.enumerate("BK_CB_"))
# failed[][] index -> errno name, as the programs bucket them ("other" last resort)
ERRNO_BUCKETS = tuple("other" if n == "OTHER" else n for n in _H.enumerate("BK_ERR_"))
if len(CALLBACKS) != _H.define("BK_NCB") or len(ERRNO_BUCKETS) != _H.define("BK_NERR"):
    raise HeaderError("bpfkeep.h: BK_NCB or BK_NERR does not count its constants")

POLICY = _H.struct("bk_policy")
POLICY_FMT = POLICY.fmt
POLICY_SIZE = POLICY.size
_FLAGS = POLICY.span("flags")
SK = _H.struct("bk_sk")
SK_FMT = SK.fmt
SWEEP = _H.struct("bk_sweep")
SWEEP_FMT = SWEEP.fmt
SWEEP_SIZE = SWEEP.size
SWEEP_APPLY = _H.define("BK_SWEEP_APPLY")
SWEEP_UNDO = _H.define("BK_SWEEP_UNDO")
SWEEP_READ = _H.define("BK_SWEEP_READ")
SWI_SYN_SENT = _H.define("BK_SWI_SYN_SENT")
SWI_HELD = _H.define("BK_SWI_HELD")  # made elsewhere, held by the policy's processes
SWI_FP = _H.define("BK_SWI_FP")  # fp[] holds values bpfkeep gave the socket
SWI_KEEP = _H.define("BK_SWI_KEEP")  # UNDO that keeps the values and records them as ours
SWI_RECHECK = _H.define("BK_SWI_RECHECK")  # APPLY: check even a current socket's values
SWI_LISTEN = _H.define("BK_SWI_LISTEN")  # APPLY on a listener of a per-peer policy
SWI_QUIET = _H.define("BK_SWI_QUIET")  # only counted: the values in force are not read back
SWI_RESET_SHIFT = _H.define("BK_SWI_RESET_SHIFT")  # UNDO: which options to reset
SWR_SEEN = _H.define("BK_SWR_SEEN")
SWR_APP_OWN = _H.define("BK_SWR_APP_OWN")
SWR_NO_POLICY = _H.define("BK_SWR_NO_POLICY")
SWR_NO_STORAGE = _H.define("BK_SWR_NO_STORAGE")
SWR_CURRENT = _H.define("BK_SWR_CURRENT")
SWR_EXEMPT = _H.define("BK_SWR_EXEMPT")
MAX_SWEEP = _H.define("BK_MAX_SWEEP")  # sockets per sweep batch (map size)
COUNTERS = _H.struct("bk_counters")
COUNTERS_SIZE = COUNTERS.size
COUNTERS_WORDS = COUNTERS_SIZE // 8
SWEEPSTATS = _H.struct("bk_sweepstats")
SWEEPSTATS_SIZE = SWEEPSTATS.size
SWEEPSTATS_WORDS = SWEEPSTATS_SIZE // 8
# Peer rules (bk_peer_key -> bk_peer in the LPM trie; bk_rule_key -> bk_rule)
PEER_KEY = _H.struct("bk_peer_key")
PEER = _H.struct("bk_peer")
RULE_KEY = _H.struct("bk_rule_key")
RULE = _H.struct("bk_rule")
PEER_PORTS = _H.define("BK_PEER_PORTS")
PEER_NAME = _H.define("BK_PEER_NAME")
R_EXEMPT = _H.define("BK_R_EXEMPT")
if PEER_PORTS != peers.MAX_PORT_RULES + 1:
    raise HeaderError("bpfkeep.h: BK_PEER_PORTS is not bpfkeep.peers.MAX_PORT_RULES + 1")
# Lost connections (bk_loss_key -> bk_losses; bk_config; bk_loss_event)
LOSS_REASONS = tuple(n.lower() for n in _H.enumerate("BK_LOSS_"))
if len(LOSS_REASONS) != _H.define("BK_NLOSS"):
    raise HeaderError("bpfkeep.h: BK_NLOSS does not count the BK_LOSS_* constants")
LOSS_KEY = _H.struct("bk_loss_key")
LOSSES = _H.struct("bk_losses")
CONFIG = _H.struct("bk_config")
LOSS_EVENT = _H.struct("bk_loss_event")
NIDLE = _H.define("BK_NIDLE")
# Learned idle limits (bk_path_key -> bk_learned)
PATH_KEY = _H.struct("bk_path_key")
LEARNED = _H.struct("bk_learned")
MAX_PATHS = _H.define("BK_MAX_PATHS")  # paths learned for (bk_learned's size)
# The idle-time histogram's buckets (seconds): the timeouts that matter --
# ALB 60 s, Azure LB and NAT 240 s, AWS NAT gateway and NLB 350 s, GCP
# internal LB 600 s, Cloud NAT 1200 s, firewalls 3600 s, the kernel's
# keepalive 7200 s -- and a few below a minute.
IDLE_BUCKETS = (1, 5, 10, 30, 60, 120, 240, 350, 600, 1200, 3600, 7200)
if len(IDLE_BUCKETS) >= NIDLE:
    raise HeaderError("bpfkeep.h: BK_NIDLE has no room for the idle buckets and +Inf")


def policy_flags(policy: Policy) -> int:
    """The flags the BPF programs act on (not ACTIVE, not MANAGED)."""
    flags = F_ENFORCE if policy.mode == "enforce" else 0
    if policy.ut_derived:
        flags |= F_UT_DERIVED
    if policy.auto:
        flags |= F_AUTO
    if bare_listeners(policy):
        flags |= F_BARE_LISTEN
    return flags


def bare_listeners(policy: Policy) -> bool:
    """Whether the policy's listeners stay as the program made them: a
    peer rule exempts its peers, or leaves unset an option the policy sets
    -- what such a peer's accepted socket should have cannot be taken back
    from a listener that carries the policy's values."""
    for rule in policy.peers:
        if rule.policy is None:
            return True
        if any(policy.value(o.key) and not rule.policy.value(o.key) for o in BPF_OPTIONS):
            return True
    return False


def policy_gen(policy: Policy) -> int:
    """A generation number that changes whenever the values, the mode or
    the peer rules do: a socket whose record carries another generation is
    brought up to date (an accepted socket, by the sweep).  Never 0, which
    means "not applied"."""
    vals = [policy.value(o.key) for o in BPF_OPTIONS]
    ps = peer_set(policy)
    raw = struct.pack(f"=I{NOPT}IQ", policy_flags(policy), *vals, ps.id if ps else 0)
    return zlib.crc32(raw) or 1


def encode_policy(
    cgroup_id: int,
    policy: Policy,
    *,
    level: int = 1,
    active: bool = True,
    managed: bool = False,
    gen: int | None = None,
    nesting: int = 0,
    prev: Policy | None = None,
    prev_peers: int = 0,
) -> bytes:
    """A bk_policy value; ``level`` is the cgroup's depth below the root,
    so that the most specific of nested policies wins.  ``gen`` defaults to
    one derived from the values (see :func:`fresh_gen` for attachments).
    ``nesting``: F_HAS_ANCESTOR / F_HAS_DESCENDANT.  ``prev``: the policy
    whose values the sockets carried until now (before an update, or an
    ancestor's), recognised as bpfkeep's on sockets without a record, and
    ``prev_peers`` its peer-rule set.  The policy's own peer-rule set is
    written by the caller (peer_set)."""
    flags = policy_flags(policy) | (F_ACTIVE if active else 0) | (F_MANAGED if managed else 0)
    flags |= nesting & F_NESTING
    vals = [policy.value(o.key) for o in BPF_OPTIONS]
    gen = policy_gen(policy) if gen is None else gen
    ps = peer_set(policy)
    set_id = ps.id if ps else 0
    fp: tuple[int, ...] = (0,) * NFP
    if prev is not None and (prev_differs(prev, policy) or prev_peers != set_id):
        flags |= F_PREV
        fp = fingerprint(prev)
    else:
        prev_peers = 0
    return POLICY.pack(
        cgroup_id=cgroup_id,
        flags=flags,
        gen=gen,
        level=level,
        val=vals,
        prev=fp,
        peers=set_id,
        prev_peers=prev_peers,
        auto_min=policy.keepidle_min if policy.auto else 0,
        auto_max=policy.keepidle_max if policy.auto else 0,
    )


def policy_peers(raw: bytes) -> tuple[int, int]:
    """(peer-rule set, the set before the last change) of a bk_policy value."""
    f = POLICY.unpack(raw)
    return int(f["peers"]), int(f["prev_peers"])  # type: ignore[arg-type]


# -- peer rules -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PeerSet:
    """A policy's peer rules as the kernel looks them up: the LPM trie's
    entries and the rules, under one id (a hash of all of it, so that
    policies with the same rules share them)."""

    id: int
    prefixes: dict[bytes, bytes]  # bk_peer_key -> bk_peer
    rules: dict[bytes, bytes]  # bk_rule_key -> bk_rule
    table: dict  # peers.flatten's table, for matching here


def rule_tag(label: str) -> int:
    """What a rule's losses are counted by (bk_rule.tag): stable while the
    rule's label is.  0 is the policy's own values."""
    return zlib.crc32(label.encode()) or 1


def rule_value(peer: peers.Peer) -> bytes:
    name = peer.address.encode()[:PEER_NAME]
    lo, hi = peer.ports or (0, 0)
    if peer.policy is None:
        return RULE.pack(
            flags=R_EXEMPT,
            tag=rule_tag(peer.label),
            lo=lo,
            hi=hi,
            name=name.ljust(PEER_NAME, b"\0"),
        )
    vals = [peer.policy.value(o.key) for o in BPF_OPTIONS]
    p = peer.policy
    return RULE.pack(
        flags=policy_flags(p),
        tag=rule_tag(peer.label),
        val=vals,
        lo=lo,
        hi=hi,
        auto_min=p.keepidle_min if p.auto else 0,
        auto_max=p.keepidle_max if p.auto else 0,
        idle_limit=p.idle_limit,
        name=name.ljust(PEER_NAME, b"\0"),
    )


@functools.lru_cache(maxsize=1024)
def peer_set(policy: Policy) -> PeerSet | None:
    """The kernel's form of a policy's peer rules (None: it has none).
    Host names must have been resolved (peers.resolve_names)."""
    if not policy.peers:
        return None
    table = peers.flatten(policy.peers)
    rules = {i + 1: rule_value(p) for i, p in enumerate(policy.peers)}
    entries = {}
    for net, ports in sorted(table.items(), key=lambda kv: (kv[0].prefixlen, kv[0])):
        los, his, nums = (list(col) for col in zip(*ports, strict=True)) if ports else ([], [], [])
        pad = [0] * (PEER_PORTS - len(ports))
        entries[net] = PEER.pack(lo=los + pad, hi=his + pad, rule=nums + pad, n=len(ports))
    h = hashlib.blake2b(digest_size=8)
    for net, value in entries.items():
        h.update(net.network_address.packed + bytes([net.prefixlen]) + value)
    for num, value in sorted(rules.items()):
        h.update(struct.pack("=I", num) + value)
    set_id = int.from_bytes(h.digest(), sys.byteorder) or 1
    sid = set_id.to_bytes(8, sys.byteorder)
    prefixes = {
        PEER_KEY.pack(prefixlen=64 + net.prefixlen, set=sid, addr=net.network_address.packed): v
        for net, v in entries.items()
    }
    rule_entries = {RULE_KEY.pack(set=set_id, rule=num): v for num, v in rules.items()}
    return PeerSet(set_id, prefixes, rule_entries, table)


def per_peer(raw: bytes) -> bool:
    """Whether a bk_policy's values depend on the peer: peer rules, or
    keepidle learned per path (BK_PER_PEER in common.bpf.h)."""
    return bool(policy_peers(raw)[0] or policy_raw_flags(raw) & F_AUTO)


def peer_set_id(policy: Policy) -> int:
    ps = peer_set(policy)
    return ps.id if ps else 0


def peer_key_set(key: bytes) -> int:
    """The set a bk_peer_key belongs to."""
    return int.from_bytes(bytes(PEER_KEY.unpack(key)["set"]), sys.byteorder)  # type: ignore[arg-type]


def rule_key_set(key: bytes) -> int:
    """The set a bk_rule_key belongs to."""
    return int(RULE_KEY.unpack(key)["set"])  # type: ignore[arg-type]


def with_peers(raw: bytes, set_id: int) -> bytes:
    """The same bk_policy value naming another peer-rule set."""
    return raw[: _PEERS.start] + struct.pack("=Q", set_id) + raw[_PEERS.stop :]


def peer_key_network(key: bytes) -> ipaddress.IPv6Network:
    """The network a bk_peer_key stands for."""
    f = PEER_KEY.unpack(key)
    bits = int(f["prefixlen"]) - 64  # type: ignore[arg-type]
    addr = ipaddress.IPv6Address(bytes(f["addr"]))  # type: ignore[arg-type]
    return ipaddress.IPv6Network(f"{addr}/{bits}")


def decode_peer(raw: bytes) -> list[int]:
    """The rule numbers a bk_peer names, in order."""
    f = PEER.unpack(raw)
    return list(f["rule"][: int(f["n"])])  # type: ignore[index,arg-type]


def peer_lookup_key(set_id: int, address: bytes) -> bytes:
    """The key that looks a peer's address (16 bytes, IPv4 mapped) up in
    the trie: the whole length, the longest prefix answers."""
    return PEER_KEY.pack(prefixlen=64 + 128, set=set_id.to_bytes(8, sys.byteorder), addr=address)


def decode_rule(raw: bytes) -> tuple[int, int, tuple[int, int] | None, str, Policy | None]:
    """(flags, tag, ports, address, values or None for exempt) of a bk_rule."""
    f = RULE.unpack(raw)
    name = bytes(f["name"]).split(b"\0", 1)[0].decode(errors="replace")  # type: ignore[arg-type]
    lo, hi = int(f["lo"]), int(f["hi"])  # type: ignore[arg-type]
    flags = int(f["flags"])  # type: ignore[arg-type]
    auto = (int(f["auto_min"]), int(f["auto_max"]))  # type: ignore[arg-type]
    limit = int(f["idle_limit"])  # type: ignore[arg-type]
    policy = (
        None if flags & R_EXEMPT else _policy(0, flags, f["val"], auto=auto, idle_limit=limit)[2]  # type: ignore[arg-type]
    )
    return flags, int(f["tag"]), (lo, hi) if hi else None, name, policy  # type: ignore[arg-type]


def fingerprint(policy: Policy) -> tuple[int, ...]:
    """The values (bk_policy.prev[], bk_sweep.fp[]) a socket carries when
    this policy set them; 0: left at the kernel default, any value."""
    return tuple(policy.value(k) for k in FP_KEYS)


def prev_differs(prev: Policy, policy: Policy) -> bool:
    """Whether a socket at ``prev``'s values can be told from one at
    ``policy``'s: only then is it worth looking for (BK_F_PREV)."""
    return any(a and a != b for a, b in zip(fingerprint(prev), fingerprint(policy), strict=True))


def policy_gen_of(raw: bytes) -> int:
    return int(POLICY.unpack(raw)["gen"])  # type: ignore[arg-type]


def policy_raw_flags(raw: bytes) -> int:
    return int.from_bytes(raw[_FLAGS], sys.byteorder)


def with_flags(raw: bytes, flags: int) -> bytes:
    """The same bk_policy value with other flags."""
    return raw[: _FLAGS.start] + struct.pack("=I", flags) + raw[_FLAGS.stop :]


def managed_of(raw: bytes) -> bool:
    """The F_MANAGED flag of a raw bk_policy value."""
    return bool(policy_raw_flags(raw) & F_MANAGED)


def policy_or_none(raw: bytes | None) -> Policy | None:
    """The policy of a raw bk_policy value read from a map, if any."""
    return decode_policy(raw)[2] if raw is not None else None


@functools.lru_cache(maxsize=4096)
def _template(policy: Policy, level: int, managed: bool) -> bytes:
    """A bk_policy value with cgroup id and generation 0 (Policy objects are
    shared between rules with the same values: a few templates serve
    10,000 cgroups)."""
    return encode_policy(0, policy, level=level, managed=managed, gen=0)


# What policy_is compares beyond the flags: the cgroup id, and the level
# and values (not the generation, nor what follows the values: prev[] is
# kept by attach, detach and the sweep, not by the config).
_CGROUP = POLICY.span("cgroup_id")
_VALUES = POLICY.span("level", "val")
_PEERS = POLICY.span("peers")
_AUTO = POLICY.span("auto_min", "auto_max")
# Flags that say where the other policies are and how far the sockets are
# (nesting, prev[], swept): not the config's either.
_VOLATILE = F_NESTING | F_PREV | F_SWEPT


def policy_is(
    raw: bytes | None, cgroup_id: int, level: int, policy: Policy, *, managed: bool = True
) -> bool:
    """Whether a bk_policy value as read from a map says exactly ``policy``
    for this cgroup: cgroup id, flags (active, mode, managed, derived user
    timeout), level and every value; the generation aside.  A comparison of
    bytes: a reload checks 10,000 entries without decoding one."""
    if raw is None or len(raw) != POLICY_SIZE:
        return False
    want = _template(policy, level, managed)
    return (
        policy_raw_flags(raw) & ~_VOLATILE == policy_raw_flags(want)
        and raw[_VALUES] == want[_VALUES]
        and raw[_PEERS] == want[_PEERS]
        and raw[_AUTO] == want[_AUTO]
        and raw[_CGROUP] == struct.pack("=Q", cgroup_id)
    )


_PREV = POLICY.span("prev", "pad")
_PREV_PEERS = POLICY.span("prev_peers")


_GEN = POLICY.span("gen")


def updated_policy(
    cgroup_id: int, policy: Policy, old: bytes, *, level: int, managed: bool, gen: int
) -> bytes:
    """The bk_policy value that puts ``policy`` in place of ``old`` (the
    cgroup's value as its storage holds it): the nesting flags kept (where
    the other policies are has not changed), the old values as prev[] if
    it was active (what the sockets carry until the sweep), generation
    ``gen``.  The bytes encode_policy gives for that, encoded once per
    distinct (policy, old values) and given each cgroup's id and generation:
    a reload changing 10,000 policies to the same one encodes one."""
    neutral = old[: _CGROUP.start] + bytes(8) + old[_CGROUP.stop :]
    neutral = neutral[: _GEN.start] + bytes(4) + neutral[_GEN.stop :]
    t = _update_template(policy, level, managed, neutral)
    t = t[: _CGROUP.start] + struct.pack("=Q", cgroup_id) + t[_CGROUP.stop :]
    return t[: _GEN.start] + struct.pack("=I", gen) + t[_GEN.stop :]


@functools.lru_cache(maxsize=1024)
def _update_template(policy: Policy, level: int, managed: bool, old: bytes) -> bytes:
    flags = policy_raw_flags(old)
    active = bool(flags & F_ACTIVE)
    return encode_policy(
        0,
        policy,
        level=level,
        managed=managed,
        gen=0,
        nesting=flags & F_NESTING,
        prev=decode_policy(old)[2] if active else None,
        prev_peers=policy_peers(old)[0] if active else 0,
    )


def keep_prev(value: bytes, old: bytes) -> bytes:
    """``value`` with ``old``'s prev[] and its F_PREV and F_SWEPT flags:
    the same values again leave the sockets as they were (what they
    carried before still counts as bpfkeep's until a sweep)."""
    keep = F_PREV | F_SWEPT
    flags = policy_raw_flags(value) & ~keep | policy_raw_flags(old) & keep
    value = value[: _PREV.start] + old[_PREV] + value[_PREV.stop :]
    value = value[: _PREV_PEERS.start] + old[_PREV_PEERS] + value[_PREV_PEERS.stop :]
    return with_flags(value, flags)


def fresh_gen() -> int:
    """A new generation for a new attachment or changed values: random, so
    that the same policy attached again after a detach is not mistaken for
    the one before (sockets may have changed meanwhile).  Never 0."""
    return secrets.randbits(32) or 1


def decode_policy(raw: bytes) -> tuple[int, int, Policy]:
    """(cgroup id, flags, policy) from a bk_policy value (its peer rules
    are in other maps: pins.read)."""
    f = POLICY.unpack(raw)
    auto = (int(f["auto_min"]), int(f["auto_max"]))  # type: ignore[arg-type]
    return _policy(f["cgroup_id"], f["flags"], f["val"], auto=auto)  # type: ignore[arg-type]


def _policy(
    cgroup_id: int,
    flags: int,
    vals: Sequence[int],
    derived: bool | None = None,
    auto: tuple[int, int] = (0, 0),
    idle_limit: int = 0,
) -> tuple[int, int, Policy]:
    """``derived``: whether the user timeout follows the keepalive times;
    None: the F_UT_DERIVED flag says.  ``auto``: keepidle's bounds when
    it is learned (F_AUTO)."""
    values = {o.key: v for o, v in zip(BPF_OPTIONS, vals, strict=True) if o.key != "keepalive"}
    mode = "enforce" if flags & F_ENFORCE else "set"
    if derived is None:
        derived = bool(flags & F_UT_DERIVED)
    extra: dict[str, object] = {"idle_limit": idle_limit}
    if flags & F_AUTO:
        extra.update(auto=True, keepidle_min=auto[0] or AUTO_MIN, keepidle_max=auto[1] or AUTO_MAX)
    return (
        cgroup_id,
        flags,
        Policy(**values, mode=mode, user_timeout_derived=derived, **extra),  # type: ignore[arg-type]
    )


# The bk_policy layout of bpfkeep 0.1 (no gen, no level): attachments
# made by it are migrated (pins.attach).  A past layout, not in
# today's header: tests/test_layout.py reads it from 0.1's copy of it
# (tests/data/bpf-0.1).
LEGACY_POLICY_FMT = f"=QI{NOPT}II"
LEGACY_POLICY_SIZE = struct.calcsize(LEGACY_POLICY_FMT)
# The layout before prev[] (cgroup_id, flags, gen, level, val[], pad):
# attachments made by it are migrated too.
NOPREV_POLICY_FMT = f"=QIII{NOPT}II"
NOPREV_POLICY_SIZE = struct.calcsize(NOPREV_POLICY_FMT)
# The layout before peer rules (cgroup_id, flags, gen, level, val[], prev[],
# pad): attachments made by it are migrated too (tests/data/bpf-0.2).
NOPEERS_POLICY_FMT = f"=QIII{NOPT}I{NFP}II"
NOPEERS_POLICY_SIZE = struct.calcsize(NOPEERS_POLICY_FMT)


def decode_any_policy(raw: bytes) -> tuple[int, int, Policy] | None:
    """decode_policy for this layout or an earlier one; None if unknown."""
    if len(raw) == POLICY_SIZE:
        return decode_policy(raw)
    if len(raw) == NOPEERS_POLICY_SIZE:
        cgroup_id, flags, _gen, _level, *rest = struct.unpack_from(NOPEERS_POLICY_FMT, raw)
        return _policy(cgroup_id, flags, rest[:NOPT])
    if len(raw) == NOPREV_POLICY_SIZE:
        cgroup_id, flags, _gen, _level, *vals, _pad = struct.unpack_from(NOPREV_POLICY_FMT, raw)
        return _policy(cgroup_id, flags, vals)
    if len(raw) == LEGACY_POLICY_SIZE:
        cgroup_id, flags, *vals, _pad = struct.unpack_from(LEGACY_POLICY_FMT, raw)
        # 0.1 kept no flag: a user timeout equal to the derived one was derived.
        v = dict(zip((o.key for o in BPF_OPTIONS), vals, strict=True))
        derived = v["user_timeout"] == default_user_timeout(
            v["keepidle"], v["keepintvl"], v["keepcnt"]
        )
        return _policy(cgroup_id, flags, vals, derived)
    return None


def policy_level(raw: bytes) -> int:
    return int(POLICY.unpack(raw)["level"])  # type: ignore[arg-type]


@dataclasses.dataclass
class SweepEntry:
    """One socket in the sweep's work list (struct bk_sweep): the fields
    are the struct's members, in its order (a test checks)."""

    owner: int
    action: int
    in_flags: int = 0
    result: int = 0
    applied: int = 0  # bit per option index in BPF_OPTIONS
    failed: int = 0
    rec_owner: int = 0
    rec_gen: int = 0
    rec_app: int = 0
    rec_level: int = 0
    val: tuple[int, ...] = (0,) * NOPT  # in force afterwards; -1: unknown
    fp: tuple[int, ...] = (0,) * NFP  # in (SWI_FP): values bpfkeep gave the socket
    peer: bytes = bytes(16)  # in: the peer's address, IPv4 mapped
    port: int = 0  # in: the peer's port
    rule: int = 0  # out: the peer rule applied
    pad: int = 0

    def inputs(self) -> tuple:
        """What encode() writes: entries with equal inputs encode alike."""
        return (self.owner, self.action, self.in_flags, self.val, self.fp, self.peer, self.port)

    def encode(self) -> bytes:
        """The inputs only; the outputs start at 0."""
        owner, action, in_flags, val, fp, peer, port = self.inputs()
        return SWEEP.pack(
            owner=owner,
            action=action,
            in_flags=in_flags,
            val=[v & 0xFFFFFFFF for v in val],
            fp=fp,
            peer=peer,
            port=port,
        )

    @classmethod
    def decode(cls, raw: bytes) -> SweepEntry:
        f = SWEEP.unpack(raw)
        for name in ("fp", "peer", "port"):
            f.pop(name)  # input only: not decoded
        vals = f.pop("val")
        signed = tuple(v - (1 << 32) if v >= 1 << 31 else v for v in vals)  # type: ignore[union-attr]
        return cls(**f, val=signed)  # type: ignore[arg-type]

    def values(self) -> dict[str, int]:
        return {o.key: v for o, v in zip(BPF_OPTIONS, self.val, strict=True)}

    @staticmethod
    def names(bits: int) -> list[str]:
        return [o.key for i, o in enumerate(BPF_OPTIONS) if bits >> i & 1]


# A work item read back by a sweep that only counts: (result, applied,
# failed), for struct.iter_unpack over a batch of values.
SWEEP_RESULT = struct.Struct(SWEEP.view("result", "applied", "failed"))


_FAILED = SWEEPSTATS.span("failed")
_TALLY = struct.Struct(SWEEPSTATS.view("swept", "app_own"))


def sweepstats_tally(raw: bytes) -> tuple[int, int, int]:
    """(swept, kept the program's own, refusals of any option) of one
    policy's sweep counters, without building SweepStats."""
    swept, app_own = _TALLY.unpack_from(raw)
    refused = sum(memoryview(raw[_FAILED]).cast("Q"))
    return swept, app_own, refused


def undo_flags(option_keys: list[str]) -> int:
    """bk_sweep.in_flags bits asking the UNDO action to reset these options."""
    index = {o.key: i for i, o in enumerate(BPF_OPTIONS)}
    return sum(1 << (SWI_RESET_SHIFT + index[k]) for k in option_keys)


@dataclasses.dataclass
class SweepStats:
    """Counters of the sweeps of one policy (struct bk_sweepstats)."""

    swept: int
    app_own: int
    applied: dict[str, int]
    failed: dict[tuple[str, str], int]

    @classmethod
    def decode(cls, raw: bytes) -> SweepStats:
        f = SWEEPSTATS.unpack(raw)
        applied, failed = _applied_and_failed(f["applied"], f["failed"])  # type: ignore[arg-type]
        return cls(f["swept"], f["app_own"], applied, failed)  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, object]:
        return {
            "swept": self.swept,
            "kept_program_values": self.app_own,
            "applied": self.applied,
            "failed": {f"{o}/{e}": n for (o, e), n in self.failed.items()},
        }


@dataclasses.dataclass
class Counters:
    seen: dict[str, int]
    inherited: int
    applied: dict[str, int]
    failed: dict[tuple[str, str], int]  # (option, errno name) -> count
    rewritten: dict[str, int]
    sweep: SweepStats | None = None  # existing sockets brought to the policy
    exempt: int = 0  # new sockets of exempt peers, left as they were
    enforce: EnforceCounts | None = None  # what the cgroup hook did not see, repaired

    def as_dict(self) -> dict[str, object]:
        return {
            "seen": self.seen,
            "inherited": self.inherited,
            "exempt": self.exempt,
            "applied": self.applied,
            "failed": {f"{o}/{e}": n for (o, e), n in self.failed.items()},
            "rewritten": self.rewritten,
            "sweep": self.sweep.as_dict() if self.sweep else None,
            "enforce": self.enforce.as_dict() if self.enforce else None,
        }


@dataclasses.dataclass
class Losses:
    """Lost connections of one policy and peer rule (struct bk_losses)."""

    lost: dict[str, int]  # reason -> connections
    idle: list[int]  # per bucket of IDLE_BUCKETS, then above them all
    idle_seconds: float  # sum of the idle times

    @classmethod
    def decode(cls, raw: bytes) -> Losses:
        f = LOSSES.unpack(raw)
        lost = dict(zip(LOSS_REASONS, f["lost"], strict=True))  # type: ignore[arg-type]
        buckets = list(f["idle"][: len(IDLE_BUCKETS) + 1])  # type: ignore[index]
        return cls(lost, buckets, int(f["idle_ms"]) / 1000)  # type: ignore[arg-type]

    def merge(self, other: Losses) -> None:
        for k, v in other.lost.items():
            self.lost[k] = self.lost.get(k, 0) + v
        self.idle = [a + b for a, b in zip(self.idle, other.idle, strict=True)]
        self.idle_seconds += other.idle_seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count at or below it) for a Prometheus histogram, +Inf last."""
        out, total = [], 0
        for le, n in zip([*map(str, IDLE_BUCKETS), "+Inf"], self.idle, strict=True):
            total += n
            out.append((le, total))
        return out

    def as_dict(self) -> dict[str, object]:
        return {
            "lost": self.lost,
            "idle_buckets": dict(self.cumulative()),
            "idle_seconds_sum": self.idle_seconds,
        }


def loss_key_of(raw: bytes) -> tuple[int, int]:
    """(policy cgroup id, rule tag) of a bk_loss_key."""
    f = LOSS_KEY.unpack(raw)
    return int(f["owner"]), int(f["tag"])  # type: ignore[arg-type]


def path_key(owner: int, label: str, address16: bytes = bytes(16)) -> bytes:
    """The bk_path_key of a path: a peer rule of a policy (by its label),
    or for the policy's own values (label peers.ANY) the peer's network."""
    if label != peers.ANY:
        return PATH_KEY.pack(owner=owner, tag=rule_tag(label))
    plen, net = peers.path_network(address16)
    return PATH_KEY.pack(owner=owner, plen=plen, net=net)


def decode_path_key(raw: bytes) -> tuple[int, int, int, bytes]:
    """(owner, tag, prefix length, network) of a bk_path_key."""
    f = PATH_KEY.unpack(raw)
    return int(f["owner"]), int(f["tag"]), int(f["plen"]), bytes(f["net"])  # type: ignore[arg-type]


@dataclasses.dataclass
class Learned:
    """What is known of one path's idle limit (struct bk_learned)."""

    keepidle: int  # s, for the path's connections (0: none learned)
    limit: int  # s (0: unknown)
    upper_ms: int
    lower_ms: int
    upper_at: int  # s since the epoch
    losses: int
    ignored: int

    @classmethod
    def decode(cls, raw: bytes) -> Learned:
        return cls(**{k: int(v) for k, v in LEARNED.unpack(raw).items()})  # type: ignore[arg-type]

    def encode(self) -> bytes:
        return LEARNED.pack(**dataclasses.asdict(self))


def config_value(hz: int) -> bytes:
    """bk_config: the kernel's HZ and the idle buckets' bounds in ms."""
    bounds = [b * 1000 for b in IDLE_BUCKETS]
    return CONFIG.pack(hz=hz, nidle=len(bounds), idle_le_ms=bounds + [0] * (NIDLE - len(bounds)))


@functools.cache
def possible_cpus() -> int:
    """Number of possible CPUs: per-CPU map values hold one slot each."""
    with open("/sys/devices/system/cpu/possible") as f:
        n = 0
        for part in f.read().strip().split(","):
            lo, _, hi = part.partition("-")
            n += int(hi or lo) - int(lo) + 1
        return n


def percpu_value_size(size: int) -> int:
    return ((size + 7) // 8 * 8) * possible_cpus()


def decode_counters(raw: bytes) -> Counters:
    """Sum a per-CPU bk_counters value over the CPUs."""
    total = COUNTERS.unpack_summed(raw)
    applied, failed = _applied_and_failed(total["applied"], total["failed"])  # type: ignore[arg-type]
    return Counters(
        dict(zip(CALLBACKS, total["seen"], strict=True)),  # type: ignore[arg-type]
        total["inherited"],  # type: ignore[arg-type]
        applied,
        failed,
        dict(zip(_OPTION_KEYS, total["rewritten"], strict=True)),  # type: ignore[arg-type]
        exempt=total.get("exempt", 0),  # type: ignore[arg-type]
    )


_OPTION_KEYS = tuple(o.key for o in BPF_OPTIONS)
# failed[NOPT][NERR], flat in C order: (option, errno name) of each word
_FAILED_KEYS = tuple((o, e) for o in _OPTION_KEYS for e in ERRNO_BUCKETS)


def _applied_and_failed(
    applied: Sequence[int], failed: Sequence[int]
) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """The ``applied[NOPT]`` and ``failed[NOPT][NERR]`` arrays that both
    counter structs carry; failures that never happened are left out."""
    errors = {k: v for k, v in zip(_FAILED_KEYS, failed, strict=True) if v} if any(failed) else {}
    return dict(zip(_OPTION_KEYS, applied, strict=True)), errors


# -- enforce mode past the cgroup hook (bpf/bypass.h) ---------------------------

BYPASS_KEY = _H.struct("bk_bypass_key")
BYPASS = _H.struct("bk_bypass")
BYPASSED = _H.struct("bk_bypassed")
REPAIRED = _H.struct("bk_repaired")
MAX_BYPASS = _H.define("BK_MAX_BYPASS")


@dataclasses.dataclass(frozen=True)
class BypassNote:
    """A socket of an enforced policy the tracing programs saw a setsockopt
    leave outside the policy (struct bk_bypass_key -> bk_bypass)."""

    owner: int  # the policy's cgroup id
    cookie: int  # 0: every socket of the policy
    options: tuple[str, ...]  # left outside the policy
    calls: int


def decode_bypass_note(key: bytes, value: bytes) -> BypassNote:
    k, v = BYPASS_KEY.unpack(key), BYPASS.unpack(value)
    opts = int(v["opts"])  # type: ignore[arg-type]
    names = tuple(o.key for i, o in enumerate(BPF_OPTIONS) if opts & (1 << i))
    return BypassNote(int(k["owner"]), int(k["cookie"]), names, int(v["calls"]))  # type: ignore[arg-type]


@dataclasses.dataclass
class EnforceCounts:
    """One enforced policy: setsockopt calls past the cgroup hook that left
    an option outside it (struct bk_bypassed, counted by the tracing
    programs), and the sockets the daemon brought back (struct
    bk_repaired), by option."""

    bypassed: dict[str, int]
    unnoted: int  # sockets the tracing programs could not note (map full)
    repaired: dict[str, int]

    def as_dict(self) -> dict[str, object]:
        return {"bypassed": self.bypassed, "unnoted": self.unnoted, "repaired": self.repaired}


def _by_option(words: Sequence[int]) -> dict[str, int]:
    return dict(zip((o.key for o in BPF_OPTIONS), words, strict=True))


def decode_enforce_counts(bypassed: bytes | None, repaired: bytes | None) -> EnforceCounts:
    b = BYPASSED.unpack(bypassed) if bypassed is not None else None
    r = REPAIRED.unpack(repaired) if repaired is not None else None
    zeros = (0,) * NOPT
    return EnforceCounts(
        _by_option(b["calls"] if b else zeros),  # type: ignore[arg-type]
        int(b["unnoted"]) if b else 0,  # type: ignore[arg-type]
        _by_option(r["sockets"] if r else zeros),  # type: ignore[arg-type]
    )


def encode_repaired(sockets: dict[str, int]) -> bytes:
    return REPAIRED.pack(sockets=[sockets.get(o.key, 0) for o in BPF_OPTIONS])
