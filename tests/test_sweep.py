"""Sockets that exist before a policy arrives, or before it changes: the
sweep (iter/tcp) brings them to the policy.  Real cgroups, real programs
(static ones included), read back with getsockopt inside the workload and
with ss from outside."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import uuid

import pytest
from conftest import host_sysctl, ss_keepalive_timers
from test_enforcer import assert_policy, assert_untouched, policy_args

pytestmark = pytest.mark.kernel

POLICY = {"keepidle": "31", "keepintvl": "7", "keepcnt": "4", "user-timeout": "12345"}


def pair(spawn, probes, cgroup, host="127.0.0.1", kind="static", client_extra=()):
    """A server and a client in ``cgroup``, connected and held open."""
    srv = spawn([probes[kind], "listen", host, "0", "hold"], cgroup=cgroup)
    port = int(srv.expect("ready").split()[1])
    cli = spawn([probes[kind], "connect", host, str(port), *client_extra, "hold"], cgroup=cgroup)
    return srv, cli, port


def now(probe, role: str) -> dict[str, int]:
    """Ask a holding sockprobe for the values in force on its socket now."""
    probe.send_line()
    return probe.values("now-" + role)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_connections_made_before_attach_get_the_policy(bk, cgroups, spawn, probes, host):
    app = cgroups.make("app")
    srv, cli, port = pair(spawn, probes, app, host)
    assert_untouched(cli.values("client"))
    assert_untouched(srv.values("accepted"))
    assert ss_keepalive_timers(port) == ["none", "none"]

    out = bk("attach", "--cgroup", cgroups.rel(app), *policy_args(**POLICY)).stdout
    assert "3 existing socket(s) swept" in out, out  # listener, client, accepted

    assert_policy(now(cli, "client"))
    assert_policy(now(srv, "accepted"))
    assert_policy(srv.values("now-listener"))
    timers = ss_keepalive_timers(port)
    assert len(timers) == 2 and all(t.startswith("timer:(keepalive") for t in timers), timers

    status = json.loads(bk("status", "--json").stdout)
    sweep = status[0]["counters"]["sweep"]
    assert sweep["swept"] == 3 and sweep["applied"]["keepalive"] == 3


def test_no_existing_leaves_them_alone(bk, cgroups, spawn, probes):
    app = cgroups.make("app")
    _srv, cli, _port = pair(spawn, probes, app)
    bk("attach", "--cgroup", cgroups.rel(app), "--no-existing", *policy_args(**POLICY))
    assert_untouched(now(cli, "client"))


def test_descendants_in_their_own_netns_and_deepest_policy(bk, cgroups, spawn, probes):
    """A process of a child cgroup in another network namespace: entered
    and swept; the child's own policy wins over the parent's."""
    parent = cgroups.make("parent")
    child = cgroups.make("parent/child")
    ns = f"bk-sweep-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        srv = spawn([probes["static"], "listen", "127.0.0.1", "0", "hold"], child, ns)
        port = int(srv.expect("ready").split()[1])
        cli = spawn([probes["static"], "connect", "127.0.0.1", str(port), "hold"], parent, ns)
        assert_untouched(cli.values("client"), ns)
        bk("attach", "--cgroup", cgroups.rel(child), "--keepidle", "200")
        bk("attach", "--cgroup", cgroups.rel(parent), "--keepidle", "100")
        assert now(cli, "client")["keepidle"] == 100  # the parent's own socket
        assert now(srv, "accepted")["keepidle"] == 200  # the child's policy wins
        assert srv.values("now-listener")["keepidle"] == 200
        timers = ss_keepalive_timers(port, netns=ns)
        assert len(timers) == 2 and all("keepalive" in t for t in timers), timers
    finally:
        subprocess.run(["ip", "netns", "pids", ns], capture_output=True)
        for pid in subprocess.run(
            ["ip", "netns", "pids", ns], capture_output=True, text=True
        ).stdout.split():
            subprocess.run(["kill", "-9", pid], check=False)
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_update_reaches_existing_sockets_and_later_accepted_ones(bk, cgroups, spawn, probes):
    app = cgroups.make("app")
    bk("attach", "--cgroup", cgroups.rel(app), "--keepidle", "31")
    srv = spawn([probes["static"], "accept", "127.0.0.1", "0", "hold"], cgroup=app)
    port = int(srv.expect("ready").split()[1])
    assert srv.values("listener")["keepidle"] == 31
    cli = spawn([probes["static"], "connect", "127.0.0.1", str(port), "hold"], cgroup=app)
    assert cli.values("client")["keepidle"] == 31

    bk("attach", "--cgroup", cgroups.rel(app), "--keepidle", "45")
    assert now(cli, "client")["keepidle"] == 45
    srv.send_line()  # accept now: from the listener configured under 31
    assert srv.values("accepted")["keepidle"] == 45
    now(srv, "accepted")
    assert srv.values("now-listener")["keepidle"] == 45  # the sweep reached it


def test_set_mode_keeps_what_the_program_chose(bk, cgroups, spawn, probes):
    app = cgroups.make("app")
    # Turned keepalive on itself before bpfkeep came: its values stay.
    _srv, own, _ = pair(
        spawn, probes, app, client_extra=("set", "keepalive=1", "set", "keepidle=100")
    )
    assert own.values("client-after")["keepidle"] == 100
    # Left keepalive off: gets the policy.
    plain = spawn([probes["static"], "connect", "127.0.0.1", str(_), "hold"], cgroup=app)
    plain.values("client")
    bk("attach", "--cgroup", cgroups.rel(app), *policy_args(**POLICY))
    v = now(own, "client")
    assert (v["keepalive"], v["keepidle"]) == (1, 100)
    assert v["keepintvl"] == host_sysctl("tcp_keepalive_intvl")
    assert v["user_timeout"] == 0
    assert_policy(now(plain, "client"))


def test_enforce_mode_brings_every_socket_within_the_policy(bk, cgroups, spawn, probes):
    app = cgroups.make("app")
    loose = ("set", "keepalive=1", "set", "keepidle=1800", "set", "keepintvl=60")
    _srv, lax, port = pair(spawn, probes, app, client_extra=loose)
    own = ("set", "keepalive=1", "set", "keepidle=3", "hold")
    tight = spawn(
        [probes["static"], "connect", "127.0.0.1", str(port), *own],
        cgroup=app,
    )
    tight.values("client-after")
    bk("attach", "--cgroup", cgroups.rel(app), "--mode", "enforce", *policy_args(**POLICY))
    assert_policy(now(lax, "client"))
    # Made before any bpfkeep program saw it: who chose 3 is unknown, so it
    # ends at the policy too.
    assert_policy(now(tight, "client"))
    # A tighter value the program sets while bpfkeep watches stands, also
    # through a later update.
    watched = spawn(
        [probes["static"], "connect", "127.0.0.1", str(port), *own],
        cgroup=app,
    )
    assert watched.values("client-after")["keepidle"] == 3
    update = {**POLICY, "keepidle": "8"}
    bk("attach", "--cgroup", cgroups.rel(app), "--mode", "enforce", *policy_args(**update))
    assert now(watched, "client")["keepidle"] == 3
    lax.send_line()
    assert lax.values("now-client", consume=True)["keepidle"] == 31  # the first read
    assert lax.values("now-client")["keepidle"] == 8


def _activated(spawn, probes, cgroup, listener: socket.socket):
    """Start sockprobe the way systemd starts a socket-activated service:
    the listener as fd 3, LISTEN_FDS=1 and LISTEN_PID of the service."""
    lfd = listener.fileno()
    handover = (
        "import os, sys\n"
        "os.dup2(int(sys.argv[1]), 3)\n"
        "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()))\n"
        "os.execv(sys.argv[2], sys.argv[2:])\n"
    )
    return spawn(
        [sys.executable, "-c", handover, str(lfd), probes["static"], "activated", "-", "0", "hold"],
        cgroup=cgroup,
        pass_fds=(lfd,),
    )


def test_socket_activated_listener_made_in_another_cgroup(bk, cgroups, spawn, probes):
    """The listener belongs to the cgroup that made it (here the test's, as
    systemd's would be); the service that holds it gets its accepted
    connections covered, although its cgroup's sock_ops never sees them."""
    svc = cgroups.make("web.service")
    lst = socket.create_server(("127.0.0.1", 0))
    port = lst.getsockname()[1]
    svc_probe = _activated(spawn, probes, svc, lst)
    svc_probe.expect("ready")
    assert_untouched(svc_probe.values("listener"))
    lst.close()  # the service holds the only reference now

    bk("attach", "--cgroup", cgroups.rel(svc), *policy_args(**POLICY))
    svc_probe.send_line("accept")
    with socket.create_connection(("127.0.0.1", port)):
        assert_policy(svc_probe.values("accepted"))


def test_listener_passed_over_a_unix_socket(bk, cgroups, spawn, probes, tmp_path):
    """SCM_RIGHTS: a listener made in one cgroup, used by a process of the
    policy's cgroup."""
    svc = cgroups.make("worker")
    code = (
        "import socket, sys, array\n"
        "u = socket.socket(socket.AF_UNIX)\n"
        f"u.connect({str(tmp_path / 'sock')!r})\n"
        "msg, anc, _, _ = u.recvmsg(1, socket.CMSG_LEN(4))\n"
        "fd = array.array('i', anc[0][2])[0]\n"
        "l = socket.socket(fileno=fd)\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "c, _ = l.accept()\n"
        "print('accepted', c.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),"
        " c.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), flush=True)\n"
        "sys.stdin.readline()\n"
    )
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(tmp_path / "sock"))
    srv.listen(1)
    worker = spawn(["python3", "-c", code], cgroup=svc)
    conn, _ = srv.accept()
    lst = socket.create_server(("127.0.0.1", 0))
    port = lst.getsockname()[1]
    conn.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fd(lst))])
    worker.expect("ready")
    lst.close()
    conn.close()
    bk("attach", "--cgroup", cgroups.rel(svc), "--keepidle", "33")
    with socket.create_connection(("127.0.0.1", port)):
        worker.send_line()
        assert worker.expect("accepted").split()[1:] == ["1", "33"]


