"""The sweep's work list and the kernel's walk: one batch of work items
(``struct bk_sweep``, keyed by socket cookie) written to the pinned map,
the iter/tcp program run over a network namespace, the outcome read back
-- a handful of bpf() calls per batch, however many sockets it holds."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import struct
from collections.abc import Callable, Collection, Iterable

from bpfkeep.errors import EnvironmentProblem
from bpfkeep.kernel import bpfsys
from bpfkeep.progs import loader, maps


class SweepUnavailable(EnvironmentProblem):
    """This kernel cannot change sockets that already exist."""


UNAVAILABLE = (
    "existing sockets keep their values: this kernel could not load the "
    "sweep (an iter/tcp program calling bpf_setsockopt needs Linux 5.15+); new "
    "sockets get the policy, and bpfkeep audit lists the others"
)


def exactly_once(release: str | None = None) -> bool:
    """Whether the kernel's TCP iterator visits every socket exactly once
    (Linux 6.17+); before, a socket can be skipped when its hash bucket
    changes during the walk, and the sockets not reached are walked again."""
    release = release or os.uname().release
    try:
        major, minor = (int(x) for x in release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (6, 17)


class Sweeper:
    """The sweep program and its work list on one pin directory's objects.
    Callers hold the work list's lock (PinDir.worklist_lock) around each
    batch: every bpfkeep process of this version shares the list."""

    def __init__(self, objs: dict[str, int], sweep_prog: int | None):
        self.objs = objs
        self.prog = sweep_prog
        self.once = exactly_once()

    def batch(
        self,
        keys: list[bytes],
        values: list[bytes],
        iterate: Callable[[], None],
        *,
        detail: bool = False,
        owners: Collection[int] = (),
    ) -> tuple[Tally, list[tuple[int, int, bytes]]]:
        """One batch: write the work list, walk the namespace (``iterate``
        runs the iterator there), take it all out again.  A handful of
        bpf() calls per batch, not four per socket.

        Returns what it did and, with ``detail``, (cookie, result, value)
        per item.  Without, the tally comes from the sweep counters of the
        items' ``owners`` (the work list's lock keeps other sweeps of this
        version from counting meanwhile) when this kernel walks each
        socket once and nothing was refused; the 100,000 values are read
        back only otherwise."""
        if self.prog is None:
            raise SweepUnavailable(UNAVAILABLE)
        fd = self.objs[loader.MAP_SWEEP]
        tally = Tally()
        out: list[tuple[int, int, bytes]] = []
        if bpfsys.map_lookup(fd, _SENTINEL, maps.SWEEP_SIZE) is not None:
            self.clear()  # a sweep died midway: its work is not to be acted on
        left = [_SENTINEL, *keys]  # the keys in the work list now
        quick = self.once and not detail and 0 < len(owners) <= _STATS_OWNERS
        try:
            before = self._stats(owners) if quick else None
            bpfsys.map_update_batch(fd, left, [_IDLE, *values])
            for _pass in range(1 if self.once else 2):  # a socket can be skipped before 6.17
                iterate()
                if before is not None:
                    counted = Tally.between(before, self._stats(owners))
                    if counted is not None:
                        return counted, out
                got = _read_back(fd, len(left), detail)
                seen = [g for g in got if g[1] & maps.SWR_SEEN]
                last = len(seen) == len(got) or self.once or _pass
                for cookie, result, failed, raw in got if last else seen:
                    tally.add(result, failed)
                    if raw is not None:
                        out.append((cookie, result, raw))
                if last:
                    break
                # Done: a second pass must not act on them again.
                done = {g[0] for g in seen}
                self._delete(fd, [_U64.pack(g[0]) for g in seen])
                left = [k for k in left if _U64.unpack(k)[0] not in done]
        finally:
            try:
                bpfsys.map_delete_batch(fd, left)  # exactly what is left: no read first
            except OSError:
                self.clear()
        return tally, out

    def _stats(self, owners: Collection[int]) -> dict[int, tuple[int, int, int]] | None:
        """owner -> (swept, kept the program's own, refusals), None if an
        owner has no counters."""
        sfd = self.objs.get(loader.MAP_SWEEPSTATS)
        if sfd is None:
            return None
        out = {}
        for owner in owners:
            raw = bpfsys.map_lookup(sfd, _U64.pack(owner), maps.SWEEPSTATS_SIZE)
            if raw is None:
                return None
            out[owner] = maps.sweepstats_tally(raw)
        return out

    @staticmethod
    def _delete(fd: int, keys: list[bytes]) -> None:
        """Take these entries out of the work list.  What was done stands
        whatever fails here: one at a time if the batch is refused."""
        try:
            bpfsys.map_delete_batch(fd, keys)
        except OSError:
            for k in keys:
                with contextlib.suppress(OSError):
                    bpfsys.map_delete(fd, k)

    def clear(self) -> None:
        """Empty the work list: what a sweep that died midway left, which
        the iterator would act on again.  (A scan of every bucket of the
        map, 70 µs empty: once per sweep, and per batch only when a batch
        finds the sentinel of one that did not finish.)"""
        fd = self.objs[loader.MAP_SWEEP]
        with contextlib.suppress(OSError):
            if bpfsys.map_empty(fd, 8):
                return  # the usual case: one call, no 450 KB buffer to read into
            kraw, _ = bpfsys.map_items_raw(fd, 8, maps.SWEEP_SIZE)
            if kraw:
                self._delete(fd, [kraw[i : i + 8] for i in range(0, len(kraw), 8)])

    def prepare_stats(self, owners: Iterable[int]) -> None:
        zero = bytes(maps.SWEEPSTATS_SIZE)
        for owner in owners:
            with contextlib.suppress(OSError):
                bpfsys.map_update(
                    self.objs[loader.MAP_SWEEPSTATS],
                    _U64.pack(owner),
                    zero,
                    BPF_NOEXIST,
                )


def _read_back(fd: int, expect: int, detail: bool) -> list[tuple[int, int, int, bytes | None]]:
    """(cookie, result, failed, the whole value if ``detail``) per item."""
    kraw, vraw = bpfsys.map_items_raw(fd, 8, maps.SWEEP_SIZE, chunk=expect + 64)
    cookies = [c for (c,) in _U64.iter_unpack(kraw)]
    results = maps.SWEEP_RESULT.iter_unpack(vraw)
    if not detail:
        return [(c, r, f, None) for c, (r, _a, f) in zip(cookies, results, strict=True) if c]
    size = maps.SWEEP_SIZE
    return [
        (c, r, f, vraw[i * size : (i + 1) * size])
        for i, (c, (r, _a, f)) in enumerate(zip(cookies, results, strict=True))
        if c  # not the sentinel
    ]


@dataclasses.dataclass
class Tally:
    """What a batch did: sockets brought to their policy, that kept their
    program's own keepalive (set mode), that refused an option."""

    swept: int = 0
    app_own: int = 0
    failed: int = 0

    def add(self, result: int, failed: int) -> None:
        if result & maps.SWR_SEEN and not result & maps.SWR_CURRENT:
            self.swept += 1
        if result & maps.SWR_APP_OWN:
            self.app_own += 1
        if failed:
            self.failed += 1

    @classmethod
    def between(
        cls, before: dict[int, tuple[int, int, int]], after: dict[int, tuple[int, int, int]] | None
    ) -> Tally | None:
        """From the owners' counters before and after, if that tells: not
        when something was refused (the counters count refusals by option,
        the report counts sockets)."""
        if after is None or after.keys() != before.keys():
            return None
        d = [tuple(a - b for a, b in zip(after[o], before[o], strict=True)) for o in before]
        if any(x[2] for x in d):
            return None
        return cls(sum(x[0] for x in d), sum(x[1] for x in d), 0)


# Sweep counters read before and after a batch for at most this many
# owners; a batch of more reads its items back instead.
_STATS_OWNERS = 16
BPF_NOEXIST = 1
# Written first to the work list by every batch and taken out last: no
# socket has cookie 0, and a batch that finds it knows one died midway.
_SENTINEL = bytes(8)
_IDLE = bytes(maps.SWEEP_SIZE)
_U64 = struct.Struct("=Q")  # map keys: socket cookies, cgroup ids
MAX_BATCH = maps.MAX_SWEEP  # the work list holds this many (BK_MAX_SWEEP)
