"""Upgrades across a BPF map layout change: attachments made by bpfkeep 0.1
(its programs and policy layout, kept in tests/data/bpf-0.1) move to this
version's programs with the policy kept and no moment without it."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import bpftool_prog_ids, ss_keepalive_timers

from bpfkeep.enforcer import Enforcer
from bpfkeep.kernel import bpfsys
from bpfkeep.options import Policy
from bpfkeep.progs import maps as bpfmaps

pytestmark = pytest.mark.kernel

OLD_SRC = Path(__file__).resolve().parent / "data" / "bpf-0.1"
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
    from bpfkeep.progs.kheaders import bcc_environment

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
