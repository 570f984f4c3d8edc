"""``GET /ready`` on the metrics listener (the DaemonSet's readiness probe):
503 until the first reconcile is done, 200 while the daemon does its job,
503 again when its pinned programs are gone from under it -- real HTTP
requests to the real server."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

import pytest
from test_daemon import daemon, free_port, rule, write_config  # noqa: F401 - fixture

pytestmark = pytest.mark.kernel


def get_ready(port: int, method: str = "GET") -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/ready", method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_not_ready_before_the_first_reconcile(pin_dir, tmp_path):
    """The listener is up before the first reconcile (so a scrape can see a
    slow start); /ready says 503 until then."""
    from bpfkeep.daemon import Daemon

    port = free_port()
    cfg = write_config(tmp_path / "bpfkeep.toml", port, "")
    d = Daemon(str(cfg), pin_dir)
    d._start_metrics(("127.0.0.1", port))
    try:
        status, body = get_ready(port)
        assert status == 503, body
        assert body == "not ready: starting: the first reconcile has not finished\n"
    finally:
        assert d.metrics
        d.metrics.close()


def test_ready_after_the_first_reconcile_and_not_without_pins(
    daemon,  # noqa: F811 - the fixture imported above
    pin_dir,
    cgroups,
    tmp_path,
):
    cgroups.make("a.service")
    port = free_port()
    cfg = write_config(
        tmp_path / "bpfkeep.toml", port, rule(f"{cgroups.rel(cgroups.base)}/*.service")
    )
    d = daemon(cfg)
    d.start()  # READY=1 arrived
    assert get_ready(port) == (200, "ready\n")
    assert get_ready(port, "HEAD") == (200, "")
    # One of this version's pinned maps removed under the daemon: it cannot
    # attach anything new until it is restarted (it says so in its log),
    # and /ready says so until then.
    from bpfkeep.enforcer import Enforcer
    from bpfkeep.progs import loader

    obj_dir = Enforcer(pin_dir).obj_dir
    os.unlink(os.path.join(obj_dir, loader.MAP_POLICIES))
    status, body = get_ready(port)
    assert status == 503, body
    assert body == f"not ready: pinned objects missing under {obj_dir}: {loader.MAP_POLICIES}\n"
    assert d.proc and d.proc.poll() is None  # still serving


def test_ready_again_once_the_daemon_restored_its_pins(
    daemon,  # noqa: F811 - the fixture imported above
    pin_dir,
    cgroups,
    tmp_path,
):
    """rm -rf of the pin directory detaches everything; the daemon notices,
    loads and attaches again, and /ready is 200 again only once every kept
    cgroup's links are back."""
    import shutil

    from test_daemon import wait_until

    from bpfkeep.enforcer import Enforcer
    from bpfkeep.pins.pindir import HOOKS

    a = cgroups.make("a.service")
    port = free_port()
    cfg = write_config(
        tmp_path / "bpfkeep.toml", port, rule(f"{cgroups.rel(cgroups.base)}/*.service")
    )
    d = daemon(cfg)
    d.start()
    assert get_ready(port)[0] == 200
    shutil.rmtree(pin_dir)
    cg_id = os.stat(a).st_ino
    enforcer = Enforcer(pin_dir)

    def restored() -> bool:
        status, _ = get_ready(port)
        return status == 200 and len(enforcer.link_pins().get(cg_id, ())) == len(HOOKS)

    assert wait_until(restored, timeout=60, step=0.1), d.log.read_text()
    assert "restoring" in d.log.read_text() or "loading them again" in d.log.read_text()
