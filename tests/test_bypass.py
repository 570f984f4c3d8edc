"""Enforce mode on every path the kernel offers to set an option: the
32-bit system call and io_uring's compat ring, which run no cgroup/setsockopt
program; a buffer changed while the call runs; MPTCP sockets; another tool's
program that writes after ours.  Real sockets, set through each path by
tests/progs/sockhole.c, read back with getsockopt in the workload and ss
from outside; the daemon's repairs counted in a real scrape."""

from __future__ import annotations

import platform
import socket
import subprocess

import pytest
from conftest import PROGS

X86_64 = platform.machine() == "x86_64"
POLICY = {"keepidle": 30, "keepintvl": 5, "keepcnt": 3, "user_timeout": 45000}


@pytest.fixture(scope="session")
def sockhole(tmp_path_factory) -> str:
    """tests/progs/sockhole.c, static and not position-independent: the
    values its 32-bit calls point at must sit below 4 GiB."""
    if not X86_64:
        pytest.skip(f"the 32-bit system call is int $0x80 of x86_64; this is {platform.machine()}")
    exe = tmp_path_factory.mktemp("sockhole") / "sockhole"
    subprocess.run(
        [
            "gcc",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-static",
            "-no-pie",
            "-pthread",
            "-o",
            str(exe),
            str(PROGS / "sockhole.c"),
        ],
        check=True,
    )
    return str(exe)


def policy_args() -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in POLICY.items()] + ["--mode", "enforce"]


def within(v: dict[str, int]) -> bool:
    """The socket's values within POLICY (enforce: lower values pass)."""
    return (
        v["keepalive"] == 1
        and 0 < v["keepidle"] <= POLICY["keepidle"]
        and 0 < v["keepintvl"] <= POLICY["keepintvl"]
        and 0 < v["keepcnt"] <= POLICY["keepcnt"]
        and 0 < v["user_timeout"] <= POLICY["user_timeout"]
    )


@pytest.fixture()
def tcp_listener():
    srv = socket.create_server(("127.0.0.1", 0), backlog=128)
    yield srv.getsockname()[1]
    srv.close()


# -- the cgroup hook itself ----------------------------------------------------------


@pytest.mark.kernel
@pytest.mark.parametrize(("option", "good", "bad"), [("keepalive", 1, 0), ("keepidle", 10, 30000)])
def test_a_buffer_changed_during_the_call_cannot_pass_the_hook(
    bk, cgroups, spawn, sockhole, tcp_listener, option, good, bad
):
    """Above a page the hook sees a copy of the buffer's first page; had
    it let the kernel read the application's buffer again, a second thread
    flipping the value between the two reads would set what the hook
    never saw (it did: within a few thousand calls)."""
    cg = cgroups.make("app")
    bk("attach", "--cgroup", cgroups.rel(cg), *policy_args())
    race = ["race", f"{option}={good}/{bad}", "100000"]
    p = spawn([sockhole, "connect", "127.0.0.1", str(tcp_listener), *race], cgroup=cg)
    line = p.expect("race ", timeout=120)
    assert "won=0 calls=100000" in line, line
    assert within(p.values("client"))
