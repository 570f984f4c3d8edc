"""The cheap paths: a socket gets a record (socket storage) only where its
values cannot tell what bpfkeep needs to know, and every path without one
still ends where the policy says.  Records are read back through the
kernel by the sweep program's read-only pass; values by getsockopt in the
workload."""

from __future__ import annotations

import os
import socket
import struct

import pytest
from test_sweep import now, pair

pytestmark = pytest.mark.kernel


def _records(pin_dir: str) -> dict[tuple[str, str, int], int]:
    """(local, remote, TCP state) -> the record's owner (0: no record), for
    every socket under a policy of this pin directory."""
    from bpfkeep.enforcer import Enforcer
    from bpfkeep.sweep import runs

    enf = Enforcer(pin_dir)
    atts = {a.cgroup_id: a for a in enf.attachments() if a.cgroup and a.policy}
    report = runs.read(enf.pins, [a.cgroup for a in atts.values()], set(atts))
    return {
        (o.target.local, o.target.remote, o.target.state): o.entry.rec_owner
        for o in report.outcomes
        if o.entry.result & 1
    }


def _flags(pin_dir: str, path: str) -> int:
    from bpfkeep.enforcer import Enforcer
    from bpfkeep.kernel import bpfsys
    from bpfkeep.progs import loader
    from bpfkeep.progs import maps as bpfmaps

    fd = bpfsys.obj_get(os.path.join(Enforcer(pin_dir).obj_dir, loader.MAP_POLICIES))
    try:
        raw = bpfsys.map_lookup(fd, struct.pack("=Q", os.stat(path).st_ino), bpfmaps.POLICY_SIZE)
    finally:
        os.close(fd)
    assert raw is not None
    return bpfmaps.policy_raw_flags(raw)


def test_plain_connections_under_one_policy_carry_no_record(bk, cgroups, spawn, probes, pin_dir):
    """Creating, cloning and freeing a record was most of what a connection
    paid; without nested policies nothing needs one."""
    app = cgroups.make("app")
    bk("attach", "--cgroup", cgroups.rel(app), "--keepidle", "31")
    srv, cli, _port = pair(spawn, probes, app)
    assert cli.values("client")["keepidle"] == 31
    assert srv.values("accepted")["keepidle"] == 31
    recs = _records(pin_dir)
    assert len(recs) == 3, recs  # listener, client, accepted
    assert set(recs.values()) == {0}, recs


def test_nested_policies_record_the_owner(bk, cgroups, spawn, probes, pin_dir):
    parent, child = cgroups.make("p"), cgroups.make("p/c")
    bk("attach", "--cgroup", cgroups.rel(parent), "--keepidle", "100")
    bk("attach", "--cgroup", cgroups.rel(child), "--keepidle", "200")
    srv, cli, _port = pair(spawn, probes, child)
    assert cli.values("client")["keepidle"] == 200
    assert srv.values("accepted")["keepidle"] == 200
    recs = _records(pin_dir)
    assert len(recs) == 3 and set(recs.values()) == {os.stat(child).st_ino}, recs


def test_nesting_flags_follow_attach_and_detach(bk, cgroups, pin_dir):
    from bpfkeep.progs import maps as bpfmaps

    parent, child = cgroups.make("p"), cgroups.make("p/c")
    bk("attach", "--cgroup", cgroups.rel(parent))
    assert _flags(pin_dir, parent) & bpfmaps.F_NESTING == 0
    bk("attach", "--cgroup", cgroups.rel(child))
    assert _flags(pin_dir, parent) & bpfmaps.F_NESTING == bpfmaps.F_HAS_DESCENDANT
    assert _flags(pin_dir, child) & bpfmaps.F_NESTING == bpfmaps.F_HAS_ANCESTOR
    bk("detach", "--cgroup", cgroups.rel(child))
    assert _flags(pin_dir, parent) & bpfmaps.F_NESTING == 0
    # The other order: the child first, then the parent above it.
    bk("attach", "--cgroup", cgroups.rel(child))
    assert _flags(pin_dir, child) & bpfmaps.F_NESTING == bpfmaps.F_HAS_ANCESTOR
    bk("detach", "--cgroup", cgroups.rel(parent))
    assert _flags(pin_dir, child) & bpfmaps.F_NESTING == 0


