"""Peer rules and lost connections on real paths: network namespaces make
a client, NAT routers that forget idle flows (tests/support/paths.py) and
servers behind them.  Everything is read back through the kernel --
getsockopt inside the workload (sockprobe), ``ss`` from outside in the
workload's namespace, and the daemon's /metrics over real HTTP -- never
through bpfkeep's own code.

The addresses: the client is 10.8i.0.1 towards router i, which reaches
its servers 10.9i.0.2, 10.9i.0.3, ... from 10.9i.0.1 (what the servers see
of the client: the router masquerades).  Each server namespace runs an
echo server on ECHO_PORT.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import bpfkeep_cmd, host_keepalive
from prometheus_client.parser import text_string_to_metric_families
from support.paths import DROP, RESET, Paths

pytestmark = pytest.mark.kernel

ECHO_PORT = 7000
# An echo server for every connection (a thread each), in a server namespace.
ECHO = """
import socket, sys, threading
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])), backlog=64)
print("listening", flush=True)
def serve(c):
    with c:
        try:
            while d := c.recv(65536):
                c.sendall(d)
        except OSError:
            pass
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""


# -- the network ---------------------------------------------------------------------


@pytest.fixture()
def paths() -> Iterator[Callable[..., Paths]]:
    """Paths with an echo server in each server namespace; namespaces and
    the processes in them removed at the end, also when the test fails."""
    made: list[Paths] = []
    servers: list[subprocess.Popen] = []

    def make(routers: list[tuple[int | None, str]], servers_each: int = 2) -> Paths:
        p = Paths(routers, servers=servers_each)
        made.append(p)
        for r in p.routers:
            srv = subprocess.Popen(
                ["ip", "netns", "exec", r.server_ns, sys.executable, "-c", ECHO, str(ECHO_PORT)],
                stdout=subprocess.PIPE,
                text=True,
            )
            servers.append(srv)
            assert srv.stdout and srv.stdout.readline().strip() == "listening"
        return p

    try:
        yield make
    finally:
        for p in made:
            p.cleanup()
        for srv in servers:
            srv.kill()
            srv.wait()


def connect(spawn, probes, cgroup: str | None, netns: str, addr: str, *extra: str):
    """sockprobe connected to ``addr``:ECHO_PORT, holding its socket."""
    return spawn(
        [probes["static"], "connect", addr, str(ECHO_PORT), *extra, "hold"],
        cgroup=cgroup,
        netns=netns,
    )


def waiter(spawn, probes, cgroup: str, netns: str, addr: str, *extra: str):
    """sockprobe connected to ``addr``:ECHO_PORT that, on a line, (sends
    what ``extra`` says and) blocks in recv; returns (probe, when it was
    connected)."""
    w = spawn([probes["static"], "wait", addr, str(ECHO_PORT), *extra], cgroup=cgroup, netns=netns)
    w.expect("ready")
    return w, time.monotonic()


def recv_result(w, timeout: float = 15) -> dict[str, str]:
    """sockprobe wait's last line: rc, errno, elapsed (s), segs."""
    ln = w.expect("recv ", timeout)
    return dict(f.split("=", 1) for f in re.findall(r"\w+=(?:[^=]+(?= \w+=)|\S+)", ln))


def times(v: dict[str, int]) -> tuple[int, int, int, int, int]:
    return v["keepalive"], v["keepidle"], v["keepintvl"], v["keepcnt"], v["user_timeout"]


def ss_seconds(text: str) -> float:
    """ss's timer durations: '3min19sec', '12sec', '992ms', '6.992ms'
    (6 s 992 ms)."""
    m = re.fullmatch(r"(?:(\d+)min)?(?:(\d+)(?:sec|\.))?(?:(\d+)ms)?", text)
    assert m and any(m.groups()), text
    minutes, secs, ms = (int(g or 0) for g in m.groups())
    return minutes * 60 + secs + ms / 1000


