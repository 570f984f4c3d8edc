"""The sweep: bring the TCP sockets that already exist to a policy.

sock_ops runs only at a socket's callbacks (connect, listen, accept), so a
connection established before its policy was attached -- the one hanging
on a dead peer right now, when an operator reaches for bpfkeep -- is never
seen by it.  The sweep closes that gap, and carries policy updates to the
sockets that exist:

1. **Scope.**  The attached cgroups being swept and all their descendants;
   each cgroup belongs to the deepest bpfkeep policy above it.
2. **Targets.**  inet_diag lists every TCP socket of a network namespace
   with its cookie, cgroup id, inode and state.  A socket is a target when
   its cgroup is in scope, or when a process of a cgroup in scope holds it
   (a listener systemd made in its own cgroup and handed over by socket
   activation, a connection passed to a worker): such a socket is never
   seen by the scope's sock_ops programs.
3. **Namespaces.**  Every network namespace a process of the scope lives
   in, and our own.  The kernel's TCP iterator walks the namespace of the
   process that creates it, so a thread enters each one (setns) first.
4. **Kernel.**  The targets' cookies go into ``map_sweep``; an iter/tcp
   program (Linux 5.15+) walks the namespace's TCP sockets with each one
   locked, applies the owner's policy to those in the map (bpf_setsockopt),
   records the owner in the socket's storage and writes back the values in
   force.  bcc cannot read ``struct sock`` fields at the running kernel's
   offsets, so the program never reads them: the cookie is all it matches.

Set mode keeps what a program chose: a socket whose program turned
keepalive on itself (before bpfkeep saw it) or set an option afterwards
keeps those values.  Enforce mode brings every socket within the policy.
Before Linux 6.17 the iterator may skip a socket when its hash bucket
changes between reads; sockets not reached are swept once more.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import struct
from collections.abc import Callable, Iterable

from bpfkeep.errors import EnvironmentProblem
from bpfkeep.kernel import bpfsys, procfs, sockdiag
from bpfkeep.kernel.cgroups import Cgroup
from bpfkeep.kernel.sockdiag import CLOSE_WAIT, ESTABLISHED, LISTEN, SYN_SENT
from bpfkeep.progs import loader, maps

# The states in which keepalive matters.
SWEPT_STATES = (ESTABLISHED, SYN_SENT, CLOSE_WAIT, LISTEN)
_STATE_MASK = sockdiag.states_mask(SWEPT_STATES)


class SweepUnavailable(EnvironmentProblem):
    """This kernel cannot change sockets that already exist."""


UNAVAILABLE = (
    "existing sockets keep their values: this kernel could not load the "
    "sweep (an iter/tcp program calling bpf_setsockopt needs Linux 5.15+); new "
    "sockets get the policy, and bpfkeep audit lists the others"
)


@dataclasses.dataclass(frozen=True)
class Target:
    """One socket to sweep, as inet_diag described it."""

    cookie: int
    owner: int  # cgroup id of the policy to apply (0 for READ)
    held: bool  # made in another cgroup, held by a process in scope
    state: int
    cgroup_id: int
    inode: int
    family: int
    local: str
    remote: str
    # The peer (IPv4 mapped) and its port, for the kernel to find the peer
    # rule that applies; zeros when the owner has no peer rules (work items
    # for the same owner and action then encode alike).
    peer: bytes = bytes(16)
    port: int = 0
    peered: bool = False  # the owner's values depend on the peer


@dataclasses.dataclass
class Outcome:
    target: Target
    entry: maps.SweepEntry
    netns: str = ""  # "net:[INODE]"


@dataclasses.dataclass
class Report:
    """What a sweep did, for a notice line, ``status`` and tests."""

    outcomes: list[Outcome] = dataclasses.field(default_factory=list)
    namespaces: int = 0
    unreachable: dict[str, str] = dataclasses.field(default_factory=dict)  # netns -> why

    @property
    def swept(self) -> int:
        """Sockets brought to their policy (not those already under it)."""
        return sum(
            1
            for o in self.outcomes
            if o.entry.result & maps.SWR_SEEN and not o.entry.result & maps.SWR_CURRENT
        )

    @property
    def app_own(self) -> int:
        return sum(1 for o in self.outcomes if o.entry.result & maps.SWR_APP_OWN)

    @property
    def failed(self) -> int:
        return sum(1 for o in self.outcomes if o.entry.failed)

    def summary(self) -> str:
        parts = [f"{self.swept} existing socket(s) swept"]
        if self.app_own:
            parts.append(f"{self.app_own} kept their program's own keepalive (set mode)")
        if self.failed:
            parts.append(f"{self.failed} refused an option (see bpfkeep status)")
        for what, why in sorted(self.unreachable.items()):
            parts.append(f"{what} unreachable: {why}")
        return "; ".join(parts)


# -- scope ---------------------------------------------------------------------


@dataclasses.dataclass
class Scope:
    owner_of_cgroup: dict[int, int]  # cgroup id -> owning policy's cgroup id
    owner_of_pid: dict[int, int]  # pid of a process in scope -> owner
    # Owners whose values depend on the peer (peer rules, keepidle auto).
    peered: frozenset[int] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.owner_of_cgroup)


def scope(roots: Iterable[Cgroup], attached: set[int], *, owner: int | None = None) -> Scope:
    """Every cgroup below ``roots`` (inclusive) with the deepest policy
    above it, and the processes in them.  A root owns its subtree except
    where a descendant has a policy of its own (``attached``); ``owner``
    gives the roots' policy instead (an ancestor's, after a detach)."""
    owners: dict[int, int] = {}
    pids: dict[int, int] = {}
    for root in roots:
        owner_at: dict[str, int] = {}
        for dirpath, _dirs, _files in os.walk(root.path):
            try:
                ino = os.stat(dirpath).st_ino
            except OSError:
                continue
            parent = os.path.dirname(dirpath)
            top = root.id if owner is None else owner
            own = ino if ino in attached else owner_at.get(parent, top)
            owner_at[dirpath] = own
            owners[ino] = own
            try:
                with open(os.path.join(dirpath, "cgroup.procs")) as f:
                    for pid in f.read().split():
                        pids[int(pid)] = own
            except OSError:
                continue
    return Scope(owners, pids)


# -- the kernel side ---------------------------------------------------------------


class Sweeper:
    """Runs sweeps on one pin directory's objects (the caller holds the pin
    directory's lock: the work list is shared)."""

    def __init__(self, objs: dict[str, int], sweep_prog: int | None):
        self.objs = objs
        self.prog = sweep_prog

    def _run(self, entries: dict[int, maps.SweepEntry]) -> dict[int, maps.SweepEntry]:
        """One batch: write the work list, run the iterator, read back.
        A handful of bpf() calls per batch, not four per socket (a
        periodic sweep of a busy host walks every socket it has)."""
        if self.prog is None:
            raise SweepUnavailable(UNAVAILABLE)
        fd = self.objs[loader.MAP_SWEEP]
        keys = {c: _U64.pack(c) for c in entries}
        # Most entries are alike (same owner and action): encode each kind once.
        encoded: dict[tuple, bytes] = {}
        values = []
        for e in entries.values():
            kind = e.inputs()
            raw = encoded.get(kind)
            if raw is None:
                raw = encoded[kind] = e.encode()
            values.append(raw)
        out: dict[int, maps.SweepEntry] = {}
        todo = set(entries)
        try:
            bpfsys.map_update_batch(fd, list(keys.values()), values)
            for _pass in range(2):  # a socket can be skipped before 6.17
                _iter_with_deadline(self.prog)
                seen = []
                for kraw, vraw in bpfsys.map_items(fd, 8, maps.SWEEP_SIZE):
                    cookie = _U64.unpack(kraw)[0]
                    if cookie not in todo:
                        continue
                    got = maps.SweepEntry.decode(vraw)
                    out[cookie] = got
                    if got.result & maps.SWR_SEEN:
                        seen.append(cookie)  # done: a second pass must not act again
                self._delete(fd, [keys[c] for c in seen])
                todo.difference_update(seen)
                if not todo:
                    break
        finally:
            self._clear(fd)
        return out

    @staticmethod
    def _delete(fd: int, keys: list[bytes]) -> None:
        """Take these entries out of the work list.  What was done stands
        whatever fails here: one at a time if the batch is refused."""
        try:
            bpfsys.map_delete_batch(fd, keys)
        except OSError:
            for k in keys:
                with contextlib.suppress(OSError):
                    bpfsys.map_delete(fd, k)

    @classmethod
    def _clear(cls, fd: int) -> None:
        with contextlib.suppress(OSError):
            cls._delete(fd, [k for k, _ in bpfsys.map_items(fd, 8, maps.SWEEP_SIZE)])

    def run(
        self, targets: list[Target], make: Callable[[Target], maps.SweepEntry]
    ) -> list[Outcome]:
        """Sweep these targets (all in the calling thread's namespace), in
        batches that fit the work list."""
        outcomes = []
        # The caller holds the pin directory's lock: anything already in the
        # work list was left by a sweep that died midway, and the iterator
        # would act on it again.  (Each batch clears its own at the end.)
        self._clear(self.objs[loader.MAP_SWEEP])
        for start in range(0, len(targets), MAX_BATCH):
            batch = {t.cookie: t for t in targets[start : start + MAX_BATCH]}
            done = self._run({c: make(t) for c, t in batch.items()})
            outcomes += [Outcome(batch[c], e) for c, e in done.items()]
        return outcomes

    def prepare_stats(self, owners: Iterable[int]) -> None:
        zero = bytes(maps.SWEEPSTATS_SIZE)
        for owner in owners:
            with contextlib.suppress(OSError):
                bpfsys.map_update(
                    self.objs[loader.MAP_SWEEPSTATS],
                    _U64.pack(owner),
                    zero,
                    BPF_NOEXIST,
                )


