"""bpf/bpfkeep.h as userspace reads it: encoding policies, decoding counters.

Nothing here is mirrored by hand.  The flags, callback ids, errno buckets,
sweep actions and struct layouts are read from the very header the BPF
programs are compiled from (the installed package's copy, which
bpf/bpfkeep_options.h, generated from the option table, joins), once, at
import.  tests/test_layout.py compares the layouts with the BTF of the
loaded programs' maps.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
import re
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from bpfkeep.errors import EnvironmentProblem
from bpfkeep.options import BPF_OPTIONS, Policy, default_user_timeout

# -- reading the header ------------------------------------------------------------

# The fixed-width types the header is written in (no padding holes: a
# test checks the compiled object), as struct module codes.
_CTYPES = {
    "__u8": "B",
    "__u16": "H",
    "__u32": "I",
    "__u64": "Q",
    "__s8": "b",
    "__s16": "h",
    "__s32": "i",
    "__s64": "q",
}
_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)
_DEFINE = re.compile(r"^\s*#\s*define\s+(\w+)(\(?)(.*)$", re.M)
_STRUCT = re.compile(r"\bstruct\s+(\w+)\s*\{([^{}]*)\}\s*;")
_MEMBER = re.compile(r"^(\w+)\s+(\w+)\s*((?:\[[^\]]+\]\s*)*)$")


class HeaderError(EnvironmentProblem):
    """The installed bpfkeep.h cannot be read as this code expects."""


@dataclasses.dataclass(frozen=True)
class Member:
    """One member of a C struct: fixed-width scalar or (nested) array."""

    name: str
    ctype: str  # "__u32"
    dims: tuple[int, ...]  # () for a scalar; (8, 8) for x[8][8]
    offset: int  # bytes

    @property
    def count(self) -> int:
        return math.prod(self.dims)

    @property
    def size(self) -> int:
        return struct.calcsize(_CTYPES[self.ctype]) * self.count


@dataclasses.dataclass(frozen=True)
class Layout:
    """A struct as the C compiler lays it out (natural alignment)."""

    name: str
    members: tuple[Member, ...]
    size: int

    @functools.cached_property
    def fmt(self) -> str:
        """struct module format, padding spelled out."""
        parts, at = ["="], 0
        for m in self.members:
            if m.offset > at:
                parts.append(f"{m.offset - at}x")
            parts.append(f"{m.count}{_CTYPES[m.ctype]}")
            at = m.offset + m.size
        if self.size > at:
            parts.append(f"{self.size - at}x")
        return "".join(parts)

    def pack(self, **values: int | Sequence[int]) -> bytes:
        """Members by name; absent ones are 0; arrays flat, in C order."""
        unknown = set(values) - {m.name for m in self.members}
        if unknown:
            raise TypeError(f"struct {self.name} has no member {sorted(unknown)[0]}")
        flat: list[int] = []
        for m in self.members:
            v = values.get(m.name, 0)
            if m.dims:
                v = list(v) if not isinstance(v, int) else [v] * m.count
                if len(v) != m.count:
                    raise ValueError(f"struct {self.name}.{m.name}: {len(v)} values, not {m.count}")
                flat += v
            else:
                flat.append(int(v))  # type: ignore[arg-type]
        return self._struct.pack(*flat)

    @functools.cached_property
    def _struct(self) -> struct.Struct:
        return struct.Struct(self.fmt)

    @functools.cached_property
    def _slots(self) -> tuple[tuple[str, int, int], ...]:
        """(name, first word, word count; 0 for a scalar) of each member."""
        out, i = [], 0
        for m in self.members:
            out.append((m.name, i, m.count if m.dims else 0))
            i += m.count
        return tuple(out)

    def unpack(self, raw: bytes, offset: int = 0) -> dict[str, int | tuple[int, ...]]:
        """Members by name; arrays flat, in C order."""
        words = self._struct.unpack_from(raw, offset)
        return {
            name: words[i : i + n] if n else words[i]  # type: ignore[misc]
            for name, i, n in self._slots
        }


@dataclasses.dataclass(frozen=True)
class Header:
    defines: Mapping[str, int]  # object-like macros with an integer value
    structs: Mapping[str, Layout]

    def define(self, name: str) -> int:
        try:
            return self.defines[name]
        except KeyError:
            raise HeaderError(f"bpfkeep.h defines no {name}: reinstall bpfkeep") from None

    def struct(self, name: str) -> Layout:
        try:
            return self.structs[name]
        except KeyError:
            raise HeaderError(f"bpfkeep.h declares no struct {name}: reinstall bpfkeep") from None

    def enumerate(self, prefix: str) -> tuple[str, ...]:
        """The names after ``prefix`` of the defines numbering 0..n-1
        (BK_CB_CONNECT 0, BK_CB_LISTEN 1, ...), in their order."""
        found = {n[len(prefix) :]: v for n, v in self.defines.items() if n.startswith(prefix)}
        names = sorted(found, key=found.__getitem__)
        if [found[n] for n in names] != list(range(len(names))):
            raise HeaderError(f"bpfkeep.h: the {prefix}* values are not 0..{len(names) - 1}")
        return tuple(names)


def _source(path: Path, seen: frozenset[Path] = frozenset()) -> str:
    """The header's text, with its own ``#include "..."`` files inlined."""
    if path in seen:
        return ""
    text = path.read_text()

    def inline(m: re.Match[str]) -> str:
        return _source(path.parent / m.group(1), seen | {path})

    return _INCLUDE.sub(inline, text)


