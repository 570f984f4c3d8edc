"""The one table of socket options bpfkeep manages.

Every other place -- the CLI flags, the config keys, the BPF program's
option ids, the preload shim's environment names, the docs -- derives from
``OPTIONS``.  The C headers under ``bpf/`` and ``preload/`` are generated
from it (``python -m bpfkeep.options``) and a test keeps them in sync.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import sys
from collections.abc import Mapping

from bpfkeep.errors import UsageError

INT_MAX = 2**31 - 1

# Linux socket option numbers (include/uapi/asm-generic/socket.h,
# include/uapi/linux/tcp.h); identical on every architecture we support.
SOL_SOCKET = 1
IPPROTO_TCP = 6


@dataclasses.dataclass(frozen=True)
class Option:
    """A socket option bpfkeep can set."""

    key: str  # policy key: CLI --key (with '-' for '_') and config key
    optname: str  # kernel constant name
    level: str  # "SOL_SOCKET" or "IPPROTO_TCP"
    number: int  # kernel option number
    unit: str  # "s", "ms", "probes", "bytes", "retransmits", "bool"
    minimum: int  # smallest accepted non-zero value
    maximum: int
    default: int | None  # None: derived (user_timeout); 0: kernel default
    bpf: bool  # settable from sock_ops (bpf_setsockopt)
    bpf_since: tuple[int, int]  # first kernel whose sock_ops accepts it
    enforce: bool  # enforce mode caps the application's value
    # preload shim environment names: libkeepalive's (canonical), the
    # nginx-upstream shim's alias, the original libkeepalive's (Debian's
    # libkeepalive0); the first one set wins
    env: tuple[str, ...]
    # "both", "connect" or "listen": where it applies -- the shim at
    # connect()/listen(); the BPF programs ("connect": TCP_CONNECT_CB, and
    # in the sweep only sockets still connecting) likewise
    side: str
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option(
        "keepalive",
        "SO_KEEPALIVE",
        "SOL_SOCKET",
        9,
        "bool",
        1,
        1,
        1,
        True,
        (5, 10),
        True,
        (),
        "both",
        "always turned on: the point of bpfkeep",
    ),
    Option(
        "keepidle",
        "TCP_KEEPIDLE",
        "IPPROTO_TCP",
        4,
        "s",
        1,
        32767,
        15,
        True,
        (5, 10),
        True,
        ("TCP_KEEPIDLE", "FORCE_KEEPALIVE_IDLE", "KEEPIDLE"),
        "both",
        "idle time before the first keepalive probe",
    ),
    Option(
        "keepintvl",
        "TCP_KEEPINTVL",
        "IPPROTO_TCP",
        5,
        "s",
        1,
        32767,
        15,
        True,
        (5, 10),
        True,
        ("TCP_KEEPINTVL", "FORCE_KEEPALIVE_INTVL", "KEEPINTVL"),
        "both",
        "time between keepalive probes",
    ),
    Option(
        "keepcnt",
        "TCP_KEEPCNT",
        "IPPROTO_TCP",
        6,
        "probes",
        1,
        127,
        9,
        True,
        (5, 10),
        True,
        ("TCP_KEEPCNT", "FORCE_KEEPALIVE_CNT", "KEEPCNT"),
        "both",
        "unanswered probes before the connection is dropped",
    ),
    Option(
        "user_timeout",
        "TCP_USER_TIMEOUT",
        "IPPROTO_TCP",
        18,
        "ms",
        1,
        INT_MAX,
        None,
        True,
        (5, 10),
        True,
        ("TCP_USER_TIMEOUT",),
        "both",
        "how long sent data may stay unacknowledged; "
        "default (keepidle + keepintvl * keepcnt) * 1000.  It also bounds the "
        "handshake, in place of the time --syncnt implies (0: keep that)",
    ),
    Option(
        "syncnt",
        "TCP_SYNCNT",
        "IPPROTO_TCP",
        7,
        "retransmits",
        1,
        127,
        0,
        True,
        (5, 10),
        False,
        ("TCP_SYNCNT",),
        "connect",
        "SYN retransmits before connect() gives up.  A user timeout (the derived "
        "default too) replaces the time this implies: to a blackholed peer "
        "--syncnt 2 gives up after ~11 s and 7 SYNs, with --user-timeout 0 after "
        "~7 s and 6 SYNs (Linux 6.18)",
    ),
    Option(
        "maxseg",
        "TCP_MAXSEG",
        "IPPROTO_TCP",
        2,
        "bytes",
        88,
        32767,
        0,
        True,
        (6, 1),
        False,
        ("TCP_MAXSEG",),
        "both",
        "maximum segment size",
    ),
    Option(
        "window_clamp",
        "TCP_WINDOW_CLAMP",
        "IPPROTO_TCP",
        10,
        "bytes",
        1,
        INT_MAX,
        0,
        True,
        (6, 1),
        False,
        ("TCP_WINDOW_CLAMP",),
        "both",
        "bound on the advertised receive window",
    ),
    Option(
        "defer_accept",
        "TCP_DEFER_ACCEPT",
        "IPPROTO_TCP",
        9,
        "s",
        1,
        INT_MAX,
        0,
        False,
        (0, 0),
        False,
        ("TCP_DEFER_ACCEPT",),
        "listen",
        "wake accept() only when data arrives (sock_ops refuses it: preload shim only)",
    ),
)

BY_KEY: Mapping[str, Option] = {o.key: o for o in OPTIONS}
BPF_OPTIONS: tuple[Option, ...] = tuple(o for o in OPTIONS if o.bpf)
# Options a user can set (keepalive itself is always on).
TUNABLE: tuple[Option, ...] = tuple(o for o in OPTIONS if o.key != "keepalive")
MODES = ("set", "enforce")


# A whole number as the CLI and the config accept it: ASCII digits, an
# optional minus (so that -1 is answered "out of range", not "not a
# number").  int() alone also takes " 15 ", "1_000", "+15" and every
# Unicode digit ("١٥"); none of those is what an operator means to type.
_WHOLE = re.compile(r"-?[0-9]+")
# More digits than any option's range can hold: out of range without
# asking int(), which refuses strings beyond 4300 digits with ValueError.
_MAX_DIGITS = len(str(INT_MAX))


def show_value(raw: object, limit: int = 40) -> str:
    """``repr(raw)`` cut short: one line, whatever the input."""
    text = repr(raw)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_value(opt: Option, raw: object) -> int:
    """Validate one option value; raise UsageError naming the problem."""
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise UsageError(f"{opt.key}: expected a whole number, got {show_value(raw)}")
    value: int | None
    if isinstance(raw, int):
        value = raw
    elif _WHOLE.fullmatch(raw):
        digits = raw.lstrip("-").lstrip("0")
        value = int(raw, 10) if len(digits) <= _MAX_DIGITS else None
    else:
        raise UsageError(
            f"{opt.key}: {show_value(raw)} is not a whole number "
            f"(give {opt.unit}, {opt.minimum}..{opt.maximum}, "
            "or 0 for the kernel default)"
        )
    if value == 0:
        return 0
    if value is None or not opt.minimum <= value <= opt.maximum:
        shown = show_value(raw if value is None else value)
        raise UsageError(
            f"{opt.key}: {shown} is out of range "
            f"(use {opt.minimum}..{opt.maximum} {opt.unit}, "
            "or 0 for the kernel default)"
        )
    return value


def dead_peer_seconds(keepidle: int, keepintvl: int, keepcnt: int) -> int:
    """Seconds from the last packet until keepalive drops a dead peer: the
    idle time, then ``keepcnt`` unanswered probes ``keepintvl`` apart.
    The one place of this formula in Python: the derived user timeout,
    the metrics' bound, audit and doctor all use it.  The BPF programs
    (bk_derived_ut in bpf/) and the shim
    (derive_user_timeout in preload/policy.c) have their own in C;
    tests/test_dead_peer.py checks all three through the kernel."""
    return keepidle + keepintvl * keepcnt


def default_user_timeout(keepidle: int, keepintvl: int, keepcnt: int) -> int:
    """The time keepalive needs to drop a dead peer, in ms; 0 (kernel
    default) when any of the three is left to the host's sysctls.

    At most INT_MAX: TCP_USER_TIMEOUT takes an int and the kernel refuses
    more, while the largest keepalive times derive (32767 + 32767 * 127) *
    1000 = 4,194,176,000 ms.  The shim caps it the same way
    (derive_user_timeout in preload/policy.c)."""
    if not (keepidle and keepintvl and keepcnt):
        return 0
    # Parenthesised on purpose: libkeepalive once shipped
    # ``idle + intvl * cnt * 1000``.
    return min(dead_peer_seconds(keepidle, keepintvl, keepcnt) * 1000, INT_MAX)


def dead_peer_bound(policy: Policy, host: tuple[int, int, int]) -> int:
    """Seconds until a socket under ``policy`` drops a dead idle peer:
    keepidle + keepintvl x keepcnt, a time left at 0 being the host's
    sysctl (``host``: kernel.procfs.keepalive_sysctls) -- keepcnt 0 with 60/10
    and the default 9 probes is 150 s, not 60.  An explicit user timeout
    replaces the probe count."""
    idle, intvl, cnt = (
        v or h
        for v, h in zip((policy.keepidle, policy.keepintvl, policy.keepcnt), host, strict=True)
    )
    ut = policy.user_timeout
    if not ut:
        return dead_peer_seconds(idle, intvl, cnt)
    # With TCP_USER_TIMEOUT set the probe count no longer decides
    # (tcp_keepalive_timer, Linux 6.1 and 6.18 alike): the keepalive timer
    # fires at keepidle and then every keepintvl, and drops the connection
    # at the first firing where a probe is out and the time since the last
    # packet received has reached the user timeout -- so after
    # ceil((user_timeout - keepidle) / keepintvl) probes, at least one.
    # (The derived user timeout gives keepcnt probes, as without it.)
    probes = max(1, -(-(ut - idle * 1000) // (intvl * 1000)))
    return dead_peer_seconds(idle, intvl, probes)


# keepidle = "auto": where it starts, and the lowest it goes (s).
AUTO_MAX, AUTO_MIN = 300, 10
# Keys of a policy that are not socket options.
LEARNING_KEYS = ("keepidle_min", "keepidle_max", "idle_limit")


def _seconds(key: str, raw: object) -> int:
    """A keepalive time in seconds, 1..32767 (keepidle_min, idle_limit...)."""
    value = parse_value(BY_KEY["keepidle"], raw)
    if not value:
        raise UsageError(f"{key}: 0 is out of range (use 1..{BY_KEY['keepidle'].maximum} s)")
    return value


def learned_keepidle(limit: float | None, lo: int, hi: int) -> int:
    """keepidle for a path whose idle limit is ``limit`` (None: unknown):
    half of it, within lo..hi (see bpfkeep.learning)."""
    if not limit:
        return hi
    return int(min(hi, max(lo, limit // 2)))


def _default(key: str) -> int:
    default = BY_KEY[key].default
    assert default is not None, key
    return default


@dataclasses.dataclass(frozen=True)
class Policy:
    """Values bpfkeep applies to a cgroup's TCP sockets.

    0 means "leave the kernel default".  The defaults are the option
    table's.  ``user_timeout`` left out (None) is derived from the
    keepalive values, as libkeepalive does: the time keepalive needs to
    give up on a dead peer -- the same whether the policy is built here or
    through ``from_mapping``.
    """

    keepidle: int = _default("keepidle")
    keepintvl: int = _default("keepintvl")
    keepcnt: int = _default("keepcnt")
    user_timeout: int = None  # type: ignore[assignment]  # None: derived in __post_init__
    syncnt: int = _default("syncnt")
    maxseg: int = _default("maxseg")
    window_clamp: int = _default("window_clamp")
    defer_accept: int = _default("defer_accept")
    mode: str = "set"
    # Peer rules (bpfkeep.peers.Peer): other values, or none, for the
    # connections to some peers; the most specific rule wins.
    peers: tuple = ()
    # keepidle = "auto": learned from the path (bpfkeep.learning), within
    # keepidle_min..keepidle_max; ``keepidle`` is then where it starts.
    auto: bool = False
    keepidle_min: int = AUTO_MIN
    keepidle_max: int = AUTO_MAX
    # A peer rule's path idle limit as the operator knows it (s; 0: not
    # stated): keepidle is derived from it as from a learned one.
    idle_limit: int = 0
    # Whether user_timeout was derived (left out) rather than given: only a
    # derived one follows the keepalive times a program sets itself, so a
    # value written out equal to the derived one is the operator's, fixed.
    # Kept as ``ut_derived`` (not a policy value: not in fields() or
    # as_dict()), but part of equality.  None: derived when user_timeout is.
    user_timeout_derived: dataclasses.InitVar[bool | None] = None

    def __post_init__(self, user_timeout_derived: bool | None) -> None:
        derived = user_timeout_derived
        if self.user_timeout is None:
            value = default_user_timeout(self.keepidle, self.keepintvl, self.keepcnt)
            object.__setattr__(self, "user_timeout", value)
            derived = True if derived is None else derived
        object.__setattr__(self, "ut_derived", bool(derived))

    def _key(self) -> tuple:
        # Shallow: the peers compare as Peers (whose policies compare with
        # their own ut_derived), not flattened to tuples.
        return (*(getattr(self, name) for name in _POLICY_FIELDS), self.ut_derived)

    def __eq__(self, other: object) -> bool:
        if other is self:
            return True
        if other.__class__ is not self.__class__:
            return NotImplemented
        return hash(self) == hash(other) and self._key() == other._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        # Kept once computed (the values never change): a policy with peer
        # rules hashes every rule's policy, and the daemon looks policies
        # up per cgroup (maps._template, peer_set) -- 10,000 times a reload.
        try:
            return self.__dict__["_hash"]
        except KeyError:
            h = hash(self._key())
            object.__setattr__(self, "_hash", h)
            return h

    def with_peers(self, peers: tuple) -> Policy:
        """The same values and mode with these peer rules."""
        return dataclasses.replace(self, peers=tuple(peers), user_timeout_derived=self.ut_derived)

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> Policy:
        """Build a validated policy; keys absent or None take defaults.
        ``keepidle = "auto"`` learns it (see bpfkeep.learning); a stated
        ``idle_limit`` derives it."""
        unknown = set(values) - set(BY_KEY) - {"mode", *LEARNING_KEYS}
        if unknown:
            raise UsageError(f"unknown policy key {show_value(sorted(unknown)[0])}")
        kw: dict[str, object] = {}
        for key in LEARNING_KEYS:
            if values.get(key) is not None:
                kw[key] = _seconds(key, values[key])
        lo, hi = kw.get("keepidle_min", AUTO_MIN), kw.get("keepidle_max", AUTO_MAX)
        if lo > hi:  # type: ignore[operator]
            raise UsageError(f"keepidle_min: {lo} is above keepidle_max ({hi})")
        raw_idle = values.get("keepidle")
        if isinstance(raw_idle, str) and raw_idle.strip().lower() == "auto":
            kw["auto"] = True
            values = {k: v for k, v in values.items() if k != "keepidle"}
        for opt in TUNABLE:
            raw = values.get(opt.key)
            if raw is not None:
                kw[opt.key] = parse_value(opt, raw)
        limit = kw.get("idle_limit")
        if kw.get("auto") or limit:
            start = learned_keepidle(limit or None, lo, hi)  # type: ignore[arg-type]
            if "keepidle" in kw and limit and not 0 < kw["keepidle"] < limit:  # type: ignore[operator]
                raise UsageError(
                    f"keepidle: {kw['keepidle']} is not below idle_limit ({limit}): leave "
                    "keepidle out to derive it from the limit"
                )
            kw.setdefault("keepidle", start)
        mode = values.get("mode") or "set"
        if mode not in MODES:
            raise UsageError(f"mode: {show_value(mode)} is not one of set, enforce")
        kw["mode"] = mode
        return cls(**kw)  # type: ignore[arg-type]

    @property
    def learns(self) -> bool:
        """keepidle = "auto" in the policy or one of its peer rules."""
        return self.auto or any(r.policy is not None and r.policy.auto for r in self.peers)

    def with_keepidle(self, keepidle: int) -> Policy:
        """The same policy with another keepidle (a learned one): a derived
        user timeout follows it."""
        ut = None if self.ut_derived else self.user_timeout
        return dataclasses.replace(
            self, keepidle=keepidle, user_timeout=ut, user_timeout_derived=self.ut_derived
        )

    def value(self, key: str) -> int:
        return 1 if key == "keepalive" else int(getattr(self, key))

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("peers", "auto", *LEARNING_KEYS)
        }
        if self.auto:
            d.update(auto=True, keepidle_min=self.keepidle_min, keepidle_max=self.keepidle_max)
        if self.idle_limit:
            d["idle_limit"] = self.idle_limit
        if self.peers:
            d["peers"] = [p.as_dict() for p in self.peers]
        return d


_POLICY_FIELDS = tuple(f.name for f in dataclasses.fields(Policy))


# --- generated C headers ------------------------------------------------


def c_header(guard: str) -> str:
    lines = [
        "/* Generated by `python -m bpfkeep.options` from bpfkeep/options.py. Do not edit. */",
        f"#ifndef {guard}",
        f"#define {guard}",
        "",
        "/* Option ids: index of the option in bpfkeep's option table. */",
    ]
    for i, opt in enumerate(OPTIONS):
        lines.append(f"#define BK_OPT_{opt.key.upper():<14} {i:2d} /* {opt.optname}, {opt.unit} */")
    lines += [
        f"#define BK_NOPT {len(OPTIONS)}",
        f"#define BK_NOPT_BPF {len(BPF_OPTIONS)} "
        "/* ids 0..BK_NOPT_BPF-1 are settable from sock_ops */",
        "",
    ]
    for opt in OPTIONS:
        k = opt.key.upper()
        lines.append(f"#define BK_{k}_MIN {opt.minimum}\n#define BK_{k}_MAX {opt.maximum}")
        if opt.default is not None:
            lines.append(f"#define BK_{k}_DEFAULT {opt.default}")
        level = SOL_SOCKET if opt.level == "SOL_SOCKET" else IPPROTO_TCP
        lines.append(f"#define BK_{k}_LEVEL {level}\n#define BK_{k}_OPTNAME {opt.number}")
    lines += [
        "",
        "#define BK_SIDE_BOTH 0",
        "#define BK_SIDE_CONNECT 1",
        "#define BK_SIDE_LISTEN 2",
        "",
        "/* X(id, level, optname, min, max, default, side, enforce, unit,",
        " *   env, env_alias, env_legacy)",
        " * default -1: derived ((keepidle + keepintvl * keepcnt) * 1000);",
        " * enforce 1: enforce mode caps the application's value;",
        " * env names NULL: none. */",
        "#define BK_OPTION_TABLE(X) \\",
    ]
    for opt in OPTIONS:
        envs = [f'"{e}"' for e in opt.env] + ["NULL"] * (3 - len(opt.env))
        default = -1 if opt.default is None else opt.default
        lines.append(
            f"\tX(BK_OPT_{opt.key.upper()}, {opt.level}, {opt.optname}, "
            f"{opt.minimum}, {opt.maximum}, {default}, "
            f'BK_SIDE_{opt.side.upper()}, {int(opt.enforce)}, "{opt.unit}", '
            f"{', '.join(envs)}) \\"
        )
    lines[-1] = lines[-1][: -len(" \\")]
    lines += ["", f"#endif /* {guard} */", ""]
    return "\n".join(lines)


# One header for the BPF programs and the preload shim (-I../bpf).
GENERATED = {"bpf/bpfkeep_options.h": "BPFKEEP_OPTIONS_H"}


def main(argv: list[str] | None = None) -> int:
    root = pathlib.Path(argv[0] if argv else ".")
    for rel, guard in GENERATED.items():
        (root / rel).write_text(c_header(guard))
        print(f"wrote {root / rel}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
