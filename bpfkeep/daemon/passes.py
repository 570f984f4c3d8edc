"""The daemon's sweeps of existing sockets and its periodic pass.

- Right after a cgroup is attached its sockets are swept (a process may
  connect in a new cgroup's first microseconds, before the attach), and
  once more RESWEEP_AFTER later: a service systemd starts joins its
  cgroup just after it is made, with the listeners it was handed.
- After a full reconcile the cgroups it attached or changed are swept,
  after READY=1: new sockets are covered already, and a large sweep must
  not hold up the start or a reload.
- Periodically: a sweep of every attached cgroup (sockets no callback and
  no earlier sweep saw: listeners handed over later on), then coverage
  per cgroup from inet_diag.  The next pass waits at least 1,000 times
  this one's CPU time, so the pass stays below ~0.1 % of a CPU however
  many sockets the host has.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from bpfkeep.audit.sockets import established_coverage
from bpfkeep.daemon.state import State
from bpfkeep.errors import BpfkeepError
from bpfkeep.kernel.cgroups import Cgroup, by_ids
from bpfkeep.sweep.engine import SweepUnavailable

log = logging.getLogger("bpfkeep")

RESWEEP_AFTER = 1.0  # seconds
AUDIT_COST_FACTOR = 1000  # the next pass waits this many times the last one's CPU time


class Passes:
    def __init__(self, state: State):
        self.state = state
        self.unavailable = False  # this kernel cannot sweep: said once
        self._queue: list[tuple[float, list[Cgroup]]] = []  # (due, cgroups)
        self.audit_errors = 0
        self.audit_cost: float | None = None  # CPU seconds of the last pass (None: none yet)
        self.coverage: dict[str, tuple[int, int]] | None = None  # cgroup -> (armed, total)
        self._paths: dict[int, str] = {}  # socket cgroup id -> rel (ids are not reused)

    # -- sweeps ------------------------------------------------------------------

    def sweep(self, cgs: list[Cgroup]) -> None:
        """Bring the existing sockets of these attached cgroups to their
        policies; never takes enforcement down."""
        if not cgs or self.unavailable:
            return
        try:
            report = self.state.enforcer.sweep(cgs)
        except SweepUnavailable as e:
            self.unavailable = True
            log.warning("%s", e)
            return
        except (BpfkeepError, OSError) as e:
            self.state.errors += 1
            names = ", ".join(cg.display for cg in cgs[:3]) + (" ..." if len(cgs) > 3 else "")
            log.error("sweeping the existing sockets of %s: %s", names, e)
            return
        if report.swept or report.unreachable:
            log.info("%s (%d cgroup(s))", report.summary(), len(cgs))

    def sweep_new(self, fresh: list[Cgroup]) -> None:
        """New cgroups: swept now and once more RESWEEP_AFTER later."""
        if fresh:
            self.sweep(fresh)
            self._queue.append((time.monotonic() + RESWEEP_AFTER, fresh))

    def sweep_soon(self, cgs: list[Cgroup]) -> None:
        """Swept at the loop's next turn, before anything queued."""
        if cgs:
            self._queue.insert(0, (0.0, cgs))

    def next_sweep(self) -> float | None:
        return self._queue[0][0] if self._queue else None

    def run_queued(self, now: float) -> None:
        if self._queue and self._queue[0][0] <= now:
            # (Not kept in a local: 10,000 cgroups held until the next sweep.)
            self.sweep([cg for cg in self._queue.pop(0)[1] if self.state.table.is_ours(cg.id)])

    # -- the periodic pass ---------------------------------------------------------

    def every(self) -> float:
        """The wait after a pass: the configured interval, stretched to 1000
        times the pass's CPU time (a host with many sockets)."""
        assert self.state.cfg
        return max(self.state.cfg.audit_interval, AUDIT_COST_FACTOR * (self.audit_cost or 0.0))

    def audit(self, sweeps_existing: Callable[[Cgroup], bool]) -> None:
        """Sweep, then coverage per attached cgroup, counting the sockets of
        descendant cgroups that its policy covers (no more specific one of
        ours)."""
        table = self.state.table
        # CPU time of the whole process: the sweep runs its iterator and
        # its namespace visits in threads of their own, which the calling
        # thread's clock would not count.
        t0 = time.process_time()
        with table.lock:
            known = [e.cgroup for e in table.ours().values()]
        self.sweep([cg for cg in known if sweeps_existing(cg)])
        try:
            cov = established_coverage()
            missing = [i for i in cov if i not in self._paths]
            if missing:
                for cg_id, cg in by_ids(missing, self.state.mount).items():
                    self._paths[cg_id] = cg.rel
        except Exception as e:  # the audit must never take enforcement down
            self.audit_errors += 1
            log.warning("socket audit failed: %s", e)
            return
        self.audit_cost = time.process_time() - t0
        with table.lock:
            ours = {i: e.cgroup for i, e in table.ours().items()}
        by_rel = {cg.rel: cg_id for cg_id, cg in ours.items()}
        totals = {cg_id: [0, 0] for cg_id in ours}
        for cg_id, (armed, total) in cov.items():
            owner = cg_id if cg_id in ours else None
            rel = self._paths.get(cg_id)
            while owner is None and rel:
                rel = rel.rpartition("/")[0]
                owner = by_rel.get(rel)
            if owner is not None:
                totals[owner][0] += armed
                totals[owner][1] += total
        with table.lock:
            self.coverage = {ours[i].display: (a, t) for i, (a, t) in totals.items()}
