"""/proc: which sockets processes hold, the keepalive sysctls and the
kernel's HZ.  (Which network namespaces processes live in, and entering
one: kernel.netns.)"""

from __future__ import annotations

import contextlib
import gzip
import os
import time
from collections.abc import Iterable
from typing import TypeVar

# The sysctls that fill in what a socket's own keepalive times leave at 0
# (per network namespace), and the kernel's compiled-in values of them.
KEEPALIVE_SYSCTLS = ("tcp_keepalive_time", "tcp_keepalive_intvl", "tcp_keepalive_probes")
KEEPALIVE_KERNEL_DEFAULTS = (7200, 75, 9)
SYSCTL_DIR = "/proc/sys/net/ipv4"
V = TypeVar("V")


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
    return list(_socket_fds(f"{proc}/{pid}/fd"))


# A process's sockets are read again at least this often even when its
# number of open files did not change (one closed, another received).
HELD_MAX_AGE = 600.0


class HeldSockets:
    """The sockets processes hold, read again only for the processes that
    changed: a process is read when it is new to us (a reused pid is a new
    ``/proc/PID/fd`` inode), when its number of open files changed (the
    size of ``/proc/PID/fd``, Linux 6.2+; before that, every time), and at
    least every ``max_age`` seconds.  Reading every descriptor of a process
    holding 100,000 sockets is 100,000 readlinks: most of what a periodic
    sweep of them cost.  Sockets are told apart by protocol only when asked
    (``is_tcp``: the socket's ``system.sockprotoname``), once per socket."""

    def __init__(self, proc: str = "/proc", max_age: float = HELD_MAX_AGE):
        self.proc = proc
        self.max_age = max_age
        # pid -> (fd directory inode, open files, read at, socket inode -> fd)
        self._pids: dict[int, tuple[int, int, float, dict[int, int]]] = {}
        self._changes: dict[int, int] = {}  # pid -> times its set of sockets changed
        self._tcp: dict[int, bool] = {}  # socket inode -> TCP or not
        self.reads = 0  # processes read (tests, the benchmark)

    def of(self, pid: int, now: float | None = None) -> dict[int, int]:
        """Socket inode -> a descriptor of it, for process ``pid``."""
        try:
            st = os.stat(f"{self.proc}/{pid}/fd")
        except OSError:
            self._pids.pop(pid, None)
            return {}
        now = time.monotonic() if now is None else now
        known = self._pids.get(pid)
        if (
            known is not None
            and st.st_size  # 0: a kernel that does not count them
            and (known[0], known[1]) == (st.st_ino, st.st_size)
            and now - known[2] < self.max_age
        ):
            return known[3]
        socks = _socket_fds(f"{self.proc}/{pid}/fd")
        self.reads += 1
        if known is None or known[0] != st.st_ino or known[3].keys() != socks.keys():
            self._changes[pid] = self._changes.get(pid, 0) + 1
        self._pids[pid] = (st.st_ino, st.st_size, now, socks)
        return socks

    def version(self, pid: int, now: float | None = None) -> int:
        """A number that changes whenever the sockets ``pid`` holds do (read
        again as ``of`` does): a namespace whose processes all keep their
        version holds the same sockets."""
        self.of(pid, now)
        return self._changes.get(pid, 0)

    def held(self, pids: dict[int, V]) -> dict[int, V]:
        """socket inode -> the value of the first of ``pids`` holding it."""
        now = time.monotonic()
        out: dict[int, V] = {}
        for pid, value in pids.items():
            for ino in self.of(pid, now):
                out.setdefault(ino, value)
        return out

    def is_tcp(self, pid: int, inode: int) -> bool:
        """Whether the socket ``inode`` that ``pid`` holds is a TCP one
        (``ss`` and the sweep see no others); False if it cannot tell."""
        known = self._tcp.get(inode)
        if known is not None:
            return known
        fd = self._pids.get(pid, (0, 0, 0.0, {}))[3].get(inode)
        if fd is None:
            return False
        try:
            name = os.getxattr(f"{self.proc}/{pid}/fd/{fd}", "system.sockprotoname")
        except OSError:
            return False  # closed meanwhile: nothing to sweep
        tcp = name.rstrip(b"\0") in (b"TCP", b"TCPv6")
        self._tcp[inode] = tcp
        return tcp

    def keep_only(self, pids: Iterable[int]) -> None:
        """Forget processes not in ``pids`` (gone, or out of every scope)."""
        alive = set(pids)
        for pid in [p for p in self._pids if p not in alive]:
            del self._pids[pid]
        for pid in [p for p in self._changes if p not in alive]:
            del self._changes[pid]
        if len(self._tcp) > 4 * sum(len(v[3]) for v in self._pids.values()) + 1024:
            held = {i for v in self._pids.values() for i in v[3]}
            self._tcp = {i: t for i, t in self._tcp.items() if i in held}


def _socket_fds(fd_dir: str) -> dict[int, int]:
    """socket inode -> fd, for the ``socket:[N]`` entries of an fd directory."""
    try:
        dfd = os.open(fd_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return {}
    out: dict[int, int] = {}
    try:
        for fd in os.listdir(dfd):
            with contextlib.suppress(OSError):
                link = os.readlink(fd, dir_fd=dfd)
                if link.startswith("socket:["):
                    out.setdefault(int(link[8:-1]), int(fd))
    except OSError:
        pass
    finally:
        os.close(dfd)
    return out


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
