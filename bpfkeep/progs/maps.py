"""Every bk_* value userspace writes or reads, encoded and decoded in one
place from the layouts of bpf/bpfkeep.h (progs.header): policies
(``struct bk_policy``), the sweep's work items (``struct bk_sweep``) and
the counters (``struct bk_counters``, ``struct bk_sweepstats``).
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
import struct
import sys
import zlib
from collections.abc import Sequence

from bpfkeep.options import BPF_OPTIONS, Policy, default_user_timeout
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
        and raw[_CGROUP] == struct.pack("=Q", cgroup_id)
    )


_PREV = POLICY.span("prev", "pad")


def keep_prev(value: bytes, old: bytes) -> bytes:
    """``value`` with ``old``'s prev[] and its F_PREV and F_SWEPT flags:
    the same values again leave the sockets as they were (what they
    carried before still counts as bpfkeep's until a sweep)."""
    keep = F_PREV | F_SWEPT
    flags = policy_raw_flags(value) & ~keep | policy_raw_flags(old) & keep
    return with_flags(value[: _PREV.start] + old[_PREV.start :], flags)


def fresh_gen() -> int:
    """A new generation for a new attachment or changed values: random, so
    that the same policy attached again after a detach is not mistaken for
    the one before (sockets may have changed meanwhile).  Never 0."""
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
# made by it are migrated (pins.attach).  A past layout, not in
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
    total = COUNTERS.unpack_summed(raw)
    applied, failed = _applied_and_failed(total["applied"], total["failed"])  # type: ignore[arg-type]
    return Counters(
        dict(zip(CALLBACKS, total["seen"], strict=True)),  # type: ignore[arg-type]
        total["inherited"],  # type: ignore[arg-type]
        applied,
        failed,
        dict(zip(_OPTION_KEYS, total["rewritten"], strict=True)),  # type: ignore[arg-type]
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
