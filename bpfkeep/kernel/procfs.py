"""/proc: which sockets processes hold, which network namespaces their
threads live in, entering one, and the keepalive sysctls."""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import threading
import time
from collections.abc import Callable, Iterable

from bpfkeep.kernel.libc import CLONE_NEWNET, setns

# The sysctls that fill in what a socket's own keepalive times leave at 0
# (per network namespace), and the kernel's compiled-in values of them.
KEEPALIVE_SYSCTLS = ("tcp_keepalive_time", "tcp_keepalive_intvl", "tcp_keepalive_probes")
KEEPALIVE_KERNEL_DEFAULTS = (7200, 75, 9)
SYSCTL_DIR = "/proc/sys/net/ipv4"


def keepalive_sysctls(root: str = SYSCTL_DIR, *, fallback: bool = False) -> tuple[int, int, int]:
    """(time, intvl, probes) of the calling thread's network namespace.
    ``fallback``: the kernel's defaults for what cannot be read, instead
    of OSError/ValueError."""
    vals = []
    for name, default in zip(KEEPALIVE_SYSCTLS, KEEPALIVE_KERNEL_DEFAULTS, strict=True):
        try:
            with open(f"{root}/{name}") as f:
                vals.append(int(f.read().split()[0]))
        except (OSError, ValueError, IndexError):
            if not fallback:
                raise
            vals.append(default)
    return vals[0], vals[1], vals[2]


def kernel_hz(release: str | None = None) -> int | None:
    """The kernel's jiffies per second (CONFIG_HZ), from its config
    (/proc/config.gz or /boot/config-RELEASE); None if neither says."""
    release = release or os.uname().release
    for path, opener in (("/proc/config.gz", gzip.open), (f"/boot/config-{release}", open)):
        try:
            with opener(path, "rt") as f:  # type: ignore[operator]
                for line in f:
                    if line.startswith("CONFIG_HZ="):
                        return int(line.split("=", 1)[1])
        except (OSError, ValueError, EOFError):
            continue
    return _measured_hz()


_COMMON_HZ = (100, 250, 300, 1000)


def _measured_hz(proc: str = "/proc/timer_list") -> int | None:
    """HZ measured: jiffies counted over a known time (/proc/timer_list,
    root only), rounded to the values kernels are built with."""

    def sample() -> tuple[int, int] | None:
        now = jiffies = None
        try:
            with open(proc) as f:
                for line in f:
                    if now is None and line.startswith("now at "):
                        now = int(line.split()[2])
                    elif line.startswith("jiffies: "):
                        jiffies = int(line.split()[1])
                        break
        except (OSError, ValueError, IndexError):
            return None
        return None if now is None or jiffies is None else (now, jiffies)

    a = sample()
    time.sleep(0.2)
    b = sample()
    if a is None or b is None or b[0] <= a[0]:
        return None
    hz = (b[1] - a[1]) * 1e9 / (b[0] - a[0])
    return min(_COMMON_HZ, key=lambda c: abs(c - hz))


def socket_inodes(pid: int, proc: str = "/proc") -> list[int]:
    """Inodes of the sockets process ``pid`` holds (``socket:[N]`` fds);
    [] if it is gone or not ours to look into."""
    try:
        dfd = os.open(f"{proc}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return []
    out = []
    try:
        for fd in os.listdir(dfd):
            with contextlib.suppress(OSError):
                link = os.readlink(fd, dir_fd=dfd)
                if link.startswith("socket:["):
                    out.append(int(link[8:-1]))
    except OSError:
        pass
    finally:
        os.close(dfd)
    return out


def held_sockets(pids: dict[int, int], proc: str = "/proc") -> dict[int, int]:
    """socket inode -> the value of the first of ``pids`` holding it."""
    held: dict[int, int] = {}
    for pid, value in pids.items():
        for ino in socket_inodes(pid, proc):
            held.setdefault(ino, value)
    return held


def socket_owners(inodes: Iterable[int], proc: str = "/proc") -> dict[int, tuple[int, str]]:
    """socket inode -> (pid, comm) of the lowest-numbered process holding it.

    Processes that vanish or that we may not look into are skipped (their
    sockets stay without owner).  Stops as soon as every inode is found."""
    targets = {i for i in inodes if i}
    found: dict[int, int] = {}
    if not targets:
        return {}
    try:
        pids = sorted(int(p) for p in os.listdir(proc) if p.isdigit())
    except OSError:
        return {}
    for pid in pids:
        for ino in socket_inodes(pid, proc):
            if ino in targets and ino not in found:
                found[ino] = pid
        if len(found) == len(targets):
            break
    comms: dict[int, str] = {}
    for pid in set(found.values()):
        try:
            with open(f"{proc}/{pid}/comm") as f:
                comms[pid] = f.read().rstrip("\n")
        except OSError:
            comms[pid] = "?"
    return {ino: (pid, comms[pid]) for ino, pid in found.items()}


def namespaces(
    pids: Iterable[int], proc: str = "/proc", hidden: dict[str, str] | None = None
) -> dict[int, int | None]:
    """netns inode -> a thread id living in it (None: our own namespace).

    A network namespace is a thread's, not a process's: a thread that
    entered another one (setns) makes its sockets there, so every thread
    of every process counts (``/proc/TID/ns/net`` of a thread id is its
    own, although /proc lists only processes).  Processes whose namespace
    we may not see are noted in ``hidden``."""
    out: dict[int, int | None] = {}
    with contextlib.suppress(OSError):
        out[os.stat(f"{proc}/self/ns/net").st_ino] = None
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"{proc}/{pid}/task")]
        except (OSError, ValueError):
            tids = [pid]  # gone, or a /proc without task/: the process's own
        for tid in tids:
            try:
                out.setdefault(os.stat(f"{proc}/{pid}/task/{tid}/ns/net").st_ino, tid)
            except OSError as e:
                if hidden is not None and e.errno in (errno.EACCES, errno.EPERM):
                    hidden[f"process {pid}"] = (
                        "its network namespace is hidden from us (needs CAP_SYS_PTRACE)"
                    )
                    break
    return out


class Stuck(OSError):
    """A thread given a deadline did not finish (it is left behind)."""


def in_thread(fn: Callable[[], object], name: str, deadline: float | None = None) -> object:
    """``fn()`` in a thread of its own (which starts in the caller's network
    namespace); its result or exception is the caller's.  After
    ``deadline`` seconds the thread is left behind: Stuck."""
    box: dict[str, object] = {}

    def body() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=body, name=name, daemon=True)
    t.start()
    t.join(deadline)
    if t.is_alive():
        raise Stuck(errno.ETIMEDOUT, f"{name} did not finish within {deadline:.0f} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")


def in_netns(tid: int | None, fn: Callable[[], object]) -> object:
    """Run ``fn`` in the network namespace of thread ``tid`` (None: ours).

    A network namespace is entered per thread (setns), so a short-lived
    thread enters it and the caller's own namespace never changes.  Python
    3.11 has no os.setns: libc's, through ctypes."""
    if tid is None:
        return fn()

    def entered() -> object:
        fd = os.open(f"/proc/{tid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(fd, CLONE_NEWNET)
        finally:
            os.close(fd)
        return fn()

    return in_thread(entered, f"bpfkeep-netns-{tid}")
