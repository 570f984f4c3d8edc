"""``bpfkeep doctor``: on this host (checked against what the test reads
itself), unprivileged, and its pure helpers."""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys

import pytest
from conftest import as_nobody, bpfkeep_cmd

from bpfkeep import doctor
from bpfkeep.doctor import FAIL, OK, WARN, Check

CHECKS = (
    "kernel",
    "kernel config",
    "cgroup2",
    "bpffs",
    "privileges",
    "bcc",
    "kernel headers",
    "preload shim",
    "audit",
    "keepalive sysctls",
)


def doctor_cmd(*args: str, pin_dir: str = "/sys/fs/bpf/bpfkeep") -> list[str]:
    """``bpfkeep doctor ...``: the installed console script."""
    return bpfkeep_cmd(pin_dir, "doctor", *args)


def parse_lines(text: str) -> dict[str, tuple[str, str]]:
    """check name -> (status, rest of the line)."""
    found = {}
    for ln in text.splitlines():
        status = ln[:4].strip()
        if status not in (OK, WARN, FAIL):
            continue
        rest = ln[6:]
        for name in sorted(CHECKS, key=len, reverse=True):
            if rest.startswith(name + " "):
                found[name] = (status, rest[len(name) :].strip())
                break
    return found


def host_sysctls() -> tuple[int, int, int]:
    vals = []
    for name in ("tcp_keepalive_time", "tcp_keepalive_intvl", "tcp_keepalive_probes"):
        with open(f"/proc/sys/net/ipv4/{name}") as f:
            vals.append(int(f.read()))
    return tuple(vals)


# -- on this host --------------------------------------------------------------


def test_doctor_on_this_host():
    proc = subprocess.run(doctor_cmd(), capture_output=True, text=True, timeout=120)
    lines = parse_lines(proc.stdout)
    assert set(lines) == set(CHECKS), proc.stdout
    statuses = {s for s, _ in lines.values()}
    assert proc.returncode == (1 if FAIL in statuses else 0), proc.stdout
    # Every problem comes with what to do.
    out = proc.stdout.splitlines()
    for i, ln in enumerate(out):
        if ln.startswith((WARN, FAIL)):
            assert out[i + 1].strip().startswith("fix: "), ln

    t, i, p = host_sysctls()
    total = t + i * p
    status, text = lines["keepalive sysctls"]
    assert status == OK
    assert f"tcp_keepalive_time={t} intvl={i} probes={p}" in text
    assert f"{t} + {p} × {i} s = {doctor.format_duration(total)}" in text

    status, text = lines["kernel"]
    assert platform.release() in text
    assert "TCP_DEFER_ACCEPT: preload shim only" in text
    if doctor.parse_kernel_version(platform.release()) >= (6, 1):
        assert status == OK and "TCP_MAXSEG" in text and "not " not in text

    if os.geteuid() == 0:
        assert lines["privileges"][0] == OK
    with open("/proc/mounts") as f:
        cg2 = next((ln.split()[1] for ln in f if ln.split()[2] == "cgroup2"), None)
    status, text = lines["cgroup2"]
    if cg2 is None:
        assert status == FAIL
    else:
        assert status in (OK, WARN) and f"cgroup2 at {cg2}" in text

    # --json says the same.
    proc_json = subprocess.run(doctor_cmd("--json"), capture_output=True, text=True, timeout=120)
    doc = json.loads(proc_json.stdout)
    assert proc_json.returncode == proc.returncode
    assert {c["name"]: c["status"] for c in doc["checks"]} == {n: s for n, (s, _) in lines.items()}
    assert doc["bpf_usable"] is (proc.returncode == 0)
    (sysctl,) = (c for c in doc["checks"] if c["name"] == "keepalive sysctls")
    assert sysctl["details"] == {
        "tcp_keepalive_time": t,
        "tcp_keepalive_intvl": i,
        "tcp_keepalive_probes": p,
        "worst_case_seconds": total,
    }


