"""Policies on cgroups, kept in bpffs so they outlive us: the one object the
commands, the daemon and the audit use.  It only combines the layers
below -- the pin directory (pins.pindir), the attach path (pins.attach),
upgrades (pins.migrate), reading back (pins.read) and the sweep
(sweep.runs) -- taking the pin directory's lock where a step writes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator

from bpfkeep.kernel.cgroups import Cgroup
from bpfkeep.kernel.privileges import require_privileges
from bpfkeep.kernel.ringbuf import RingBuffer
from bpfkeep.options import Policy
from bpfkeep.pins import bypass, migrate, read
from bpfkeep.pins.attach import Writer, detach_id
from bpfkeep.pins.pindir import DaemonLock, PinDir
from bpfkeep.pins.read import Attachment
from bpfkeep.progs import loader, maps
from bpfkeep.sweep import entries, runs
from bpfkeep.sweep.engine import Report, Sweeper, SweepUnavailable, Target

__all__ = ["Attachment", "Enforcer"]


class Enforcer:
    """bpfkeep's attachments under one pin directory."""

    def __init__(self, pin_dir: str | None = None, version: str | None = None):
        self.pins = PinDir(pin_dir, version)
        self.pin_dir, self.obj_dir, self.link_dir = (
            self.pins.pin_dir,
            self.pins.obj_dir,
            self.pins.link_dir,
        )
        self._prepared = False

    def check_pin_dir(self) -> None:
        self.pins.check()

    def daemon_lock(self) -> DaemonLock:
        """One daemon per pin directory: its lock, taken (pins.pindir)."""
        self.pins.check()
        return self.pins.daemon_lock()

    def prepare(self) -> None:
        """Privileges, bpffs, directories and loaded programs; attachments
        of other program versions moved to this one."""
        if self._prepared and os.path.isdir(self.obj_dir):
            return
        require_privileges()
        self.pins.make()
        with self.pins.lock():
            loader.load(self.obj_dir)
            migrate.recover(self.pins)
            migrate.migrate(self.pins)
        self._prepared = True

    # -- writing -----------------------------------------------------------------

    def attach(
        self, cg: Cgroup, policy: Policy, *, managed: bool = False, prune: bool = True
    ) -> str:
        """Attach or update; returns "attached" or "updated" (pins.attach).
        ``prune``: first forget the attachments of removed cgroups."""
        self.prepare()
        with self.pins.lock(), self.pins.objects() as objs:
            w = Writer(self.pins, objs)
            if prune:
                w.prune()
            return w.attach(cg, policy, managed=managed)

    @contextlib.contextmanager
    def batch(self) -> Iterator[Writer]:
        """Many attaches and updates under one lock, with the pinned objects
        opened once, and the policy hash entries of updates written in one
        batch at the end (the daemon's reconcile).  Nothing that takes the
        lock itself (detach, prune, sweep) may run inside."""
        self.prepare()
        with self.pins.lock(), self.pins.objects() as objs:
            w = Writer(self.pins, objs)
            try:
                yield w
            finally:
                w.flush()

    def detach(self, cg: Cgroup, *, existing: bool = True) -> bool:
        """Remove bpfkeep's programs from a cgroup; others' stay.

        With ``existing``, the listeners the policy configured stop passing
        its values on to the sockets they accept: they take the policy of
        the nearest ancestor with one, or the namespace's defaults (the
        options their program set itself stay).  Established connections
        keep the values they have."""
        require_privileges()
        self.pins.check()
        if not os.path.isdir(self.link_dir):
            return False
        policy = next(
            (a.policy for a in self.attachments({cg.id: cg}) if a.cgroup_id == cg.id), None
        )
        with self.pins.lock():
            found = self._detach_locked(cg)
        if found and existing and policy is not None:
            # Best effort: the detach itself is done.
            with contextlib.suppress(SweepUnavailable, OSError):
                runs.after_detach(self.pins, cg, policy)
        return found

    def _detach_locked(self, cg: Cgroup) -> bool:
        with contextlib.suppress(OSError), self.pins.objects() as objs:
            # The sockets go to the nearest ancestor's policy, its listeners
            # too: until a sweep, what they accept is looked at again.
            w = Writer(self.pins, objs)
            ancestors = w.nesting(cg, skip=cg.id)[0]
            if ancestors:
                w.add_flags(ancestors[0][0], 0, maps.F_SWEPT)
        found = detach_id(self.pins, cg.id)
        # Like attach: forget the attachments of removed cgroups (best
        # effort: the detach itself is done).
        with contextlib.suppress(OSError), self.pins.objects() as objs:
            w = Writer(self.pins, objs)
            w.drop_stale_nesting(cg)
            w.prune()
        return found

    def detach_id(self, cgroup_id: int) -> bool:
        """Detach by cgroup id (the cgroup may already be gone)."""
        if not os.path.isdir(self.link_dir):
            return False
        with self.pins.lock():
            return detach_id(self.pins, cgroup_id)

    def prune(self, alive: Iterable[int] = ()) -> None:
        """Forget attachments of removed cgroups; ``alive``: cgroup ids the
        caller just saw attached, not to be checked again."""
        if not os.path.isdir(self.obj_dir):
            return
        with self.pins.lock(), self.pins.objects() as objs:
            Writer(self.pins, objs).prune(set(alive))

    def destroy(self) -> None:
        """Detach everything and remove the pin directory (tests, uninstall)."""
        self.pins.check()
        if not os.path.isdir(self.pin_dir):
            return
        with self.pins.lock():
            for cg_id in self.pins.pinned_ids():
                detach_id(self.pins, cg_id)
        self.pins.remove()

    # -- existing sockets ----------------------------------------------------------

    def sweep(
        self,
        cgs: list[Cgroup],
        make: entries.Make = entries.apply_entry,
        keep: Callable[[Target], bool] | None = None,
    ) -> Report:
        """Bring every existing TCP socket of these attached cgroups and
        their descendants to the policy that covers it (bpfkeep.sweep);
        ``make``: each socket's work item (entries.relearn_entry after a
        learned keepidle changed); ``keep``: only the sockets it keeps (a
        repair).  Raises SweepUnavailable on a kernel that cannot."""
        self.prepare()
        return runs.apply(self.pins, cgs, make, keep)

    def sweeper(self) -> contextlib.AbstractContextManager[Sweeper]:
        return runs.sweeper(self.pins)

    # -- reading -----------------------------------------------------------------

    def pinned_ids(self) -> set[int]:
        """Cgroup ids with bpfkeep links pinned (alive or not)."""
        self.pins.check()
        return self.pins.pinned_ids()

    def link_pins(self) -> dict[int, set[str]]:
        return self.pins.link_pins()

    def pinned_hooks(self, cgroup_id: int) -> set[str]:
        return self.pins.pinned_hooks(cgroup_id)

    def live_ids(self) -> set[int]:
        return self.pins.live_ids()

    def objects_missing(self) -> list[str]:
        return self.pins.objects_missing()

    def program_ids(self) -> dict[str, int]:
        return self.pins.program_ids()

    def policy_value(self, cgroup_id: int) -> bytes | None:
        return read.policy_value(self.pins, cgroup_id)

    def policy_values(self) -> dict[int, bytes]:
        return read.policy_values(self.pins)

    def storage_values(self, ids: Iterable[int]) -> dict[int, bytes]:
        return read.storage_values(self.pins, ids)

    def policy_entry(self, cgroup_id: int) -> tuple[Policy, bool] | None:
        """(policy, managed by the daemon) as this version's maps hold it for
        one cgroup, or None; no walk of the cgroup tree."""
        raw = self.policy_value(cgroup_id)
        if raw is None:
            return None
        _, flags, policy = maps.decode_policy(raw)
        return policy, bool(flags & maps.F_MANAGED)

    def attachments(self, paths: dict[int, Cgroup] | None = None) -> list[Attachment]:
        self.pins.check()
        return read.attachments(self.pins, paths)

    def read_counters(self, ids: list[int]) -> dict[int, maps.Counters]:
        return read.read_counters(self.pins, ids)

    # -- enforce mode past the cgroup hook (pins.bypass) ----------------------------

    def bypass_notes(self) -> list[maps.BypassNote]:
        """Sockets the tracing programs saw left outside an enforced
        policy, taken (each is noted again if it happens again)."""
        return bypass.take_notes(self.pins)

    def count_repaired(self, counts: dict[int, dict[str, int]]) -> None:
        with self.pins.lock():
            bypass.add_repaired(self.pins, counts)

    def forget_enforce_counts(self, live: Iterable[int]) -> None:
        with self.pins.lock():
            bypass.forget(self.pins, live)

    def bypass_tracing(self) -> list[str]:
        return bypass.tracing(self.pins)

    def bypass_bell(self) -> RingBuffer | None:
        return bypass.bell(self.pins)

    def bypass_bell_id(self) -> int | None:
        return bypass.bell_id(self.pins)

    def losses(self, ids: Iterable[int] | None = None) -> dict[int, dict[str, maps.Losses]]:
        """Lost connections per policy and peer rule (pins.read.losses)."""
        return read.losses(self.pins, ids)
