"""The sweeps the commands ask for, on one pin directory: bring the
sockets of attached cgroups to their policies, hand a detached policy's
sockets over, or read every socket's values (audit)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

from bpfkeep.kernel.cgroups import Cgroup, by_ids, cgroup2_mount
from bpfkeep.kernel.sockdiag import LISTEN
from bpfkeep.options import Policy
from bpfkeep.pins.attach import Writer
from bpfkeep.pins.pindir import PinDir
from bpfkeep.progs import loader, maps
from bpfkeep.sweep import entries
from bpfkeep.sweep.engine import SWEPT_STATES, Report, Scope, Sweeper, Target, scope, sweep


@contextlib.contextmanager
def sweeper(pins: PinDir) -> Iterator[Sweeper]:
    """The sweep program and its maps, under the pin directory's lock (the
    work list is shared by every bpfkeep process)."""
    with pins.lock(), pins.objects() as objs:
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


def apply(
    pins: PinDir,
    cgs: list[Cgroup],
    make: entries.Make = entries.apply_entry,
    keep: Callable[[Target], bool] | None = None,
) -> Report:
    """Bring every existing TCP socket of these attached cgroups and their
    descendants to the policy that covers it (``make``: each socket's work
    item; entries.relearn_entry after a learned keepidle changed);
    ``keep``: only the sockets it keeps (a repair).  Raises
    SweepUnavailable on a kernel that cannot."""
    with sweeper(pins) as sw:
        live = pins.live_ids()
        sc = scope(cgs, live)
        writer = Writer(pins, sw.objs)
        gens = {o: writer.raw_policy(o) for o in set(sc.owner_of_cgroup.values())}
        sc.peered = frozenset(o for o, raw in gens.items() if raw and maps.per_peer(raw))
        report = sweep(
            sw,
            sc,
            make,
            owners_elsewhere=lambda ids: owners(ids, live),
            keep=keep,
        )
        if not report.unreachable and keep is None:
            for owner, raw in gens.items():
                if raw is not None:
                    _swept(writer, owner, maps.policy_gen_of(raw))
        return report


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
                owners_elsewhere=lambda ids: owners(ids, live),
            )
        sc = scope([cg], live)
        # Only what this policy owned: descendants keep their own.
        sc = Scope(
            {k: v for k, v in sc.owner_of_cgroup.items() if v == cg.id},
            {k: v for k, v in sc.owner_of_pid.items() if v == cg.id},
        )
        report = sweep(sw, sc, entries.undo_entry(policy), states=(LISTEN,), count=False)
        connections = tuple(s for s in SWEPT_STATES if s != LISTEN)
        sweep(sw, sc, entries.keep_entry(policy), states=connections, count=False)
        return report


def read(pins: PinDir, cgs: list[Cgroup], attached: set[int]) -> Report:
    """The values in force on every socket of these cgroups, read by the
    sweep program without changing anything (audit's policy check)."""
    with sweeper(pins) as sw:
        return sweep(sw, scope(cgs, attached), entries.read_entry)
