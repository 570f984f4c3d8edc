"""Who owns a socket, beside other tools' programs, and what each mode then
promises: the most specific policy wins whatever neighbours write, enforce
caps by the socket's owner and reaches sockets accepted from listeners
with their own values, set mode keeps one coherent policy.  Read back with
getsockopt in the workload (static programs) and from the kernel's timers."""

from __future__ import annotations

import subprocess
import sys

import pytest
from neighbours import KINDS, attached
from test_enforcer import assert_policy

pytestmark = pytest.mark.kernel


def listen(spawn, probes, cgroup, *extra, host="127.0.0.1", mode="accept"):
    srv = spawn([probes["static"], mode, host, "0", *extra, "hold"], cgroup=cgroup)
    return srv, int(srv.expect("ready").split()[1])


def connect(spawn, probes, port, cgroup=None, *extra, host="127.0.0.1"):
    return spawn([probes["static"], "connect", host, str(port), *extra, "hold"], cgroup=cgroup)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("where", ["child", "parent"])
def test_most_specific_policy_wins_beside_neighbours(bk, cgroups, spawn, probes, kind, where):
    parent = cgroups.make("p")
    child = cgroups.make("p/c")
    bk("attach", "--cgroup", cgroups.rel(parent), "--keepidle", "100")
    bk("attach", "--cgroup", cgroups.rel(child), "--keepidle", "200")
    # Attached after ours: on the child it runs after bpfkeep's program,
    # before the parent's.
    with attached(kind, child if where == "child" else parent):
        srv, port = listen(spawn, probes, child)
        assert srv.values("listener")["keepidle"] == 200
        assert connect(spawn, probes, port, child).values("client")["keepidle"] == 200
        srv.send_line()
        assert srv.values("accepted")["keepidle"] == 200
        assert connect(spawn, probes, port, parent).values("client")["keepidle"] == 100


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_listener_flagged_by_a_neighbour_still_passes_the_policy_on(
    bk, cgroups, spawn, probes, kind
):
    """A listener older than the policy and left unswept, on which another
    tool set callback flags: its accepted sockets still get the policy at
    PASSIVE_ESTABLISHED (bpfkeep no longer reads flags as its mark)."""
    cg = cgroups.make("svc")
    with attached(kind, cg):
        srv, port = listen(spawn, probes, cg)
        bk("attach", "--cgroup", cgroups.rel(cg), "--no-existing", "--keepidle", "31")
        srv.send_line()
        client = connect(spawn, probes, port)
        client.values("client")
        assert srv.values("accepted")["keepidle"] == 31


ENFORCE = ["--mode", "enforce", "--keepidle", "7", "--keepintvl", "3", "--keepcnt", "4"]