def ss_keepalive(netns: str, local_port: int | None = None, peer: str | None = None):
    """{(local, peer): seconds left on the keepalive timer, None without
    one} for the established TCP sockets of ``netns`` (with this local
    port, to this peer address), as ``ss -tno`` reads them."""
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "ss", "-tnoH", "state", "established"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found: dict[tuple[str, str], float | None] = {}
    for ln in out.splitlines():
        ends = re.findall(r"(\S+):(\d+)\s", ln + " ")
        if len(ends) < 2:
            continue
        (laddr, lport), (paddr, pport) = ends[:2]
        if local_port is not None and int(lport) != local_port:
            continue
        if peer is not None and paddr != peer:
            continue
        m = re.search(r"timer:\((\w+),([^,]+),", ln)
        left = ss_seconds(m.group(2)) if m and m.group(1) == "keepalive" else None
        found[(f"{laddr}:{lport}", f"{paddr}:{pport}")] = left
    return found


def armed_at(left: float | None, keepidle: int) -> bool:
    """A keepalive timer armed a moment ago with ``keepidle`` (ss shows
    whole minutes only from 10 min on)."""
    slack = 60 if keepidle >= 600 else 10
    return left is not None and keepidle - slack < left <= keepidle


def keepalive_left(netns: str, peer: str, local_port: int | None = None) -> float | None:
    """The keepalive timer of the one established socket to ``peer``."""
    found = ss_keepalive(netns, local_port, peer)
    assert len(found) == 1, found
    return next(iter(found.values()))


def netstat(netns: str, name: str) -> int:
    """A TcpExt counter of a network namespace (/proc/net/netstat)."""
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "cat", "/proc/net/netstat"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for head, values in zip(out[::2], out[1::2], strict=True):
        if head.startswith("TcpExt:"):
            return int(dict(zip(head.split(), values.split(), strict=True))[name])
    raise AssertionError(f"no TcpExt {name} in /proc/net/netstat")


# -- the daemon --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return f'"{v}"' if isinstance(v, str) else str(v)


def config(port: int, cgroup_rel: str, policy: dict, peers: list[dict], **daemon) -> str:
    """A daemon config: metrics on ``port``, one policy with peer rules."""
    lines = [f'[metrics]\nlisten = "127.0.0.1:{port}"', "[daemon]", "audit_interval = 0"]
    lines += [f"{k} = {toml_value(v)}" for k, v in daemon.items()]
    lines += ["[[policy]]", f'cgroup = "{cgroup_rel}"']
    lines += [f"{k} = {toml_value(v)}" for k, v in policy.items()]
    for peer in peers:
        lines += ["[[policy.peer]]", *(f"{k} = {toml_value(v)}" for k, v in peer.items())]
    return "\n".join(lines) + "\n"


