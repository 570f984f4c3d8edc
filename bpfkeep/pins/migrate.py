"""Upgrades without a gap: attachments made by another version of the
programs (another ``obj-V`` set) move to this version's.

For each such cgroup the new links are attached and pinned beside the old
ones (``..._next``; bpffs pins can be added but not renamed), the policy is
written to this version's maps (pins.attach: the same path as any attach),
and only then are the old links detached and the new ones pinned in their
place.  Both versions run for a moment; the old one, attached first,
claims the sockets until it is detached.  A bpfkeep killed halfway leaves
``_next`` pins, which the next one finishes or undoes (recover).
"""

from __future__ import annotations

import contextlib
import os

from bpfkeep.kernel import bpfsys
from bpfkeep.kernel.cgroups import Cgroup, by_ids, cgroup2_mount
from bpfkeep.pins.attach import Writer, close_links, key_of
from bpfkeep.pins.pindir import PinDir
from bpfkeep.progs import loader, maps

NEXT = "_next"


def recover(pins: PinDir) -> None:
    """Finish or undo a migration that a killed bpfkeep left halfway."""
    try:
        names = os.listdir(pins.link_dir)
    except FileNotFoundError:
        return
    for name in names:
        if not name.endswith(NEXT):
            continue
        nxt = os.path.join(pins.link_dir, name)
        canonical = nxt[: -len(NEXT)]
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


def migrate(pins: PinDir) -> None:
    """Move attachments made by other program versions to this one, then
    remove the object sets no attachment uses any more."""
    others = [d for d in pins.obj_dirs() if d != pins.obj_dir]
    if not others:
        return
    owners = pins.prog_owners()
    todo: dict[int, str] = {}
    for cg_id in pins.pinned_ids():
        dirs = {owners.get(pid) for _, pid in pins.link_progs(cg_id).values()}
        old = next((d for d in dirs if d and d != pins.obj_dir), None)
        if old:
            todo[cg_id] = old
    cgs = by_ids(todo, cgroup2_mount()) if todo else {}
    with pins.objects() as cur:
        writer = Writer(pins, cur)
        for cg_id, old_dir in sorted(todo.items()):
            cg = cgs.get(cg_id)
            if cg is not None:
                _move(writer, cg, old_dir)
    in_use = {owners.get(pid) for i in pins.pinned_ids() for _, pid in pins.link_progs(i).values()}
    for obj_dir in others:
        if obj_dir not in in_use:
            for name in os.listdir(obj_dir):
                os.unlink(os.path.join(obj_dir, name))
            os.rmdir(obj_dir)


def _move(writer: Writer, cg: Cgroup, old_dir: str) -> None:
    key = key_of(cg.id)
    with writer.pins.objects(old_dir) as old:
        size = bpfsys.map_info(old[loader.MAP_POLICIES])[3]
        raw = bpfsys.map_lookup(old[loader.MAP_POLICIES], key, size)
        if raw is None:
            return
        decoded = maps.decode_any_policy(raw)
        if decoded is None:
            return  # a layout this version does not know: left running as it is
        _, flags, policy = decoded
        nesting, _nearest = writer.neighbours(cg)
        value = maps.encode_policy(
            cg.id,
            policy,
            level=cg.level,
            managed=bool(flags & maps.F_MANAGED),
            nesting=nesting,
        )
        if len(raw) == maps.POLICY_SIZE:
            # Peer rules: the set is carried over as it is (rules cannot
            # be rebuilt from the kernel's form of them).
            set_id = maps.policy_peers(raw)[0]
            if set_id and _copy_peer_set(old, writer.objs, set_id):
                value = maps.with_peers(value, set_id)
        # What the policy lost and learned goes with it: counters keep
        # counting, and keepidle = "auto" starts from what it knew.
        for name in (loader.MAP_LOSSES, loader.MAP_LEARNED):
            _copy_owned(old, writer.objs, name, cg.id)
        new = writer.link(cg, value, suffix=NEXT)
        try:
            # Both versions run now; the old one (attached first) claims
            # the sockets until it is detached.
            for hook, lfd in new:
                path = writer.pins.link_path(cg.id, hook)
                with contextlib.suppress(OSError):
                    ofd = bpfsys.obj_get(path)
                    try:
                        bpfsys.link_detach(ofd)
                    finally:
                        os.close(ofd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                bpfsys.obj_pin(lfd, path)
                os.unlink(path + NEXT)
            bpfsys.map_delete(old[loader.MAP_POLICIES], key)
        finally:
            close_links(new)


def _copy_peer_set(old: dict[str, int], cur: dict[str, int], set_id: int) -> bool:
    """Copy one peer-rule set from another version's maps; False if their
    layout is not this version's (the rules are then dropped)."""
    if loader.MAP_RULES not in old or loader.MAP_PEERS not in old:
        return False
    if bpfsys.map_info(old[loader.MAP_RULES])[2:] != (
        maps.RULE_KEY.size,
        maps.RULE.size,
    ) or bpfsys.map_info(old[loader.MAP_PEERS])[2:] != (maps.PEER_KEY.size, maps.PEER.size):
        return False
    for name, key_size, value_size, of_set in (
        (loader.MAP_RULES, maps.RULE_KEY.size, maps.RULE.size, maps.rule_key_set),
        (loader.MAP_PEERS, maps.PEER_KEY.size, maps.PEER.size, maps.peer_key_set),
    ):
        for k in bpfsys.map_keys(old[name], key_size):
            if of_set(k) == set_id:
                v = bpfsys.map_lookup(old[name], k, value_size)
                if v is not None:
                    bpfsys.map_update(cur[name], k, v)
    return True


def _copy_owned(old: dict[str, int], cur: dict[str, int], name: str, owner: int) -> None:
    """Copy one policy's entries of a map keyed by its cgroup id first
    (bk_loss_key, bk_path_key) from another version's maps, when the
    layouts are this version's (else they start again)."""
    if name not in old or name not in cur:
        return
    layout = bpfsys.map_info(old[name])[2:4]
    if layout != bpfsys.map_info(cur[name])[2:4]:
        return
    key_size, value_size = layout
    prefix = key_of(owner)
    for k in bpfsys.map_keys(old[name], key_size):
        if k[: len(prefix)] == prefix:
            v = bpfsys.map_lookup(old[name], k, value_size)
            if v is not None:
                with contextlib.suppress(OSError):
                    bpfsys.map_update(cur[name], k, v)
