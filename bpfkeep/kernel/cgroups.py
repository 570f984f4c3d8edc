"""cgroup v2: finding the mount, resolving user paths, ids and scratch groups."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import signal
import time
from collections.abc import Iterable, Iterator

from bpfkeep.errors import EnvironmentProblem, UsageError
from bpfkeep.kernel.libc import open_kernfs_id


@dataclasses.dataclass(frozen=True)
class Mounts:
    cgroup2: str | None
    v1: tuple[str, ...]
    # "/proc/PID/root" when the mounts are another mount namespace's, seen
    # through that process's root (see read_mounts); "" for our own.
    via: str = ""


def _parse_mounts(proc_mounts: str, via: str = "") -> Mounts:
    cg2 = None
    v1: list[str] = []
    with open(proc_mounts) as f:
        for line in f:
            fields = line.split()
            if len(fields) < 3:
                continue
            where = via + fields[1].replace("\\040", " ")
            if fields[2] == "cgroup2" and cg2 is None:
                cg2 = where
            elif fields[2] == "cgroup":
                v1.append(where)
    return Mounts(cg2, tuple(v1), via)


def host_views() -> Iterator[tuple[str, str]]:
    """("/proc/PID/root", "/proc/PID/mounts") of processes that may see the
    host's mounts when ours lack them: PID 1, then our ancestors.

    ``ip netns exec`` unshares the mount namespace and mounts a fresh sysfs
    on /sys (the one of the new network namespace), which hides the cgroup2
    and bpf filesystems mounted below /sys.  Those are still reachable
    through /proc/PID/root of a process in the original mount namespace:
    path lookup there continues in that process's mounts.  Reaching it
    needs ptrace access (root); PID 1 may refuse even root (a PID 1 with
    capabilities we lack), our parent (the shell that ran ip netns exec)
    usually does not."""
    yield "/proc/1/root", "/proc/1/mounts"
    pid, steps = os.getppid(), 0
    while pid > 1 and steps < 64:
        yield f"/proc/{pid}/root", f"/proc/{pid}/mounts"
        pid, steps = _ppid(pid), steps + 1


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat[stat.rindex(")") + 2 :].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def read_mounts(proc_mounts: str | None = None) -> Mounts:
    """The cgroup2 mount point and the cgroup v1 mount points.

    Without ``proc_mounts``: our own mount table, or -- when it has no
    cgroup2 (under ``ip netns exec``) -- the first reachable host view's
    (see host_views), with its paths prefixed by /proc/PID/root."""
    if proc_mounts is not None:
        return _parse_mounts(proc_mounts)
    own = _parse_mounts("/proc/self/mounts")
    if own.cgroup2:
        return own
    for via, table in host_views():
        try:
            other = _parse_mounts(table, via)
        except OSError:
            continue
        if other.cgroup2 and os.access(other.cgroup2, os.R_OK | os.X_OK):
            return other
    return own


def hidden_mount(fstype: str, tables: Iterable[str] = ("/proc/1/mounts",)) -> str | None:
    """Where PID 1's mount table has a filesystem of this type (readable even
    when /proc/1/root is not): the mount our namespace does not show."""
    for table in tables:
        with contextlib.suppress(OSError), open(table) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3 and fields[2] == fstype:
                    return fields[1]
    return None


def netns_hint() -> str | None:
    """What to run instead when ``ip netns exec`` hid cgroup2 or bpffs:
    nsenter enters only the network namespace and keeps our mounts.  None
    when nothing is hidden."""
    if _parse_mounts("/proc/self/mounts").cgroup2 or not hidden_mount("cgroup2"):
        return None
    name = "NAME"
    with contextlib.suppress(OSError):
        ours = os.stat("/proc/self/ns/net").st_ino
        for entry in sorted(os.listdir("/run/netns")):
            with contextlib.suppress(OSError):
                if os.stat(os.path.join("/run/netns", entry)).st_ino == ours:
                    name = entry
                    break
    return (
        f"this mount namespace hides the host's /sys mounts (ip netns exec remounts /sys): "
        f"instead of ip netns exec, run nsenter --net=/run/netns/{name} bpfkeep ..."
    )


def cgroup2_mount(mounts: Mounts | None = None) -> str:
    mounts = mounts or read_mounts()
    if not mounts.cgroup2:
        hint = netns_hint()
        if hint:
            raise EnvironmentProblem(
                f"no cgroup2 filesystem in this mount namespace, and the host's "
                f"(at {hidden_mount('cgroup2')}) is out of reach: {hint} (or as root)"
            )
        raise EnvironmentProblem(
            "no cgroup2 filesystem is mounted: mount it "
            "(mount -t cgroup2 none /sys/fs/cgroup) or boot with "
            "systemd.unified_cgroup_hierarchy=1"
        )
    return mounts.cgroup2


def printable(path: str) -> str:
    """A path as valid UTF-8 text: bytes that are not UTF-8 become ``\\xff``
    and a backslash becomes ``\\\\``.

    Cgroup names are bytes; Python keeps undecodable ones as surrogates
    (os.fsdecode), which is right for the filesystem and wrong for text
    that leaves the process (a Prometheus label must be UTF-8).  The
    backslash is escaped too, so that two names never give the same text:
    the byte 0xff and the four characters ``\\xff`` (systemd writes "-" in
    unit names as ``\\x2d``) would otherwise be one label value, and every
    family would carry two identical series."""
    if path.isascii() and "\\" not in path:  # nearly every path; a scrape asks for 10,000
        return path
    return os.fsencode(path).replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


@dataclasses.dataclass(frozen=True)
class Cgroup:
    path: str  # absolute filesystem path (os.fsdecode: bytes kept as surrogates)
    rel: str  # path relative to the cgroup2 mount ("" for the root)
    id: int  # kernel cgroup id (the directory's inode number on cgroup2)

    @property
    def is_root(self) -> bool:
        return self.rel == ""

    @property
    def display(self) -> str:
        """For people and labels: always valid UTF-8 (see printable)."""
        return "/" + printable(self.rel)

    @property
    def mount(self) -> str:
        """The cgroup2 mount this cgroup's path is under."""
        return self.path[: len(self.path) - len(self.rel)].rstrip("/") if self.rel else self.path

    @property
    def level(self) -> int:
        """Depth below the cgroup2 root (the root: 0)."""
        return self.rel.count("/") + 1 if self.rel else 0

    @classmethod
    def at(cls, path: str, mount: str, cgroup_id: int | None = None) -> Cgroup:
        """The cgroup at ``path`` under ``mount`` (its id read by stat
        unless given)."""
        rel = os.path.relpath(path, mount)
        rel = "" if rel == "." else rel
        return cls(path, rel, os.stat(path).st_ino if cgroup_id is None else cgroup_id)

    def ancestor_paths(self) -> Iterator[str]:
        """The paths above this cgroup, nearest first, the root last."""
        path, mount = self.path, self.mount
        while len(path) > len(mount):
            path = os.path.dirname(path)
            yield path