def test_enforce_caps_by_the_sockets_owner_not_the_callers_cgroup(bk, cgroups, probes):
    """A socket made in an enforced cgroup, then used by a process that moved
    to a cgroup with a lax policy of its own: the owner's cap holds."""
    strict, lax = cgroups.make("strict"), cgroups.make("lax")
    bk("attach", "--cgroup", cgroups.rel(strict), *ENFORCE)
    bk("attach", "--cgroup", cgroups.rel(lax), "--keepidle", "100")
    code = (
        "import socket, sys\n"
        "open(sys.argv[1] + '/cgroup.procs', 'w').write('0')\n"
        "srv = socket.create_server(('127.0.0.1', 0))\n"
        "c = socket.create_connection(srv.getsockname())\n"
        "open(sys.argv[2] + '/cgroup.procs', 'w').write('0')  # now in lax\n"
        "c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 5000)\n"
        "print(c.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, strict, lax], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["7"], out


def test_enforce_below_32_cgroup_levels_uses_its_own_cap(bk, cgroups, spawn, probes):
    top = cgroups.make("t")
    deep = cgroups.make("/".join(["t", *("d" for _ in range(35))]))
    bk("attach", "--cgroup", cgroups.rel(top), "--mode", "enforce", "--keepidle", "50")
    bk("attach", "--cgroup", cgroups.rel(deep), "--mode", "enforce", "--keepidle", "7")
    _srv, port = listen(spawn, probes, None, mode="listen")
    cli = connect(spawn, probes, port, deep, "set", "keepidle=40")
    assert cli.values("client-after")["keepidle"] == 7


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_enforce_reaches_sockets_accepted_from_listeners_with_own_values(
    bk, cgroups, spawn, probes, host
):
    """nginx's `listen ... so_keepalive=30m:60:20`: the listener carries the
    program's values before bpfkeep comes; enforce brings what it accepts
    (and the listener) to the policy."""
    cg = cgroups.make("nginx")
    own = ["set", "keepalive=1", "set", "keepidle=1800", "set", "keepintvl=60", "set", "keepcnt=20"]
    srv, port = listen(spawn, probes, cg, *own, "late", host=host)
    assert srv.values("listener")["keepidle"] == 1800
    bk("attach", "--cgroup", cgroups.rel(cg), *ENFORCE)
    srv.send_line()
    connect(spawn, probes, port, None, host=host).values("client")
    assert_policy(srv.values("accepted"), keepidle=7, keepintvl=3, keepcnt=4, user_timeout=19000)


def test_switch_from_set_to_enforce_overrides_keepalive_off(bk, cgroups, spawn, probes):
    """`so_keepalive=off` set after listen() stands in set mode; enforce
    turns keepalive on for the listener and what it accepts."""
    cg = cgroups.make("nginx")
    bk("attach", "--cgroup", cgroups.rel(cg), "--keepidle", "7")
    srv, port = listen(spawn, probes, cg, "set", "keepalive=0", "late", host="::1")
    assert srv.values("listener")["keepalive"] == 0  # the program's choice, set mode
    bk("attach", "--cgroup", cgroups.rel(cg), "--mode", "enforce", "--keepidle", "7")
    srv.send_line()
    connect(spawn, probes, port, None, host="::1").values("client")
    accepted = srv.values("accepted")
    assert (accepted["keepalive"], accepted["keepidle"]) == (1, 7)


def test_set_mode_user_timeout_follows_the_programs_own_times(bk, cgroups, spawn, probes):
    """redis-cli sets 15/5/3 after connect: under a 2/1/3 policy the derived
    user timeout follows, (15 + 5 x 3) s, the time redis-cli alone gets."""
    cg = cgroups.make("redis")
    bk("attach", "--cgroup", cgroups.rel(cg), "--keepidle", "2", "--keepintvl", "1")
    _srv, port = listen(spawn, probes, None, mode="listen")
    times = ["set", "keepalive=1", "set", "keepidle=15", "set", "keepintvl=5", "set", "keepcnt=3"]
    cli = connect(spawn, probes, port, cg, *times)
    assert cli.values("client")["user_timeout"] == (2 + 1 * 9) * 1000  # the policy's
    v = cli.values("client-after")
    assert (v["keepidle"], v["keepintvl"], v["keepcnt"]) == (15, 5, 3)
    assert v["user_timeout"] == 30000
    # An explicit user timeout in the policy is the operator's: it stays.
    bk("attach", "--cgroup", cgroups.rel(cg), "--keepidle", "2", "--user-timeout", "4000")
    cli2 = connect(spawn, probes, port, cg, *times)
    assert cli2.values("client-after")["user_timeout"] == 4000


def test_an_explicit_user_timeout_equal_to_the_derived_one_is_fixed(bk, cgroups, spawn, probes):
    """`--user-timeout 11000` under 2/1/9 is the operator's choice, although
    it equals what bpfkeep would derive: it stays when the program sets its
    own times."""
    cg = cgroups.make("redis")
    derived = str((2 + 1 * 9) * 1000)
    bk("attach", "--cgroup", cgroups.rel(cg), "--keepidle", "2", "--keepintvl", "1",
       "--user-timeout", derived)  # fmt: skip
    _srv, port = listen(spawn, probes, None, mode="listen")
    times = ["set", "keepalive=1", "set", "keepidle=15", "set", "keepintvl=5", "set", "keepcnt=3"]
    cli = connect(spawn, probes, port, cg, *times)
    v = cli.values("client-after")
    assert (v["keepidle"], v["user_timeout"]) == (15, 11000)


def test_set_mode_dead_peer_time_follows_the_programs_own_times(
    bk, cgroups, spawn, probes, netns_pair
):
    """Measured, not just read back: policy 2/1/3 (5 s); the program sets
    4/1/3 after connect, so a dead peer is dropped after 4 + 1 x 3 = 7 s --
    not at the policy's 5 s nor without bound."""
    cg = cgroups.make("client")
    bk(
        "attach",
        "--cgroup",
        cgroups.rel(cg),
        "--keepidle",
        "2",
        "--keepintvl",
        "1",
        "--keepcnt",
        "3",
    )
    srv = spawn(
        [probes["static"], "listen", netns_pair.server_ip, "0", "hold"], netns=netns_pair.server
    )
    port = srv.expect("ready").split()[1]
    own = ["set", "keepalive=1", "set", "keepidle=4", "set", "keepintvl=1", "set", "keepcnt=3"]
    cli = spawn(
        [probes["static"], "wait", netns_pair.server_ip, port, *own],
        cgroup=cg,
        netns=netns_pair.client,
    )
    v = cli.values("client")
    assert (v["keepidle"], v["user_timeout"]) == (4, 7000)
    srv.expect("accepted")
    netns_pair.cut_server()
    cli.send_line()
    res = cli.expect("recv", timeout=15)
    fields = dict(f.split("=") for f in res.split()[1:])
    assert fields["errno"] == "ETIMEDOUT", res
    # Idle since the handshake, just before the cut: about 7 s, well past
    # the policy's own 5 s.
    assert 6.0 <= float(fields["elapsed"]) <= 7.5, res


def test_enforce_holds_with_an_option_buffer_above_a_page(bk, cgroups):
    """setsockopt with optlen > 4096: the kernel ignores a program's buffer
    unless the program says how much of it to use."""
    cg = cgroups.make("big")
    bk("attach", "--cgroup", cgroups.rel(cg), *ENFORCE)
    code = (
        "import socket, struct, sys\n"
        "open(sys.argv[1] + '/cgroup.procs', 'w').write('0')\n"
        "srv = socket.create_server(('127.0.0.1', 0))\n"
        "c = socket.create_connection(srv.getsockname())\n"
        "c.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, bytes(8192))\n"
        "big = struct.pack('i', 30000) + bytes(8188)\n"
        "c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, big)\n"
        "print(c.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),"
        " c.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, cg], capture_output=True, text=True)
    assert out.stdout.split() == ["1", "7"], out


def test_enforce_sweep_rechecks_sockets_outside_the_hooks(bk, cgroups, spawn):
    """An accepted socket of a listener made elsewhere (socket activation)
    has no setsockopt hook: the program can change it freely.  Each sweep in
    enforce mode checks such sockets again."""
    import socket

    svc = cgroups.make("svc")
    lst = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(lst.getsockname())
    acc, _ = lst.accept()
    holder = spawn(["sleep", "60"], cgroup=svc, pass_fds=(acc.fileno(),))
    assert holder.proc.poll() is None
    bk("attach", "--cgroup", cgroups.rel(svc), *ENFORCE)
    assert acc.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    acc.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)  # no hook stops it here
    acc.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 3000)
    bk("attach", "--cgroup", cgroups.rel(svc), *ENFORCE)  # same policy: a sweep
    assert acc.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert acc.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
    for s in (acc, cli, lst):
        s.close()


