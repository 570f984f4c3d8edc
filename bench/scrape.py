"""A scrape of /metrics at 1,000 and 10,000 cgroups: this checkout's
daemon against another's, side by side in one run.

``sudo .venv/bin/python -m bench.scrape [--against REF|DIR] [--sizes 1000,10000] [--rounds N]``

For each size: that many scratch cgroups under one parent, and one glob
rule giving them all a policy (the config of bench.loadtest with
``--policies 0``).  Both daemons run at once on the same cgroups, each on
a pin directory of its own (``--against`` a git ref is checked out into a
temporary worktree; default ``main``).  Once both are idle, they are
scraped in turn, round after round (this checkout first in even rounds,
the other first in odd ones), so both see the same machine: this host is
shared, and its load moves by ±30 % within a minute.

Measured per scrape: the wall time of the HTTP GET (no gzip, as
bench.daemonbench) and the daemon's CPU time for it (schedstat of every
thread).  Printed: the medians, and the median of the per-round ratios.
Both daemons must write as many per-cgroup series (the same families
for the same cgroups), or the run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import REPO, BenchError, Session, log, median
from bench.loadtest import CheckoutDaemon, wait_idle, write_config

SIZES = (1000, 10000)
TARGET_S = {1000: 0.05, 10000: 0.5}  # issue 21: /metrics at 1,000 and 10,000 cgroups


def checkout(session: Session, against: str) -> Path:
    """A directory holding ``against``: itself if it is one, else a
    detached worktree of that git ref (removed at the end)."""
    if os.path.isdir(against):
        return Path(against).resolve()
    where = tempfile.mkdtemp(prefix="bpfkeep-bench-against-")
    os.rmdir(where)
    proc = subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", where, against],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise BenchError(f"--against {against}: {proc.stderr.strip()}")
    session.defer(
        lambda: subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", where],
            capture_output=True,
            check=False,
        )
    )
    return Path(where)


def measure(daemon: CheckoutDaemon) -> tuple[float, float, int, int]:
    """(wall ms, daemon CPU ms, bytes, per-cgroup series) of one scrape."""
    cpu = daemon.cpu_ns()
    ms, body = daemon.scrape()
    return ms, (daemon.cpu_ns() - cpu) / 1e6, len(body), body.count(b'cgroup="')


def run_size(session: Session, n: int, other: Path, rounds: int, timeout: float) -> dict:
    group = f"s{n}"
    for i in range(n):
        session.cgroup(f"{group}/c{i:05d}")
    pins = {"this": session.pin_dir, "other": f"{session.pin_dir}-against"}
    daemons = {
        "this": CheckoutDaemon(session, REPO, pin_dir=pins["this"]),
        "other": CheckoutDaemon(session, other, pin_dir=pins["other"]),
    }
    out: dict = {"cgroups": n, "wall_ms": {}, "cpu_ms": {}, "bytes": {}, "series": {}, "hwm_mb": {}}
    try:
        for d in daemons.values():
            write_config(d, session, 0, keepidle=60, group=group)
            d.start(timeout=timeout)
        for d in daemons.values():
            wait_idle(d, timeout)
        samples: dict[str, list[tuple[float, float, int, int]]] = {k: [] for k in daemons}
        # A daemon answers a scrape that comes sooner than its last
        # collection's duration after it with the next collection (at most
        # half the time scraping): each is scraped only after that.
        free = {k: 0.0 for k in daemons}
        for r in range(rounds + 1):  # round 0 warms both up, not counted
            order = ["this", "other"] if r % 2 == 0 else ["other", "this"]
            for who in order:
                time.sleep(max(0.0, free[who] - time.monotonic()))
                m = measure(daemons[who])
                free[who] = time.monotonic() + 1.5 * m[0] / 1000
                if r:
                    samples[who].append(m)
        for who, ms in samples.items():
            out["wall_ms"][who] = [m[0] for m in ms]
            out["cpu_ms"][who] = [m[1] for m in ms]
            out["bytes"][who] = ms[-1][2]
            out["series"][who] = ms[-1][3]
            out["hwm_mb"][who] = daemons[who].hwm_mb()
    finally:
        for d in daemons.values():
            d.stop()
        from bpfkeep.enforcer import Enforcer

        Enforcer(pins["other"]).destroy()
    # The same families for the same cgroups, or more when this checkout
    # added some (then the time a series is printed beside the totals).
    if out["series"]["this"] < out["series"]["other"]:
        raise BenchError(
            f"{n} cgroups: fewer per-cgroup series ({out['series']['this']} against "
            f"{out['series']['other']})"
        )
    return out


def run(against: str, sizes: Sequence[int], rounds: int, timeout: float) -> dict:
    result: dict = {"against": against, "rounds": rounds, "sizes": []}
    with Session() as session:
        other = checkout(session, against)
        result["against_commit"] = subprocess.run(
            ["git", "-C", str(other), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip
        result["this_commit"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip
        session.enforcer()  # compile once for this checkout's daemon
        for n in sizes:
            t0 = time.monotonic()
            r = run_size(session, n, other, rounds, timeout)
            log(f"scrape: {n} cgroups done in {time.monotonic() - t0:.0f} s")
            result["sizes"].append(r)
    return result


def report(res: dict) -> str:
    lines = [
        f"scrape of /metrics, this checkout ({res['this_commit']}) against "
        f"{res['against']} ({res['against_commit']}), {res['rounds']} interleaved rounds",
        "",
        "| cgroups | bytes | wall: this | wall: other | this/other | CPU: this | CPU: other "
        "| this/other | target | |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    series = []
    for r in res["sizes"]:
        n, w, c = r["cgroups"], r["wall_ms"], r["cpu_ms"]
        wall_ratio = median([a / b for a, b in zip(w["this"], w["other"], strict=True)])
        cpu_ratio = median([a / b for a, b in zip(c["this"], c["other"], strict=True)])
        target = TARGET_S.get(n)
        verdict = ""
        if target is not None:
            verdict = "met" if median(w["this"]) <= target * 1000 else "NOT met"
        lines.append(
            f"| {n} | {r['bytes']['this']} | {median(w['this']):.0f} ms | "
            f"{median(w['other']):.0f} ms | {wall_ratio:.3f} | {median(c['this']):.0f} ms | "
            f"{median(c['other']):.0f} ms | {cpu_ratio:.3f} | "
            + (f"<= {target * 1000:g} ms | {verdict} |" if target else "| |")
        )
        st, so = r["series"]["this"], r["series"]["other"]
        if st != so:
            series.append(
                f"{n} cgroups: {st} per-cgroup series against {so}, "
                f"the wall time a series this/other {wall_ratio * so / st:.3f}"
            )
    lines.append("")
    if series:
        lines += ["This checkout writes more families: " + "; ".join(series) + ".", ""]
    lines.append(
        "Medians of the rounds; ratios are medians of the per-round ratios. "
        "Peak RSS (VmHWM) after the scrapes: "
        + "; ".join(
            f"{r['cgroups']}: {r['hwm_mb']['this']:.0f} MB this, "
            f"{r['hwm_mb']['other']:.0f} MB other"
            for r in res["sizes"]
        )
        + "."
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scrape", description=__doc__.split("\n")[0])
    p.add_argument(
        "--against", default="main", help="git ref or checkout directory to compare with (main)"
    )
    p.add_argument(
        "--sizes",
        default=",".join(map(str, SIZES)),
        type=lambda s: [int(x) for x in s.split(",")],
        help="cgroup counts (1000,10000)",
    )
    p.add_argument("--rounds", type=int, default=7, help="interleaved scrapes of each (7)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for READY, idle")
    p.add_argument("--json", metavar="FILE", help="also write the measurements as JSON")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (BPF, cgroups): run it with sudo", file=sys.stderr)
        return 77
    try:
        res = run(args.against, args.sizes, args.rounds, args.timeout)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    print(report(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
