"""Upgrades: attachments made by an earlier bpfkeep move to this version's
programs with the policy kept and no moment without it -- across a BPF map
layout change (bpfkeep 0.1, its sources in tests/data/bpf-0.1) and across
the split of the programs into one file per hook (0.2, tests/data/bpf-0.2)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import bpftool_prog_ids, ss_keepalive_timers

from bpfkeep.enforcer import Enforcer
from bpfkeep.kernel import bpfsys
from bpfkeep.kernel.cgroups import resolve
from bpfkeep.options import Policy
from bpfkeep.pins.attach import Writer
from bpfkeep.pins.pindir import PinDir
from bpfkeep.progs import header as bk_header
from bpfkeep.progs import loader
from bpfkeep.progs import maps as bpfmaps
from bpfkeep.progs.kheaders import bcc_environment

pytestmark = pytest.mark.kernel

OLD_SRC = Path(__file__).resolve().parent / "data" / "bpf-0.1"
SRC_0_2 = Path(__file__).resolve().parent / "data" / "bpf-0.2"
OLD_OBJECTS = ("prog_sockops", "prog_setsockopt", "map_policy", "map_counters", "map_policies")

# bpfkeep 0.1's loader, reduced to what it did: compile with bcc, pin.
_LOAD_OLD = """
import os, sys
from bcc import BPF, BPFAttachType
from bcc.libbcc import lib
src, out = sys.argv[1], sys.argv[2]
b = BPF(src_file=(src + "/keepalive.bpf.c").encode(), cflags=["-I" + src, "-Wno-unused-function"])
fds = {
    "prog_sockops": b.load_func(b"bk_sockops", BPF.SOCK_OPS).fd,
    "prog_setsockopt": b.load_func(
        b"bk_setsockopt", 25, attach_type=BPFAttachType.CGROUP_SETSOCKOPT
    ).fd,
}
for pin, name in (("map_policy", b"bk_policy"), ("map_counters", b"bk_counters"),
                  ("map_policies", b"bk_policies")):
    fds[pin] = lib.bpf_table_fd(b.module, name)
os.makedirs(out)
for name, fd in fds.items():
    lib.bpf_obj_pin(fd, os.path.join(out, name).encode())
