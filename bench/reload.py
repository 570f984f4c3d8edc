"""The daemon's reload at scale: SIGHUP at 10,000 cgroups, each with a
policy of its own carrying 10 peer rules, this checkout's daemon and
another revision's side by side in one run.

    sudo .venv/bin/python -m bench.reload [--against REV] [--cgroups N]
        [--peers N] [--rounds N] [--profile DIR] [--json FILE]

Each side (this checkout; with ``--against REV`` also that revision,
taken from git with ``git archive``) gets its own scratch cgroups under
the session's parent (``side0/c00000`` ...), its own pin directory and a
config with one ``[[policy]]`` table per cgroup naming it exactly, each
with the same ``--peers`` peer rules (CIDRs of both families, ports,
exempt peers, one host name: ``localhost``).  The daemon runs as under
systemd (bench.daemonbench.Daemon).  Each side first attaches every
cgroup once (untimed: it also compiles the programs); then, round after
round, each side in turn (the order alternating) starts again, adopting,
and is sent SIGHUP once idle (its CPU time stopped moving, as
bench.loadtest waits) for each case:

- ``every``: every policy changed (keepidle 60 <-> 61, which changes
  every peer rule that takes keepidle from its policy too);
- ``none``: the same file again;
- ``one``: one policy of N changed;
- ``bad``: a file with an error in its last table (rejected; the file is
  put back afterwards).

Each is timed from the signal to the daemon's STATUS= (``reload``; also
the daemon's CPU time meanwhile, every thread's schedstat: steadier on a
shared machine) and to idle again (``idle``: what the reload queued, the
sweep, has run);
after each the policy hash is read back from the kernel and every
cgroup's keepidle and peer-rule set checked against the config (a reload
that did nothing fails the run instead of looking free).  Printed: the
median of each side, and the median of the per-round ratios
this/against, beside the target (issue 21: <= 1 s for every and none).

``--profile DIR``: after the timed rounds, one more reload of each case
per side under cProfile (bench/profiled.py: the reload and the sweeps it
queues), written to DIR/<side>-<case>.prof with a text summary beside it.

Everything made is removed at the end, also after a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import BENCH, REPO, BenchError, Session, log, median
from bench.daemonbench import Daemon
from bench.loadtest import wait_idle

TARGET_S = 1.0  # issue 21: a reload at 10,000 cgroups, every policy changed or none
CASES = ("every", "none", "one", "bad")
KEEPIDLE = (60, 61)  # "every" goes from one to the other
ONE_DELTA = 200  # "one": the first cgroup's keepidle this much higher
POLICY = 'mode = "enforce"\nkeepintvl = 10\nkeepcnt = 6\n'
# Peer rules as an operator writes them: the paths that matter (a NAT
# gateway's range, a database's ports, IPv6 ranges), exempt peers, a host
# name.  Rules without keepidle take the policy's.
PEER_RULES = (
    'address = "10.20.0.0/16"\nkeepidle = 300\n',
    'address = "10.20.5.0/24"\nport = "5432-5439"\nkeepidle = 30\n',
    'address = "192.168.0.0/16"\nexempt = true\n',
    'address = "127.0.0.0/8"\nexempt = true\n',
    'address = "fd00::/8"\nkeepidle = 240\n',
    'address = "2001:db8::/32"\nport = 443\nkeepidle = 120\n',
    'address = "172.16.0.0/12"\nkeepintvl = 5\n',
    'address = "100.64.0.0/10"\nkeepidle = 340\n',
    'address = "203.0.113.7"\nuser_timeout = 30000\n',
    'address = "localhost"\nkeepcnt = 3\n',
)


def peer_rules(n: int) -> str:
    """n [[policy.peer]] tables: PEER_RULES, then more /24s."""
    rules = list(PEER_RULES[:n])
    rules += [f'address = "10.{30 + k // 250}.{k % 250}.0/24"\n' for k in range(n - len(rules))]
    return "".join(f"[[policy.peer]]\n{r}" for r in rules)


@dataclass
class Side:
    """One daemon under test: whose code, where it pins, its cgroups."""

    name: str
    repo: Path
    pin_dir: str
    group: str  # the cgroups' parent, relative to the session's
    ids: list[int] = field(default_factory=list)  # cgroup ids, in config order
    expected: list[int] = field(default_factory=list)  # keepidle per cgroup, as in force
    runs: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)
    ready_attach_s: float = 0.0
    ready_adopt_s: list[float] = field(default_factory=list)
    rss_mb: float = 0.0
    hwm_mb: float = 0.0


class Config:
    """The config of one side: exact [[policy]] tables for its cgroups."""

    def __init__(self, session: Session, side: Side, n: int, peers: int):
        self.base = f"{session.rel(session.cg_base)}/{side.group}"
        self.n = n
        self.peers = peer_rules(peers)
        side.expected = [KEEPIDLE[0]] * n

    def text(self, port: int, keepidle: list[int], bad: bool = False) -> str:
        parts = [f'[metrics]\nlisten = "127.0.0.1:{port}"\n\n[daemon]\naudit_interval = 0\n\n']
        for i, k in enumerate(keepidle):
            parts.append(f'[[policy]]\ncgroup = "{self.base}/c{i:05d}"\nkeepidle = {k}\n{POLICY}')
            parts.append(self.peers)
        if bad:
            parts.append(f'[[policy]]\ncgroup = "{self.base}/c00000"\nkeepcnt = 500\n')
        return "".join(parts)


def checkout(session: Session, rev: str) -> Path:
    """A revision of this repository in a scratch directory (git archive)."""
    where = Path(tempfile.mkdtemp(prefix="bpfkeep-bench-rev-"))
    session.defer(lambda: shutil.rmtree(where, ignore_errors=True))
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", rev],
        capture_output=True,
        check=False,
    )
    if archive.returncode:
        raise BenchError(f"git archive {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    return where


def short_rev(rev: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", rev],
        capture_output=True,
        text=True,
        check=False,
    )
    return f"{rev} ({out.stdout.strip()})" if out.returncode == 0 else rev


class Run:
    """One side's daemon started on its config, and the cases sent to it."""

    def __init__(self, session: Session, side: Side, cfg: Config, profile: str | None = None):
        self.session, self.side, self.cfg = session, side, cfg
        self.d = Daemon(session, "unused", pin_dir=side.pin_dir)
        self.d.repo = side.repo
        if profile:
            self.d.launcher = [str(BENCH / "profiled.py"), profile]
        self.write(side.expected)

    def write(self, keepidle: list[int], bad: bool = False) -> None:
        with open(self.d.config, "w") as f:
            f.write(self.cfg.text(self.d.port, keepidle, bad))

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        side = self.side
        if self.d.proc is not None and self.d.proc.poll() is None:
            side.rss_mb = max(side.rss_mb, self.d.rss_mb())
            side.hwm_mb = max(side.hwm_mb, self.d.hwm_mb())
        self.d.stop()

    def start(self, timeout: float) -> float:
        return self.d.start(timeout=timeout)

    def case(self, case: str, timeout: float) -> tuple[float, float, float]:
        """Send one case; (seconds to STATUS=, seconds to idle again, the
        daemon's CPU seconds until STATUS=)."""
        side, cfg = self.side, self.cfg
        old = list(side.expected)
        if case == "every":
            k = KEEPIDLE[1] if old[-1] == KEEPIDLE[0] else KEEPIDLE[0]
            new = [k] * cfg.n
        elif case == "one":
            new = list(old)
            new[0] = old[-1] + ONE_DELTA if old[0] == old[-1] else old[-1]
        else:
            new = old
        self.write(new, bad=case == "bad")
        got = self.hup("STATUS=reload rejected" if case == "bad" else "STATUS=enforcing", timeout)
        if case == "bad":
            self.write(old)  # the next start must not meet it
        side.expected = new
        check(side, cfg, timeout)
        return got

    def hup(self, needle: str, timeout: float) -> tuple[float, float, float]:
        d = self.d
        assert d.proc is not None
        wait_idle(d, timeout)
        cpu0, t0 = d.cpu_ns(), time.monotonic()
        d.proc.send_signal(signal.SIGHUP)
        d.wait_message(needle, timeout)
        status, cpu = time.monotonic() - t0, (d.cpu_ns() - cpu0) / 1e9
        return status, status + wait_idle(d, timeout), cpu


