"""What a reload (SIGHUP) writes into the kernel, read back through the
kernel: the policies new sockets get, bpfkeep status, and the bpf() calls
the daemon makes (strace).

- a reload that changes nothing writes nothing and sweeps nothing;
- one that changes every policy writes each cgroup's own storage once and
  the policy hash in one BPF_MAP_UPDATE_BATCH, without re-attaching;
- one that changes nothing still puts back a policy changed by hand in
  either map (bpftool map update).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import struct
import subprocess
import time

import pytest
import test_daemon
from conftest import bpftool_prog_ids
from test_daemon import free_port, keepidle_of_new_connection, rule, write_config

from bpfkeep.enforcer import Enforcer
from bpfkeep.kernel import bpfsys
from bpfkeep.progs import loader
from bpfkeep.progs import maps as bpfmaps

pytestmark = pytest.mark.kernel
daemon, listener = test_daemon.daemon, test_daemon.listener  # the fixtures

# bpf() commands that change something in the kernel.
WRITES = ("BPF_MAP_UPDATE_ELEM", "BPF_MAP_UPDATE_BATCH", "BPF_MAP_DELETE_ELEM", "BPF_LINK_CREATE")


class Strace:
    """strace -f on a running process, bpf() calls only."""

    def __init__(self, pid: int, out: str):
        self.pid, self.out = pid, out
        self.proc = subprocess.Popen(
            ["strace", "-f", "-qq", "-e", "trace=bpf", "-s", "0", "-o", out, "-p", str(pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Traced once every thread reports its tracer.
        deadline = time.monotonic() + 30
        while not self._attached():
            assert time.monotonic() < deadline, "strace did not attach"
            assert self.proc.poll() is None, "strace exited"
            time.sleep(0.02)

    def _attached(self) -> bool:
        tasks = os.listdir(f"/proc/{self.pid}/task")
        for tid in tasks:
            with open(f"/proc/{self.pid}/task/{tid}/status") as f:
                tracer = re.search(r"^TracerPid:\s+(\d+)", f.read(), re.M)
            if not tracer or tracer.group(1) != str(self.proc.pid):
                return False
        return bool(tasks)

    def stop(self) -> list[str]:
        self.proc.send_signal(signal.SIGINT)  # detaches cleanly
        self.proc.wait(timeout=30)
        with open(self.out) as f:
            return [ln for ln in f if "bpf(" in ln]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture()
def strace(tmp_path):
    made: list[Strace] = []

    def make(pid: int) -> Strace:
        s = Strace(pid, str(tmp_path / f"strace{len(made)}.txt"))
        made.append(s)
        return s

    yield make
    for s in made:
        s.kill()


def writes(calls: list[str]) -> list[str]:
    return [c for c in calls if any(f"bpf({w}," in c for w in WRITES)]


def reload_traced(d, strace, times: int = 1) -> list[str]:
    """SIGHUP ``times`` in a row under strace; the bpf() calls until the
    last reload's STATUS=.  That comes after whatever the reload before
    queued to run once it is done (a sweep)."""
    tracer = strace(d.proc.pid)
    for _ in range(times):
        d.signal(signal.SIGHUP)
        d.wait_message("STATUS=enforcing")
    return tracer.stop()


def settle(d) -> None:
    """A reload that changes nothing, waited for: what earlier passes queued
    (the sweep after the start) has run by its STATUS=, which comes
    after."""
    d.signal(signal.SIGHUP)
    d.wait_message("STATUS=enforcing")


def test_reload_that_changes_nothing_writes_nothing(daemon, cgroups, tmp_path, strace):
    """Not one bpf() write: the policies are compared with both maps as
    bytes, and there is nothing new to sweep.  (Before, every reload swept
    every matching cgroup: with 10,000 of them, over a second.)"""
    base = cgroups.rel(cgroups.base)
    for i in range(3):
        cgroups.make(f"s{i}.service")
    cfg = write_config(tmp_path / "c.toml", free_port(), rule(f"{base}/*.service", keepidle=33))
    d = daemon(cfg)
    d.start()
    settle(d)
    calls = reload_traced(d, strace, times=2)
    assert writes(calls) == [], calls
    # The reads: the policy hash in one batch, each cgroup's storage once.
    assert sum("bpf(BPF_MAP_LOOKUP_BATCH," in c for c in calls) >= 1, calls
    assert sum("bpf(BPF_MAP_GET_NEXT_KEY," in c for c in calls) == 0, calls
    assert d.stop() == 0


def test_reload_changing_every_policy_is_one_write_per_cgroup_and_one_batch(
    daemon, cgroups, spawn, probes, listener, tmp_path, strace
):
    base = cgroups.rel(cgroups.base)
    cgs = [cgroups.make(f"s{i}.service") for i in range(3)]
    cfg = write_config(tmp_path / "c.toml", free_port(), rule(f"{base}/*.service", keepidle=33))
    d = daemon(cfg)
    d.start()
    settle(d)
    progs = [bpftool_prog_ids(cg, "cgroup_sock_ops") for cg in cgs]
    cfg.write_text(cfg.read_text().replace("keepidle = 33", "keepidle = 34"))
    calls = reload_traced(d, strace)
    w = writes(calls)
    # Each cgroup's own storage (flags=BPF_EXIST: only while attached) ...
    storage = [c for c in w if "BPF_MAP_UPDATE_ELEM" in c and "BPF_EXIST" in c]
    assert len(storage) == 3, w
    # ... and the policy hash: one batch of three.
    batches = [c for c in w if "BPF_MAP_UPDATE_BATCH" in c]
    assert len(batches) == 1 and re.search(r"count=3\b", batches[0]), w
    assert not [c for c in w if "BPF_LINK_CREATE" in c and "BPF_CGROUP" in c], w
    # In force, in place: the same programs, new sockets get the new value.
    assert [bpftool_prog_ids(cg, "cgroup_sock_ops") for cg in cgs] == progs
    for cg in cgs:
        assert keepidle_of_new_connection(spawn, probes, cg, listener) == 34
    d.wait_log("updated /" + cgroups.rel(cgs[0]))
    assert d.stop() == 0


PEER_RULES = (
    '[[policy.peer]]\naddress = "10.20.0.0/16"\n'  # takes keepidle from its policy
    '[[policy.peer]]\naddress = "10.30.0.0/16"\nport = "5432-5439"\nkeepidle = 300\n'
    '[[policy.peer]]\naddress = "192.168.0.0/16"\nexempt = true\n'
)


def _policies_with_peers(base: str, n: int, changed: int | None = None) -> str:
    """One [[policy]] per cgroup s<i>.service, each with PEER_RULES; the
    one numbered ``changed`` with keepidle 34 instead of 33."""
    return "".join(
        rule(f"{base}/s{i}.service", keepidle=34 if i == changed else 33) + PEER_RULES
        for i in range(n)
    )


def _in_kernel(pin_dir: str, ids: list[int]) -> dict[int, tuple[int, int, int, int]]:
    """cgroup id -> (keepidle, generation, peer-rule set) as the policy hash
    holds it, and its own storage's generation: read from the pinned maps."""
    obj = Enforcer(pin_dir).obj_dir
    out = {}
    h = bpfsys.obj_get(os.path.join(obj, loader.MAP_POLICIES))
    own = bpfsys.obj_get(os.path.join(obj, loader.MAP_POLICY))
    try:
        for i in ids:
            key = struct.pack("=Q", i)
            raw = bpfsys.map_lookup(h, key, bpfmaps.POLICY_SIZE)
            stored = bpfsys.map_lookup(own, key, bpfmaps.POLICY_SIZE)
            assert raw is not None and stored is not None, i
            keepidle = bpfmaps.decode_policy(raw)[2].keepidle
            gen, peers = bpfmaps.policy_gen_of(raw), bpfmaps.policy_peers(raw)[0]
            out[i] = (keepidle, gen, peers, bpfmaps.policy_gen_of(stored))
    finally:
        os.close(h)
        os.close(own)
    return out


