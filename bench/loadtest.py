"""The daemon at scale: 10,000 policies and 10,000 cgroups.

``sudo .venv/bin/python -m bench.loadtest [--policies N] [--cgroups N]``

One scratch parent holds the cgroups (``load/c00000`` ...); the config has
one ``[[policy]]`` table per cgroup naming it exactly (policies beyond the
number of cgroups name cgroups that do not exist).  The daemon runs as
under systemd (bench.daemonbench.Daemon: ``python -m bpfkeep daemon`` from
this checkout, READY=1 read from a private NOTIFY_SOCKET), on the
benchmark's own pin directory with the programs already compiled.

Measured, and printed beside the targets (READY <= 3 s and reload <= 1 s
at 10,000 policies, RSS <= 60 MB):

- config: ``config.load`` of the file in this process, indexing the rules
  (done on the first lookup), and matching every cgroup against them (what
  the daemon's walk does), to tell the config's share of the times below;
- start to READY=1 attaching every cgroup from nothing, and again adopting
  them on restart;
- reload: SIGHUP with every policy changed until STATUS= comes back (all
  updated in place), and one with nothing changed; each sent once the
  daemon is idle (its CPU time stopped moving), and also timed until it
  is idle again (the sweep of what changed runs right after STATUS=);
- RSS and peak RSS of the daemon after each.

``--daemon-from DIR`` runs another checkout's daemon (and its config
module for the config costs) under this harness: old and new side by side.

Everything made is removed at the end, also after a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import REPO, BenchError, Session, log
from bench.daemonbench import Daemon

IDLE_WINDOW = 0.5  # s: idle = under 1 % of a CPU over this long

TARGETS = {"ready_s": 3.0, "reload_s": 1.0, "rss_mb": 60.0}
POLICY = 'mode = "enforce"\nkeepintvl = 10\nkeepcnt = 6\n'


def write_config(
    daemon: Daemon, session: Session, n_policies: int, keepidle: int, group: str = "load"
) -> None:
    """n_policies exact [[policy]] tables; 0: one glob matching them all
    (the cgroups ``<session>/<group>/c00000`` ...)."""
    base = session.rel(session.cg_base)
    parts = [f'[metrics]\nlisten = "127.0.0.1:{daemon.port}"\n\n[daemon]\naudit_interval = 0\n\n']
    if not n_policies:
        parts.append(f'[[policy]]\ncgroup = "{base}/{group}/*"\nkeepidle = {keepidle}\n{POLICY}')
    for i in range(n_policies):
        parts.append(f'[[policy]]\ncgroup = "{base}/{group}/c{i:05d}"\nkeepidle = {keepidle}\n')
        parts.append(POLICY)
    with open(daemon.config, "w") as f:
        f.write("".join(parts))


class CheckoutDaemon(Daemon):
    """bench.daemonbench.Daemon, running the daemon of another checkout."""

    def __init__(self, session: Session, repo: Path, pin_dir: str | None = None):
        super().__init__(session, "unused", pin_dir=pin_dir)
        self.repo = repo


def wait_idle(daemon: Daemon, timeout: float) -> float:
    """Seconds until the daemon's CPU time stops moving (under 1 % of a CPU
    over IDLE_WINDOW), not counting that window."""
    t0 = time.monotonic()
    samples = [(t0, daemon.cpu_ns())]
    while time.monotonic() - t0 < timeout:
        time.sleep(0.05)
        now = time.monotonic()
        samples.append((now, daemon.cpu_ns()))
        old = [x for x in samples if now - x[0] >= IDLE_WINDOW]
        if old:
            t, cpu = old[-1]
            if samples[-1][1] - cpu < 0.01 * (now - t) * 1e9:
                return max(0.0, t - t0)
    raise BenchError(f"daemon: not idle within {timeout} s")


def reload(daemon: Daemon, timeout: float) -> tuple[float, float]:
    """SIGHUP to an idle daemon; seconds until its STATUS= after the
    reconcile, and until it is idle again."""
    assert daemon.proc is not None
    wait_idle(daemon, timeout)
    t0 = time.monotonic()
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_message("STATUS=enforcing", timeout)
    status = time.monotonic() - t0
    return status, status + wait_idle(daemon, timeout)


CONFIG_COSTS = """
import json, sys, time
from bpfkeep import config

path, rels = sys.argv[1], sys.argv[2:] or json.load(sys.stdin)
t0 = time.monotonic()
cfg = config.load(path)
load_s = time.monotonic() - t0
# The rules are indexed on the first lookup after each load: timed on its
# own (counted in with a sample of lookups, it once read as "0.24 ms a
# cgroup", 50 times what matching costs).
t0 = time.monotonic()
cfg.policy_for("")
index_s = time.monotonic() - t0
# What the walk asks of the config for each cgroup, every cgroup.
t0 = time.monotonic()
for rel in rels:
    cfg.policy_for(rel)
    cfg.watch(rel)
match_all_s = time.monotonic() - t0
print(json.dumps({
    "load_s": load_s,
    "index_s": index_s,
    "match_per_cgroup_ms": match_all_s / max(1, len(rels)) * 1000,
    "match_all_s": match_all_s,
}))
"""


def config_costs(path: str, cgroup_rels: list[str], repo: Path) -> dict:
    """config.load, indexing and matching, in a fresh process running the
    daemon's checkout."""
    proc = subprocess.run(
        [sys.executable, "-c", CONFIG_COSTS, path],
        input=json.dumps(cgroup_rels),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(repo)},
        cwd=str(repo),
        check=False,
    )
    if proc.returncode != 0:
        raise BenchError(f"config costs: {proc.stderr.strip()[-400:]}")
    return json.loads(proc.stdout)


