"""Connection cost: what a keepalive tool adds to every connection.

connloop opens and closes loopback connections as fast as it can (connect,
accept, close both: the worst case for a per-connection cost, since the
connection does nothing else).  Each variant runs in its own scratch
cgroup -- the "none" baseline too -- and the variants take turns,
round after round (A B C ... A B C ..., each round starting one variant
further on so that no variant always follows the same one).  Every
process is pinned to the same CPU: loopback packets are handled on the
sending CPU, so the whole connection stays there.

Reported per variant: the median time per connection, and the ratio to
"none" as the median of the per-round ratios (each variant against the
"none" run of the same round, which cancels slow drifts of a noisy host),
with its interquartile range.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from collections.abc import Callable

from bench.common import (
    BenchError,
    Session,
    libkeepalive_path,
    line_starting,
    log,
    median,
    parse_kv,
    quantile,
    run_to_end,
)
from bench.parts import FOUR, PARTS

# The default policy's values (bpfkeep.options.Policy()): libkeepalive's.
DEFAULT = {"keepidle": 15, "keepintvl": 15, "keepcnt": 9}
DEFAULT_USER_TIMEOUT = (15 + 15 * 9) * 1000
ALL8 = {
    **DEFAULT,
    "user_timeout": DEFAULT_USER_TIMEOUT,
    "syncnt": 3,
    "maxseg": 1400,
    "window_clamp": 32768,
}
# Runs per BPF variant of the in-program pass (kernel run-time statistics).
STAT_RUNS = 3
# Targets from issues 5 and 8: a ratio to "none" each variant must stay under.
TARGETS = {"bpf-default": 1.03}


@dataclasses.dataclass(frozen=True)
class Method:
    """How a run opens and closes its connections, and how many."""

    name: str
    label: str
    args: tuple[str, ...]  # extra connloop arguments
    rounds: int  # full run
    conns: int
    warmup: int
    note: str


# Two ways of measuring the same thing.  Both run connect+accept+close in
# ONE process (listener, client and accepted socket all in the variant's
# cgroup) and count that process's CPU time, i.e. both ends of the
# connection; they differ in how the connection ends (see bench/README.md).
METHODS = {
    "rst": Method(
        "rst",
        "bench method: RST close",
        (),
        rounds=60,
        conns=4000,
        warmup=200,
        note="listener has SO_LINGER {1, 0}, the server closes first: one RST, "
        "no TIME_WAIT; 200 warm-up connections a run",
    ),
    "fin": Method(
        "fin",
        "plain close: FIN both ways, TIME_WAIT",
        ("--close", "fin"),
        rounds=40,
        conns=5000,
        warmup=0,
        note="no SO_LINGER, the client closes first: FIN/ACK both ways, the client "
        "socket goes to TIME_WAIT; no warm-up (issue 8's independent measurement, as described)",
    ),
}


@dataclasses.dataclass
class Variant:
    name: str
    label: str  # for the table
    setup: Callable[[Session, str], None] | None = None  # (session, cgroup)
    env: dict[str, str] | None = None  # extra environment (LD_PRELOAD, ...)
    args: list[str] = dataclasses.field(default_factory=list)  # connloop --set ...
    expect: dict[str, int] = dataclasses.field(default_factory=dict)  # client options
    note: str = ""


def _policy(**values):
    from bpfkeep.options import Policy

    return Policy.from_mapping(values)


def _peered(n: int, **values):
    """The default policy with ``n`` peer rules: n - 1 for networks the
    benchmark never reaches (10.x.y.0/24, and ports), and one for loopback
    with the policy's own values -- every connection is looked up in the
    whole table and falls under a rule, as it would on a host whose
    policy names its peers."""
    from bpfkeep import peers

    specs = [{"address": f"10.{i // 256}.{i % 256}.0/24"} for i in range(n - 1)]
    specs.append({"address": "127.0.0.0/8"})
    given = {k: v for k, v in values.items() if v is not None}
    return _policy(**values).with_peers(peers.build(given, specs))


def _sets(values: dict[str, int]) -> list[str]:
    out = []
    for k, v in values.items():
        out += ["--set", f"{k}={v}"]
    return out


def variants(shim: str, names: list[str] | None = None) -> list[Variant]:
    """Every variant, in table order; ``names`` picks some."""
    keep = {**DEFAULT, "user_timeout": DEFAULT_USER_TIMEOUT, "keepalive": 1}
    vs = [
        Variant("none", "no keepalive tool", note="nothing attached, nothing preloaded"),
        Variant(
            "empty-sockops",
            "empty sock_ops program (floor)",
            setup=lambda s, cg: s.attach_empty_sockops(cg),
            note="`r0 = 1; exit`, the least any sock_ops tool costs",
        ),
        Variant(
            "prev-default",
            "previous BPF programs (946e221), default policy",
            setup=lambda s, cg: s.prev_programs().attach(cg, _policy()),
            expect=keep,
            note="ownership in bpf_sock_ops.reply and the RTO_CB flag (before issue 8)",
        ),
        *(
            Variant(
                name,
                label,
                setup=lambda s, cg, name=name: s.parts().attach(name, cg),
                expect=keep if parts & FOUR else {"keepalive": 1},
                note=note,
            )
            for name, (parts, label, note) in PARTS.items()
        ),
        Variant(
            "bpf-default",
            "bpfkeep BPF, set mode, default policy",
            setup=lambda s, cg: s.attach(cg, _policy()),
            expect=keep,
            note="keepidle 15, keepintvl 15, keepcnt 9, user_timeout 150000",
        ),
        Variant(
            "bpf-peers-1",
            "bpfkeep BPF, default policy with 1 peer rule",
            setup=lambda s, cg: s.attach(cg, _peered(1)),
            expect=keep,
            note="one rule, for 127.0.0.0/8: the peer lookup in a table of one",
        ),
        Variant(
            "bpf-peers-1000",
            "bpfkeep BPF, default policy with 1,000 peer rules",
            setup=lambda s, cg: s.attach(cg, _peered(1000)),
            expect=keep,
            note="999 rules for networks never reached, one for 127.0.0.0/8: each "
            "connection and accepted socket is looked up in the peer table",
        ),
        Variant(
            "bpf-enforce",
            "bpfkeep BPF, enforce mode",
            setup=lambda s, cg: s.attach(cg, _policy(mode="enforce")),
            expect=keep,
            note="default policy + cgroup/setsockopt program",
        ),
        Variant(
            "bpf-all8",
            "bpfkeep BPF, all eight options",
            setup=lambda s, cg: s.attach(cg, _policy(**ALL8)),
            expect={**ALL8, "keepalive": 1},
            note="+ syncnt 3, maxseg 1400, window_clamp 32768",
        ),
        Variant(
            "preload-shim",
            "bpfkeep LD_PRELOAD shim, defaults",
            env={"LD_PRELOAD": shim},
            expect=keep,
            note="no variables set: the shim's defaults (wraps connect() and listen())",
        ),
        Variant(
            "preload-shim-4",
            "bpfkeep LD_PRELOAD shim, libkeepalive0's four options",
            env={"LD_PRELOAD": shim, "TCP_USER_TIMEOUT": "0"},
            expect={**DEFAULT, "keepalive": 1},
            note="TCP_USER_TIMEOUT=0: the same work as libkeepalive0, which has no user timeout",
        ),
        Variant(
            "preload-shim-socket",
            "bpfkeep LD_PRELOAD shim, BPFKEEP_HOOK=socket",
            env={"LD_PRELOAD": shim, "BPFKEEP_HOOK": "socket"},
            expect=keep,
            note="the shim's other mode: options set in socket(), as libkeepalive does",
        ),
    ]
    lk = libkeepalive_path()
    if lk:
        vs.append(
            Variant(
                "libkeepalive",
                "libkeepalive0 (Debian) preloaded",
                env={"LD_PRELOAD": lk, **{k.upper(): str(v) for k, v in DEFAULT.items()}},
                expect={**DEFAULT, "keepalive": 1},
                note="KEEPIDLE=15 KEEPINTVL=15 KEEPCNT=9 (it has no user timeout)",
            )
        )
    else:
        log("libkeepalive0 is not installed (apt-get install libkeepalive0): variant skipped")
    vs.append(
        Variant(
            "app-setsockopt",
            "application calls setsockopt itself",
            args=_sets(keep),  # keepalive last, as the tools do
            expect=keep,
            note="the same five options, before connect() and listen()",
        )
    )
    if names:
        unknown = set(names) - {v.name for v in vs}
        if unknown:
            raise BenchError(f"unknown cost variant(s): {', '.join(sorted(unknown))}")
        vs = [v for v in vs if v.name in names]
    if not vs or vs[0].name != "none":
        raise BenchError("the cost bench needs the 'none' variant (the baseline)")
    return vs


# What an accepted socket inherits from its listener (or gets from the
# tool at accept): checked on the first accepted socket too.
ACCEPTED_KEYS = ("keepalive", "keepidle", "keepintvl", "keepcnt", "user_timeout")


def _check(v: Variant, out: str) -> dict[str, int]:
    """The first connection's client options, checked against what the
    variant promises (a tool that silently did nothing would look free);
    the accepted socket's keepalive options too (it lives in the same
    cgroup as its listener, so the policy covers both ends)."""
    got = {k: int(x) for k, x in parse_kv(line_starting(out, "client ")).items()}
    acc = {k: int(x) for k, x in parse_kv(line_starting(out, "accepted ")).items()}
    for key, want in v.expect.items():
        # TCP_MAXSEG reads back as the MSS in use: the value set less the
        # TCP options (timestamps: 12 bytes).
        ok = got.get(key, 0) <= want if key == "maxseg" else got.get(key) == want
        if not ok:
            raise BenchError(f"{v.name}: client socket has {key}={got.get(key)}, expected {want}")
        if key in ACCEPTED_KEYS and acc.get(key) != want:
            raise BenchError(f"{v.name}: accepted socket has {key}={acc.get(key)}, expected {want}")
    if not v.expect and (got.get("keepalive") != 0 or acc.get("keepalive") != 0):
        raise BenchError(f"{v.name}: keepalive is on although nothing should set it")
    return got


def run(
    session: Session,
    connloop: str,
    shim: str,
    *,
    rounds: int,
    conns: int,
    warmup: int,
    cpu: int | None,
    names: list[str] | None = None,
    method: str = "rst",
) -> dict:
    meth = METHODS[method]
    vs = variants(shim, names)
    cgs = {}
    for v in vs:
        cgs[v.name] = session.cgroup(f"cost-{method}-{v.name}")
        if v.setup:
            v.setup(session, cgs[v.name])
    env_base = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    times: dict[str, list[float]] = {v.name: [] for v in vs}
    wall: dict[str, list[float]] = {v.name: [] for v in vs}
    seen: dict[str, dict[str, int]] = {}
    log(f"cost ({method}): {len(vs)} variants x {rounds} rounds x {conns} connections, cpu {cpu}")
    for r in range(rounds):
        order = vs[r % len(vs) :] + vs[: r % len(vs)]
        for v in order:
            argv = [connloop, "loop", "-n", str(conns), "-w", str(warmup), *meth.args, *v.args]
            out = run_to_end(argv, cgroup=cgs[v.name], cpu=cpu, env={**env_base, **(v.env or {})})
            if v.name not in seen:
                seen[v.name] = _check(v, out)
            res = parse_kv(line_starting(out, "result "))
            times[v.name].append(float(res["cpu_ns_per_conn"]))
            wall[v.name].append(float(res["ns_per_conn"]))
        log(
            f"cost ({method}) round {r + 1}/{rounds}: "
            + " ".join(f"{v.name}={times[v.name][-1] / 1000:.1f}us" for v in vs)
        )
    inside = _inside_programs(vs, cgs, connloop, meth, conns, cpu, env_base)
    return summarize(
        vs,
        times,
        wall,
        seen,
        inside=inside,
        rounds=rounds,
        conns=conns,
        warmup=warmup,
        cpu=cpu,
        method=method,
        method_label=meth.label,
        method_note=meth.note,
    )


def _cgroup_progs(path: str) -> list[int]:
    """Ids of the BPF programs that run for sockets of this cgroup."""
    proc = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", path, "effective"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode or not proc.stdout.strip():
        return []
    return [p["id"] for p in json.loads(proc.stdout)]


def _run_stats(ids: list[int]) -> tuple[int, int]:
    """(run_time_ns, run_cnt) summed over these programs."""
    ns = cnt = 0
    for i in ids:
        proc = subprocess.run(
            ["bpftool", "-j", "prog", "show", "id", str(i)],
            capture_output=True,
            text=True,
            check=True,
        )
        p = json.loads(proc.stdout)
        ns += p.get("run_time_ns", 0)
        cnt += p.get("run_cnt", 0)
    return ns, cnt


def _inside_programs(
    vs: list[Variant],
    cgs: dict[str, str],
    connloop: str,
    meth: Method,
    conns: int,
    cpu: int | None,
    env: dict[str, str],
) -> dict[str, dict[str, float]]:
    """The time spent inside each BPF variant's programs per connection,
    from the kernel's own run-time statistics (BPF_ENABLE_STATS), in runs
    of their own after the rounds: counting costs each program run two
    clock reads, which the rounds must not pay.  No noise from the rest of
    the connection: this tells what a program adds over another to the
    tenth of a nanosecond the ratios cannot resolve.  Helpers the programs
    call (bpf_setsockopt: the kernel's work for each option, the keepalive
    timer armed) count as inside."""
    from bpfkeep.kernel import bpfsys

    progs = {v.name: _cgroup_progs(cgs[v.name]) for v in vs}
    todo = [v for v in vs if progs[v.name]]
    if not todo:
        return {}
    out: dict[str, dict[str, float]] = {}
    fd = bpfsys.enable_stats()
    try:
        for v in todo:
            per_conn, runs = [], []
            for _ in range(STAT_RUNS):
                ns0, n0 = _run_stats(progs[v.name])
                argv = [connloop, "loop", "-n", str(conns), "-w", "0", *meth.args, *v.args]
                run_to_end(argv, cgroup=cgs[v.name], cpu=cpu, env={**env, **(v.env or {})})
                ns1, n1 = _run_stats(progs[v.name])
                per_conn.append((ns1 - ns0) / conns)
                runs.append((n1 - n0) / conns)
            out[v.name] = {
                "ns_per_conn": median(per_conn),
                "runs_per_conn": median(runs),
                "samples": STAT_RUNS,
            }
    finally:
        os.close(fd)
    log("inside the programs: " + " ".join(f"{k}={x['ns_per_conn']:.0f}ns" for k, x in out.items()))
    return out


def bootstrap_ci(xs: list[float], n: int = 2000, seed: int = 5) -> tuple[float, float]:
    """95 % confidence interval of the median (percentile bootstrap, fixed
    seed: the same samples give the same interval)."""
    import random

    rng = random.Random(seed)
    meds = sorted(median(rng.choices(xs, k=len(xs))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def _ratios(t: list[float], base: list[float]) -> dict[str, float]:
    paired = [x / b for x, b in zip(t, base, strict=True)]
    lo, hi = bootstrap_ci(paired)
    return {
        "median_us": median(t) / 1000,
        "ratio": median(paired),
        "ratio_ci95": [lo, hi],
        "ratio_p25": quantile(paired, 0.25),
        "ratio_p75": quantile(paired, 0.75),
        "ratio_of_medians": median(t) / median(base),
    }


def summarize(
    vs: list[Variant],
    times: dict[str, list[float]],
    wall: dict[str, list[float]],
    seen: dict[str, dict[str, int]],
    inside: dict[str, dict[str, float]] | None = None,
    **params: object,
) -> dict:
    """Per variant: CPU time per connection (the headline: what the
    connection costs the host, unaffected by other programs taking the
    CPU away) and wall-clock time, each with ratios to "none"."""
    rows = []
    for v in vs:
        cpu = _ratios(times[v.name], times["none"])
        target = TARGETS.get(v.name)
        rows.append(
            {
                "variant": v.name,
                "label": v.label,
                "note": v.note,
                **cpu,
                "wall": _ratios(wall[v.name], wall["none"]),
                "target": target,
                "meets_target": None if target is None else cpu["ratio"] <= target,
                "cpu_ns_per_conn": times[v.name],
                "wall_ns_per_conn": wall[v.name],
                "client_options": seen.get(v.name, {}),
                "inside": (inside or {}).get(v.name),
            }
        )
    checks = {}
    # The shim against libkeepalive0, paired round by round.  "No slower"
    # means the 95 % interval of the ratio reaches down to 1: a difference
    # the run cannot tell from noise is not a loss.
    for shim in ("preload-shim", "preload-shim-4"):
        if shim in times and "libkeepalive" in times:
            r = _ratios(times[shim], times["libkeepalive"])
            checks[f"{shim}_vs_libkeepalive"] = {
                "ratio": r["ratio"],
                "ratio_ci95": r["ratio_ci95"],
                "no_slower": r["ratio_ci95"][0] <= 1.0,
            }
    # Issue 8: the new programs against the previous ones, and against the
    # application doing the work itself ("below": the interval stays under 1).
    for a, b in (("bpf-default", "prev-default"), ("bpf-default", "app-setsockopt")):
        if a in times and b in times:
            r = _ratios(times[a], times[b])
            checks[f"{a}_vs_{b}"] = {
                "ratio": r["ratio"],
                "ratio_ci95": r["ratio_ci95"],
                "below": r["ratio_ci95"][1] < 1.0,
            }
    return {"params": params, "variants": rows, "checks": checks}
