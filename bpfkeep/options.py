"""The one table of socket options bpfkeep manages.

Every other place -- the CLI flags, the config keys, the BPF program's
option ids, the preload shim's environment names, the docs -- derives from
``OPTIONS``.  The C headers under ``bpf/`` and ``preload/`` are generated
from it (``python -m bpfkeep.options``) and a test keeps them in sync.
"""

from __future__ import annotations

import dataclasses
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
    side: str  # "both", "connect" or "listen": where the shim applies it
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
        "default (keepidle + keepintvl * keepcnt) * 1000",
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
        "SYN retransmits before connect() gives up",
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


def parse_value(opt: Option, raw: object) -> int:
    """Validate one option value; raise UsageError naming the problem."""
    if isinstance(raw, bool):
        raise UsageError(f"{opt.key}: expected a whole number, got {raw!r}")
    if isinstance(raw, int):
        value = raw
    elif isinstance(raw, str):
        try:
            value = int(raw.strip(), 10)
        except ValueError:
            raise UsageError(
                f"{opt.key}: {raw!r} is not a whole number "
                f"(give {opt.unit}, {opt.minimum}..{opt.maximum}, "
                "or 0 for the kernel default)"
            ) from None
    else:
        raise UsageError(f"{opt.key}: expected a whole number, got {raw!r}")
    if value == 0:
        return 0
    if not opt.minimum <= value <= opt.maximum:
        raise UsageError(
            f"{opt.key}: {value} is out of range "
            f"(use {opt.minimum}..{opt.maximum} {opt.unit}, "
            "or 0 for the kernel default)"
        )
    return value


@dataclasses.dataclass(frozen=True)
class Policy:
    """Values bpfkeep applies to a cgroup's TCP sockets.

    0 means "leave the kernel default".  ``user_timeout`` defaults to the
    time keepalive needs to give up on a dead peer, as libkeepalive does.
    """

    keepidle: int = 15
    keepintvl: int = 15
    keepcnt: int = 9
    user_timeout: int = 150_000
    syncnt: int = 0
    maxseg: int = 0
    window_clamp: int = 0
    defer_accept: int = 0
    mode: str = "set"

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> Policy:
        """Build a validated policy; keys absent or None take defaults."""
        unknown = set(values) - set(BY_KEY) - {"mode"}
        if unknown:
            raise UsageError(f"unknown policy key {sorted(unknown)[0]!r}")
        kw: dict[str, object] = {}
        for opt in TUNABLE:
            raw = values.get(opt.key)
            kw[opt.key] = opt.default if raw is None else parse_value(opt, raw)
        if kw["user_timeout"] is None:
            kw["user_timeout"] = default_user_timeout(
                int(kw["keepidle"]), int(kw["keepintvl"]), int(kw["keepcnt"])
            )
        mode = values.get("mode") or "set"
        if mode not in MODES:
            raise UsageError(f"mode: {mode!r} is not one of set, enforce")
        kw["mode"] = mode
        return cls(**kw)  # type: ignore[arg-type]

    def value(self, key: str) -> int:
        return 1 if key == "keepalive" else int(getattr(self, key))

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def default_user_timeout(keepidle: int, keepintvl: int, keepcnt: int) -> int:
    """The time keepalive needs to drop a dead peer, in ms; 0 (kernel
    default) when any of the three is left to the host's sysctls."""
    if not (keepidle and keepintvl and keepcnt):
        return 0
    # Parenthesised on purpose: libkeepalive once shipped
    # ``idle + intvl * cnt * 1000``.
    return (keepidle + keepintvl * keepcnt) * 1000


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
    import pathlib

    root = pathlib.Path(argv[0] if argv else ".")
    for rel, guard in GENERATED.items():
        (root / rel).write_text(c_header(guard))
        print(f"wrote {root / rel}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