@pytest.mark.kernel
def test_doctor_unprivileged_says_bpf_is_unusable_and_why():
    """As nobody, with no capabilities: FAIL on privileges, exit status 1."""
    proc = subprocess.run(
        as_nobody(doctor_cmd()),
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    lines = parse_lines(proc.stdout)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    status, text = lines["privileges"]
    assert status == FAIL and "uid 65534" in text
    assert "bpfkeep exec -- COMMAND" in proc.stdout
    assert "bpfkeep cannot attach policies on this host" in proc.stdout


# -- checks with a stand-in host ---------------------------------------------------


def test_kernel_check_by_version():
    old = doctor.check_kernel("5.4.0-150-generic")
    assert old.status == FAIL and "5.10" in old.message and "bpfkeep exec" in old.fix
    mid = doctor.check_kernel("5.10.0-28-amd64")
    assert mid.status == OK
    assert "not TCP_MAXSEG (Linux 6.1), TCP_WINDOW_CLAMP (Linux 6.1)" in mid.message
    new = doctor.check_kernel("6.18.2")
    assert new.status == OK and new.details["bpf_refused"] == []
    assert new.details["preload_only"] == ["TCP_DEFER_ACCEPT"]


def test_privileges_from_capabilities(tmp_path):
    status = tmp_path / "status"
    bits = {name: 1 << bit for name, bit in doctor.CAPS.items()}

    def check(*names: str):
        status.write_text(f"Name:\tx\nCapEff:\t{sum(bits[n] for n in names):016x}\n")
        return doctor.check_privileges(str(status))

    c = check()
    assert c.status == FAIL and "CAP_BPF CAP_PERFMON CAP_NET_ADMIN" in c.fix
    # CAP_BPF + CAP_NET_ADMIN is not enough: the verifier wants CAP_PERFMON.
    c = check("CAP_BPF", "CAP_NET_ADMIN")
    assert c.status == FAIL and "missing CAP_PERFMON" in c.message
    # Enough to load and attach; the sweep of other namespaces wants more.
    c = check("CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON")
    assert c.status == WARN and "CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH" in c.message
    c = check("CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH")
    assert c.status == OK
    assert check("CAP_BPF").status == FAIL


def test_a_pin_directory_off_bpffs_is_a_failure_that_names_bpffs(tmp_path):
    """Not "mount -t bpf bpf <its parent>": over /tmp or /sys that would
    hide what is there."""
    c = doctor.check_bpffs(str(tmp_path / "pins"))
    assert c.status == FAIL and "not on a bpf filesystem" in c.message, c
    assert "mount -t bpf bpf " + str(tmp_path) not in f"{c.message} {c.fix}"


def _fake_python(tmp_path, code: int, stderr: str) -> str:
    exe = tmp_path / "python"
    exe.write_text(f"#!/bin/sh\necho '{stderr}' >&2\nexit {code}\n")
    exe.chmod(0o755)
    return str(exe)


def test_bcc_missing_or_impostor(tmp_path, monkeypatch):
    monkeypatch.setattr(
        doctor.sys, "executable", _fake_python(tmp_path, 1, "ModuleNotFoundError: bcc")
    )
    c = doctor.check_bcc(loaded=False)
    assert c.status == FAIL and "ModuleNotFoundError: bcc" in c.message
    assert "python3-bpfcc" in c.fix and "--system-site-packages" in c.fix
    assert doctor.check_bcc(loaded=True).status == WARN  # programs already pinned
    monkeypatch.setattr(doctor.sys, "executable", _fake_python(tmp_path, 3, ""))
    c = doctor.check_bcc(loaded=False)
    assert c.status == FAIL and "unrelated" in c.message and c.fix.startswith("pip uninstall bcc")


def test_headers_missing(monkeypatch):
    from bpfkeep.progs import kheaders

    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    monkeypatch.setattr(kheaders, "running_kernel_tree", lambda: None)
    monkeypatch.setattr(kheaders, "find_header_sets", lambda: [])
    c = doctor.check_headers(loaded=False)
    assert c.status == FAIL and c.fix == kheaders.package_hint()
    assert doctor.check_headers(loaded=True).status == WARN


def test_preload_missing_is_a_warning(monkeypatch):
    from bpfkeep.errors import EnvironmentProblem

    def missing():
        raise EnvironmentProblem("libbpfkeep.so not found: build it with `make -C preload`")

    monkeypatch.setattr(doctor, "library_path", missing)
    c = doctor.check_preload()
    assert c.status == WARN and "make -C preload" in c.fix


def test_sysctls_from_a_directory(tmp_path):
    for name, v in (("tcp_keepalive_time", 100), ("tcp_keepalive_intvl", 10)):
        (tmp_path / name).write_text(f"{v}\n")
    assert doctor.check_sysctls(str(tmp_path)).status == WARN  # probes missing
    (tmp_path / "tcp_keepalive_probes").write_text("3\n")
    c = doctor.check_sysctls(str(tmp_path))
    assert c.status == OK and "100 + 3 × 10 s = 2 min 10 s" in c.message
    assert c.details["worst_case_seconds"] == 130


@pytest.mark.parametrize("statuses, code", [((OK, OK), 0), ((OK, WARN), 0), ((WARN, FAIL), 1)])
def test_exit_status_and_json(monkeypatch, statuses, code):
    fake = [Check(f"c{i}", s, f"m{i}", None if s == OK else "do x") for i, s in enumerate(statuses)]
    monkeypatch.setattr(doctor, "checks", lambda pin_dir: fake)
    out = io.StringIO()
    assert doctor.run(argparse.Namespace(json=False, pin_dir=None), out) == code
    assert out.getvalue().count("fix: do x") == sum(s != OK for s in statuses)
    out = io.StringIO()
    assert doctor.run(argparse.Namespace(json=True, pin_dir=None), out) == code
    doc = json.loads(out.getvalue())
    assert doc["bpf_usable"] is (code == 0)
    assert [c["status"] for c in doc["checks"]] == list(statuses)


# -- pure helpers ------------------------------------------------------------------


@pytest.mark.parametrize(
    "seconds, text",
    [
        (7875, "2 h 11 min 15 s"),
        (0, "0 s"),
        (59, "59 s"),
        (60, "1 min"),
        (7200, "2 h"),
        (3601, "1 h 1 s"),
        (32767 + 127 * 32767, "48 d 13 h 2 min 56 s"),
    ],
)
def test_format_duration(seconds, text):
    assert doctor.format_duration(seconds) == text


def test_worst_case_and_summary():
    assert doctor.worst_case(7200, 75, 9) == 7875
    assert doctor.keepalive_summary(7200, 75, 9) == "7200 + 9 × 75 s = 2 h 11 min 15 s"
    assert doctor.worst_case(2, 1, 3) == 5  # the measured dead-peer case


def test_bpf_options_for_kernel():
    core = [
        "SO_KEEPALIVE",
        "TCP_KEEPIDLE",
        "TCP_KEEPINTVL",
        "TCP_KEEPCNT",
        "TCP_USER_TIMEOUT",
        "TCP_SYNCNT",
    ]
    assert doctor.bpf_options_for_kernel((4, 19)) == []
    assert doctor.bpf_options_for_kernel((5, 10)) == core
    assert doctor.bpf_options_for_kernel((5, 15)) == core
    assert doctor.bpf_options_for_kernel((6, 1)) == [*core, "TCP_MAXSEG", "TCP_WINDOW_CLAMP"]
    assert "TCP_DEFER_ACCEPT" not in doctor.bpf_options_for_kernel((99, 0))


def test_parsers():
    assert doctor.parse_kernel_version("6.18.44-fc-v595") == (6, 18)
    assert doctor.parse_kernel_version("garbage") == (0, 0)
    assert doctor.capabilities("CapEff:\t000001ffffffffff\n") == set(doctor.CAPS)
    assert doctor.capabilities("no caps line") == set()
    assert doctor.kernel_config_values(
        "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=m\n", ["CONFIG_A", "CONFIG_B", "CONFIG_C"]
    ) == {"CONFIG_A": "y", "CONFIG_B": None, "CONFIG_C": "m"}


# -- the kernel is judged from its version, not from sockets --------------------

_HOLD_SERVER = """
import socket, sys
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen(1)
print("ready", s.getsockname()[1], flush=True)
c, _ = s.accept()
sys.stdin.read()  # holds the connection (CLOSE-WAIT) until stdin closes
"""

_ORPHAN_CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.shutdown(socket.SHUT_WR)
while s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)[0] != 5:  # until FIN_WAIT2
    pass  # the peer's ACK of our FIN is a round trip away
