"""The kernel enforcer against the real kernel: real cgroups, the real BPF
programs, real (static and dynamic) programs, read back with getsockopt in
the workload and with ss / bpftool from outside."""

from __future__ import annotations

import json
import os

import pytest
from conftest import bpftool_prog_ids, host_keepalive, host_sysctl, ss_keepalive_timers
from support import load_empty_sockops

pytestmark = pytest.mark.kernel

ALL = {
    "keepidle": "31",
    "keepintvl": "7",
    "keepcnt": "4",
    "user-timeout": "12345",
    "syncnt": "3",
    "maxseg": "1200",
    "window-clamp": "40000",
}


def policy_args(**kw: str) -> list[str]:
    out = []
    for k, v in kw.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def server(spawn, probes, host="127.0.0.1", cgroup=None, kind="dynamic", extra=()):
    srv = spawn([probes[kind], "listen", host, "0", *extra, "hold"], cgroup=cgroup)
    port = int(srv.expect("ready").split()[1])
    return srv, port


def client(spawn, probes, port, host="127.0.0.1", cgroup=None, kind="static", extra=()):
    cli = spawn([probes[kind], "connect", host, str(port), *extra, "hold"], cgroup=cgroup)
    return cli


def assert_policy(v: dict[str, int], keepidle=31, keepintvl=7, keepcnt=4, user_timeout=12345):
    assert v["keepalive"] == 1
    assert (v["keepidle"], v["keepintvl"], v["keepcnt"]) == (keepidle, keepintvl, keepcnt)
    assert v["user_timeout"] == user_timeout


def assert_untouched(v: dict[str, int], netns: str | None = None):
    """Nothing set: keepalive off, the times of the socket's network
    namespace (``netns``; default: this one)."""
    assert v["keepalive"] == 0
    assert (v["keepidle"], v["keepintvl"], v["keepcnt"]) == host_keepalive(netns)
    assert v["user_timeout"] == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_static_client_gets_every_option_only_inside(bk, cgroups, spawn, probes, host):
    inside = cgroups.make("app")
    bk("attach", "--cgroup", cgroups.rel(inside), *policy_args(**ALL))
    _srv, port = server(spawn, probes, host)

    cli = client(spawn, probes, port, host, cgroup=inside)
    v = cli.values("client")
    assert_policy(v)
    assert v["syncnt"] == 3
    # getsockopt(TCP_MAXSEG) on an established socket reports the current
    # MSS: the 1200 we asked for minus TCP options. 65483 without it.
    assert 1100 <= v["maxseg"] <= 1200
    assert 0 < v["window_clamp"] <= 40000

    outside = client(spawn, probes, port, host)
    w = outside.values("client")
    assert_untouched(w)
    assert (
        w["syncnt"] == host_sysctl("tcp_syn_retries")
        and w["maxseg"] > 1200
        and w["window_clamp"] > 40000
    )

    # From outside, through inet_diag: the connection made inside has its
    # keepalive timer armed (31 s); the one from outside has none.
    timers = ss_keepalive_timers(port)
    assert len([t for t in timers if t.startswith("timer:(keepalive")]) == 1, timers


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.parametrize(
    "listener_first", [True, False, "unswept"], ids=["listener-before", "listener-after", "unswept"]
)
def test_server_side(bk, cgroups, spawn, probes, host, listener_first):
    inside = cgroups.make("srv")
    if listener_first:
        srv = spawn([probes["static"], "accept", host, "0", "hold"], cgroup=inside)
        port = int(srv.expect("ready").split()[1])
        assert_untouched(srv.values("listener"))
        existing = ["--no-existing"] if listener_first == "unswept" else []
        bk("attach", "--cgroup", cgroups.rel(inside), *existing, *policy_args(**ALL))
        srv.send_line()
    else:
        bk("attach", "--cgroup", cgroups.rel(inside), *policy_args(**ALL))
        srv = spawn([probes["static"], "accept", host, "0", "hold"], cgroup=inside)
        port = int(srv.expect("ready").split()[1])
        assert_policy(srv.values("listener"))
        srv.send_line()
    cli = client(spawn, probes, port, host, kind="dynamic")
    assert_untouched(cli.values("client"))
    accepted = srv.values("accepted")
    assert_policy(accepted)

    status = json.loads(bk("status", "--json").stdout)
    (att,) = status
    seen = att["counters"]["seen"]
    if listener_first == "unswept":
        # The listener predates the policy and was left alone: the
        # accepted socket was set at PASSIVE_ESTABLISHED.
        assert seen == {"connect": 0, "listen": 0, "passive_established": 1}
        assert att["counters"]["inherited"] == 0
    elif listener_first:
        # The sweep gave the older listener the policy: inherited.
        assert seen == {"connect": 0, "listen": 0, "passive_established": 1}
        assert att["counters"]["inherited"] == 1
        assert att["counters"]["sweep"]["swept"] == 1
    else:
        # Set on the listener, inherited by the accepted socket.
        assert seen == {"connect": 0, "listen": 1, "passive_established": 1}
        assert att["counters"]["inherited"] == 1