def _fd(s: socket.socket) -> bytes:
    import array

    return array.array("i", [s.fileno()]).tobytes()


def test_detach_stops_listeners_passing_the_policy_on(bk, cgroups, spawn, probes):
    app = cgroups.make("app")
    bk("attach", "--cgroup", cgroups.rel(app), *policy_args(**POLICY))
    srv = spawn([probes["static"], "accept", "127.0.0.1", "0", "hold"], cgroup=app)
    port = int(srv.expect("ready").split()[1])
    assert_policy(srv.values("listener"))
    bk("detach", "--cgroup", cgroups.rel(app))
    srv.send_line()
    with socket.create_connection(("127.0.0.1", port)):
        assert_untouched(srv.values("accepted"))


def test_detach_hands_the_sockets_to_the_ancestors_policy(bk, cgroups, spawn, probes):
    parent = cgroups.make("p")
    child = cgroups.make("p/c")
    bk("attach", "--cgroup", cgroups.rel(parent), "--keepidle", "100")
    bk("attach", "--cgroup", cgroups.rel(child), "--keepidle", "200")
    srv = spawn([probes["static"], "accept", "127.0.0.1", "0", "hold"], cgroup=child)
    port = int(srv.expect("ready").split()[1])
    assert srv.values("listener")["keepidle"] == 200
    bk("detach", "--cgroup", cgroups.rel(child))
    srv.send_line()
    with socket.create_connection(("127.0.0.1", port)):
        assert srv.values("accepted")["keepidle"] == 100


