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
import time
from collections.abc import Callable, Iterable

from bpfkeep.kernel import bpfsys, netns, procfs, sockdiag
from bpfkeep.kernel.cgroups import Cgroup
from bpfkeep.kernel.sockdiag import CLOSE_WAIT, ESTABLISHED, LISTEN, SYN_SENT
from bpfkeep.progs import maps
from bpfkeep.sweep.worklist import (  # (re-exported: the sweep's errors and work list)
    MAX_BATCH,
    UNAVAILABLE,
    Sweeper,
    SweepUnavailable,
    Tally,
)

__all__ = ["MAX_BATCH", "UNAVAILABLE", "SweepUnavailable", "Sweeper", "Tally"]

# The states in which keepalive matters.
SWEPT_STATES = (ESTABLISHED, SYN_SENT, CLOSE_WAIT, LISTEN)


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

    outcomes: list[Outcome] = dataclasses.field(default_factory=list)  # with detail only
    namespaces: int = 0
    unreachable: dict[str, str] = dataclasses.field(default_factory=dict)  # netns -> why
    swept: int = 0  # sockets brought to their policy (not those already under it)
    app_own: int = 0  # set mode: kept their program's own keepalive
    failed: int = 0  # refused an option

    def summary(self) -> str:
        parts = [f"{self.swept} existing socket(s) swept"]
        if self.app_own:
            parts.append(f"{self.app_own} kept their program's own keepalive (set mode)")
        if self.failed:
            parts.append(f"{self.failed} refused an option (see bpfkeep status)")
        for what, why in sorted(self.unreachable.items()):
            parts.append(f"{what} unreachable: {why}")
        return "; ".join(parts)

    def add(self, other: Report) -> None:
        self.outcomes += other.outcomes
        self.namespaces += other.namespaces
        self.unreachable.update(other.unreachable)
        self.swept += other.swept
        self.app_own += other.app_own
        self.failed += other.failed


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
        top = root.id if owner is None else owner
        # (path, cgroup id, its owner): on cgroup2 a directory entry's
        # inode number is the cgroup id, so the listing gives the ids of
        # the children (no stat a cgroup: 600 of them every pass).
        stack = [(root.path, root.id, root.id if root.id in attached else top)]
        while stack:
            path, cg_id, own = stack.pop()
            owners[cg_id] = own
            try:
                with open(os.path.join(path, "cgroup.procs")) as f:
                    for pid in f.read().split():
                        pids[int(pid)] = own
                if os.stat(path).st_nlink <= 2:
                    continue  # no child cgroup: no listing of its 20 files
                with os.scandir(path) as it:
                    for d in it:
                        if d.is_dir(follow_symlinks=False):
                            child = d.inode()
                            stack.append((d.path, child, child if child in attached else own))
            except OSError:
                continue  # removed meanwhile
    return Scope(owners, pids)


_U64 = struct.Struct("=Q")  # the work list's keys: socket cookies
# The kernel's TCP iterator takes each socket's lock in turn, every socket
# of the namespace, not only ours: a process stuck holding one (a send()
# from a page whose fault never completes: userfaultfd, a hung FUSE file)
# would hold the sweep forever, in an uninterruptible wait.  The walk runs
# in a thread of its own (netns.Entered) and is given up after this long
# -- plus a little per socket the namespace shows -- and the stuck thread
# is left behind.  Short: a sweep waits for it before the next namespace.
ITER_PATIENCE = 2.0
ITER_PER_SOCKET = 5e-6  # the walk takes ~1 µs a socket of the namespace
ITER_DEADLINE = 10.0  # the longest it is ever waited for
# In-kernel filtering of the dump (inet_diag bytecode, a condition per
# cgroup run on every socket of the namespace) for scopes of up to this
# many cgroups: a new cgroup's sweep then costs the kernel's walk of the
# host's sockets, not a decoding of each in Python.
FILTER_MAX = 32


class SweepStuck(OSError):
    """The kernel's iterator did not finish: a socket's lock is held."""