def _evaluate(expr: str, names: Mapping[str, str], depth: int = 0) -> int | None:
    """An integer constant expression of the header (literals, other
    defines, arithmetic and bit operators); None for anything else."""
    if depth > 32:
        return None
    # C integer suffixes (1u, 0x10UL) mean nothing to the value.
    expr = re.sub(r"\b(0[xX][0-9a-fA-F]+|[0-9]+)[uUlL]+\b", r"\1", expr)
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        return None

    def ev(node: ast.AST) -> int | None:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in names:
                return None
            return _evaluate(names[node.id], names, depth + 1)
        if isinstance(node, ast.UnaryOp):
            v = ev(node.operand)
            unary = {ast.USub: lambda: -v, ast.UAdd: lambda: v, ast.Invert: lambda: ~v}
            op = unary.get(type(node.op))
            return op() if op and v is not None else None
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            if a is None or b is None:
                return None
            ops = {
                ast.Add: lambda: a + b,
                ast.Sub: lambda: a - b,
                ast.Mult: lambda: a * b,
                ast.LShift: lambda: a << b,
                ast.RShift: lambda: a >> b,
                ast.BitOr: lambda: a | b,
                ast.BitAnd: lambda: a & b,
            }
            op = ops.get(type(node.op))
            return op() if op else None
        return None

    return ev(tree)


def parse_header(text: str) -> Header:
    """The integer defines and the structs of C header text (includes
    already inlined).  Strict about structs: a member that is not a
    fixed-width scalar or array of one is an error, not a guess."""
    code = _COMMENT.sub(" ", text).replace("\\\n", " ")
    raw: dict[str, str] = {}
    for m in _DEFINE.finditer(code):
        if not m.group(2):  # function-like macros (X(...)) are no constants
            raw[m.group(1)] = m.group(3)
    defines: dict[str, int] = {}
    for name, expr in raw.items():
        v = _evaluate(expr, raw)
        if v is not None:
            defines[name] = v
    structs: dict[str, Layout] = {}
    for m in _STRUCT.finditer(code):
        structs[m.group(1)] = _layout(m.group(1), m.group(2), defines)
    return Header(defines, structs)