def test_a_detached_policys_connections_go_to_the_next_policy_attached(bk, cgroups, spawn, probes):
    """Detach leaves established connections their values; a policy
    attached later above them (or on the same cgroup again) must still
    know those values were bpfkeep's, not the program's, and bring the
    connections to its own -- although with a single policy the socket
    carried no record."""

    def fresh(probe) -> int:
        probe.send_line()
        return probe.values("now-client", consume=True)["keepidle"]

    parent = cgroups.make("p")
    child = cgroups.make("p/c")
    _srv, cli, _port = pair(spawn, probes, child)
    bk("attach", "--cgroup", cgroups.rel(child), "--keepidle", "21")
    assert fresh(cli) == 21
    bk("detach", "--cgroup", cgroups.rel(child))
    assert fresh(cli) == 21  # connections keep their values
    bk("attach", "--cgroup", cgroups.rel(parent), "--keepidle", "22")
    assert fresh(cli) == 22
    bk("detach", "--cgroup", cgroups.rel(parent))
    bk("attach", "--cgroup", cgroups.rel(child), "--keepidle", "23")
    assert fresh(cli) == 23


def test_audit_checks_the_values_in_force_against_the_policy(bk, cgroups, spawn, probes):
    """After attach, 100 % of the cgroup at the policy, connections made
    before the attach included; sockets left alone are named with why."""
    app, other = cgroups.make("app"), cgroups.make("other")
    _srv, cli, _port = pair(spawn, probes, app)
    cli.values("client")
    _osrv, ocli, _ = pair(spawn, probes, other, client_extra=("set", "keepalive=1"))
    ocli.values("client-after")
    bk("attach", "--cgroup", cgroups.rel(app), "--mode", "enforce", *policy_args(**POLICY))
    bk("attach", "--cgroup", cgroups.rel(other), "--no-existing", *policy_args(**POLICY))
    report = json.loads(bk("audit", "--json").stdout)["policy_check"]
    summary = report["summary"]
    assert summary["/" + cgroups.rel(app)] == {
        "at-policy": 3,
        "program's own (set mode)": 0,
        "off-policy": 0,
        "exempt": 0,  # no peer rule exempts anyone here
    }
    mine = [s for s in report["sockets"] if s["policy_cgroup"] == "/" + cgroups.rel(other)]
    assert {s["state"] for s in mine} == {"LISTEN", "ESTABLISHED"}
    # Not swept: the listener and the accepted socket are off-policy, the
    # client that turned keepalive on itself is too (never reached).
    assert all(s["verdict"] == "off-policy" for s in mine), mine
    assert all("not swept" in s["reason"] for s in mine), mine
    assert {s["values"]["keepidle"] for s in mine} == {host_sysctl("tcp_keepalive_time")}
    text = bk("audit").stdout
    assert f"/{cgroups.rel(app)}: 3/3 sockets at the policy" in text, text
    assert f"/{cgroups.rel(other)}: 0/3 sockets at the policy (3 off-policy)" in text, text


