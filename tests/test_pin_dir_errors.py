"""The CLI against a broken environment: pin directories bpffs cannot hold,
a cgroup removed while it is being attached, pins of removed cgroups.
Every failure is one line with the fix and a non-zero exit."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time

import pytest
from conftest import bpfkeep_cmd

from bpfkeep.enforcer import Enforcer
from bpfkeep.progs import loader

pytestmark = pytest.mark.kernel


def run_cli(pin_dir: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        bpfkeep_cmd(pin_dir, *args), capture_output=True, text=True, timeout=120
    )  # fmt: skip


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


def test_attach_racing_rmdir_never_tracebacks(pin_dir, cgroups, bk):
    """The cgroup disappears while ``attach`` runs: one line, never a
    traceback.  The removal is timed at random across the command's run
    time, so each try lands somewhere else in it."""
    warm = cgroups.make("warm")
    t0 = time.monotonic()
    bk("attach", "--cgroup", warm)
    duration = time.monotonic() - t0
    outcomes: dict[str, int] = {}
    for i in range(100):
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
