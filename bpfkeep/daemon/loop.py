"""The daemon's main loop: it wires the collaborators together and runs
what is due -- the watchdog, the periodic pass, the healer's check,
retries, queued sweeps -- between inotify's events, signals and the
container runtimes' answers."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import select
import signal
import time
import typing

from prometheus_client import CollectorRegistry

from bpfkeep import config, containers
from bpfkeep.daemon.enforce import Enforced, enforces
from bpfkeep.daemon.heal import Healer
from bpfkeep.daemon.learn import Learner
from bpfkeep.daemon.passes import Passes
from bpfkeep.daemon.reconcile import Reconciler
from bpfkeep.daemon.scheduler import Retries, Scheduler
from bpfkeep.daemon.state import HAND, OURS, State
from bpfkeep.daemon.systemd import Notifier, setup_logging, watchdog_interval
from bpfkeep.daemon.watch import Tree
from bpfkeep.daemon.workloads import Workloads
from bpfkeep.enforcer import Enforcer
from bpfkeep.errors import BpfkeepError
from bpfkeep.kernel.cgroups import cgroup2_mount, printable
from bpfkeep.kernel.inotify import Inotify
from bpfkeep.metrics.collector import Collector, EnforceSnapshot, Row, Snapshot
from bpfkeep.metrics.http import MetricsServer
from bpfkeep.pins.pindir import DaemonLock, fully_attached

log = logging.getLogger("bpfkeep")

FIRST_AUDIT = 1.0  # seconds after READY=1


@contextlib.contextmanager
def no_cyclic_gc() -> typing.Iterator[None]:
    """The cyclic garbage collector held off meanwhile; turned on again
    after only if it was on (the metrics thread may hold it off too)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


