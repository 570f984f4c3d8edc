"""What a sweep costs a socket (issue 21, item 3): this commit's and
another's, side by side in one run.

``sudo .venv/bin/python -m bench.sweepcost [--against main] [--rounds 5]``

Two workloads, each swept by every version in turn (rounds interleaved),
each version in a process of its own with its programs in a pin directory
of its own and its policy (enforce, 60/10/6) on the same cgroups:

- **one namespace**: 100,000 established sockets (50,000 loopback
  connections, ``connloop hold``) in one network namespace and cgroup;
- **200 namespaces**: 20,000 sockets, a process with 50 connections in
  each of 200 namespaces, each in a cgroup of its own under one parent
  (the parent is swept).

The first sweep brings every socket to the policy; the next ones find
them all under it, as the periodic backstop does: those are the figure
(median of the rounds).  Per socket: the CPU time of the sweeping process
(every thread), and its parts --

- the kernel's: the iterator's walks (the CPU of the thread running them;
  of which inside the BPF program, from the kernel's run-time statistics,
  BPF_ENABLE_STATS), the inet_diag dumps (their system calls, without the
  decoding), /proc and the cgroup tree (which sockets processes hold,
  which namespaces they live in, the scope);
- ours: the rest (decoding, work items, the work list).

Each namespace's walk is a walk of the host's whole TCP table unless the
namespace has one of its own (``net.ipv4.tcp_child_ehash_entries`` of the
namespace it was made from): its cost is printed per namespace too.  The
200 namespaces are made from the host's (shared table), or with
``--child-ehash N`` from a namespace of the bench's own with that setting
(tables of N buckets; the host's setting is not touched).  The floor is
printed beside them: the kernel's walks (an iterator run, an inet_diag
dump) of one more namespace, made the same way, that holds no socket --
what each namespace costs however few its sockets, and so the least a
socket can cost at that many sockets a namespace.

Everything made is removed at the end, also after a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import uuid
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
    median,
    spawn,
)

POLICY = {"keepidle": 60, "keepintvl": 10, "keepcnt": 6, "mode": "enforce"}

# The measuring process, run with PYTHONPATH at a checkout: attach the
# policy with that checkout's Enforcer, then sweep the cgroups on each line
# of stdin and print what it cost as JSON.  Both versions' functions are
# wrapped where they exist (the parts are the same kernel interfaces).
CHILD = r"""
import json, os, struct, sys, threading, time
from bpfkeep.enforcer import Enforcer
from bpfkeep.kernel import bpfsys, procfs, sockdiag
from bpfkeep.kernel.cgroups import Cgroup, cgroup2_mount
from bpfkeep.options import Policy
from bpfkeep.sweep import engine, runs

acc, lock = {}, threading.Lock()

def wrap(owner, name, key):
    f = getattr(owner, name, None)
    if f is None:
        return
    def timed(*a, **k):
        t0 = time.thread_time()
        try:
            return f(*a, **k)
        finally:
            with lock:
                acc[key] = acc.get(key, 0.0) + time.thread_time() - t0
    setattr(owner, name, timed)

wrap(sockdiag, "_dump_family", "dump")
wrap(sockdiag, "parse", "parse")
wrap(bpfsys, "iter_run", "iter")
wrap(engine, "scope", "proc")
wrap(procfs, "held_sockets", "proc")
wrap(procfs, "namespaces", "proc")
wrap(getattr(procfs, "HeldSockets", None), "of", "proc")
wrap(getattr(procfs, "HeldSockets", None), "is_tcp", "proc")
try:
    from bpfkeep.kernel import netns
    wrap(netns, "of_processes", "proc")
except ImportError:
    netns = None

pin, paths = sys.argv[1], sys.argv[2:]
mount = cgroup2_mount()
cgs = [Cgroup(p, os.path.relpath(p, mount), os.stat(p).st_ino) for p in paths]
enf = Enforcer(pin)
enf.prepare()
policy = Policy.from_mapping(json.loads(os.environ["BENCH_POLICY"]))
for cg in cgs:
    enf.attach(cg, policy)
if hasattr(runs, "Apply"):  # the daemon's way: a namespace at a time, caches kept
    entered, held = netns.Entered("bpfkeep-sweep"), procfs.HeldSockets()
    def sweep():
        run = runs.Apply(enf.pins, cgs, entered=entered, held=held)
        for ns in run.units():
            run.run(ns)
        return run.finish()
else:
    def sweep():
        return enf.sweep(cgs)

