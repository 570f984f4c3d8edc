"""``bpfkeep audit`` against the real kernel, cross-checked with ss and with
pyroute2's own inet_diag decoder; and its pure parts without root.

Kernel tests are marked one by one (not the whole module) so the decoding
and formatting tests below also run unprivileged.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time

import pytest
from conftest import bpfkeep_cmd

from bpfkeep.audit import command as audit_command
from bpfkeep.audit import sockets as audit
from bpfkeep.audit.sockets import SocketRecord
from bpfkeep.kernel import procfs, sockdiag

kernel = pytest.mark.kernel


# -- helpers -----------------------------------------------------------------


def audit_cli(pin_dir: str, *args: str, netns: str | None = None) -> subprocess.CompletedProcess:
    """``bpfkeep audit ...``: the installed console script, in its own process."""
    cmd = bpfkeep_cmd(pin_dir, "audit", *args)
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc


def ss_sockets() -> dict[int, dict[str, str]]:
    """inode -> {"timer": name or "none", "cgroup": path} for every TCP
    socket with an inode, as ss (not bpfkeep) reads them."""
    out = subprocess.run(["ss", "-tanoeH"], capture_output=True, text=True, check=True).stdout
    found = {}
    for ln in out.splitlines():
        ino = re.search(r"\bino:(\d+)", ln)
        if not ino or ino.group(1) == "0":
            continue
        timer = re.search(r"timer:\((\w+)", ln)
        cg = re.search(r"\bcgroup:(\S+)", ln)
        found[int(ino.group(1))] = {
            "state": ln.split()[0],
            "timer": timer.group(1) if timer else "none",
            "cgroup": cg.group(1) if cg else "?",
        }
    return found


def listen(spawn, probes, cgroup, host="127.0.0.1"):
    srv = spawn([probes["static"], "listen", host, "0", "hold"], cgroup=cgroup)
    return srv, int(srv.expect("ready").split()[1])


def connect(spawn, probes, port, cgroup, host="127.0.0.1"):
    cli = spawn([probes["static"], "connect", host, str(port), "hold"], cgroup=cgroup)
    cli.expect("client-after ")
    return cli


def wait_accepted(*servers) -> None:
    for srv in servers:
        srv.expect("accepted ")


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


# -- against the kernel --------------------------------------------------------


@kernel
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_audit_sees_covered_uncovered_and_pre_policy_sockets(
    bk, pin_dir, cgroups, spawn, probes, host
):
    servers_cg = cgroups.make("servers")  # no policy: accepted sockets stay off
    inside = cgroups.make("inside")
    outside = cgroups.make("outside")
    ids = {
        name: os.stat(p).st_ino
        for name, p in [("srv", servers_cg), ("in", inside), ("out", outside)]
    }
    (srv_a, port_a), (srv_b, port_b), (srv_c, port_c) = (
        listen(spawn, probes, servers_cg, host) for _ in range(3)
    )
    before = connect(spawn, probes, port_a, inside, host)  # before the policy
    # --no-existing: the sockets made before the attach stay as they were,
    # which is what the audit must show.
    bk("attach", "--cgroup", cgroups.rel(inside), "--no-existing", "--keepidle", "30")
    after = connect(spawn, probes, port_b, inside, host)
    other = connect(spawn, probes, port_c, outside, host)
    wait_accepted(srv_a, srv_b, srv_c)

    records = [r for r in audit.scan() if r.cgroup_id in ids.values()]
    family = "ipv6" if ":" in host else "ipv4"
    assert {r.family for r in records} == {family}
    by_remote = {(r.cgroup_id, port_of(r.remote)): r for r in records if r.state == "ESTABLISHED"}
    # Clients: the one connected before the attach is uncovered.
    assert by_remote[ids["in"], port_a].keepalive is False
    assert by_remote[ids["in"], port_b].keepalive is True
    assert by_remote[ids["out"], port_c].keepalive is False
    for proc, port, cg in ((before, port_a, "in"), (after, port_b, "in"), (other, port_c, "out")):
        r = by_remote[ids[cg], port]
        assert r.pid == proc.proc.pid
        assert r.comm == os.path.basename(probes["static"])[:15]  # comm is cut at 15
        assert r.keepalive_known and r.inode > 0
    # Servers: three listeners (no timer, not in coverage), three accepted sockets.
    listeners = [r for r in records if r.state == "LISTEN"]
    assert sorted(port_of(r.local) for r in listeners) == sorted([port_a, port_b, port_c])
    assert all(r.cgroup_id == ids["srv"] and not r.keepalive for r in listeners)

    cov = audit.coverage(records)
    assert cov == {ids["in"]: (1, 2), ids["out"]: (0, 1), ids["srv"]: (0, 3)}
    # The daemon's fast path (established only, counted from the dump) agrees.
    fast = audit.established_coverage()
    assert {k: fast.get(k) for k in ids.values()} == cov

    # The kernel's own view through ss agrees on every socket: timer and cgroup.
    seen = ss_sockets()
    for r in records:
        assert r.inode in seen, r
        assert (seen[r.inode]["timer"] == "keepalive") == r.keepalive, (r, seen[r.inode])
        assert seen[r.inode]["cgroup"] == "/" + cgroups.rel(
            {ids["srv"]: servers_cg, ids["in"]: inside, ids["out"]: outside}[r.cgroup_id]
        )

    # One cgroup only, through the CLI.
    doc = json.loads(audit_cli(pin_dir, "--cgroup", cgroups.rel(inside), "--json").stdout)
    assert {s["cgroup_id"] for s in doc["sockets"]} == {ids["in"]}
    assert {s["cgroup"] for s in doc["sockets"]} == {"/" + cgroups.rel(inside)}
    assert sorted((port_of(s["remote"]), s["keepalive"]) for s in doc["sockets"]) == sorted(
        [(port_a, False), (port_b, True)]
    )
    assert doc["coverage"] == [
        {
            "cgroup_id": ids["in"],
            "cgroup": "/" + cgroups.rel(inside),
            "policy_from": "/" + cgroups.rel(inside),
            "armed": 1,
            "established": 2,
            "uncovered": 1,
            "unknown": 0,
        }
    ]


@kernel
def test_audit_text_output_and_policy_of_an_ancestor(bk, pin_dir, cgroups, spawn, probes):
    parent = cgroups.make("svc")
    child = cgroups.make("svc/worker")
    servers_cg = cgroups.make("servers")
    bk("attach", "--cgroup", cgroups.rel(parent), "--keepidle", "40")
    (srv1, p1), (srv2, p2) = listen(spawn, probes, servers_cg), listen(spawn, probes, servers_cg)
    c1 = connect(spawn, probes, p1, child)
    connect(spawn, probes, p2, child)
    wait_accepted(srv1, srv2)

    text = audit_cli(pin_dir).stdout
    child_name, parent_name = "/" + cgroups.rel(child), "/" + cgroups.rel(parent)
    servers_name = "/" + cgroups.rel(servers_cg)
    assert (
        f"  {child_name}: 2/2 established sockets with keepalive armed [policy: {parent_name}]"
        in text.splitlines()
    )
    assert (
        f"  {servers_name}: 0/2 established sockets with keepalive armed (2 uncovered)"
        in text.splitlines()
    )
    rows = [ln.split() for ln in text.splitlines() if ln.endswith(child_name)]
    assert len(rows) == 2
    assert all(row[0] == "ESTABLISHED" and row[3] == "armed" for row in rows)
    assert f"{c1.proc.pid}/sockprobe-stati" in {row[4] for row in rows}
    listeners = text.split("listeners")[1].split("coverage")[0]
    assert listeners.count(servers_name) == 2


@kernel
def test_decoding_matches_pyroute2(cgroups, spawn, probes):
    """The hand-written inet_diag decoder against pyroute2's DiagSocket."""
    from pyroute2 import DiagSocket

    cg = cgroups.make("pair")
    cg_id = os.stat(cg).st_ino
    ports = []
    for host in ("127.0.0.1", "::1"):
        srv, port = listen(spawn, probes, cg, host)
        connect(spawn, probes, port, cg, host)
        wait_accepted(srv)
        ports.append(port)
    mine = {
        (r.family, r.state, r.local, r.remote, r.inode, r.cgroup_id, r.timer)
        for r in audit.scan(cg_id, with_owners=False)
    }
    theirs = set()
    with DiagSocket() as ds:
        ds.bind()
        for fam, name in ((socket.AF_INET, "ipv4"), (socket.AF_INET6, "ipv6")):
            for m in ds.get_sock_stats(family=fam, states=sockdiag.FULL_SOCKETS):
                if m.get_attr("INET_DIAG_CGROUP_ID") != cg_id:
                    continue
                src, dst = m["idiag_src"], m["idiag_dst"]
                if fam == socket.AF_INET6:
                    src, dst = f"[{src}]", f"[{dst}]"
                theirs.add(
                    (
                        name,
                        sockdiag.STATE_NAMES[m["idiag_state"]],
                        f"{src}:{m['idiag_sport'] or '*'}",
                        f"{dst}:{m['idiag_dport'] or '*'}",
                        m["idiag_inode"],
                        cg_id,
                        m["idiag_timer"],
                    )
                )
    assert mine == theirs
    assert len(mine) == 6  # per family: a listener, a client, an accepted socket


