"""The largest values the option table accepts reach the kernel intact."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.kernel

INT_MAX = 2**31 - 1


def test_largest_keepalive_times_derive_a_user_timeout_the_kernel_takes(bk, cgroups, spawn, probes):
    """(32767 + 32767 * 127) * 1000 ms does not fit TCP_USER_TIMEOUT's int:
    uncapped, bpf_setsockopt was refused on every socket (EINVAL) and the
    socket kept no user timeout.  Capped at INT_MAX, the kernel takes it."""
    cg = cgroups.make("svc")
    bk(
        "attach",
        "--cgroup",
        cgroups.rel(cg),
        "--keepidle",
        "32767",
        "--keepintvl",
        "32767",
        "--keepcnt",
        "127",
    )
    (att,) = json.loads(bk("status", "--json").stdout)
    assert att["policy"]["user_timeout"] == INT_MAX
    srv = spawn([probes["dynamic"], "listen", "127.0.0.1", "0", "hold"])
    port = srv.expect("ready").split()[1]
    cli = spawn([probes["static"], "connect", "127.0.0.1", port, "hold"], cgroup=cg)
    v = cli.values("client")
    assert (v["keepidle"], v["keepintvl"], v["keepcnt"]) == (32767, 32767, 127)
    assert v["user_timeout"] == INT_MAX
    (att,) = json.loads(bk("status", "--json").stdout)
    assert att["counters"]["failed"] == {}