def test_attach_again_says_what_it_reset(bk, cgroups):
    app = cgroups.make("app")
    bk("attach", "--cgroup", cgroups.rel(app), "--mode", "enforce", "--keepidle", "50")
    out = bk("attach", "--cgroup", cgroups.rel(app), "--keepintvl", "5").stdout
    assert "not given, back to the default: mode=set (was enforce)" in out, out
    assert "keepidle=15 (was 50)" in out, out
    again = bk("attach", "--cgroup", cgroups.rel(app), "--keepintvl", "5").stdout
    assert "not given" not in again, again


def test_kernel_without_the_sweep_gets_one_notice(bk, cgroups, spawn, probes, pin_dir):
    """As on a kernel before 5.15, where the iter/tcp program does not load:
    the loader pins everything else, attach says so once, audit too."""
    from bpfkeep.enforcer import Enforcer
    from bpfkeep.progs import loader

    os.unlink(os.path.join(Enforcer(pin_dir).obj_dir, loader.PROG_SWEEP))
    app = cgroups.make("app")
    _srv, cli, _port = pair(spawn, probes, app)
    cli.values("client")
    out = bk("attach", "--cgroup", cgroups.rel(app), "--keepidle", "31")
    assert out.stderr.count("notice: existing sockets keep their values") == 1, out.stderr
    assert "Linux 5.15" in out.stderr
    assert now(cli, "client")["keepalive"] == 0  # left as it was, and said so
    new = spawn([probes["static"], "connect", "127.0.0.1", str(_port), "hold"], cgroup=app)
    assert new.values("client")["keepidle"] == 31
    report = json.loads(bk("audit", "--json").stdout)
    assert report["policy_check"] is None and "Linux 5.15" in report["why_not"]


def test_counters_start_at_zero_for_a_new_attachment(bk, cgroups, spawn, probes):
    app = cgroups.make("app")
    bk("attach", "--cgroup", cgroups.rel(app))
    _srv, cli, _port = pair(spawn, probes, app)
    cli.values("client")
    seen = json.loads(bk("status", "--json").stdout)[0]["counters"]["seen"]
    assert seen["connect"] == 1
    bk("detach", "--cgroup", cgroups.rel(app))
    bk("attach", "--cgroup", cgroups.rel(app), "--no-existing")
    counters = json.loads(bk("status", "--json").stdout)[0]["counters"]
    assert counters["seen"] == {"connect": 0, "listen": 0, "passive_established": 0}
    assert counters["sweep"] is None or counters["sweep"]["swept"] == 0


# A process whose main thread stays in the host's network namespace while
# one of its threads enters another (setns is per thread: Go runtimes,
# `ip netns exec`-style helpers and VPN daemons do it) and connects there.
THREAD_IN_NETNS = r"""
import ctypes, os, socket, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
ready = threading.Event()
box = {}
def run():
    fd = os.open(sys.argv[1], os.O_RDONLY)
    if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
        raise OSError(ctypes.get_errno(), "setns")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    cli = socket.create_connection(srv.getsockname())
    box["conns"] = (srv, cli, srv.accept()[0])
    box["port"] = srv.getsockname()[1]
    ready.set()
    threading.Event().wait()
threading.Thread(target=run, daemon=True).start()
ready.wait()
print("ready", box["port"], flush=True)
sys.stdin.readline()
"""


