"""TCP_SYNCNT and TCP_USER_TIMEOUT together on a handshake to a blackholed
peer (issue 10): which one decides when connect() gives up.

The numbers in docs/how-it-works.md and in --help of --syncnt / --user-timeout come
from this test.  The SYN count is read from the client namespace's own
counters (TCPSynRetrans); the time is printed, never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.kernel

CLIENT = """
import errno, socket, sys, time
s = socket.socket()
t = time.monotonic()
e = s.connect_ex((sys.argv[1], 9))
print("result", errno.errorcode.get(e, e), round(time.monotonic() - t, 2))
"""


def _syns_sent(ns: str) -> int:
    """SYNs the namespace has sent: one per connect() plus TCPSynRetrans."""
    lines = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", "/proc/net/netstat"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    header, values = lines[0].split(), lines[1].split()
    return 1 + int(dict(zip(header, values, strict=True))["TCPSynRetrans"])


@pytest.mark.parametrize(
    ("flags", "syns"),
    [
        # The derived user timeout (150 s) replaces the time bound syncnt
        # implies; the count bound (syncnt + net.ipv4.tcp_syn_linear_timeouts
        # retransmits, 2 + 4) ends it: ~11 s, 7 SYNs on Linux 6.18.
        ((), 7),
        # No user timeout: the time bound syncnt 2 implies ends it first:
        # ~7 s, 6 SYNs.
        (("--user-timeout", "0"), 6),
        # A user timeout shorter than both: ~3 s, 3 SYNs.
        (("--user-timeout", "3000"), 3),
    ],
)
def test_syncnt_and_user_timeout_on_a_blackholed_handshake(bk, cgroups, netns_pair, flags, syns):
    try:
        with open("/proc/sys/net/ipv4/tcp_syn_linear_timeouts") as f:
            linear = int(f.read())
    except FileNotFoundError:
        # Before Linux 6.10 SYN retransmissions back off exponentially
        # from the first: other counts and times.
        pytest.skip("kernel without net.ipv4.tcp_syn_linear_timeouts (6.10+): counts differ")
    if linear != 4:
        pytest.skip("counts below assume net.ipv4.tcp_syn_linear_timeouts = 4")
    cg = cgroups.make("client")
    bk("attach", "--cgroup", cgroups.rel(cg), "--syncnt", "2", *flags)
    # The server's address stays resolved (a permanent neighbour entry), so
    # the SYNs leave and are lost instead of failing on ARP.
    link = subprocess.run(
        ["ip", "-n", netns_pair.server, "-j", "link", "show", netns_pair.server_if],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    subprocess.run(
        ["ip", "-n", netns_pair.client, "neigh", "replace", netns_pair.server_ip,
         "lladdr", json.loads(link)[0]["address"], "dev", netns_pair.client_if,
         "nud", "permanent"],
        check=True,
    )  # fmt: skip
    netns_pair.cut_server()

    def join() -> None:
        with open(f"{cg}/cgroup.procs", "w") as f:
            f.write("0")

    out = subprocess.run(
        ["ip", "netns", "exec", netns_pair.client, sys.executable, "-c", CLIENT,
         netns_pair.server_ip],
        capture_output=True, text=True, timeout=120, preexec_fn=join,
    )  # fmt: skip
    assert out.stdout.startswith("result ETIMEDOUT "), out.stdout + out.stderr
    print(f"--syncnt 2 {' '.join(flags)}: gave up after {out.stdout.split()[2]} s, "
          f"{_syns_sent(netns_pair.client)} SYNs")  # fmt: skip
    assert _syns_sent(netns_pair.client) == syns