def test_enforce_rewrites_static_programs_writes(bk, cgroups, spawn, probes):
    enforced, free = cgroups.make("enforced"), cgroups.make("free")
    bk("attach", "--cgroup", cgroups.rel(enforced), "--keepidle", "30", "--mode", "enforce")
    bk("attach", "--cgroup", cgroups.rel(free), "--keepidle", "30")
    _, port = server(spawn, probes)
    writes = ["set", "keepalive=0", "set", "keepidle=5000", "set", "keepcnt=3"]

    v = client(spawn, probes, port, cgroup=enforced, extra=writes).values("client-after")
    assert v["keepalive"] == 1  # 0 became 1
    assert v["keepidle"] == 30  # 5000 lowered to the policy's 30
    assert v["keepcnt"] == 3  # lower than the policy's 9: passes

    w = client(spawn, probes, port, cgroup=free, extra=writes).values("client-after")
    assert (w["keepalive"], w["keepidle"], w["keepcnt"]) == (0, 5000, 3)

    status = {a["cgroup"]: a for a in json.loads(bk("status", "--json").stdout)}
    rewritten = status["/" + cgroups.rel(enforced)]["counters"]["rewritten"]
    assert rewritten["keepalive"] == 1 and rewritten["keepidle"] == 1
    assert rewritten["keepcnt"] == 0


@pytest.mark.parametrize("order", ["parent-first", "child-first"])
def test_nested_most_specific_policy_wins(bk, cgroups, spawn, probes, order):
    parent = cgroups.make("parent")
    child = cgroups.make("parent/child")
    sibling = cgroups.make("parent/sibling")
    steps = [
        (parent, ["--keepidle", "100", "--mode", "enforce"]),
        (child, ["--keepidle", "200", "--mode", "enforce"]),
    ]
    if order == "child-first":
        steps.reverse()
    for cg, args in steps:
        bk("attach", "--cgroup", cgroups.rel(cg), *args)
    _, port = server(spawn, probes)

    v = client(spawn, probes, port, cgroup=child, extra=["set", "keepidle=150"]).values("client")
    assert v["keepidle"] == 200 and v["keepalive"] == 1
    # Enforcement follows the child's policy too: 150 is under its 200
    # (the parent's 100 would have lowered it).
    after = client(spawn, probes, port, cgroup=child, extra=["set", "keepidle=150"])
    assert after.values("client-after")["keepidle"] == 150
    # A cgroup without a policy of its own gets its ancestor's.
    s = client(spawn, probes, port, cgroup=sibling, extra=["set", "keepidle=150"])
    assert s.values("client")["keepidle"] == 100
    assert s.values("client-after")["keepidle"] == 100

    # Removing the child's policy hands its sockets to the parent, no gap.
    bk("detach", "--cgroup", cgroups.rel(child))
    assert client(spawn, probes, port, cgroup=child).values("client")["keepidle"] == 100


