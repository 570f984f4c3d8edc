"""``bpfkeep daemon``: keep the config's policies attached to the right
cgroups, export metrics, and never leave a gap in enforcement.

- Start: adopt the attachments a previous daemon left in bpffs (they never
  stopped working), then reconcile: attach/update what the config wants,
  detach what it no longer wants (only attachments the daemon owns).
- New cgroups are seen through inotify on the directories that could hold
  a match, not by polling the tree.
- SIGHUP reloads; a bad config is logged and the old policies stay.
- SIGTERM leaves enforcement in place unless detach_on_exit is set.
- systemd: Type=notify, READY=1 after the first reconcile, STATUS=,
  WATCHDOG=1 when WatchdogSec= is set.

bcc never enters this process (the loader runs apart), so the daemon stays
small: ctypes + libbpf, prometheus_client, and a raw inet_diag socket for
the audit.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import logging
import math
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import typing

from bpfkeep import bpfmaps, cgroups, config, containers, loader, runner
from bpfkeep.cgroups import printable
from bpfkeep.enforcer import HOOKS, Enforcer, Pass, managed_of, policy_is
from bpfkeep.errors import BpfkeepError
from bpfkeep.metrics import MetricsServer
from bpfkeep.options import Policy
from bpfkeep.sweep import SweepUnavailable

log = logging.getLogger("bpfkeep")

# inotify (include/uapi/linux/inotify.h)
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_IGNORED, IN_ISDIR, IN_Q_OVERFLOW = 0x400, 0x8000, 0x40000000, 0x4000
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
WATCH_MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF
PIN_MASK = IN_DELETE | IN_MOVED_FROM | IN_DELETE_SELF  # under the pin directory
# A new cgroup is swept right after its attach and once more this much
# later, when the service systemd started in it has joined with the
# listeners it was handed.
RESWEEP_AFTER = 1.0


# -- systemd ------------------------------------------------------------------


def sd_notify(message: str, environ: dict[str, str] | None = None) -> bool:
    """Send a datagram to $NOTIFY_SOCKET; a no-op outside systemd."""
    env = os.environ if environ is None else environ
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError:
        return False


class Notifier:
    """sd_notify over one socket opened at start: a notification (above all
    WATCHDOG=1) must not need a new file descriptor, or a daemon out of
    descriptors would also be killed by its watchdog."""

    def __init__(self, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        self.raw = env.get("NOTIFY_SOCKET") or ""
        self.addr = "\0" + self.raw[1:] if self.raw.startswith("@") else self.raw
        self.sock: socket.socket | None = None
        if self.addr:
            with contextlib.suppress(OSError):
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def send(self, message: str) -> bool:
        if not self.addr:
            return False
        if self.sock is None:  # could not open one at start: try once more
            return sd_notify(message, {"NOTIFY_SOCKET": self.raw})
        try:
            self.sock.sendto(message.encode(), self.addr)
            return True
        except OSError:
            return False


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class JournalFormatter(logging.Formatter):
    """``<N>message`` lines that journald turns into priorities; plain
    timestamps when not under systemd."""

    PRIORITY: typing.ClassVar[dict[int, int]] = {
        logging.DEBUG: 7,
        logging.INFO: 6,
        logging.WARNING: 4,
        logging.ERROR: 3,
    }

    def __init__(self, journal: bool):
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if self.journal:
            return f"<{self.PRIORITY.get(record.levelno, 6)}>{msg}"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        return f"{stamp} bpfkeep[{os.getpid()}] {record.levelname.lower()}: {msg}"


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter(bool(os.environ.get("JOURNAL_STREAM"))))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


# -- inotify --------------------------------------------------------------------


class Inotify:
    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.paths: dict[int, str] = {}  # wd -> absolute path
        self.wds: dict[str, int] = {}

    def watch(self, path: str, mask: int = WATCH_MASK) -> bool:
        if path in self.wds:
            return True
        wd = self._add(self.fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOENT, errno.ENOTDIR):
                return False
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        self.paths[wd], self.wds[path] = path, wd
        return True

    def events(self) -> list[tuple[str | None, int, str]]:
        """(watched dir or None on overflow, mask, name) for pending events."""
        out = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            off = 0
            while off < len(buf):
                wd, mask, _cookie, length = struct.unpack_from("iIII", buf, off)
                # Names are bytes: keep them as the os module does (surrogates),
                # so that a cgroup whose name is not UTF-8 is still found.
                name = os.fsdecode(buf[off + 16 : off + 16 + length].split(b"\0", 1)[0])
                off += 16 + length
                if mask & IN_Q_OVERFLOW:
                    out.append((None, mask, ""))
                    continue
                path = self.paths.get(wd)
                if mask & IN_IGNORED:
                    if path is not None:
                        self.paths.pop(wd, None)
                        self.wds.pop(path, None)
                    continue
                if path is not None:
                    out.append((path, mask, name))

    def close(self) -> None:
        os.close(self.fd)


# -- the daemon -------------------------------------------------------------------

RETRY_FIRST, RETRY_MAX = 1.0, 60.0  # backoff of a failed walk or attach, seconds
HEAL_EVERY = 5.0  # seconds between checks that our pins and links are all there
HEAL_SETTLE = 0.5  # seconds after the last change under the pin directory


@dataclasses.dataclass(slots=True)
class Known:
    cgroup: cgroups.Cgroup
    policy: Policy | None
    existing: bool = True  # its rule sweeps the sockets that already exist


def _policy_of(raw: bytes | None) -> Policy | None:
    return bpfmaps.decode_policy(raw)[2] if raw is not None else None


class Daemon:
    def __init__(self, config_path: str, pin_dir: str | None = None, detach_on_exit: bool = False):
        self.config_path = config_path
        self.enforcer = Enforcer(pin_dir)
        self.detach_on_exit_flag = detach_on_exit
        self.cfg: config.Config | None = None
        self.mount = ""
        self.inotify: Inotify | None = None
        self.notifier = Notifier()
        self.metrics: MetricsServer | None = None
        self.known: dict[int, Known] = {}  # cgroup id -> attached and owned by us
        # Cgroups the config matches that carry an attachment made by hand
        # (bpfkeep attach, no "managed" flag): never modified or detached.
        self.foreign: dict[int, Known] = {}
        self.rel_to_id: dict[str, int] = {}
        self.expected: dict[int, str] = {}  # cgroup id -> label, per the config
        # What failed and is tried again: path to walk again (None: the
        # whole tree) -> (when, current backoff).
        self.retry: dict[str | None, tuple[float, float]] = {}
        self.reconcile_errors = 0
        self.reconciles = 0
        self.audit_errors = 0
        self.coverage: dict[str, tuple[int, int]] | None = None
        self.audit_cost: float | None = None  # CPU seconds of the last pass (None: none yet)
        self.heal_cost = 0.0  # seconds of the last check of pins and links
        self._heal_at: float | None = None  # a check after pin events settled
        self._objects_broken = False  # logged once until they are back
        self._walk_failures = 0
        self._rel_cache: dict[int, str] = {}  # socket cgroup id -> path (ids are not reused)
        self._lock = threading.Lock()  # guards what the scrape thread reads
        self._stop = False
        self._reload = False
        self._sweep_unavailable = False
        self._resweep: list[tuple[float, list[cgroups.Cgroup]]] = []  # (due, cgroups)
        self._ready = False  # the first reconcile is done (READY=1)
        # Containers (workload rules): the runtimes' answers by cgroup id,
        # asked off the loop (bpfkeep.containers.Lookups).
        self.lookups: containers.Lookups | None = None
        self.workloads: dict[int, tuple[str, containers.Workload]] = {}  # id -> (rel, workload)
        self._unresolved: dict[int, str] = {}  # id -> rel no runtime knew: asked again on reload
        # What a full reconcile attached and updated: (what, cgroup, mode),
        # logged at its end (see _log_changes); None outside one.
        self._changes: list[tuple[str, str, str]] | None = None

    # -- lifecycle ---------------------------------------------------------

    def run(self) -> int:
        setup_logging()
        t0 = time.monotonic()
        self.cfg = config.load(self.config_path)  # a bad config at start: exit 2
        self.mount = cgroups.cgroup2_mount()
        self.enforcer.prepare()
        self._start_metrics(self.cfg.listen)
        self.inotify = Inotify()
        self.lookups = containers.Lookups(self.cfg.runtimes)
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd)
        signal.signal(signal.SIGHUP, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self._guard("reconcile", lambda: self.full_reconcile(prune=True, sweep_all=True))
        self._watch_pins()
        self._ready = True
        self.notifier.send(f"READY=1\nSTATUS={self._status()}")
        log.info(
            "enforcing %d cgroup(s) after %.2f s; metrics on http://%s:%d/metrics",
            len(self.known),
            time.monotonic() - t0,
            *self.cfg.listen,
        )
        wd_every = watchdog_interval()
        next_wd = time.monotonic()
        next_audit = time.monotonic() + 1.0
        next_heal = time.monotonic() + HEAL_EVERY
        try:
            while not self._stop:
                now = time.monotonic()
                if wd_every and now >= next_wd:
                    self.notifier.send("WATCHDOG=1")
                    next_wd = now + wd_every
                if self.cfg.audit_interval and now >= next_audit:
                    self._audit()
                    next_audit = time.monotonic() + self._audit_every()
                if now >= next_heal or (self._heal_at is not None and now >= self._heal_at):
                    self._heal_at = None
                    self._guard("check of pins and links", self._heal)
                    # Cheap, and kept so: at most ~0.2 % of a CPU.
                    next_heal = time.monotonic() + max(HEAL_EVERY, 500 * self.heal_cost)
                self._run_retries()
                if self._resweep and self._resweep[0][0] <= now:
                    # (Not kept in a local: 10,000 cgroups held until the next sweep.)
                    self._sweep([cg for cg in self._resweep.pop(0)[1] if cg.id in self.known])
                deadlines = [next_audit if self.cfg.audit_interval else now + 3600, next_heal]
                if self._resweep:
                    deadlines.append(self._resweep[0][0])
                if self._heal_at is not None:
                    deadlines.append(self._heal_at)
                deadlines += [due for due, _ in self.retry.values()]
                if wd_every:
                    deadlines.append(next_wd)
                timeout = max(0.0, min(deadlines) - time.monotonic())
                r, _, _ = select.select([self.inotify.fd, rfd, self.lookups.fd], [], [], timeout)
                if rfd in r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(rfd, 4096)
                if self._reload:
                    self._reload = False
                    self._guard("reload", self.reload)
                if self.inotify.fd in r:
                    self._guard("cgroup event", self._handle_events)
                if self.lookups.fd in r:
                    self._guard("container lookup", self._lookup_results)
        finally:
            signal.set_wakeup_fd(-1)
            self.lookups.close()
        if self.cfg.detach_on_exit or self.detach_on_exit_flag:
            for cg_id, k in list(self.known.items()):
                try:
                    self.enforcer.detach_id(cg_id)
                except (BpfkeepError, OSError) as e:
                    log.error("detaching %s at exit failed: %s", k.cgroup.display, e)
            log.info("stopped; detached %d cgroup(s) as configured", len(self.known))
        else:
            log.info("stopped; %d cgroup(s) stay enforced by the kernel", len(self.known))
        self.notifier.send("STOPPING=1")
        return 0

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
            self.reconcile_errors += 1
            log.error("%s failed: %s", what, e)
            self._retry_later(None)

    def _start_metrics(self, listen: tuple[str, int]) -> None:
        from prometheus_client import CollectorRegistry

        from bpfkeep.metrics import Collector

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
        (an unpinned link is detached: see _heal).  Called from the metrics
        thread: reads the pins, never the daemon's loop state unlocked."""
        if not self._ready:
            return "starting: the first reconcile has not finished"
        missing = self.enforcer.objects_missing()
        if missing:
            return f"pinned objects missing under {self.enforcer.obj_dir}: {', '.join(missing)}"
        with self._lock:
            kept = [(i, k.cgroup) for i, k in self.known.items()]
        pins = self.enforcer.link_pins()
        unpinned = [
            cg.display
            for i, cg in kept
            if len(pins.get(i, ())) < len(HOOKS) and os.path.isdir(cg.path)
        ]
        if unpinned:
            more = f" and {len(unpinned) - 3} more" if len(unpinned) > 3 else ""
            return f"links not pinned for {', '.join(unpinned[:3])}{more}"
        return None

    def _status(self) -> str:
        hand = f", {len(self.foreign)} attached by hand left alone" if self.foreign else ""
        return f"enforcing {len(self.known)} cgroup(s){hand}, {self.reconcile_errors} error(s)"

    # -- config --------------------------------------------------------------

    def reload(self) -> None:
        try:
            new = config.load(self.config_path)
        except config.ConfigError as e:
            log.error("reload rejected, old policies stay in force: %s", e)
            self.notifier.send(f"STATUS=reload rejected: {e}")
            return
        if new.listen != (self.cfg.listen if self.cfg else None):
            log.warning("metrics.listen changed: takes effect at the next restart")
        self.cfg = dataclasses.replace(new, listen=self.cfg.listen if self.cfg else new.listen)
        if self.lookups is not None:
            self.lookups.sources = new.runtimes
        self._unresolved.clear()  # ask the runtimes again
        log.info(
            "reloaded %s: %d policy rule(s)",
            self.config_path,
            len(new.rules) + len(new.workload_rules),
        )
        self.full_reconcile()
        self.notifier.send(f"STATUS={self._status()}")

    # -- errors and retries ----------------------------------------------------

    def _failed(self, path: str | None, what: str, err: object) -> None:
        """Log and count an error, and walk ``path`` again later (backoff)."""
        self.reconcile_errors += 1
        delay = self._retry_later(path)
        log.error("%s: %s (trying again in %.0f s)", what, err, delay)

    def _retry_later(self, path: str | None) -> float:
        _, delay = self.retry.get(path, (0.0, RETRY_FIRST / 2))
        delay = min(delay * 2, RETRY_MAX)
        self.retry[path] = (time.monotonic() + delay, delay)
        return delay

    def _run_retries(self) -> None:
        now = time.monotonic()
        for path in [p for p, (due, _) in self.retry.items() if due <= now]:
            if path not in self.retry:
                continue  # done by a full reconcile just now
            delay = self.retry[path][1]
            self.retry[path] = (math.inf, delay)  # a new failure re-arms it
            if path is None:
                self._guard("reconcile", lambda: self.full_reconcile(prune=True))
            else:
                self._guard("rescan", lambda p=path: self._scan(p))
            left = self.retry.get(path)
            if left is None or left[0] == math.inf:  # nothing failed again
                self.retry.pop(path, None)
                log.info("retry of %s succeeded", printable(path) if path else "the full reconcile")

    # -- reconcile -------------------------------------------------------------

    def full_reconcile(self, prune: bool = False, sweep_all: bool = False) -> None:
        """Walk the directories that can hold matches (watching them), then
        make the kernel match the config.

        The kernel's side is read in bulk -- the policy hash in one batch,
        each cgroup's own storage with one lookup -- and compared as bytes:
        a cgroup whose policy is the config's in both maps costs no write
        (a reload that changes nothing writes nothing), and an entry
        changed by hand (bpftool) is written again.  A changed policy is
        written in place: each cgroup's storage, then the hash in one batch.

        ``prune``: also forget the pins of cgroups removed while no daemon
        watched (at start, and after inotify lost events); at run time their
        removal is seen.  ``sweep_all``: sweep every matching cgroup's
        existing sockets afterwards (at start); otherwise only those
        attached or changed now, or whose rule now asks for it."""
        assert self.cfg and self.inotify
        failures = self._walk_failures
        desired: dict[int, tuple[cgroups.Cgroup, config.Rule]] = {}
        seen: set[int] = set()
        asking: set[int] = set()  # containers whose runtime has not answered yet
        for cg in self._walk(self.mount):
            seen.add(cg.id)
            rule = self._rule_for(cg)
            if rule is None and self._asking(cg.id):
                asking.add(cg.id)
            if rule:
                desired[cg.id] = (cg, rule)
        # Adopt what a previous daemon left (it kept working all along);
        # leave alone what was attached by hand.
        entries = self.enforcer.policy_values()
        pins = self.enforcer.link_pins()
        ours = [i for i in desired if i in entries and managed_of(entries[i]) and i in pins]
        stored = self.enforcer.storage_values(ours)
        with self._lock:
            self.expected = {i: c.display for i, (c, _) in desired.items()}
        sweep: list[cgroups.Cgroup] = []
        self._changes = []
        try:
            # (Nothing to attach: no lock, and no loading of the programs.)
            batching = self.enforcer.batch() if desired else contextlib.nullcontext()
            with batching as batch:
                for cg_id, (cg, rule) in desired.items():
                    before = self.known.get(cg_id)
                    hooks = pins.get(cg_id, set())
                    raw, own = entries.get(cg_id), stored.get(cg_id)
                    wrote = self._ensure(cg, rule, raw, own, hooks, batch)
                    if not rule.existing or cg_id not in self.known:
                        continue
                    if sweep_all or wrote or before is None or not before.existing:
                        sweep.append(cg)
        finally:
            changes, self._changes = self._changes, None
            _log_changes(changes)
        owned = {i for i, raw in entries.items() if managed_of(raw) and i in pins}
        if self._walk_failures == failures:
            # Only a complete walk tells what the config no longer wants.
            # A container's attachment stays while its runtime is asked (at
            # start: what the previous daemon attached keeps working);
            # the answer decides (_lookup_results).
            for cg_id in (owned | set(self.known)) - set(desired) - asking:
                self._forget(cg_id, "unwanted" if cg_id in owned else "released")
            self._forget_workloads(lambda i, _rel: i not in seen)
            self.retry.pop(None, None)
        else:
            self._retry_later(None)
        for cg_id in set(self.foreign) - set(desired):
            with self._lock:
                self.foreign.pop(cg_id, None)
        if prune:
            try:
                self.enforcer.prune(alive=self.known)
            except (OSError, BpfkeepError) as e:
                self.reconcile_errors += 1
                log.warning("pruning removed cgroups' pins failed: %s", e)
        with contextlib.suppress(OSError, BpfkeepError):
            runner.reap_stale_runs()  # what killed `bpfkeep run`s left behind
        # At start, after adoption and after a reload: the sockets that
        # exist carry the policies too (idempotent: sockets already under
        # their policy are left alone).  Right after this pass -- after
        # READY=1 at start: new sockets are covered already, and a large
        # sweep must not hold up the start or a reload.
        if sweep:
            self._resweep.insert(0, (0.0, sweep))
        self.reconciles += 1

    def _sweep(self, cgs: list[cgroups.Cgroup]) -> None:
        """Bring the existing sockets of these attached cgroups to their
        policies (bpfkeep.sweep); never takes enforcement down."""
        if not cgs or self._sweep_unavailable:
            return
        try:
            report = self.enforcer.sweep(cgs)
        except SweepUnavailable as e:
            self._sweep_unavailable = True
            log.warning("%s", e)
            return
        except (BpfkeepError, OSError) as e:
            self.reconcile_errors += 1
            names = ", ".join(cg.display for cg in cgs[:3]) + (" ..." if len(cgs) > 3 else "")
            log.error("sweeping the existing sockets of %s: %s", names, e)
            return
        if report.swept or report.unreachable:
            log.info("%s (%d cgroup(s))", report.summary(), len(cgs))

    def _scan(self, top: str, fresh: list[cgroups.Cgroup] | None = None) -> None:
        """Attach what a rule matches at or below ``top`` (a new directory,
        or one whose walk or attach failed before), then sweep them -- or,
        given ``fresh``, add them there for the caller to sweep at once."""
        assert self.cfg
        mine = fresh is None
        fresh = [] if fresh is None else fresh
        for cg in self._walk(top):
            rule = self._rule_for(cg)
            if not rule:
                continue
            with self._lock:
                self.expected[cg.id] = cg.display
            try:
                raw = self.enforcer.policy_value(cg.id)
                hooks = self.enforcer.pinned_hooks(cg.id)
                stored = self.enforcer.storage_values([cg.id]).get(cg.id) if hooks else None
            except OSError as e:
                self._failed(cg.path, cg.display, e)
                continue
            self._ensure(cg, rule, raw, stored, hooks)
            if rule.existing and cg.id in self.known:
                fresh.append(cg)
        if mine:
            self._sweep_new(fresh)

    def _sweep_new(self, fresh: list[cgroups.Cgroup]) -> None:
        """A process may connect in a new cgroup's first microseconds,
        before the attach: sweep right away.  A service started by systemd
        joins its cgroup just after it is made, with the listeners it was
        handed: sweep once more a moment later."""
        if fresh:
            self._sweep(fresh)
            self._resweep.append((time.monotonic() + RESWEEP_AFTER, fresh))

    def _walk(self, top: str) -> typing.Iterator[cgroups.Cgroup]:
        """Cgroups at or below ``top`` that a rule could match; watches
        every directory that could contain a match.

        Every error is logged, counted and retried: a directory that could
        not be listed (EMFILE, ENOMEM, ...) is walked again later.  A
        directory is watched before it is listed, so that nothing created
        in between is missed; stat and inotify need no file descriptor, so
        even out of descriptors a new cgroup is still seen and attempted."""
        assert self.cfg and self.inotify
        prefix = self.mount.rstrip("/") + "/"
        # (path, cgroup id if known).  On cgroup2 (kernfs) a directory
        # entry's inode number is the cgroup id, as stat's is: the listing
        # gives it, and 10,000 cgroups cost no stat each.
        stack: list[tuple[str, int | None]] = [(os.path.normpath(top), None)]
        while stack:
            path, ino = stack.pop()
            if path != self.mount and not path.startswith(prefix):
                continue
            rel = path[len(prefix) :] if path != self.mount else ""
            if rel:
                if ino is None:
                    try:
                        ino = os.stat(path).st_ino
                    except FileNotFoundError:
                        continue  # removed meanwhile
                    except OSError as e:
                        self._walk_failed(path, e)
                        continue
                yield cgroups.Cgroup(path, rel, ino)
            if not self._watches(rel):
                continue
            try:
                self.inotify.watch(path)
            except OSError as e:
                self._walk_failed(path, e)  # list it anyway
            try:
                with os.scandir(path) as it:
                    subdirs = [(d.path, d.inode()) for d in it if d.is_dir(follow_symlinks=False)]
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:
                self._walk_failed(path, e)
                continue
            stack.extend(sorted(subdirs, reverse=True))

    def _walk_failed(self, path: str, e: OSError) -> None:
        self._walk_failures += 1
        self._failed(path, f"walking the cgroup tree at {printable(path)}", e.strerror or e)

    def _ensure(
        self,
        cg: cgroups.Cgroup,
        rule: config.Rule,
        raw: bytes | None,
        stored: bytes | None,
        hooks: set[str],
        batch: Pass | None = None,
    ) -> bool:
        """Attach or update unless what is in force already matches; True if
        it wrote.

        ``raw`` is the cgroup's entry in the policy hash, ``stored`` its own
        storage's, ``hooks`` those with a link pinned.  Links with no entry,
        or an entry without the daemon's flag, are an attachment made by
        hand: the operator's, left exactly as it is."""
        if hooks and (raw is None or not managed_of(raw)):
            self._leave_alone(cg, _policy_of(raw))
            return False
        if cg.id in self.foreign:
            with self._lock:
                self.foreign.pop(cg.id, None)
            log.info("%s: the hand-made attachment is gone; the daemon manages it", cg.display)
        attached = len(hooks) == len(HOOKS)
        if attached and policy_is(raw, cg, rule.policy) and policy_is(stored, cg, rule.policy):
            self._remember(cg, rule.policy, rule.existing)
            return False
        return self._attach(cg, rule.policy, rule.existing, batch, update=attached)

    def _attach(
        self,
        cg: cgroups.Cgroup,
        policy: Policy,
        existing: bool = True,
        batch: Pass | None = None,
        *,
        update: bool = False,
    ) -> bool:
        """Attach, or with ``update`` (links in place) write the policy in
        place -- in ``batch`` if given; an update that finds no program
        attached attaches."""
        try:
            if batch is None:
                what = self.enforcer.attach(cg, policy, managed=True, prune=False)
            elif update and batch.update(cg, policy):
                what = "updated"
            else:
                what = batch.attach(cg, policy)
        except (BpfkeepError, OSError) as e:
            if not os.path.isdir(cg.path):
                return False  # gone meanwhile
            self._failed(cg.path, cg.display, e)
            return False
        self._remember(cg, policy, existing)
        if self._changes is not None:
            self._changes.append((what, cg.display, policy.mode))
        else:
            log.info("%s %s (%s)", what, cg.display, policy.mode)
        return True

    def _remember(self, cg: cgroups.Cgroup, policy: Policy, existing: bool = True) -> None:
        old = self.known.get(cg.id)
        if old is not None and old.cgroup == cg:
            # Keep the objects made when it was first seen (rel_to_id's key
            # among them): each pass's walk makes new ones, and holding both
            # was ~0.5 kB a cgroup.
            if old.policy == policy and old.existing == existing:
                return
            cg = old.cgroup
        with self._lock:
            self.known[cg.id] = Known(cg, policy, existing)
        self.rel_to_id[cg.rel] = cg.id

    def _leave_alone(self, cg: cgroups.Cgroup, policy: Policy | None) -> None:
        if cg.id not in self.foreign:
            log.warning(
                "%s: has a policy attached by hand (bpfkeep attach); the daemon leaves it "
                "alone (bpfkeep detach --cgroup %s lets the daemon manage it)",
                cg.display,
                cg.display,
            )
        with self._lock:
            self.known.pop(cg.id, None)
            self.foreign[cg.id] = Known(cg, policy)
        self.rel_to_id[cg.rel] = cg.id

    def _forget(self, cg_id: int, why: str) -> None:
        """Stop tracking a cgroup.  ``why``: "unwanted" (ours, and the config
        no longer matches it: detach), "removed" (the cgroup is gone: the
        kernel took its programs, drop our pins), "released" (no longer
        ours: touch nothing)."""
        with self._lock:
            k = self.known.pop(cg_id, None)
            self.expected.pop(cg_id, None)
            hand = self.foreign.pop(cg_id, None)
        if k or hand:
            self.rel_to_id.pop((k or hand).cgroup.rel, None)
        if hand or why == "released":
            return
        try:
            if self.enforcer.detach_id(cg_id) and why == "unwanted":
                log.info("detached %s (no longer in the config)", k.cgroup.display if k else cg_id)
        except (BpfkeepError, OSError) as e:
            self._failed(None, f"detach cgroup id {cg_id}", e)

    # -- containers ----------------------------------------------------------------

    def _watches(self, rel: str) -> bool:
        """Watch ``rel`` for new cgroups: a cgroup rule could match below
        it, or (with workload rules) a runtime could put a container there."""
        assert self.cfg
        if self.cfg.watch(rel):
            return True
        return bool(self.cfg.workload_rules) and containers.may_hold_containers(rel)

    def _rule_for(self, cg: cgroups.Cgroup) -> config.Rule | None:
        """The rule for a cgroup.  For a container's cgroup with workload
        rules in the config: the runtime is asked (off the loop); until it
        answers only the cgroup rules apply, and the answer attaches the
        policy and sweeps the sockets made meanwhile (_lookup_results)."""
        assert self.cfg
        if not self.cfg.workload_rules:
            return self.cfg.policy_for(cg.rel)
        with self._lock:
            known = self.workloads.get(cg.id)
        if known is None and self.lookups is not None and cg.id not in self._unresolved:
            self.lookups.submit(cg.id, cg.rel)
        return self.cfg.workload_rule(cg.rel, known[1] if known else None)

    def _asking(self, cg_id: int) -> bool:
        return self.lookups is not None and self.lookups.is_pending(cg_id)

    def _lookup_results(self) -> None:
        assert self.lookups and self.cfg
        for cg_id, rel, res in self.lookups.results():
            path = os.path.join(self.mount, rel)
            try:
                if os.stat(path).st_ino != cg_id:
                    continue  # removed (and maybe made again) meanwhile
            except OSError:
                continue
            if res.workload is None:
                self._unresolved[cg_id] = rel
                why = "; ".join(res.problems) or "no runtime knows it"
                log.warning(
                    "/%s: container not found by any runtime after %.0f s (%s); its workload "
                    "rules apply after a reload ([containers] in the config says where the "
                    "runtimes are)",
                    printable(rel),
                    containers.GIVE_UP_AFTER,
                    why,
                )
                continue
            w = res.workload
            with self._lock:
                self.workloads[cg_id] = (rel, w)
            rule = self.cfg.workload_rule(rel, w)
            if rule is not None:
                log.info(
                    "container %s (%s, /%s): policy[%d]",
                    printable(w.name or w.id[:12]),
                    w.runtime,
                    printable(rel),
                    rule.index,
                )
                self._scan(path)
                continue
            # No rule: an attachment a previous daemon made for it (kept
            # while the runtime was asked) goes.
            try:
                entry = self.enforcer.policy_entry(cg_id)
                managed = entry is not None and entry[1] and self.enforcer.pinned_hooks(cg_id)
            except OSError as e:
                self._failed(path, f"/{printable(rel)}", e)
                continue
            if managed or cg_id in self.known:
                self._forget(cg_id, "unwanted")

    def _forget_workloads(self, gone: typing.Callable[[int, str], bool]) -> None:
        with self._lock:
            drop = [i for i, (rel, _) in self.workloads.items() if gone(i, rel)]
            for i in drop:
                del self.workloads[i]
        for i in [i for i, rel in self._unresolved.items() if gone(i, rel)]:
            del self._unresolved[i]
        if self.lookups is not None:
            self.lookups.cancel(gone)

    def _handle_events(self) -> None:
        assert self.cfg and self.inotify
        rescan = False
        fresh: list[cgroups.Cgroup] = []  # one sweep for a burst of new cgroups
        for path, mask, name in self.inotify.events():
            if path is None:
                rescan = True  # overflow: start over
                continue
            if path in self._pin_dirs():
                # Something under the pin directory went: check once it
                # settles (rm -rf takes a moment; halfway is no state to act on).
                self._heal_at = time.monotonic() + HEAL_SETTLE
                continue
            if mask & (IN_MOVED_FROM | IN_MOVED_TO):
                rescan = True  # rename: start over
                continue
            if not mask & IN_ISDIR:
                continue
            child = os.path.join(path, name)
            if mask & IN_CREATE:
                self._scan(child, fresh)
            elif mask & IN_DELETE:
                rel = os.path.relpath(child, self.mount)
                gone = [i for r, i in self.rel_to_id.items() if r == rel or r.startswith(rel + "/")]
                for cg_id in gone:
                    log.info("cgroup /%s removed; forgetting it", printable(rel))
                    self._forget(cg_id, "removed")
                self._forget_workloads(lambda _i, r, rel=rel: r == rel or r.startswith(rel + "/"))
        self._sweep_new([cg for cg in fresh if cg.id in self.known])
        if rescan:
            self.full_reconcile(prune=True)

    # -- healing ---------------------------------------------------------------

    def _pin_dirs(self) -> tuple[str, str, str]:
        e = self.enforcer
        return (e.pin_dir, e.link_dir, e.obj_dir)

    def _watch_pins(self) -> None:
        """inotify on the pin directory: an unpinned link or object is
        noticed at once (the periodic check is the backstop)."""
        assert self.inotify
        for d in self._pin_dirs():
            with contextlib.suppress(OSError):
                self.inotify.watch(d, PIN_MASK)

    def _heal(self) -> None:
        """Restore what was unpinned under us.  Unpinning a link (rm, or
        rm -rf of the whole pin directory) detaches it: the kernel frees a
        bpf_link with its last reference.  Nothing else would tell."""
        t0 = time.monotonic()
        missing = self.enforcer.objects_missing()
        if missing and len(missing) < len(loader.OBJECTS):
            # Attaching needs the whole set; the links keep what they hold.
            if not self._objects_broken:
                self.reconcile_errors += 1
                log.error(
                    "pinned objects %s are missing under %s while others remain; the "
                    "attachments keep working, new ones fail until bpfkeep detach --all "
                    "and a restart",
                    ", ".join(missing),
                    self.enforcer.obj_dir,
                )
            self._objects_broken = True
            self.heal_cost = time.monotonic() - t0
            return
        self._objects_broken = False
        if missing and self.known:
            self.reconcile_errors += 1
            log.error(
                "the pinned programs under %s are gone; loading them again", self.enforcer.obj_dir
            )
            try:
                self.enforcer.prepare()
            except (BpfkeepError, OSError) as e:
                self._failed(None, "restoring the pinned programs", e)
                return
        pins = self.enforcer.link_pins()
        if self.known and not os.path.isdir(self.enforcer.link_dir):
            try:  # rm -rf of the links directory alone
                os.makedirs(self.enforcer.link_dir, exist_ok=True)
            except OSError as e:
                self._failed(None, f"recreating {self.enforcer.link_dir}", e)
                return
        for cg_id, k in list(self.known.items()):
            have = pins.get(cg_id, set())
            if len(have) == len(HOOKS) or not os.path.isdir(k.cgroup.path):
                continue
            gone = sorted({h for h, _, _ in HOOKS} - have)
            self.reconcile_errors += 1
            log.error(
                "%s: link pin(s) %s removed under the daemon (its enforcement went with "
                "them); restoring",
                k.cgroup.display,
                ", ".join(gone),
            )
            if k.policy is not None and self._attach(k.cgroup, k.policy, k.existing):
                log.info("%s: restored", k.cgroup.display)
        for cg_id, k in list(self.foreign.items()):
            if cg_id not in pins:  # the hand-made attachment was detached
                with self._lock:
                    self.foreign.pop(cg_id, None)
                self._scan(k.cgroup.path)
        self._watch_pins()
        self.heal_cost = time.monotonic() - t0

    # -- metrics & audit -----------------------------------------------------

    def snapshot(self):
        from bpfkeep.metrics import Row, Snapshot

        with self._lock:
            known = {**self.foreign, **self.known}
            workloads = {
                known[i].cgroup.display: w.metric_labels()
                for i, (_, w) in self.workloads.items()
                if i in known
            }
            unmanaged = sorted(k.cgroup.display for k in self.foreign.values())
            expected = sorted(self.expected.values())
            coverage = dict(self.coverage) if self.coverage is not None else None
        rows = []
        # The counters live in cgroup storage, which the kernel frees when
        # the last bpfkeep program leaves the cgroup: reading them is also
        # the check that the policy is still attached.  Hand-made
        # attachments the config matches are shown too: they do enforce.
        counters = self.enforcer.read_counters(list(known))
        for cg_id, k in sorted(known.items(), key=lambda kv: kv[1].cgroup.display):
            if cg_id in counters:
                rows.append(Row(k.cgroup.display, k.policy, counters[cg_id]))
        return Snapshot(
            rows,
            expected,
            self.reconcile_errors,
            self.reconciles,
            coverage,
            self.audit_errors,
            unmanaged,
            audit_cpu_seconds=self.audit_cost,
            # Audits turned off on reload: no next pass to announce.
            audit_every_seconds=(
                self._audit_every()
                if self.audit_cost is not None and self.cfg and self.cfg.audit_interval
                else None
            ),
            workloads=workloads,
            workload_labels=self.cfg.workload_labels if self.cfg else "container",
        )

    def _audit_every(self) -> float:
        """The wait after a pass: the configured interval, stretched to 1000
        times the pass's CPU time (a host with many sockets)."""
        assert self.cfg
        return max(self.cfg.audit_interval, 1000 * (self.audit_cost or 0.0))

    def _audit(self) -> None:
        """Sweep, then coverage per attached cgroup, counting the sockets of
        descendant cgroups that its policy covers (no more specific one of
        ours).  The periodic sweep reaches sockets that no callback and no
        earlier sweep saw: listeners handed over to a service later on."""
        assert self.cfg
        # CPU time of the whole process: the sweep runs its iterator and
        # its namespace visits in threads of their own, which the calling
        # thread's clock would not count.
        t0 = time.process_time()
        with self._lock:
            known = [k.cgroup for k in self.known.values()]
        self._sweep([cg for cg in known if _sweeps_existing(self._rule_for(cg))])
        try:
            from bpfkeep import audit

            cov = audit.established_coverage()
            missing = [i for i in cov if i not in self._rel_cache]
            if missing:
                for cg_id, cg in cgroups.by_ids(missing, self.mount).items():
                    self._rel_cache[cg_id] = cg.rel
        except Exception as e:  # the audit must never take enforcement down
            self.audit_errors += 1
            log.warning("socket audit failed: %s", e)
            return
        # Keep the sweep and audit below ~0.1 % of a CPU however many sockets
        # the host has: the next pass waits at least 1000 times this one's
        # CPU time.
        self.audit_cost = time.process_time() - t0
        with self._lock:
            known = dict(self.known)
        by_rel = {k.cgroup.rel: cg_id for cg_id, k in known.items()}
        totals = {cg_id: [0, 0] for cg_id in known}
        for cg_id, (armed, total) in cov.items():
            owner = cg_id if cg_id in known else None
            rel = self._rel_cache.get(cg_id)
            while owner is None and rel:
                rel = rel.rpartition("/")[0]
                owner = by_rel.get(rel)
            if owner is not None:
                totals[owner][0] += armed
                totals[owner][1] += total
        with self._lock:
            self.coverage = {known[i].cgroup.display: (a, t) for i, (a, t) in totals.items()}


LOG_EACH = 20  # changes of one kind in one reconcile logged a line each; beyond, one line


def _log_changes(changes: list[tuple[str, str, str]]) -> None:
    """One line per attached or updated cgroup -- or, for more than
    LOG_EACH of a kind (a reload changing 10,000 policies), one line with
    their number and the first few: 10,000 lines cost the reload ~0.2 s
    and bury the journal."""
    by_what: dict[str, list[str]] = {}
    for what, name, mode in changes:
        by_what.setdefault(what, []).append(f"{name} ({mode})")
    for what, names in by_what.items():
        if len(names) <= LOG_EACH:
            for n in names:
                log.info("%s %s", what, n)
        else:
            shown = LOG_EACH // 2
            log.info(
                "%s %d cgroups: %s, ... and %d more",
                what,
                len(names),
                ", ".join(names[:shown]),
                len(names) - shown,
            )


def _sweeps_existing(rule: config.Rule | None) -> bool:
    return rule is not None and rule.existing


def main(config_path: str, pin_dir: str | None, detach_on_exit: bool) -> int:
    return Daemon(config_path, pin_dir, detach_on_exit).run()
