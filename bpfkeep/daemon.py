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
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import typing

from bpfkeep import cgroups, config, runner
from bpfkeep.enforcer import Enforcer
from bpfkeep.errors import BpfkeepError
from bpfkeep.options import Policy
from bpfkeep.sweep import SweepUnavailable

log = logging.getLogger("bpfkeep")

# inotify (include/uapi/linux/inotify.h)
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_IGNORED, IN_ISDIR, IN_Q_OVERFLOW = 0x400, 0x8000, 0x40000000, 0x4000
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
WATCH_MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF
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

    def watch(self, path: str) -> bool:
        if path in self.wds:
            return True
        wd = self._add(self.fd, os.fsencode(path), WATCH_MASK)
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
                name = buf[off + 16 : off + 16 + length].split(b"\0", 1)[0].decode(errors="replace")
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


@dataclasses.dataclass
class Known:
    cgroup: cgroups.Cgroup
    policy: Policy


class Daemon:
    def __init__(self, config_path: str, pin_dir: str | None = None, detach_on_exit: bool = False):
        self.config_path = config_path
        self.enforcer = Enforcer(pin_dir)
        self.detach_on_exit_flag = detach_on_exit
        self.cfg: config.Config | None = None
        self.mount = ""
        self.inotify: Inotify | None = None
        self.known: dict[int, Known] = {}  # cgroup id -> attached by us
        self.rel_to_id: dict[str, int] = {}
        self.expected: dict[int, str] = {}  # cgroup id -> label, per the config
        self.reconcile_errors = 0
        self.reconciles = 0
        self.audit_errors = 0
        self.coverage: dict[str, tuple[int, int]] | None = None
        self.audit_cost = 0.0  # CPU seconds of the last socket audit
        self._rel_cache: dict[int, str] = {}  # socket cgroup id -> path (ids are not reused)
        self._lock = threading.Lock()  # guards what the scrape thread reads
        self._stop = False
        self._reload = False
        self._sweep_unavailable = False
        self._resweep: list[tuple[float, list[cgroups.Cgroup]]] = []  # (due, cgroups)

    # -- lifecycle ---------------------------------------------------------

    def run(self) -> int:
        setup_logging()
        t0 = time.monotonic()
        self.cfg = config.load(self.config_path)  # a bad config at start: exit 2
        self.mount = cgroups.cgroup2_mount()
        self.enforcer.prepare()
        self._start_metrics(self.cfg.listen)
        self.inotify = Inotify()
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd)
        signal.signal(signal.SIGHUP, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.full_reconcile()
        sd_notify(f"READY=1\nSTATUS={self._status()}")
        log.info(
            "enforcing %d cgroup(s) after %.2f s; metrics on http://%s:%d/metrics",
            len(self.known),
            time.monotonic() - t0,
            *self.cfg.listen,
        )
        wd_every = watchdog_interval()
        next_wd = time.monotonic()
        next_audit = time.monotonic() + 1.0
        try:
            while not self._stop:
                now = time.monotonic()
                if wd_every and now >= next_wd:
                    sd_notify("WATCHDOG=1")
                    next_wd = now + wd_every
                if self.cfg.audit_interval and now >= next_audit:
                    self._audit()
                    wait = max(self.cfg.audit_interval, 1000 * self.audit_cost)
                    next_audit = time.monotonic() + wait
                if self._resweep and self._resweep[0][0] <= now:
                    _, due = self._resweep.pop(0)
                    self._sweep([cg for cg in due if cg.id in self.known])
                deadlines = [next_audit if self.cfg.audit_interval else now + 3600]
                if wd_every:
                    deadlines.append(next_wd)
                if self._resweep:
                    deadlines.append(self._resweep[0][0])
                timeout = max(0.0, min(deadlines) - time.monotonic())
                r, _, _ = select.select([self.inotify.fd, rfd], [], [], timeout)
                if rfd in r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(rfd, 4096)
                if self._reload:
                    self._reload = False
                    self.reload()
                if self.inotify.fd in r:
                    self._handle_events()
        finally:
            signal.set_wakeup_fd(-1)
        if self.cfg.detach_on_exit or self.detach_on_exit_flag:
            for cg_id in list(self.known):
                self.enforcer.detach_id(cg_id)
            log.info("stopped; detached %d cgroup(s) as configured", len(self.known))
        else:
            log.info("stopped; %d cgroup(s) stay enforced by the kernel", len(self.known))
        sd_notify("STOPPING=1")
        return 0

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._stop = True

    def _start_metrics(self, listen: tuple[str, int]) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        from bpfkeep.metrics import Collector

        registry = CollectorRegistry(auto_describe=True)
        registry.register(Collector(self.snapshot))
        try:
            start_http_server(listen[1], addr=listen[0], registry=registry)
        except OSError as e:
            raise BpfkeepError(
                f"metrics: cannot listen on {listen[0]}:{listen[1]} ({e.strerror}); "
                "change [metrics] listen in the config"
            ) from None

    def _status(self) -> str:
        return f"enforcing {len(self.known)} cgroup(s), {self.reconcile_errors} error(s)"

    # -- config --------------------------------------------------------------

    def reload(self) -> None:
        try:
            new = config.load(self.config_path)
        except config.ConfigError as e:
            log.error("reload rejected, old policies stay in force: %s", e)
            sd_notify(f"STATUS=reload rejected: {e}")
            return
        if new.listen != (self.cfg.listen if self.cfg else None):
            log.warning("metrics.listen changed: takes effect at the next restart")
        self.cfg = dataclasses.replace(new, listen=self.cfg.listen if self.cfg else new.listen)
        log.info("reloaded %s: %d policy rule(s)", self.config_path, len(new.rules))
        self.full_reconcile()
        sd_notify(f"STATUS={self._status()}")

    # -- reconcile -------------------------------------------------------------

    def full_reconcile(self) -> None:
        """Walk the directories that can hold matches (watching them), then
        make the kernel match the config."""
        assert self.cfg and self.inotify
        desired: dict[int, tuple[cgroups.Cgroup, Policy]] = {}
        sweep: list[cgroups.Cgroup] = []
        for cg in self._walk(self.mount):
            rule = self.cfg.policy_for(cg.rel)
            if rule:
                desired[cg.id] = (cg, rule.policy)
                if _sweeps_existing(rule):
                    sweep.append(cg)
        # Adopt what a previous daemon left (it kept working all along).
        owned: dict[int, Policy | None] = {}
        for att in self.enforcer.attachments(paths={i: c for i, (c, _) in desired.items()}):
            if att.managed:
                owned[att.cgroup_id] = att.policy
        with self._lock:
            self.expected = {i: c.display for i, (c, _) in desired.items()}
        pinned = self.enforcer.pinned_ids()
        for cg_id, (cg, policy) in desired.items():
            current = owned.get(cg_id, self._known_policy(cg_id))
            self._ensure(cg, policy, current=current if cg_id in pinned else None)
        for cg_id in set(owned) | set(self.known):
            if cg_id not in desired:
                self._forget(cg_id, detach=True)
        with contextlib.suppress(OSError, BpfkeepError):
            self.enforcer.prune()
        with contextlib.suppress(OSError, BpfkeepError):
            runner.reap_stale_runs()  # what killed `bpfkeep run`s left behind
        # At start, after adoption and after a reload: the sockets that
        # exist carry the policies too (idempotent: sockets already under
        # their policy are left alone).
        self._sweep([cg for cg in sweep if cg.id in self.known])
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
            log.error("sweeping existing sockets of %d cgroup(s): %s", len(cgs), e)
            return
        if report.swept or report.unreachable:
            log.info("%s (%d cgroup(s))", report.summary(), len(cgs))

    def _known_policy(self, cg_id: int) -> Policy | None:
        k = self.known.get(cg_id)
        return k.policy if k else None

    def _walk(self, top: str):
        """Cgroups at or below ``top`` that a rule could match; watches
        every directory that could contain a match."""
        assert self.cfg and self.inotify
        for dirpath, dirnames, _ in os.walk(top):
            rel = os.path.relpath(dirpath, self.mount)
            rel = "" if rel == "." else rel
            if rel and not rel.startswith(".."):
                try:
                    yield cgroups.Cgroup(dirpath, rel, os.stat(dirpath).st_ino)
                except FileNotFoundError:
                    dirnames[:] = []
                    continue
            if self.cfg.watch(rel):
                self.inotify.watch(dirpath)
            else:
                dirnames[:] = []

    def _ensure(self, cg: cgroups.Cgroup, policy: Policy, current: Policy | None) -> None:
        """Attach or update unless ``current`` (what is in force) already matches."""
        if current == policy:
            with self._lock:
                self.known[cg.id] = Known(cg, policy)
            self.rel_to_id[cg.rel] = cg.id
            return
        try:
            what = self.enforcer.attach(cg, policy, managed=True, prune=False)
        except (BpfkeepError, OSError) as e:
            if not os.path.isdir(cg.path):
                return  # gone meanwhile
            self.reconcile_errors += 1
            log.error("%s: %s", cg.display, e)
            return
        with self._lock:
            self.known[cg.id] = Known(cg, policy)
        self.rel_to_id[cg.rel] = cg.id
        log.info("%s %s (%s)", what, cg.display, policy.mode)

    def _forget(self, cg_id: int, *, detach: bool) -> None:
        with self._lock:
            k = self.known.pop(cg_id, None)
            self.expected.pop(cg_id, None)
        if k:
            self.rel_to_id.pop(k.cgroup.rel, None)
        try:
            if self.enforcer.detach_id(cg_id) and detach:
                log.info("detached %s (no longer in the config)", k.cgroup.display if k else cg_id)
        except (BpfkeepError, OSError) as e:
            self.reconcile_errors += 1
            log.error("detach cgroup id %d: %s", cg_id, e)

    def _handle_events(self) -> None:
        assert self.cfg and self.inotify
        rescan = False
        for path, mask, name in self.inotify.events():
            if path is None or mask & (IN_MOVED_FROM | IN_MOVED_TO):
                rescan = True  # overflow or rename: start over
                continue
            if not mask & IN_ISDIR:
                continue
            child = os.path.join(path, name)
            if mask & IN_CREATE:
                fresh = []
                for cg in self._walk(child):
                    rule = self.cfg.policy_for(cg.rel)
                    if rule:
                        with self._lock:
                            self.expected[cg.id] = cg.display
                        self._ensure(cg, rule.policy, current=None)
                        if _sweeps_existing(rule) and cg.id in self.known:
                            fresh.append(cg)
                # A process may connect in the cgroup's first microseconds,
                # before the attach: sweep right away.  A service started by
                # systemd joins its cgroup just after it is made, with the
                # listeners it was handed: sweep once more a moment later.
                self._sweep(fresh)
                if fresh:
                    self._resweep.append((time.monotonic() + RESWEEP_AFTER, fresh))
            elif mask & IN_DELETE:
                rel = os.path.relpath(child, self.mount)
                gone = [i for r, i in self.rel_to_id.items() if r == rel or r.startswith(rel + "/")]
                for cg_id in gone:
                    log.info("cgroup /%s removed; forgetting it", rel)
                    self._forget(cg_id, detach=False)
        if rescan:
            self.full_reconcile()

    # -- metrics & audit -----------------------------------------------------

    def snapshot(self):
        from bpfkeep.metrics import Row, Snapshot

        with self._lock:
            known = dict(self.known)
            expected = sorted(self.expected.values())
            coverage = dict(self.coverage) if self.coverage is not None else None
        rows = []
        # The counters live in cgroup storage, which the kernel frees when
        # the last bpfkeep program leaves the cgroup: reading them is also
        # the check that the policy is still attached.
        counters = self.enforcer.read_counters(list(known))
        for cg_id, k in sorted(known.items(), key=lambda kv: kv[1].cgroup.display):
            if cg_id in counters:
                rows.append(Row(k.cgroup.display, k.policy, counters[cg_id]))
        return Snapshot(
            rows, expected, self.reconcile_errors, self.reconciles, coverage, self.audit_errors
        )

    def _audit(self) -> None:
        """Sweep, then coverage per attached cgroup, counting the sockets of
        descendant cgroups that its policy covers (no more specific one of
        ours).  The periodic sweep reaches sockets that no callback and no
        earlier sweep saw: listeners handed over to a service later on."""
        assert self.cfg
        with self._lock:
            known = [k.cgroup for k in self.known.values()]
        self._sweep([cg for cg in known if _sweeps_existing(self.cfg.policy_for(cg.rel))])
        try:
            from bpfkeep import audit

            t0 = time.thread_time()
            cov = audit.established_coverage()
            missing = [i for i in cov if i not in self._rel_cache]
            if missing:
                for cg_id, cg in cgroups.by_ids(missing, self.mount).items():
                    self._rel_cache[cg_id] = cg.rel
        except Exception as e:  # the audit must never take enforcement down
            self.audit_errors += 1
            log.warning("socket audit failed: %s", e)
            return
        # Keep the audit below ~0.1 % of a CPU however many sockets the host
        # has: the next pass waits at least 1000 times this one's CPU time.
        self.audit_cost = time.thread_time() - t0
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


def _sweeps_existing(rule: config.Rule | None) -> bool:
    return rule is not None and rule.existing


def main(config_path: str, pin_dir: str | None, detach_on_exit: bool) -> int:
    return Daemon(config_path, pin_dir, detach_on_exit).run()
