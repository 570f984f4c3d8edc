"""The dead-peer formula -- keepidle + keepintvl x keepcnt, and the user
timeout derived from it -- lives once in Python (bpfkeep.options) and
once in each C side: the BPF programs (bk_derived_ut, when a program sets
its own times under a derived policy) and the preload shim
(derive_user_timeout).  Checked here on a grid of values through the
kernel: the TCP_USER_TIMEOUT each socket ends with, read back with
getsockopt inside the workload.

Times of 0 are left out on purpose: Python and the BPF programs then leave
the user timeout at 0 (the kernel counts probes with its sysctls), while
the shim, like libkeepalive, derives it from the kernel's value on the
socket -- different numbers for the same moment of giving up.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BPFKEEP

from bpfkeep.options import Policy, dead_peer_bound, dead_peer_seconds, default_user_timeout

PROBE = str(Path(__file__).resolve().parent / "preload_helpers" / "probe.py")
PYTHON = "/usr/bin/python3"  # dynamically linked: the shim applies

# (keepidle, keepintvl, keepcnt): small, libkeepalive's and the kernel's
# defaults, and around the INT_MAX cap of TCP_USER_TIMEOUT ((32767 +
# 16651 x 127) x 1000 = 2,147,444,000 fits; 16652 does not).
GRID = [
    (1, 1, 1),
    (2, 1, 3),
    (60, 10, 6),
    (15, 15, 9),
    (7200, 75, 9),
    (32767, 1, 1),
    (32767, 16651, 127),
    (32767, 16652, 127),
    (1, 32767, 127),
    (32767, 32767, 127),
]


def test_the_formula():
    assert dead_peer_seconds(7200, 75, 9) == 7875
    assert default_user_timeout(2, 1, 3) == 5000
    assert default_user_timeout(32767, 16651, 127) == 2_147_444_000
    assert default_user_timeout(32767, 16652, 127) == 2**31 - 1
    assert default_user_timeout(60, 10, 0) == 0  # the kernel counts the probes
    host = (7100, 70, 8)
    assert dead_peer_bound(Policy(keepidle=60, keepintvl=10, keepcnt=0), host) == 60 + 10 * 8
    assert dead_peer_bound(Policy(keepidle=0), host) == 7100 + 15 * 9
    assert dead_peer_bound(Policy(keepidle=0, keepintvl=0, keepcnt=0), host) == 7100 + 70 * 8
    assert dead_peer_bound(Policy(keepidle=2, keepintvl=1, keepcnt=3), host) == 5


@pytest.fixture()
def listener() -> Iterator[int]:
    """A loopback listener that never accepts: the backlog holds the
    connections (each workload reads its own socket)."""
    with socket.create_server(("127.0.0.1", 0), backlog=128) as s:
        yield s.getsockname()[1]


@pytest.mark.kernel
def test_bpf_derivation_agrees_through_the_kernel(bk, cgroups, spawn, probes, listener):
    """Under a policy with a derived user timeout, a program that sets its
    own times gets the user timeout the BPF program derives from them; a
    policy with the same times gets the one Python derives."""
    cg = cgroups.make("app")
    bk("attach", "--cgroup", cgroups.rel(cg))  # defaults: the user timeout is derived
    for idle, intvl, cnt in GRID:
        own = [f"keepidle={idle}", f"keepintvl={intvl}", f"keepcnt={cnt}"]
        cli = spawn(
            [probes["static"], "connect", "127.0.0.1", str(listener), *_sets(own), "hold"],
            cgroup=cg,
        )
        v = cli.values("client-after")
        assert (v["keepidle"], v["keepintvl"], v["keepcnt"]) == (idle, intvl, cnt)
        assert v["user_timeout"] == default_user_timeout(idle, intvl, cnt), (idle, intvl, cnt)
        cli.close()
    for idle, intvl, cnt in GRID[::3]:
        times = ["--keepidle", str(idle), "--keepintvl", str(intvl), "--keepcnt", str(cnt)]
        bk("attach", "--cgroup", cgroups.rel(cg), *times)
        cli = spawn([probes["static"], "connect", "127.0.0.1", str(listener), "hold"], cgroup=cg)
        v = cli.values("client")
        assert v["user_timeout"] == default_user_timeout(idle, intvl, cnt), (idle, intvl, cnt)
        cli.close()


def _sets(assignments: list[str]) -> list[str]:
    return [w for a in assignments for w in ("set", a)]


def test_shim_derivation_agrees_through_the_kernel(listener):
    """The installed shim, given the three times, leaves the user timeout
    Python derives on the socket."""
    lib = subprocess.run([BPFKEEP, "preload-path"], capture_output=True, text=True, check=True)
    for idle, intvl, cnt in GRID:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LD_PRELOAD": lib.stdout.strip(),
            "TCP_KEEPIDLE": str(idle),
            "TCP_KEEPINTVL": str(intvl),
            "TCP_KEEPCNT": str(cnt),
        }
        out = subprocess.run(
            [PYTHON, PROBE, "client", "127.0.0.1", str(listener)],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        got = json.loads(out.splitlines()[0])
        assert (got["keepidle"], got["keepintvl"], got["keepcnt"]) == (idle, intvl, cnt)
        assert got["user_timeout"] == default_user_timeout(idle, intvl, cnt), (idle, intvl, cnt)
