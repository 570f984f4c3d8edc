"""``python -m bench``: bpfkeep's benchmark, one command.

Runs as root on the real kernel: scratch cgroups, a private pin directory
under /sys/fs/bpf, network namespaces of its own, loopback traffic only.
Everything it makes is removed at the end, also after a failure.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import BENCH, REPO, BenchError, log

SECTIONS = ("cost", "detect", "daemon")
DEFAULT_OUT = BENCH / "out"


def _positive(raw: str) -> int:
    try:
        v = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure what bpfkeep costs a connection, how fast it notices a dead "
        "peer, and the daemon's footprint, side by side with the alternatives.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a short run (~2 min): fewer rounds and connections, one repetition",
    )
    p.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        metavar="SECTION",
        help=f"run only these sections ({', '.join(SECTIONS)}); repeatable",
    )
    p.add_argument("--rounds", type=_positive, help="cost: interleaved rounds (full 60, quick 4)")
    p.add_argument(
        "--conns", type=_positive, help="cost: connections per run (full 4000, quick 2000)"
    )
    p.add_argument("--reps", type=_positive, help="detect: repetitions (full 3, quick 1)")
    p.add_argument(
        "--variants",
        help="cost: comma-separated variant names to run ('none' always first), "
        "e.g. none,empty-sockops,bpf-default",
    )
    p.add_argument(
        "--method",
        action="append",
        choices=("rst", "fin"),
        help="cost: how connections end: rst (the bench's: SO_LINGER 0, server "
        "closes first) or fin (plain close, client first, TIME_WAIT: the independent "
        "measurement's); repeatable; default both",
    )
    p.add_argument(
        "--cpu",
        type=int,
        default=None,
        help="cost: CPU to pin the workload to (default: the last one)",
    )
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})"
    )
    p.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: write the tables and charts of an earlier results.json",
    )
    p.add_argument(
        "--publish",
        action="store_true",
        help="also copy results.md and the charts to bench/ for the README",
    )
    return p


def _meta(quick: bool) -> dict:
    def git(*args: str) -> str:
        proc = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False
        )
        return proc.stdout.strip()

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    cpu = ln.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dirty = "+changes" if git("status", "--porcelain", "--", "bpf", "bpfkeep", "preload") else ""
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": (git("rev-parse", "--short", "HEAD") or "?") + dirty,
        "quick": quick,
        "python": sys.version.split()[0],
    }


def run(args: argparse.Namespace) -> dict:
    from bench import common, cost, daemonbench, detect

    sections = args.only or list(SECTIONS)
    quick = args.quick
    build = args.out / "build"
    connloop = common.build_connloop(build)
    shim = common.build_shim(build)
    cpu = args.cpu if args.cpu is not None else (os.cpu_count() or 1) - 1
    results: dict = {"meta": _meta(quick), "notes": []}
    t0 = time.monotonic()
    methods = args.method or ["rst", "fin"]

    def run_cost(s: common.Session) -> dict:
        out = {}
        for m in methods:
            meth = cost.METHODS[m]
            out[m] = cost.run(
                s,
                connloop,
                shim,
                rounds=args.rounds or (4 if quick else meth.rounds),
                conns=args.conns or (2000 if quick else meth.conns),
                warmup=meth.warmup,
                cpu=cpu,
                names=args.variants.split(",") if args.variants else None,
                method=m,
            )
        return out

    steps = {
        "cost": run_cost,
        "detect": lambda s: detect.run(s, connloop, shim, reps=args.reps or (1 if quick else 3)),
        "daemon": lambda s: daemonbench.run(s, connloop, quick=quick),
    }
    with common.session() as s:
        # What this run makes (removed again at the end, whatever happens).
        results["meta"]["scratch"] = [s.cg_base, s.pin_dir, f"{s.pin_dir}-prev"]
        for name in SECTIONS:
            if name not in sections:
                continue
            try:
                if name == "cost":  # one section per method: cost, cost-fin
                    for m, res in run_cost(s).items():
                        results["cost" if m == "rst" else f"cost-{m}"] = res
                    continue
                results[name] = steps[name](s)
            except BenchError as e:  # report it, run the other sections
                log(f"{name}: {e}")
                results.setdefault("errors", {})[name] = str(e)
    results["meta"]["duration_s"] = time.monotonic() - t0
    return results


def publish(out: Path) -> None:
    """Copy the table and charts next to bench/README.md."""
    import shutil

    for name in ("results.md", "cost.png", "cost-fin.png", "detect.png"):
        src = out / name
        if src.exists():
            shutil.copy2(src, BENCH / name)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        import json

        from bench import report

        results = json.loads(args.render.read_text())
        for path in report.write(results, args.out):
            log(f"wrote {path}")
        if args.publish:
            publish(args.out)
        return 0
    if os.geteuid() != 0:
        print("bench: needs root (BPF, cgroups, network namespaces): run it with sudo",
              file=sys.stderr)  # fmt: skip
        return 77
    from bench import report

    try:
        results = run(args)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    for path in report.write(results, args.out):
        log(f"wrote {path}")
    if args.publish:
        publish(args.out)
        log("copied results.md and the charts to bench/")
    print(report.markdown(results))
    failed = bool(results.get("errors")) or bool(results.get("daemon", {}).get("errors"))
    return 1 if failed else 0