def test_update_detach_and_no_stacking(bk, cgroups, spawn, probes, pin_dir):
    from bpfkeep.kernel import bpfsys

    cg = cgroups.make("svc")
    _, port = server(spawn, probes)
    # Another tool's program on the same cgroup and hook: must stay.
    other = load_empty_sockops(b"other_tool")
    cgfd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
    try:
        bpfsys.prog_attach(other, cgfd, bpfsys.BPF_CGROUP_SOCK_OPS, bpfsys.BPF_F_ALLOW_MULTI)
        other_id = bpfsys.prog_id(other)

        bk("attach", "--cgroup", cgroups.rel(cg), "--keepidle", "30")
        first = set(bpftool_prog_ids(cg, "cgroup_sock_ops"))
        assert other_id in first and len(first) == 2
        assert client(spawn, probes, port, cgroup=cg).values("client")["keepidle"] == 30

        out = bk("attach", "--cgroup", cg, "--keepidle", "45", "--mode", "enforce")
        assert out.stdout.startswith("updated")
        assert set(bpftool_prog_ids(cg, "cgroup_sock_ops")) == first  # same programs, no stacking
        assert len(bpftool_prog_ids(cg, "cgroup_setsockopt")) == 1
        v = client(spawn, probes, port, cgroup=cg, extra=["set", "keepidle=999"])
        assert v.values("client")["keepidle"] == 45
        assert v.values("client-after")["keepidle"] == 45

        bk("detach", "--cgroup", cgroups.rel(cg))
        assert bpftool_prog_ids(cg, "cgroup_sock_ops") == [other_id]
        assert bpftool_prog_ids(cg, "cgroup_setsockopt") == []
        assert_untouched(client(spawn, probes, port, cgroup=cg).values("client"))
        assert json.loads(bk("status", "--json").stdout) == []
    finally:
        bpfsys.prog_detach(other, cgfd, bpfsys.BPF_CGROUP_SOCK_OPS)
        os.close(cgfd)
        os.close(other)


def test_attachment_outlives_cli_and_status_reads_it_back(bk, cgroups, spawn, probes):
    cg = cgroups.make("pool")
    bk("attach", "--cgroup", cgroups.rel(cg), "--keepidle", "21", "--keepcnt", "5")
    # The CLI process is gone; the kernel still enforces.
    _, port = server(spawn, probes)
    for _ in range(3):
        assert client(spawn, probes, port, cgroup=cg).values("client")["keepidle"] == 21
    (att,) = json.loads(bk("status", "--json").stdout)
    assert att["cgroup"] == "/" + cgroups.rel(cg)
    assert att["policy"]["keepidle"] == 21 and att["policy"]["keepcnt"] == 5
    assert att["policy"]["user_timeout"] == (21 + 15 * 5) * 1000
    assert att["counters"]["seen"]["connect"] == 3
    assert att["counters"]["applied"]["keepalive"] == 3
    text = bk("status").stdout
    assert "/" + cgroups.rel(cg) in text and "keepidle=21s" in text and "connect=3" in text


def test_removed_cgroup_is_forgotten(bk, cgroups, spawn, probes):
    gone = cgroups.make("gone")
    keep = cgroups.make("keep")
    bk("attach", "--cgroup", cgroups.rel(gone))
    bk("attach", "--cgroup", cgroups.rel(keep))
    os.rmdir(gone)
    bk("attach", "--cgroup", cgroups.rel(keep), "--keepidle", "50")
    names = [a["cgroup"] for a in json.loads(bk("status", "--json").stdout)]
    assert names == ["/" + cgroups.rel(keep)]


def test_run_uses_a_fresh_cgroup_and_passes_exit_status(bk, cgroups, spawn, probes):
    from bpfkeep.kernel.cgroups import cgroup2_mount

    def runs() -> set[str]:
        return {n for n in os.listdir(cgroup2_mount()) if n.startswith("bpfkeep-run-")}

    before = runs()  # other bpfkeep runs on this host are not ours to judge
    _, port = server(spawn, probes)
    out = bk("run", "--keepidle", "9", "--", probes["static"], "connect", "127.0.0.1", str(port))
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("client "))
    assert "keepalive=1" in line and "keepidle=9" in line
    assert bk("run", "--", "sh", "-c", "exit 7", check=False).returncode == 7
    assert runs() - before == set()
    assert json.loads(bk("status", "--json").stdout) == []


