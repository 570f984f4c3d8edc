"""The daemon's sweeps, off its loop: one thread of their own runs them a
network namespace at a time, so that attaching a new cgroup never waits
for one (the loop only queues), and picks between two namespaces what
runs next -- the one place where sweeps are scheduled:

1. **Events first**: new cgroups (at once, and once more RESWEEP_AFTER
   later), reconciles, reloads, changed policies.  What was queued
   meanwhile is planned together: one dump and one walk of a namespace
   serve every cgroup asked for.  Requests with work items or a filter of
   their own -- the enforce room's repairs (daemon.enforce), the
   learner's sweeps to a keepidle learned lower (daemon.learn) -- are
   events too, each planned as a sweep of its own, and answered on this
   thread when done (Request).
2. **Then the periodic backstop**: the enforce room's pass over the
   enforced cgroups every enforce_interval (every namespace walked: what
   it looks for, a value changed behind the policy's back, leaves no trace
   in what a namespace's processes hold), then the audit's pass over the
   others every audit_interval, where a namespace whose processes hold
   the same sockets as at its last full sweep is left alone -- its new
   sockets met the policy at sock_ops -- for up to SET_RECHECK.  Their
   CPU comes out of one bucket refilled at 1/AUDIT_COST_FACTOR of a CPU
   (0.1 %), so a host whose namespaces cost more is covered more slowly,
   never at more CPU.
3. **Fairly between owners** within each: the namespaces' owner (the uid
   of their processes) that had the least of the thread's CPU lately
   goes next.  One user's 600 namespaces wait behind everybody else's
   few; a namespace where a socket's lock is held forever (the kernel's
   walk blocks) is given up after engine.patience and left alone for
   STUCK_BACKOFF, and an owner with STUCK_MAX such walks still blocked is
   left alone until the kernel lets them go.

The pin directory's lock is not held across a sweep: the work list has a
lock of its own, taken per namespace (PinDir.worklist_lock).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import heapq
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable

from bpfkeep.daemon.state import HAND, State
from bpfkeep.errors import BpfkeepError
from bpfkeep.kernel import netns, procfs
from bpfkeep.kernel.cgroups import Cgroup, procs
from bpfkeep.kernel.libc import name_thread
from bpfkeep.sweep import entries, runs
from bpfkeep.sweep.engine import Make, Report, SweepStuck, SweepUnavailable, Target

log = logging.getLogger("bpfkeep")

RESWEEP_AFTER = 1.0  # seconds: a new cgroup is swept again this much later
AUDIT_COST_FACTOR = 1000  # the periodic pass gets 1/this of a CPU, in the long run
BUCKET = 0.06  # CPU seconds the periodic pass may spend at once after a quiet minute
SET_RECHECK = 600.0  # an unchanged set-mode namespace is walked at least this often
SERVED_HALF_LIFE = 60.0  # seconds: how long an owner's CPU counts against it
# An owner whose periodic sweeps cost less than this lately (CPU s) may
# run its enforced namespaces' backstop on credit, down to -BUCKET, when
# heavier owners used the budget up: they pay it back before running
# again.  The long run stays at the budget; the light owners' bound holds.
LIGHT_OWNER = 0.01
STUCK_BACKOFF = 600.0  # seconds a namespace whose walk was given up is left alone
STUCK_MAX = 2  # walks of one owner left blocked in the kernel before all its are skipped
# The thread running sweeps gives up the interpreter this often (Python's
# default is 5 ms): the loop waits at most this long for it after each
# system call of an attach.
SWITCH_INTERVAL = 0.0005
# Events asked for within this long (seconds) of the last ones planned are
# gathered and planned together: 100 new cgroups a second become 20
# sweeps, each one dump and one walk of a namespace, not 100.  Only under
# such a load: a lone new cgroup is planned at once.
EVENT_GATHER = 0.05
# Events go first, but the periodic pass gets a namespace at least this
# often (seconds) while it has CPU left: a stream of new cgroups does not
# stop the backstop.
PERIODIC_MAX_WAIT = 1.0

EVENT, ENFORCED, SETMODE = 0, 1, 2  # what a job is, in the order served
NEW, COVERAGE = 3, 4  # requests besides: new cgroups (an event), the audit


@dataclasses.dataclass(eq=False)
class Request:
    """A sweep asked for with work items of its own (``make``), only some
    sockets (``keep``), their outcomes (``detail``), or an answer:
    ``done(report, cpu)`` is called on the sweeping thread once every sweep
    it became has ended -- run through, or dropped (the report then says
    less) -- with their reports added up and their CPU seconds."""

    make: Make = entries.apply_entry
    keep: Callable[[Target], bool] | None = None
    detail: bool = False
    done: Callable[[Report, float], None] | None = None
    report: Report = dataclasses.field(default_factory=Report)
    cpu: float = 0.0
    pending: int = 0  # sweeps (and plannings) not ended yet

    def ended(self, report: Report | None = None, cpu: float = 0.0) -> None:
        if report is not None:
            self.report.add(report)
        self.cpu += cpu
        self.pending -= 1
        if self.pending <= 0:
            self.answer()

    def answer(self) -> None:
        done, self.done = self.done, None
        if done is not None:
            try:
                done(self.report, self.cpu)
            except Exception as e:  # the asker's failure is not the thread's
                log.error("after a sweep: %s", e)


@dataclasses.dataclass
class _Job:
    """One planned sweep (runs.Apply) and its namespaces not yet run."""

    run: runs.Apply
    kind: int
    cgroups: int
    left: int = 0
    complete: bool = True
    cpu: float = 0.0
    req: Request | None = None
    owner: int | None = None  # (an enforce pass's: the owner it was planned for)


@dataclasses.dataclass
class _Unit:
    job: _Job
    ns: netns.Namespace


@dataclasses.dataclass
class _Plan:
    """The periodic pass's planning of one owner's cgroups (the uid owning
    the cgroup directories): a walk of each, its processes and their
    namespaces, charged to that owner -- 600 cgroups of one user's cost
    its turn, not everyone's budget."""

    kind: int
    owner: int
    cgroups: list[Cgroup]
    req: Request | None = None