def patience(sockets: int) -> float:
    """How long a walk of a namespace showing ``sockets`` TCP sockets is
    waited for."""
    return min(ITER_DEADLINE, ITER_PATIENCE + ITER_PER_SOCKET * sockets)


def _target(
    raw: sockdiag.Raw, owner: int, held: bool, peered: frozenset[int] = frozenset()
) -> Target:
    fam, st, _timer, sport, dport, src, dst, ino, cg, cookie = raw
    by_peer = owner in peered
    peer, port = (sockdiag.mapped(fam, dst), dport) if by_peer else (bytes(16), 0)
    return Target(
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


# -- a namespace at a time ------------------------------------------------------------

Make = Callable[[Target, dict[str, int]], maps.SweepEntry]


class Sweep:
    """One sweep of a scope, a network namespace at a time (``run``), so
    that its caller decides what runs between two namespaces: the daemon
    interleaves other sweeps, fairly between the namespaces' owners.

    ``make`` builds each socket's work item from its target and the
    namespace's keepalive sysctls; a ``make`` with a true ``by_kind``
    attribute promises that the item depends only on the owner, the state
    and ``held`` for owners not in ``scope.peered``: one item is made and
    encoded per kind, not per socket.  ``owners_elsewhere`` maps cgroup ids
    outside the scope to the policy covering each (if any): a socket made
    in such a cgroup and held by the scope's processes stays its own
    policy's.  ``keep``: only the targets it keeps (a repair's sockets).
    ``detail``: keep an Outcome per socket (audit, tests, the enforce
    room's counts); else only counts.  ``lock``: the work list's lock,
    taken per batch."""

    def __init__(
        self,
        sweeper: Sweeper,
        sc: Scope,
        make: Make,
        *,
        lock: Callable[[], contextlib.AbstractContextManager[object]],
        entered: netns.Entered,
        held: procfs.HeldSockets,
        states: tuple[int, ...] = SWEPT_STATES,
        owners_elsewhere: Callable[[set[int]], dict[int, int]] | None = None,
        keep: Callable[[Target], bool] | None = None,
        detail: bool = False,
    ):
        self.sweeper, self.sc, self.make, self.keep = sweeper, sc, make, keep
        self.lock, self.entered, self.held_cache = lock, entered, held
        self.states = frozenset(states)
        self.mask = sockdiag.states_mask(tuple(states))
        self.owners_elsewhere = owners_elsewhere
        self.detail = detail
        self.by_kind = bool(getattr(make, "by_kind", False))
        self.report = Report()
        self._held: dict[int, int] | None = None  # socket inode -> owner, read when needed
        # Encoded items by (owner, state, held), with ``by_kind``: the same
        # in every namespace of the sweep.
        self._kinds: dict[tuple[int, int, bool], bytes] = {}
        self._elsewhere: dict[int, int | None] = {}
        self.filter = (
            frozenset(sc.owner_of_cgroup) if 0 < len(sc.owner_of_cgroup) <= FILTER_MAX else None
        )

    def units(self, own_namespace: bool = True) -> list[netns.Namespace]:
        """The namespaces to visit: every one a process of the scope lives
        in, and our own -- with ``own_namespace`` false, ours only if one
        of them lives there.  (A socket lives in the namespace of the
        thread that made it: the scope's sockets in ours without a process
        of the scope there were made before it moved away, or handed to a
        process outside the scope.  The periodic pass finds those; a new
        cgroup's sweep need not walk every socket of the host for them.)"""
        if not self.sc:
            return []
        found = netns.of_processes(self.sc.owner_of_pid, hidden=self.report.unreachable)
        return [ns for ns in found.values() if own_namespace or ns.pids or ns.tid is not None]

    def run(self, ns: netns.Namespace) -> None:
        """Sweep the scope's sockets in one namespace; the outcome goes to
        ``report``.  Raises SweepUnavailable (this kernel cannot) and
        SweepStuck (a socket's lock held: the namespace is reported
        unreachable, and the caller learns not to come back soon)."""
        where = f"network namespace net:[{ns.inode}]"
        try:
            done = self._run(ns)
        except SweepUnavailable:
            raise
        except (netns.Stuck, SweepStuck) as e:
            self.report.unreachable[where] = (
                "a socket's lock was held too long (a process stuck in a page fault inside "
                "send()?); its sockets were not swept"
            )
            raise SweepStuck(errno.ETIMEDOUT, f"{where}: {e.strerror or e}") from None
        except OSError as e:
            if e.errno in (errno.ESRCH, errno.ENOENT):
                return  # the process left meanwhile
            hint = " (needs CAP_SYS_ADMIN)" if e.errno == errno.EPERM else ""
            self.report.unreachable[where] = f"{e.strerror or e}{hint}"
            return
        if done:
            self.report.namespaces += 1

    # -- inside ------------------------------------------------------------

    def _dump(self, ns: netns.Namespace, cgroups: frozenset[int] | None):
        """The namespace's sockets (and, when items need them, its
        keepalive sysctls), read from inside it."""

        def inside() -> tuple[list[sockdiag.Raw], dict[str, int]]:
            raws = sockdiag.dump(self.mask, cgroups)
            defaults: dict[str, int] = {}
            if raws and not (self.by_kind and not self.sc.peered):
                idle, intvl, cnt = procfs.keepalive_sysctls(fallback=True)
                defaults = {"keepidle": idle, "keepintvl": intvl, "keepcnt": cnt}
            return raws, defaults

        return self.entered.call(inside, ns.tid, ITER_DEADLINE)

    def _run(self, ns: netns.Namespace) -> bool:
        raws, defaults = self._dump(ns, self.filter)
        if self.filter is not None and self._missing_held(ns, raws):
            # A process of the scope holds a TCP socket made elsewhere: the
            # whole namespace, then, to find it.
            raws, defaults = self._dump(ns, None)
        keys, values, picked, owners = self._work(raws, defaults)
        if not keys:
            return True
        wait = patience(len(raws))
        for start in range(0, len(keys), MAX_BATCH):
            end = start + MAX_BATCH
            with self.lock():
                tally, got = self.sweeper.batch(
                    keys[start:end],
                    values[start:end],
                    lambda: self._iterate(ns, wait),
                    detail=self.detail,
                    owners=owners if len(keys) <= MAX_BATCH else {p[1] for p in picked[start:end]},
                )
            self._count(tally, got, picked, ns)
        return True

    def _iterate(self, ns: netns.Namespace, wait: float) -> None:
        try:
            self.entered.call(lambda: bpfsys.iter_run(self.sweeper.prog), ns.tid, wait)
        except netns.Stuck:
            raise SweepStuck(
                errno.ETIMEDOUT,
                f"a socket's lock was held for over {wait:.0f} s (a process stuck in a page "
                "fault inside send()?); the rest of this namespace was not swept",
            ) from None

    def _missing_held(self, ns: netns.Namespace, raws: list[sockdiag.Raw]) -> bool:
        """Whether the namespace's processes of the scope hold a TCP socket
        that a dump filtered by the scope's cgroups did not show."""
        shown = {r[7] for r in raws}
        now = time.monotonic()
        for pid in ns.pids:
            for ino in self.held_cache.of(pid, now).keys() - shown:
                if self.held_cache.is_tcp(pid, ino):
                    return True
        return False

    def _held_map(self) -> dict[int, int]:
        if self._held is None:
            self._held = self.held_cache.held(self.sc.owner_of_pid)
        return self._held

    def _own_policy_elsewhere(self, cgroup_id: int, owner: int) -> bool:
        if self.owners_elsewhere is None:
            return False
        if cgroup_id not in self._elsewhere:
            self._elsewhere[cgroup_id] = self.owners_elsewhere({cgroup_id}).get(cgroup_id)
        return self._elsewhere[cgroup_id] not in (None, owner)

    def _work(
        self, raws: list[sockdiag.Raw], defaults: dict[str, int]
    ) -> tuple[list[bytes], list[bytes], list[tuple[sockdiag.Raw, int, bool]], set[int]]:
        """The work items: keys (cookies) and values, what was picked (for
        the outcomes, with ``detail``, or batches of several owners; else
        nothing) and the owners."""
        owner_of = self.sc.owner_of_cgroup
        states, peered, make, keep = self.states, self.sc.peered, self.make, self.keep
        held: dict[int, int] | None = None  # read at the first socket of another cgroup
        pick = self.detail or len(raws) > MAX_BATCH
        kinds = self._kinds
        quiet = 0 if self.detail else maps.SWI_QUIET
        pack = _U64.pack
        keys: list[bytes] = []
        values: list[bytes] = []
        picked: list[tuple[sockdiag.Raw, int, bool]] = []
        owners: set[int] = set()
        for raw in raws:
            st = raw[1]
            if st not in states:
                continue
            owner = owner_of.get(raw[8])
            is_held = False
            if owner is None:
                if held is None:
                    held = self._held_map()  # is it held by a process of the scope?
                owner = held.get(raw[7])
                if owner is None or self._own_policy_elsewhere(raw[8], owner):
                    continue
                is_held = True
            if keep is not None and not keep(_target(raw, owner, is_held, peered)):
                continue
            if self.by_kind and owner not in peered:
                kind = (owner, st, is_held)
                value = kinds.get(kind)
                if value is None:
                    value = kinds[kind] = _encode(
                        make(_target(raw, owner, is_held), defaults), quiet
                    )
            else:
                value = _encode(make(_target(raw, owner, is_held, peered), defaults), quiet)
            keys.append(pack(raw[9]))
            values.append(value)
            owners.add(owner)
            if pick:
                picked.append((raw, owner, is_held))
        return keys, values, picked, owners

    def _count(
        self,
        tally: Tally,
        got: list[tuple[int, int, bytes]],
        picked: list[tuple[sockdiag.Raw, int, bool]],
        ns: netns.Namespace,
    ) -> None:
        rep = self.report
        rep.swept += tally.swept
        rep.app_own += tally.app_own
        rep.failed += tally.failed
        if not got:
            return
        by_cookie = {p[0][9]: p for p in picked}
        for cookie, _result, raw in got:
            p = by_cookie.get(cookie)
            if p is not None:
                rep.outcomes.append(
                    Outcome(
                        _target(p[0], p[1], p[2], self.sc.peered),
                        maps.SweepEntry.decode(raw),
                        f"net:[{ns.inode}]",
                    )
                )


def _encode(entry: maps.SweepEntry, flags: int) -> bytes:
    entry.in_flags |= flags
    return entry.encode()


def sweep(
    sweeper: Sweeper,
    sc: Scope,
    make: Make,
    *,
    lock: Callable[[], contextlib.AbstractContextManager[object]],
    states: tuple[int, ...] = SWEPT_STATES,
    count: bool = True,
    owners_elsewhere: Callable[[set[int]], dict[int, int]] | None = None,
    keep: Callable[[Target], bool] | None = None,
    detail: bool = True,
) -> Report:
    """Sweep every socket of the scope, in every namespace it lives in, in
    one go (the commands; the daemon runs a Sweep a namespace at a time)."""
    if count:
        sweeper.prepare_stats(set(sc.owner_of_cgroup.values()))
    with lock():
        sweeper.clear()  # what a sweep that died midway left
    entered = netns.Entered("bpfkeep-sweep")
    try:
        s = Sweep(
            sweeper,
            sc,
            make,
            lock=lock,
            entered=entered,
            held=procfs.HeldSockets(),
            states=states,
            owners_elsewhere=owners_elsewhere,
            keep=keep,
            detail=detail,
        )
        for ns in s.units():
            try:
                s.run(ns)
            except SweepStuck:
                continue  # noted in the report; the other namespaces still
        return s.report
    finally:
        entered.close()
