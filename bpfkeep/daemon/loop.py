"""The daemon's main loop: it wires the collaborators together and runs
what is due -- the watchdog, the periodic pass, the healer's check,
retries, queued sweeps -- between inotify's events, signals and the
container runtimes' answers."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import select
import signal
import time
import typing

from prometheus_client import CollectorRegistry

from bpfkeep import config, containers, peers
from bpfkeep.daemon.heal import Healer
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
from bpfkeep.metrics.collector import Collector, Row, Snapshot
from bpfkeep.metrics.http import MetricsServer
from bpfkeep.pins.pindir import DaemonLock, fully_attached

log = logging.getLogger("bpfkeep")

FIRST_AUDIT = 1.0  # seconds after READY=1


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
        self._ready = False  # the first reconcile is done (READY=1)
        # Made at run() (they need the config, the mount, a descriptor).
        self.inotify: Inotify | None = None
        self.lookups: containers.Lookups | None = None
        self.workloads: Workloads | None = None
        self.reconciler: Reconciler | None = None
        self.healer: Healer | None = None
        self.lock: DaemonLock | None = None  # held from start() until run() returns

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Everything up to READY=1."""
        state = self.state
        state.cfg = config.load(state.config_path)  # a bad config at start: exit 2
        state.mount = cgroup2_mount()
        # Before anything is loaded, attached or listened on: another
        # daemon keeping this pin directory is one line and exit 69.
        self.lock = state.enforcer.daemon_lock()
        state.enforcer.prepare()
        self._start_metrics(state.cfg.listen)
        self.inotify = Inotify()
        self.lookups = containers.Lookups(state.cfg.runtimes)
        self.workloads = Workloads(state, self.lookups)
        tree = Tree(state.mount, self.inotify, self.workloads.watches, self._walk_failed)
        self.reconciler = rec = Reconciler(state, tree, self.workloads, self.passes, self.retries)
        self.healer = Healer(state, self.reconciler, self.inotify)
        self._guard("reconcile", lambda: rec.full(prune=True, sweep_all=True, report=True))
        self.healer.watch()
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
                self.passes.stop()
                if self.lookups is not None:
                    self.lookups.close()
            self._exit()
        finally:
            # Only now: a daemon started meanwhile must not find ours
            # still detaching (detach_on_exit).
            if self.lock is not None:
                self.lock.release()
        return 0

    def _loop(self, rfd: int) -> None:
        assert self.state.cfg and self.inotify and self.lookups and self.healer
        sched, wd_every = self.sched, watchdog_interval()
        now = time.monotonic()
        if wd_every:
            sched.at("watchdog", now)
        self._plan_audit(now + FIRST_AUDIT)
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
            if sched.due("names", now):
                self._guard("resolving peer host names", self.reconciler.refresh_names)
                self._plan_names()
            if sched.due("heal", now) | sched.due("heal-settle", now):
                sched.at("heal-settle", None)
                self._guard("check of pins and links", self.healer.check)
                sched.at("heal", time.monotonic() + self.healer.every())
            self._run_retries()
            self.passes.run_queued(now)
            wake = sched.next(self.retries.next(), self.passes.next_sweep() or float("inf"))
            timeout = min(max(0.0, wake - time.monotonic()), 3600.0)
            r, _, _ = select.select([self.inotify.fd, rfd, self.lookups.fd], [], [], timeout)
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

    def _plan_names(self) -> None:
        """Host names in peer rules are resolved again every HOST_TTL."""
        cfg = self.state.cfg
        named = cfg is not None and any(
            p.is_name for r in (*cfg.rules, *cfg.workload_rules) for p in r.policy.peers
        )
        self.sched.at("names", time.monotonic() + peers.HOST_TTL if named else None)

    def _plan_audit(self, when: float) -> None:
        assert self.state.cfg
        self.sched.at("audit", when if self.state.cfg.audit_interval else None)

    def _events(self) -> None:
        assert self.reconciler and self.healer
        if self.reconciler.events():
            # Something under the pin directory went: check once it
            # settles (rm -rf takes a moment; halfway is no state to act on).
            self.sched.after("heal-settle", 0.5)

    def _audit(self) -> None:
        assert self.workloads
        workloads = self.workloads

        def sweeps_existing(cg) -> bool:
            rule = workloads.rule_for(cg)
            return rule is not None and rule.existing

        self.passes.audit(sweeps_existing)

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
        state = self.state
        assert self.reconciler and self.workloads and self.lookups
        try:
            new = config.load(state.config_path)
        except config.ConfigError as e:
            log.error("reload rejected, old policies stay in force: %s", e)
            self.notifier.send(f"STATUS=reload rejected: {e}")
            return
        if new.listen != (state.cfg.listen if state.cfg else None):
            log.warning("metrics.listen changed: takes effect at the next restart")
        state.cfg = dataclasses.replace(new, listen=state.cfg.listen if state.cfg else new.listen)
        self.lookups.sources = new.runtimes
        self.workloads.ask_again()
        log.info(
            "reloaded %s: %d policy rule(s)",
            state.config_path,
            len(new.rules) + len(new.workload_rules),
        )
        self.reconciler.full(report=True)
        self._plan_names()
        self.notifier.send(f"STATUS={self._status()}")
        # Audits turned on or off, or their interval changed.
        self._plan_audit(
            time.monotonic() + (self.passes.cadence() if self.passes.audit_cost else FIRST_AUDIT)
        )

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
            sweep_backlog=self.passes.backlog(),
        )


def main(config_path: str, pin_dir: str | None, detach_on_exit: bool) -> int:
    return Daemon(config_path, pin_dir, detach_on_exit).run()
