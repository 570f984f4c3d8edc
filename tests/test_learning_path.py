"""keepidle = "auto" on a real path: routers in network namespaces that
forget idle flows after T seconds -- one answering what it forgot with a
RST (as AWS's NAT gateway does), one dropping it (GCP, Azure) -- a client
whose connections sit idle several times T before they speak, and the
real daemon learning from the kernel's loss events.  Outcomes are read
from the client (answered or lost), from getsockopt on new connections
and from a real scrape."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import bpfkeep_cmd
from support.paths import DROP, RESET, Paths
from test_daemon import (
    daemon,  # noqa: F401 - the fixture
    free_port,
    rule,
    sample,
    scrape,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.kernel

SUPPORT = Path(__file__).parent / "support"
T = 3  # the routers' idle limit, seconds (no step of the climb lands on it: 1, 2, 4)
IDLE = 8  # each connection sits idle this long before it speaks again
# keepidle climbs one step per connection (doubling from keepidle_min 1:
# 1, 2, then half the first loss's idle time, 4): the step that crosses T
# is the fourth connection at the latest, and two more follow it.
CONNECTIONS = 7
PORT = "7000"


def outcomes(client) -> dict[str, str]:
    """``conn 0`` -> "ok" or "lost ...", and ``other 0`` ... from the client."""
    client.expect("done", timeout=CONNECTIONS * (IDLE + 20) + 30)
    out = {}
    for ln in client.lines:
        kind, _, rest = ln.partition(" ")
        if kind in ("conn", "other"):
            i, _, result = rest.partition(" ")
            out[f"{kind} {i}"] = result
    return out


def lost_total(metrics, cgroup: str) -> float:
    return sum(
        v
        for (name, labels), v in metrics.items()
        if name == "bpfkeep_connections_lost_total" and dict(labels).get("cgroup") == cgroup
    )


def gauge(metrics, name: str, cgroup: str, peer: str) -> float | None:
    return sample(metrics, name, cgroup=cgroup, peer=peer)


def test_a_path_learned_from_loses_at_most_two_connections_and_keeps_the_rest(
    daemon,  # noqa: F811 - the fixture
    cgroups,
    spawn,
    probes,
    tmp_path,
    pin_dir,
):
    with Paths([(T, RESET), (T, DROP)], servers=1) as paths:
        by_answer = {r.answer: r for r in paths.routers}
        servers = {}
        for r in paths.routers:
            servers[r.answer] = spawn(
                ["python3", str(SUPPORT / "echo_server.py"), r.server(0), PORT], netns=r.server_ns
            )
            servers[r.answer].expect("ready")
        app, plain = cgroups.make("app"), cgroups.make("plain")
        app_name, plain_name = "/" + cgroups.rel(app), "/" + cgroups.rel(plain)
        port = free_port()
        policy = rule(
            cgroups.rel(app),
            keepidle="auto",
            keepidle_min=1,
            keepidle_max=60,
            keepintvl=1,
            keepcnt=2,
            user_timeout=2000,
        )
        cfg = write_config(tmp_path / "bpfkeep.toml", port, policy, audit=1)
        d = daemon(cfg)
        d.start()

        # The RST router's first loss comes when the first connection
        # speaks; the dropping router's a user timeout later.  The others
        # open half a second before that: idle when the first loss happens.
        first_loss = {RESET: IDLE, DROP: IDLE + 2}
        clients = {
            answer: spawn(
                [
                    "python3",
                    str(SUPPORT / "idle_client.py"),
                    r.server(0),
                    PORT,
                    str(CONNECTIONS),
                    str(IDLE),
                    "--others",
                    "3",
                    "--at",
                    str(first_loss[answer] - 0.5),
                ],
                cgroup=app,
                netns=paths.client,
            )
            for answer, r in by_answer.items()
        }
        results = {answer: outcomes(c) for answer, c in clients.items()}
        metrics = scrape(port)
        client_losses = 0
        learned: dict[str, float] = {}
        for answer, got in results.items():
            conns = [got[f"conn {i}"] for i in range(CONNECTIONS)]
            lost = [c for c in conns if c != "ok"]
            client_losses += len(lost) + sum(
                1 for k, v in got.items() if k.startswith("other") and v != "ok"
            )
            assert conns[0] != "ok", f"{answer}: the router did not forget: {got}"
            assert len(lost) <= 2, f"{answer}: {got}"
            assert conns[-2:] == ["ok", "ok"], f"{answer}: {got}"
            others = [got[f"other {j}"] for j in range(3)]
            assert others == ["ok"] * 3, f"{answer}: the first loss did not save them: {got}"
            net = f"10.9{by_answer[answer].index}.0.0/24"
            limit = gauge(metrics, "bpfkeep_peer_idle_limit_seconds", app_name, net)
            keepidle = gauge(metrics, "bpfkeep_peer_keepidle_seconds", app_name, net)
            # What was unanswered counts from its last retransmission.
            assert limit is not None and limit <= IDLE + 3, (answer, limit)
            # New connections get at most half the limit: below T once a
            # step crossed it, else the step the climb is trying now.
            assert keepidle is not None and keepidle <= limit / 2, (answer, keepidle, limit)
            learned[answer] = keepidle
        # The kernel counted each loss the client saw, no more.
        assert lost_total(metrics, app_name) == client_losses

        # A new connection gets what was learned at connect (getsockopt).
        r = by_answer[RESET]
        new = spawn(
            [probes["static"], "connect", r.server(0), PORT, "hold"], cgroup=app, netns=paths.client
        )
        assert new.values("client")["keepidle"] == learned[RESET]

        # A connection outside every policy, to a path whose limit is
        # known, keepalive off: at risk, on /metrics and in the audit.
        risky = spawn(
            [probes["static"], "connect", r.server(0), PORT, "hold"],
            cgroup=plain,
            netns=paths.client,
        )
        assert risky.values("client")["keepalive"] == 0
        net = "10.91.0.0/24"
        # (The periodic look counts them: every audit_interval, stretched to
        # 1000 times its CPU -- tens of seconds on a kernel emulated in QEMU.)
        assert wait_until(
            lambda: gauge(scrape(port), "bpfkeep_connections_at_risk", plain_name, net) == 1, 90
        ), (
            [(k, v) for k, v in scrape(port).items() if "risk" in k[0]],
            [ln for ln in d.log.read_text().splitlines() if "fail" in ln or "error" in ln][:5],
        )
        audit = subprocess.run(
            ["ip", "netns", "exec", paths.client, *bpfkeep_cmd(pin_dir, "audit")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        (row,) = [ln for ln in audit.splitlines() if plain_name in ln and "ESTAB" in ln]
        assert "idle limit" in row and f"learned for {net}" in row, audit

        # The peer restarts: its connections reset at once, busy and idle
        # alike.  The limit learned is not lowered.
        before = scrape(port)
        held = [
            spawn(
                [probes["static"], "connect", r.server(0), PORT, "hold"],
                cgroup=app,
                netns=paths.client,
            )
            for _ in range(3)
        ]
        for h in held:
            h.values("client")
        busy = spawn(
            ["python3", "-c", BUSY_CLIENT, r.server(0), PORT], cgroup=app, netns=paths.client
        )
        busy.expect("busy")
        servers[RESET].proc.send_signal(signal.SIGKILL)
        servers[RESET].proc.wait()
        restarted = spawn(
            ["python3", str(SUPPORT / "echo_server.py"), r.server(0), PORT], netns=r.server_ns
        )
        restarted.expect("ready")
        busy.expect("lost", timeout=10)
        assert wait_until(lambda: lost_total(scrape(port), app_name) >= client_losses + 4, 10)
        time.sleep(2)  # a pass or two
        after = scrape(port)
        for name in ("bpfkeep_peer_idle_limit_seconds", "bpfkeep_peer_keepidle_seconds"):
            was, now = gauge(before, name, app_name, net), gauge(after, name, app_name, net)
            assert was is not None and now is not None and now >= was, (name, was, now)

        # A restart of the daemon keeps what was learned.
        learned = {
            n: gauge(after, "bpfkeep_peer_idle_limit_seconds", app_name, n)
            for n in ("10.91.0.0/24", "10.92.0.0/24")
        }
        assert d.stop() == 0
        d2 = daemon(cfg)
        d2.start()
        again = scrape(port)
        for n, limit in learned.items():
            assert gauge(again, "bpfkeep_peer_idle_limit_seconds", app_name, n) == limit
        status = subprocess.run(
            bpfkeep_cmd(pin_dir, "status"), capture_output=True, text=True, check=True
        ).stdout
        assert "learned:   10.91.0.0/24: idle limit" in status, status


# Sends a line every 50 ms and reads the echo: a busy connection.
BUSY_CLIENT = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print("busy", flush=True)
try:
    while True:
        s.sendall(b"x" * 100 + b"\\n")
        s.recv(4096)
        time.sleep(0.05)
except OSError as e:
    print("lost", e, flush=True)
"""


