"""The CLI against a broken environment: pin directories bpffs cannot hold,
a cgroup removed while it is being attached, pins of removed cgroups.
Every failure is one line with the fix and a non-zero exit."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import time
import uuid

import pytest
from conftest import bpfkeep_cmd, in_kmatrix_guest

from bpfkeep.enforcer import Enforcer
from bpfkeep.kernel import bpfsys
from bpfkeep.progs import loader

pytestmark = pytest.mark.kernel


def run_cli(pin_dir: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            bpfkeep_cmd(pin_dir, *args), capture_output=True, text=True, timeout=timeout
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:  # (run() killed it: a daemon that started)
        return subprocess.CompletedProcess(e.cmd, 0, "", f"still running after {timeout} s\n")


def assert_one_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize(
    "kind, needle",
    [
        ("dot", "does not allow '.'"),
        ("long", "longer than the 255"),
        ("pinned-map", "not a directory"),
        ("below-pinned-map", "not a directory"),
    ],
)
def test_unusable_pin_dir_is_one_line(kind, needle, bpffs, pin_dir, cgroups):
    pinned_map = os.path.join(Enforcer(pin_dir).obj_dir, loader.MAP_POLICIES)
    bad = {
        "dot": os.path.join(bpffs, "bpfkeep-test.dotted"),
        "long": os.path.join(bpffs, "b" * 300),
        "pinned-map": pinned_map,
        "below-pinned-map": os.path.join(pinned_map, "sub"),
    }[kind]
    cg = cgroups.make("a")
    for args in (
        ("attach", "--cgroup", cg),
        ("detach", "--cgroup", cg),
        ("status",),
        ("detach", "--all"),
    ):
        assert_one_line(run_cli(bad, *args), needle, "--pin-dir")
    assert not os.path.lexists(bad) or bad.startswith(pinned_map)
    assert os.path.exists(pinned_map)  # nothing was removed or replaced


@pytest.fixture()
def scratch_dirs(bpffs):
    """Directories a test makes, removed with whatever ended up in them
    (unpinning a link detaches it)."""
    made: list[str] = []
    yield made
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("kind", ["not-bpffs", "dotdot", "links", "foreign"])
def test_a_directory_that_is_not_a_pin_directory_is_one_line(
    kind, bpffs, pin_dir, cgroups, bk, tmp_path, scratch_dirs
):
    """Every command, given a directory that is not on bpffs or not bpfkeep's
    (one with other content than obj-*/ and links/), says so in one line
    with the fix, exits non-zero and writes nothing there -- status used to
    say "no cgroup has a bpfkeep policy", run to fall back to the shim, the
    daemon to start, and /sys/fs/bpf/x/../../../tmp to suggest mounting
    bpffs over /sys."""
    cg = cgroups.make("a")
    bk("attach", "--cgroup", cg)  # the links directory holds pins
    links = Enforcer(pin_dir).link_dir
    if kind == "not-bpffs":
        bad, needles = str(tmp_path / "pins"), ["not on a bpf filesystem", f"{bpffs}/"]
        os.mkdir(bad)
    elif kind == "dotdot":
        bad = os.path.join(bpffs, "x", "..", "..", "..", "bpfkeep-test-tmp")
        shown = os.path.normpath(bad)  # /sys/bpfkeep-test-tmp: on sysfs
        needles = [shown, "not on a bpf filesystem", f"{bpffs}/"]
    elif kind == "links":
        bad, needles = links, ["links directory", f"--pin-dir {pin_dir}"]
    else:
        bad = os.path.join(bpffs, f"bpfkeep-test-foreign-{uuid.uuid4().hex[:8]}")
        os.mkdir(bad)
        fd = bpfsys.obj_get(os.path.join(Enforcer(pin_dir).obj_dir, loader.MAP_POLICIES))
        try:
            bpfsys.obj_pin(fd, os.path.join(bad, "tool_map"))  # another tool's map
        finally:
            os.close(fd)
        needles = ["not a bpfkeep pin directory", "tool_map"]
    if kind in ("links", "foreign"):
        scratch_dirs.append(bad)  # with what a refused command might have left
    before = sorted(os.listdir(bad)) if os.path.isdir(bad) else None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[metrics]\nlisten = "127.0.0.1:{port}"\n[daemon]\naudit_interval = 0\n'
        f'[[policy]]\ncgroup = "{cgroups.rel(cg)}/none"\n'
    )
    cfg.chmod(0o600)
    for args in (
        ("status",),
        ("status", "--json"),
        ("attach", "--cgroup", cg),
        ("detach", "--cgroup", cg),
        ("detach", "--all"),
        ("run", "--keepidle", "5", "--", "true"),
        ("daemon", "--config", str(cfg)),
        ("audit",),
    ):
        proc = run_cli(bad, *args, timeout=60)
        assert_one_line(proc, *needles, "--pin-dir")
        assert "mount -t bpf" not in proc.stderr, proc.stderr  # bpffs is mounted
        after = sorted(os.listdir(bad)) if os.path.isdir(bad) else None
        assert after == before, f"bpfkeep {args[0]} wrote into {bad}"
    assert not os.path.lexists(os.path.normpath(bad)) or before is not None
    # The real pin directory was not touched: its policy is still attached.
    assert [a["cgroup"] for a in json.loads(bk("status", "--json").stdout)] == [
        "/" + cgroups.rel(cg)
    ]


def test_a_pin_directory_not_made_yet_is_no_policy(bpffs, cgroups, scratch_dirs):
    """A pin directory that does not exist yet, on bpffs: nothing is attached
    (status) and attach makes it."""
    d = os.path.join(bpffs, f"bpfkeep-test-new-{uuid.uuid4().hex[:8]}", "nested")
    scratch_dirs.append(os.path.dirname(d))
    proc = run_cli(d, "status")
    assert proc.returncode == 0 and "no cgroup has a bpfkeep policy" in proc.stdout, proc.stderr
    assert not os.path.lexists(d)


def test_attach_racing_rmdir_never_tracebacks(pin_dir, cgroups, bk):
    """The cgroup disappears while ``attach`` runs: one line, never a
    traceback.  The removal is timed at random across the command's run
    time, so each try lands somewhere else in it."""
    warm = cgroups.make("warm")
    t0 = time.monotonic()
    bk("attach", "--cgroup", warm)
    duration = time.monotonic() - t0
    outcomes: dict[str, int] = {}
    # (100 tries here; 25 in the QEMU guest, where each takes ten times as long.)
    for i in range(25 if in_kmatrix_guest() else 100):
        cg = cgroups.make(f"c{i}")
        proc = subprocess.Popen(
            bpfkeep_cmd(pin_dir, "attach", "--cgroup", cg),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(duration * random.uniform(0.3, 1.1))
        os.rmdir(cg)
        err = proc.communicate(timeout=60)[1]
        assert "Traceback" not in err, err
        if proc.returncode:
            assert len(err.strip().splitlines()) == 1, err
            outcomes["refused"] = outcomes.get("refused", 0) + 1
        else:
            outcomes["attached"] = outcomes.get("attached", 0) + 1
    print(f"attach racing rmdir: {outcomes}")


def test_detach_prunes_removed_cgroups_pins(pin_dir, cgroups, bk):
    gone, kept = cgroups.make("gone"), cgroups.make("kept")
    gone_id = os.stat(gone).st_ino
    bk("attach", "--cgroup", gone)
    bk("attach", "--cgroup", kept)
    links = Enforcer(pin_dir).link_dir
    assert any(n.startswith(f"{gone_id}_") for n in os.listdir(links))
    os.rmdir(gone)
    bk("detach", "--cgroup", kept)
    assert [n for n in os.listdir(links) if n.startswith(f"{gone_id}_")] == []
    assert json.loads(bk("status", "--json").stdout) == []