def _layout(name: str, body: str, defines: Mapping[str, int]) -> Layout:
    members: list[Member] = []
    at, align = 0, 1
    for decl in (d.strip() for d in body.split(";")):
        if not decl:
            continue
        m = _MEMBER.match(" ".join(decl.split()))
        if not m or m.group(1) not in _CTYPES:
            raise HeaderError(f"bpfkeep.h: struct {name}: cannot read member {decl!r}")
        dims = []
        for d in re.findall(r"\[([^\]]+)\]", m.group(3)):
            n = _evaluate(d, {k: str(v) for k, v in defines.items()})
            if n is None or n <= 0:
                raise HeaderError(f"bpfkeep.h: struct {name}.{m.group(2)}: bad size [{d}]")
            dims.append(n)
        width = struct.calcsize(_CTYPES[m.group(1)])
        at = (at + width - 1) // width * width
        member = Member(m.group(2), m.group(1), tuple(dims), at)
        members.append(member)
        at += member.size
        align = max(align, width)
    return Layout(name, tuple(members), (at + align - 1) // align * align)


@functools.cache
def header(path: Path | None = None) -> Header:
    """bpfkeep.h of the installed package (or of the checkout), parsed."""
    if path is None:
        from bpfkeep.loader import bpf_dir

        path = bpf_dir() / "bpfkeep.h"
    try:
        return parse_header(_source(path))
    except OSError as e:
        raise HeaderError(f"cannot read {path}: {e.strerror}: reinstall bpfkeep") from None


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
SWI_RESET_SHIFT = _H.define("BK_SWI_RESET_SHIFT")  # UNDO: which options to reset
SWR_SEEN = _H.define("BK_SWR_SEEN")
SWR_APP_OWN = _H.define("BK_SWR_APP_OWN")
SWR_NO_POLICY = _H.define("BK_SWR_NO_POLICY")
SWR_NO_STORAGE = _H.define("BK_SWR_NO_STORAGE")
SWR_CURRENT = _H.define("BK_SWR_CURRENT")
MAX_SWEEP = _H.define("BK_MAX_SWEEP")  # sockets per sweep batch (map size)
COUNTERS = _H.struct("bk_counters")
COUNTERS_SIZE = COUNTERS.size
COUNTERS_WORDS = COUNTERS_SIZE // 8
SWEEPSTATS = _H.struct("bk_sweepstats")
SWEEPSTATS_SIZE = SWEEPSTATS.size
SWEEPSTATS_WORDS = SWEEPSTATS_SIZE // 8


def policy_flags(policy: Policy) -> int:
    """The flags the BPF programs act on (not ACTIVE, not MANAGED)."""
    flags = F_ENFORCE if policy.mode == "enforce" else 0
    if policy.ut_derived:
        flags |= F_UT_DERIVED
    return flags


def policy_gen(policy: Policy) -> int:
    """A generation number that changes whenever the values or the mode do:
    a socket whose record carries another generation is brought up to date
    (an accepted socket, by the sweep).  Never 0, which means "not applied"."""
    vals = [policy.value(o.key) for o in BPF_OPTIONS]
    raw = struct.pack(f"=I{NOPT}I", policy_flags(policy), *vals)
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
) -> bytes:
    """A bk_policy value; ``level`` is the cgroup's depth below the root,
    so that the most specific of nested policies wins.  ``gen`` defaults to
    one derived from the values (see :func:`fresh_gen` for attachments).
    ``nesting``: F_HAS_ANCESTOR / F_HAS_DESCENDANT.  ``prev``: the policy
    whose values the sockets carried until now (before an update, or an
    ancestor's), recognised as bpfkeep's on sockets without a record."""
    flags = policy_flags(policy) | (F_ACTIVE if active else 0) | (F_MANAGED if managed else 0)
    flags |= nesting & F_NESTING
    vals = [policy.value(o.key) for o in BPF_OPTIONS]
    gen = policy_gen(policy) if gen is None else gen
    fp: tuple[int, ...] = (0,) * NFP
    if prev is not None and prev_differs(prev, policy):
        flags |= F_PREV
        fp = fingerprint(prev)
    return POLICY.pack(cgroup_id=cgroup_id, flags=flags, gen=gen, level=level, val=vals, prev=fp)


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
    return int(POLICY.unpack(raw)["flags"])  # type: ignore[arg-type]


def with_flags(raw: bytes, flags: int) -> bytes:
    """The same bk_policy value with other flags."""
    at = next(m.offset for m in POLICY.members if m.name == "flags")
    return raw[:at] + struct.pack("=I", flags) + raw[at + 4 :]


def fresh_gen() -> int:
    """A new generation for a new attachment or changed values: random, so
    that the same policy attached again after a detach is not mistaken for
    the one before (sockets may have changed meanwhile).  Never 0."""
    import secrets

    return secrets.randbits(32) or 1


def decode_policy(raw: bytes) -> tuple[int, int, Policy]:
    """(cgroup id, flags, policy) from a bk_policy value."""
    f = POLICY.unpack(raw)
    return _policy(f["cgroup_id"], f["flags"], f["val"])  # type: ignore[arg-type]


