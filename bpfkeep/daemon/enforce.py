"""Enforce mode where the cgroup/setsockopt hook does not see the call: the
daemon brings the socket back.

The kernel runs no cgroup/setsockopt program for a 32-bit system call
(every call of a 32-bit binary; ``int $0x80`` from a 64-bit one), nor for
io_uring's setsockopt on a ring a 32-bit call set up; and another tool's
cgroup program that runs after ours may write a weaker value than ours
(bpf/bypass.bpf.c).  Two ways back, both the sweep's APPLY:

- **At once**, where the kernel runs tracing programs (fexit): they note
  each socket of an enforced policy that a setsockopt left outside it,
  and ring a bell (a ring buffer the loop waits on).  The room takes every
  note and repairs those sockets, by cookie, in one sweep -- never sooner
  than REPAIR_GAP after the last repair, nor than REPAIR_COST_FACTOR times
  its CPU time: a program hammering setsockopt costs one repair per gap
  (its socket is noted once until repaired), at most ~5 % of a CPU.
- **Always**: a pass over the enforced cgroups every ``enforce_interval``
  (default 30 s, at most 60 s), whatever the audit pass's backoff says;
  the audit pass leaves the enforced cgroups to it.  Without the tracing
  programs this is the bound: a socket is back within the interval and
  one pass's time.

Both count what they set back (``bpfkeep_enforce_repaired_total``).  Both
run on the daemon's sweeping thread (daemon.sweeps), never on the loop:
the room takes the notes and plans here, and the thread answers when the
sweep is done.  A repair is an event (ahead of the periodic sweeps); the
pass is periodic work, out of the periodic budget (~0.1 % of a CPU),
enforced namespaces before the audit's, the owners that cost little on
credit -- so one user's many namespaces do not stretch the others'
bound.  An owner whose last pass has not ended is left to it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable

from bpfkeep.daemon.passes import Passes, Request
from bpfkeep.daemon.state import State
from bpfkeep.errors import BpfkeepError
from bpfkeep.kernel import bpfsys
from bpfkeep.kernel.cgroups import Cgroup
from bpfkeep.kernel.ringbuf import RingBuffer
from bpfkeep.options import BPF_OPTIONS, Policy
from bpfkeep.sweep.engine import Report, Target

log = logging.getLogger("bpfkeep")

REPAIR_GAP = 0.05  # seconds between two repairs at least
REPAIR_COST_FACTOR = 20  # ... and this many times the last repair's CPU time
FORGET_EVERY = 10  # passes between two clean-ups of removed policies' counts


def enforces(policy: Policy | None) -> bool:
    """Does the policy cap a program's values, for some peer at least?"""
    if policy is None:
        return False
    return policy.mode == "enforce" or any(
        p.policy is not None and p.policy.mode == "enforce" for p in policy.peers
    )