def _peer_sets(pin_dir: str) -> dict[int, dict[int, int]]:
    """Peer-rule set -> rule number -> its keepidle (0: exempt), from the
    pinned rules map."""
    fd = bpfsys.obj_get(os.path.join(Enforcer(pin_dir).obj_dir, loader.MAP_RULES))
    try:
        items = bpfsys.map_items(fd, bpfmaps.RULE_KEY.size, bpfmaps.RULE.size)
    finally:
        os.close(fd)
    out: dict[int, dict[int, int]] = {}
    for k, v in items:
        values = bpfmaps.decode_rule(v)[4]
        num = int(bpfmaps.RULE_KEY.unpack(k)["rule"])  # type: ignore[arg-type]
        out.setdefault(bpfmaps.rule_key_set(k), {})[num] = values.keepidle if values else 0
    return out


def test_reload_changing_one_policy_of_many_rewrites_only_it(
    daemon, cgroups, spawn, probes, listener, tmp_path, strace, pin_dir
):
    """Twelve cgroups, each with a policy of its own carrying peer rules;
    a reload that changes one of them writes that one's storage, its hash
    entry and its new peer-rule set, and nothing of the other eleven: read
    back from the pinned maps, they keep their generation and their set.
    The same file again then writes nothing."""
    n, changed = 12, 5
    base = cgroups.rel(cgroups.base)
    cgs = [cgroups.make(f"s{i}.service") for i in range(n)]
    ids = [os.stat(cg).st_ino for cg in cgs]
    cfg = write_config(tmp_path / "c.toml", free_port(), _policies_with_peers(base, n))
    d = daemon(cfg)
    d.start()
    settle(d)
    before = _in_kernel(pin_dir, ids)
    assert {v[0] for v in before.values()} == {33}
    # Identical policies share one peer-rule set, written once.
    assert len({v[2] for v in before.values()}) == 1
    (shared,) = {v[2] for v in before.values()}
    assert _peer_sets(pin_dir)[shared] == {1: 33, 2: 300, 3: 0}

    cfg.write_text(
        cfg.read_text().replace(
            _policies_with_peers(base, n), _policies_with_peers(base, n, changed)
        )
    )
    w = writes(reload_traced(d, strace))
    storage = [c for c in w if "BPF_MAP_UPDATE_ELEM" in c and "BPF_EXIST" in c]
    batches = [c for c in w if "BPF_MAP_UPDATE_BATCH" in c]
    assert len(storage) == 1, w
    # The policy hash (one entry), and the new set: its rules, its prefixes.
    assert len(batches) == 3 and re.search(r"count=1\b", batches[-1]), w
    assert not [c for c in w if "BPF_LINK_CREATE" in c], w
    after = _in_kernel(pin_dir, ids)
    for i, cg_id in enumerate(ids):
        if i == changed:
            keepidle, gen, peers, own_gen = after[cg_id]
            assert keepidle == 34 and gen != before[cg_id][1] and own_gen == gen
            assert peers != shared and _peer_sets(pin_dir)[peers] == {1: 34, 2: 300, 3: 0}
        else:
            assert after[cg_id] == before[cg_id], i
    assert keepidle_of_new_connection(spawn, probes, cgs[changed], listener) == 34
    assert keepidle_of_new_connection(spawn, probes, cgs[0], listener) == 33

    assert writes(reload_traced(d, strace)) == []
    assert _in_kernel(pin_dir, ids) == after
    assert d.stop() == 0


