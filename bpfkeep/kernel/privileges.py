"""Capabilities and bpffs: can this process load and attach the programs,
and where can it pin them."""

from __future__ import annotations

import os
import subprocess

from bpfkeep.errors import EnvironmentProblem, PermissionProblem
from bpfkeep.kernel.cgroups import hidden_mount, host_views, netns_hint
from bpfkeep.kernel.libc import statfs_type

BPF_FS_MAGIC = 0xCAFE4A11  # include/uapi/linux/magic.h

# Capability bits (include/uapi/linux/capability.h)
CAPS = {
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_NET_ADMIN": 12,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_ADMIN": 21,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
}
# What loading and attaching needs (Linux 5.8+).  CAP_PERFMON is not
# optional: without it the verifier refuses the programs' pointer
# arithmetic ("pointer arithmetic ... prohibited for !root"), and the
# sweep's iterator is a tracing program.  CAP_SYS_ADMIN alone implies all
# three.
LOAD_CAPS = ("CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN")
# What the sweep of existing sockets needs beyond that: entering other
# network namespaces (setns) and looking into other processes' fds and
# namespaces, whoever owns them (/proc/PID/fd is mode 0500).  Without them
# those sockets are reported as unreachable.
SWEEP_CAPS = ("CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH")


def capabilities(status_text: str) -> set[str]:
    """Which of CAPS a /proc/PID/status text has in its effective set."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            eff = int(line.split()[1], 16)
            return {name for name, bit in CAPS.items() if eff >> bit & 1}
    return set()


def own_capabilities(status_path: str = "/proc/self/status") -> set[str]:
    with open(status_path) as f:
        return capabilities(f.read())


def missing_load_caps(caps: set[str]) -> list[str]:
    """The capabilities still needed to load and attach the programs."""
    if "CAP_SYS_ADMIN" in caps:
        return []
    return [c for c in LOAD_CAPS if c not in caps]


def has_bpf_privileges(status_path: str = "/proc/self/status") -> bool:
    return not missing_load_caps(own_capabilities(status_path))


def require_privileges() -> None:
    missing = missing_load_caps(own_capabilities())
    if missing:
        raise PermissionProblem(
            f"loading BPF needs root or {', '.join(LOAD_CAPS)} (missing: "
            f"{', '.join(missing)}); without them use the LD_PRELOAD fallback: "
            "bpfkeep exec -- COMMAND"
        )


def is_bpffs(path: str) -> bool:
    """Whether path is on a bpf filesystem."""
    return statfs_type(path) == BPF_FS_MAGIC


def bpffs_view(pin_dir: str) -> str:
    """pin_dir as this process can reach it.  Under ``ip netns exec`` our
    /sys is a fresh sysfs without the host's bpffs; the host's is reached
    through a process in the host's mount namespace (cgroups.host_views).
    Pinning into a bpffs mounted in our private namespace instead would
    lose the pins -- and detach the policies -- when it goes away."""
    pin_dir = os.path.abspath(pin_dir)
    parent = os.path.dirname(pin_dir)
    if is_bpffs(parent):
        return pin_dir
    for via, _ in host_views():
        if is_bpffs(via + parent):
            return via + pin_dir
    return pin_dir


def ensure_bpffs(pin_dir: str) -> None:
    """Make sure pin_dir's parent is on a bpf filesystem; mount it if the
    conventional /sys/fs/bpf is simply not mounted yet."""
    parent = os.path.dirname(os.path.abspath(pin_dir))
    if is_bpffs(parent):
        return
    hint = netns_hint()
    if hint and hidden_mount("bpf"):
        raise EnvironmentProblem(
            f"{parent} is not on a bpf filesystem in this mount namespace, and the "
            f"host's bpffs (at {hidden_mount('bpf')}) is out of reach: {hint} (or as root)"
        )
    if parent == "/sys/fs/bpf" and os.path.isdir(parent):
        proc = subprocess.run(
            ["mount", "-t", "bpf", "bpf", parent],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode == 0 and is_bpffs(parent):
            return
        raise EnvironmentProblem(
            f"bpffs is not mounted at {parent} and mounting it failed "
            f"({proc.stderr.strip() or proc.returncode}): run "
            f"mount -t bpf bpf {parent}"
        )
    raise EnvironmentProblem(
        f"{parent} is not on a bpf filesystem: mount one (mount -t bpf bpf "
        f"{parent}) or choose a pin directory under /sys/fs/bpf"
    )