class Enforced:
    """The repairs and the periodic pass over the enforced cgroups."""

    def __init__(self, state: State, passes: Passes, existing: Callable[[Cgroup], bool]):
        self.state = state
        self.passes = passes
        self.existing = existing  # the rule's ``existing``: may its old sockets be swept
        self.bell: RingBuffer | None = None
        self.tracing: list[str] = []  # tracing programs attached ("tcp", "sock", "mptcp")
        self._repair_due: float | None = None
        self._repair_earliest = 0.0
        self._pass_due: float | None = None
        self._passes = 0
        self.repairs = 0  # repair sweeps run
        self.repair_cpu = 0.0  # their CPU seconds, all together
        self.pass_cpu: float | None = None  # the last periodic pass's
        # A repair queued on the sweeping thread and not answered yet; a
        # note rang meanwhile (the next repair once it is answered).
        self._repairing = False
        self._repair_again = False
        self._said: set[str] = set()

    # -- the loop's side ---------------------------------------------------------

    def start(self, now: float) -> None:
        """After the programs are loaded: the bell, and the first pass."""
        self._open()
        if self.tracing:
            log.info(
                "a setsockopt the cgroup hook does not see is caught at once (fexit on %s)",
                ", ".join(f"{w}_setsockopt" for w in self.tracing),
            )
        else:
            log.info(
                "a setsockopt the cgroup hook does not see (a 32-bit call) is repaired by the "
                "enforce pass, every %.0f s: this kernel runs no fexit programs",
                self.every(),
            )
        self._pass_due = now + self.every()
        self._repair_due = now  # notes left while no daemon ran

    def _open(self) -> None:
        """The tracing programs and their bell, as pinned now (the healer
        may have loaded the programs again: new maps)."""
        enf = self.state.enforcer
        self.close()
        self.tracing = enf.bypass_tracing()
        self.bell = enf.bypass_bell() if self.tracing else None

    def close(self) -> None:
        if self.bell is not None:
            self.bell.close()
            self.bell = None

    def fd(self) -> int | None:
        return self.bell.fd if self.bell is not None else None

    def rang(self) -> None:
        """The bell's fd is readable: a socket was noted."""
        if self.bell is not None:
            self.bell.read()  # the notes are in their map; the records only woke us
        if self._repair_due is None:
            self._repair_due = max(time.monotonic(), self._repair_earliest)

    def every(self) -> float:
        """Seconds between two passes over the enforced cgroups: the
        configured interval, or the audit's when that is shorter."""
        cfg = self.state.cfg
        assert cfg
        every = cfg.enforce_interval
        if cfg.audit_interval:
            every = min(every, self.passes.every())
        return every

    def replan(self) -> None:
        """The config changed: the next pass within the new interval."""
        due = time.monotonic() + self.every()
        self._pass_due = due if self._pass_due is None else min(self._pass_due, due)

    def next(self) -> float:
        # While a repair is on the sweeping thread and notes wait for the
        # next one, the loop looks again every REPAIR_GAP: the answer sets
        # when (from another thread).
        again = time.monotonic() + REPAIR_GAP if self._repair_again else math.inf
        return min(self._repair_due or math.inf, self._pass_due or math.inf, again)

    def run_due(self, now: float) -> None:
        if self._repair_again and not self._repairing:
            # (Rang just as the last repair was answered: its turn now.)
            self._repair_again = False
            self._repair_due = max(now, self._repair_earliest)
        if self._repair_due is not None and self._repair_due <= now:
            self._repair_due = None
            self.repair()
        if self._pass_due is not None and self._pass_due <= now:
            self._pass_due = None
            try:
                self.periodic()
            finally:
                self._pass_due = time.monotonic() + self.every()

    # -- the work ----------------------------------------------------------------

    def enforced(self) -> dict[int, Cgroup]:
        """The daemon's cgroups whose policy enforces, by id."""
        table = self.state.table
        with table.lock:
            return {i: e.cgroup for i, e in table.ours().items() if enforces(e.policy)}

    def repair(self) -> None:
        """Every socket noted since the last repair, back within its policy
        (queued on the sweeping thread; counted when it answers)."""
        if self._repairing:
            self._repair_again = True  # its notes are taken once it is answered
            return
        t0 = time.process_time()
        notes = []
        wanted: dict[int, set[int] | None] = {}  # owner -> cookies (None: all)
        queued = False
        try:
            notes = self.state.enforcer.bypass_notes()
            ours = self.enforced()
            for n in notes:
                cg = ours.get(n.owner)
                if cg is None:
                    continue  # attached by hand, or gone: not the daemon's to repair
                if n.cookie == 0:
                    # An MPTCP socket (its subflows), or one without a cookie
                    # yet: every socket of the policy, if it may touch old ones.
                    if self.existing(cg):
                        wanted[n.owner] = None
                    else:
                        self._say_once(
                            f"skip {n.owner}",
                            "%s (existing = false): a socket noted without a cookie is left to "
                            "the program; its sockets are not swept",
                            cg.display,
                        )
                elif wanted.get(n.owner, set()) is not None:
                    wanted.setdefault(n.owner, set()).add(n.cookie)  # type: ignore[union-attr]
            if wanted:

                def keep(t: Target) -> bool:
                    cookies = wanted.get(t.owner, set())
                    return cookies is None or t.cookie in cookies

                owners, calls = set(wanted), sum(x.calls for x in notes)
                loop = time.process_time() - t0  # (what the loop spent: taking the notes)

                def done(report: Report, cpu: float) -> None:
                    try:
                        n = self._count(report, owners)
                        log.info(
                            "repaired %d socket(s) a setsockopt past the cgroup hook had taken "
                            "outside the policy (%d call(s) noted)",
                            n,
                            calls,
                        )
                    finally:
                        self._repaired(True, loop + cpu)

                # (Before it is queued: the thread may answer before _sweep returns.)
                self._repairing = True
                queued = self._sweep([ours[o] for o in wanted], keep, done)
                self._repairing = queued and self._repairing
        finally:
            if not queued:
                self._repaired(bool(notes), time.process_time() - t0)

    def _repaired(self, counted: bool, cost: float) -> None:
        """A repair ended (on the loop, or answered on the sweeping
        thread): the next waits for its gap."""
        if counted:
            self.repairs += 1
            self.repair_cpu += cost
        self._repair_earliest = time.monotonic() + max(REPAIR_GAP, REPAIR_COST_FACTOR * cost)
        self._repairing = False
        if self._repair_again:
            self._repair_again = False
            self._repair_due = self._repair_earliest

    def periodic(self) -> None:
        """Every enforced cgroup's sockets (those whose rule sweeps existing
        sockets) brought back within the policy (queued on the sweeping
        thread, as periodic work)."""
        t0 = time.process_time()
        ours = {i: cg for i, cg in self.enforced().items() if self.existing(cg)}
        queued = False
        if ours:
            owners = set(ours)
            loop = time.process_time() - t0

            def done(report: Report, cpu: float) -> None:
                self.pass_cpu = loop + cpu
                n = self._count(report, owners)
                if n:
                    log.info("enforce pass: %d socket(s) brought back within their policy", n)

            queued = self._sweep(
                list(ours.values()), lambda t: t.owner in owners, done, periodic=True
            )
        self._passes += 1
        if self.state.enforcer.bypass_tracing() != self.tracing or not self._bell_current():
            self._open()
        if self._passes % FORGET_EVERY == 0:
            with contextlib.suppress(BpfkeepError, OSError):
                self.state.enforcer.forget_enforce_counts(self.state.enforcer.live_ids())
        if not queued:
            self.pass_cpu = time.process_time() - t0

    def _bell_current(self) -> bool:
        """Is the bell we wait on the one pinned now?"""
        if self.bell is None:
            return not self.tracing
        return self.state.enforcer.bypass_bell_id() == bpfsys.map_info(self.bell.fd)[1]

    def _sweep(
        self,
        cgs: list[Cgroup],
        keep: Callable[[Target], bool],
        done: Callable[[Report, float], None],
        *,
        periodic: bool = False,
    ) -> bool:
        """Queue the sweep on the sweeping thread (with each socket's
        outcome: the counts per option); ``done`` once it ended.  False if
        nothing was queued (this kernel cannot sweep)."""
        if self.passes.unavailable:
            return False

        def answered(report: Report, cpu: float) -> None:
            for what, why in sorted(report.unreachable.items()):
                self._say_once(what, "enforce: %s unreachable: %s", what, why)
            done(report, cpu)

        req = Request(keep=keep, detail=True, done=answered)
        return self.passes.request(cgs, req, periodic=periodic)

    def _count(self, report: Report, owners: set[int]) -> int:
        """Sockets the sweep changed, counted per policy and option; how many."""
        counts: dict[int, dict[str, int]] = {}
        sockets = 0
        for o in report.outcomes:
            if o.target.owner not in owners or not o.entry.applied:
                continue
            sockets += 1
            by = counts.setdefault(o.target.owner, {})
            for i, opt in enumerate(BPF_OPTIONS):
                if o.entry.applied & (1 << i):
                    by[opt.key] = by.get(opt.key, 0) + 1
        if counts:
            try:
                self.state.enforcer.count_repaired(counts)
            except (BpfkeepError, OSError) as e:
                self.state.errors += 1
                log.error("enforce: counting repairs: %s", e)
        return sockets

    def _say_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._said:
            self._said.add(key)
            log.warning(msg, *args)