def check(side: Side, cfg: Config, timeout: float) -> None:
    """Every cgroup's policy in the kernel (the policy hash) is the one the
    config says: its keepidle, and a peer-rule set when the config has
    rules.  (Read with this checkout's code: the sides share the layout.)"""
    from bpfkeep.enforcer import Enforcer
    from bpfkeep.progs import maps

    deadline = time.monotonic() + timeout
    while True:
        raw = Enforcer(side.pin_dir).policy_values()
        wrong = []
        for cg_id, want in zip(side.ids, side.expected, strict=True):
            got = raw.get(cg_id)
            keepidle = maps.decode_policy(got)[2].keepidle if got is not None else None
            peers = got is not None and maps.policy_peers(got)[0]
            if keepidle != want or (cfg.peers and not peers):
                wrong.append((cg_id, want, keepidle))
        if not wrong:
            return
        if time.monotonic() > deadline:
            raise BenchError(
                f"{side.name}: {len(wrong)} policies in the kernel are not the config's, "
                f"e.g. cgroup {wrong[0][0]}: keepidle {wrong[0][2]}, expected {wrong[0][1]}"
            )
        time.sleep(0.2)


def profile(session: Session, side: Side, cfg: Config, out: Path, timeout: float) -> None:
    """One reload of each case under cProfile; stats and a summary in out/."""
    for case in CASES:
        prof = out / f"{side.name.split()[0]}-{case}.prof"
        with Run(session, side, cfg, profile=str(prof)) as run:
            run.start(timeout)
            run.case(case, timeout)
        if not prof.exists():
            raise BenchError(f"{side.name}: no profile written ({run.d.log_tail()})")
        with open(prof.with_suffix(".txt"), "w") as f:
            stats = pstats.Stats(str(prof), stream=f)
            stats.sort_stats("cumulative").print_stats(40)
            stats.sort_stats("tottime").print_stats(25)
        log(f"profile: {prof} (summary: {prof.with_suffix('.txt')})")