def test_dead_peer_detected_by_keepalive(bk, cgroups, spawn, probes, netns_pair):
    """Client and server in two namespaces; the server's link goes down
    while the connection is idle.  keepidle 2 + keepintvl 1 x keepcnt 3 =
    5 s bound; the program itself sets no option."""
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
        "--user-timeout",
        "0",
    )
    srv = spawn(
        [probes["static"], "listen", netns_pair.server_ip, "0", "hold"], netns=netns_pair.server
    )
    port = srv.expect("ready").split()[1]
    with_bk = spawn(
        [probes["static"], "wait", netns_pair.server_ip, port], cgroup=cg, netns=netns_pair.client
    )
    srv.expect("accepted")
    without = spawn([probes["static"], "wait", netns_pair.server_ip, port], netns=netns_pair.client)
    assert with_bk.values("client")["keepidle"] == 2
    assert without.values("client")["keepalive"] == 0
    netns_pair.cut_server()
    with_bk.send_line()
    without.send_line()
    res = with_bk.expect("recv", timeout=15)
    fields = dict(f.split("=") for f in res.split()[1:])
    assert fields["errno"] == "ETIMEDOUT", res
    assert float(fields["elapsed"]) <= 5.0 + 0.5, res
    # The same program outside the cgroup is still blocked: bpfkeep did it.
    assert without.proc.poll() is None
    assert not any(ln.startswith("recv") for ln in without.lines)


def test_dead_peer_with_pending_data_and_user_timeout(bk, cgroups, spawn, probes, netns_pair):
    cg = cgroups.make("client")
    bk("attach", "--cgroup", cgroups.rel(cg), "--keepidle", "600", "--user-timeout", "2000")
    srv = spawn(
        [probes["dynamic"], "listen", netns_pair.server_ip, "0", "hold"], netns=netns_pair.server
    )
    port = srv.expect("ready").split()[1]
    cli = spawn(
        [probes["static"], "wait", netns_pair.server_ip, port, "send", "1000"],
        cgroup=cg,
        netns=netns_pair.client,
    )
    assert cli.values("client")["user_timeout"] == 2000
    srv.expect("accepted")
    netns_pair.cut_server()
    cli.send_line()  # sends 1000 bytes that will never be acknowledged
    res = cli.expect("recv", timeout=15)
    fields = dict(f.split("=") for f in res.split()[1:])
    assert fields["errno"] == "ETIMEDOUT", res
    assert float(fields["elapsed"]) <= 2.0 + 0.5, res


def test_refused_option_is_counted_per_errno_and_the_rest_still_apply(
    bk, cgroups, spawn, probes, pin_dir
):
    """A kernel that refuses one option (TCP_MAXSEG and TCP_WINDOW_CLAMP
    before 6.1) must not cost the socket its other options.  6.18 accepts
    every valid value, so the test writes a policy the CLI would never
    produce (keepcnt 500 > the kernel's 127) straight into the map."""
    import struct

    from bpfkeep.enforcer import Enforcer
    from bpfkeep.kernel import bpfsys
    from bpfkeep.options import Policy
    from bpfkeep.progs import loader
    from bpfkeep.progs import maps as bpfmaps

    cg = cgroups.make("svc")
    bk("attach", "--cgroup", cgroups.rel(cg), "--keepidle", "25")
    cg_id = os.stat(cg).st_ino
    bad = Policy(keepidle=25, keepcnt=500, user_timeout=4000)
    fd = bpfsys.obj_get(os.path.join(Enforcer(pin_dir).obj_dir, loader.MAP_POLICY))
    try:
        value = bpfmaps.encode_policy(cg_id, bad)
        bpfsys.map_update(fd, struct.pack("=Q", cg_id), value, bpfsys.BPF_EXIST)
    finally:
        os.close(fd)
    _, port = server(spawn, probes)
    v = client(spawn, probes, port, cgroup=cg).values("client")
    assert v["keepalive"] == 1 and v["keepidle"] == 25 and v["user_timeout"] == 4000
    assert v["keepcnt"] == host_sysctl("tcp_keepalive_probes")  # refused: the default
    (att,) = json.loads(bk("status", "--json").stdout)
    assert att["counters"]["failed"] == {"keepcnt/EINVAL": 1}
    assert att["counters"]["applied"]["keepidle"] == 1
    assert "keepcnt/EINVAL=1" in bk("status").stdout