BPF_NOEXIST = 1
_U64 = struct.Struct("=Q")  # map keys: socket cookies, cgroup ids
MAX_BATCH = maps.MAX_SWEEP  # the work list holds this many (BK_MAX_SWEEP)
# The kernel's TCP iterator takes each socket's lock in turn, every socket
# of the namespace, not only ours: a process stuck holding one (a send()
# from a page whose fault never completes: userfaultfd, a hung FUSE file)
# would hold the sweep -- and the pin directory's lock -- forever, in an
# uninterruptible wait.  The pass runs in a thread of its own and is given
# up after this long; the stuck thread is left behind.
ITER_DEADLINE = 10.0


class SweepStuck(OSError):
    """The kernel's iterator did not finish: a socket's lock is held."""


def _iter_with_deadline(prog_fd: int, deadline: float = ITER_DEADLINE) -> None:
    try:
        procfs.in_thread(lambda: bpfsys.iter_run(prog_fd), "bpfkeep-iter", deadline)
    except procfs.Stuck:
        raise SweepStuck(
            errno.ETIMEDOUT,
            f"a socket's lock was held for over {deadline:.0f} s (a process stuck in a "
            "page fault inside send()?); the rest of this namespace was not swept",
        ) from None


def _targets(
    raws: list[sockdiag.Raw],
    pick: Callable[[int, int], tuple[int, bool] | None],
    peered: frozenset[int] = frozenset(),
) -> list[Target]:
    out = []
    for fam, st, _timer, sport, dport, src, dst, ino, cg, cookie in raws:
        picked = pick(cg, ino)
        if picked is None:
            continue
        owner, held = picked
        by_peer = owner in peered
        peer, port = (sockdiag.mapped(fam, dst), dport) if by_peer else (bytes(16), 0)
        out.append(
            Target(
                cookie,
                owner,
                held,
                st,
                cg,
                ino,
                fam,
                sockdiag.address(fam, src, sport),
                sockdiag.address(fam, dst, dport),
                peer,
                port,
                by_peer,
            )
        )
    return out


