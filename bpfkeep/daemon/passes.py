"""The daemon's sweeps of existing sockets and its periodic pass, as the
rest of the daemon asks for them.  They run on a thread of their own
(daemon.sweeps), never on the loop: these only queue.

- Right after a cgroup is attached its sockets are swept (a process may
  connect in a new cgroup's first microseconds, before the attach), and
  once more RESWEEP_AFTER later: a service systemd starts joins its
  cgroup just after it is made, with the listeners it was handed.
- After a full reconcile the cgroups it attached or changed are swept
  (queued: new sockets are covered already, and a large sweep must not
  hold up the start or a reload).
- Periodically, every audit_interval: a sweep of every attached cgroup
  the enforce room leaves to it (sockets no callback and no earlier sweep
  saw: listeners handed over later on), then coverage per cgroup from
  inet_diag.  The enforce room (daemon.enforce) sweeps the enforced
  cgroups on its own schedule, through ``request`` like its repairs and
  the learner's sweeps (daemon.learn).  The periodic sweeps get
  1/AUDIT_COST_FACTOR of a CPU in the long run, shared fairly between the
  namespaces' owners (daemon.sweeps); bpfkeep_audit_interval_seconds says
  how long a whole audit pass takes at that rate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from bpfkeep.audit.sockets import established_coverage
from bpfkeep.daemon.state import State
from bpfkeep.daemon.sweeps import AUDIT_COST_FACTOR, RESWEEP_AFTER, Pass, Request, Sweeps
from bpfkeep.kernel.cgroups import Cgroup, by_ids

log = logging.getLogger("bpfkeep")

__all__ = ["AUDIT_COST_FACTOR", "RESWEEP_AFTER", "Passes", "Request"]


class Passes:
    def __init__(self, state: State):
        self.state = state
        self.sweeps = Sweeps(state, self._pass_done)
        self.audit_errors = 0
        self.audit_cost: float | None = None  # CPU seconds of the last pass (None: none yet)
        self._full_cost: float | None = None  # ... and of all it would have done
        self.coverage: dict[str, tuple[int, int]] | None = None  # cgroup -> (armed, total)
        self._paths: dict[int, str] = {}  # socket cgroup id -> rel (ids are not reused)

    def start(self) -> None:
        """Sweeps begin (after READY=1: they never hold up the start)."""
        self.sweeps.start()

    def stop(self) -> None:
        self.sweeps.stop()

    @property
    def unavailable(self) -> bool:
        """This kernel cannot sweep (said once in the log)."""
        return self.sweeps.unavailable

    # -- sweeps ------------------------------------------------------------------

    def sweep(self, cgs: list[Cgroup]) -> None:
        """Bring the existing sockets of these attached cgroups to their
        policies, as soon as the sweeping thread gets to them."""
        self.sweeps.ask(cgs)

    def sweep_new(self, fresh: list[Cgroup]) -> None:
        """New cgroups: swept now and once more RESWEEP_AFTER later (if
        processes joined them meanwhile)."""
        self.sweeps.ask_new(fresh)

    def request(self, cgs: list[Cgroup], req: Request, *, periodic: bool = False) -> bool:
        """A sweep with work items, a filter or an answer of its own
        (daemon.sweeps.Request): an event, or with ``periodic`` the enforce
        room's pass.  False if nothing was queued (``req`` is not answered)."""
        return self.sweeps.request(cgs, req, periodic=periodic)

    def backlog(self) -> int:
        return self.sweeps.backlog()

    # -- the periodic pass ---------------------------------------------------------

    def cadence(self) -> float:
        """How often a pass is asked for: the configured interval.  What a
        pass does within its CPU budget is the sweeping thread's choice."""
        assert self.state.cfg
        return self.state.cfg.audit_interval

    def every(self) -> float:
        """How long a pass walking every namespace takes now: the configured
        interval, or AUDIT_COST_FACTOR times the CPU time such a pass needs
        (each namespace's last walk, each owner's last planning).  The
        owners that cost little get theirs every audit_interval all the
        same (daemon.sweeps)."""
        assert self.state.cfg
        cost = self._full_cost or 0.0
        return max(self.state.cfg.audit_interval, AUDIT_COST_FACTOR * cost)

    def audit(self, sweeps: Callable[[Cgroup], bool]) -> None:
        """Ask for a pass: a sweep of every attached cgroup that ``sweeps``
        keeps (its rule sweeps existing sockets; the enforced ones are the
        enforce room's), then coverage per attached cgroup, counting the
        sockets of descendant cgroups that its policy covers (no more
        specific one of ours)."""
        table = self.state.table
        with table.lock:
            known = [e.cgroup for e in table.ours().values()]
        self.sweeps.periodic([cg for cg in known if sweeps(cg)], self._coverage, self.cadence())

    def _pass_done(self, p: Pass) -> None:
        """(On the sweeping thread.)"""
        self.audit_cost = p.cpu
        self._full_cost = max(p.cpu, p.full_cost)
        if p.deferred:
            log.debug(
                "periodic pass: %d namespace(s) left to the next one (CPU budget)", p.deferred
            )

    def _coverage(self) -> None:
        """(On the sweeping thread, at the end of a pass.)"""
        try:
            cov = established_coverage()
            missing = [i for i in cov if i not in self._paths]
            # Only the cgroups with sockets now: under churn the ids of
            # cgroups long removed piled up (ids are not reused).
            self._paths = {i: rel for i, rel in self._paths.items() if i in cov}
            if missing:
                for cg_id, cg in by_ids(missing, self.state.mount).items():
                    self._paths[cg_id] = cg.rel
        except Exception as e:  # the audit must never take enforcement down
            self.audit_errors += 1
            log.warning("socket audit failed: %s", e)
            return
        table = self.state.table
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
