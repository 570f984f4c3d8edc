"""Attachments: policies on cgroups, kept in bpffs so they outlive us.

Layout under the pin directory (default /sys/fs/bpf/bpfkeep; bpffs refuses
"." in names):

    obj-V/prog_sockops, obj-V/prog_setsockopt   the programs, loaded once
    obj-V/map_policy, obj-V/map_counters        cgroup storage (per attachment)
    obj-V/map_policies                          hash: cgroup id -> policy
    links/<cgroup id>_sockops                   bpf_links, one pair per cgroup
    links/<cgroup id>_setsockopt

V is a hash of the BPF sources (loader.source_version).  A bpfkeep whose
programs differ loads its own set and migrates every attachment to it
without a gap: the new link is attached and pinned (``..._next``) before
the old one is detached, and bpffs pins can be added but not renamed.

Everything ``status`` shows is read back from these objects, so it is right
after any restart of any bpfkeep process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import os
import struct
import subprocess
import sys
from collections.abc import Iterable, Iterator

from bpfkeep import bpfmaps, bpfsys, loader, sweep
from bpfkeep.cgroups import Cgroup, by_ids, cgroup2_mount
from bpfkeep.errors import EnvironmentProblem, PermissionProblem, UsageError
from bpfkeep.options import Policy

DEFAULT_PIN_DIR = "/sys/fs/bpf/bpfkeep"
BPF_FS_MAGIC = 0xCAFE4A11
HOOKS = (
    ("sockops", bpfsys.BPF_CGROUP_SOCK_OPS, loader.PROG_SOCKOPS),
    ("setsockopt", bpfsys.BPF_CGROUP_SETSOCKOPT, loader.PROG_SETSOCKOPT),
)

NAME_MAX = 255  # bytes per path component (include/uapi/linux/limits.h)

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


def cgroup_level(cg: Cgroup) -> int:
    """Depth below the cgroup2 root: the deepest policy wins."""
    return len(cg.rel.split("/")) if cg.rel else 0


def pin_dir_default() -> str:
    return os.environ.get("BPFKEEP_PIN_DIR") or DEFAULT_PIN_DIR


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


def _is_bpffs(path: str) -> bool:
    """Whether path is on a bpf filesystem: statfs(2)'s f_type (os.statvfs
    has none).  Works for /proc/PID/root/... paths too, which a mount table
    lookup would not."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type comes first
    if libc.statfs(os.fsencode(path), buf) != 0:
        return False
    return ctypes.c_long.from_buffer(buf).value == BPF_FS_MAGIC


def bpffs_view(pin_dir: str) -> str:
    """pin_dir as this process can reach it.  Under ``ip netns exec`` our
    /sys is a fresh sysfs without the host's bpffs; the host's is reached
    through a process in the host's mount namespace (cgroups.host_views).
    Pinning into a bpffs mounted in our private namespace instead would
    lose the pins -- and detach the policies -- when it goes away."""
    from bpfkeep.cgroups import host_views

    pin_dir = os.path.abspath(pin_dir)
    parent = os.path.dirname(pin_dir)
    if _is_bpffs(parent):
        return pin_dir
    for via, _ in host_views():
        if _is_bpffs(via + parent):
            return via + pin_dir
    return pin_dir


def ensure_bpffs(pin_dir: str) -> None:
    """Make sure pin_dir's parent is on a bpf filesystem; mount it if the
    conventional /sys/fs/bpf is simply not mounted yet."""
    from bpfkeep.cgroups import hidden_mount, netns_hint

    parent = os.path.dirname(os.path.abspath(pin_dir))
    if _is_bpffs(parent):
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
        if proc.returncode == 0 and _is_bpffs(parent):
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


def _counters(map_fd: int, cgroup_id: int) -> bpfmaps.Counters | None:
    """One cgroup's per-CPU counters, summed; None if it has none."""
    with contextlib.suppress(OSError):
        raw = bpfsys.map_lookup(
            map_fd,
            struct.pack("=Q", cgroup_id),
            bpfmaps.percpu_value_size(bpfmaps.COUNTERS_SIZE),
        )
        if raw is not None:
            return bpfmaps.decode_counters(raw)
    return None


def _nearest_ancestor(cg: Cgroup, live: set[int]) -> int | None:
    """The cgroup id of the nearest ancestor of ``cg`` with a policy."""
    path = os.path.dirname(cg.path)
    mount = cg.path[: len(cg.path) - len(cg.rel)].rstrip("/") if cg.rel else cg.path
    while len(path) >= len(mount) and path != cg.path:
        with contextlib.suppress(OSError):
            ino = os.stat(path).st_ino
            if ino in live:
                return ino
        if path == mount:
            break
        path = os.path.dirname(path)
    return None


def _owners(ids: set[int], live: set[int]) -> dict[int, int]:
    """cgroup id -> the nearest cgroup at or above it with a policy (in
    ``live``), for the cgroups of sockets held across cgroups (walks the
    cgroup tree to find them: only for such sockets)."""
    mount = cgroup2_mount()
    out = {}
    for cg_id, cg in by_ids(ids, mount).items():
        path = cg.path
        while True:
            with contextlib.suppress(OSError):
                ino = os.stat(path).st_ino
                if ino in live:
                    out[cg_id] = ino
                    break
            if len(path) <= len(mount.rstrip("/")) or path == "/":
                break
            path = os.path.dirname(path)
    return out


def _sweepstats(map_fd: int, cgroup_id: int) -> bpfmaps.SweepStats | None:
    with contextlib.suppress(OSError):
        raw = bpfsys.map_lookup(map_fd, struct.pack("=Q", cgroup_id), bpfmaps.SWEEPSTATS_SIZE)
        if raw is not None:
            return bpfmaps.SweepStats.decode(raw)
    return None


