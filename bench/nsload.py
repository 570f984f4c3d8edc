"""One user's network namespaces against the daemon (issue 20, item 2).

``sudo .venv/bin/python -m bench.nsload [--namespaces 600] [--against main]``

A subtree ``deleg`` delegated to user nobody (the directory and its
``cgroup.procs``, ``cgroup.subtree_control`` and ``cgroup.threads``
chowned to it, as systemd's ``Delegate=`` does) under a rule
``cgroup = "<base>/deleg/*"`` (enforce, 60/10/6, audit every 15 s).
nobody starts N processes, each in network namespaces of its own
(``unshare -rn``) with CONNS loopback connections, in ``deleg/pool``, then
moves each into a new cgroup of its own ``deleg/uNNN``, EVERY seconds
apart.  Meanwhile, measured:

- **attach**: root makes a new cgroup ``deleg/c...`` every
  ``--probe-every`` s (TRIES of them); from its ``mkdir`` to its links
  being pinned (polled every millisecond);
- **own sockets**: a process joins each such cgroup the moment it is
  made and connects at once (before the attach, mostly): from the
  connect's return until its socket has keepalive on, read inside it;
- **after a SIGHUP** that changes the policy of every cgroup (a sweep of
  every namespace follows), a new cgroup's attach, the same way;
- **the backstop**: a process of an enforced cgroup of root's holds a
  socket made in another cgroup (no hook of ours sees it) and turns its
  keepidle to 9999 behind the policy's back; until the periodic pass has
  brought it back to 60;
- the daemon's CPU over the run, its RSS, and its
  ``bpfkeep_audit_interval_seconds`` at the end.

``--against REF`` runs the same with the daemon of another commit (a
temporary ``git worktree``) first: old and new side by side in one run.
Everything made is removed at the end, also after a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import (
    BUILD,
    REPO,
    BenchError,
    Lines,
    Session,
    build_connloop,
    checkout,
    log,
    preexec,
    quantile,
    spawn,
    stop,
)
from bench.daemonbench import Daemon

NOBODY = 65534
POLICY = 'mode = "enforce"\nkeepidle = 60\nkeepintvl = 10\nkeepcnt = 6\n'
TARGETS = {"attach_p99_ms": 50.0, "own_sockets_p99_s": 1.0, "backstop_s": 60.0}
# The backstop's process: a socket made before joining (elsewhere), then on
# each line its keepidle set to 9999 and polled until it is not.
BACKSTOP = """
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)
for line in sys.stdin:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 9999)
    t0 = time.monotonic()
    while s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 9999:
        if time.monotonic() - t0 > 600:
            print("unfixed", flush=True)
            break
        time.sleep(0.1)
    else:
        print(f"fixed s={time.monotonic() - t0:.2f}", flush=True)
