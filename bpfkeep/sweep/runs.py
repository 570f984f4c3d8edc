"""The sweeps the commands and the daemon ask for, on one pin directory:
bring the sockets of attached cgroups to their policies (Apply, run a
network namespace at a time), hand a detached policy's sockets over, or
read every socket's values (audit)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

from bpfkeep.kernel import netns, procfs
from bpfkeep.kernel.cgroups import Cgroup, by_ids, cgroup2_mount
from bpfkeep.kernel.sockdiag import LISTEN
from bpfkeep.options import Policy
from bpfkeep.pins.attach import Writer
from bpfkeep.pins.pindir import PinDir
from bpfkeep.progs import loader, maps
from bpfkeep.sweep import entries
from bpfkeep.sweep.engine import (
    SWEPT_STATES,
    Report,
    Scope,
    Sweep,
    Sweeper,
    SweepStuck,
    Target,
    scope,
    sweep,
)


@contextlib.contextmanager
def sweeper(pins: PinDir) -> Iterator[Sweeper]:
    """The sweep program and its maps (the work list's lock is taken per
    batch: PinDir.worklist_lock)."""
    with pins.objects() as objs:
        yield Sweeper(objs, objs.get(loader.PROG_SWEEP))


def _covering(path: str, mount: str, live: set[int]) -> int | None:
    """The id of the cgroup at or above ``path`` (up to the cgroup2 root
    ``mount``) with a policy (in ``live``)."""
    mount = mount.rstrip("/")
    while True:
        with contextlib.suppress(OSError):
            ino = os.stat(path).st_ino
            if ino in live:
                return ino
        if len(path) <= len(mount) or path == "/":
            return None
        path = os.path.dirname(path)


def owners(ids: set[int], live: set[int]) -> dict[int, int]:
    """cgroup id -> the nearest cgroup at or above it with a policy, for
    the cgroups of sockets held across cgroups (walks the cgroup tree to
    find them: only for such sockets)."""
    mount = cgroup2_mount()
    out = {}
    for cg_id, cg in by_ids(ids, mount).items():
        found = _covering(cg.path, mount, live)
        if found is not None:
            out[cg_id] = found
    return out


class Apply:
    """Bring every existing TCP socket of these attached cgroups and their
    descendants to the policy that covers it: planned when made (scope,
    namespaces), then ``run`` one namespace at a time, then ``finish``.
    The daemon interleaves the namespaces of many; ``apply`` runs one
    through.  ``make``: each socket's work item (entries.relearn_entry
    after a learned keepidle changed); ``keep``: only the sockets it keeps
    (a repair).  Raises SweepUnavailable on a kernel that cannot."""

    def __init__(
        self,
        pins: PinDir,
        cgs: list[Cgroup],
        *,
        entered: netns.Entered,
        held: procfs.HeldSockets,
        make: entries.Make = entries.apply_entry,
        keep: Callable[[Target], bool] | None = None,
        detail: bool = False,
        attached: set[int] | None = None,
    ):
        """``attached``: the cgroups with a policy, if the caller knows them
        (the daemon's table); else read from the pins (a stat of every
        pinned link)."""
        self.pins = pins
        self.partial = keep is not None  # not every socket: no policy swept through
        self._objects = contextlib.ExitStack()
        objs = self._objects.enter_context(pins.objects())
        try:
            sw = Sweeper(objs, objs.get(loader.PROG_SWEEP))
            live = pins.live_ids() if attached is None else attached
            sc = scope(cgs, live)
            self.writer = Writer(pins, objs)
            self.gens = {o: self.writer.raw_policy(o) for o in set(sc.owner_of_cgroup.values())}
            sc.peered = frozenset(o for o, raw in self.gens.items() if raw and maps.per_peer(raw))
            if self.gens:
                with pins.lock():  # a detach deletes the counters: not made again after it
                    sw.prepare_stats(o for o in self.gens if self.writer.raw_policy(o))
                with pins.worklist_lock():
                    sw.clear()  # what a sweep that died midway left
            self.sweep = Sweep(
                sw,
                sc,
                make,
                lock=pins.worklist_lock,
                entered=entered,
                held=held,
                owners_elsewhere=lambda ids: owners(ids, live),
                keep=keep,
                detail=detail,
            )
        except BaseException:
            self._objects.close()
            raise

    @property
    def report(self) -> Report:
        return self.sweep.report

    def units(self, own_namespace: bool = True) -> list[netns.Namespace]:
        return self.sweep.units(own_namespace)

    def run(self, ns: netns.Namespace) -> None:
        self.sweep.run(ns)

    def finish(self, complete: bool = True) -> Report:
        """After the last namespace (``complete``: every one was run):
        each policy swept through marked so (see _swept)."""
        try:
            if complete and not self.report.unreachable and not self.partial:
                with self.pins.lock():
                    for owner, raw in self.gens.items():
                        if raw is not None:
                            _swept(self.writer, owner, maps.policy_gen_of(raw))
        finally:
            self._objects.close()
        return self.report


def apply(
    pins: PinDir,
    cgs: list[Cgroup],
    make: entries.Make = entries.apply_entry,
    keep: Callable[[Target], bool] | None = None,
    *,
    detail: bool = True,
) -> Report:
    """Apply, one namespace after the other (the commands, and callers
    outside the daemon's sweeping thread)."""
    entered = netns.Entered("bpfkeep-sweep")
    try:
        run = Apply(
            pins,
            cgs,
            entered=entered,
            held=procfs.HeldSockets(),
            make=make,
            keep=keep,
            detail=detail,
        )
        complete = True
        try:
            for ns in run.units():
                try:
                    run.run(ns)
                except SweepStuck:
                    complete = False  # noted in the report; the others still
        except BaseException:
            run.finish(complete=False)
            raise
        return run.finish(complete)
    finally:
        entered.close()


def _swept(writer: Writer, cgroup_id: int, gen: int) -> None:
    """After a complete sweep under this generation: every listener of the
    policy carries it (or a record), so accepted sockets need no look
    (BK_F_SWEPT), and the values before the last change are on no socket
    any more (BK_F_PREV off)."""
    raw = writer.raw_policy(cgroup_id)
    if raw is None or maps.policy_gen_of(raw) != gen:
        return  # changed meanwhile: the next sweep
    writer.add_flags(cgroup_id, maps.F_SWEPT, maps.F_PREV)


def after_detach(pins: PinDir, cg: Cgroup, policy: Policy) -> Report:
    """A detached policy's sockets: to the nearest ancestor's policy, or,
    without one, its values off the listeners (so that what they accept
    no longer gets them) and recorded as bpfkeep's on the connections."""
    live = pins.live_ids()
    above = _covering(os.path.dirname(cg.path), cg.mount, live) if cg.rel else None
    with sweeper(pins) as sw:
        if above is not None:
            sc = scope([cg], live, owner=above)
            return sweep(
                sw,
                sc,
                entries.handover_entry(policy),
                lock=pins.worklist_lock,
                owners_elsewhere=lambda ids: owners(ids, live),
            )
        sc = scope([cg], live)
        # Only what this policy owned: descendants keep their own.
        sc = Scope(
            {k: v for k, v in sc.owner_of_cgroup.items() if v == cg.id},
            {k: v for k, v in sc.owner_of_pid.items() if v == cg.id},
        )
        report = sweep(
            sw,
            sc,
            entries.undo_entry(policy),
            lock=pins.worklist_lock,
            states=(LISTEN,),
            count=False,
        )
        connections = tuple(s for s in SWEPT_STATES if s != LISTEN)
        sweep(
            sw,
            sc,
            entries.keep_entry(policy),
            lock=pins.worklist_lock,
            states=connections,
            count=False,
        )
        return report


def read(pins: PinDir, cgs: list[Cgroup], attached: set[int]) -> Report:
    """The values in force on every socket of these cgroups, read by the
    sweep program without changing anything (audit's policy check)."""
    with sweeper(pins) as sw:
        return sweep(sw, scope(cgs, attached), entries.read_entry, lock=pins.worklist_lock)