@functools.lru_cache(maxsize=4096)
def _policy_template(policy: Policy, level: int, managed: bool) -> bytes:
    """A bk_policy value with cgroup id and generation 0 (Policy objects are
    shared between rules with the same values: a few templates serve
    10,000 cgroups)."""
    return bpfmaps.encode_policy(0, policy, level=level, managed=managed, gen=0)


# Where bk_policy.prev[] starts: what follows the values is not the config's.
_PREV_AT = next(m.offset for m in bpfmaps.POLICY.members if m.name == "prev")


def _keep_prev(value: bytes, old: bytes) -> bytes:
    """``value`` with ``old``'s prev[] and its F_PREV and F_SWEPT flags:
    the same values again leave the sockets as they were (what they
    carried before still counts as bpfkeep's until a sweep)."""
    keep = bpfmaps.F_PREV | bpfmaps.F_SWEPT
    flags = bpfmaps.policy_raw_flags(value) & ~keep | bpfmaps.policy_raw_flags(old) & keep
    return bpfmaps.with_flags(value[:_PREV_AT] + old[_PREV_AT:], flags)


def policy_is(raw: bytes | None, cg: Cgroup, policy: Policy, *, managed: bool = True) -> bool:
    """Whether a bk_policy value as read from a map says exactly ``policy``
    for ``cg``: cgroup id, flags (active, mode, managed, derived user
    timeout), level and every value; the generation aside.  A comparison of
    bytes: a reload checks 10,000 entries without decoding one."""
    if raw is None or len(raw) != bpfmaps.POLICY_SIZE:
        return False
    want = _policy_template(policy, cgroup_level(cg), managed)
    # Flags that say where the other policies are and how far the sockets
    # are (nesting, prev[], swept) are kept by attach, detach and the
    # sweep, not by the config: not compared, nor prev[] itself.
    volatile = bpfmaps.F_NESTING | bpfmaps.F_PREV | bpfmaps.F_SWEPT
    return (
        int.from_bytes(raw[8:12], sys.byteorder) & ~volatile
        == int.from_bytes(want[8:12], sys.byteorder)
        and raw[16:_PREV_AT] == want[16:_PREV_AT]
        and int.from_bytes(raw[:8], sys.byteorder) == cg.id
    )


def managed_of(raw: bytes) -> bool:
    """The F_MANAGED flag of a raw bk_policy value."""
    return bool(int.from_bytes(raw[8:12], sys.byteorder) & bpfmaps.F_MANAGED)


class Pass:
    """Attaches and in-place updates made under one lock with the objects
    opened once (Enforcer.batch)."""

    def __init__(self, enforcer: Enforcer, objs: dict[str, int]):
        self.enforcer = enforcer
        self.objs = objs
        self._keys: list[bytes] = []
        self._values: list[bytes] = []

    def attach(self, cg: Cgroup, policy: Policy, *, managed: bool = True) -> str:
        """As Enforcer.attach.  Written at once, storage first, then the
        hash: an ancestor's policy covers the cgroup until both are."""
        return self.enforcer._attach(self.objs, cg, policy, managed)

    def update(self, cg: Cgroup, policy: Policy, *, managed: bool = True) -> bool:
        """A new policy for an attached cgroup: one write to its own
        storage now (what its sock_ops and setsockopt programs read), its
        entry in the policy hash with all the others at flush().  A new
        generation: the sweep brings its sockets to it.  False, and nothing
        written, when no bpfkeep program is attached to the cgroup (its
        storage exists only while one is): attach it instead."""
        key = struct.pack("=Q", cg.id)
        old = bpfsys.map_lookup(self.objs[loader.MAP_POLICY], key, bpfmaps.POLICY_SIZE)
        if old is None:
            return False
        # Where the other policies are has not changed (attach and detach
        # keep the flags); the old values are what the sockets carry until
        # the sweep: recognised as bpfkeep's on sockets without a record.
        flags = bpfmaps.policy_raw_flags(old)
        value = bpfmaps.encode_policy(
            cg.id,
            policy,
            level=cgroup_level(cg),
            managed=managed,
            gen=bpfmaps.fresh_gen(),
            nesting=flags & bpfmaps.F_NESTING,
            prev=bpfmaps.decode_policy(old)[2] if flags & bpfmaps.F_ACTIVE else None,
        )
        try:
            bpfsys.map_update(self.objs[loader.MAP_POLICY], key, value, bpfsys.BPF_EXIST)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        self._keys.append(key)
        self._values.append(value)
        return True

    def flush(self) -> None:
        """The policy hash entries of every update() so far, in one
        BPF_MAP_UPDATE_BATCH (a hash map: Linux 5.6)."""
        keys, values = self._keys, self._values
        self._keys, self._values = [], []
        bpfsys.map_update_batch(self.objs[loader.MAP_POLICIES], keys, values)


@dataclasses.dataclass
class Attachment:
    cgroup_id: int
    cgroup: Cgroup | None  # None: the cgroup was removed
    policy: Policy | None
    counters: bpfmaps.Counters | None
    link_ids: dict[str, int]
    prog_ids: dict[str, int]
    managed: bool = False

    def as_dict(self) -> dict[str, object]:
        return {
            "cgroup": self.cgroup.display if self.cgroup else None,
            "cgroup_id": self.cgroup_id,
            "policy": self.policy.as_dict() if self.policy else None,
            "counters": self.counters.as_dict() if self.counters else None,
            "links": self.link_ids,
            "programs": self.prog_ids,
            "managed_by_daemon": self.managed,
        }