def test_a_held_socket_keeps_the_policy_of_the_cgroup_it_was_made_in(bk, cgroups, spawn):
    strict, lax = cgroups.make("strict"), cgroups.make("lax")
    bk("attach", "--cgroup", cgroups.rel(strict), *ENFORCE)
    code = (
        "import socket, sys\n"
        "open(sys.argv[1] + '/cgroup.procs', 'w').write('0')\n"
        "srv = socket.create_server(('127.0.0.1', 0))\n"
        "c = socket.create_connection(srv.getsockname())\n"
        "open(sys.argv[2] + '/cgroup.procs', 'w').write('0')\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "print('keepidle', c.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), flush=True)\n"
    )
    p = spawn([sys.executable, "-c", code, strict, lax])
    p.expect("ready")
    bk("attach", "--cgroup", cgroups.rel(lax), "--keepidle", "100")
    p.send_line()
    assert p.expect("keepidle").split()[1] == "7"


def test_detaching_a_parent_leaves_the_childs_listeners_alone(bk, cgroups, spawn, probes):
    parent, child = cgroups.make("b"), cgroups.make("b/c")
    bk("attach", "--cgroup", cgroups.rel(parent), "--keepidle", "100")
    bk("attach", "--cgroup", cgroups.rel(child), "--keepidle", "200")
    srv, _port = listen(spawn, probes, child, mode="listen")
    assert srv.values("listener")["keepidle"] == 200
    bk("detach", "--cgroup", cgroups.rel(parent))
    connect(spawn, probes, _port).values("client")
    srv.values("accepted")
    srv.send_line()
    assert srv.values("now-listener")["keepidle"] == 200
