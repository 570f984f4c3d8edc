"""Time to detect a dead peer.

A client connects to a server in another network namespace; then the
server is cut off (its link goes down, the client's stays up) and the
client blocks in recv().  Measured: the time until recv() fails with
ETIMEDOUT, against the bound the policy promises:

- keepalive scenarios: keepidle + keepintvl * keepcnt after the last
  packet received (the end of the handshake: connloop times it from
  connect() returning);
- user timeout scenario: the client sends data into the void right after
  the cut; TCP_USER_TIMEOUT bounds how long it may stay unacknowledged
  (timed from the send).

Every tool and scenario runs at the same time against one server (the
waiting is the kernel's, not the CPU's), repeated with a fresh pair of
namespaces.  Target (issue 5): within bound + 0.2 s.
"""

from __future__ import annotations

import dataclasses
import os

from bench.common import (
    BenchError,
    Lines,
    Session,
    libkeepalive_path,
    log,
    median,
    parse_kv,
    spawn,
    stop,
)
from bench.netns import SERVER_IP, NetnsPair

PORT = 7000
SLACK = 0.2  # seconds over the bound allowed by the target


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    label: str
    values: dict[str, int]  # policy keys
    bound: float  # seconds
    send: int = 0  # bytes sent after the cut
    since: str = "since_connect"  # which connloop time is measured


SCENARIOS = (
    Scenario(
        "ka-2-1-3",
        "keepalive 2/1/3 (idle/intvl/cnt)",
        {"keepidle": 2, "keepintvl": 1, "keepcnt": 3},
        2 + 1 * 3,
    ),
    Scenario(
        "ka-5-1-5",
        "keepalive 5/1/5",
        {"keepidle": 5, "keepintvl": 1, "keepcnt": 5},
        5 + 1 * 5,
    ),
    Scenario(
        "uto-3000",
        "user timeout 3000 ms, data pending",
        {"user_timeout": 3000},
        3.0,
        send=1000,
        since="since_go",
    ),
)
# "app": the client sets the options itself with setsockopt -- the kernel's
# own behaviour, against which any tool's extra delay shows.
TOOLS = ("bpf", "preload", "libkeepalive", "app")


def _policy(values: dict[str, int]):
    from bpfkeep.options import Policy

    return Policy.from_mapping(values)


def _client_env(tool: str, sc: Scenario, shim: str) -> dict[str, str] | None:
    base = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if tool in ("bpf", "app"):
        return base
    if tool == "preload":
        from bpfkeep.preload import preload_env

        return preload_env(_policy(sc.values), {**base, "BPFKEEP_PRELOAD_LIB": shim})
    lk = libkeepalive_path()
    if tool == "libkeepalive" and lk and "user_timeout" not in sc.values:
        return {
            **base,
            "LD_PRELOAD": lk,
            **{k.upper(): str(v) for k, v in sc.values.items()},
        }
    return None  # this tool cannot do this scenario


def run(session: Session, connloop: str, shim: str, *, reps: int) -> dict:
    plain = session.cgroup("detect-plain")
    bpf_cg = {}
    for sc in SCENARIOS:
        bpf_cg[sc.name] = session.cgroup(f"detect-{sc.name}")
        session.attach(bpf_cg[sc.name], _policy(sc.values))
    cases = [
        (sc, tool) for sc in SCENARIOS for tool in TOOLS if _client_env(tool, sc, shim) is not None
    ]
    samples: dict[tuple[str, str], list[float]] = {(sc.name, t): [] for sc, t in cases}
    errors: dict[tuple[str, str], list[str]] = {(sc.name, t): [] for sc, t in cases}
    log(f"detect: {len(cases)} cases x {reps} repetitions")
    for rep in range(reps):
        with NetnsPair() as pair:
            server = session.track(
                spawn([connloop, "serve", SERVER_IP, str(PORT)], cgroup=plain, netns=pair.server)
            )
            Lines(server).expect("ready", timeout=10)
            clients = []
            for sc, tool in cases:
                argv = [connloop, "deadpeer", SERVER_IP, str(PORT)]
                if sc.send:
                    argv += ["--send", str(sc.send)]
                if tool == "app":
                    values = {**sc.values}
                    if "user_timeout" not in values:
                        values["keepalive"] = 1  # last: after the times
                    for k, v in values.items():
                        argv += ["--set", f"{k}={v}"]
                cg = bpf_cg[sc.name] if tool == "bpf" else plain
                env = _client_env(tool, sc, shim)
                proc = session.track(spawn(argv, cgroup=cg, netns=pair.client, env=env))
                lines = Lines(proc)
                opts = {k: int(v) for k, v in parse_kv(lines.expect("client ", 10)).items()}
                if opts.get("keepalive") != 1 and "user_timeout" not in sc.values:
                    raise BenchError(f"detect {sc.name}/{tool}: keepalive is off: {opts}")
                lines.expect("connected", 10)
                clients.append((sc, tool, proc, lines))
            pair.cut_server()
            for _, _, proc, _ in clients:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            for sc, tool, proc, lines in clients:
                try:
                    res = parse_kv(lines.expect("result ", timeout=sc.bound + 10))
                except BenchError:
                    errors[(sc.name, tool)].append("no result within bound + 10 s")
                    continue
                finally:
                    stop(proc)
                if res.get("errno") != "ETIMEDOUT":
                    errors[(sc.name, tool)].append(f"recv failed with {res.get('errno')}")
                    continue
                samples[(sc.name, tool)].append(float(res[sc.since]))
            stop(server)
        log(
            f"detect rep {rep + 1}/{reps}: "
            + " ".join(f"{s}/{t}={v[-1]:.2f}s" for (s, t), v in samples.items() if v)
        )
    rows = []
    for sc, tool in cases:
        xs = samples[(sc.name, tool)]
        worst = max(xs) if xs else None
        rows.append(
            {
                "scenario": sc.name,
                "label": sc.label,
                "tool": tool,
                "bound_s": sc.bound,
                "median_s": median(xs) if xs else None,
                "max_s": worst,
                "over_bound_s": None if worst is None else worst - sc.bound,
                "meets_target": worst is not None
                and worst <= sc.bound + SLACK
                and not errors[(sc.name, tool)],
                "samples_s": xs,
                "errors": errors[(sc.name, tool)],
            }
        )
    return {"params": {"reps": reps, "slack_s": SLACK}, "rows": rows}