def _policy(
    cgroup_id: int, flags: int, vals: Sequence[int], derived: bool | None = None
) -> tuple[int, int, Policy]:
    """``derived``: whether the user timeout follows the keepalive times;
    None: the F_UT_DERIVED flag says."""
    values = {o.key: v for o, v in zip(BPF_OPTIONS, vals, strict=True) if o.key != "keepalive"}
    mode = "enforce" if flags & F_ENFORCE else "set"
    if derived is None:
        derived = bool(flags & F_UT_DERIVED)
    return cgroup_id, flags, Policy(**values, mode=mode, user_timeout_derived=derived)


# The bk_policy layout of bpfkeep 0.1 (no gen, no level): attachments
# made by it are migrated (Enforcer._migrate_one).  A past layout, not in
# today's header: tests/test_layout.py reads it from 0.1's copy of it
# (tests/data/bpf-0.1).
LEGACY_POLICY_FMT = f"=QI{NOPT}II"
LEGACY_POLICY_SIZE = struct.calcsize(LEGACY_POLICY_FMT)
# The layout before prev[] (cgroup_id, flags, gen, level, val[], pad):
# attachments made by it are migrated too.
NOPREV_POLICY_FMT = f"=QIII{NOPT}II"
NOPREV_POLICY_SIZE = struct.calcsize(NOPREV_POLICY_FMT)


def decode_any_policy(raw: bytes) -> tuple[int, int, Policy] | None:
    """decode_policy for this layout or an earlier one; None if unknown."""
    if len(raw) == POLICY_SIZE:
        return decode_policy(raw)
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

    def inputs(self) -> tuple:
        """What encode() writes: entries with equal inputs encode alike."""
        return (self.owner, self.action, self.in_flags, self.val, self.fp)

    def encode(self) -> bytes:
        """The inputs only; the outputs start at 0."""
        owner, action, in_flags, val, fp = self.inputs()
        return SWEEP.pack(
            owner=owner,
            action=action,
            in_flags=in_flags,
            val=[v & 0xFFFFFFFF for v in val],
            fp=fp,
        )

    @classmethod
    def decode(cls, raw: bytes) -> SweepEntry:
        f = SWEEP.unpack(raw)
        f.pop("fp")  # input only: not decoded
        vals = f.pop("val")
        signed = tuple(v - (1 << 32) if v >= 1 << 31 else v for v in vals)  # type: ignore[union-attr]
        return cls(**f, val=signed)  # type: ignore[arg-type]

    def values(self) -> dict[str, int]:
        return {o.key: v for o, v in zip(BPF_OPTIONS, self.val, strict=True)}

    @staticmethod
    def names(bits: int) -> list[str]:
        return [o.key for i, o in enumerate(BPF_OPTIONS) if bits >> i & 1]


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

    def as_dict(self) -> dict[str, object]:
        return {
            "seen": self.seen,
            "inherited": self.inherited,
            "applied": self.applied,
            "failed": {f"{o}/{e}": n for (o, e), n in self.failed.items()},
            "rewritten": self.rewritten,
            "sweep": self.sweep.as_dict() if self.sweep else None,
        }


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
    total: dict[str, list[int]] = {}
    for cpu in range(len(raw) // COUNTERS_SIZE):
        for name, v in COUNTERS.unpack(raw, cpu * COUNTERS_SIZE).items():
            words = (v,) if isinstance(v, int) else v
            acc = total.setdefault(name, [0] * len(words))
            for i, w in enumerate(words):
                acc[i] += w
    if not total:
        total = {m.name: [0] * m.count for m in COUNTERS.members}
    seen = dict(zip(CALLBACKS, total["seen"], strict=True))
    applied, failed = _applied_and_failed(total["applied"], total["failed"])
    rewritten = dict(zip((o.key for o in BPF_OPTIONS), total["rewritten"], strict=True))
    return Counters(seen, total["inherited"][0], applied, failed, rewritten)


def _applied_and_failed(
    applied: Sequence[int], failed: Sequence[int]
) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """The ``applied[NOPT]`` and ``failed[NOPT][NERR]`` arrays that both
    counter structs carry; failures that never happened are left out."""
    names = [o.key for o in BPF_OPTIONS]
    by_option = dict(zip(names, applied, strict=True))
    errors = {}
    for i, n in enumerate(names):
        for j, e in enumerate(ERRNO_BUCKETS):
            v = failed[i * len(ERRNO_BUCKETS) + j]
            if v:
                errors[(n, e)] = v
    return by_option, errors