def prog_stats():  # struct bpf_prog_info: run_time_ns, run_cnt at 192
    fd = bpfsys.obj_get(os.path.join(enf.obj_dir, "prog_sweep"))
    try:
        return struct.unpack_from("=QQ", bpfsys._info(fd, 256), 192)
    finally:
        os.close(fd)

profile, first = os.environ.get("BENCH_PROFILE"), True
if profile:
    import cProfile
    profiler = cProfile.Profile()
def floor(pid):  # the kernel's walks of a namespace holding no socket
    from bpfkeep.kernel import netns as ns_
    entered = ns_.Entered("bpfkeep-floor")
    fd = bpfsys.obj_get(os.path.join(enf.obj_dir, "prog_sweep"))
    mask = sockdiag.states_mask(engine.SWEPT_STATES)
    def walks():
        t0 = time.thread_time()
        for _ in range(10):
            bpfsys.iter_run(fd)
        t1 = time.thread_time()
        for _ in range(10):
            sockdiag.dump(mask, None)
        return (t1 - t0) / 10, (time.thread_time() - t1) / 10
    try:
        it, dump = entered.call(walks, pid, 120)
    finally:
        os.close(fd)
        entered.close()
    print(json.dumps({"floor_iter": it, "floor_dump": dump}), flush=True)

print("ready", flush=True)
for _line in sys.stdin:
    if _line.startswith("floor "):
        floor(int(_line.split()[1]))
        continue
    acc.clear()
    s0, c0, w0 = prog_stats(), time.process_time(), time.monotonic()
    if profile and not first:  # the steady sweeps, this thread's calls
        report = profiler.runcall(sweep)
    else:
        report = sweep()
    first = False
    c1, w1, s1 = time.process_time(), time.monotonic(), prog_stats()
    print(json.dumps({**acc, "total": c1 - c0, "wall": w1 - w0,
                      "prog": (s1[0] - s0[0]) / 1e9, "prog_runs": s1[1] - s0[1],
                      "swept": report.swept, "namespaces": report.namespaces}), flush=True)
if profile:
    profiler.dump_stats(profile)
"""


class Workload:
    """Sockets held open in network namespaces of the bench's own."""

    def __init__(self, session: Session, connloop: str):
        self.session, self.connloop = session, connloop
        self.tag = uuid.uuid4().hex[:6]
        self.netns: list[str] = []
        session.defer(self._remove_netns)

    def namespace(self, i: int) -> str:
        name = f"bkc{self.tag}-{i}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.netns.append(name)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        # Its own port range: 50,000 connections to one address need more
        # than the default 28,000 ports (inside this namespace only).
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                name,
                "sysctl",
                "-qw",
                "net.ipv4.ip_local_port_range=1024 65000",
            ],
            check=True,
        )
        return name

    def hold_apart(self, cgroup: str, connections: int, parent: str | None) -> None:
        """connloop hold in ``cgroup`` and a network namespace of its own
        (unshare), made from ``parent``'s (a named one) or the host's."""
        script = f"ip link set lo up && exec {self.connloop} hold -n {connections}"
        self._apart(cgroup, script, parent, timeout=120)

    def empty(self, cgroup: str, parent: str | None) -> int:
        """A process in ``cgroup`` and a network namespace of its own that
        holds no socket, made as hold_apart makes them; its pid."""
        return self._apart(cgroup, "echo held; exec sleep 3600", parent, timeout=60).pid

    def _apart(
        self, cgroup: str, script: str, parent: str | None, timeout: float
    ) -> subprocess.Popen:
        """``sh -c script`` in ``cgroup`` and a network namespace of its own
        made from ``parent``'s or the host's, once it printed "held"."""
        argv = ["unshare", "-n", "sh", "-c", script]
        if parent is not None:
            argv = ["ip", "netns", "exec", parent, *argv]
        p = self.session.track(spawn(argv, cgroup=cgroup))
        Lines(p).expect("held", timeout=timeout)
        return p

    def hold(self, cgroup: str, ns: str, connections: int) -> None:
        """connloop hold in ``cgroup`` and ``ns``: 2 sockets a connection,
        at most 10,000 connections a process (its file limit)."""
        left = connections
        while left > 0:
            n = min(10000, left)
            left -= n
            p = self.session.track(
                spawn([self.connloop, "hold", "-n", str(n)], cgroup=cgroup, netns=ns)
            )
            Lines(p).expect("held ", timeout=600)

    def remove(self, name: str) -> None:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        self.netns.remove(name)

    def _remove_netns(self) -> None:
        for name in list(self.netns):
            self.remove(name)