def sweep(
    sweeper: Sweeper,
    sc: Scope,
    make: Callable[[Target, dict[str, int]], maps.SweepEntry],
    *,
    states: tuple[int, ...] = SWEPT_STATES,
    count: bool = True,
    owners_elsewhere: Callable[[set[int]], dict[int, int]] | None = None,
    keep: Callable[[Target], bool] | None = None,
) -> Report:
    """Sweep every socket of the scope, in every namespace it lives in.

    ``make`` builds each socket's work item from its target and the
    namespace's keepalive sysctls.  ``owners_elsewhere`` maps cgroup ids
    outside the scope to the policy covering each (if any): a socket made
    in such a cgroup and held by the scope's processes stays its own
    policy's.  ``keep``: only the targets it keeps (a repair's sockets)."""
    report = Report()
    if not sc:
        return report
    held = procfs.held_sockets(sc.owner_of_pid)
    elsewhere: dict[int, int | None] = {}

    def own_policy_elsewhere(t: Target) -> bool:
        if not t.held or owners_elsewhere is None:
            return False
        if t.cgroup_id not in elsewhere:
            found = owners_elsewhere({t.cgroup_id})
            elsewhere[t.cgroup_id] = found.get(t.cgroup_id)
        return elsewhere[t.cgroup_id] not in (None, t.owner)

    def pick(cg: int, ino: int) -> tuple[int, bool] | None:
        owner = sc.owner_of_cgroup.get(cg)
        if owner is not None:
            return owner, False
        owner = held.get(ino)
        return None if owner is None else (owner, True)

    if count:
        sweeper.prepare_stats(set(sc.owner_of_cgroup.values()))
    for ns, tid in procfs.namespaces(sc.owner_of_pid, hidden=report.unreachable).items():

        def work() -> list[Outcome]:
            targets = [
                t
                for t in _targets(sockdiag.dump(_STATE_MASK), pick, sc.peered)
                if t.state in states and not own_policy_elsewhere(t) and (keep is None or keep(t))
            ]
            if not targets:
                return []
            idle, intvl, cnt = procfs.keepalive_sysctls(fallback=True)
            defaults = {"keepidle": idle, "keepintvl": intvl, "keepcnt": cnt}
            return sweeper.run(targets, lambda t: make(t, defaults))

        try:
            outcomes = procfs.in_netns(tid, work)
        except SweepUnavailable:
            raise
        except OSError as e:
            if e.errno in (errno.ESRCH, errno.ENOENT):
                continue  # the process left meanwhile
            hint = " (needs CAP_SYS_ADMIN)" if e.errno == errno.EPERM else ""
            report.unreachable[f"network namespace net:[{ns}]"] = f"{e.strerror or e}{hint}"
            continue
        report.namespaces += 1
        for o in outcomes:  # type: ignore[union-attr]
            o.netns = f"net:[{ns}]"
        report.outcomes += outcomes  # type: ignore[arg-type]
    return report