"""


def _old_install(pin_dir: str, cg_path: str, policy: Policy) -> dict[str, int]:
    """Load 0.1's programs under obj-0ld..., attach them to a cgroup and
    write the policy in 0.1's layout, as bpfkeep 0.1 left it pinned."""
    obj = os.path.join(pin_dir, "obj-0ld0ld0ld0ld")
    subprocess.run(
        [sys.executable, "-c", _LOAD_OLD, str(OLD_SRC), obj],
        env=bcc_environment(),
        check=True,
        capture_output=True,
    )
    fds = {n: bpfsys.obj_get(os.path.join(obj, n)) for n in OLD_OBJECTS}
    links = os.path.join(pin_dir, "links")
    os.makedirs(links, exist_ok=True)
    cg_id = os.stat(cg_path).st_ino
    cgfd = os.open(cg_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for hook, atype in (
            ("sockops", bpfsys.BPF_CGROUP_SOCK_OPS),
            ("setsockopt", bpfsys.BPF_CGROUP_SETSOCKOPT),
        ):
            lfd = bpfsys.link_create(fds[f"prog_{hook}"], cgfd, atype)
            bpfsys.obj_pin(lfd, os.path.join(links, f"{cg_id}_{hook}"))
            os.close(lfd)
        flags = bpfmaps.F_ACTIVE | (bpfmaps.F_ENFORCE if policy.mode == "enforce" else 0)
        vals = [policy.value(o.key) for o in bpfmaps.BPF_OPTIONS]
        raw = struct.pack(bpfmaps.LEGACY_POLICY_FMT, cg_id, flags, *vals, 0)
        key = struct.pack("=Q", cg_id)
        bpfsys.map_update(fds["map_policy"], key, raw, bpfsys.BPF_EXIST)
        bpfsys.map_update(fds["map_policies"], key, raw)
        return {h: bpfsys.prog_id(fds[f"prog_{h}"]) for h in ("sockops", "setsockopt")}
    finally:
        os.close(cgfd)
        for fd in fds.values():
            os.close(fd)


def test_attachments_of_0_1_migrate_across_the_layout_change(bk, cgroups, spawn, probes, pin_dir):
    cg, other = cgroups.make("svc"), cgroups.make("other")
    policy = Policy.from_mapping({"keepidle": 23, "keepcnt": 4, "mode": "enforce"})
    old = _old_install(pin_dir, cg, policy)
    assert bpftool_prog_ids(cg, "cgroup_sock_ops") == [old["sockops"]]
    srv = spawn([probes["static"], "listen", "127.0.0.1", "0", "hold"])
    port = int(srv.expect("ready").split()[1])
    held = spawn([probes["static"], "connect", "127.0.0.1", str(port), "hold"], cgroup=cg)
    assert held.values("client")["keepidle"] == 23  # 0.1's programs at work

    bk("attach", "--cgroup", cgroups.rel(other), "--keepidle", "31")  # this version

    new = Enforcer(pin_dir).program_ids()
    assert bpftool_prog_ids(cg, "cgroup_sock_ops") == [new["sockops"]]
    assert bpftool_prog_ids(cg, "cgroup_setsockopt") == [new["setsockopt"]]
    assert not os.path.exists(os.path.join(pin_dir, "obj-0ld0ld0ld0ld"))
    status = {a["cgroup"]: a for a in json.loads(bk("status", "--json").stdout)}
    mine = status["/" + cgroups.rel(cg)]
    assert (mine["policy"]["keepidle"], mine["policy"]["keepcnt"]) == (23, 4)
    assert mine["policy"]["mode"] == "enforce"
    v = spawn(
        [probes["static"], "connect", "127.0.0.1", str(port), "set", "keepidle=900", "hold"],
        cgroup=cg,
    )
    assert v.values("client")["keepidle"] == 23 and v.values("client-after")["keepidle"] == 23
    # The connection made under 0.1's programs keeps its keepalive.
    held.send_line()
    assert held.values("now-client", consume=True)["keepidle"] == 23
    assert any(t.startswith("timer:(keepalive") for t in ss_keepalive_timers(port))
    # And a later update reaches it through this version's sweep.
    bk("attach", "--cgroup", cgroups.rel(cg), "--keepidle", "24", "--mode", "enforce")
    held.send_line()
    assert held.values("now-client", consume=True)["keepidle"] == 24


# bpfkeep 0.2's loader (bpfkeep/progs/loader.py at fb23549), reduced to what
# it did: compile keepalive.bpf.c with bcc, pin the programs and the maps.
_LOAD_0_2 = """
import os, sys
from bcc import BPF, BPFAttachType
from bcc.libbcc import lib
src, out = sys.argv[1], sys.argv[2]
b = BPF(src_file=(src + "/keepalive.bpf.c").encode(), cflags=["-I" + src, "-Wno-unused-function"])
fds = {
    "prog_sockops": b.load_func(b"bk_sockops", BPF.SOCK_OPS).fd,
    "prog_setsockopt": b.load_func(
        b"bk_setsockopt", 25, attach_type=BPFAttachType.CGROUP_SETSOCKOPT
    ).fd,
    "prog_sweep": b.load_func(b"bpf_iter__tcp", BPF.TRACING).fd,
}
for pin, name in (("map_policy", b"bk_policy"), ("map_counters", b"bk_counters"),
                  ("map_policies", b"bk_policies"), ("map_sk", b"bk_sk"),
                  ("map_sweep", b"bk_sweep"), ("map_sweepstats", b"bk_sweepstats")):
    fds[pin] = lib.bpf_table_fd(b.module, name)
os.makedirs(out)
for name, fd in fds.items():
    assert fd >= 0 and lib.bpf_obj_pin(fd, os.path.join(out, name).encode()) == 0, name
"""


def _install_0_2(pin_dir: str, cg_rel: str, policy: Policy) -> tuple[str, dict[str, int]]:
    """0.2's programs loaded and pinned as bpfkeep 0.2 did (obj-V, V the
    hash of its sources), and attached to a cgroup through 0.2's attach
    path, which is this version's (pins.attach: the same links, the same
    bk_policy layout).  Returns the object directory and the program ids."""
    pins = PinDir(pin_dir, bk_header.source_version(SRC_0_2))
    subprocess.run(
        [sys.executable, "-c", _LOAD_0_2, str(SRC_0_2), pins.obj_dir],
        env=bcc_environment(),
        check=True,
        capture_output=True,
    )
    pins.make()
    # Opened as another version's set (0.2 lacks the maps added since).
    with pins.lock(), PinDir(pin_dir).objects(pins.obj_dir) as objs:
        assert Writer(pins, objs).attach(resolve(cg_rel), policy) == "attached"
    return pins.obj_dir, pins.program_ids()


def _tallies(probe, role: str) -> list[dict[str, int]]:
    """A churn probe's counts, once it has ended: each distinct set of
    values its sockets had (as ``role``), with ``n``, how many had it."""
    probe.expect("done", timeout=30)  # its last line
    assert not [ln for ln in probe.lines if ln.startswith(role + "-other ")], probe.lines
    rows = [ln for ln in probe.lines if ln.startswith(role + " ")]
    return [{k: int(v) for k, v in (f.split("=") for f in ln.split()[1:])} for ln in rows]


def test_attachments_of_0_2_move_to_the_split_programs_without_a_gap(
    bk, cgroups, spawn, probes, pin_dir
):
    """0.2 compiled one keepalive.bpf.c; this version one file per hook
    over a shared header.  Same objects and policy layout, other sources:
    the upgrade migrates 0.2's attachments.  A workload that connects
    without a pause all through the migration, and sets its own keepidle
    on every socket, finds the policy in force on each; the connection held
    from before keeps it; the cgroup ends with this version's programs."""
    old_layout = bk_header.parse_header(bk_header._source(SRC_0_2 / "bpfkeep.h"))
    old_policy = old_layout.struct("bk_policy")
    new_policy = bk_header.header().struct("bk_policy")
    # 0.2's bk_policy is where this version's starts (what came since, peer
    # rules and keepidle auto, was added at its end): _install_0_2 writes
    # 0.2's value with this version's attach path, the kernel taking the
    # first 0.2-value-size bytes of it; the migration reads it back in
    # 0.2's layout (maps.decode_any_policy).
    assert new_policy.members[: len(old_policy.members)] == old_policy.members, (
        "struct bk_policy changed since 0.2 other than at its end: write 0.2's value "
        "in its own layout, as _old_install does for 0.1"
    )
    assert old_policy.size < new_policy.size
    assert bk_header.source_version(SRC_0_2) != bk_header.source_version()
    cg, other = cgroups.make("svc"), cgroups.make("other")
    policy = Policy.from_mapping({"keepidle": 23, "keepcnt": 4, "mode": "enforce"})
    old_dir, old = _install_0_2(pin_dir, cgroups.rel(cg), policy)
    assert bpftool_prog_ids(cg, "cgroup_sock_ops") == [old["sockops"]]
    assert bpftool_prog_ids(cg, "cgroup_setsockopt") == [old["setsockopt"]]
    srv = spawn([probes["static"], "listen", "127.0.0.1", "0", "hold"])
    port = int(srv.expect("ready").split()[1])
    held = spawn([probes["static"], "connect", "127.0.0.1", str(port), "hold"], cgroup=cg)
    assert held.values("client")["keepidle"] == 23  # 0.2's programs at work
    churn = spawn([probes["static"], "churn", "127.0.0.1", "0", "set", "keepidle=900"], cgroup=cg)
    churn.expect("ready")
    # 0.2's programs count the held connection and the churn's.
    # (Read in 0.2's layout of bk_counters: per-CPU slots of its size.)
    counters = old_layout.struct("bk_counters")
    with PinDir(pin_dir, bk_header.source_version(SRC_0_2)).one(loader.MAP_COUNTERS) as fd:
        raw = bpfsys.map_lookup(
            fd, struct.pack("=Q", os.stat(cg).st_ino), bpfmaps.percpu_value_size(counters.size)
        )
    assert raw is not None
    step = (counters.size + 7) // 8 * 8
    connects = sum(counters.unpack(raw, at)["seen"][0] for at in range(0, len(raw), step))
    assert connects >= 2

    bk("attach", "--cgroup", cgroups.rel(other), "--keepidle", "31")  # this version

    new = Enforcer(pin_dir).program_ids()
    assert new["sockops"] != old["sockops"] and new["setsockopt"] != old["setsockopt"]
    assert bpftool_prog_ids(cg, "cgroup_sock_ops") == [new["sockops"]]
    assert bpftool_prog_ids(cg, "cgroup_setsockopt") == [new["setsockopt"]]
    assert not os.path.exists(old_dir)
    assert not [n for n in os.listdir(os.path.join(pin_dir, "links")) if n.endswith("_next")]
    # The churn goes on under the new programs: they see its connections
    # and cap its keepidle.
    deadline = time.monotonic() + 10
    while True:
        status = {a["cgroup"]: a for a in json.loads(bk("status", "--json").stdout)}
        mine = status["/" + cgroups.rel(cg)]
        counted = mine["counters"]["seen"]["connect"], mine["counters"]["rewritten"]["keepidle"]
        if min(counted) > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert min(counted) > 0, mine["counters"]
    assert (mine["policy"]["keepidle"], mine["policy"]["keepcnt"]) == (23, 4)
    assert mine["policy"]["mode"] == "enforce"
    churn.send_line()
    # Every socket of the churn, from before the migration to after it, had
    # the policy at connect() and kept keepidle 23 when it asked for 900.
    for role in ("churn", "churn-after"):
        kinds = _tallies(churn, role)
        assert kinds and all(
            (k["keepalive"], k["keepidle"], k["keepcnt"]) == (1, 23, 4) for k in kinds
        ), (role, kinds)
    # The connection made under 0.2's programs keeps its keepalive, and a
    # later update reaches it through this version's sweep.
    held.send_line()
    assert held.values("now-client", consume=True)["keepidle"] == 23
    assert any(t.startswith("timer:(keepalive") for t in ss_keepalive_timers(port))
    bk("attach", "--cgroup", cgroups.rel(cg), "--keepidle", "24", "--mode", "enforce")
    held.send_line()
    assert held.values("now-client", consume=True)["keepidle"] == 24


def test_what_a_policy_lost_and_learned_moves_with_it(bk, cgroups, pin_dir):
    """Its lost connections' counters and the idle limits learned for its
    paths are in maps of the version that made them; an upgrade carries
    them to the next version's, so counters keep counting and keepidle =
    "auto" starts from what it knew.  (The version before is this one's
    object set under another name: same layouts, other programs.)"""
    cg = cgroups.make("svc")
    bk("attach", "--cgroup", cgroups.rel(cg), "--keepidle", "auto")
    enf = Enforcer(pin_dir)
    owner = os.stat(cg).st_ino
    net = bytes(10) + b"\xff\xff" + bytes([10, 1, 2, 0])
    path_key = bpfmaps.path_key(owner, "*", net)
    learned = bpfmaps.Learned(keepidle=12, limit=25, upper_ms=25_000, lower_ms=6_000,
                              upper_at=int(time.time()), losses=1, ignored=0)  # fmt: skip
    loss_key = bpfmaps.LOSS_KEY.pack(owner=owner, tag=0, pad=0)
    with enf.pins.objects() as objs:
        bpfsys.map_update(objs[loader.MAP_LEARNED], path_key, learned.encode())
        size = bpfsys.map_info(objs[loader.MAP_LOSSES])[3]
        lost = bytearray(size)
        lost[: bpfmaps.LOSSES.size] = bpfmaps.LOSSES.pack(
            lost=[2, 0, 0, 1], idle=[0] * bpfmaps.NIDLE, idle_ms=30_000
        )
        bpfsys.map_update(objs[loader.MAP_LOSSES], loss_key, bytes(lost))
    before = Enforcer(pin_dir).program_ids()
    os.rename(enf.obj_dir, os.path.join(pin_dir, "obj-earlier"))

    bk("attach", "--cgroup", cgroups.rel(cgroups.make("other")), "--keepidle", "31")

    assert Enforcer(pin_dir).program_ids()["sockops"] != before["sockops"]
    assert not os.path.exists(os.path.join(pin_dir, "obj-earlier"))
    (mine,) = [a for a in json.loads(bk("status", "--json").stdout) if a["cgroup_id"] == owner]
    assert mine["learned"]["10.1.2.0/24"]["limit"] == 25
    assert mine["learned"]["10.1.2.0/24"]["keepidle"] == 12
    assert sum(mine["lost_connections"]["*"]["lost"].values()) == 3
