"""Writing attachments: a policy's links and its map entries, under the pin
directory's lock with the objects open.

One path serves every writer -- ``bpfkeep attach``, the daemon's batched
reconcile and the upgrade of an attachment to new programs (pins.migrate):

1. **Neighbours.**  With nested policies, the kernel runs a socket's own
   cgroup's programs first and its ancestors' last.  Before a policy is in
   force, its ancestors learn they have a descendant (they step aside for
   its sockets) and its descendants that they have an ancestor (they
   record their sockets): the F_HAS_* flags (``nesting``).
2. **The value.**  A bk_policy value: the policy, the cgroup's depth, a
   generation (new when the values change), and prev[]: the values the
   cgroup's sockets carried until now (an ancestor's, or the policy's
   before this update), recognised as bpfkeep's on sockets without a record.
3. **Links.**  One bpf_link per hook, pinned (``links/<id>_<hook>``).
4. **The policy.**  Written to the cgroup's own storage first (what its
   programs read), then the policy hash (what the setsockopt program and
   the sweep look owners up in): an ancestor keeps enforcing until both
   say this cgroup has a policy.

A first attach either completes or leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Iterable

from bpfkeep.errors import EnvironmentProblem, PermissionProblem, UsageError
from bpfkeep.kernel import bpfsys
from bpfkeep.kernel.cgroups import Cgroup
from bpfkeep.options import Policy
from bpfkeep.pins.pindir import HOOKS, PinDir, fully_attached
from bpfkeep.progs import loader, maps

_KEY = struct.Struct("=Q")  # map keys: cgroup ids


def key_of(cgroup_id: int) -> bytes:
    return _KEY.pack(cgroup_id)


class Writer:
    """Attachments written with the pin directory's lock held and ``objs``
    (this version's objects) open."""

    def __init__(self, pins: PinDir, objs: dict[str, int]):
        self.pins = pins
        self.objs = objs
        # update(): policy hash entries written together at flush()
        self._keys: list[bytes] = []
        self._values: list[bytes] = []
        self._peer_sets: set[int] = set()  # written (or found) by this writer

    # -- reading this version's maps -------------------------------------------

    def raw_policy(self, cgroup_id: int) -> bytes | None:
        """One cgroup's entry in the policy hash."""
        return bpfsys.map_lookup(
            self.objs[loader.MAP_POLICIES], key_of(cgroup_id), maps.POLICY_SIZE
        )

    # -- the attach path ---------------------------------------------------------

    def attach(self, cg: Cgroup, policy: Policy, *, managed: bool = False) -> str:
        """Attach, or update in place; returns "attached" or "updated".

        An update is two map writes, no re-attach: new sockets get the new
        values with no gap (the sockets that exist already are brought to
        them by the sweep).  ``managed`` marks the attachment as the
        daemon's."""
        key = key_of(cg.id)
        alive = self.pins.link_progs(cg.id)
        nesting, nearest = self.neighbours(cg)
        # What the cgroup's sockets carry until now: the nearest ancestor's
        # policy for a new attachment, the old values for an update.
        prev = maps.policy_or_none(self.raw_policy(nearest)) if nearest else None
        prev_peers = maps.policy_peers(self.raw_policy(nearest))[0] if prev else 0
        gen, old = maps.fresh_gen(), None
        if fully_attached(alive):
            old = self.raw_policy(cg.id)
            if old is not None:
                prev = maps.decode_policy(old)[2]
                prev_peers = maps.policy_peers(old)[0]
                if prev == policy.with_peers(()) and prev_peers == maps.peer_set_id(policy):
                    # The same values again keep their generation: the
                    # sockets under them are current.
                    gen = maps.policy_gen_of(old)
        value = maps.encode_policy(
            cg.id,
            policy,
            level=cg.level,
            managed=managed,
            gen=gen,
            nesting=nesting,
            prev=prev,
            prev_peers=prev_peers,
        )
        self.put_peers(policy)
        if old is not None and maps.policy_gen_of(old) == gen:
            # Unchanged values: the sockets are as they were (what they
            # carried before still counts as bpfkeep's until a sweep).
            value = maps.keep_prev(value, old)
        if fully_attached(alive):
            self.write_policy(key, value)
            return "updated"
        self.link(cg, value, skip=set(alive))
        return "attached"

    def update(self, cg: Cgroup, policy: Policy, *, managed: bool = True) -> bool:
        """A new policy for an attached cgroup, for a batch: one write to
        its own storage now (what its sock_ops and setsockopt programs
        read), its entry in the policy hash with all the others at flush().
        A new generation: the sweep brings its sockets to it.  False, and
        nothing written, when no bpfkeep program is attached to the cgroup
        (its storage exists only while one is): attach it instead."""
        key = key_of(cg.id)
        old = bpfsys.map_lookup(self.objs[loader.MAP_POLICY], key, maps.POLICY_SIZE)
        if old is None:
            return False
        # Where the other policies are has not changed (attach and detach
        # keep the flags); the old values are what the sockets carry until
        # the sweep: recognised as bpfkeep's on sockets without a record.
        value = maps.updated_policy(
            cg.id, policy, old, level=cg.level, managed=managed, gen=maps.fresh_gen()
        )
        self.put_peers(policy)
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
        BPF_MAP_UPDATE_BATCH (a hash map: Linux 5.6); then the peer-rule
        sets no policy uses any more go."""
        keys, values = self._keys, self._values
        self._keys, self._values = [], []
        bpfsys.map_update_batch(self.objs[loader.MAP_POLICIES], keys, values)
        if self._peer_sets:
            self.collect_peers()

    # -- peer rules ----------------------------------------------------------------

    def put_peers(self, policy: Policy) -> None:
        """A policy's peer-rule set in the kernel before the policy names it:
        the rules first, then the trie's prefixes that name them.  A set is
        named by its content, so one already there is complete."""
        ps = maps.peer_set(policy)
        if ps is None or ps.id in self._peer_sets:
            return
        self._peer_sets.add(ps.id)
        rules = self.objs[loader.MAP_RULES]
        first = next(iter(ps.rules))
        if bpfsys.map_lookup(rules, first, maps.RULE.size) is not None:
            return
        bpfsys.map_update_batch(rules, list(ps.rules), list(ps.rules.values()))
        bpfsys.map_update_batch(
            self.objs[loader.MAP_PEERS], list(ps.prefixes), list(ps.prefixes.values())
        )

    def collect_peers(self) -> None:
        """Remove the peer-rule sets no policy (nor its previous values)
        names any more."""
        live = set()
        for _key, raw in bpfsys.map_items(self.objs[loader.MAP_POLICIES], 8, maps.POLICY_SIZE):
            live.update(maps.policy_peers(raw))
        live.discard(0)
        gone = [
            k
            for k in bpfsys.map_keys(self.objs[loader.MAP_RULES], maps.RULE_KEY.size)
            if maps.RULE_KEY.unpack(k)["set"] not in live
        ]
        for k in gone:
            bpfsys.map_delete(self.objs[loader.MAP_RULES], k)
        prefixes = self.objs[loader.MAP_PEERS]
        for k in bpfsys.map_keys(prefixes, maps.PEER_KEY.size):
            if maps.peer_key_set(k) not in live:
                bpfsys.map_delete(prefixes, k)

    def link(
        self, cg: Cgroup, value: bytes, *, skip: Iterable[str] = (), suffix: str = ""
    ) -> list[tuple[str, int]]:
        """Links for the hooks not in ``skip``, pinned (at ``<path><suffix>``),
        then the policy ``value`` written: from then on it is in force.
        On an error nothing of it is left.  Returns (hook, link fd) of the
        new links, open, for the caller to close (see close_links)."""
        key = key_of(cg.id)
        # A new attachment counts from zero (the sweep's counters).
        with contextlib.suppress(OSError):
            bpfsys.map_delete(self.objs[loader.MAP_SWEEPSTATS], key)
        try:
            cgfd = os.open(cg.path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise UsageError(
                f"{cg.display}: the cgroup was removed while attaching; nothing was attached"
            ) from None
        except OSError as e:
            raise explain(e, cg) from None
        created: list[tuple[str, int]] = []
        try:
            for hook, atype, prog in HOOKS:
                if hook in skip:
                    continue
                path = self.pins.link_path(cg.id, hook) + suffix
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                lfd = bpfsys.link_create(self.objs[prog], cgfd, atype)
                created.append((hook, lfd))
                bpfsys.obj_pin(lfd, path)
            # The kernel keeps a cgroup's storage across a detach and a
            # new attach: a new attachment counts from zero.
            with contextlib.suppress(OSError):
                bpfsys.map_update(
                    self.objs[loader.MAP_COUNTERS],
                    key,
                    bytes(maps.percpu_value_size(maps.COUNTERS_SIZE)),
                    bpfsys.BPF_EXIST,
                )
            # Until this write the policy storage is zeroed or inactive:
            # an ancestor's policy, if any, still covers the cgroup.
            self.write_policy(key, value)
        except OSError as e:
            for hook, lfd in created:
                with contextlib.suppress(OSError):
                    bpfsys.link_detach(lfd)
                with contextlib.suppress(OSError):
                    os.unlink(self.pins.link_path(cg.id, hook) + suffix)
            close_links(created)
            with contextlib.suppress(OSError):
                bpfsys.map_delete(self.objs[loader.MAP_POLICIES], key)
            raise explain(e, cg) from None
        finally:
            os.close(cgfd)
        if not suffix:
            close_links(created)
            return []
        return created

    def write_policy(self, key: bytes, value: bytes) -> None:
        """The attachment's own storage first (sock_ops), then the hash the
        setsockopt program walks: an ancestor keeps enforcing until both
        say this cgroup has a policy."""
        bpfsys.map_update(self.objs[loader.MAP_POLICY], key, value, bpfsys.BPF_EXIST)
        bpfsys.map_update(self.objs[loader.MAP_POLICIES], key, value)

    # -- nested policies -------------------------------------------------------

    def nesting(
        self, cg: Cgroup, *, skip: int | None = None
    ) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
        """(cgroup id, path) of the ancestors (nearest first) and of the
        descendants of ``cg`` that have an active policy (this version's
        map; ``skip``: one to leave out).  One map lookup per ancestor and
        per descendant directory: the walk is of cg's own subtree only."""

        def live(path: str) -> int | None:
            try:
                ino = os.stat(path).st_ino
            except OSError:
                return None
            if ino == skip:
                return None
            raw = self.raw_policy(ino)
            if raw is None or not maps.policy_raw_flags(raw) & maps.F_ACTIVE:
                return None
            return ino

        ancestors = [(i, p) for p in cg.ancestor_paths() if (i := live(p)) is not None]
        descendants = []
        for dirpath, _dirs, _files in os.walk(cg.path):
            if dirpath != cg.path:
                ino = live(dirpath)
                if ino is not None:
                    descendants.append((ino, dirpath))
        return ancestors, descendants

    def neighbours(self, cg: Cgroup) -> tuple[int, int | None]:
        """Tell the policies above and below ``cg`` that it is getting one
        (step 1 above); returns its own nesting flags and the nearest
        ancestor with a policy."""
        ancestors, descendants = self.nesting(cg)
        for anc, _path in ancestors:
            self.add_flags(anc, maps.F_HAS_DESCENDANT)
        for desc, _path in descendants:
            self.add_flags(desc, maps.F_HAS_ANCESTOR)
        flags = (maps.F_HAS_ANCESTOR if ancestors else 0) | (
            maps.F_HAS_DESCENDANT if descendants else 0
        )
        return flags, ancestors[0][0] if ancestors else None

    def add_flags(self, cgroup_id: int, add: int, drop: int = 0) -> None:
        """Change another attachment's flags (one write per map)."""
        raw = self.raw_policy(cgroup_id)
        if raw is None:
            return
        flags = maps.policy_raw_flags(raw)
        new = (flags | add) & ~drop
        if new != flags:
            with contextlib.suppress(OSError):
                self.write_policy(key_of(cgroup_id), maps.with_flags(raw, new))

    def drop_stale_nesting(self, cg: Cgroup) -> None:
        """After ``cg``'s policy is gone: its nearest ancestor may have no
        descendant with a policy left, its descendants no ancestor.  (A flag
        left set costs time, never correctness: the record it asks for is
        just not needed.)"""
        ancestors, descendants = self.nesting(cg, skip=cg.id)
        if ancestors:
            anc, path = ancestors[0]
            if not self.nesting(Cgroup.at(path, cg.mount, anc), skip=cg.id)[1]:
                self.add_flags(anc, 0, maps.F_HAS_DESCENDANT)
            return  # the descendants keep an ancestor with a policy
        for desc, path in descendants:
            if not self.nesting(Cgroup.at(path, cg.mount, desc), skip=cg.id)[0]:
                self.add_flags(desc, 0, maps.F_HAS_ANCESTOR)

    # -- removed cgroups -------------------------------------------------------

    def prune(self, alive: set[int] | None = None) -> None:
        """Forget attachments whose cgroup was removed (the kernel already
        detached them) and policies left without links.  ``alive``: cgroup
        ids the caller just saw attached, not to be checked again."""
        for cg_id in self.pins.pinned_ids():
            if (alive is None or cg_id not in alive) and not self.pins.link_progs(cg_id):
                detach_id(self.pins, cg_id)
        pinned = self.pins.pinned_ids()
        fd = self.objs[loader.MAP_POLICIES]
        for key, _ in bpfsys.map_items(fd, 8, maps.POLICY_SIZE):
            if _KEY.unpack(key)[0] not in pinned:
                bpfsys.map_delete(fd, key)
        self.collect_peers()


def detach_id(pins: PinDir, cgroup_id: int) -> bool:
    """Take a cgroup's policy out of every version's maps (an ancestor's
    takes over first), then detach and unpin its links.  The pin
    directory's lock is the caller's."""
    key = key_of(cgroup_id)
    found = False
    for obj_dir in pins.obj_dirs():
        with contextlib.suppress(OSError), pins.objects(obj_dir) as objs:
            found |= bpfsys.map_delete(objs[loader.MAP_POLICIES], key)
            _deactivate(objs, key)
            if loader.MAP_SWEEPSTATS in objs:
                bpfsys.map_delete(objs[loader.MAP_SWEEPSTATS], key)
            if loader.MAP_LOSSES in objs:
                _delete_losses(objs[loader.MAP_LOSSES], cgroup_id)
    for hook, _, _ in HOOKS:
        path = pins.link_path(cgroup_id, hook)
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


def _delete_losses(fd: int, cgroup_id: int) -> None:
    """A policy's lost-connection counters go with it."""
    for k in bpfsys.map_keys(fd, maps.LOSS_KEY.size):
        if maps.LOSS_KEY.unpack(k)["owner"] == cgroup_id:
            bpfsys.map_delete(fd, k)


def _deactivate(objs: dict[str, int], key: bytes) -> None:
    """The cgroup's own storage says "no policy" (flags 0) until the kernel
    frees it with the last link."""
    with contextlib.suppress(OSError):
        old = bpfsys.map_lookup(objs[loader.MAP_POLICY], key, maps.POLICY_SIZE)
        if old is not None:
            bpfsys.map_update(
                objs[loader.MAP_POLICY], key, maps.with_flags(old, 0), bpfsys.BPF_EXIST
            )


def close_links(links: list[tuple[str, int]]) -> None:
    for _hook, lfd in links:
        os.close(lfd)


def explain(e: OSError, cg: Cgroup) -> Exception:
    """A refused attachment as the one line to show."""
    if e.errno == errno.EPERM:
        return PermissionProblem(
            f"{cg.display}: the kernel refused the attachment ({e}); another "
            "tool may hold an exclusive (non-multi) program on this cgroup "
            "-- check with bpftool cgroup show " + cg.path
        )
    if e.errno == errno.E2BIG:
        return EnvironmentProblem(f"{cg.display}: 64 programs already attached")
    return EnvironmentProblem(f"{cg.display}: attaching failed: {e}")
