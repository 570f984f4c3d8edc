"""Cgroups churning under the daemon (issue 21, item 4).

``sudo .venv/bin/python -m bench.churn [--rate 100] [--seconds 60] [--against main]``

A rule ``cgroup = "<base>/churn/*"`` (enforce, 60/10/6, audit every 15 s).
RATE new cgroups a second for SECONDS (``connloop cgchurn``): the moment
each is made a process joins it and connects to a listener elsewhere
(which closes what it accepts: the host's sockets do not pile up) (so,
mostly, before the daemon has attached the cgroup: only a sweep covers
that connection), then reads its own socket every millisecond until it
has keepalive on with keepidle 60; it holds the connection a second and
exits, and the cgroup is removed.  Printed:

- **coverage**: from each connect's return until its socket has the
  policy -- the share within 0.5 s, p50 / p99 / max, and the connections
  never covered (5 s);
- **the daemon's RSS** every 5 s, from before to after (flat: nothing of
  the removed cgroups is kept);
- its CPU, and **the sweeps left** (``bpfkeep_sweep_backlog``) 10 s after
  the last cgroup.

``--against REF`` runs the daemon of another commit the same way, first.
Everything made is removed at the end, also after a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
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
    Session,
    build_connloop,
    checkout,
    log,
    quantile,
)
from bench.daemonbench import Daemon
from bench.nsload import _threads, thread_cpu

POLICY = 'mode = "enforce"\nkeepidle = 60\nkeepintvl = 10\nkeepcnt = 6\n'
TARGET_S = 0.5


def backlog(d: Daemon) -> float | None:
    _ms, body = d.scrape()
    for ln in body.decode().splitlines():
        name, _, value = ln.partition(" ")
        if name == "bpfkeep_sweep_backlog":
            return float(value)
    return None


class Server:
    """A listener (in the bench's own cgroup) that closes what it accepts:
    the host's sockets do not pile up over the run (each would be in every
    dump of the host's namespace, and in the daemon's RSS through them)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def run_once(session: Session, connloop: str, repo: Path, args, tag: str) -> dict:
    base = session.cgroup(f"churn-{tag}")
    server = Server()
    session.defer(server.close)
    port = server.port
    d = Daemon(session, f"{session.rel(base)}/*", pin_dir=f"{session.pin_dir}-{tag}")
    d.repo = repo
    from bpfkeep.enforcer import Enforcer

    session.defer(lambda: Enforcer(d.pin_dir).destroy())
    d.start("--detach-on-exit", timeout=300)
    time.sleep(2)  # its first audit pass
    rss: list[tuple[float, float]] = [(0.0, d.rss_mb())]
    done = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        while not done.wait(5.0):
            rss.append((time.monotonic() - t0, d.rss_mb()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu0 = d.cpu_ns()
    n = args.rate * args.seconds
    churn = subprocess.run(
        [connloop, "cgchurn", base, str(port), "-n", str(n), "-r", str(args.rate),
         "--want", "keepalive=1", "--want", "keepidle=60", "--hold", "1000"],
        capture_output=True,
        text=True,
        timeout=args.seconds * 3 + 120,
        check=False,
    )  # fmt: skip
    if churn.returncode:
        raise BenchError(f"cgchurn: {churn.stderr.strip()[-300:]}")
    wall = time.monotonic() - t0
    time.sleep(10)
    out: dict = {"daemon_from": str(repo), "cgroups": n, "wall_s": wall}
    out["backlog_after"] = backlog(d)
    out["cpu_s"] = (d.cpu_ns() - cpu0) / 1e9
    out["threads_cpu_s"] = thread_cpu(d.proc.pid)  # type: ignore[union-attr]
    done.set()
    sampler.join()
    rss.append((time.monotonic() - t0, d.rss_mb()))
    out["rss_mb"] = rss
    covered, uncovered = [], 0
    for ln in churn.stdout.splitlines():
        if ln.startswith("covered "):
            covered.append(int(ln.split("us=")[1]) / 1e6)
        elif ln.startswith("uncovered "):
            uncovered += 1
    out["covered_s"], out["uncovered"] = covered, uncovered
    d.stop()
    log(f"churn: {len(covered)} covered, {uncovered} not, daemon CPU {out['cpu_s']:.1f} s")
    return out


def report(results: dict[str, dict], args) -> str:
    names = list(results)
    lines = [
        f"{args.rate} new cgroups a second for {args.seconds} s, each connecting at once\n",
        "| | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]

    def row(what: str, f) -> None:
        lines.append(f"| {what} | " + " | ".join(f(results[n]) for n in names) + " |")

    def within(r: dict) -> str:
        xs = r["covered_s"]
        ok = sum(1 for x in xs if x <= TARGET_S)
        return f"{100 * ok / max(1, r['cgroups']):.2f} % ({ok} of {r['cgroups']})"

    def ms(q: float):
        return lambda r: f"{quantile(r['covered_s'], q) * 1000:.0f}" if r["covered_s"] else "-"

    row(f"connections covered within {TARGET_S} s", within)
    row("coverage p50 ms", ms(0.5))
    row("coverage p99 ms", ms(0.99))
    row("coverage max ms", ms(1.0))
    row("never covered (5 s)", lambda r: str(r["uncovered"]))

    def rss(r: dict) -> str:
        mbs = [m for _, m in r["rss_mb"]]
        return f"{mbs[0]:.1f} / {max(mbs):.1f} / {mbs[-1]:.1f}"

    row("daemon RSS MB: before / max / after", rss)
    row("daemon CPU s (over the churn + 10 s)", lambda r: f"{r['cpu_s']:.1f} ({r['wall_s']:.0f} s)")
    row("daemon CPU by thread, s", lambda r: _threads(r["threads_cpu_s"]))
    row("daemon RSS MB every 5 s", lambda r: " ".join(f"{m:.1f}" for _, m in r["rss_mb"]))
    row("sweeps left 10 s after (bpfkeep_sweep_backlog)", lambda r: (
        "-" if r["backlog_after"] is None else f"{r['backlog_after']:.0f}"))  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.churn", description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=int, default=100, help="new cgroups a second (100)")
    p.add_argument("--seconds", type=int, default=60, help="for how long (60)")
    p.add_argument("--against", metavar="REF", help="also run the daemon of this commit, first")
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
                log(f"churn: the daemon of {name} ({repo})")
                results[name] = run_once(session, connloop, repo, args, f"r{i}")
    except (BenchError, subprocess.TimeoutExpired) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    print(report(results, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