def _under(path: str, mount: str) -> bool:
    return path == mount or path.startswith(mount.rstrip("/") + "/")


def _shown(path: str) -> str:
    """A path for a message: as is, or quoted when it would break the line."""
    return path if path.isprintable() else repr(path)


def mount_relative(path: str, mounts: Mounts) -> str | None:
    """An absolute path's part below the cgroup2 mount ("" for the mount
    itself), or None when it is not under it.  A path in a cgroup v1
    hierarchy can never name a cgroup v2: UsageError with the fix.  (Under
    ``ip netns exec`` the host's paths are taken too: see read_mounts.)"""
    mount = cgroup2_mount(mounts)
    path = os.path.normpath(path)
    for m in {mount, mount[len(mounts.via) :] or "/"}:
        if _under(path, m):
            return path[len(m) :].strip("/")
    for v1 in mounts.v1:
        if _under(path, v1) or _under(path, v1[len(mounts.via) :]):
            raise UsageError(f"cgroup v1 path: use a path under the cgroup2 mount at {mount}")
    return None


def resolve(spec: str, *, mounts: Mounts | None = None, force_root: bool = False) -> Cgroup:
    """Turn a user's cgroup path into a Cgroup, or raise a one-line error.

    Accepted: a path under the cgroup2 mount, or a path relative to it
    (``system.slice/nginx.service``, ``/system.slice/nginx.service`` as
    /proc/PID/cgroup shows it).
    """
    mounts = mounts or read_mounts()
    mount = cgroup2_mount(mounts)
    if not spec or "\0" in spec:
        raise UsageError("--cgroup: empty path; give a path under " + mount)
    raw = _shown(spec)
    if os.path.isabs(spec):
        try:
            rel = mount_relative(spec, mounts)
        except UsageError as e:
            raise UsageError(f"{raw}: {e}") from None
        if rel is not None:
            path = os.path.join(mount, rel) if rel else mount
        else:
            # "/system.slice/x.service" as /proc/PID/cgroup writes it -- unless
            # no such cgroup exists and the path names a real file elsewhere
            # (/etc/passwd): then it was meant as a filesystem path.
            path = os.path.normpath(os.path.join(mount, spec.lstrip("/")))
            if not os.path.lexists(path) and os.path.lexists(os.path.normpath(spec)):
                raise UsageError(
                    f"{raw}: not under the cgroup2 mount at {mount}: give a cgroup "
                    "directory there (or a path relative to it, as /proc/PID/cgroup shows)"
                )
    else:
        path = os.path.normpath(os.path.join(mount, spec))
    if not _under(path, mount):
        raise UsageError(f"{raw}: outside the cgroup2 mount at {mount}")
    if not os.path.isdir(path):
        if os.path.lexists(path):
            raise UsageError(
                f"{raw}: {_shown(path)} is not a directory; a cgroup is a directory under {mount}"
            )
        raise UsageError(
            f"{raw}: no such cgroup ({_shown(path)} does not exist); create it "
            f"(mkdir {_shown(path)}) or check the name with systemd-cgls"
        )
    if not os.path.exists(os.path.join(path, "cgroup.procs")):
        raise UsageError(f"{raw}: {_shown(path)} is not a cgroup v2 directory")
    rel = os.path.relpath(path, mount)
    rel = "" if rel == "." else rel
    if rel == "" and not force_root:
        raise UsageError(
            f"{raw}: that is the root cgroup (every process on the host); "
            "pass --force if you mean it"
        )
    try:
        ino = os.stat(path).st_ino
    except FileNotFoundError:
        raise UsageError(f"{raw}: no such cgroup ({_shown(path)} was just removed)") from None
    return Cgroup(path, rel, ino)