@pytest.mark.parametrize("existing", [True, False])
def test_a_child_policy_takes_over_sockets_configured_by_the_parents(
    bk, cgroups, spawn, probes, existing
):
    """The parent's sockets in the child cgroup carry no record (the parent
    had no nested policy then): their values -- the parent's -- tell the
    child's programs and sweep that bpfkeep set them."""
    parent, child = cgroups.make("p"), cgroups.make("p/c")
    bk("attach", "--cgroup", cgroups.rel(parent), "--keepidle", "100")
    srv = spawn([probes["static"], "accept", "127.0.0.1", "0", "hold"], cgroup=child)
    port = int(srv.expect("ready").split()[1])
    assert srv.values("listener")["keepidle"] == 100
    other = socket.create_server(("127.0.0.1", 0))
    cli = spawn(
        [probes["static"], "connect", "127.0.0.1", str(other.getsockname()[1]), "hold"],
        cgroup=child,
    )
    assert cli.values("client")["keepidle"] == 100
    extra = [] if existing else ["--no-existing"]
    bk("attach", "--cgroup", cgroups.rel(child), *extra, "--keepidle", "200")
    assert now(cli, "client")["keepidle"] == (200 if existing else 100)
    srv.send_line()  # accept now, from the listener configured by the parent
    with socket.create_connection(("127.0.0.1", port)):
        assert srv.values("accepted")["keepidle"] == 200
    other.close()


def test_an_update_without_sweep_still_reaches_what_old_listeners_accept(
    bk, cgroups, spawn, probes
):
    """The listener carries the old values and no record: accepted sockets
    with exactly those values get the new ones (bk_policy.prev)."""
    app = cgroups.make("app")
    bk("attach", "--cgroup", cgroups.rel(app), "--keepidle", "31")
    srv = spawn([probes["static"], "accept", "127.0.0.1", "0", "hold"], cgroup=app)
    port = int(srv.expect("ready").split()[1])
    assert srv.values("listener")["keepidle"] == 31
    bk("attach", "--cgroup", cgroups.rel(app), "--no-existing", "--keepidle", "45")
    srv.send_line()
    with socket.create_connection(("127.0.0.1", port)):
        assert srv.values("accepted")["keepidle"] == 45
    srv.send_line()
    assert srv.values("now-listener")["keepidle"] == 31  # not swept, as asked


def test_a_listeners_own_keepalive_without_record_stands_in_set_mode(bk, cgroups, spawn, probes):
    """Made before the policy, not swept: keepalive the program turned on
    itself is its own (the values are neither the policy's nor its
    previous ones)."""
    app = cgroups.make("app")
    own = ["set", "keepalive=1", "set", "keepidle=100"]
    srv = spawn([probes["static"], "accept", "127.0.0.1", "0", *own, "hold"], cgroup=app)
    port = int(srv.expect("ready").split()[1])
    bk("attach", "--cgroup", cgroups.rel(app), "--no-existing", "--keepidle", "31")
    srv.send_line()
    with socket.create_connection(("127.0.0.1", port)):
        v = srv.values("accepted")
    assert (v["keepalive"], v["keepidle"], v["user_timeout"]) == (1, 100, 0)


def test_detach_takes_the_window_clamp_off_listeners(bk, cgroups, spawn, probes):
    """As the keepalive options and TCP_MAXSEG: what the listener passes on
    after a detach is what a listener without a policy passes on."""
    app, plain = cgroups.make("app"), cgroups.make("plain")
    ctl = spawn([probes["static"], "accept", "127.0.0.1", "0", "hold"], cgroup=plain)
    ctl_port = int(ctl.expect("ready").split()[1])
    ctl.send_line()
    with socket.create_connection(("127.0.0.1", ctl_port)):
        untouched = ctl.values("accepted")["window_clamp"]
    bk("attach", "--cgroup", cgroups.rel(app), "--window-clamp", "20000")
    srv = spawn([probes["static"], "accept", "127.0.0.1", "0", "hold"], cgroup=app)
    port = int(srv.expect("ready").split()[1])
    assert srv.values("listener")["window_clamp"] == 20000
    bk("detach", "--cgroup", cgroups.rel(app))
    srv.send_line()
    with socket.create_connection(("127.0.0.1", port)):
        v = srv.values("accepted")
    assert v["window_clamp"] == untouched != 20000, (v, untouched)
    assert v["keepalive"] == 0


def test_the_layout_before_prev_still_decodes():
    """Attachments made by the previous version (bk_policy without prev[])
    are migrated: their policy must read back as it was written."""
    from bpfkeep.options import Policy
    from bpfkeep.progs import maps as bpfmaps

    p = Policy.from_mapping({"keepidle": 9, "mode": "enforce"})
    vals = [p.value(o.key) for o in bpfmaps.BPF_OPTIONS]
    flags = bpfmaps.F_ACTIVE | bpfmaps.F_ENFORCE | bpfmaps.F_UT_DERIVED
    raw = struct.pack(bpfmaps.NOPREV_POLICY_FMT, 77, flags, 5, 2, *vals, 0)
    assert bpfmaps.decode_any_policy(raw) == (77, flags, p)