@dataclasses.dataclass
class Pass:
    """A periodic pass: its CPU and what it left alone.  It ends when its
    namespaces are all swept or when the next pass begins (which takes
    over what was left, least recently swept first), with the audit."""

    cpu: float = 0.0
    plans: set[tuple[int, int]] = dataclasses.field(default_factory=set)  # (kind, owner)
    deferred: int = 0  # namespaces (and plannings) its CPU budget left to the next pass
    # CPU a pass walking every namespace would take, from each one's last
    # walk and each owner's last planning.
    full_cost: float = 0.0
    coverage: Callable[[], None] | None = None  # the audit, run at its end


class FairQueue:
    """Namespaces to sweep, by kind and owner.  The next one is of the first
    kind with work -- events, then enforced, then set mode; the periodic
    kinds only while they have CPU left, and before events once they have
    waited PERIODIC_MAX_WAIT -- of the owner that had the least CPU lately
    in sweeps of that sort (events, or periodic: every event sweep visits
    our own namespace, whose periodic turn must not pay for them), halved
    every SERVED_HALF_LIFE; in the order queued."""

    def __init__(self, now: float):
        self._queues: dict[int, dict[int, collections.deque]] = {
            k: {} for k in (EVENT, ENFORCED, SETMODE)
        }
        # (events or not, owner) -> (CPU, when)
        self._served: dict[tuple[bool, int], tuple[float, float]] = {}
        self._last_periodic = now
        self.events = 0  # queued events (read by other threads)

    def push(self, kind: int, owner: int, item: object) -> None:
        self._queues[kind].setdefault(owner, collections.deque()).append(item)
        if kind == EVENT:
            self.events += 1

    def has(self, *kinds: int) -> bool:
        return any(q for k in kinds for q in self._queues[k].values())

    def pick(self, now: float, admit: Callable[[int, int], bool]) -> object | None:
        """The next item whose kind and owner ``admit`` lets run now (the
        periodic kinds' budget), or None."""
        kinds = [EVENT, ENFORCED, SETMODE]
        if now - self._last_periodic > PERIODIC_MAX_WAIT:
            kinds = [ENFORCED, SETMODE, EVENT]
        for kind in kinds:
            queues = self._queues[kind]
            owners = sorted(
                (o for o, q in queues.items() if q), key=lambda o: self.served(kind, o, now)
            )
            for owner in owners:
                if not admit(kind, owner):
                    continue
                item = queues[owner].popleft()
                if not queues[owner]:
                    del queues[owner]
                if kind == EVENT:
                    self.events -= 1
                else:
                    self._last_periodic = now
                return item
        if not self.has(ENFORCED, SETMODE):
            self._last_periodic = now  # nothing waited
        return None

    def waiting(self, kind: int) -> list[int]:
        """Owners with items of this kind queued."""
        return [o for o, q in self._queues[kind].items() if q]

    def served(self, kind: int, owner: int, now: float) -> float:
        """The owner's CPU seconds lately in sweeps of this sort, halved
        every SERVED_HALF_LIFE."""
        return self._decayed((kind == EVENT, owner), now)

    def _decayed(self, key: tuple[bool, int], now: float) -> float:
        cpu, when = self._served.get(key, (0.0, now))
        return cpu * math.exp2(-(now - when) / SERVED_HALF_LIFE)

    def charge(self, kind: int, owner: int, cpu: float, now: float) -> None:
        key = (kind == EVENT, owner)
        self._served[key] = (self._decayed(key, now) + cpu, now)
        if len(self._served) > 4096:  # owners long gone
            self._served = {k: v for k, v in self._served.items() if self._decayed(k, now) > 1e-6}

    def drop(self, *kinds: int) -> list:
        """Take every item of these kinds out; returns them."""
        out = [i for k in kinds for q in self._queues[k].values() for i in q]
        for k in kinds:
            self._queues[k] = {}
        if EVENT in kinds:
            self.events = 0
        return out