class Enforcer:
    """bpfkeep's attachments under one pin directory."""

    def __init__(self, pin_dir: str | None = None, version: str | None = None):
        self.pin_dir = bpffs_view(pin_dir or pin_dir_default())
        self.version = version or loader.source_version()
        self.obj_dir = os.path.join(self.pin_dir, f"obj-{self.version}")
        self.link_dir = os.path.join(self.pin_dir, "links")
        self._prepared = False

    # -- setup -----------------------------------------------------------

    def check_pin_dir(self) -> None:
        """One line naming the problem and the fix for a pin directory that
        bpffs cannot hold, instead of an OSError from deep inside."""
        fix = "choose another with --pin-dir or BPFKEEP_PIN_DIR"
        where = f"pin directory {self.pin_dir}"
        for part in self.pin_dir.split("/"):
            if len(os.fsencode(part)) > NAME_MAX:
                raise UsageError(
                    f"{where}: the name {part[:20]}... is {len(os.fsencode(part))} bytes, "
                    f"longer than the {NAME_MAX} a file name may have; {fix}"
                )
        # The deepest part that exists must be a directory; what bpfkeep
        # creates below it must be a name bpffs accepts (no ".": the kernel
        # refuses it with EPERM, see bpf_lookup in kernel/bpf/inode.c).
        path, to_make = self.pin_dir, []
        while not os.path.lexists(path) and path != "/":
            path, name = os.path.split(path)
            to_make.append(name)
        if not os.path.isdir(path):
            raise UsageError(
                f"{where}: {path} is not a directory (a pinned BPF program or map, or a "
                f"file); {fix}"
            )
        dotted = [n for n in to_make if "." in n]
        if dotted and _is_bpffs(path):
            raise UsageError(f"{where}: bpffs does not allow '.' in names ({dotted[-1]}); {fix}")

    def _pin_dir_error(self, e: OSError) -> Exception:
        self.check_pin_dir()  # raises when it can name the problem better
        return EnvironmentProblem(f"pin directory {self.pin_dir}: {e.strerror or e}")

    def prepare(self) -> None:
        """Privileges, bpffs, directories and loaded programs."""
        if self._prepared and os.path.isdir(self.obj_dir):
            return
        require_privileges()
        self.check_pin_dir()
        ensure_bpffs(self.pin_dir)
        try:
            os.makedirs(self.link_dir, exist_ok=True)
        except OSError as e:
            raise self._pin_dir_error(e) from None
        with self._lock():
            loader.load(self.obj_dir)
            self._recover_next_pins()
            self._migrate()
        self._prepared = True

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        fd = os.open(self.pin_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _objects(self, obj_dir: str | None = None) -> Iterator[dict[str, int]]:
        """Open the pinned objects.  This version's set must be complete;
        an older version's set (obj_dir given) may lack objects added since,
        and callers look for what they need."""
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

    def _link_path(self, cgroup_id: int, hook: str) -> str:
        return os.path.join(self.link_dir, f"{cgroup_id}_{hook}")

    # -- attach / detach -------------------------------------------------

    def attach(
        self, cg: Cgroup, policy: Policy, *, managed: bool = False, prune: bool = True
    ) -> str:
        """Attach or update; returns "attached" or "updated".

        Update is two map writes, no re-attach: new sockets get the new
        values with no gap (the sockets that exist already are brought to
        them by :meth:`sweep`).  A first attach either completes or leaves
        nothing behind.  ``managed`` marks the attachment as the daemon's.
        """
        self.prepare()
        with self._lock(), self._objects() as objs:
            if prune:
                self._prune(objs)
            return self._attach(objs, cg, policy, managed)

    @contextlib.contextmanager
    def batch(self) -> Iterator[Pass]:
        """Many attaches and updates under one lock, with the pinned objects
        opened once, and the policy hash written in one batch at the end
        (the daemon's reconcile).  Nothing that takes the lock itself
        (detach, prune, sweep) may run inside."""
        self.prepare()
        with self._lock(), self._objects() as objs:
            p = Pass(self, objs)
            try:
                yield p
            finally:
                p.flush()

    def _attach(self, objs: dict[str, int], cg: Cgroup, policy: Policy, managed: bool) -> str:
        """attach() with the lock held and the objects open."""
        key = struct.pack("=Q", cg.id)
        alive = self._link_progs(cg.id)
        gen = bpfmaps.fresh_gen()
        ancestors, descendants = self._nesting(objs, cg)
        nesting = (bpfmaps.F_HAS_ANCESTOR if ancestors else 0) | (
            bpfmaps.F_HAS_DESCENDANT if descendants else 0
        )
        # What the cgroup's sockets carry until now: the nearest
        # ancestor's policy for a new attachment, the old values for an
        # update.  Sockets without a record are told by them.
        prev = self._policy_of(objs, ancestors[0][0]) if ancestors else None
        old = None
        if len(alive) == len(HOOKS):
            old = bpfsys.map_lookup(objs[loader.MAP_POLICIES], key, bpfmaps.POLICY_SIZE)
            if old is not None:
                prev = bpfmaps.decode_policy(old)[2]
                # The same values again keep their generation: the
                # sockets under them are current.
                if prev == policy:
                    gen = bpfmaps.policy_gen_of(old)
        value = bpfmaps.encode_policy(
            cg.id,
            policy,
            level=cgroup_level(cg),
            managed=managed,
            gen=gen,
            nesting=nesting,
            prev=prev,
        )
        if old is not None and bpfmaps.policy_gen_of(old) == gen:
            # Unchanged values: the sockets are as they were (what they
            # carried before still counts as bpfkeep's until a sweep).
            value = _keep_prev(value, old)
        # The neighbours first: an ancestor steps aside, a descendant
        # records its sockets, before this policy is in force.
        for anc, _path in ancestors:
            self._add_flags(objs, anc, bpfmaps.F_HAS_DESCENDANT)
        for desc, _path in descendants:
            self._add_flags(objs, desc, bpfmaps.F_HAS_ANCESTOR)
        if len(alive) == len(HOOKS):
            self._write_policy(objs, key, value)
            return "updated"
        # A new attachment counts from zero (cgroup storage is new too).
        with contextlib.suppress(OSError):
            bpfsys.map_delete(objs[loader.MAP_SWEEPSTATS], key)
        created: list[tuple[int, str]] = []
        try:
            cgfd = os.open(cg.path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise UsageError(
                f"{cg.display}: the cgroup was removed while attaching; nothing was attached"
            ) from None
        except OSError as e:
            raise self._explain(e, cg) from None
        try:
            for hook, atype, prog in HOOKS:
                if hook in alive:
                    continue
                path = self._link_path(cg.id, hook)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                lfd = bpfsys.link_create(objs[prog], cgfd, atype)
                created.append((lfd, path))
                bpfsys.obj_pin(lfd, path)
            # The kernel keeps a cgroup's storage across a detach and a
            # new attach: a new attachment counts from zero.
            with contextlib.suppress(OSError):
                bpfsys.map_update(
                    objs[loader.MAP_COUNTERS],
                    key,
                    bytes(bpfmaps.percpu_value_size(bpfmaps.COUNTERS_SIZE)),
                    bpfsys.BPF_EXIST,
                )
            # Until this write the policy storage is zeroed or inactive:
            # an ancestor's policy, if any, still covers the cgroup.
            self._write_policy(objs, key, value)
        except OSError as e:
            for lfd, path in created:
                with contextlib.suppress(OSError):
                    bpfsys.link_detach(lfd)
                with contextlib.suppress(OSError):
                    os.unlink(path)
            with contextlib.suppress(OSError):
                bpfsys.map_delete(objs[loader.MAP_POLICIES], key)
            raise self._explain(e, cg) from None
        finally:
            os.close(cgfd)
            for lfd, _ in created:
                os.close(lfd)
        return "attached"

    # -- nested policies ---------------------------------------------------------

    @staticmethod
    def _policy_of(objs: dict[str, int], cgroup_id: int) -> Policy | None:
        raw = bpfsys.map_lookup(
            objs[loader.MAP_POLICIES], struct.pack("=Q", cgroup_id), bpfmaps.POLICY_SIZE
        )
        return None if raw is None else bpfmaps.decode_policy(raw)[2]

    @staticmethod
    def _nesting(
        objs: dict[str, int], cg: Cgroup, *, skip: int | None = None
    ) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
        """(cgroup id, path) of the ancestors (nearest first) and of the
        descendants of ``cg`` that have an active policy (this version's
        map; ``skip``: one to leave out).  One map lookup per ancestor and
        per descendant directory: the walk is of cg's own subtree only."""
        fd = objs[loader.MAP_POLICIES]

        def live(path: str) -> int | None:
            try:
                ino = os.stat(path).st_ino
            except OSError:
                return None
            if ino == skip:
                return None
            raw = bpfsys.map_lookup(fd, struct.pack("=Q", ino), bpfmaps.POLICY_SIZE)
            if raw is None or not bpfmaps.policy_raw_flags(raw) & bpfmaps.F_ACTIVE:
                return None
            return ino

        mount = cg.path[: len(cg.path) - len(cg.rel)].rstrip("/") if cg.rel else cg.path
        ancestors = []
        path = cg.path
        while len(path) > len(mount):
            path = os.path.dirname(path)
            ino = live(path)
            if ino is not None:
                ancestors.append((ino, path))
        descendants = []
        for dirpath, _dirs, _files in os.walk(cg.path):
            if dirpath != cg.path:
                ino = live(dirpath)
                if ino is not None:
                    descendants.append((ino, dirpath))
        return ancestors, descendants

    def _add_flags(self, objs: dict[str, int], cgroup_id: int, add: int, drop: int = 0) -> None:
        """Change another attachment's nesting flags (one write per map)."""
        key = struct.pack("=Q", cgroup_id)
        raw = bpfsys.map_lookup(objs[loader.MAP_POLICIES], key, bpfmaps.POLICY_SIZE)
        if raw is None:
            return
        flags = bpfmaps.policy_raw_flags(raw)
        new = (flags | add) & ~drop
        if new != flags:
            with contextlib.suppress(OSError):
                self._write_policy(objs, key, bpfmaps.with_flags(raw, new))

    def _drop_stale_nesting(self, objs: dict[str, int], cg: Cgroup) -> None:
        """After ``cg``'s policy is gone: its nearest ancestor may have no
        descendant with a policy left, its descendants no ancestor.  (A flag
        left set costs time, never correctness: the record it asks for is
        just not needed.)"""
        ancestors, descendants = self._nesting(objs, cg, skip=cg.id)
        if ancestors:
            anc, path = ancestors[0]
            rel = os.path.relpath(path, cg.path[: len(cg.path) - len(cg.rel)])
            above = Cgroup(path, "" if rel == "." else rel, anc)
            if not self._nesting(objs, above, skip=cg.id)[1]:
                self._add_flags(objs, anc, 0, bpfmaps.F_HAS_DESCENDANT)
            return  # the descendants keep an ancestor with a policy
        mount = cg.path[: len(cg.path) - len(cg.rel)]
        for desc, path in descendants:
            below = Cgroup(path, os.path.relpath(path, mount), desc)
            if not self._nesting(objs, below, skip=cg.id)[0]:
                self._add_flags(objs, desc, 0, bpfmaps.F_HAS_ANCESTOR)

    @staticmethod
    def _write_policy(objs: dict[str, int], key: bytes, value: bytes) -> None:
        """The attachment's own storage first (sock_ops), then the hash the
        setsockopt program walks: an ancestor keeps enforcing until both
        say this cgroup has a policy."""
        bpfsys.map_update(objs[loader.MAP_POLICY], key, value, bpfsys.BPF_EXIST)
        bpfsys.map_update(objs[loader.MAP_POLICIES], key, value)

    def _explain(self, e: OSError, cg: Cgroup) -> Exception:
        if e.errno == errno.EPERM:
            return PermissionProblem(
                f"{cg.display}: the kernel refused the attachment ({e}); another "
                "tool may hold an exclusive (non-multi) program on this cgroup "
                "-- check with bpftool cgroup show " + cg.path
            )
        if e.errno == errno.E2BIG:
            return EnvironmentProblem(f"{cg.display}: 64 programs already attached")
        return EnvironmentProblem(f"{cg.display}: attaching failed: {e}")

    def detach(self, cg: Cgroup, *, existing: bool = True) -> bool:
        """Remove bpfkeep's programs from a cgroup; others' stay.

        With ``existing``, the listeners the policy configured stop passing
        its values on to the sockets they accept: they take the policy of
        the nearest ancestor with one, or the namespace's defaults (the
        options their program set itself stay).  Established connections
        keep the values they have."""
        require_privileges()
        self.check_pin_dir()
        if not os.path.isdir(self.link_dir):
            return False
        policy = next(
            (a.policy for a in self.attachments({cg.id: cg}) if a.cgroup_id == cg.id), None
        )
        with self._lock():
            if os.path.isdir(self.obj_dir):
                with contextlib.suppress(OSError), self._objects() as objs:
                    # The sockets go to the nearest ancestor's policy, its
                    # listeners too: until a sweep, what they accept is
                    # looked at again.
                    ancestors = self._nesting(objs, cg, skip=cg.id)[0]
                    if ancestors:
                        self._add_flags(objs, ancestors[0][0], 0, bpfmaps.F_SWEPT)
            found = self._detach_id(cg.id)
            # Like attach: forget the attachments of removed cgroups (best
            # effort: the detach itself is done).
            if os.path.isdir(self.obj_dir):
                with contextlib.suppress(OSError), self._objects() as objs:
                    self._drop_stale_nesting(objs, cg)
                    self._prune(objs)
        if found and existing and policy is not None:
            # Best effort: the detach itself is done.
            with contextlib.suppress(sweep.SweepUnavailable, OSError):
                self._sweep_after_detach(cg, policy)
        return found

    # -- existing sockets --------------------------------------------------------

    @contextlib.contextmanager
    def sweeper(self) -> Iterator[sweep.Sweeper]:
        """The sweep program and its maps, under the pin directory's lock
        (the work list is shared by every bpfkeep process)."""
        with self._lock(), self._objects() as objs:
            yield sweep.Sweeper(objs, objs.get(loader.PROG_SWEEP))

    def live_ids(self) -> set[int]:
        """Cgroup ids whose bpfkeep links are attached."""
        return {i for i in self._pinned_ids() if len(self._link_progs(i)) == len(HOOKS)}

    def sweep(self, cgs: list[Cgroup]) -> sweep.Report:
        """Bring every existing TCP socket of these attached cgroups and
        their descendants to the policy that covers it (bpfkeep.sweep).
        Raises SweepUnavailable on a kernel that cannot."""
        self.prepare()
        with self.sweeper() as sw:
            live = self.live_ids()
            sc = sweep.scope(cgs, live)
            owners = set(sc.owner_of_cgroup.values())
            gens = {o: self._raw_policy(sw.objs, o) for o in owners}
            report = sweep.sweep(
                sw, sc, sweep.apply_entry, owners_elsewhere=lambda ids: _owners(ids, live)
            )
            if not report.unreachable:
                for owner, raw in gens.items():
                    if raw is not None:
                        self._swept(sw.objs, owner, bpfmaps.policy_gen_of(raw))
            return report

    @staticmethod
    def _raw_policy(objs: dict[str, int], cgroup_id: int) -> bytes | None:
        return bpfsys.map_lookup(
            objs[loader.MAP_POLICIES], struct.pack("=Q", cgroup_id), bpfmaps.POLICY_SIZE
        )

    def _swept(self, objs: dict[str, int], cgroup_id: int, gen: int) -> None:
        """After a complete sweep under this generation: every listener of
        the policy carries it (or a record), so accepted sockets need no
        look (BK_F_SWEPT), and the values before the last change are on
        no socket any more (BK_F_PREV off)."""
        raw = self._raw_policy(objs, cgroup_id)
        if raw is None or bpfmaps.policy_gen_of(raw) != gen:
            return  # changed meanwhile: the next sweep
        self._add_flags(objs, cgroup_id, bpfmaps.F_SWEPT, bpfmaps.F_PREV)

    def _sweep_after_detach(self, cg: Cgroup, policy: Policy) -> sweep.Report:
        live = self.live_ids()
        above = _nearest_ancestor(cg, live)
        with self.sweeper() as sw:
            if above is not None:
                sc = sweep.scope([cg], live, owner=above)
                return sweep.sweep(
                    sw,
                    sc,
                    sweep.handover_entry(policy),
                    owners_elsewhere=lambda ids: _owners(ids, live),
                )
            sc = sweep.scope([cg], live)
            # Only what this policy owned: descendants keep their own.
            sc = sweep.Scope(
                {k: v for k, v in sc.owner_of_cgroup.items() if v == cg.id},
                {k: v for k, v in sc.owner_of_pid.items() if v == cg.id},
            )
            report = sweep.sweep(
                sw, sc, sweep.undo_entry(policy), states=(sweep.LISTEN,), count=False
            )
            connections = tuple(s for s in sweep.SWEPT_STATES if s != sweep.LISTEN)
            sweep.sweep(sw, sc, sweep.keep_entry(policy), states=connections, count=False)
            return report

    def detach_id(self, cgroup_id: int) -> bool:
        """Detach by cgroup id (the cgroup may already be gone)."""
        if not os.path.isdir(self.link_dir):
            return False
        with self._lock():
            return self._detach_id(cgroup_id)

    def _detach_id(self, cgroup_id: int) -> bool:
        key = struct.pack("=Q", cgroup_id)
        found = False
        for obj_dir in self._obj_dirs():
            with contextlib.suppress(OSError), self._objects(obj_dir) as objs:
                # Reverse of attach: an ancestor's policy takes over first.
                found |= bpfsys.map_delete(objs[loader.MAP_POLICIES], key)
                self._deactivate(objs, key)
                if loader.MAP_SWEEPSTATS in objs:
                    bpfsys.map_delete(objs[loader.MAP_SWEEPSTATS], key)
        for hook, _, _ in HOOKS:
            path = self._link_path(cgroup_id, hook)
            try:
                fd = bpfsys.obj_get(path)
            except OSError:
                continue
            found = True
            try:
                with contextlib.suppress(OSError):
                    bpfsys.link_detach(fd)
            finally:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return found

    @staticmethod
    def _deactivate(objs: dict[str, int], key: bytes) -> None:
        with contextlib.suppress(OSError):
            old = bpfsys.map_lookup(objs[loader.MAP_POLICY], key, bpfmaps.POLICY_SIZE)
            if old is not None:
                inactive = old[:8] + b"\0\0\0\0" + old[12:]  # flags = 0
                bpfsys.map_update(objs[loader.MAP_POLICY], key, inactive, bpfsys.BPF_EXIST)

    def _obj_dirs(self) -> list[str]:
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

    def _prog_owners(self) -> dict[int, str]:
        """Program id -> the object directory it is pinned in."""
        owners = {}
        for obj_dir in self._obj_dirs():
            for _, _, prog in HOOKS:
                with contextlib.suppress(OSError):
                    fd = bpfsys.obj_get(os.path.join(obj_dir, prog))
                    try:
                        owners[bpfsys.prog_id(fd)] = obj_dir
                    finally:
                        os.close(fd)
        return owners

    def _link_progs(self, cgroup_id: int) -> dict[str, tuple[int, int]]:
        """hook -> (link id, program id) of the live links of a cgroup."""
        out = {}
        for hook, _, _ in HOOKS:
            try:
                fd = bpfsys.obj_get(self._link_path(cgroup_id, hook))
            except OSError:
                continue
            try:
                _, lid, pid, link_cg, _ = bpfsys.link_info(fd)
            finally:
                os.close(fd)
            if link_cg == cgroup_id:
                out[hook] = (lid, pid)
        return out

    # -- upgrades --------------------------------------------------------------

    def _recover_next_pins(self) -> None:
        """Finish or undo a migration that a killed bpfkeep left halfway."""
        try:
            names = os.listdir(self.link_dir)
        except FileNotFoundError:
            return
        for name in names:
            if not name.endswith("_next"):
                continue
            nxt = os.path.join(self.link_dir, name)
            canonical = nxt[: -len("_next")]
            try:
                nfd = bpfsys.obj_get(nxt)
            except OSError:
                continue
            try:
                try:
                    cfd = bpfsys.obj_get(canonical)
                except OSError:
                    cfd = -1  # the old link was already gone: keep the new one
                if cfd < 0:
                    bpfsys.obj_pin(nfd, canonical)
                else:
                    same = bpfsys.link_info(cfd)[1] == bpfsys.link_info(nfd)[1]
                    os.close(cfd)
                    if not same:  # the old one still runs: redo the migration
                        bpfsys.link_detach(nfd)
                os.unlink(nxt)
            finally:
                os.close(nfd)

    def _migrate(self) -> None:
        """Move attachments made by other program versions to this one."""
        others = [d for d in self._obj_dirs() if d != self.obj_dir]
        if not others:
            return
        owners = self._prog_owners()
        todo: dict[int, str] = {}
        for cg_id in self._pinned_ids():
            dirs = {owners.get(pid) for _, pid in self._link_progs(cg_id).values()}
            old = next((d for d in dirs if d and d != self.obj_dir), None)
            if old:
                todo[cg_id] = old
        cgs = by_ids(todo, cgroup2_mount()) if todo else {}
        with self._objects() as cur:
            for cg_id, old_dir in sorted(todo.items()):
                cg = cgs.get(cg_id)
                if cg is not None:
                    self._migrate_one(cg, old_dir, cur)
        for obj_dir in others:
            if obj_dir not in {
                owners.get(pid)
                for i in self._pinned_ids()
                for _, pid in self._link_progs(i).values()
            }:
                for name in os.listdir(obj_dir):
                    os.unlink(os.path.join(obj_dir, name))
                os.rmdir(obj_dir)

    def _migrate_one(self, cg: Cgroup, old_dir: str, cur: dict[str, int]) -> None:
        key = struct.pack("=Q", cg.id)
        with self._objects(old_dir) as old:
            size = bpfsys.map_info(old[loader.MAP_POLICIES])[3]
            raw = bpfsys.map_lookup(old[loader.MAP_POLICIES], key, size)
            if raw is None:
                return
            decoded = bpfmaps.decode_any_policy(raw)
            if decoded is None:
                return  # a layout this version does not know: left running as it is
            _, flags, policy = decoded
            ancestors, descendants = self._nesting(cur, cg)
            raw = bpfmaps.encode_policy(
                cg.id,
                policy,
                level=cgroup_level(cg),
                managed=bool(flags & bpfmaps.F_MANAGED),
                nesting=(bpfmaps.F_HAS_ANCESTOR if ancestors else 0)
                | (bpfmaps.F_HAS_DESCENDANT if descendants else 0),
            )
            for anc, _path in ancestors:
                self._add_flags(cur, anc, bpfmaps.F_HAS_DESCENDANT)
            for desc, _path in descendants:
                self._add_flags(cur, desc, bpfmaps.F_HAS_ANCESTOR)
            cgfd = os.open(cg.path, os.O_RDONLY | os.O_DIRECTORY)
            new: list[tuple[str, int]] = []
            try:
                for hook, atype, prog in HOOKS:
                    lfd = bpfsys.link_create(cur[prog], cgfd, atype)
                    new.append((hook, lfd))
                    bpfsys.obj_pin(lfd, self._link_path(cg.id, hook) + "_next")
                # Both versions run now; the old one (attached first) claims
                # the sockets until it is detached.
                self._write_policy(cur, key, raw)
                for hook, lfd in new:
                    path = self._link_path(cg.id, hook)
                    with contextlib.suppress(OSError):
                        ofd = bpfsys.obj_get(path)
                        try:
                            bpfsys.link_detach(ofd)
                        finally:
                            os.close(ofd)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                    bpfsys.obj_pin(lfd, path)
                    os.unlink(path + "_next")
                bpfsys.map_delete(old[loader.MAP_POLICIES], key)
            finally:
                os.close(cgfd)
                for _, lfd in new:
                    os.close(lfd)

    def _pinned_ids(self) -> set[int]:
        ids = set()
        try:
            names = os.listdir(self.link_dir)
        except FileNotFoundError:
            return ids
        for name in names:
            stem, _, hook = name.partition("_")
            if stem.isdigit() and hook in {h for h, _, _ in HOOKS}:
                ids.add(int(stem))
        return ids

    def prune(self, alive: Iterable[int] = ()) -> None:
        """Forget attachments of removed cgroups (see _prune); ``alive``:
        cgroup ids the caller just saw attached, not to be checked again."""
        if not os.path.isdir(self.obj_dir):
            return
        with self._lock(), self._objects() as objs:
            self._prune(objs, set(alive))

    def _prune(self, objs: dict[str, int], alive: set[int] | None = None) -> None:
        """Forget attachments whose cgroup was removed (the kernel already
        detached them) and policies left without links."""
        for cg_id in self._pinned_ids():
            if (alive is None or cg_id not in alive) and not self._link_progs(cg_id):
                self._detach_id(cg_id)
        pinned = self._pinned_ids()
        fd = objs[loader.MAP_POLICIES]
        for key, _ in bpfsys.map_items(fd, 8, bpfmaps.POLICY_SIZE):
            if struct.unpack("=Q", key)[0] not in pinned:
                bpfsys.map_delete(fd, key)

    # -- reading -----------------------------------------------------------

    def pinned_ids(self) -> set[int]:
        """Cgroup ids with bpfkeep links pinned (alive or not)."""
        self.check_pin_dir()
        return self._pinned_ids()

    def link_pins(self) -> dict[int, set[str]]:
        """Cgroup id -> hooks with a link pinned (one listing: cheap enough
        for the daemon's periodic check that nothing was unpinned)."""
        out: dict[int, set[str]] = {}
        try:
            names = os.listdir(self.link_dir)
        except FileNotFoundError:
            return out
        hooks = {h for h, _, _ in HOOKS}
        for name in names:
            stem, _, hook = name.partition("_")
            if stem.isdigit() and hook in hooks:
                out.setdefault(int(stem), set()).add(hook)
        return out

    def pinned_hooks(self, cgroup_id: int) -> set[str]:
        """Hooks of one cgroup with a link pinned."""
        return {h for h, _, _ in HOOKS if os.path.exists(self._link_path(cgroup_id, h))}

    def objects_missing(self) -> list[str]:
        """This version's pinned programs and maps that are not there."""
        return [n for n in loader.OBJECTS if not os.path.exists(os.path.join(self.obj_dir, n))]

    def policy_value(self, cgroup_id: int) -> bytes | None:
        """One cgroup's raw entry in this version's policy hash, or None."""
        try:
            fd = bpfsys.obj_get(os.path.join(self.obj_dir, loader.MAP_POLICIES))
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        try:
            return bpfsys.map_lookup(fd, struct.pack("=Q", cgroup_id), bpfmaps.POLICY_SIZE)
        finally:
            os.close(fd)

    def policy_entry(self, cgroup_id: int) -> tuple[Policy, bool] | None:
        """(policy, managed by the daemon) as this version's maps hold it for
        one cgroup, or None; no walk of the cgroup tree."""
        raw = self.policy_value(cgroup_id)
        if raw is None:
            return None
        _, flags, policy = bpfmaps.decode_policy(raw)
        return policy, bool(flags & bpfmaps.F_MANAGED)

    def policy_values(self) -> dict[int, bytes]:
        """Cgroup id -> raw bk_policy for every entry of this version's
        policy hash, read in one BPF_MAP_LOOKUP_BATCH per 4,096 entries (two
        bpf() calls an entry before)."""
        try:
            fd = bpfsys.obj_get(os.path.join(self.obj_dir, loader.MAP_POLICIES))
        except OSError as e:
            if e.errno == errno.ENOENT:
                return {}
            raise
        try:
            items = bpfsys.map_items(fd, 8, bpfmaps.POLICY_SIZE)
        finally:
            os.close(fd)
        return {int.from_bytes(k, sys.byteorder): v for k, v in items}

    def storage_values(self, ids: Iterable[int]) -> dict[int, bytes]:
        """Cgroup id -> raw bk_policy in each cgroup's own storage, what its
        programs read (one lookup each: cgroup storage has no batch
        operations).  A cgroup without bpfkeep programs has none."""
        try:
            fd = bpfsys.obj_get(os.path.join(self.obj_dir, loader.MAP_POLICY))
        except OSError as e:
            if e.errno == errno.ENOENT:
                return {}
            raise
        out = {}
        try:
            for i in ids:
                with contextlib.suppress(OSError):
                    raw = bpfsys.map_lookup(fd, struct.pack("=Q", i), bpfmaps.POLICY_SIZE)
                    if raw is not None:
                        out[i] = raw
        finally:
            os.close(fd)
        return out

    def policy_entries(self) -> dict[int, tuple[Policy, bool]]:
        """Cgroup id -> (policy, managed by the daemon) for every entry of
        this version's policy map."""
        out = {}
        for cg_id, raw in self.policy_values().items():
            _, flags, policy = bpfmaps.decode_policy(raw)
            out[cg_id] = (policy, bool(flags & bpfmaps.F_MANAGED))
        return out

    def attachments(self, paths: dict[int, Cgroup] | None = None) -> list[Attachment]:
        """Every cgroup with a bpfkeep policy, read from bpffs and the kernel.

        ``paths`` saves the walk of the cgroup tree when the caller already
        knows where the cgroups are (the daemon)."""
        self.check_pin_dir()
        ids = sorted(self._pinned_ids())
        if not ids:
            return []
        cgs = dict(paths or {})
        missing = [i for i in ids if i not in cgs]
        if missing:
            cgs.update(by_ids(missing, cgroup2_mount()))
        out = []
        owners = self._prog_owners()
        with contextlib.ExitStack() as stack:
            opened: dict[str, dict[str, int] | None] = {}

            def objects_of(obj_dir: str | None) -> dict[str, int] | None:
                if obj_dir is None:
                    return None
                if obj_dir not in opened:
                    try:
                        opened[obj_dir] = stack.enter_context(self._objects(obj_dir))
                    except OSError:
                        opened[obj_dir] = None
                return opened[obj_dir]

            for cg_id in ids:
                key = struct.pack("=Q", cg_id)
                lp = self._link_progs(cg_id)
                links = {h: lid for h, (lid, _) in lp.items()}
                progs = {h: pid for h, (_, pid) in lp.items()}
                owner = next((owners.get(p) for p in progs.values() if p in owners), None)
                objs = objects_of(owner or (self.obj_dir if not lp else None))
                policy = counters = None
                managed = False
                if objs is not None:
                    size = bpfsys.map_info(objs[loader.MAP_POLICIES])[3]
                    raw = bpfsys.map_lookup(objs[loader.MAP_POLICIES], key, size)
                    decoded = bpfmaps.decode_any_policy(raw) if raw is not None else None
                    if decoded is not None:
                        _, flags, policy = decoded
                        managed = bool(flags & bpfmaps.F_MANAGED)
                    counters = _counters(objs[loader.MAP_COUNTERS], cg_id)
                    if counters is not None and loader.MAP_SWEEPSTATS in objs:
                        counters.sweep = _sweepstats(objs[loader.MAP_SWEEPSTATS], cg_id)
                out.append(
                    Attachment(cg_id, cgs.get(cg_id), policy, counters, links, progs, managed)
                )
        return out

    def read_counters(self, ids: list[int]) -> dict[int, bpfmaps.Counters]:
        """Counters of these cgroups (this version's maps).  The kernel frees
        a cgroup's storage with its last bpfkeep link, so a missing entry
        also means the policy is no longer attached."""
        try:
            fd = bpfsys.obj_get(os.path.join(self.obj_dir, loader.MAP_COUNTERS))
        except OSError:
            return {}
        try:
            sfd = bpfsys.obj_get(os.path.join(self.obj_dir, loader.MAP_SWEEPSTATS))
        except OSError:
            sfd = -1
        try:
            found = {}
            for i in ids:
                c = _counters(fd, i)
                if c is not None:
                    c.sweep = _sweepstats(sfd, i) if sfd >= 0 else None
                    found[i] = c
            return found
        finally:
            os.close(fd)
            if sfd >= 0:
                os.close(sfd)

    def program_ids(self) -> dict[str, int]:
        """Kernel ids of bpfkeep's loaded programs (to tell ours from others')."""
        ids = {}
        for hook, _, prog in HOOKS:
            try:
                fd = bpfsys.obj_get(os.path.join(self.obj_dir, prog))
            except OSError:
                continue
            try:
                ids[hook] = bpfsys.prog_id(fd)
            finally:
                os.close(fd)
        return ids

    def destroy(self) -> None:
        """Detach everything and remove the pin directory (tests, uninstall)."""
        self.check_pin_dir()
        if not os.path.isdir(self.pin_dir):
            return
        with self._lock():
            for cg_id in self._pinned_ids():
                self._detach_id(cg_id)
        for sub in (self.link_dir, *self._obj_dirs()):
            if os.path.isdir(sub):
                for name in os.listdir(sub):
                    os.unlink(os.path.join(sub, name))
                os.rmdir(sub)
        for name in os.listdir(self.pin_dir):  # leftovers of a killed loader
            path = os.path.join(self.pin_dir, name)
            if os.path.isdir(path):
                for n in os.listdir(path):
                    os.unlink(os.path.join(path, n))
                os.rmdir(path)
        os.rmdir(self.pin_dir)
