"""Userspace mirror of bpf/bpfkeep.h: encoding policies, decoding counters."""

from __future__ import annotations

import dataclasses
import functools
import struct
import zlib
from collections.abc import Iterator

from bpfkeep.options import BPF_OPTIONS, Policy, default_user_timeout

NOPT = len(BPF_OPTIONS)
F_ACTIVE = 0x1
F_ENFORCE = 0x2
F_MANAGED = 0x4  # owned by the daemon; the BPF programs ignore it
F_UT_DERIVED = 0x8  # the user timeout follows the keepalive times in force
F_HAS_ANCESTOR = 0x10  # an ancestor cgroup has a policy: sockets get a record
F_HAS_DESCENDANT = 0x20  # a descendant has a policy: its records are looked for
F_PREV = 0x40  # prev[]: the values sockets carried before the last change
F_SWEPT = 0x80  # a complete sweep ran since the last change (accepted sockets: nothing to do)
F_NESTING = F_HAS_ANCESTOR | F_HAS_DESCENDANT
# bk_policy.prev[] and bk_sweep.fp[]: the keepalive values that tell
# bpfkeep's sockets from those whose program chose its own (BK_FP_*)
FP_KEYS = ("keepidle", "keepintvl", "keepcnt", "user_timeout")
NFP = len(FP_KEYS)

CALLBACKS = ("connect", "listen", "passive_established")
# Index = BK_ERR_* bucket in bpfkeep.h
ERRNO_BUCKETS = (
    "other",
    "EPERM",
    "EINVAL",
    "ENOPROTOOPT",
    "EOPNOTSUPP",
    "ENOTSUPP",
    "EFAULT",
    "EBUSY",
)

POLICY_FMT = f"=QIII{NOPT}I{NFP}II"  # cgroup_id, flags, gen, level, val[], prev[], pad
POLICY_SIZE = struct.calcsize(POLICY_FMT)
# struct bk_sk: owner, gen, level, app
SK_FMT = "=QIHH"
# struct bk_sweep: owner, action, in_flags, result, applied, failed,
# rec_owner, rec_gen, rec_app, rec_level, val[], fp[]
SWEEP_FMT = f"=QIIIHHQIHH{NOPT}I{NFP}I"
SWEEP_SIZE = struct.calcsize(SWEEP_FMT)
SWEEP_APPLY, SWEEP_UNDO, SWEEP_READ = 1, 2, 3
SWI_SYN_SENT = 0x1
SWI_HELD = 0x2  # made elsewhere, held by the policy's processes
SWI_FP = 0x4  # fp[] holds values bpfkeep gave the socket (UNDO, a former owner's)
SWR_SEEN, SWR_APP_OWN, SWR_NO_POLICY, SWR_NO_STORAGE, SWR_CURRENT = 0x1, 0x2, 0x4, 0x8, 0x10
_NCB = len(CALLBACKS)
_NERR = len(ERRNO_BUCKETS)
COUNTERS_WORDS = _NCB + 1 + NOPT + NOPT * _NERR + NOPT
COUNTERS_SIZE = 8 * COUNTERS_WORDS


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
    fp = (0,) * NFP
    if prev is not None and prev_differs(prev, policy):
        flags |= F_PREV
        fp = fingerprint(prev)
    return struct.pack(POLICY_FMT, cgroup_id, flags, gen, level, *vals, *fp, 0)


def fingerprint(policy: Policy) -> tuple[int, ...]:
    """The values (bk_policy.prev[], bk_sweep.fp[]) a socket carries when
    this policy set them; 0: left at the kernel default, any value."""
    return tuple(policy.value(k) for k in FP_KEYS)


def prev_differs(prev: Policy, policy: Policy) -> bool:
    """Whether a socket at ``prev``'s values can be told from one at
    ``policy``'s: only then is it worth looking for (BK_F_PREV)."""
    return any(a and a != b for a, b in zip(fingerprint(prev), fingerprint(policy), strict=True))


def policy_gen_of(raw: bytes) -> int:
    return struct.unpack_from(POLICY_FMT, raw)[2]


def policy_raw_flags(raw: bytes) -> int:
    return struct.unpack_from(POLICY_FMT, raw)[1]


def with_flags(raw: bytes, flags: int) -> bytes:
    """The same bk_policy value with other flags."""
    return raw[:8] + struct.pack("=I", flags) + raw[12:]


def fresh_gen() -> int:
    """A new generation for a new attachment or changed values: random, so
    that the same policy attached again after a detach is not mistaken for
    the one before (sockets may have changed meanwhile).  Never 0."""
    import secrets

    return secrets.randbits(32) or 1


def decode_policy(raw: bytes) -> tuple[int, int, Policy]:
    """(cgroup id, flags, policy) from a bk_policy value."""
    cgroup_id, flags, _gen, _level, *vals = struct.unpack_from(POLICY_FMT, raw)[: 4 + NOPT]
    values = {o.key: v for o, v in zip(BPF_OPTIONS, vals, strict=False) if o.key != "keepalive"}
    mode = "enforce" if flags & F_ENFORCE else "set"
    derived = bool(flags & F_UT_DERIVED)
    return cgroup_id, flags, Policy(**values, mode=mode, user_timeout_derived=derived)