def run(n_policies: int, n_cgroups: int, timeout: float, repo: Path = REPO) -> dict:
    out: dict = {
        "policies": n_policies,
        "cgroups": n_cgroups,
        "targets": TARGETS,
        "daemon_from": str(repo),
    }
    with Session() as session:
        session.enforcer()  # compile once: the times below are the daemon's own
        t0 = time.monotonic()
        paths = [session.cgroup(f"load/c{i:05d}") for i in range(n_cgroups)]
        log(f"load: made {n_cgroups} cgroups in {time.monotonic() - t0:.1f} s")
        d = CheckoutDaemon(session, repo)
        write_config(d, session, n_policies, keepidle=60)
        out["config"] = config_costs(d.config, [session.rel(p) for p in paths], repo)
        log(f"load: config {out['config']}")
        try:
            out["ready_attach_s"] = d.start(timeout=timeout)
            out["rss_after_attach_mb"] = d.rss_mb()
            log(f"load: READY after attaching: {out['ready_attach_s']:.2f} s")
            write_config(d, session, n_policies, keepidle=61)
            out["reload_update_s"], out["reload_update_idle_s"] = reload(d, timeout)
            log(
                f"load: reload updating every policy: {out['reload_update_s']:.2f} s "
                f"(idle after {out['reload_update_idle_s']:.2f} s)"
            )
            out["reload_same_s"], out["reload_same_idle_s"] = reload(d, timeout)
            log(
                f"load: reload changing nothing: {out['reload_same_s']:.2f} s "
                f"(idle after {out['reload_same_idle_s']:.2f} s)"
            )
            out["rss_mb"], out["hwm_mb"] = d.rss_mb(), d.hwm_mb()
            ms, body = d.scrape()
            out["scrape_ms"], out["scrape_bytes"] = ms, len(body)
        finally:
            d.stop()
        d2 = CheckoutDaemon(session, repo)
        write_config(d2, session, n_policies, keepidle=61)
        try:
            out["ready_adopt_s"] = d2.start(timeout=timeout)
            out["rss_after_adopt_mb"], out["hwm_after_adopt_mb"] = d2.rss_mb(), d2.hwm_mb()
            log(f"load: READY adopting on restart: {out['ready_adopt_s']:.2f} s")
        finally:
            d2.stop()
        out["attached"] = len(
            {os.stat(p).st_ino for p in paths} & session.enforcer().pinned_ids()
        )  # fmt: skip
    return out


def report(r: dict) -> str:
    def row(what: str, value: float, unit: str, target: float | None) -> str:
        verdict = ""
        if target is not None:
            verdict = "met" if value <= target else "NOT met"
            return f"| {what} | {value:.2f} {unit} | <= {target:g} {unit} | {verdict} |"
        return f"| {what} | {value:.2f} {unit} | | |"

    c = r["config"]
    rss = max(r.get("rss_mb", 0), r.get("rss_after_attach_mb", 0), r.get("rss_after_adopt_mb", 0))
    lines = [
        f"daemon at {r['policies'] or 'one glob rule for all'} policies, {r['cgroups']} cgroups "
        f"({r['attached']} attached at the end); daemon from {r['daemon_from']}",
        "",
        "| what | measured | target | |",
        "|---|---:|---:|---|",
        row("start to READY, attaching every cgroup", r["ready_attach_s"], "s", TARGETS["ready_s"]),
        row("start to READY, adopting on restart", r["ready_adopt_s"], "s", TARGETS["ready_s"]),
        row("reload, every policy changed", r["reload_update_s"], "s", TARGETS["reload_s"]),
        row("reload, nothing changed", r["reload_same_s"], "s", TARGETS["reload_s"]),
        row(
            "reload, every policy changed: until idle (sweep)", r["reload_update_idle_s"], "s", None
        ),
        row("reload, nothing changed: until idle", r["reload_same_idle_s"], "s", None),
        row("RSS (largest after start, reload, restart)", rss, "MB", TARGETS["rss_mb"]),
        row("peak RSS (VmHWM)", max(r["hwm_mb"], r["hwm_after_adopt_mb"]), "MB", None),
        row("scrape of /metrics", r["scrape_ms"], "ms", None),
        row("of which: config.load of the file", c["load_s"], "s", None),
        row("of which: indexing the rules (first lookup)", c.get("index_s", 0), "s", None),
        row("of which: matching every cgroup against the rules", c["match_all_s"], "s", None),
    ]
    cost = c["load_s"] + c.get("index_s", 0) + c["match_all_s"]
    share = cost / max(r["ready_attach_s"], 1e-9)
    lines.append("")
    lines.append(
        f"The config (parsing and matching) is ~{min(share, 1) * 100:.0f} % of the start time"
        + (": it dominates." if share > 0.5 else ".")
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadtest", description=__doc__.split("\n")[0])
    p.add_argument(
        "--policies",
        type=int,
        default=10000,
        help="[[policy]] tables, one per cgroup (10000); 0: one glob rule for every cgroup, "
        "to measure the daemon without the cost of a large config",
    )
    p.add_argument("--cgroups", type=int, default=10000, help="scratch cgroups (10000)")
    p.add_argument(
        "--timeout", type=float, default=3600, help="seconds to wait for READY or a reload"
    )
    p.add_argument("--json", metavar="FILE", help="also write the measurements as JSON")
    p.add_argument(
        "--daemon-from",
        metavar="DIR",
        type=Path,
        default=REPO,
        help="run the daemon (and config module) of this checkout (default: this one)",
    )
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (BPF, cgroups): run it with sudo", file=sys.stderr)
        return 77
    try:
        r = run(args.policies, args.cgroups, args.timeout, args.daemon_from.resolve())
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    print(report(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