def test_other_program_version_is_migrated_without_gap(bk, cgroups, spawn, probes, pin_dir):
    """Attachments made by a bpfkeep whose BPF programs differ (an upgrade)
    move to this version's programs: policy kept, one program per hook,
    the old objects unpinned."""
    from bpfkeep.enforcer import Enforcer
    from bpfkeep.kernel.cgroups import resolve
    from bpfkeep.options import Policy

    cg, other = cgroups.make("svc"), cgroups.make("other")
    old = Enforcer(pin_dir, version="0ld0ld0ld0ld")  # compiles its own copy
    old.attach(resolve(cgroups.rel(cg)), Policy.from_mapping({"keepidle": 23, "mode": "enforce"}))
    old_progs = old.program_ids()
    assert bpftool_prog_ids(cg, "cgroup_sock_ops") == [old_progs["sockops"]]
    _, port = server(spawn, probes)
    held = client(spawn, probes, port, cgroup=cg)
    assert held.values("client")["keepidle"] == 23

    bk("attach", "--cgroup", cgroups.rel(other), "--keepidle", "31")  # this version

    new_progs = Enforcer(pin_dir).program_ids()
    assert new_progs["sockops"] != old_progs["sockops"]
    assert bpftool_prog_ids(cg, "cgroup_sock_ops") == [new_progs["sockops"]]
    assert bpftool_prog_ids(cg, "cgroup_setsockopt") == [new_progs["setsockopt"]]
    assert not os.path.exists(old.obj_dir)
    assert not [n for n in os.listdir(os.path.join(pin_dir, "links")) if n.endswith("_next")]
    status = {a["cgroup"]: a for a in json.loads(bk("status", "--json").stdout)}
    assert status["/" + cgroups.rel(cg)]["policy"]["keepidle"] == 23
    assert status["/" + cgroups.rel(cg)]["policy"]["mode"] == "enforce"
    v = client(spawn, probes, port, cgroup=cg, extra=["set", "keepidle=900"])
    assert v.values("client")["keepidle"] == 23 and v.values("client-after")["keepidle"] == 23
    # The connection made under the old programs keeps its keepalive timer.
    assert any(t.startswith("timer:(keepalive") for t in ss_keepalive_timers(port))


def test_detach_all_uninstalls(bk, cgroups, pin_dir):
    a, b = cgroups.make("a"), cgroups.make("b")
    bk("attach", "--cgroup", cgroups.rel(a))
    bk("attach", "--cgroup", cgroups.rel(b), "--mode", "enforce")
    out = bk("detach", "--all")
    assert "detached 2 cgroup(s)" in out.stdout
    for cg in (a, b):
        assert bpftool_prog_ids(cg, "cgroup_sock_ops") == []
        assert bpftool_prog_ids(cg, "cgroup_setsockopt") == []
    assert not os.path.exists(pin_dir)


def test_half_done_migration_is_finished_or_undone(bk, cgroups, pin_dir):
    """What a bpfkeep killed in the middle of a migration leaves behind is
    repaired by the next one: a second pin of the same link is dropped, a
    duplicate link is detached, a lone new link takes the canonical name."""
    from bpfkeep.enforcer import Enforcer
    from bpfkeep.kernel import bpfsys
    from bpfkeep.progs import loader

    same, dup, lone = cgroups.make("same"), cgroups.make("dup"), cgroups.make("lone")
    for cg in (same, dup, lone):
        bk("attach", "--cgroup", cgroups.rel(cg))
    links = os.path.join(pin_dir, "links")
    prog = bpfsys.obj_get(os.path.join(Enforcer(pin_dir).obj_dir, loader.PROG_SOCKOPS))
    try:
        for cg in (same, dup, lone):
            cg_id = os.stat(cg).st_ino
            canonical = os.path.join(links, f"{cg_id}_sockops")
            if cg is dup:  # a second bpfkeep link on the cgroup
                cgfd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
                fd = bpfsys.link_create(prog, cgfd, bpfsys.BPF_CGROUP_SOCK_OPS)
                os.close(cgfd)
            else:
                fd = bpfsys.obj_get(canonical)
            bpfsys.obj_pin(fd, canonical + "_next")
            os.close(fd)
            if cg is lone:
                os.unlink(canonical)
    finally:
        os.close(prog)
    assert len(bpftool_prog_ids(dup, "cgroup_sock_ops")) == 2

    bk("attach", "--cgroup", cgroups.rel(same), "--keepidle", "16")  # any bpfkeep start

    assert not [n for n in os.listdir(links) if n.endswith("_next")]
    for cg in (same, dup, lone):
        assert len(bpftool_prog_ids(cg, "cgroup_sock_ops")) == 1, cg
    assert sorted(a["cgroup"] for a in json.loads(bk("status", "--json").stdout)) == sorted(
        "/" + cgroups.rel(c) for c in (same, dup, lone)
    )