@kernel
def test_busy_socket_has_unknown_keepalive_state(bk, cgroups, spawn, probes, netns_pair):
    """Unacknowledged data arms the retransmit timer, which inet_diag reports
    instead of the keepalive timer: the socket is left out of coverage."""
    inside = cgroups.make("busy")
    bk("attach", "--cgroup", cgroups.rel(inside), "--keepidle", "30")
    srv = spawn(
        [probes["static"], "listen", netns_pair.server_ip, "0", "hold"], netns=netns_pair.server
    )
    port = srv.expect("ready").split()[1]
    cli = spawn(
        [probes["static"], "wait", netns_pair.server_ip, port, "send", "1000"],
        cgroup=inside,
        netns=netns_pair.client,
    )
    cli.expect("client ")
    probe = (
        "import json, os, sys, time\n"
        "from bpfkeep.audit import sockets as audit\n"
        "cg = int(sys.argv[1])\n"
        "for _ in range(100):\n"
        "    recs = [r for r in audit.scan(cg) if r.state == 'ESTABLISHED']\n"
        "    if recs and (sys.argv[2] == 'idle' or recs[0].timer == 1):\n"
        "        break\n"
        "    time.sleep(0.05)\n"
        "print(json.dumps({'records': [r.as_dict() for r in recs],\n"
        "                  'coverage': audit.coverage(recs), 'unknown': audit.unknown(recs)}))\n"
    )
    cg_id = str(os.stat(inside).st_ino)

    def look(phase: str) -> dict:
        out = subprocess.run(
            ["ip", "netns", "exec", netns_pair.client, sys.executable, "-c", probe, cg_id, phase],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return json.loads(out)

    idle = look("idle")  # only the client netns has the client's socket
    (rec,) = idle["records"]
    assert (rec["timer_name"], rec["keepalive"], rec["keepalive_known"]) == (
        "keepalive",
        True,
        True,
    )
    assert idle["coverage"] == {cg_id: [1, 1]}

    netns_pair.cut_server()
    cli.send_line()
    busy = look("busy")
    (rec,) = busy["records"]
    assert (rec["timer_name"], rec["keepalive"], rec["keepalive_known"]) == (
        "retransmit",
        False,
        False,
    )
    assert busy["coverage"] == {cg_id: [0, 0]}
    assert busy["unknown"] == {cg_id: 1}


@kernel
def test_scan_is_fast_with_thousands_of_sockets(cgroups, spawn):
    """2,000 loopback connections (4,000 sockets) held by one process."""
    cg = cgroups.make("many")
    holder = (
        "import resource, socket, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (10000, 10000))\n"
        "ls = socket.socket(); ls.bind(('127.0.0.1', 0)); ls.listen(4096)\n"
        "keep = []\n"
        "for i in range(2000):\n"
        "    c = socket.create_connection(ls.getsockname())\n"
        "    if i % 2: c.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)\n"
        "    keep += [c, ls.accept()[0]]\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    p = spawn([sys.executable, "-c", holder], cgroup=cg)
    p.expect("ready", timeout=60)
    cg_id = os.stat(cg).st_ino
    timings = {}
    for owners in (False, True):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            recs = audit.scan(with_owners=owners)
            cov = audit.coverage(recs)
            best = min(best, time.perf_counter() - t0)
        timings[owners] = best
        assert cov[cg_id] == (1000, 4000)
        if owners:
            mine = [r for r in recs if r.cgroup_id == cg_id]
            assert {r.pid for r in mine} == {p.proc.pid}
    print(
        f"\nscan+coverage, {len(recs)} sockets: {timings[False] * 1000:.0f} ms, "
        f"with owners {timings[True] * 1000:.0f} ms"
    )
    assert timings[True] < 1.0


# -- pure parts (no root) ------------------------------------------------------


def _nlmsg(mtype: int, body: bytes, seq: int = 1) -> bytes:
    pad = b"\0" * (-len(body) % 4)
    return struct.pack("=IHHII", 16 + len(body), mtype, 2, seq, 0) + body + pad


def _diag_msg(family, state, timer, sport, dport, src, dst, inode, attrs=b"") -> bytes:
    body = struct.pack("=BBBB", family, state, timer, 0)
    body += struct.pack(">HH", sport, dport)
    for addr in (src, dst):
        body += socket.inet_pton(family, addr).ljust(16, b"\0")
    body += struct.pack("=IQIIIII", 0, 7, 0, 0, 0, 0, inode)
    return body + attrs


def _nla(atype: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), atype) + payload + b"\0" * (-len(payload) % 4)


def test_parse_decodes_ports_addresses_and_cgroup_id():
    attrs = _nla(8, b"\0") + _nla(15, b"\0\0\0\0") + _nla(21, struct.pack("=Q", 4242))
    buf = _nlmsg(
        20, _diag_msg(socket.AF_INET, 1, 2, 40000, 5432, "10.1.2.3", "10.9.8.7", 99, attrs)
    )
    buf += _nlmsg(20, _diag_msg(socket.AF_INET6, 10, 0, 443, 0, "::1", "::", 7))
    buf += _nlmsg(3, struct.pack("=i", 0))
    out: list = []
    assert sockdiag.parse(memoryview(buf), len(buf), 1, out) is True
    assert out[0][:5] == (socket.AF_INET, 1, 2, 40000, 5432)
    assert out[0][7:9] == (99, 4242)
    assert out[1][7:9] == (7, 0)  # no INET_DIAG_CGROUP_ID: unknown
    assert sockdiag.address(socket.AF_INET, out[0][5], 40000) == "10.1.2.3:40000"
    assert sockdiag.address(socket.AF_INET6, out[1][5], 443) == "[::1]:443"
    assert sockdiag.address(socket.AF_INET6, out[1][6], 0) == "[::]:*"


def test_parse_raises_the_kernels_error_and_waits_for_done():
    err = _nlmsg(2, struct.pack("=i", -22) + b"\0" * 16)
    with pytest.raises(OSError) as e:
        sockdiag.parse(memoryview(err), len(err), 1, [])
    assert e.value.errno == 22
    done = _nlmsg(3, struct.pack("=i", -4))
    with pytest.raises(OSError) as e:
        sockdiag.parse(memoryview(done), len(done), 1, [])
    assert e.value.errno == 4
    partial = _nlmsg(20, _diag_msg(socket.AF_INET, 1, 0, 1, 2, "127.0.0.1", "127.0.0.1", 5))
    out: list = []
    assert sockdiag.parse(memoryview(partial), len(partial), 1, out) is False
    assert len(out) == 1


def test_request_carries_the_cgroup_bytecode():
    plain = sockdiag.request(socket.AF_INET6, None, 9)
    length, mtype, flags, seq, _ = struct.unpack_from("=IHHII", plain)
    assert (length, mtype, flags, seq) == (len(plain), 20, 0x301, 9)
    family, proto, _, _, states = struct.unpack_from("=BBBBI", plain, 16)
    assert (family, proto) == (socket.AF_INET6, socket.IPPROTO_TCP)
    assert states & (1 << 1) and states & (1 << 10)  # ESTABLISHED, LISTEN
    assert not states & (1 << 6) and not states & (1 << 3)  # no TIME_WAIT, SYN_RECV
    filtered = sockdiag.request(socket.AF_INET, 1234, 1)
    assert len(filtered) == len(plain) + 16
    nla_len, nla_type, code, yes, no, cg = struct.unpack_from("=HHBBHQ", filtered, len(plain))
    # INET_DIAG_BC_CGROUP_COND is 13 (include/uapi/linux/inet_diag.h); 17
    # was sent before, and the kernel refused every filtered dump.
    assert (nla_len, nla_type, code, yes, no, cg) == (16, 1, 13, 12, 16, 1234)


def test_a_filter_by_several_cgroups_is_a_chain_ss_would_send():
    """cgroup A or B or C: each condition goes on to a jump to the end when
    true, to the next condition when false (past the end from the last)."""
    ops = sockdiag.cgroup_bytecode([7, 8, 9])
    assert len(ops) == 3 * 12 + 2 * 4
    c1, j1, c2, j2, c3 = (
        struct.unpack_from("=BBHQ", ops, 0),
        struct.unpack_from("=BBH", ops, 12),
        struct.unpack_from("=BBHQ", ops, 16),
        struct.unpack_from("=BBH", ops, 28),
        struct.unpack_from("=BBHQ", ops, 32),
    )
    assert c1 == (13, 12, 16, 7) and c2 == (13, 12, 16, 8) and c3 == (13, 12, 16, 9)
    assert j1 == (1, 4, 44 - 12) and j2 == (1, 4, 44 - 28)  # to the end
    with pytest.raises(ValueError):
        sockdiag.cgroup_bytecode([])


def rec(cg, state="ESTABLISHED", timer=2, keepalive=True) -> SocketRecord:
    return SocketRecord(
        "ipv4", state, "127.0.0.1:1", "127.0.0.1:2", 1, cg, timer, keepalive, None, None
    )


def test_coverage_counts_established_sockets_with_visible_state():
    recs = [
        rec(1),
        rec(1),
        rec(1, timer=0, keepalive=False),
        rec(1, timer=1, keepalive=False),  # retransmitting: unknown
        rec(1, state="LISTEN", timer=0, keepalive=False),
        rec(1, state="CLOSE_WAIT"),
        rec(2, timer=4, keepalive=False),  # zero-window probe: unknown
        rec(3, state="LISTEN", timer=0, keepalive=False),
    ]
    assert audit.coverage(recs) == {1: (2, 3), 2: (0, 0)}
    assert audit.unknown(recs) == {1: 1, 2: 1}
    assert not recs[4].keepalive_known and not recs[3].keepalive_known
    assert recs[3].as_dict()["timer_name"] == "retransmit"


def test_coverage_line():
    assert (
        audit_command.coverage_line("/system.slice/x.service", 12, 14)
        == "/system.slice/x.service: 12/14 established sockets with keepalive armed (2 uncovered)"
    )
    assert (
        audit_command.coverage_line("/a", 3, 3)
        == "/a: 3/3 established sockets with keepalive armed"
    )
    assert audit_command.coverage_line("/a", 3, 3, busy=2).endswith(
        "(2 more busy retransmitting: keepalive not visible)"
    )


def test_covering_policy_is_the_nearest_ancestor():
    pols = {"/a", "/a/b/c"}
    assert audit_command._covering("/a/b", pols) == "/a"
    assert audit_command._covering("/a/b/c/d", pols) == "/a/b/c"
    assert audit_command._covering("/z", pols) is None
    assert audit_command._covering("(unknown cgroup)", pols) is None


def test_owners_reads_proc_and_tolerates_what_it_cannot_read(tmp_path):
    for pid, fds, comm in ((10, {"3": "socket:[111]", "4": "pipe:[5]"}, "db"), (7, {}, "idle")):
        (tmp_path / str(pid) / "fd").mkdir(parents=True)
        for fd, target in fds.items():
            os.symlink(target, tmp_path / str(pid) / "fd" / fd)
        (tmp_path / str(pid) / "comm").write_text(comm + "\n")
    (tmp_path / "12").mkdir()  # vanished process: no fd directory
    (tmp_path / "20" / "fd").mkdir(parents=True)  # same socket, higher pid
    os.symlink("socket:[111]", tmp_path / "20" / "fd" / "9")
    (tmp_path / "self").mkdir()
    assert procfs.socket_owners({111, 222, 0}, proc=str(tmp_path)) == {111: (10, "db")}
    assert procfs.socket_owners(set(), proc=str(tmp_path)) == {}


def test_run_prints_json(monkeypatch):
    recs = [rec(0), rec(0, timer=0, keepalive=False)]
    monkeypatch.setattr(audit_command, "scan", lambda cgroup_id=None: list(recs))
    monkeypatch.setattr(audit_command, "_policy_cgroups", lambda pin_dir: set())
    out = io.StringIO()
    assert audit_command.run(argparse.Namespace(cgroup=None, json=True, pin_dir=None), out) == 0
    doc = json.loads(out.getvalue())
    assert doc["coverage"] == [
        {
            "cgroup_id": 0,
            "cgroup": None,
            "policy_from": None,
            "armed": 1,
            "established": 2,
            "uncovered": 1,
            "unknown": 0,
        }
    ]
    assert {s["keepalive"] for s in doc["sockets"]} == {True, False}
