"""`bpfkeep exec`, `bpfkeep run --via preload|auto` and `preload-path`, end to
end through the real CLI, the real shim and real programs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from conftest import as_nobody, bpfkeep_cmd


def values(stdout: str, role: str = "client") -> dict[str, int]:
    line = next(ln for ln in stdout.splitlines() if ln.startswith(role + " "))
    return {k: int(v) for k, v in (f.split("=") for f in line.split()[1:])}


@pytest.fixture()
def port(spawn, probes):
    srv = spawn([probes["dynamic"], "listen", "127.0.0.1", "0", "hold"])
    return srv.expect("ready").split()[1]


def cli(
    *args: str, env: dict | None = None, pin_dir: str = "/nonexistent"
) -> subprocess.CompletedProcess:
    return subprocess.run(
        bpfkeep_cmd(pin_dir, *args), capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_preload_path_prints_the_shipped_library():
    out = cli("preload-path")
    assert out.returncode == 0
    path = out.stdout.strip()
    assert os.path.isabs(path) and path.endswith("libbpfkeep.so") and os.path.isfile(path)


def test_exec_applies_the_policy_to_a_dynamic_program(probes, port):
    out = cli("exec", "--keepidle", "33", "--keepcnt", "4", "--",
              probes["dynamic"], "connect", "127.0.0.1", port)  # fmt: skip
    assert out.returncode == 0, out.stderr
    v = values(out.stdout)
    assert (v["keepalive"], v["keepidle"], v["keepintvl"], v["keepcnt"]) == (1, 33, 15, 4)
    assert v["user_timeout"] == (33 + 15 * 4) * 1000


def test_exec_enforce_mode_and_existing_preload_kept(probes, port, tmp_path):
    out = cli("exec", "--mode", "enforce", "--keepidle", "20", "--",
              probes["dynamic"], "connect", "127.0.0.1", port, "set", "keepalive=0",
              "set", "keepidle=900")  # fmt: skip
    v = values(out.stdout, "client-after")
    assert v["keepalive"] == 1 and v["keepidle"] == 20


def test_exec_passes_exit_status_and_appends_to_ld_preload(tmp_path):
    out = cli("exec", "--", "sh", "-c", 'echo "$LD_PRELOAD"; exit 9',
              env={"LD_PRELOAD": "libc.so.6"})  # fmt: skip
    assert out.returncode == 9
    entries = out.stdout.strip().replace(":", " ").split()
    assert entries[0] == "libc.so.6" and entries[-1].endswith("libbpfkeep.so")


def test_exec_warns_about_static_programs(probes, port):
    out = cli("exec", "--", probes["static"], "connect", "127.0.0.1", port)
    assert out.returncode == 0
    assert "statically linked" in out.stderr and "--via bpf" in out.stderr
    assert values(out.stdout)["keepalive"] == 0  # the shim cannot reach it


def test_run_via_preload(probes, port):
    out = cli("run", "--via", "preload", "--keepidle", "44", "--defer-accept", "5", "--",
              probes["dynamic"], "connect", "127.0.0.1", port)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert values(out.stdout)["keepidle"] == 44


@pytest.mark.kernel
def test_run_via_auto_falls_back_without_privileges(probes, port):
    # A copy of the probe that the unprivileged user may execute.
    shared = tempfile.mkdtemp(prefix="bpfkeep-exec-")
    os.chmod(shared, 0o755)
    probe = shutil.copy(probes["dynamic"], shared)
    try:
        out = subprocess.run(
            as_nobody(bpfkeep_cmd("/sys/fs/bpf/bpfkeep-none", "run", "--keepidle", "45",
                                  "--", probe, "connect", "127.0.0.1", port)),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        shutil.rmtree(shared)
    assert out.returncode == 0, out.stderr
    notices = [ln for ln in out.stderr.splitlines() if ln.startswith("bpfkeep:")]
    assert len(notices) == 1 and "falling back to the LD_PRELOAD shim" in notices[0]
    assert values(out.stdout)["keepidle"] == 45


def test_exec_without_command():
    out = cli("exec", "--keepidle", "5")
    assert out.returncode == 2 and "no COMMAND" in out.stderr


def test_exec_missing_program():
    out = cli("exec", "--", "/no/such/program")
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        "bpfkeep: cannot run /no/such/program: No such file or directory"
    ]


def test_module_runs_with_this_interpreter():
    assert (
        subprocess.run([sys.executable, "-m", "bpfkeep", "--help"], capture_output=True).returncode
        == 0
    )
