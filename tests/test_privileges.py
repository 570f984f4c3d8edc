"""bpfkeep under exactly the privileges the shipped systemd unit grants:
the capability set is read from deploy/bpfkeep.service, and the first
attach (a fresh pin directory: the programs are compiled and loaded under
those capabilities) and the daemon run with nothing more."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import REPO, remove_pin_dir
from neighbours import attached
from test_enforcer import assert_policy, assert_untouched

pytestmark = pytest.mark.kernel

UNIT = REPO / "deploy" / "bpfkeep.service"
BPFKEEP = [sys.executable, "-m", "bpfkeep"]


def unit_setting(key: str) -> list[str]:
    """The values of every ``key=`` line of the unit, split at spaces."""
    return [
        v
        for line in UNIT.read_text().splitlines()
        if line.startswith(key + "=")
        for v in line.split("=", 1)[1].split()
    ]


def unit_capabilities() -> list[str]:
    caps = unit_setting("CapabilityBoundingSet")
    assert caps, "the unit names no CapabilityBoundingSet"
    return caps


def as_unit(argv: list[str]) -> list[str]:
    """argv as root with only the unit's capabilities (bounding, inheritable
    and ambient sets, as systemd sets them for User=root)."""
    caps = ",".join(["-all", *("+" + c.removeprefix("CAP_").lower() for c in unit_capabilities())])
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is missing"
    return [
        setpriv,
        f"--bounding-set={caps}",
        f"--inh-caps={caps}",
        f"--ambient-caps={caps}",
        *argv,
    ]


def as_unit_sandboxed(argv: list[str]) -> list[str]:
    """as_unit(argv), in a private mount namespace where, as under the
    unit's ProtectSystem=strict, the root filesystem is read-only but for
    what the unit makes writable: ReadWritePaths=, RuntimeDirectory= and
    CacheDirectory= (made first, as systemd does), and /tmp and /var/tmp for
    PrivateTmp= (writable, not private: the test's config is there);
    ProtectControlGroups= makes the cgroup2 hierarchy read-only."""
    from bpfkeep.kernel.cgroups import cgroup2_mount

    assert unit_setting("ProtectSystem") == ["strict"]
    made = [f"/run/{d}" for d in unit_setting("RuntimeDirectory")]
    made += [f"/var/cache/{d}" for d in unit_setting("CacheDirectory")]
    writable = [*unit_setting("ReadWritePaths"), *made]
    if unit_setting("PrivateTmp") == ["yes"]:
        writable += ["/tmp", "/var/tmp"]
    read_only = [cgroup2_mount()] if unit_setting("ProtectControlGroups") == ["yes"] else []
    script = ["set -e"]
    script += [f"mkdir -p {d}" for d in made]
    script += [f"mount --bind {d} {d}" for d in writable]
    script += [f"mount -o remount,bind,ro {d}" for d in ["/", *read_only]]
    script.append('exec "$@"')
    unshare = ["unshare", "--mount", "--propagation", "private"]
    return [*unshare, "sh", "-c", "\n".join(script), "unit-sandbox", *as_unit(argv)]


@pytest.fixture()
def fresh_pin_dir(bpffs):
    d = os.path.join(bpffs, f"bpfkeep-unit-{uuid.uuid4().hex[:8]}")
    yield d
    remove_pin_dir(d)


def test_unit_grants_what_loading_and_the_sweep_need():
    caps = set(unit_capabilities())
    assert {"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"} <= caps
    text = UNIT.read_text()
    assert f"AmbientCapabilities={' '.join(unit_capabilities())}" in text
    assert "RestrictNamespaces=net" in text  # setns into network namespaces only


@pytest.mark.parametrize("neighbour", [None, "writes-reply"])
def test_first_attach_under_the_units_capabilities(
    fresh_pin_dir, cgroups, spawn, probes, netns, neighbour, request
):
    """Compile, load, pin and attach from nothing, then sweep a connection
    that a process of another user holds in another network namespace --
    also beside another tool's sock_ops program that writes ops->reply."""
    app = cgroups.make("app")
    if neighbour:
        stack = contextlib.ExitStack()
        request.addfinalizer(stack.close)  # detached before the cgroup goes
        stack.enter_context(attached(neighbour, app))
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    srv = spawn([*nobody, probes["static"], "listen", "127.0.0.1", "0", "hold"], app, netns)
    port = int(srv.expect("ready").split()[1])
    cli = spawn([*nobody, probes["static"], "connect", "127.0.0.1", str(port), "hold"], app, netns)
    assert_untouched(cli.values("client"), netns)

    argv = [sys.executable, "-m", "bpfkeep", "--pin-dir", fresh_pin_dir, "attach"]
    policy = ["--keepidle", "31", "--keepintvl", "7", "--keepcnt", "4", "--user-timeout", "12345"]
    # A peer rule no connection here matches: its maps written under the
    # unit's capabilities, every connection looked up in them.
    policy += ["--peer", "10.99.0.0/16,keepidle=5"]
    proc = subprocess.run(
        as_unit([*argv, "--cgroup", cgroups.rel(app), *policy]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "3 existing socket(s) swept" in proc.stdout, proc.stdout
    assert "unreachable" not in proc.stdout
    cli.send_line()
    assert_policy(cli.values("now-client"))

    # New sockets too, and doctor agrees that nothing is missing.
    new = spawn([probes["static"], "connect", "127.0.0.1", str(port), "hold"], app, netns)
    assert_policy(new.values("client"))
    doctor = subprocess.run(
        as_unit([sys.executable, "-m", "bpfkeep", "--pin-dir", fresh_pin_dir, "doctor"]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    priv = [ln for ln in doctor.stdout.splitlines() if "privileges" in ln]
    assert priv and priv[0].startswith("OK"), doctor.stdout


def test_daemon_under_the_units_capabilities_and_sandbox(
    fresh_pin_dir, cgroups, spawn, probes, tmp_path
):
    """The daemon as the unit runs it -- its capabilities, a read-only root
    but for the paths the unit makes writable -- compiles, pins and
    attaches; a second one on the same pin directory, run the same way,
    refuses to start, naming the first one's pid."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = cgroups.rel(cgroups.base)
    cfg = tmp_path / "bpfkeep.toml"
    cfg.write_text(
        f'[metrics]\nlisten = "127.0.0.1:{port}"\n\n'
        f'[[policy]]\ncgroup = "{base}/svc-*"\nkeepidle = 33\n'
    )
    cfg.chmod(0o600)
    lsrv = spawn([probes["static"], "listen", "127.0.0.1", "0", "hold"])
    lport = int(lsrv.expect("ready").split()[1])
    log = tmp_path / "daemon.log"
    with open(log, "w") as err:
        argv = [*BPFKEEP, "--pin-dir", fresh_pin_dir, "daemon", "--config", str(cfg)]
        daemon = subprocess.Popen(as_unit_sandboxed(argv), stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 90
        while "enforcing" not in log.read_text():
            assert daemon.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        svc = cgroups.make("svc-a")
        # The daemon attaches the new cgroup as soon as inotify reports it;
        # a connection made before that is swept.
        cli = spawn([probes["static"], "connect", "127.0.0.1", str(lport), "hold"], svc)
        cli.values("client")
        deadline = time.monotonic() + 10
        while True:
            cli.send_line()
            keepidle = cli.values("now-client", consume=True)["keepidle"]
            if keepidle == 33 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert keepidle == 33, log.read_text()
        fresh = spawn([probes["static"], "connect", "127.0.0.1", str(lport), "hold"], svc)
        assert fresh.values("client")["keepidle"] == 33
        assert "Traceback" not in log.read_text()
        try:
            second = subprocess.run(
                as_unit_sandboxed(argv), capture_output=True, text=True, timeout=30
            )
        except subprocess.TimeoutExpired:
            pytest.fail("a second daemon started on the same pin directory")
        assert second.returncode != 0, second.stderr
        (line,) = second.stderr.strip().splitlines()
        assert f"pid {daemon.pid}" in line and fresh_pin_dir in line, line
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
    assert Path(fresh_pin_dir).is_dir()