def measure(
    session: Session,
    paths: list[str],
    sockets: int,
    versions,
    rounds: int,
    profile: str = "",
    empty: int | None = None,
) -> dict:
    """Sweep ``paths`` with every version, rounds interleaved (``profile``:
    write each version's cProfile of its steady sweeps to PROFILE.NAME)."""
    from bpfkeep.progs.kheaders import bcc_environment

    procs = {}
    for name, repo in versions:
        pin = f"{session.pin_dir}-{name.replace('/', '_')}-{uuid.uuid4().hex[:4]}"
        env = {
            **os.environ,
            **bcc_environment(),
            "PYTHONPATH": str(repo),
            "BENCH_POLICY": json.dumps(POLICY),
        }
        if profile:
            env["BENCH_PROFILE"] = f"{profile}.{name.replace('/', '_')}"
        p = session.track(
            subprocess.Popen(
                [sys.executable, "-c", CHILD, pin, *paths],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
                cwd="/",
            )
        )
        session.defer(lambda pin=pin, env=env: _destroy(pin, env))
        if p.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
            raise BenchError(f"the sweep of {name} did not start")
        procs[name] = p
    samples: dict[str, list[dict]] = {name: [] for name in procs}
    for r in range(rounds + 1):  # round 0: the first sweep, applying the policy
        order = list(procs) if r % 2 else list(reversed(procs))
        for name in order:
            p = procs[name]
            p.stdin.write("sweep\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
            line = p.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise BenchError(f"the sweep of {name} ended")
            samples[name].append(json.loads(line))
    floors = {}
    for name, p in procs.items():
        if empty is not None:  # the floor: a namespace holding no socket
            p.stdin.write(f"floor {empty}\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
            floors[name] = json.loads(p.stdout.readline())  # type: ignore[union-attr]
        p.stdin.close()  # type: ignore[union-attr]
        p.wait(timeout=60)
    out = {}
    for name, xs in samples.items():
        steady = xs[1:]

        def per(key: str, xs=steady) -> float:
            return median([x.get(key, 0.0) for x in xs]) / sockets * 1e6

        out[name] = {
            "first_us": xs[0]["total"] / sockets * 1e6,
            "total_us": per("total"),
            "iter_us": per("iter"),
            "prog_us": per("prog"),
            "diag_us": median([x.get("dump", 0.0) - x.get("parse", 0.0) for x in steady])
            / sockets
            * 1e6,
            "parse_us": per("parse"),
            "proc_us": per("proc"),
            "wall_s": median([x["wall"] for x in steady]),
            "iterator_runs": median([x["prog_runs"] for x in steady]),
            "namespaces": steady[-1]["namespaces"],
            "samples": xs,
        }
        o = out[name]
        o["ours_us"] = o["total_us"] - o["iter_us"] - o["diag_us"] - o["proc_us"]
        per_ns = sockets / 1000 / max(1, o["namespaces"])  # µs a socket -> ms a namespace
        o["iter_ns_ms"], o["diag_ns_ms"] = o["iter_us"] * per_ns, o["diag_us"] * per_ns
        if name in floors:
            o["floor_iter_ms"] = floors[name]["floor_iter"] * 1000
            o["floor_dump_ms"] = floors[name]["floor_dump"] * 1000
            # The least a socket can cost, were all else free: each
            # namespace's walks of a table, however few its sockets.
            o["floor_us"] = (o["floor_iter_ms"] + o["floor_dump_ms"]) / per_ns
    return out


def _destroy(pin: str, env: dict) -> None:
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"from bpfkeep.enforcer import Enforcer; Enforcer({pin!r}).destroy()",
        ],
        env=env,
        capture_output=True,
        check=False,
        cwd="/",
    )


