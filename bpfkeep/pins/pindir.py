"""The pin directory: where everything bpfkeep attaches is kept, so that it
outlives the process that made it.

Layout (default /sys/fs/bpf/bpfkeep; bpffs refuses "." in names):

    obj-V/prog_sockops, obj-V/prog_setsockopt   the programs, loaded once
    obj-V/prog_sweep                            the sweep's iterator (5.15+)
    obj-V/map_*                                 their maps (progs.loader.OBJECTS)
    links/<cgroup id>_sockops                   bpf_links, one pair per cgroup
    links/<cgroup id>_setsockopt

V is a hash of the BPF sources (progs.header.source_version): a bpfkeep
whose programs differ loads its own set and migrates (pins.migrate).
Every bpfkeep process that writes takes the directory's lock (flock) for
the time it writes (the sweep's work list has a lock of its own:
worklist_lock); the one daemon that keeps a pin directory holds a lock
of its own for its life, outside bpffs (DaemonLock).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
from collections.abc import Iterable, Iterator

from bpfkeep.errors import EnvironmentProblem, UsageError
from bpfkeep.kernel import bpfsys
from bpfkeep.kernel.privileges import (
    BPFFS_DEFAULT,
    bpffs_mounts,
    bpffs_view,
    ensure_bpffs,
    existing,
    is_bpffs,
    mountable_bpffs,
)
from bpfkeep.kernel.ringbuf import RingBuffer
from bpfkeep.progs import loader
from bpfkeep.progs.header import source_version

DEFAULT_PIN_DIR = "/sys/fs/bpf/bpfkeep"
# Where the daemons' locks are (see DaemonLock): the unit's
# RuntimeDirectory=bpfkeep; a hostPath volume in the DaemonSet.
DAEMON_LOCK_DIR = "/run/bpfkeep/daemons"
NAME_MAX = 255  # bytes per path component (include/uapi/linux/limits.h)
# (name, attach type, pinned program) of each cgroup hook a policy needs.
HOOKS = (
    ("sockops", bpfsys.BPF_CGROUP_SOCK_OPS, loader.PROG_SOCKOPS),
    ("setsockopt", bpfsys.BPF_CGROUP_SETSOCKOPT, loader.PROG_SETSOCKOPT),
)
HOOK_NAMES = tuple(h for h, _, _ in HOOKS)


def fully_attached(hooks: Iterable[str]) -> bool:
    """Whether these hooks (pinned or live) are every hook a policy needs."""
    return set(HOOK_NAMES) <= set(hooks)


def pin_dir_default() -> str:
    return os.environ.get("BPFKEEP_PIN_DIR") or DEFAULT_PIN_DIR


def _ours(name: str) -> bool:
    return name == "links" or name.startswith("obj-")


def _foreign(directory: str) -> list[str]:
    """What in ``directory`` is not bpfkeep's (obj-*/ and links/, both
    directories); nothing when it cannot be listed (no privileges: the
    command that needs them says so)."""
    try:
        with os.scandir(directory) as it:
            return sorted(
                e.name for e in it if not (_ours(e.name) and e.is_dir(follow_symlinks=False))
            )
    except OSError:
        return []


def _on_bpffs() -> str:
    """Where a pin directory can be instead: under the bpffs mounted here."""
    mounts = bpffs_mounts()
    if not mounts:
        return f"mount one (mount -t bpf bpf {BPFFS_DEFAULT}) and use {DEFAULT_PIN_DIR}"
    base = BPFFS_DEFAULT if BPFFS_DEFAULT in mounts else mounts[0]
    return (
        f"give a directory on bpffs, e.g. --pin-dir {base}/bpfkeep "
        f"(or BPFKEEP_PIN_DIR; bpffs is mounted at {', '.join(mounts)})"
    )


class PinDir:
    """One pin directory: its paths, its lock, its objects and what is
    pinned in it."""

    def __init__(self, pin_dir: str | None = None, version: str | None = None):
        self.given = pin_dir or pin_dir_default()
        self.pin_dir = bpffs_view(self.given)
        self.version = version or source_version()
        self.obj_dir = os.path.join(self.pin_dir, f"obj-{self.version}")
        self.link_dir = os.path.join(self.pin_dir, "links")

    # -- the directory -------------------------------------------------------

    def check(self) -> None:
        """One line naming the problem and the fix for a pin directory that
        cannot be one -- bpffs cannot hold it, it is not on bpffs, or it
        holds what bpfkeep did not put there -- instead of an OSError from
        deep inside, a status that finds nothing, or a ``detach --all``
        that unpins another tool's objects."""
        fix = "choose another with --pin-dir or BPFKEEP_PIN_DIR"
        where = f"pin directory {self.pin_dir}"
        if self.given.rstrip("/") != self.pin_dir:
            where = f"pin directory {self.given} (that is {self.pin_dir})"
        for part in self.pin_dir.split("/"):
            if len(os.fsencode(part)) > NAME_MAX:
                raise UsageError(
                    f"{where}: the name {part[:20]}... is {len(os.fsencode(part))} bytes, "
                    f"longer than the {NAME_MAX} a file name may have; {fix}"
                )
        # The deepest part that exists must be a directory; what bpfkeep
        # creates below it must be a name bpffs accepts (no ".": the kernel
        # refuses it with EPERM, see bpf_lookup in kernel/bpf/inode.c).
        path = existing(self.pin_dir)
        to_make = self.pin_dir[len(path) :].strip("/").split("/") if path != self.pin_dir else []
        if not os.path.isdir(path):
            raise UsageError(
                f"{where}: {path} is not a directory (a pinned BPF program or map, or a "
                f"file); {fix}"
            )
        if not is_bpffs(path):
            if to_make and mountable_bpffs(self.pin_dir):
                return  # make() mounts bpffs at /sys/fs/bpf; nothing is pinned yet
            raise UsageError(f"{where} is not on a bpf filesystem: {_on_bpffs()}")
        dotted = [n for n in to_make if "." in n]
        if dotted:
            raise UsageError(f"{where}: bpffs does not allow '.' in names ({dotted[-1]}); {fix}")
        if not to_make:
            self._check_contents(where, fix)

    def _check_contents(self, where: str, fix: str) -> None:
        """An existing pin directory holds only obj-*/ and links/."""
        parent, name = os.path.split(self.pin_dir)
        if _ours(name) and not _foreign(parent):
            what = "links" if name == "links" else "objects"
            raise UsageError(
                f"{where} is the {what} directory of the pin directory {parent}: "
                f"use --pin-dir {parent}"
            )
        foreign = _foreign(self.pin_dir)
        if foreign:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise UsageError(
                f"{where} is not a bpfkeep pin directory: it holds {', '.join(foreign[:3])}"
                f"{more} (bpfkeep keeps only obj-*/ and links/ there, and removes both "
                f"at detach --all); {fix}"
            )

    def error(self, e: OSError) -> Exception:
        """An OSError about the directory, as the one line to show."""
        self.check()  # raises when it can name the problem better
        return EnvironmentProblem(f"pin directory {self.pin_dir}: {e.strerror or e}")

    def make(self) -> None:
        """bpffs mounted (if it simply is not yet), and the directories."""
        self.check()
        ensure_bpffs(self.pin_dir)
        try:
            os.makedirs(self.link_dir, exist_ok=True)
        except OSError as e:
            raise self.error(e) from None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """The directory's lock: every bpfkeep process that writes holds it."""
        fd = os.open(self.pin_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def worklist_lock(self) -> Iterator[None]:
        """The lock of the sweep's work list (a flock on this version's
        object directory, whose map holds the list): the sweeps of every
        bpfkeep process take turns with it.  Not the directory's lock: an
        attach never waits for a sweep's kernel walk, nor a sweep for an
        attach."""
        fd = os.open(self.obj_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def daemon_lock(self, lock_dir: str = DAEMON_LOCK_DIR) -> DaemonLock:
        """The lock of the one daemon that keeps this pin directory (see
        DaemonLock), taken; raises naming the daemon that holds it."""
        return DaemonLock.take(self, lock_dir)

    @contextlib.contextmanager
    def objects(self, obj_dir: str | None = None) -> Iterator[dict[str, int]]:
        """Open the pinned objects: name -> fd.  This version's set must be
        complete; an older version's set (obj_dir given) may lack objects
        added since, and callers look for what they need."""
        fds: dict[str, int] = {}
        try:
            for name in (*loader.OBJECTS, loader.PROG_SWEEP):
                path = os.path.join(obj_dir or self.obj_dir, name)
                try:
                    fds[name] = bpfsys.obj_get(path)
                except OSError as e:
                    optional = name == loader.PROG_SWEEP or obj_dir not in (None, self.obj_dir)
                    if not (optional and e.errno == errno.ENOENT):
                        raise
            yield fds
        finally:
            for fd in fds.values():
                os.close(fd)

    @contextlib.contextmanager
    def one(self, name: str) -> Iterator[int | None]:
        """One of this version's pinned objects, or None if it is not there."""
        try:
            fd = bpfsys.obj_get(os.path.join(self.obj_dir, name))
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
            yield None
            return
        try:
            yield fd
        finally:
            os.close(fd)

    def ring(self, name: str) -> RingBuffer | None:
        """One of this version's pinned ring buffers, opened to read (its
        fd wakes a loop when records wait); None if it is not there or
        cannot be mapped."""
        try:
            fd = bpfsys.obj_get(os.path.join(self.obj_dir, name))
        except OSError:
            return None
        try:
            return RingBuffer(fd, owns_fd=True)
        except OSError:
            os.close(fd)
            return None

    def link_path(self, cgroup_id: int, hook: str) -> str:
        return os.path.join(self.link_dir, f"{cgroup_id}_{hook}")

    # -- what is pinned ------------------------------------------------------

    def obj_dirs(self) -> list[str]:
        """Every pinned object set: the current version's and older ones."""
        try:
            names = os.listdir(self.pin_dir)
        except FileNotFoundError:
            return []
        return [
            os.path.join(self.pin_dir, n)
            for n in sorted(names)
            if n.startswith("obj-") and os.path.isdir(os.path.join(self.pin_dir, n))
        ]

    def objects_missing(self) -> list[str]:
        """This version's pinned programs and maps that are not there."""
        return [n for n in loader.OBJECTS if not os.path.exists(os.path.join(self.obj_dir, n))]

    def link_pins(self) -> dict[int, set[str]]:
        """Cgroup id -> hooks with a link pinned (one listing: cheap enough
        for the daemon's periodic check that nothing was unpinned)."""
        out: dict[int, set[str]] = {}
        try:
            names = os.listdir(self.link_dir)
        except FileNotFoundError:
            return out
        for name in names:
            stem, _, hook = name.partition("_")
            if stem.isdigit() and hook in HOOK_NAMES:
                out.setdefault(int(stem), set()).add(hook)
        return out

    def pinned_ids(self) -> set[int]:
        """Cgroup ids with bpfkeep links pinned (alive or not)."""
        return set(self.link_pins())

    def pinned_hooks(self, cgroup_id: int) -> set[str]:
        """Hooks of one cgroup with a link pinned."""
        return {h for h in HOOK_NAMES if os.path.exists(self.link_path(cgroup_id, h))}

    def link_progs(self, cgroup_id: int) -> dict[str, tuple[int, int]]:
        """hook -> (link id, program id) of the live links of a cgroup (a
        link whose cgroup was removed reports another cgroup id: not live)."""
        out = {}
        for hook in HOOK_NAMES:
            try:
                fd = bpfsys.obj_get(self.link_path(cgroup_id, hook))
            except OSError:
                continue
            try:
                _, lid, pid, link_cg, _ = bpfsys.link_info(fd)
            finally:
                os.close(fd)
            if link_cg == cgroup_id:
                out[hook] = (lid, pid)
        return out

    def live_ids(self) -> set[int]:
        """Cgroup ids whose bpfkeep links are all attached."""
        return {i for i in self.pinned_ids() if fully_attached(self.link_progs(i))}

    def prog_owners(self) -> dict[int, str]:
        """Program id -> the object directory it is pinned in."""
        owners = {}
        for obj_dir in self.obj_dirs():
            for _, _, prog in HOOKS:
                with contextlib.suppress(OSError):
                    fd = bpfsys.obj_get(os.path.join(obj_dir, prog))
                    try:
                        owners[bpfsys.prog_id(fd)] = obj_dir
                    finally:
                        os.close(fd)
        return owners

    def program_ids(self) -> dict[str, int]:
        """Kernel ids of this version's loaded programs, by hook (to tell
        ours from others')."""
        ids = {}
        for hook, _, prog in HOOKS:
            with self.one(prog) as fd:
                if fd is not None:
                    ids[hook] = bpfsys.prog_id(fd)
        return ids

    def remove(self) -> None:
        """Unpin what is left and remove the directory (after every link was
        detached): leftovers of a killed loader included."""
        for sub in (self.link_dir, *self.obj_dirs()):
            if os.path.isdir(sub):
                for name in os.listdir(sub):
                    os.unlink(os.path.join(sub, name))
                os.rmdir(sub)
        for name in os.listdir(self.pin_dir):
            path = os.path.join(self.pin_dir, name)
            if os.path.isdir(path):
                for n in os.listdir(path):
                    os.unlink(os.path.join(path, n))
                os.rmdir(path)
        os.rmdir(self.pin_dir)


class DaemonLock:
    """One daemon per pin directory.  A second one would reconcile the same
    pins against another config: detach the first one's attachments as no
    longer wanted, overwrite the cgroups both name, and the first would put
    them back -- gaps and flapping values.

    The lock is a flock on a file in /run named after the pin directory's
    path, held for the daemon's life and released by the kernel when it
    dies.  Not in the pin directory: bpffs holds no regular files, an
    ``rm -rf`` of the directory (which the daemon heals) must not drop it,
    and PinDir.lock -- the short flock every ``bpfkeep attach`` takes on
    the directory -- must not wait for it.  /proc/locks names the holder's
    pid."""

    def __init__(self, path: str, fd: int):
        self.path, self.fd = path, fd

    @staticmethod
    def path_of(pins: PinDir, lock_dir: str = DAEMON_LOCK_DIR) -> tuple[str, str]:
        """(the lock file, the pin directory's path it is named after)."""
        key = os.path.realpath(os.path.abspath(pins.given))
        name = hashlib.sha256(os.fsencode(key)).hexdigest()[:16]
        return os.path.join(lock_dir, f"{name}.lock"), key

    @classmethod
    def take(cls, pins: PinDir, lock_dir: str) -> DaemonLock:
        path, key = cls.path_of(pins, lock_dir)
        try:
            os.makedirs(lock_dir, mode=0o755, exist_ok=True)
            # The file may be unlinked by a holder that is exiting (release)
            # between our open and our flock: then take the new one.
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _flock_holder(fd)
                    os.close(fd)
                    raise EnvironmentProblem(
                        f"pin directory {pins.pin_dir} is kept by another bpfkeep daemon "
                        f"({holder}): stop that one first, or give this one its own "
                        "--pin-dir"
                    ) from None
                try:
                    if os.path.samestat(os.fstat(fd), os.stat(path)):
                        break
                except FileNotFoundError:
                    pass
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, os.fsencode(f"{os.getpid()}\n{key}\n"))
        except OSError as e:
            raise EnvironmentProblem(
                f"pin directory {pins.pin_dir}: cannot take the daemon's lock {path} "
                f"({e.strerror or e}): {lock_dir} must be writable (the unit's "
                "RuntimeDirectory=bpfkeep; in a container, a volume there)"
            ) from None
        return cls(path, fd)

    def release(self) -> None:
        """Unlinked while still held, then closed: whoever opened it
        meanwhile sees that it is gone and takes a new one."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1


def _flock_holder(fd: int) -> str:
    """Who holds the flock on ``fd``'s file: "pid N" from /proc/locks (in
    our PID namespace), else the pid the holder wrote into it."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    shown = None  # 0: the holder is not in our PID namespace
    with contextlib.suppress(OSError, ValueError), open("/proc/locks") as f:
        for line in f:
            fields = line.split()  # 1: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE 0 EOF
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode:
                shown = int(fields[4])
                break
    if shown:
        return f"pid {shown}"
    with contextlib.suppress(OSError, ValueError):
        written = int(os.pread(fd, 64, 0).split(b"\n")[0])
        return f"pid {written}" + (", in another PID namespace" if shown == 0 else "")
    return "pid unknown"
