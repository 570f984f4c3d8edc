"""The daemon's footprint and scale.

The daemon runs as it would under systemd -- ``python -m bpfkeep daemon``
from this checkout, Type=notify through a private NOTIFY_SOCKET -- on the
benchmark's own pin directory, with a config shaped like the shipped one
(enforce, 60/10/6, audit every 15 s) whose rule matches only the
benchmark's scratch cgroups.

- start to enforcing: process start until READY=1 arrives, with the
  programs already pinned ("warm") and with a fresh pin directory, so that
  the programs are compiled first ("cold");
- RSS and CPU at idle, and while a workload opens ~5,000 connections a
  second in an enforced cgroup (CPU time read from every thread's
  schedstat, exact to the nanosecond);
- scrape time of /metrics at 10, 100 and 1,000 attached cgroups; the time
  to attach 1,000 cgroups from nothing and to adopt them on restart;
- 10,000 idle keepalive connections held open in an enforced cgroup: the
  daemon's RSS, CPU and scrape time before and with them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from bench.common import (
    REPO,
    BenchError,
    Lines,
    Session,
    log,
    median,
    parse_kv,
    quantile,
    spawn,
    stop,
)

TARGETS = {
    "rss_mb": 60.0,
    "start_to_enforcing_s": 3.0,
    "scrape_100_ms": 50.0,
}
POLICY = 'mode = "enforce"\nkeepidle = 60\nkeepintvl = 10\nkeepcnt = 6\n'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """One ``bpfkeep daemon`` process with a notify socket and metrics port."""

    def __init__(self, session: Session, pattern: str, *, pin_dir: str | None = None):
        self.session = session
        self.pin_dir = pin_dir or session.pin_dir
        self.port = free_port()
        self.tmp = tempfile.mkdtemp(prefix="bpfkeep-bench-")
        session.defer(lambda: _rmtree(self.tmp))
        self.config = os.path.join(self.tmp, "bpfkeep.toml")
        with open(self.config, "w") as f:
            f.write(
                f'[metrics]\nlisten = "127.0.0.1:{self.port}"\n\n'
                "[daemon]\naudit_interval = 15\n\n"
                f'[[policy]]\ncgroup = "{pattern}"\n{POLICY}'
            )
        self.notify_path = os.path.join(self.tmp, "notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.repo = REPO  # whose bpfkeep runs (bench.loadtest: another checkout's)
        # What runs it: python -m bpfkeep, or a wrapper taking bpfkeep's
        # arguments after it (bench.reload --profile: bench/profiled.py).
        self.launcher = ["-m", "bpfkeep"]

    def start(self, *extra: str, timeout: float = 120) -> float:
        """Start; returns seconds from process start to READY=1."""
        env = {**os.environ, "NOTIFY_SOCKET": self.notify_path, "PYTHONPATH": str(self.repo)}
        env.pop("LD_PRELOAD", None)
        argv = [sys.executable, *self.launcher, "--pin-dir", self.pin_dir, "daemon"]
        argv += ["--config", self.config, *extra]
        self.started = time.monotonic()
        self.proc = self.session.track(
            subprocess.Popen(
                argv,
                cwd=str(self.repo),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=open(os.path.join(self.tmp, "daemon.log"), "ab"),  # noqa: SIM115
            )
        )
        self.wait_message("READY=1", timeout)
        return time.monotonic() - self.started

    def wait_message(self, needle: str, timeout: float) -> str:
        self.notify.settimeout(0.2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.notify.recv(4096).decode(errors="replace")
            except TimeoutError:
                if self.proc and self.proc.poll() is not None:
                    break
                continue
            if needle in msg:
                return msg
        raise BenchError(f"daemon: no {needle} within {timeout} s; log: {self.log_tail()}")

    def log_tail(self) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self.tmp, "daemon.log")) as f:
            return f.read()[-600:]
        return ""

    def reload(self, policy: str, timeout: float = 600) -> float:
        """Rewrite the rule's policy, SIGHUP, and time until the daemon
        reports its new STATUS (the reconcile is done by then)."""
        with open(self.config) as f:
            text = f.read()
        with open(self.config, "w") as f:
            f.write(text[: text.index("mode =")] + policy)
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGHUP)
        self.wait_message("STATUS=enforcing", timeout)
        return time.monotonic() - t0

    def stop(self) -> None:
        if self.proc:
            stop(self.proc, signal.SIGTERM, timeout=30)
        self.notify.close()

    # -- readings ---------------------------------------------------------------

    def rss_mb(self) -> float:
        return _status_kb(self.proc.pid, "VmRSS") / 1024

    def hwm_mb(self) -> float:
        return _status_kb(self.proc.pid, "VmHWM") / 1024

    def cpu_ns(self) -> int:
        """CPU time of every thread (schedstat: exact, not tick-sampled)."""
        total = 0
        task = f"/proc/{self.proc.pid}/task"
        for tid in os.listdir(task):
            with contextlib.suppress(OSError), open(f"{task}/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        return total

    def scrape(self) -> tuple[float, bytes]:
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30) as r:
            body = r.read()
        return (time.perf_counter() - t0) * 1000, body

    def pass_gauges(self) -> dict[str, float]:
        """The daemon's own account of its last periodic sweep and audit
        pass (CPU seconds) and of the wait before the next one."""
        _ms, body = self.scrape()
        out = {}
        for ln in body.decode().splitlines():
            name, _, value = ln.partition(" ")
            if name == "bpfkeep_audit_pass_cpu_seconds":
                out["cpu_s"] = float(value)
            elif name == "bpfkeep_audit_interval_seconds":
                out["every_s"] = float(value)
        return out

    def scrapes(self, n: int) -> dict:
        times, size = [], 0
        for _ in range(n):
            ms, body = self.scrape()
            times.append(ms)
            size = len(body)
        return {
            "median_ms": median(times),
            "p90_ms": quantile(times, 0.9),
            "n": n,
            "bytes": size,
        }

    def cpu_over(self, seconds: float) -> dict:
        c0, t0 = self.cpu_ns(), time.monotonic()
        time.sleep(seconds)
        c1, t1 = self.cpu_ns(), time.monotonic()
        return {
            "window_s": round(t1 - t0, 2),
            "cpu_ms": (c1 - c0) / 1e6,
            "cpu_percent": 100 * (c1 - c0) / 1e9 / (t1 - t0),
        }


def _status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            if ln.startswith(key + ":"):
                return int(ln.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _cgroups(session: Session, group: str, n: int) -> list[str]:
    return [session.cgroup(f"{group}/svc{i:04d}") for i in range(n)]


def _pattern(session: Session, group: str) -> str:
    return f"{session.rel(session.cg_base)}/{group}/*"


def _attached(session: Session, paths: list[str]) -> int:
    from bpfkeep.enforcer import Enforcer

    ids = {os.stat(p).st_ino for p in paths}
    return len(ids & Enforcer(session.pin_dir).pinned_ids())


def audit_pass() -> dict:
    """One pass of the daemon's audit code (bpfkeep.audit.sockets, as the daemon
    calls it), timed in this process."""
    from bpfkeep.audit import sockets as audit

    t0 = time.process_time()
    cov = audit.established_coverage()
    established = sum(total for _, total in cov.values())
    return {"sockets": established, "cpu_ms": (time.process_time() - t0) * 1000}


def run(session: Session, connloop: str, *, quick: bool) -> dict:
    k = {
        "idle_window": 5.0 if quick else 31.0,  # covers two audits (every 15 s)
        "load_seconds": 5 if quick else 20,
        "n_scrapes": 5 if quick else 30,
        "held": 2000 if quick else 10000,
        "scale": (10, 100, 200) if quick else (10, 100, 1000),
        "cold_runs": 1 if quick else 3,
        "warm_runs": 2 if quick else 5,
    }
    out: dict = {"params": {"quick": quick, "idle_window_s": k["idle_window"]}, "errors": {}}
    session.enforcer()  # programs compiled once for the session: "warm" is warm
    for name, step in (
        ("start", _starts),
        ("steady", _steady),
        ("scale", _scale),
    ):
        try:
            step(session, connloop, k, out)
        except BenchError as e:  # record it, measure the rest
            out["errors"][name] = str(e)
            log(f"daemon {name}: {e}")
    out["targets"] = TARGETS
    out["checks"] = _checks(out)
    return out


def _starts(session: Session, connloop: str, k: dict, out: dict) -> None:
    """Process start to READY=1: cold (fresh pin dir: compiles) and warm."""
    from bpfkeep.enforcer import Enforcer

    cold = []
    for i in range(k["cold_runs"]):
        pin = f"{session.pin_dir}-cold{i}"
        group = f"cold{i}"
        _cgroups(session, group, 10)
        session.defer(Enforcer(pin).destroy)
        d = Daemon(session, _pattern(session, group), pin_dir=pin)
        try:
            cold.append(d.start())
        finally:
            d.stop()
    out["start_cold_s"] = {"samples": cold, "median": median(cold)}
    log(f"daemon: cold start to READY {median(cold):.2f} s")
    group = "warm"
    _cgroups(session, group, 10)
    warm = []
    for _ in range(k["warm_runs"]):
        d = Daemon(session, _pattern(session, group))
        try:
            warm.append(d.start("--detach-on-exit"))
        finally:
            d.stop()
    out["start_warm_s"] = {"samples": warm, "median": median(warm)}
    log(f"daemon: warm start to READY {median(warm):.2f} s")


def _steady(session: Session, connloop: str, k: dict, out: dict) -> None:
    """10 cgroups: idle, under ~5,000 connections/s, with held connections."""
    group = "d10"
    paths = _cgroups(session, group, 10)
    d = Daemon(session, _pattern(session, group))
    try:
        d.start()
        if _attached(session, paths) != len(paths):
            raise BenchError("not every cgroup got attached")
        time.sleep(2)
        idle = d.cpu_over(k["idle_window"])
        idle.update(rss_mb=d.rss_mb(), scrape=d.scrapes(k["n_scrapes"]))
        out["idle"] = idle
        log(f"daemon idle: {idle['rss_mb']:.1f} MB, {idle['cpu_percent']:.3f}% CPU")

        # ~5,000 connections a second in an enforced cgroup.
        secs = k["load_seconds"]
        work = session.track(
            spawn(
                [connloop, "rate", "-r", "5000", "-t", str(secs)],
                cgroup=paths[0],
                stdin=subprocess.DEVNULL,
            )
        )
        time.sleep(0.5)
        load = d.cpu_over(secs - 1.5)
        load["scrape"] = d.scrapes(k["n_scrapes"])
        res = parse_kv(Lines(work).expect("result ", timeout=secs + 30))
        load["workload_per_second"] = float(res["per_second"])
        load.update(rss_mb=d.rss_mb(), hwm_mb=d.hwm_mb())
        out["load"] = load
        log(
            f"daemon under {load['workload_per_second']:.0f} conn/s: "
            f"{load['cpu_percent']:.3f}% CPU, {load['rss_mb']:.1f} MB"
        )

        # Idle keepalive connections held open in an enforced cgroup.
        held = k["held"]
        before = audit_pass()
        hold = session.track(spawn([connloop, "hold", "-n", str(held)], cgroup=paths[1]))
        hl = Lines(hold)
        client = parse_kv(hl.expect("client ", 30))
        hl.expect("held ", timeout=180)
        if client.get("keepalive") != "1" or client.get("keepidle") != "60":
            raise BenchError(f"held connections lack the policy: {client}")
        time.sleep(1)
        with_conns = d.cpu_over(k["idle_window"])
        with_conns.update(rss_mb=d.rss_mb(), hwm_mb=d.hwm_mb())
        with_conns["scrape"] = d.scrapes(k["n_scrapes"])
        with_conns["connections"] = held
        with_conns["audit_pass_before"] = before
        with_conns["audit_pass_with"] = audit_pass()
        with_conns["daemon_pass"] = d.pass_gauges()
        out["held"] = with_conns
        log(
            f"daemon with {held} idle connections: {with_conns['rss_mb']:.1f} MB, "
            f"{with_conns['cpu_percent']:.3f}% CPU, "
            f"scrape {with_conns['scrape']['median_ms']:.1f} ms"
        )
        stop(hold)
    finally:
        d.stop()


def _scale(session: Session, connloop: str, k: dict, out: dict) -> None:
    """Scrape time by number of cgroups; attach, adopt and reload times."""
    rows = out.setdefault("scale", [])
    n_scrapes = k["n_scrapes"]
    for n in k["scale"]:
        group = f"s{n}"
        paths = _cgroups(session, group, n)
        d = Daemon(session, _pattern(session, group))
        try:
            t_attach = d.start(timeout=600)
            attached = _attached(session, paths)
            time.sleep(1)
            sc = d.scrapes(n_scrapes)
            rss = d.rss_mb()
        finally:
            d.stop()
        d = Daemon(session, _pattern(session, group))
        try:
            t_adopt = d.start(timeout=600)
            sc_adopted = d.scrapes(max(3, n_scrapes // 3))
            t_reload = d.reload(POLICY.replace("keepidle = 60", "keepidle = 61"))
            updated = _with_keepidle(session, paths, 61)
        finally:
            d.stop()
        rows.append(
            {
                "cgroups": n,
                "attached": attached,
                "start_attach_s": t_attach,
                "start_adopt_s": t_adopt,
                "reload_update_s": t_reload,
                "updated_by_reload": updated,
                "scrape": sc,
                "scrape_after_restart": sc_adopted,
                "rss_mb": rss,
            }
        )
        log(
            f"daemon at {n} cgroups: attach {t_attach:.2f} s, adopt {t_adopt:.2f} s, "
            f"reload {t_reload:.2f} s, scrape {sc['median_ms']:.1f} ms, {rss:.1f} MB"
        )
        _detach_all(session, paths)


def _with_keepidle(session: Session, paths: list[str], keepidle: int) -> int:
    from bpfkeep.enforcer import Enforcer
    from bpfkeep.kernel.cgroups import Cgroup

    cgs = {os.stat(p).st_ino: Cgroup(p, session.rel(p), os.stat(p).st_ino) for p in paths}
    atts = Enforcer(session.pin_dir).attachments(paths=cgs)
    return sum(1 for a in atts if a.cgroup_id in cgs and a.policy and a.policy.keepidle == keepidle)


def _detach_all(session: Session, paths: list[str]) -> None:
    enf = session.enforcer()
    for p in paths:
        enf.detach_id(os.stat(p).st_ino)


def _checks(out: dict) -> dict:
    """Targets met or not, from whatever parts of the run succeeded."""
    checks: dict = {}
    rss = [out[k]["rss_mb"] for k in ("idle", "load", "held") if k in out]
    rss += [r["rss_mb"] for r in out.get("scale", [])]
    if rss:
        checks["steady_rss_mb"] = max(rss)
        checks["rss_ok"] = max(rss) <= TARGETS["rss_mb"]
    for kind in ("warm", "cold"):
        if f"start_{kind}_s" in out:
            t = out[f"start_{kind}_s"]["median"]
            checks[f"start_{kind}_ok"] = t <= TARGETS["start_to_enforcing_s"]
    if "idle" in out:
        checks["idle_cpu_percent"] = out["idle"]["cpu_percent"]
    scale = {r["cgroups"]: r for r in out.get("scale", [])}
    if 100 in scale:
        ms = scale[100]["scrape"]["median_ms"]
        checks["scrape_100_ms"] = ms
        checks["scrape_100_ok"] = ms <= TARGETS["scrape_100_ms"]
    if "held" in out and "idle" in out:
        held, idle = out["held"], out["idle"]
        checks["held_rss_delta_mb"] = held["rss_mb"] - idle["rss_mb"]
        checks["held_cpu_delta_percent"] = held["cpu_percent"] - idle["cpu_percent"]
        checks["held_scrape_delta_ms"] = held["scrape"]["median_ms"] - idle["scrape"]["median_ms"]
    return checks