def destroy(pin_dir: str) -> None:
    from bpfkeep.enforcer import Enforcer

    try:
        Enforcer(pin_dir).destroy()
    finally:
        shutil.rmtree(pin_dir, ignore_errors=True)


def run(args: argparse.Namespace) -> dict:
    with Session() as session:
        sides = [Side("this checkout", REPO, f"{session.pin_dir}-0", "side0")]
        if args.against:
            where = checkout(session, args.against)
            sides.append(Side(short_rev(args.against), where, f"{session.pin_dir}-1", "side1"))
        for side in sides:
            session.defer(lambda p=side.pin_dir: destroy(p))
            t0 = time.monotonic()
            for i in range(args.cgroups):
                side.ids.append(os.stat(session.cgroup(f"{side.group}/c{i:05d}")).st_ino)
            log(f"{side.name}: made {args.cgroups} cgroups in {time.monotonic() - t0:.1f} s")
        cfgs = [Config(session, s, args.cgroups, args.peers) for s in sides]
        for side, cfg in zip(sides, cfgs, strict=True):
            with Run(session, side, cfg) as r:
                side.ready_attach_s = r.start(args.timeout)
                check(side, cfg, args.timeout)
            log(f"{side.name}: READY attaching (and compiling) {side.ready_attach_s:.2f} s")
        for rnd in range(args.rounds):
            order = list(zip(sides, cfgs, strict=True))
            for side, cfg in order if rnd % 2 == 0 else order[::-1]:
                with Run(session, side, cfg) as r:
                    side.ready_adopt_s.append(r.start(args.timeout))
                    for case in CASES:
                        side.runs.setdefault(case, []).append(r.case(case, args.timeout))
                log(
                    f"round {rnd + 1}/{args.rounds} {side.name}: "
                    + ", ".join(f"{c} {side.runs[c][-1][0]:.2f} s" for c in CASES)
                )
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            for side, cfg in zip(sides, cfgs, strict=True):
                profile(session, side, cfg, args.profile, args.timeout)
    return {
        "cgroups": args.cgroups,
        "peers": args.peers,
        "rounds": args.rounds,
        "target_s": TARGET_S,
        "sides": [
            {
                "name": s.name,
                "repo": str(s.repo),
                "runs": s.runs,
                "ready_attach_s": s.ready_attach_s,
                "ready_adopt_s": s.ready_adopt_s,
                "rss_mb": s.rss_mb,
                "hwm_mb": s.hwm_mb,
            }
            for s in sides
        ],
    }


def report(r: dict) -> str:
    sides = r["sides"]
    this = sides[0]
    other = sides[1] if len(sides) > 1 else None
    head = f"reload at {r['cgroups']} cgroups, one policy each with {r['peers']} peer rules"
    lines = [f"{head}; {r['rounds']} interleaved rounds; medians (min-max)", ""]
    cols = ["case", f"{this['name']}"]
    if other:
        cols += [other["name"], "this / against (per round)"]
    cols.append("target")
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def cell(xs: list[float]) -> str:
        return f"{median(xs):.3f} s ({min(xs):.3f}-{max(xs):.3f})"

    for case in CASES:
        for what, k in (("reload", 0), ("its CPU time", 2), ("until idle", 1)):
            mine = [x[k] for x in this["runs"][case]]
            row = [f"{case}: {what}", cell(mine)]
            if other:
                theirs = [x[k] for x in other["runs"][case]]
                ratios = [a / b for a, b in zip(mine, theirs, strict=True) if b > 0]
                row += [
                    cell(theirs),
                    f"{median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})",
                ]
            target = case in ("every", "none") and k == 0
            verdict = ("met" if median(mine) <= TARGET_S else "NOT met") if target else ""
            row.append(f"<= {TARGET_S:g} s: {verdict}" if target else "")
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for s in sides:
        lines.append(
            f"{s['name']}: READY attaching {s['ready_attach_s']:.2f} s (compiling included), "
            f"adopting {median(s['ready_adopt_s']):.2f} s (median); "
            f"RSS {s['rss_mb']:.0f} MB, peak {s['hwm_mb']:.0f} MB"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reload", description=__doc__.split("\n")[0])
    p.add_argument("--cgroups", type=int, default=10000, help="cgroups, one policy each (10000)")
    p.add_argument("--peers", type=int, default=10, help="peer rules in every policy (10)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    p.add_argument(
        "--against", metavar="REV", help="also run this git revision's daemon, interleaved"
    )
    p.add_argument("--profile", metavar="DIR", type=Path, help="profile one reload of each case")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for each step")
    p.add_argument("--json", metavar="FILE", help="also write the measurements as JSON")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (BPF, cgroups): run it with sudo", file=sys.stderr)
        return 77
    if args.cgroups < 1 or args.rounds < 1 or args.peers < 0:
        p.error("--cgroups and --rounds must be at least 1, --peers at least 0")
    try:
        r = run(args)
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