class Daemon:
    def __init__(self, config_path: str, pin_dir: str | None = None, detach_on_exit: bool = False):
        self.state = State(config_path, Enforcer(pin_dir))
        self.detach_on_exit_flag = detach_on_exit
        self.notifier = Notifier()
        self.metrics: MetricsServer | None = None
        self.sched = Scheduler()
        self.retries = Retries()
        self.passes = Passes(self.state)
        self._stop = False
        self._reload = False
        # The config as load() returned it last (state.cfg keeps the listen
        # address in use): the same file again is this object again.
        self._loaded: config.Config | None = None
        self._ready = False  # the first reconcile is done (READY=1)
        # Made at run() (they need the config, the mount, a descriptor).
        self.inotify: Inotify | None = None
        self.lookups: containers.Lookups | None = None
        self.workloads: Workloads | None = None
        self.reconciler: Reconciler | None = None
        self.healer: Healer | None = None
        self.learner = Learner(self.state, self.passes)
        self.enforced: Enforced | None = None
        self.lock: DaemonLock | None = None  # held from start() until run() returns

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Everything up to READY=1."""
        state = self.state
        state.cfg = self._loaded = config.load(state.config_path)  # a bad config: exit 2
        state.mount = cgroup2_mount()
        # Before anything is loaded, attached or listened on: another
        # daemon keeping this pin directory is one line and exit 69.
        self.lock = state.enforcer.daemon_lock()
        state.enforcer.prepare()
        self.learner.open()
        self._start_metrics(state.cfg.listen)
        self.inotify = Inotify()
        self.lookups = containers.Lookups(state.cfg.runtimes)
        self.workloads = Workloads(state, self.lookups)
        tree = Tree(state.mount, self.inotify, self.workloads.watches, self._walk_failed)
        self.reconciler = rec = Reconciler(state, tree, self.workloads, self.passes, self.retries)
        self.resolver_ttl()
        self.healer = Healer(state, self.reconciler, self.inotify)
        self.enforced = Enforced(state, self.passes, self._sweeps_existing)
        self._guard("reconcile", lambda: rec.full(prune=True, sweep_all=True, report=True))
        self._guard("restoring learned idle limits", self.learner.restore)
        self.healer.watch()
        self.enforced.start(time.monotonic())
        self._ready = True

    def _walk_failed(self, path: str, e: OSError) -> None:
        assert self.reconciler
        self.reconciler.walk_failed(path, e)

    def run(self) -> int:
        setup_logging()
        t0 = time.monotonic()
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            try:
                self.start()
                assert self.state.cfg and self.inotify and self.lookups
                self.notifier.send(f"READY=1\nSTATUS={self._status()}")
                self.passes.start()  # sweeps run from now on, on a thread of their own
                log.info(
                    "enforcing %d cgroup(s) after %.2f s; metrics on http://%s:%d/metrics",
                    self.state.table.count(OURS),
                    time.monotonic() - t0,
                    *self.state.cfg.listen,
                )
                self._loop(rfd)
            finally:
                signal.set_wakeup_fd(-1)
                self.passes.stop()  # (the sweeping thread: before what its jobs report to)
                self.learner.close()
                if self.lookups is not None:
                    self.lookups.close()
                if self.enforced is not None:
                    self.enforced.close()
            self._exit()
        finally:
            # Only now: a daemon started meanwhile must not find ours
            # still detaching (detach_on_exit).
            if self.lock is not None:
                self.lock.release()
        return 0

    def _loop(self, rfd: int) -> None:
        assert self.state.cfg and self.inotify and self.lookups and self.healer
        assert self.enforced
        enforced = self.enforced
        sched, wd_every = self.sched, watchdog_interval()
        now = time.monotonic()
        if wd_every:
            sched.at("watchdog", now)
        self._plan_audit(now + FIRST_AUDIT)
        self._plan_learning(now + FIRST_AUDIT - self.state.cfg.audit_interval)
        self._plan_names()
        sched.at("heal", now + self.healer.every())
        while not self._stop:
            now = time.monotonic()
            if sched.due("watchdog", now):
                self.notifier.send("WATCHDOG=1")
                sched.at("watchdog", now + wd_every)  # type: ignore[operator]
            if sched.due("audit", now):
                self._audit()
                self._plan_audit(time.monotonic() + self.passes.cadence())
            if sched.due("learn", now):
                self._guard("looking at idle connections", self.learner.sample)
                self._plan_learning(time.monotonic())
            if sched.due("names", now):
                self._guard("resolving peer host names", self.reconciler.refresh_names)
                self._plan_names()
            if sched.due("heal", now) | sched.due("heal-settle", now):
                sched.at("heal-settle", None)
                self._guard("check of pins and links", self.healer.check)
                sched.at("heal", time.monotonic() + self.healer.every())
            self._run_retries()
            self._guard("enforce pass or repair", lambda t=now: enforced.run_due(t))
            wake = sched.next(self.retries.next(), enforced.next())
            timeout = min(max(0.0, wake - time.monotonic()), 3600.0)
            bell = enforced.fd()
            fds = [self.inotify.fd, rfd, self.lookups.fd, *([bell] if bell is not None else [])]
            if self.learner.fd is not None:
                fds.append(self.learner.fd)
            r, _, _ = select.select(fds, [], [], timeout)
            if bell is not None and bell in r:
                self._guard("setsockopt past the cgroup hook", enforced.rang)
            if rfd in r:
                with contextlib.suppress(BlockingIOError):
                    os.read(rfd, 4096)
            if self._reload:
                self._reload = False
                self._guard("reload", self.reload)
            if self.inotify.fd in r:
                self._guard("cgroup event", self._events)
            if self.lookups.fd in r:
                self._guard("container lookup", self.reconciler.answered)  # type: ignore[union-attr]
            if self.learner.fd is not None and self.learner.fd in r:
                self._guard("lost connections", self.learner.events)

    def _plan_names(self) -> None:
        """Host names in peer rules are resolved again every HOST_TTL."""
        cfg = self.state.cfg
        named = cfg is not None and any(
            p.is_name for r in (*cfg.rules, *cfg.workload_rules) for p in r.policy.peers
        )
        self.resolver_ttl()
        self.sched.at("names", time.monotonic() + cfg.resolve_interval if named and cfg else None)

    def resolver_ttl(self) -> None:
        if self.reconciler and self.state.cfg:
            self.reconciler.resolver.ttl = self.state.cfg.resolve_interval

    def _plan_learning(self, after: float) -> None:
        """The learner's look at idle connections (survivals, connections
        at risk) runs at audit_interval on a schedule of its own, stretched
        by its own cost -- not the audit's sweeps'."""
        assert self.state.cfg
        every = self.state.cfg.audit_interval
        self.sched.at("learn", after + self.learner.every(every) if every else None)

    def _plan_audit(self, when: float) -> None:
        assert self.state.cfg
        self.sched.at("audit", when if self.state.cfg.audit_interval else None)

    def _events(self) -> None:
        assert self.reconciler and self.healer
        if self.reconciler.events():
            # Something under the pin directory went: check once it
            # settles (rm -rf takes a moment; halfway is no state to act on).
            self.sched.after("heal-settle", 0.5)

    def _sweeps_existing(self, cg) -> bool:
        """Does the cgroup's rule sweep the sockets it had before?"""
        assert self.workloads
        rule = self.workloads.rule_for(cg)
        return rule is not None and rule.existing

    def _audit(self) -> None:
        # The enforced cgroups are swept by their own pass (daemon.enforce),
        # which no backoff stretches.
        self.passes.audit(lambda cg: self._sweeps_existing(cg) and not self._enforces(cg))

    def _enforces(self, cg) -> bool:
        e = self.state.table.get(cg.id)
        return e is not None and enforces(e.policy)

    def _exit(self) -> None:
        state = self.state
        ours = state.table.ours()
        if (state.cfg and state.cfg.detach_on_exit) or self.detach_on_exit_flag:
            for cg_id, e in ours.items():
                try:
                    state.enforcer.detach_id(cg_id)
                except (BpfkeepError, OSError) as err:
                    log.error("detaching %s at exit failed: %s", e.cgroup.display, err)
            log.info("stopped; detached %d cgroup(s) as configured", len(ours))
        else:
            log.info("stopped; %d cgroup(s) stay enforced by the kernel", len(ours))
        self.notifier.send("STOPPING=1")

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._stop = True

    def _guard(self, what: str, fn: typing.Callable[[], None]) -> None:
        """Run one step of the loop; whatever it raises is logged, counted
        and answered with a full reconcile later -- never a dead daemon."""
        try:
            fn()
        except Exception as e:
            self.state.errors += 1
            log.error("%s failed: %s", what, e)
            self.retries.later(None)

    def _run_retries(self) -> None:
        assert self.reconciler
        rec = self.reconciler
        for path in self.retries.take(time.monotonic()):
            if not self.retries.pending(path):
                continue  # done by a full reconcile just now
            if path is None:
                self._guard("reconcile", lambda: rec.full(prune=True))
            else:
                self._guard("rescan", lambda p=path: rec.scan(p))
            if not self.retries.failed_again(path):
                log.info("retry of %s succeeded", printable(path) if path else "the full reconcile")

    # -- config --------------------------------------------------------------

    def reload(self) -> None:
        # A reload at 10,000 policies with peer rules allocates ~1 million
        # objects (the config's tables, then its rules) that reference
        # counting frees; meanwhile the cyclic collector ran ~300 times, two
        # full passes over the daemon's heap among them: ~15 % of the
        # reload's CPU time (gc.callbacks in the daemon).  It waits.
        with no_cyclic_gc():
            self._reload_config()

    def _reload_config(self) -> None:
        state = self.state
        assert self.reconciler and self.workloads and self.lookups
        try:
            new = config.load(state.config_path, previous=self._loaded)
        except config.ConfigError as e:
            log.error("reload rejected, old policies stay in force: %s", e)
            self.notifier.send(f"STATUS=reload rejected: {e}")
            return
        if new.listen != (state.cfg.listen if state.cfg else None):
            log.warning("metrics.listen changed: takes effect at the next restart")
        if new is not self._loaded or state.cfg is None:  # (the same: its rules stay indexed)
            state.cfg = dataclasses.replace(
                new, listen=state.cfg.listen if state.cfg else new.listen
            )
        self._loaded = new
        self.lookups.sources = new.runtimes
        self.workloads.ask_again()
        log.info(
            "reloaded %s: %d policy rule(s)",
            state.config_path,
            len(new.rules) + len(new.workload_rules),
        )
        self.reconciler.full(report=True)
        self._plan_names()
        if self.enforced is not None:
            self.enforced.replan()
        self.notifier.send(f"STATUS={self._status()}")
        # Audits turned on or off, or their interval changed.
        self._plan_audit(
            time.monotonic() + (self.passes.cadence() if self.passes.audit_cost else FIRST_AUDIT)
        )
        self._plan_learning(time.monotonic())

    def _status(self) -> str:
        table = self.state.table
        hand = table.count(HAND)
        by_hand = f", {hand} attached by hand left alone" if hand else ""
        return f"enforcing {table.count(OURS)} cgroup(s){by_hand}, {self.state.errors} error(s)"

    # -- metrics ----------------------------------------------------------------

    def _start_metrics(self, listen: tuple[str, int]) -> None:
        registry = CollectorRegistry(auto_describe=True)
        registry.register(Collector(self.snapshot))
        try:
            self.metrics = MetricsServer(registry, listen[0], listen[1], ready=self.readiness)
        except OSError as e:
            raise BpfkeepError(
                f"metrics: cannot listen on {listen[0]}:{listen[1]} ({e.strerror}); "
                "change [metrics] listen in the config"
            ) from None
        self.metrics.start()

    def readiness(self) -> str | None:
        """None when the daemon is doing its job, else why not: for
        ``GET /ready`` (a Kubernetes readiness probe).  Ready means the first
        reconcile is done (systemd's READY=1), this version's programs are
        pinned, and every cgroup the daemon keeps has all its links pinned
        (an unpinned link is detached: see daemon.heal).  Called from the
        metrics thread: reads the pins, and the table under its lock."""
        if not self._ready:
            return "starting: the first reconcile has not finished"
        enforcer = self.state.enforcer
        missing = enforcer.objects_missing()
        if missing:
            return f"pinned objects missing under {enforcer.obj_dir}: {', '.join(missing)}"
        with self.state.table.lock:
            kept = [(i, e.cgroup) for i, e in self.state.table.ours().items()]
        pins = enforcer.link_pins()
        unpinned = [
            cg.display
            for i, cg in kept
            if not fully_attached(pins.get(i, ())) and os.path.isdir(cg.path)
        ]
        if unpinned:
            more = f" and {len(unpinned) - 3} more" if len(unpinned) > 3 else ""
            return f"links not pinned for {', '.join(unpinned[:3])}{more}"
        return None

    def snapshot(self) -> Snapshot:
        """What the collector shows, read under the table's lock (the scrape
        thread calls it)."""
        state, table = self.state, self.state.table
        with table.lock:
            known = {i: e for i, e in table.items() if e.attached}
            rows_of = {i: (e.cgroup.display, e.policy) for i, e in known.items()}
            workloads = self.workloads.labels() if self.workloads else {}
            unidentified = self.workloads.unidentified() if self.workloads else 0
            unmanaged = sorted(e.cgroup.display for e in known.values() if e.attached == HAND)
            expected = sorted(e.cgroup.display for e in table.expected())
            coverage = dict(self.passes.coverage) if self.passes.coverage is not None else None
        # The counters live in cgroup storage, which the kernel frees when
        # the last bpfkeep program leaves the cgroup: reading them is also
        # the check that the policy is still attached.  Hand-made
        # attachments the config matches are shown too: they do enforce.
        counters = state.enforcer.read_counters(list(rows_of))
        losses = state.enforcer.losses(rows_of)
        rows = [
            Row(name, policy, counters[i], losses.get(i))
            for i, (name, policy) in sorted(rows_of.items(), key=lambda kv: kv[1][0])
            if i in counters
        ]
        cfg = state.cfg
        return Snapshot(
            rows,
            expected,
            state.errors,
            state.reconciles,
            coverage,
            self.passes.audit_errors,
            unmanaged,
            audit_cpu_seconds=self.passes.audit_cost,
            # Audits turned off on reload: no next pass to announce.
            audit_every_seconds=(
                self.passes.every()
                if self.passes.audit_cost is not None and cfg and cfg.audit_interval
                else None
            ),
            workloads=workloads,
            workload_labels=cfg.workload_labels if cfg else "container",
            containers_unidentified=unidentified,
            paths=self.learner.rows(),
            at_risk=dict(self.learner.at_risk),
            enforce=self._enforce_snapshot(),
            sweep_backlog=self.passes.backlog(),
        )

    def _enforce_snapshot(self) -> EnforceSnapshot | None:
        e = self.enforced
        if e is None or self.state.cfg is None:
            return None
        return EnforceSnapshot(
            every_seconds=e.every(),
            tracing=bool(e.tracing),
            repairs=e.repairs,
            repair_cpu_seconds=e.repair_cpu,
            pass_cpu_seconds=e.pass_cpu,
        )


def main(config_path: str, pin_dir: str | None, detach_on_exit: bool) -> int:
    return Daemon(config_path, pin_dir, detach_on_exit).run()