# Two connections, one to each of two peers, speaking every 3 s and held.
SPEAKING = """
import socket, time
conns = [socket.create_connection((a, 7000)) for a in ("127.0.0.1", "127.0.0.2")]
print("connected", flush=True)
while True:
    for c in conns:
        c.sendall(b"x\\n")
        c.recv(64)
    time.sleep(3)
"""


def test_a_network_is_on_metrics_only_once_a_limit_is_learned_of_it(
    daemon,  # noqa: F811 - the fixture
    cgroups,
    spawn,
    netns,
    tmp_path,
):
    """A connection that sat idle and was heard from again is evidence for
    its path.  A peer rule's path is on /metrics from its first evidence
    on; for the policy's own values every client's network would be a
    series of its own -- a server facing the internet grows them without
    end -- so a network shows only once a limit was learned of it.  Both
    connections speak at the same moments: the look that finds one
    survived finds the other did too."""
    for address in ("127.0.0.1", "127.0.0.2"):
        spawn(["python3", str(SUPPORT / "echo_server.py"), address, PORT], netns=netns).expect(
            "ready"
        )
    app = cgroups.make("app")
    app_name = "/" + cgroups.rel(app)
    port = free_port()
    policy = rule(cgroups.rel(app), keepidle="auto", keepidle_min=1, keepidle_max=60)
    policy += '[[policy.peer]]\naddress = "127.0.0.2"\nkeepidle = "auto"\n'
    d = daemon(write_config(tmp_path / "bpfkeep.toml", port, policy, audit=1))
    d.start()
    spawn(["python3", "-c", SPEAKING], cgroup=app, netns=netns).expect("connected")

    def peers_shown() -> set[str]:
        return {
            dict(labels)["peer"]
            for (name, labels), _v in scrape(port).items()
            if name == "bpfkeep_peer_keepidle_seconds" and dict(labels).get("cgroup") == app_name
        }

    # (Looks are spaced by 1000 times their CPU: longer on an emulated kernel.)
    assert wait_until(lambda: peers_shown() != set(), timeout=90), d.log.read_text()
    assert peers_shown() == {"127.0.0.2"}
    assert d.stop() == 0