s.close()  # an orphan now: the kernel keeps it in FIN-WAIT-2, with no owner
"""


@pytest.mark.kernel
def test_doctor_judges_the_kernel_by_version_not_by_an_orphan(netns_pair, spawn):
    """The only TCP socket of a namespace is an orphan in FIN-WAIT-2 (a
    timewait sock: no cgroup id on any kernel).  doctor used to conclude
    "Linux < 5.7" from it."""
    srv = spawn([sys.executable, "-c", _HOLD_SERVER, netns_pair.server_ip], netns=netns_pair.server)
    port = srv.expect("ready").split()[1]
    subprocess.run(
        ["ip", "netns", "exec", netns_pair.client, sys.executable, "-c", _ORPHAN_CLIENT,
         netns_pair.server_ip, port],
        check=True, timeout=60,
    )  # fmt: skip
    ss = subprocess.run(
        ["ip", "netns", "exec", netns_pair.client, "ss", "-tanH"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert len(ss) == 1 and ss[0].startswith("FIN-WAIT-2"), ss
    out = subprocess.run(
        ["ip", "netns", "exec", netns_pair.client, *doctor_cmd("--json")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    audit = {c["name"]: c for c in json.loads(out.stdout)["checks"]}["audit"]
    assert audit["status"] == OK, audit
    assert "5.7" not in audit["message"]


def test_audit_check_by_version(monkeypatch):
    monkeypatch.setattr(doctor, "scan", lambda **_kw: [])
    assert doctor.check_audit((6, 18)).status == OK
    old = doctor.check_audit((5, 4))
    assert old.status == WARN and "Linux < 5.7" in old.message