def test_a_thread_in_another_network_namespace_is_swept(bk, cgroups, spawn, netns):
    """The sweep enters every network namespace the scope's threads live
    in, not only those of its processes' main threads."""
    app = cgroups.make("app")
    prog = spawn([sys.executable, "-c", THREAD_IN_NETNS, f"/run/netns/{netns}"], cgroup=app)
    port = int(prog.expect("ready").split()[1])
    assert ss_keepalive_timers(port, netns=netns) == ["none", "none"]
    bk("attach", "--cgroup", cgroups.rel(app), "--keepidle", "33")
    timers = ss_keepalive_timers(port, netns=netns)
    assert len(timers) == 2 and all(t.startswith("timer:(keepalive,") for t in timers), timers


def _cookie_of_client(port: int) -> int:
    """The socket cookie of the connection to ``port`` (ss -e: "sk:<hex>")."""
    out = subprocess.run(
        ["ss", "-tneH", "state", "established", f"( dport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cookies = [int(w[3:], 16) for w in out.split() if w.startswith("sk:")]
    assert len(cookies) == 1, out
    return cookies[0]


def test_work_left_by_a_sweep_that_died_is_not_carried_out(bk, cgroups, spawn, probes, pin_dir):
    """A sweep killed between writing its work list and clearing it leaves
    entries behind; the next sweep must not act on them (here: the policy
    of one cgroup applied to a socket of another, which has none)."""
    from bpfkeep.enforcer import Enforcer
    from bpfkeep.kernel import bpfsys
    from bpfkeep.progs import loader
    from bpfkeep.progs import maps as bpfmaps

    app, other = cgroups.make("app"), cgroups.make("other")
    bk("attach", "--cgroup", cgroups.rel(app), *policy_args(**POLICY))
    _srv, cli, port = pair(spawn, probes, other)
    assert_untouched(cli.values("client"))
    stale = bpfmaps.SweepEntry(owner=os.stat(app).st_ino, action=bpfmaps.SWEEP_APPLY)
    fd = bpfsys.obj_get(os.path.join(Enforcer(pin_dir).obj_dir, loader.MAP_SWEEP))
    try:
        bpfsys.map_update(fd, struct.pack("=Q", _cookie_of_client(port)), stale.encode())
    finally:
        os.close(fd)
    pair(spawn, probes, app)  # something for the next sweep to do
    bk("attach", "--cgroup", cgroups.rel(app), *policy_args(**{**POLICY, "keepidle": "32"}))
    assert_untouched(now(cli, "client"))


def test_a_refused_delete_of_the_work_list_loses_no_outcome(
    cgroups, spawn, probes, pin_dir, monkeypatch
):
    """What the iterator did stands even when taking the entries out of the
    work list in one batch fails: they go one at a time, and the report
    still has every socket."""
    import errno

    from bpfkeep.enforcer import Enforcer
    from bpfkeep.kernel import bpfsys
    from bpfkeep.kernel.cgroups import Cgroup
    from bpfkeep.options import Policy
    from bpfkeep.progs import loader
    from bpfkeep.progs import maps as bpfmaps

    app = cgroups.make("app")
    _srv, cli, _port = pair(spawn, probes, app)
    assert_untouched(cli.values("client"))

    def refuse(_fd, _keys):
        raise bpfsys.BpfError(errno.ENOENT, "map delete batch")

    monkeypatch.setattr(bpfsys, "map_delete_batch", refuse)
    enf = Enforcer(pin_dir)
    cg = Cgroup(app, cgroups.rel(app), os.stat(app).st_ino)
    enf.attach(cg, Policy.from_mapping({"keepidle": 33}))
    report = enf.sweep([cg])
    assert len(report.outcomes) == 3, report.summary()  # listener, client, accepted
    assert now(cli, "client")["keepidle"] == 33
    fd = bpfsys.obj_get(os.path.join(enf.obj_dir, loader.MAP_SWEEP))
    try:
        assert bpfsys.map_items(fd, 8, bpfmaps.SWEEP_SIZE) == []  # nothing left behind
    finally:
        os.close(fd)