def _edit(fd: int, cg_id: int, keepidle: int, flags: int) -> None:
    """Change one policy map entry the way bpftool map update would."""
    key = struct.pack("=Q", cg_id)
    raw = bpfsys.map_lookup(fd, key, bpfmaps.POLICY_SIZE)
    assert raw is not None
    _, _, gen, level, *_ = struct.unpack_from(bpfmaps.POLICY_FMT, raw)
    _, fl, policy = bpfmaps.decode_policy(raw)
    new = bpfmaps.encode_policy(
        cg_id,
        dataclasses.replace(policy, keepidle=keepidle),
        level=level,
        managed=bool(fl & bpfmaps.F_MANAGED),
        gen=gen,
    )
    bpfsys.map_update(fd, key, new, flags)


def test_reload_puts_back_policies_changed_by_hand(
    daemon, cgroups, spawn, probes, listener, tmp_path, bk, pin_dir
):
    """The policy a cgroup's programs read (its cgroup storage) and the one
    in the policy hash, each changed by hand: a reload with the same config
    writes the config's back.  (Before, only the hash was compared: a
    storage entry changed by hand stayed in force.)"""
    a, b = cgroups.make("a.service"), cgroups.make("b.service")
    base = cgroups.rel(cgroups.base)
    cfg = write_config(tmp_path / "c.toml", free_port(), rule(f"{base}/*.service", keepidle=33))
    d = daemon(cfg)
    d.start()
    assert keepidle_of_new_connection(spawn, probes, a, listener) == 33
    enf = Enforcer(pin_dir)
    storage = bpfsys.obj_get(os.path.join(enf.obj_dir, loader.MAP_POLICY))
    policies = bpfsys.obj_get(os.path.join(enf.obj_dir, loader.MAP_POLICIES))
    try:
        _edit(storage, os.stat(a).st_ino, 77, bpfsys.BPF_EXIST)
        _edit(policies, os.stat(b).st_ino, 78, bpfsys.BPF_ANY)
    finally:
        os.close(storage)
        os.close(policies)

    def status() -> dict[str, int]:
        return {
            att["cgroup"]: att["policy"]["keepidle"]
            for att in json.loads(bk("status", "--json").stdout)
        }

    # The edits are in force.
    assert keepidle_of_new_connection(spawn, probes, a, listener) == 77
    assert status()["/" + cgroups.rel(b)] == 78
    d.signal(signal.SIGHUP)
    d.wait_message("STATUS=enforcing")
    assert keepidle_of_new_connection(spawn, probes, a, listener) == 33
    assert keepidle_of_new_connection(spawn, probes, b, listener) == 33
    assert status() == {"/" + cgroups.rel(a): 33, "/" + cgroups.rel(b): 33}
    assert d.stop() == 0


def test_policy_hash_is_written_and_read_in_batches(pin_dir):
    """BPF_MAP_UPDATE_BATCH and BPF_MAP_LOOKUP_BATCH on the real policy
    hash, across several read chunks: every entry comes back once."""
    fd = bpfsys.obj_get(os.path.join(Enforcer(pin_dir).obj_dir, loader.MAP_POLICIES))
    base = 1 << 62  # no cgroup has such an id
    keys = [struct.pack("=Q", base + i) for i in range(2500)]
    values = [struct.pack("=Q", base + i) + bytes(bpfmaps.POLICY_SIZE - 8) for i in range(2500)]
    try:
        bpfsys.map_update_batch(fd, keys, values)
        got = {
            k: v
            for k, v in bpfsys.map_items(fd, 8, bpfmaps.POLICY_SIZE, chunk=1000)
            if k in set(keys)
        }
        assert got == dict(zip(keys, values, strict=True))
        assert len(bpfsys.map_items(fd, 8, bpfmaps.POLICY_SIZE)) == len(bpfsys.map_keys(fd, 8))
    finally:
        for k in keys:
            bpfsys.map_delete(fd, k)
        os.close(fd)