class Sweeps:
    """The sweeping thread and its queues.  ``ask`` and ``periodic`` are
    for the loop's thread; everything else runs on the sweeping thread."""

    def __init__(self, state: State, on_pass_done: Callable[[Pass], None]):
        self.state = state
        self.on_pass_done = on_pass_done
        self.unavailable = False  # this kernel cannot sweep: said once
        self._cond = threading.Condition()
        self._inbox: list[tuple[int, list, Request | None]] = []  # (kind, cgroups, request)
        self._later: list[tuple[float, int, list[Cgroup]]] = []  # heap (due, seq, cgroups)
        self._seq = 0
        self._cadence = 0.0  # seconds between periodic passes
        self._events_planned = 0.0  # when events were last planned
        self._stop = False
        self._thread: threading.Thread | None = None
        # Only the sweeping thread touches what follows.
        self.queue = FairQueue(time.monotonic())
        self._tokens, self._tokens_at = BUCKET, time.monotonic()
        self._known: dict[int, tuple[frozenset, float]] = {}  # netns -> (signature, swept at)
        self._stuck: dict[int, float] = {}  # netns -> left alone until
        self._procs_at_first: dict[int, frozenset[int]] = {}  # new cgroup -> its processes then
        self._ns_cost: dict[int, float] = {}  # netns -> CPU of its last walk
        self._plan_cost: dict[tuple[int, int], float] = {}  # (kind, owner) -> of its planning
        self._plan_units: dict[tuple[int, int], list[int]] = {}  # ... -> the netns it found
        self._behind: list[tuple[threading.Thread, int]] = []  # (blocked walk, owner)
        self._enforcing: set[int] = set()  # owners with an enforce pass's sweep not ended
        self._open: set[Request] = set()  # requests planned and not answered
        self._pass: Pass | None = None
        self.entered = netns.Entered("bpfkeep-sweep")
        self.held = procfs.HeldSockets()
        self.units_run = 0  # (tests, the benchmark)

    # -- the loop's side ------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            sys.setswitchinterval(SWITCH_INTERVAL)
            self._thread = threading.Thread(target=self._serve, name="bpfkeep-sweeps", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the namespace being swept (not a walk blocked in the
        kernel) and end the thread; what is queued is dropped."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self.entered.close()

    def ask(self, cgs: list[Cgroup]) -> None:
        """Sweep these cgroups' sockets."""
        if cgs and not self.unavailable:
            with self._cond:
                self._inbox.append((EVENT, list(cgs), None))
                self._cond.notify()

    def request(self, cgs: list[Cgroup], req: Request, *, periodic: bool = False) -> bool:
        """Sweep these cgroups' sockets as ``req`` says: an event, or with
        ``periodic`` the enforce room's pass (out of the periodic budget,
        each owner's namespaces once: an owner whose last one has not ended
        is left to it).  False if nothing was queued (this kernel cannot
        sweep; no cgroups): ``req`` is not answered then."""
        if not cgs or self.unavailable:
            return False
        with self._cond:
            self._inbox.append((ENFORCED if periodic else EVENT, list(cgs), req))
            self._cond.notify()
        return True

    def ask_new(self, cgs: list[Cgroup]) -> None:
        """New cgroups: swept now, and RESWEEP_AFTER later those that got
        processes meanwhile (a service joins its cgroup just after it is
        made, with the listeners it was handed; sockets made in it since
        the attach met the policy at sock_ops)."""
        if cgs and not self.unavailable:
            with self._cond:
                self._inbox.append((NEW, list(cgs), None))
                self._seq += 1
                due = time.monotonic() + RESWEEP_AFTER
                heapq.heappush(self._later, (due, self._seq, list(cgs)))
                self._cond.notify()

    def periodic(
        self,
        cgs: list[Cgroup],
        coverage: Callable[[], None],
        cadence: float,
    ) -> None:
        """A periodic pass: these cgroups (the attached ones the enforce
        room leaves to it), then ``coverage()`` (the audit); the next one
        comes ``cadence`` s later."""
        with self._cond:
            self._cadence = cadence
            self._inbox.append((SETMODE, list(cgs), None))
            self._inbox.append((COVERAGE, [coverage], None))
            self._cond.notify()

    def backlog(self) -> int:
        """Sweeps asked for and not done yet: namespaces waiting, requests
        not planned yet (the resweeps of new cgroups included; not what the
        periodic pass leaves to the next one)."""
        with self._cond:
            asked = sum(1 for kind, _c, _r in self._inbox if kind in (EVENT, NEW)) + len(
                self._later
            )
        return asked + self.queue.events

    # -- the sweeping thread -----------------------------------------------------------

    def _serve(self) -> None:
        name_thread("bpfkeep-sweeps")
        while True:
            with self._cond:
                while not self._stop:
                    now = time.monotonic()
                    gather = self._events_planned + EVENT_GATHER - now
                    if gather > 0 and self._only_events() and not self.queue.has(EVENT):
                        self._cond.wait(gather)  # more may come: planned together
                        continue
                    due = self._due(now)
                    if self._inbox or due or self._runnable(now):
                        break
                    self._cond.wait(self._sleep(now))
                if self._stop:
                    return
                inbox, self._inbox = self._inbox, []
            try:
                self._plan(inbox, due)
                now = time.monotonic()
                item = self.queue.pick(now, functools.partial(self._admit, now=now))
                if isinstance(item, _Plan):
                    self._run_plan(item)
                elif item is not None:
                    self._run(item)
            except Exception as e:  # never a dead sweeping thread, nor a spinning one
                self.state.errors += 1
                log.error("sweeping existing sockets failed: %s; what was queued is dropped", e)
                with contextlib.suppress(Exception):
                    self._drop(EVENT, ENFORCED, SETMODE)
                for req in list(self._open):  # planned or not: answered, with what was done
                    self._open.discard(req)
                    req.answer()
                self._enforcing.clear()
                with self._cond:
                    self._cond.wait(1.0)

    def _only_events(self) -> bool:
        """Whether what is asked for and not planned is only events (and
        there is some): those may wait a moment to be planned together."""
        due = bool(self._later) and self._later[0][0] <= time.monotonic()
        return bool(self._inbox or due) and all(k in (EVENT, NEW) for k, _c, _r in self._inbox)

    def _due(self, now: float) -> list[list[Cgroup]]:
        out = []
        while self._later and self._later[0][0] <= now:
            out.append(heapq.heappop(self._later)[2])
        return out

    def _sleep(self, now: float) -> float | None:
        waits = [self._later[0][0] - now] if self._later else []
        if self.queue.has(ENFORCED, SETMODE):
            waits.append(-self._refill(now) * AUDIT_COST_FACTOR + 0.01)
        return max(0.0, min(waits)) if waits else None

    def _refill(self, now: float) -> float:
        self._tokens = min(BUCKET, self._tokens + (now - self._tokens_at) / AUDIT_COST_FACTOR)
        self._tokens_at = now
        return self._tokens

    def _runnable(self, now: float) -> bool:
        if self.queue.has(EVENT):
            return True
        return any(
            self._admit(kind, owner, now)
            for kind in (ENFORCED, SETMODE)
            for owner in self.queue.waiting(kind)
        )

    def _admit(self, kind: int, owner: int, now: float) -> bool:
        """Whether work of this kind and owner may run now: events always;
        the periodic pass while its budget has CPU left, and a light
        owner's enforced namespaces on credit (LIGHT_OWNER)."""
        if kind == EVENT:
            return True
        tokens = self._refill(now)
        if tokens > 0:
            return True
        light = self.queue.served(kind, owner, now) < LIGHT_OWNER
        return kind == ENFORCED and light and tokens > -BUCKET

    # -- planning ----------------------------------------------------------------------

    def _plan(self, inbox: list[tuple[int, list, Request | None]], due: list[list[Cgroup]]) -> None:
        """Turn requests into namespaces to sweep.  The events queued
        meanwhile become one sweep (a Request, one of its own); a new
        periodic pass ends the last one and takes over what it left."""
        for _kind, _cgs, req in inbox:
            if req is not None:
                self._open.add(req)
        events = [
            cg for kind, cgs, req in inbox if kind in (EVENT, NEW) and req is None for cg in cgs
        ]
        for kind, cgs, _req in inbox:
            if kind == NEW:
                for cg in cgs:
                    self._procs_at_first[cg.id] = _procs(cg)
        for cgs in due:
            for cg in cgs:
                first = self._procs_at_first.pop(cg.id, None)
                if first is None or first != _procs(cg):
                    events.append(cg)
        if events or any(k == EVENT and r is not None for k, _c, r in inbox):
            self._events_planned = time.monotonic()
        if events:
            self._job(EVENT, events)
        for kind, cgs, req in inbox:
            if kind == EVENT and req is not None:
                req.pending += 1
                self._job(EVENT, cgs, req)
            elif kind == ENFORCED and req is not None:
                # The enforce room's pass: an owner whose last one is still
                # queued or running is left to that one.
                groups = {u: g for u, g in _by_owner(cgs).items() if u not in self._enforcing}
                req.pending += len(groups)
                for uid, group in groups.items():
                    self._enforcing.add(uid)
                    self.queue.push(ENFORCED, uid, _Plan(ENFORCED, uid, group, req))
                if not groups:
                    self._answer(req)
            elif kind == SETMODE:
                self._end_pass(force=True)
                self._pass = Pass()
                for uid, group in _by_owner(cgs).items():
                    self.queue.push(kind, uid, _Plan(kind, uid, group))
                    self._pass.plans.add((kind, uid))
            elif kind == COVERAGE and self._pass is not None:
                self._pass.coverage = cgs[0]
        self._end_pass()

    def _answer(self, req: Request) -> None:
        self._open.discard(req)
        req.answer()

    def _ended(self, req: Request | None, owner: int | None, report: Report | None, cpu: float):
        """One sweep (or planning) of a request ended."""
        if owner is not None:
            self._enforcing.discard(owner)
        if req is not None:
            req.ended(report, cpu)
            if req.pending <= 0:
                self._open.discard(req)

    def _job(
        self, kind: int, cgs: list[Cgroup], req: Request | None = None, owner: int | None = None
    ) -> list[int]:
        """Plan a sweep of these cgroups and queue its namespaces; their
        inodes.  (``req``: one of its sweeps is this one; ``owner``: an
        enforce pass's, planned for this owner.)"""
        table = self.state.table
        with table.lock:
            unique = {cg.id: cg for cg in cgs if table.is_ours(cg.id)}
            attached = set(table.ours()) | set(table.attached(HAND))
        if not unique or self.unavailable:
            self._ended(req, owner, None, 0.0)
            return []
        spec = req or Request()
        try:
            run = runs.Apply(
                self.state.enforcer.pins,
                list(unique.values()),
                entered=self.entered,
                held=self.held,
                make=spec.make,
                keep=spec.keep,
                detail=spec.detail,
                attached=attached,
            )
            # (A request's sweep visits our own namespace as a pass does:
            # a repaired or relearned socket may be one a process handed
            # over and left there.)
            units = run.units(own_namespace=kind != EVENT or req is not None)
        except SweepUnavailable as e:
            self._ended(req, owner, None, 0.0)
            self._unavailable(e)
            return []
        except (BpfkeepError, OSError) as e:
            self._ended(req, owner, None, 0.0)
            self._failed(list(unique.values()), e)
            return []
        job = _Job(run, kind, len(unique), left=len(units), req=req, owner=owner)
        if not units:
            self._finish(job)
            return []
        # The least recently swept namespaces first: a pass cut short by
        # its budget goes on where it stopped.
        units.sort(key=lambda ns: self._known.get(ns.inode, (frozenset(), 0.0))[1])
        for ns in units:
            self.queue.push(kind, ns.uid, _Unit(job, ns))
        return [ns.inode for ns in units]

    def _drop(self, *kinds: int) -> int:
        """Drop the namespaces queued in these kinds; their sweeps end
        incomplete.  Returns how many were dropped."""
        units = self.queue.drop(*kinds)
        for p in units:
            if isinstance(p, _Plan) and p.req is not None:
                self._ended(p.req, p.owner, None, 0.0)
        jobs = {id(u.job): u.job for u in units if isinstance(u, _Unit)}
        for job in jobs.values():
            job.complete = False
            job.left = 0
            self._finish(job)
        return len(units)

    # -- running -----------------------------------------------------------------------

    def _run_plan(self, plan: _Plan) -> None:
        now = time.monotonic()
        t0 = self._cpu()
        found: list[int] = []
        try:
            found = self._job(
                plan.kind,
                plan.cgroups,
                plan.req,
                plan.owner if plan.req is not None else None,
            )
        finally:
            cpu = self._cpu() - t0
            if plan.req is not None:
                plan.req.cpu += cpu
            else:
                self._plan_cost[(plan.kind, plan.owner)] = cpu
                self._plan_units[(plan.kind, plan.owner)] = found
            self.queue.charge(plan.kind, plan.owner, cpu, now)
            self._charge_pass(cpu, plan.kind)
            self._end_pass()

    def _run(self, unit: _Unit) -> None:
        job, ns, now = unit.job, unit.ns, time.monotonic()
        t0 = self._cpu()
        try:
            if self._leave_alone(unit, now):
                return
            t1 = self._cpu()
            job.run.run(ns)
            self._ns_cost[ns.inode] = self._cpu() - t1
            self.units_run += 1
            log.debug("swept net:[%d] of %s (%s)", ns.inode, _owner(ns.uid), job.kind)
            if job.kind == SETMODE:
                self._known[ns.inode] = (self._signature(ns), now)
        except SweepUnavailable as e:
            job.complete = False
            self._unavailable(e)
            return
        except SweepStuck as e:
            job.complete = False
            self._stuck[ns.inode] = now + STUCK_BACKOFF
            self._behind += [(t, ns.uid) for t in self.entered.behind if t.is_alive()]
            self.entered.behind.clear()
            log.warning("sweep of uid %s's namespace given up: %s", _owner(ns.uid), e)
        except (BpfkeepError, OSError) as e:
            job.complete = False
            self.state.errors += 1
            log.error("sweeping net:[%d]: %s", ns.inode, e)
        except Exception as e:  # one namespace's failure is that namespace's
            job.complete = False
            self.state.errors += 1
            log.error("sweeping net:[%d] failed: %s", ns.inode, e)
        finally:
            cpu = self._cpu() - t0
            job.cpu += cpu
            self.queue.charge(job.kind, ns.uid, cpu, now)
            if job.kind != EVENT:
                self._charge_pass(cpu, job.kind)
            job.left -= 1
            if job.left == 0:
                self._finish(job)
            self._end_pass()

    def _leave_alone(self, unit: _Unit, now: float) -> bool:
        """Whether this namespace is not swept now: its walk blocked in the
        kernel lately, its owner has too many such walks still blocked, or
        (periodic) nothing changed in it since its last full sweep."""
        ns, job = unit.ns, unit.job
        if self._stuck.get(ns.inode, 0.0) > now:
            job.complete = False
            return True
        self._behind = [(t, o) for t, o in self._behind if t.is_alive()]
        if sum(1 for _, o in self._behind if o == ns.uid) >= STUCK_MAX:
            job.complete = False
            return True
        if job.kind != SETMODE or ns.inode not in self._known:
            return False  # (an enforce pass walks every namespace)
        signature, swept = self._known[ns.inode]
        # Walked again in the pass before its time is up, not the one after.
        recheck = SET_RECHECK - self._cadence
        if now - swept < recheck and signature == self._signature(ns):
            log.debug("left net:[%d] of %s alone: unchanged", ns.inode, _owner(ns.uid))
            return True
        return False

    def _signature(self, ns: netns.Namespace) -> frozenset:
        """What the scope's processes in a namespace hold, as far as a
        sweep goes: each one with the version of its set of sockets."""
        now = time.monotonic()
        return frozenset((pid, self.held.version(pid, now)) for pid in ns.pids)

    def _finish(self, job: _Job) -> None:
        report: Report | None = None
        try:
            report = job.run.finish(job.complete)
        except (BpfkeepError, OSError) as e:
            self.state.errors += 1
            log.error("after a sweep: %s", e)
        finally:
            if job.req is not None or job.owner is not None:
                self._ended(job.req, job.owner, report or job.run.report, job.cpu)
        if report is None or job.req is not None:
            return  # (a request's asker says what it did)
        if report.swept or report.unreachable:
            log.info("%s (%d cgroup(s))", report.summary(), job.cgroups)

    def _charge_pass(self, cpu: float, kind: int) -> None:
        """The periodic budget pays for both periodic kinds; the audit's
        pass counts its own."""
        self._tokens -= cpu
        if self._pass is not None and kind == SETMODE:
            self._pass.cpu += cpu

    def _end_pass(self, force: bool = False) -> None:
        """End the periodic pass once its namespaces are swept (``force``:
        now, what it left deferred to the next one): the audit, what it
        cost, and what is remembered of namespaces no pass sees any more."""
        p = self._pass
        if p is None or (p.coverage is None and not force):
            return  # none, or its requests are not all planned yet
        if not force and self.queue.has(SETMODE):
            return
        p.deferred = self._drop(SETMODE)
        self._pass = None
        if p.coverage is not None:
            t0 = self._cpu()
            try:
                p.coverage()
            finally:
                cpu = self._cpu() - t0
                self._tokens -= cpu
                p.cpu += cpu
        inodes = {i for key in p.plans for i in self._plan_units.get(key, ())}
        walked = [self._ns_cost[i] for i in inodes if i in self._ns_cost]
        mean = sum(walked) / len(walked) if walked else 0.0
        p.full_cost = sum(self._plan_cost.get(k, 0.0) for k in p.plans) + sum(
            self._ns_cost.get(i, mean) for i in inodes
        )
        # What no pass sees any more is forgotten.
        self._known = {i: k for i, k in self._known.items() if i in inodes}
        self._ns_cost = {i: c for i, c in self._ns_cost.items() if i in inodes}
        self._plan_cost = {k: c for k, c in self._plan_cost.items() if k in p.plans}
        self._plan_units = {k: u for k, u in self._plan_units.items() if k in p.plans}
        now = time.monotonic()
        self._stuck = {i: until for i, until in self._stuck.items() if until > now}
        self.held.keep_only(pid for sig, _t in self._known.values() for pid, _v in sig)
        self.on_pass_done(p)

    def _cpu(self) -> float:
        """CPU time of this thread and of the one entering namespaces."""
        return time.thread_time() + self.entered.cpu_seconds()

    def _unavailable(self, e: SweepUnavailable) -> None:
        if not self.unavailable:
            self.unavailable = True
            log.warning("%s", e)
        self._drop(EVENT, ENFORCED, SETMODE)

    def _failed(self, cgs: list[Cgroup], e: Exception) -> None:
        self.state.errors += 1
        names = ", ".join(cg.display for cg in cgs[:3]) + (" ..." if len(cgs) > 3 else "")
        log.error("sweeping the existing sockets of %s: %s", names, e)


def _by_owner(cgs: list[Cgroup]) -> dict[int, list[Cgroup]]:
    """The cgroups by the uid owning their directory (a delegated subtree's
    user; root's own)."""
    out: dict[int, list[Cgroup]] = {}
    for cg in cgs:
        try:
            uid = os.stat(cg.path).st_uid
        except OSError:
            continue  # gone meanwhile
        out.setdefault(uid, []).append(cg)
    return out


def _procs(cg: Cgroup) -> frozenset[int]:
    try:
        return frozenset(procs(cg.path))
    except (OSError, ValueError):
        return frozenset()


def _owner(uid: int) -> str:
    return "the host" if uid == netns.OURS else str(uid)