class Daemon:
    """``bpfkeep daemon`` as a real process (optionally under a wrapper,
    e.g. unshare), its log in a file, READY=1 awaited on a notify socket,
    /metrics scraped over HTTP."""

    def __init__(self, pin_dir: str, tmp: Path, text: str, wrapper: tuple[str, ...] = ()):
        self.port = int(re.search(r"127\.0\.0\.1:(\d+)", text).group(1))  # type: ignore[union-attr]
        self.config = tmp / "bpfkeep.toml"
        self.config.write_text(text)
        self.log = tmp / "daemon.log"
        notify_path = str(tmp / "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(notify_path)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [*wrapper, *bpfkeep_cmd(pin_dir, "daemon", "--config", str(self.config))],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, "NOTIFY_SOCKET": notify_path},
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            self.notify.settimeout(0.2)
            with contextlib.suppress(TimeoutError):
                if b"READY=1" in self.notify.recv(4096):
                    return
        raise AssertionError(f"the daemon never got ready; log:\n{self.log.read_text()}")

    def scrape(self) -> dict[tuple[str, frozenset], float]:
        url = f"http://127.0.0.1:{self.port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.notify.close()


@pytest.fixture()
def daemon(pin_dir, tmp_path) -> Iterator[Callable[..., Daemon]]:
    made: list[Daemon] = []

    def start(text: str, wrapper: tuple[str, ...] = ()) -> Daemon:
        d = tmp_path / f"daemon{len(made)}"
        d.mkdir()
        made.append(Daemon(pin_dir, d, text, wrapper))
        return made[-1]

    try:
        yield start
    finally:
        for dm in made:
            dm.close()


def metric(m: dict, name: str, **labels: str) -> float | None:
    return m.get((name, frozenset(labels.items())))


def wait_for(pred: Callable[[], object], timeout: float, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(step)


# -- 1. per-peer values on both ends ---------------------------------------------------


def test_each_peer_gets_its_rules_values_on_both_ends(bk, cgroups, spawn, probes, paths):
    """A policy with two peer rules for servers behind two routers: each
    connection gets its rule's values, one to a peer no rule names the
    policy's own; an accepted socket gets the rule of the client's address
    as the server sees it (the router's: it masquerades)."""
    p = paths([(None, DROP), (None, DROP)])
    r1, r2 = p.routers
    cli_cg = cgroups.make("client")
    bk(
        "attach", "--cgroup", cli_cg, "--keepidle", "100", "--keepintvl", "11", "--keepcnt", "5",
        "--peer", f"{r1.network},keepidle=200,keepintvl=12,keepcnt=3,user_timeout=7000",
        "--peer", f"{r2.server(0)},keepidle=300,keepcnt=4",
    )  # fmt: skip
    expected = {
        r1.server(0): (1, 200, 12, 3, 7000),
        # keys the rule does not give come from the policy; the user
        # timeout, derived, follows the rule's own times
        r2.server(0): (1, 300, 11, 4, (300 + 11 * 4) * 1000),
        r2.server(1): (1, 100, 11, 5, (100 + 11 * 5) * 1000),  # no rule: the policy's own
    }
    for addr, want in expected.items():
        got = connect(spawn, probes, cli_cg, p.client, addr).values("client")
        assert times(got) == want, addr
        left = keepalive_left(p.client, addr)
        assert armed_at(left, want[1]), (addr, left)

    # The server side: a listener under a per-peer policy in a server
    # namespace.  Router 1's clients arrive from 10.91.0.1; a rule for the
    # client's own network must not match (the server never sees it).
    srv_cg = cgroups.make("server")
    bk(
        "attach", "--cgroup", srv_cg, "--keepidle", "100",
        "--peer", f"{r1.server_side},keepidle=222,keepintvl=7,keepcnt=2,user_timeout=9000",
        "--peer", "10.81.0.0/24,keepidle=333",
    )  # fmt: skip
    port = ECHO_PORT + 1
    cases = [
        (r1, (1, 222, 7, 2, 9000)),
        (r2, (1, 100, 15, 9, (100 + 15 * 9) * 1000)),  # 10.92.0.1: no rule
    ]
    for r, want in cases:
        srv = spawn(
            [probes["static"], "listen", "0.0.0.0", str(port), "hold"],
            cgroup=srv_cg,
            netns=r.server_ns,
        )
        srv.expect("ready")
        spawn([probes["static"], "connect", r.server(0), str(port), "hold"], netns=p.client).expect(
            "ready"
        )
        assert times(srv.values("accepted")) == want, r.server_side
        left = keepalive_left(r.server_ns, r.server_side, local_port=port)
        assert armed_at(left, want[1]), left
        # The listener carries the policy's own values: an accepted socket
        # needs only what its peer's rule changes.
        assert times(srv.values("listener")) == (1, 100, 15, 9, (100 + 15 * 9) * 1000)

    # With a rule that exempts some peers, the listener stays as the
    # program made it (an exempt peer's accepted socket could not be taken
    # back from the policy's values): each accepted socket gets its own.
    bare_cg = cgroups.make("server-bare")
    bk(
        "attach", "--cgroup", bare_cg, "--keepidle", "100",
        "--peer", f"{r1.server_side},keepidle=222",
        "--peer", f"{r2.server_side},exempt",
    )  # fmt: skip
    host = host_keepalive(r1.server_ns)
    for r, want in [(r1, (1, 222, 15, 9, (222 + 15 * 9) * 1000)), (r2, (0, *host, 0))]:
        srv = spawn(
            [probes["static"], "listen", "0.0.0.0", str(port + 1), "hold"],
            cgroup=bare_cg,
            netns=r.server_ns,
        )
        srv.expect("ready")
        assert times(srv.values("listener")) == (0, *host, 0)
        spawn(
            [probes["static"], "connect", r.server(0), str(port + 1), "hold"], netns=p.client
        ).expect("ready")
        assert times(srv.values("accepted")) == want, r.server_side


# -- 2. an exempt peer ------------------------------------------------------------------


def test_an_exempt_peer_is_left_as_the_program_made_it(daemon, cgroups, spawn, probes, paths):
    """In enforce mode, with a peer rule that exempts router 1's servers:
    their connections keep what the program made (nothing: keepalive off;
    its own setsockopt: not capped), another peer's get the rule's values
    and its setsockopt capped; the exempt sockets are counted apart."""
    p = paths([(None, DROP), (None, DROP)])
    r1, r2 = p.routers
    cg = cgroups.make("app")
    d = daemon(
        config(
            free_port(),
            cgroups.rel(cg),
            {"mode": "enforce", "keepidle": 100},
            [{"address": r1.network, "exempt": True}, {"address": r2.network, "keepidle": 300}],
        )
    )
    host = host_keepalive(p.client)

    untouched = connect(spawn, probes, cg, p.client, r1.server(0)).values("client")
    assert times(untouched) == (0, *host, 0)
    assert keepalive_left(p.client, r1.server(0)) is None  # no keepalive timer
    # The program's own values on an exempt connection are not capped.
    own = connect(
        spawn, probes, cg, p.client, r1.server(1), "set", "keepalive=1", "set", "keepidle=5000"
    ).values("client-after")
    assert times(own)[:2] == (1, 5000)
    left = keepalive_left(p.client, r1.server(1))
    assert armed_at(left, 5000), left
    # Another peer: the rule's values, and the same setsockopt capped.
    other = connect(
        spawn, probes, cg, p.client, r2.server(0), "set", "keepalive=0", "set", "keepidle=5000"
    )
    assert times(other.values("client"))[:2] == (1, 300)
    assert times(other.values("client-after"))[:2] == (1, 300)
    left = keepalive_left(p.client, r2.server(0))
    assert armed_at(left, 300), left

    m = d.scrape()
    label = "/" + cgroups.rel(cg)
    assert metric(m, "bpfkeep_sockets_exempt_total", cgroup=label) == 2
    assert metric(m, "bpfkeep_sockets_total", cgroup=label, callback="connect") == 1
    assert metric(m, "bpfkeep_setsockopt_rewritten_total", cgroup=label, option="keepidle") == 1


# -- 3. a host-name rule ----------------------------------------------------------------

NAME = "db.bkpaths.test"


def private_hosts(hosts: Path) -> tuple[str, ...]:
    """A wrapper that runs a command in a mount namespace of its own with
    ``hosts`` bind-mounted on /etc/hosts (the host's file is never
    touched; the bind follows the file: rewrite it in place)."""
    script = 'mount --bind "$1" /etc/hosts && shift && exec "$@"'
    return ("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(hosts))


def test_a_host_name_rule_follows_its_address(daemon, cgroups, spawn, probes, paths, tmp_path):
    """A rule names a host; the daemon resolves it (getaddrinfo: its
    private /etc/hosts) every resolve_interval.  When the name moves from
    server A to server B, new connections to B get the rule's values, new
    ones to A the policy's own, and the open connection to A is brought to
    the policy's own too."""
    p = paths([(None, DROP), (None, DROP)], servers_each=1)
    a, b = p.routers[0].server(0), p.routers[1].server(0)
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{a} {NAME}\n")
    cg = cgroups.make("app")
    text = config(
        free_port(),
        cgroups.rel(cg),
        {"keepidle": 100},
        [{"address": NAME, "keepidle": 200}],
        resolve_interval=1,
    )
    d = daemon(text, wrapper=private_hosts(hosts))

    held = connect(spawn, probes, cg, p.client, a)
    assert times(held.values("client"))[:2] == (1, 200)
    assert armed_at(keepalive_left(p.client, a), 200)
    assert times(connect(spawn, probes, cg, p.client, b).values("client"))[:2] == (1, 100)

    with open(hosts, "r+") as f:  # in place: the daemon's bind mount is of this inode
        f.write(f"127.0.0.1 localhost\n{b} {NAME}\n")
        f.truncate()

    def b_gets_the_rule() -> bool:
        cli = connect(spawn, probes, cg, p.client, b)
        keepidle = cli.values("client")["keepidle"]
        cli.close()
        return keepidle == 200

    assert wait_for(b_gets_the_rule, timeout=10, step=0.5), d.log.read_text()
    new_a = connect(spawn, probes, cg, p.client, a)
    assert times(new_a.values("client"))[:2] == (1, 100)
    new_a.close()

    def held_swept() -> bool:
        held.send_line()
        return held.values("now-client", consume=True)["keepidle"] == 100

    assert wait_for(held_swept, timeout=5), d.log.read_text()
    left = keepalive_left(p.client, a)  # re-armed by the new keepidle
    assert left is not None and left <= 100, left


# -- 4. kept alive across a router's idle limit ------------------------------------------

IDLE_LIMIT = 3  # s: how long the routers below remember an idle flow


def test_a_peer_rule_keeps_a_connection_alive_across_the_routers_idle_limit(
    bk, cgroups, spawn, probes, paths
):
    """A router forgets flows idle IDLE_LIMIT s and drops what it no longer
    knows.  Two connections of one client through it sit idle three times
    that, then send: the one whose peer rule probes every second is
    answered; the one with the policy's own values (keepidle far above the
    limit) is not, and fails at its user timeout."""
    p = paths([(IDLE_LIMIT, DROP)])
    (r,) = p.routers
    cg = cgroups.make("app")
    bk(
        "attach", "--cgroup", cg, "--keepidle", "100", "--user-timeout", "1500",
        "--peer", f"{r.server(0)},keepidle=1,keepintvl=1,keepcnt=3",
    )  # fmt: skip
    kept, _ = waiter(spawn, probes, cg, p.client, r.server(0), "send", "5")
    lost, _ = waiter(spawn, probes, cg, p.client, r.server(1), "send", "5")
    assert times(kept.values("client")) == (1, 1, 1, 3, 1500)
    assert times(lost.values("client")) == (1, 100, 15, 9, 1500)

    time.sleep(3 * IDLE_LIMIT)
    kept.send_line()
    lost.send_line()
    assert recv_result(kept)["rc"] == "5"  # the echo: the router still knew the flow
    got = recv_result(lost)
    assert (got["rc"], got["errno"]) == ("-1", "ETIMEDOUT"), got
    assert 1.4 < float(got["elapsed"]) < 3, got  # its user timeout, 1.5 s


# -- 5. lost connections, by reason and idle time ---------------------------------------


def idle_histogram(m: dict, cgroup: str, peer: str) -> tuple[dict[float, float], float, float]:
    """({le: cumulative count}, count, sum) of bpfkeep_idle_before_loss_seconds."""
    name = "bpfkeep_idle_before_loss_seconds"
    buckets = {}
    for (n, labels), v in m.items():
        lab = dict(labels)
        if n == name + "_bucket" and lab.get("cgroup") == cgroup and lab.get("peer") == peer:
            buckets[float(lab["le"])] = v
    count = metric(m, name + "_count", cgroup=cgroup, peer=peer)
    total = metric(m, name + "_sum", cgroup=cgroup, peer=peer)
    return buckets, count or 0, total or 0


def test_each_reason_of_a_lost_connection_is_counted_with_its_idle_time(
    daemon, cgroups, spawn, probes, paths
):
    """Each reason of bpfkeep_connections_lost_total, produced on a real
    path under its own peer rule and read from a real scrape, with the
    time the connection sat idle in bpfkeep_idle_before_loss_seconds'
    bucket for it; connections the program closed itself (a FIN, a reset
    of its own) or the administrator killed (ss -K) are not losses.

    Router 1 forgets idle flows after IDLE_LIMIT s and answers what it
    forgot with a RST; router 2's servers vanish (their link cut) early on.
    """
    p = paths([(IDLE_LIMIT, RESET), (None, DROP)], servers_each=3)
    r1, r2 = p.routers
    # The kernel's own retry limit, low: ~1.4 s of retransmits (RTO 200 ms).
    p.exec(p.client, "sysctl", "-qw", "net.ipv4.tcp_retries2=2")
    cg = cgroups.make("app")
    rules = {
        "reset": {"address": r1.server(0)},
        "keepalive": {"address": r2.server(0), "keepidle": 1, "keepintvl": 1, "keepcnt": 2},
        "user_timeout": {"address": r2.server(1), "user_timeout": 1500},
        "retransmits": {"address": r2.server(2), "user_timeout": 0},  # 0: the kernel's
    }
    d = daemon(config(free_port(), cgroups.rel(cg), {"keepidle": 100}, list(rules.values())))
    label = "/" + cgroups.rel(cg)
    aborts = netstat(p.client, "TCPAbortOnData")

    # Closed by the program, and one killed by the administrator (ss -K):
    # under the policy's own values (peer "*").
    closed = [
        connect(spawn, probes, cg, p.client, r1.server(1)),
        connect(spawn, probes, cg, p.client, r1.server(1), "abort"),
    ]
    for c in closed:
        c.expect("ready")
    killed, _ = waiter(spawn, probes, cg, p.client, r1.server(2))
    # Each connection's schedule counts from its own connect(); the
    # keepalive one is made last, and its peer vanishes before its first
    # probe.
    w, since = {}, {}
    for reason in ("reset", "user_timeout", "retransmits", "keepalive"):
        extra = () if reason == "keepalive" else ("send", "5")
        w[reason], since[reason] = waiter(
            spawn, probes, cg, p.client, rules[reason]["address"], *extra
        )
    v = {reason: times(w[reason].values("client")) for reason in rules}
    assert v["keepalive"][1:4] == (1, 1, 2)
    assert v["user_timeout"][4] == 1500
    assert v["retransmits"][4] == 0  # the retry limit, not a user timeout, ends it

    went: dict[str, float] = {}

    def go(reason: str, after_idle: float) -> None:
        time.sleep(max(0.0, since[reason] + after_idle - time.monotonic()))
        w[reason].send_line()
        went[reason] = time.monotonic()

    go("keepalive", 0)  # blocks in recv, idle: its probes go unanswered after the cut
    time.sleep(max(0.0, since["keepalive"] + 0.5 - time.monotonic()))
    p.cut(r2)
    cut_at = time.monotonic()
    for c in closed:
        c.close()
    killed.send_line()  # blocks in recv
    p.exec(p.client, "ss", "-K", "dst", r1.server(2))
    assert recv_result(killed)["errno"] == "Software caused connection abort"
    go("user_timeout", 2.5)  # data into the vanished peer
    go("retransmits", 2.5)
    go("reset", 2 * IDLE_LIMIT + 0.5)  # router 1 forgot the flow: a RST
    assert min(went["user_timeout"], went["retransmits"]) > cut_at, "too slow to tell"
    idle, errnos = {}, {}
    for reason in rules:
        got = recv_result(w[reason])
        assert got["rc"] == "-1", (reason, got)
        lost_at = went[reason] + (float(got["elapsed"]) if reason == "keepalive" else 0)
        idle[reason], errnos[reason] = lost_at - since[reason], got["errno"]
    assert "reset" in errnos["reset"], errnos
    print("idle before loss:", {k: round(i, 2) for k, i in idle.items()})

    def lost(m: dict, peer: str, reason: str) -> float | None:
        return metric(m, "bpfkeep_connections_lost_total", cgroup=label, peer=peer, reason=reason)

    def scraped() -> dict | None:
        m = d.scrape()
        return m if all(lost(m, r["address"], reason) for reason, r in rules.items()) else None

    m = wait_for(scraped, timeout=5) or d.scrape()
    for reason, rule in rules.items():
        peer = rule["address"]
        counted = {r: lost(m, peer, r) for r in rules}
        assert counted == {r: (1 if r == reason else 0) for r in rules}, (peer, counted)
        buckets, count, total = idle_histogram(m, label, peer)
        bounds = sorted(b for b in buckets if b != float("inf"))
        assert {60, 240, 350, 600, 1200, 3600, 7200} <= set(bounds)
        assert all(abs(idle[reason] - b) > 0.5 for b in bounds), "too close to a bound to tell"
        le = min(b for b in bounds if b >= idle[reason])
        below = max((b for b in bounds if b < le), default=None)
        assert buckets[le] == 1 and (below is None or buckets[below] == 0), (reason, buckets)
        assert count == 1
        assert abs(total - idle[reason]) < 0.5, (reason, total, idle[reason])

    # No loss: the program's own closes, a FIN and an abortive close (a
    # reset sent), and the connection the administrator killed (nothing
    # on the path ended it).
    assert netstat(p.client, "TCPAbortOnData") == aborts + 1
    own = {r: lost(m, "*", r) for r in rules}
    assert set(own.values()) <= {None, 0}, own
    assert idle_histogram(m, label, "*")[1] == 0


CLOSER = """
import socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.close()  # a FIN at once: the peer is done with the connection
"""


def tcp_mib(netns: str, name: str) -> int:
    """A Tcp counter of a network namespace (/proc/net/snmp)."""
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "cat", "/proc/net/snmp"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    head, values = [ln.split() for ln in out if ln.startswith("Tcp:")][:2]
    return int(dict(zip(head, values, strict=True))[name])


def test_data_after_the_peer_closed_is_no_loss(daemon, cgroups, spawn, probes, paths):
    """The peer closes (FIN) and the program writes anyway: the peer answers
    with a RST, which the kernel reports as EPIPE -- the peer's choice, not
    the path's: no loss, and nothing for keepidle = "auto" to learn."""
    p = paths([(None, DROP)], servers_each=1)
    (r,) = p.routers
    closer = spawn(
        [sys.executable, "-c", CLOSER, r.server(0), str(ECHO_PORT + 2)], netns=r.server_ns
    )
    closer.expect("listening")
    cg = cgroups.make("app")
    d = daemon(config(free_port(), cgroups.rel(cg), {"keepidle": "auto"}, []))
    resets = tcp_mib(p.client, "EstabResets")
    w = spawn(
        [probes["static"], "wait", r.server(0), str(ECHO_PORT + 2), "send", "5"],
        cgroup=cg,
        netns=p.client,
    )
    w.expect("ready")
    time.sleep(0.5)  # the peer's FIN arrives: CLOSE_WAIT
    w.send_line()
    recv_result(w)
    # The RST came (a connection in CLOSE_WAIT reset) ...
    assert wait_for(lambda: tcp_mib(p.client, "EstabResets") > resets, timeout=5)
    time.sleep(0.5)
    # ... and no loss was counted.
    m = d.scrape()
    label = "/" + cgroups.rel(cg)
    lost = [v for (name, labels), v in m.items() if name == "bpfkeep_connections_lost_total"]
    assert not any(lost), m
    assert idle_histogram(m, label, "*")[1] == 0


def test_attach_resolves_a_host_name_rule(bk, cgroups, spawn, probes):
    """bpfkeep attach resolves a host-name rule's name once (the daemon
    follows it): a connection to the name's address gets the rule's values."""
    cg = cgroups.make("app")
    srv = spawn([probes["static"], "listen", "127.0.0.1", "0", "hold"])
    port = srv.expect("ready").split()[1]
    out = bk("attach", "--cgroup", cgroups.rel(cg), "--keepidle", "300", "--peer",
             "localhost,keepidle=77").stdout  # fmt: skip
    assert "localhost" in out or "attached" in out
    cli = spawn([probes["static"], "connect", "127.0.0.1", port, "hold"], cgroup=cg)
    assert cli.values("client")["keepidle"] == 77
    status = bk("status").stdout
    assert "localhost (127.0.0.1" in status, status