"""


def as_nobody(argv: list[str]) -> list[str]:
    setpriv = shutil.which("setpriv")
    if not setpriv:
        raise BenchError("setpriv (util-linux) is missing")
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


def delegate(path: str) -> None:
    """Hand a cgroup over to nobody, as systemd's Delegate= does."""
    os.chown(path, NOBODY, NOBODY)
    for f in ("cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):
        os.chown(os.path.join(path, f), NOBODY, NOBODY)


class Scenario:
    """The delegated subtree, nobody's processes and the probes of one run."""

    def __init__(self, session: Session, connloop: str, args: argparse.Namespace, tag: str):
        self.session, self.connloop, self.args = session, connloop, args
        self.deleg = session.cgroup(f"deleg-{tag}")
        delegate(self.deleg)
        self.pool = os.path.join(self.deleg, "pool")
        subprocess.run(as_nobody(["mkdir", self.pool]), check=True)
        self.server_cg = session.cgroup(f"server-{tag}")
        self.port = _free_port()
        self.server = session.track(
            spawn([connloop, "serve", "127.0.0.1", str(self.port)], cgroup=self.server_cg)
        )
        Lines(self.server).expect("ready")
        self.users: list[subprocess.Popen] = []

    def rule(self) -> str:
        return f"{self.session.rel(self.deleg)}/*"

    def start_users(self) -> None:
        """nobody's processes, each in namespaces of its own, in pool.  They
        share one pipe for stdin (closed: they end) and one for stdout
        (600 pipes each would be more descriptors than select() takes)."""
        script = f"ip link set lo up && exec {self.connloop} hold -n {self.args.conns}"
        stdin_r, self.users_stdin = os.pipe()
        out_r, out_w = os.pipe()
        self.session.defer(lambda: _close(self.users_stdin))
        t0 = time.monotonic()
        try:
            for _ in range(self.args.namespaces):
                p = subprocess.Popen(
                    as_nobody(["unshare", "-rn", "sh", "-c", script]),
                    stdin=stdin_r,
                    stdout=out_w,
                    stderr=subprocess.DEVNULL,
                    preexec_fn=preexec(cgroup=self.pool),
                )
                self.users.append(self.session.track(p))
        finally:
            os.close(stdin_r)
            os.close(out_w)
        held, buf = 0, b""
        with os.fdopen(out_r, "rb", buffering=0) as out:
            while held < len(self.users):
                if time.monotonic() - t0 > 300:
                    raise BenchError(f"nsload: only {held} of nobody's processes held connections")
                chunk = out.read(65536)
                if not chunk:
                    raise BenchError(f"nsload: nobody's processes ended ({held} held)")
                buf += chunk
                *done, buf = buf.split(b"\n")
                held += sum(1 for ln in done if ln.startswith(b"held "))
        log(f"nsload: {len(self.users)} namespaces of nobody's in {time.monotonic() - t0:.1f} s")

    def move_users(self, stop_at: threading.Event) -> threading.Thread:
        """Move each of nobody's processes into a new cgroup of its own, as
        nobody, EVERY seconds apart (in a thread)."""

        def run() -> None:
            t0 = time.monotonic()
            for i, p in enumerate(self.users):
                if stop_at.is_set():
                    return
                dest = os.path.join(self.deleg, f"u{i:04d}")
                subprocess.run(
                    as_nobody(
                        ["sh", "-c", f'mkdir "$1" && echo {p.pid} > "$1/cgroup.procs"', "-", dest]
                    ),
                    check=False,
                )
                wait = t0 + (i + 1) * self.args.every - time.monotonic()
                if wait > 0:
                    stop_at.wait(wait)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def attach_latency(pins_link_dir: str, path: str, made_at: float, timeout: float = 30) -> float:
    """Seconds from ``made_at`` until every link of the cgroup at ``path``
    is pinned (polled every millisecond)."""
    from bpfkeep.pins.pindir import HOOK_NAMES

    deadline = time.monotonic() + timeout
    cg_id = None
    while time.monotonic() < deadline:
        if cg_id is None:
            try:
                cg_id = os.stat(path).st_ino
            except FileNotFoundError:
                time.sleep(0.001)
                continue
        elif not os.path.isdir(path):
            break  # removed before it was attached
        if all(os.path.exists(os.path.join(pins_link_dir, f"{cg_id}_{h}")) for h in HOOK_NAMES):
            return time.monotonic() - made_at
        time.sleep(0.001)
    return float("inf")


def probes(
    sc: Scenario, link_dir: str, tries: int, every: float
) -> tuple[list[float], list[float]]:
    """TRIES new cgroups of root's, EVERY s apart: (attach latencies, own
    sockets' coverage latencies), seconds."""
    proc = sc.session.track(  # it makes deleg/c000000 ...: under the rule
        spawn(
            [sc.connloop, "cgchurn", sc.deleg, str(sc.port), "-n", str(tries), "-e",
             str(int(every * 1000)), "--want", "keepalive=1", "--want", "keepintvl=10",
             "--hold", "15000"],
            stdin=subprocess.DEVNULL,
        )
    )  # fmt: skip
    from tests.support import LineReader

    lines = LineReader(proc)  # every line kept: the covered ones are read at the end
    attach, covered = [], []
    for i in range(tries):
        made = lines.expect(f"made i={i} ", timeout=every + 30)
        if made is None:
            raise BenchError(f"cgchurn: no cgroup {i} made; got {lines.lines[-5:]}")
        t = float(made.split("t=")[1])
        attach.append(attach_latency(link_dir, os.path.join(sc.deleg, f"c{i:06d}"), t))
    lines.expect("done ", timeout=120)
    for ln in lines.lines:
        if ln.startswith("covered "):
            covered.append(int(ln.split("us=")[1]) / 1e6)
        elif ln.startswith("uncovered "):
            covered.append(float("inf"))
    stop(proc)
    return attach, covered


class Backstop:
    """A process of an enforced cgroup of root's holding a socket made in
    another cgroup (no hook of ours sees it), which turns its keepidle to
    9999 behind the policy's back: how long until the periodic pass brings
    it back (in a thread, beside the rest of the run)."""

    def __init__(self, sc: Scenario):
        elsewhere = sc.session.cgroup(f"{os.path.basename(sc.deleg)}-elsewhere")
        target = os.path.join(sc.deleg, "backstop")
        os.mkdir(target)
        self.proc = sc.session.track(
            spawn([sys.executable, "-c", BACKSTOP, str(sc.port)], cgroup=elsewhere)
        )
        self.lines = Lines(self.proc)
        self.lines.expect("ready", timeout=10)
        with open(os.path.join(target, "cgroup.procs"), "w") as f:
            f.write(str(self.proc.pid))
        self.seconds: float | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        time.sleep(3)  # attached, swept at once and again after a second
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        with contextlib.suppress(BenchError):
            got = self.lines.expect("fixed ", timeout=600)
            self.seconds = float(got.split("s=")[1])

    def result(self) -> float | None:
        """Seconds, or None if not brought back by now."""
        return self.seconds


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each of a process's threads, by name."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
        except OSError:
            continue
        out[name] = out.get(name, 0.0) + ns / 1e9
    return out


def run_once(session: Session, connloop: str, repo: Path, args, tag: str) -> dict:
    out: dict = {"daemon_from": str(repo)}
    sc = Scenario(session, connloop, args, tag)
    pin = f"{session.pin_dir}-{tag}"
    d = Daemon(session, sc.rule(), pin_dir=pin)
    d.repo = repo
    with open(d.config, "w") as f:
        f.write(
            f'[metrics]\nlisten = "127.0.0.1:{d.port}"\n\n[daemon]\naudit_interval = 15\n\n'
            f'[[policy]]\ncgroup = "{sc.rule()}"\n{POLICY}'
        )
    sc.start_users()
    from bpfkeep.enforcer import Enforcer

    session.defer(lambda: Enforcer(pin).destroy())
    d.start("--detach-on-exit", timeout=300)
    link_dir = Enforcer(pin).link_dir
    cpu0, t0 = d.cpu_ns(), time.monotonic()
    halt = threading.Event()
    mover = sc.move_users(halt)
    try:
        back = Backstop(sc) if args.backstop else None
        attach, covered = probes(sc, link_dir, args.tries, args.probe_every)
        out["attach_s"], out["own_sockets_s"] = attach, covered
        # A reload that changes every policy: a sweep of every namespace.
        with open(d.config) as f:
            text = f.read()
        with open(d.config, "w") as f:
            f.write(text.replace("keepcnt = 6", "keepcnt = 7"))
        d.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        made = time.monotonic()
        path = os.path.join(sc.deleg, "after-sighup")
        os.mkdir(path)
        out["attach_after_sighup_s"] = attach_latency(link_dir, path, made)
        halt.wait(max(0.0, args.namespaces * args.every - (time.monotonic() - t0)))
        if back is not None:
            # Its bound is 60 s: wait that long past the last move at most.
            deadline = time.monotonic() + 75
            while back.result() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            out["backstop_s"] = back.result()
    finally:
        halt.set()
        mover.join()
    out["cpu_s"] = (d.cpu_ns() - cpu0) / 1e9
    out["threads_cpu_s"] = thread_cpu(d.proc.pid)  # type: ignore[union-attr]
    out["wall_s"] = time.monotonic() - t0
    out["rss_mb"] = d.rss_mb()
    out["pass"] = d.pass_gauges()
    d.stop()
    if args.logs:
        os.makedirs(args.logs, exist_ok=True)
        shutil.copy(os.path.join(d.tmp, "daemon.log"), os.path.join(args.logs, f"daemon-{tag}.log"))
    for p in sc.users:
        stop(p, signal.SIGKILL)
    return out


def _threads(cpu: dict[str, float]) -> str:
    top = sorted(cpu.items(), key=lambda kv: -kv[1])[:4]
    return ", ".join(f"{name} {s:.1f}" for name, s in top)


def report(results: dict[str, dict]) -> str:
    def ms(xs: list[float], q: float) -> str:
        return f"{quantile(xs, q) * 1000:.0f}" if xs else "-"

    names = list(results)
    lines = [
        "| " + " | ".join(["", *names]) + " |",
        "|---" * (len(names) + 1) + "|",
    ]

    def row(what: str, f) -> None:
        lines.append("| " + " | ".join([what, *(f(results[n]) for n in names)]) + " |")

    row(
        "new cgroup attached, p50 / p99 ms (target p99 <= 50)",
        lambda r: f"{ms(r['attach_s'], 0.5)} / {ms(r['attach_s'], 0.99)}",
    )
    row(
        "its own sockets swept, p50 / p99 ms (target <= 1000)",
        lambda r: f"{ms(r['own_sockets_s'], 0.5)} / {ms(r['own_sockets_s'], 0.99)}",
    )
    row(
        "attached right after a SIGHUP sweeping every namespace, ms",
        lambda r: f"{r['attach_after_sighup_s'] * 1000:.0f}",
    )
    row(
        "backstop: held socket's keepidle brought back after, s (target <= 60)",
        lambda r: "-" if r.get("backstop_s") is None else f"{r['backstop_s']:.1f}",
    )
    row("daemon CPU over the run, s (wall s)", lambda r: f"{r['cpu_s']:.1f} ({r['wall_s']:.0f})")
    row(
        "bpfkeep_audit_interval_seconds at the end",
        lambda r: f"{r['pass'].get('every_s', float('nan')):.0f}",
    )
    row("RSS at the end, MB", lambda r: f"{r['rss_mb']:.1f}")
    row("CPU by thread, s", lambda r: _threads(r["threads_cpu_s"]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.nsload", description=__doc__.split("\n")[0])
    p.add_argument("--namespaces", type=int, default=600, help="nobody's processes (600)")
    p.add_argument("--conns", type=int, default=5, help="loopback connections each (5)")
    p.add_argument("--every", type=float, default=0.2, help="s between moves (0.2)")
    p.add_argument("--tries", type=int, default=20, help="root's new cgroups (20)")
    p.add_argument("--probe-every", type=float, default=5.0, help="s between them (5)")
    p.add_argument("--no-backstop", dest="backstop", action="store_false")
    p.add_argument("--against", metavar="REF", help="also run the daemon of this commit, first")
    p.add_argument("--logs", metavar="DIR", help="keep the daemons' logs there")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root: run it with sudo", file=sys.stderr)
        return 77
    results: dict[str, dict] = {}
    try:
        with Session() as session:
            connloop = build_connloop(BUILD)
            runs = [("this", REPO)]
            if args.against:
                runs.insert(0, (args.against, checkout(session, args.against)))
            for i, (name, repo) in enumerate(runs):
                log(f"nsload: the daemon of {name} ({repo})")
                results[name] = run_once(session, connloop, repo, args, f"r{i}")
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    print(
        f"{args.namespaces} namespaces of nobody's, {args.conns} connections each, moved "
        f"{args.every} s apart\n"
    )
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
