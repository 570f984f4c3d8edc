"""Capabilities and bpffs: can this process load and attach the programs,
and where can it pin them."""

from __future__ import annotations

import contextlib
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


BPFFS_DEFAULT = "/sys/fs/bpf"  # where systemd mounts bpffs at boot


def existing(path: str) -> str:
    """``path``, or its nearest ancestor that exists: the filesystem that
    would hold it."""
    while not os.path.lexists(path) and path != "/":
        path = os.path.dirname(path)
    return path


def bpffs_mounts(table: str = "/proc/self/mounts") -> list[str]:
    """Where bpf filesystems are mounted in this mount namespace."""
    out = []
    with contextlib.suppress(OSError), open(table) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "bpf":
                out.append(fields[1].replace("\\040", " "))
    return out


def bpffs_view(pin_dir: str) -> str:
    """pin_dir as this process can reach it.  Under ``ip netns exec`` our
    /sys is a fresh sysfs without the host's bpffs; the host's is reached
    through a process in the host's mount namespace (cgroups.host_views).
    Pinning into a bpffs mounted in our private namespace instead would
    lose the pins -- and detach the policies -- when it goes away."""
    pin_dir = os.path.abspath(pin_dir)
    if is_bpffs(existing(pin_dir)):
        return pin_dir
    for via, _ in host_views():
        if is_bpffs(existing(via + pin_dir)):
            return via + pin_dir
    return pin_dir


def mountable_bpffs(pin_dir: str) -> bool:
    """Whether pin_dir is under the conventional /sys/fs/bpf while no bpffs
    is mounted there yet: ensure_bpffs mounts it.  Anywhere else, mounting
    bpffs is the operator's call (over /sys it would hide sysfs)."""
    return (
        pin_dir.startswith(BPFFS_DEFAULT + "/")
        and os.path.isdir(BPFFS_DEFAULT)
        and not is_bpffs(BPFFS_DEFAULT)
    )


def ensure_bpffs(pin_dir: str) -> None:
    """Make sure pin_dir is on a bpf filesystem: mount the conventional
    /sys/fs/bpf if the pin directory is below it and it simply is not
    mounted yet.  (PinDir.check has refused any other place.)"""
    pin_dir = os.path.abspath(pin_dir)
    if is_bpffs(existing(pin_dir)):
        return
    hint = netns_hint()
    if hint and hidden_mount("bpf"):
        raise EnvironmentProblem(
            f"{pin_dir} is not on a bpf filesystem in this mount namespace, and the "
            f"host's bpffs (at {hidden_mount('bpf')}) is out of reach: {hint} (or as root)"
        )
    if mountable_bpffs(pin_dir):
        proc = subprocess.run(
            ["mount", "-t", "bpf", "bpf", BPFFS_DEFAULT],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode == 0 and is_bpffs(BPFFS_DEFAULT):
            return
        raise EnvironmentProblem(
            f"bpffs is not mounted at {BPFFS_DEFAULT} and mounting it failed "
            f"({proc.stderr.strip() or proc.returncode}): run "
            f"mount -t bpf bpf {BPFFS_DEFAULT}"
        )
    raise EnvironmentProblem(
        f"{pin_dir} is not on a bpf filesystem: choose a pin directory under "
        f"{BPFFS_DEFAULT} (--pin-dir or BPFKEEP_PIN_DIR)"
    )