# The bk_policy layout of bpfkeep 0.1 (no gen, no level), and the one
# before prev[]: attachments made by them are migrated
# (Enforcer._migrate_one).
LEGACY_POLICY_FMT = f"=QI{NOPT}II"
LEGACY_POLICY_SIZE = struct.calcsize(LEGACY_POLICY_FMT)
NOPREV_POLICY_FMT = f"=QIII{NOPT}II"
NOPREV_POLICY_SIZE = struct.calcsize(NOPREV_POLICY_FMT)


def decode_any_policy(raw: bytes) -> tuple[int, int, Policy] | None:
    """decode_policy for this layout or an earlier one; None if unknown."""
    if len(raw) == POLICY_SIZE:
        return decode_policy(raw)
    if len(raw) == NOPREV_POLICY_SIZE:
        return decode_policy(raw[:-4] + bytes(4 * NFP) + raw[-4:])
    if len(raw) == LEGACY_POLICY_SIZE:
        cgroup_id, flags, *vals = struct.unpack_from(LEGACY_POLICY_FMT, raw)
        values = {o.key: v for o, v in zip(BPF_OPTIONS, vals, strict=False) if o.key != "keepalive"}
        mode = "enforce" if flags & F_ENFORCE else "set"
        # 0.1 kept no flag: a user timeout equal to the derived one was derived.
        derived = values["user_timeout"] == default_user_timeout(
            values["keepidle"], values["keepintvl"], values["keepcnt"]
        )
        return cgroup_id, flags, Policy(**values, mode=mode, user_timeout_derived=derived)
    return None


def policy_level(raw: bytes) -> int:
    return struct.unpack_from(POLICY_FMT, raw)[3]


@dataclasses.dataclass
class SweepEntry:
    """One socket in the sweep's work list (struct bk_sweep)."""

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
    fp: tuple[int, ...] = (0,) * NFP  # in: values bpfkeep gave (SWI_FP)

    def encode(self) -> bytes:
        return struct.pack(
            SWEEP_FMT,
            self.owner,
            self.action,
            self.in_flags,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            *(v & 0xFFFFFFFF for v in self.val),
            *self.fp,
        )

    @classmethod
    def decode(cls, raw: bytes) -> SweepEntry:
        f = struct.unpack_from(SWEEP_FMT, raw)
        vals = tuple(v - (1 << 32) if v >= 1 << 31 else v for v in f[10 : 10 + NOPT])
        return cls(*f[:10], val=vals)  # fp is input only: not decoded

    def values(self) -> dict[str, int]:
        return {o.key: v for o, v in zip(BPF_OPTIONS, self.val, strict=True)}

    @staticmethod
    def names(bits: int) -> list[str]:
        return [o.key for i, o in enumerate(BPF_OPTIONS) if bits >> i & 1]


def undo_flags(option_keys: list[str]) -> int:
    """bk_sweep.in_flags bits asking the UNDO action to reset these options."""
    index = {o.key: i for i, o in enumerate(BPF_OPTIONS)}
    return sum(1 << (16 + index[k]) for k in option_keys)


SWEEPSTATS_WORDS = 2 + NOPT + NOPT * len(ERRNO_BUCKETS)
SWEEPSTATS_SIZE = 8 * SWEEPSTATS_WORDS


@dataclasses.dataclass
class SweepStats:
    """Counters of the sweeps of one policy (struct bk_sweepstats)."""

    swept: int
    app_own: int
    applied: dict[str, int]
    failed: dict[tuple[str, str], int]

    @classmethod
    def decode(cls, raw: bytes) -> SweepStats:
        words = struct.unpack_from(f"={SWEEPSTATS_WORDS}Q", raw)
        it = iter(words)
        swept, app_own = next(it), next(it)
        applied, failed = _applied_and_failed(it)
        return cls(swept, app_own, applied, failed)

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
    ncpu = len(raw) // COUNTERS_SIZE
    words = [0] * COUNTERS_WORDS
    for cpu in range(ncpu):
        for i, w in enumerate(struct.unpack_from(f"={COUNTERS_WORDS}Q", raw, cpu * COUNTERS_SIZE)):
            words[i] += w
    it = iter(words)
    seen = {cb: next(it) for cb in CALLBACKS}
    inherited = next(it)
    applied, failed = _applied_and_failed(it)
    rewritten = {o.key: next(it) for o in BPF_OPTIONS}
    return Counters(seen, inherited, applied, failed, rewritten)


def _applied_and_failed(
    it: Iterator[int],
) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """The ``applied[NOPT]`` and ``failed[NOPT][NERR]`` arrays that both
    counter structs carry, in their order."""
    names = [o.key for o in BPF_OPTIONS]
    applied = {n: next(it) for n in names}
    failed = {}
    for n in names:
        for e in ERRNO_BUCKETS:
            v = next(it)
            if v:
                failed[(n, e)] = v
    return applied, failed
