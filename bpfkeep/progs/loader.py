"""Compile bpfkeep's BPF programs with bcc and pin them in bpffs.

Run as its own short-lived process (``python -m bpfkeep.progs.loader
OBJ_DIR``) so that bcc's LLVM (~190 MB: importing bcc alone takes a process
to ~74 MB, compiling to ~190 MB) never lives in the CLI or the
daemon: they open the pinned objects through libbpf instead.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

from bpfkeep.errors import BpfkeepError, EnvironmentProblem, PermissionProblem
from bpfkeep.kernel import bpfsys
from bpfkeep.progs.header import bpf_dir, unit_text
from bpfkeep.progs.kheaders import bcc_environment

# The translation unit of all three programs: bcc gets it as one text
# (header.unit_text; bpf/bpfkeep.bpf.c says why).
SOURCE = "bpfkeep.bpf.c"
# Pinned object names in PIN_DIR/obj (programs and maps).
PROG_SOCKOPS = "prog_sockops"
PROG_SETSOCKOPT = "prog_setsockopt"
MAP_POLICY = "map_policy"  # cgroup storage: the attachment's own policy
MAP_COUNTERS = "map_counters"  # per-CPU cgroup storage
MAP_POLICIES = "map_policies"  # hash cgroup id -> policy
MAP_SK = "map_sk"  # socket storage: each socket's owner (struct bk_sk)
MAP_SWEEP = "map_sweep"  # hash cookie -> struct bk_sweep: the sweep's work list
MAP_SWEEPSTATS = "map_sweepstats"  # hash cgroup id -> sweep counters
# The sweep of existing sockets (iter/tcp).  Optional: a kernel that
# cannot load it (before 5.15) still gets the cgroup programs; the sweep
# then says so once (bpfkeep.sweep.engine).
PROG_SWEEP = "prog_sweep"
OBJECTS = (
    PROG_SOCKOPS,
    PROG_SETSOCKOPT,
    MAP_POLICY,
    MAP_COUNTERS,
    MAP_POLICIES,
    MAP_SK,
    MAP_SWEEP,
    MAP_SWEEPSTATS,
)
BPF_PROG_TYPE_CGROUP_SOCKOPT = 25  # no named constant in bcc 0.26


def _compile_and_pin(obj_dir: str) -> None:
    try:
        # Here only: bcc brings LLVM (~74 MB imported, ~190 MB compiling),
        # which must never live in the CLI or the daemon.
        from bcc import BPF, BPFAttachType
        from bcc.libbcc import lib as libbcc
    except ImportError:
        raise EnvironmentProblem(
            "bcc is not importable: apt-get install python3-bpfcc, and use a "
            "venv made with /usr/bin/python3 -m venv --system-site-packages"
        ) from None
    src = bpf_dir()
    try:
        b = BPF(
            text=unit_text(src / SOURCE).encode(),
            cflags=[f"-I{src}", "-Wno-unused-function"],
        )
        sockops = b.load_func(b"bk_sockops", BPF.SOCK_OPS)
        setsockopt = b.load_func(
            b"bk_setsockopt",
            BPF_PROG_TYPE_CGROUP_SOCKOPT,
            attach_type=BPFAttachType.CGROUP_SETSOCKOPT,
        )
    except Exception as e:  # bcc raises bare Exception
        msg = _last_line(e)
        if "Operation not permitted" in msg or ("Permission denied" in msg and os.geteuid()):
            raise PermissionProblem(
                f"loading the BPF programs was refused ({msg}): it needs root "
                "or CAP_BPF+CAP_PERFMON+CAP_NET_ADMIN; without them use the LD_PRELOAD "
                "fallback (bpfkeep exec)"
            ) from None
        raise EnvironmentProblem(f"loading the BPF programs failed: {msg}") from None
    fds = {PROG_SOCKOPS: sockops.fd, PROG_SETSOCKOPT: setsockopt.fd}
    sweep_error = ""
    try:
        fds[PROG_SWEEP] = b.load_func(b"bpf_iter__tcp", BPF.TRACING).fd
    except Exception as e:  # bcc raises bare Exception
        sweep_error = _last_line(e)
    for pinned, name in (
        (MAP_POLICY, b"bk_policy"),
        (MAP_COUNTERS, b"bk_counters"),
        (MAP_POLICIES, b"bk_policies"),
        (MAP_SK, b"bk_sk"),
        (MAP_SWEEP, b"bk_sweep"),
        (MAP_SWEEPSTATS, b"bk_sweepstats"),
    ):
        fd = libbcc.bpf_table_fd(b.module, name)
        if fd < 0:
            raise EnvironmentProblem(f"bcc lost map {name.decode()}")
        fds[pinned] = fd
    # bpffs cannot rename, so pin in place; the caller holds the pin
    # directory's lock and load() treats a partial set as absent.
    os.makedirs(obj_dir, exist_ok=True)
    for name in (*OBJECTS, PROG_SWEEP):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(obj_dir, name))
    if PROG_SWEEP in fds:
        bpfsys.obj_pin(fds[PROG_SWEEP], os.path.join(obj_dir, PROG_SWEEP))
    else:
        print(f"bpfkeep: notice: the sweep program did not load: {sweep_error}", file=sys.stderr)
    for name in OBJECTS:  # the complete set last: load() tests for it
        bpfsys.obj_pin(fds[name], os.path.join(obj_dir, name))


def _last_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else repr(e)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bpfkeep.progs.loader OBJ_DIR", file=sys.stderr)
        return 2
    try:
        _compile_and_pin(argv[0])
    except BpfkeepError as e:
        print(f"bpfkeep: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"bpfkeep: pinning the BPF objects failed: {e}", file=sys.stderr)
        return 1
    return 0


def load(obj_dir: str) -> None:
    """Make sure the programs are loaded and pinned at ``obj_dir``."""
    if all(os.path.exists(os.path.join(obj_dir, n)) for n in OBJECTS):
        return
    env = bcc_environment()
    # The loader must import bcc, which only the system Python has.
    proc = subprocess.run(
        [sys.executable, "-m", "bpfkeep.progs.loader", obj_dir],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("bpfkeep: ")]
        msg = lines[-1][len("bpfkeep: ") :] if lines else proc.stderr.strip()[-400:]
        if proc.returncode == PermissionProblem.exit_code:
            raise PermissionProblem(msg)
        raise EnvironmentProblem(msg or f"the BPF loader exited with {proc.returncode}")


if __name__ == "__main__":
    raise SystemExit(main())