def run(args: argparse.Namespace) -> dict:
    from bpfkeep.kernel import bpfsys

    results: dict = {}
    with Session() as session:
        stats = bpfsys.enable_stats()  # the programs' run time, while it is open
        session.defer(lambda: os.close(stats))
        connloop = build_connloop(BUILD)
        versions = [("this", REPO)]
        if args.against:
            versions.insert(0, (args.against, checkout(session, args.against)))
        w = Workload(session, connloop)
        if "one" in args.cases:
            path = session.cgroup("one")
            ns = w.namespace(0)
            log(f"sweepcost: {args.sockets} sockets in one namespace ...")
            w.hold(path, ns, args.sockets // 2)
            results["one"] = measure(
                session, [path], args.sockets, versions, args.rounds, args.profile or ""
            )
            results["one"]["sockets"], results["one"]["namespaces"] = args.sockets, 1
            _kill_holders(session, path)
            w.remove(ns)  # its TIME-WAIT sockets too: they sit in the host's table
        if "many" in args.cases:
            parent = session.cgroup("many")
            log(f"sweepcost: {args.spread} sockets over {args.netns} namespaces ...")
            per_ns = args.spread // args.netns
            made_from = None  # the namespace the 200 are made from (None: the host's)
            if args.child_ehash:
                made_from = w.namespace(1)
                subprocess.run(
                    ["ip", "netns", "exec", made_from, "sysctl", "-qw",
                     f"net.ipv4.tcp_child_ehash_entries={args.child_ehash}"],
                    check=True,
                )  # fmt: skip
            for i in range(args.netns):
                w.hold_apart(session.cgroup(f"many/c{i:03d}"), per_ns // 2, made_from)
            empty = w.empty(session.cgroup("floor"), made_from)
            results["many"] = measure(
                session, [parent], args.spread, versions, args.rounds, args.profile or "", empty
            )
            results["many"]["sockets"], results["many"]["namespaces"] = args.spread, args.netns
    return results


def _kill_holders(session: Session, path: str) -> None:
    from bpfkeep.kernel.cgroups import remove_tree

    with contextlib.suppress(OSError):
        remove_tree(path)
    del session


def report(results: dict) -> str:
    lines = []
    for case, title in (("one", "in one namespace"), ("many", "spread over namespaces")):
        if case not in results:
            continue
        r = results[case]
        names = [n for n in r if n not in ("sockets", "namespaces")]
        lines += [
            f"\n{r['sockets']} sockets {title} ({r['namespaces']}): µs of CPU a socket, "
            "median of the sweeps after the first",
            "",
            "| | " + " | ".join(names) + (" | ratio |" if len(names) == 2 else " |"),
            "|---" * (len(names) + 1 + (len(names) == 2)) + "|",
        ]

        def row(what: str, key: str, r=r, names=names, lines=lines) -> None:
            vals = [r[n][key] for n in names]
            ratio = f" | {vals[1] / vals[0]:.2f}" if len(vals) == 2 and vals[0] else ""
            lines.append(f"| {what} | " + " | ".join(f"{v:.2f}" for v in vals) + ratio + " |")

        row("**whole sweep** (target <= 5)", "total_us")
        row("the kernel: iterator walks", "iter_us")
        row("... a namespace, ms", "iter_ns_ms")
        row("... of which inside the BPF program", "prog_us")
        row("the kernel: inet_diag dumps", "diag_us")
        row("... a namespace, ms", "diag_ns_ms")
        if all("floor_us" in r[n] for n in names):
            row("the floor: walks of an empty namespace, ms (iterator)", "floor_iter_ms")
            row("... (inet_diag)", "floor_dump_ms")
            row("... both a namespace, as µs a socket", "floor_us")
        row("/proc and the cgroup tree", "proc_us")
        row("ours: decoding, work items, the work list", "ours_us")
        row("... of which decoding the dumps", "parse_us")
        row("first sweep (applies the policy to every socket)", "first_us")
        lines.append(
            "| wall time of a sweep, s | "
            + " | ".join(f"{r[n]['wall_s']:.2f}" for n in names)
            + (" | |" if len(names) == 2 else " |")
        )
        lines.append(
            "| iterator runs of the BPF program a sweep | "
            + " | ".join(f"{r[n]['iterator_runs']:.0f}" for n in names)
            + (" | |" if len(names) == 2 else " |")
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.sweepcost", description=__doc__.split("\n")[0]
    )
    p.add_argument("--against", metavar="REF", help="also sweep with this commit's code")
    p.add_argument("--rounds", type=int, default=5, help="sweeps after the first (5)")
    p.add_argument("--sockets", type=int, default=100000, help="one namespace's sockets")
    p.add_argument("--spread", type=int, default=20000, help="sockets over the namespaces")
    p.add_argument("--netns", type=int, default=200, help="namespaces they are spread over")
    p.add_argument("--case", dest="cases", action="append", choices=("one", "many"), help="(both)")
    p.add_argument(
        "--child-ehash",
        type=int,
        metavar="N",
        help="make the 200 namespaces with TCP tables of N buckets of their own "
        "(from a namespace whose tcp_child_ehash_entries is N)",
    )
    p.add_argument("--json", metavar="FILE", type=Path, help="also write every sample")
    p.add_argument(
        "--profile",
        metavar="FILE",
        help="write each version's cProfile of its steady sweeps (the sweeping "
        "thread's calls) to FILE.VERSION (the profiler slows them: figures apart)",
    )
    args = p.parse_args(argv)
    args.cases = args.cases or ["one", "many"]
    if os.geteuid() != 0:
        print("bench: needs root: run it with sudo", file=sys.stderr)
        return 77
    try:
        results = run(args)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