def by_ids(ids: Iterable[int], mount: str | None = None) -> dict[int, Cgroup]:
    """Find the cgroups with these ids: each opened by its id (a file
    handle, as kernfs makes them: no walk), or else by walking the cgroup2
    tree -- 20,000 directories on a busy host, a second a walk."""
    wanted = set(ids)
    mount = mount or cgroup2_mount()
    found: dict[int, Cgroup] = {}
    if not wanted:
        return found
    wanted -= _opened_by_id(wanted, mount, found)
    if not wanted:
        return found
    for dirpath, _dirnames, _ in os.walk(mount):
        try:
            ino = os.stat(dirpath).st_ino
        except OSError:
            continue
        if ino in wanted:
            rel = os.path.relpath(dirpath, mount)
            found[ino] = Cgroup(dirpath, "" if rel == "." else rel, ino)
            if len(found) == len(wanted):
                break
    return found


def _opened_by_id(ids: set[int], mount: str, found: dict[int, Cgroup]) -> set[int]:
    """Open each cgroup by its id and read back its path; the ids settled
    (found, or no such cgroup now).  Those it cannot tell (no privilege,
    an old kernel, a path outside ``mount``) are left to the walk."""
    settled: set[int] = set()
    try:
        mfd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return settled
    prefix = mount.rstrip("/") + "/"
    try:
        for cg_id in ids:
            try:
                fd = open_kernfs_id(mfd, cg_id, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                if e.errno == errno.ESTALE:
                    settled.add(cg_id)  # no such cgroup (any more)
                    continue
                return settled  # not allowed here: the walk, for all left
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            finally:
                os.close(fd)
            if path.rstrip("/") == mount.rstrip("/"):
                found[cg_id] = Cgroup(mount, "", cg_id)
            elif path.startswith(prefix) and not path.endswith(" (deleted)"):
                found[cg_id] = Cgroup(path, path[len(prefix) :], cg_id)
            else:
                continue
            settled.add(cg_id)
    finally:
        os.close(mfd)
    return settled


def own_cgroup(mount: str | None = None, pid: str = "self") -> str:
    """Absolute path of a process's cgroup v2."""
    mount = mount or cgroup2_mount()
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            hier, _, rest = line.rstrip("\n").partition(":")
            ctrl, _, path = rest.partition(":")
            if hier == "0" and ctrl == "":
                return os.path.normpath(os.path.join(mount, path.lstrip("/")))
    raise EnvironmentProblem("this process is in no cgroup v2 (no 0:: line)")


def make_child(parent: str, prefix: str) -> str:
    path = os.path.join(parent, f"{prefix}-{os.getpid()}-{time.monotonic_ns() % 10**9}")
    os.mkdir(path)
    return path


def procs(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def move(pid: int, path: str) -> None:
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(pid))


def remove(path: str, *, evacuate_to: str | None = None, timeout: float = 2.0) -> None:
    """Remove a (leaf) cgroup, moving leftover processes out first."""
    deadline = time.monotonic() + timeout
    while True:
        if evacuate_to:
            for pid in procs(path):
                with contextlib.suppress(OSError):
                    move(pid, evacuate_to)
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            # EBUSY: processes still leaving (zombies are reaped lazily).
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def remove_tree(top: str, *, timeout: float = 5.0) -> None:
    """Kill every process in a scratch cgroup tree and remove it, deepest
    cgroups first (the tests' and the benchmark's cleanup)."""
    if not os.path.isdir(top):
        return
    for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda t: -t[0].count("/")):
        for pid in procs(dirpath):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        remove(dirpath, timeout=timeout)
