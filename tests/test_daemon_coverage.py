"""The daemon's promise of *every* socket: a new cgroup whose first process
connects before the daemon could attach, and a service handed a listener
by socket activation after its cgroup was attached."""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest
from test_daemon import daemon, free_port, rule, write_config  # noqa: F401

pytestmark = pytest.mark.kernel


def _wait_keepidle(probe, want: int, deadline: float) -> int:
    """Ask a holding sockprobe for its values until they show ``want`` (or
    the deadline passed)."""
    while True:
        probe.send_line()
        got = probe.values("now-client", consume=True)["keepidle"]
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


def test_first_connection_of_100_new_cgroups_gets_keepalive(
    daemon,  # noqa: F811
    cgroups,
    spawn,
    probes,
    tmp_path,
):
    # Connections wait in the accept queue, established: room for all.
    server = socket.create_server(("127.0.0.1", 0), backlog=256)
    listener = server.getsockname()[1]
    port = free_port()
    cfg = write_config(
        tmp_path / "c.toml", port, rule(f"{cgroups.rel(cgroups.base)}/job-*", keepidle=37)
    )
    dproc = daemon(cfg)
    dproc.start()
    # Static clients, started beforehand, each waiting for a word to make its
    # socket and connect: as good as a program connecting as its very
    # first action in the new cgroup.
    clients = [
        spawn([probes["static"], "connect", "127.0.0.1", str(listener), "gated", "hold"])
        for _ in range(100)
    ]
    for i, c in enumerate(clients):
        # mkdir, move the process in, connect: the daemon learns of the
        # cgroup through inotify only as this happens.
        cg = cgroups.make(f"job-{i}")
        with open(os.path.join(cg, "cgroup.procs"), "w") as f:
            f.write(str(c.proc.pid))
        c.send_line()
    at_connect = sum(c.values("client")["keepidle"] == 37 for c in clients)
    deadline = time.monotonic() + 30  # for all of them together (a bound, not a target)
    got = [_wait_keepidle(c, 37, deadline) for c in clients]
    missed = [(i, clients[i].lines[-1]) for i, k in enumerate(got) if k != 37]
    print(f"{at_connect}/100 covered at connect, the rest by the sweep after the attach")
    assert not missed, f"cgroups without keepalive: {missed}"
    server.close()


def test_listener_handed_over_after_the_attach_is_covered(
    daemon,  # noqa: F811
    cgroups,
    spawn,
    probes,
    tmp_path,
):
    """systemd makes the service's cgroup, then starts the service in it with
    the listener it made long before in its own cgroup (LISTEN_FDS)."""
    port = free_port()
    cfg = write_config(
        tmp_path / "c.toml", port, rule(f"{cgroups.rel(cgroups.base)}/*.service", keepidle=38)
    )
    daemon(cfg).start()
    lst = socket.create_server(("127.0.0.1", 0))
    lport = lst.getsockname()[1]
    svc = cgroups.make("web.service")
    time.sleep(0.3)  # the daemon attached the empty cgroup (and swept nothing)
    handover = (
        "import os, sys\n"
        "os.dup2(int(sys.argv[1]), 3)\n"
        "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()))\n"
        "os.execv(sys.argv[2], sys.argv[2:])\n"
    )
    fd = lst.fileno()
    srv = spawn(
        [sys.executable, "-c", handover, str(fd), probes["static"], "activated", "-", "0", "hold"],
        cgroup=svc,
        pass_fds=(fd,),
    )
    srv.expect("ready")
    lst.close()
    # The daemon's follow-up sweep (a moment after the attach) reaches the
    # listener; then the connections it accepts carry the policy.
    deadline = time.monotonic() + 10
    while True:
        srv.send_line("report")
        if (
            srv.values("now-listener", consume=True)["keepidle"] == 38
            or time.monotonic() > deadline
        ):
            break
        time.sleep(0.05)
    srv.send_line("accept")
    with socket.create_connection(("127.0.0.1", lport)):
        accepted = srv.values("accepted")
    assert (accepted["keepalive"], accepted["keepidle"]) == (1, 38)


def test_existing_false_leaves_the_sockets_that_exist_alone(
    daemon,  # noqa: F811
    cgroups,
    spawn,
    probes,
    tmp_path,
):
    server = socket.create_server(("127.0.0.1", 0))
    lport = server.getsockname()[1]
    app = cgroups.make("app.service")
    old = spawn([probes["static"], "connect", "127.0.0.1", str(lport), "hold"], cgroup=app)
    assert old.values("client")["keepalive"] == 0
    cfg = write_config(
        tmp_path / "c.toml",
        free_port(),
        rule(f"{cgroups.rel(cgroups.base)}/*.service", keepidle=39) + "existing = false\n",
        audit=1,
    )
    daemon(cfg).start()
    new = spawn([probes["static"], "connect", "127.0.0.1", str(lport), "hold"], cgroup=app)
    assert new.values("client")["keepidle"] == 39
    time.sleep(1.5)  # past the follow-up sweep and an audit pass
    old.send_line()
    assert old.values("now-client")["keepalive"] == 0
    server.close()
