"""Userspace mirror of bpf/bpfkeep.h: encoding policies, decoding counters."""

from __future__ import annotations

import dataclasses
import functools
import struct

from bpfkeep.options import BPF_OPTIONS, Policy

NOPT = len(BPF_OPTIONS)
F_ACTIVE = 0x1
F_ENFORCE = 0x2
F_MANAGED = 0x4  # owned by the daemon; the BPF programs ignore it

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

POLICY_FMT = f"=QI{NOPT}II"  # cgroup_id, flags, val[], pad
POLICY_SIZE = struct.calcsize(POLICY_FMT)
_NCB = len(CALLBACKS)
_NERR = len(ERRNO_BUCKETS)
COUNTERS_WORDS = _NCB + 1 + NOPT + NOPT * _NERR + NOPT
COUNTERS_SIZE = 8 * COUNTERS_WORDS


def encode_policy(
    cgroup_id: int, policy: Policy, *, active: bool = True, managed: bool = False
) -> bytes:
    flags = (F_ACTIVE if active else 0) | (F_ENFORCE if policy.mode == "enforce" else 0)
    flags |= F_MANAGED if managed else 0
    vals = [policy.value(o.key) for o in BPF_OPTIONS]
    return struct.pack(POLICY_FMT, cgroup_id, flags, *vals, 0)


def decode_policy(raw: bytes) -> tuple[int, int, Policy]:
    """(cgroup id, flags, policy) from a bk_policy value."""
    cgroup_id, flags, *vals = struct.unpack_from(POLICY_FMT, raw)
    values = {o.key: v for o, v in zip(BPF_OPTIONS, vals, strict=False) if o.key != "keepalive"}
    mode = "enforce" if flags & F_ENFORCE else "set"
    return cgroup_id, flags, Policy(**values, mode=mode)


@dataclasses.dataclass
class Counters:
    seen: dict[str, int]
    inherited: int
    applied: dict[str, int]
    failed: dict[tuple[str, str], int]  # (option, errno name) -> count
    rewritten: dict[str, int]

    def as_dict(self) -> dict[str, object]:
        return {
            "seen": self.seen,
            "inherited": self.inherited,
            "applied": self.applied,
            "failed": {f"{o}/{e}": n for (o, e), n in self.failed.items()},
            "rewritten": self.rewritten,
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
    names = [o.key for o in BPF_OPTIONS]
    applied = {n: next(it) for n in names}
    failed = {}
    for n in names:
        for e in ERRNO_BUCKETS:
            v = next(it)
            if v:
                failed[(n, e)] = v
    rewritten = {n: next(it) for n in names}
    return Counters(seen, inherited, applied, failed, rewritten)
