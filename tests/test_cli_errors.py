"""Bad input: one clear line, a non-zero exit, nothing half-applied."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import as_nobody, bpfkeep_cmd

pytestmark = pytest.mark.kernel


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_missing_cgroup(bk):
    one_line_error(
        bk("attach", "--cgroup", "no/such/cgroup", check=False), "no such cgroup", "mkdir"
    )


def test_file_is_not_a_cgroup(bk):
    line = one_line_error(
        bk("attach", "--cgroup", "/etc/passwd", check=False), "not under the cgroup2 mount"
    )
    assert "mkdir" not in line


def test_cgroup_v1_path(bk):
    from bpfkeep.kernel.cgroups import read_mounts

    v1 = read_mounts().v1
    if not v1:
        pytest.skip("this host mounts no cgroup v1 hierarchy")
    one_line_error(bk("attach", "--cgroup", v1[0], check=False), "cgroup v1 path", "cgroup2 mount")


def test_root_cgroup_needs_force(bk):
    from bpfkeep.kernel.cgroups import cgroup2_mount

    for spec in ("/", cgroup2_mount()):
        one_line_error(bk("attach", "--cgroup", spec, check=False), "root cgroup", "--force")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--keepidle", "0x10"], "not a whole number"),
        (["--keepidle", "ten"], "not a whole number"),
        (["--keepidle", "1_000"], "not a whole number"),
        (["--keepidle", " 15 "], "not a whole number"),
        (["--keepidle", "\u0661\u0665"], "not a whole number"),  # Arabic-Indic 15
        (["--keepidle", "32768"], "out of range"),
        (["--keepintvl", "-1"], "out of range"),
        (["--keepcnt", "128"], "out of range"),
        (["--maxseg", "10"], "out of range"),
        (["--user-timeout", "99999999999"], "out of range"),
        (["--mode", "strict"], "invalid choice"),
    ],
)
def test_bad_values_change_nothing(bk, cgroups, spawn, probes, args, needle):
    cg = cgroups.make("svc")
    bk("attach", "--cgroup", cgroups.rel(cg), "--keepidle", "33", "--mode", "enforce")
    before = json.loads(bk("status", "--json").stdout)
    one_line_error(bk("attach", "--cgroup", cgroups.rel(cg), *args, check=False), needle)
    after = json.loads(bk("status", "--json").stdout)
    assert [a["policy"] for a in after] == [a["policy"] for a in before]
    # And the kernel still enforces the old policy.
    srv = spawn([probes["dynamic"], "listen", "127.0.0.1", "0", "hold"])
    port = srv.expect("ready").split()[1]
    cli = spawn([probes["static"], "connect", "127.0.0.1", port, "set", "keepidle=900"], cgroup=cg)
    assert cli.values("client")["keepidle"] == 33
    assert cli.values("client-after")["keepidle"] == 33


@pytest.mark.parametrize("command", ["attach", "detach", "status"])
def test_not_root_points_to_preload(pin_dir, cgroups, command):
    cg = cgroups.make("svc")
    args = [command] if command == "status" else [command, "--cgroup", cgroups.rel(cg)]
    proc = subprocess.run(
        as_nobody(bpfkeep_cmd(pin_dir, *args)),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    line = one_line_error(proc, "root")
    if command != "status":
        assert "LD_PRELOAD" in line and "bpfkeep exec" in line
    assert proc.returncode == 77


def test_pin_dir_not_on_bpffs(cgroups, tmp_path, bpffs):
    """The fix is a directory on the bpffs that is mounted, not mounting
    bpffs over the pin directory's parent."""
    cg = cgroups.make("svc")
    proc = subprocess.run(
        bpfkeep_cmd(str(tmp_path / "bpfkeep"), "attach", "--cgroup", cgroups.rel(cg)),
        capture_output=True,
        text=True,
    )
    one_line_error(proc, "not on a bpf filesystem", f"--pin-dir {bpffs}/")
    assert "mount -t bpf" not in proc.stderr
    assert not (tmp_path / "bpfkeep").exists()


def test_run_without_command(bk):
    one_line_error(bk("run", "--keepidle", "5", check=False), "no COMMAND")


def test_run_missing_program(bk):
    proc = bk("run", "--via", "bpf", "--", "/nonexistent/prog", check=False)
    one_line_error(proc, "cannot run /nonexistent/prog")


def test_python_entry_point_is_the_same_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "bpfkeep", "--version"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.startswith("bpfkeep ")


@pytest.mark.parametrize(
    "content, needle",
    [
        (b'[[policy]]\ncgroup = "caf\xe9"\n', ":2: not UTF-8 (byte 0xe9 at offset 24)"),
        (b"[daemon]\naudit_interval = inf\n", ":2: daemon.audit_interval: expected seconds"),
        (b"[daemon]\naudit_interval = nan\n", ":2: daemon.audit_interval: expected seconds"),
        (b'[metrics]\nlisten = "127.0.0.1:0"\n', ":2: metrics.listen: port '0' is not 1..65535"),
    ],
)
def test_daemon_check_refuses_what_the_daemon_cannot_run(tmp_path, content, needle):
    """These passed --check (or were a traceback) and then killed, spun or
    misconfigured the daemon."""
    f = tmp_path / "c.toml"
    f.write_bytes(content)
    proc = subprocess.run(
        bpfkeep_cmd(str(tmp_path / "pins"), "daemon", "--config", str(f), "--check"),
        capture_output=True,
        text=True,
    )
    line = one_line_error(proc, str(f) + needle)
    assert proc.returncode == 2 and "Traceback" not in line
