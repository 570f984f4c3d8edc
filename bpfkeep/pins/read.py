"""Reading the attachments back from bpffs and the kernel: what ``status``
shows, what the daemon adopts and compares, what the metrics count.
Everything here is right after any restart of any bpfkeep process."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Iterable

from bpfkeep.kernel import bpfsys
from bpfkeep.kernel.cgroups import Cgroup, by_ids, cgroup2_mount
from bpfkeep.options import Policy
from bpfkeep.peers import ANY, Network, Peer, parse_network, show_network
from bpfkeep.pins.attach import key_of
from bpfkeep.pins.pindir import PinDir
from bpfkeep.progs import loader, maps


@dataclasses.dataclass
class Attachment:
    cgroup_id: int
    cgroup: Cgroup | None  # None: the cgroup was removed
    policy: Policy | None
    counters: maps.Counters | None
    link_ids: dict[str, int]
    prog_ids: dict[str, int]
    managed: bool = False
    losses: dict[str, maps.Losses] = dataclasses.field(default_factory=dict)  # by peer label
    # keepidle = "auto": what was learned of each path (the peer rule's
    # label, or the network learned for).
    learned: dict[str, maps.Learned] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "cgroup": self.cgroup.display if self.cgroup else None,
            "cgroup_id": self.cgroup_id,
            "policy": self.policy.as_dict() if self.policy else None,
            "counters": self.counters.as_dict() if self.counters else None,
            "lost_connections": {p: ls.as_dict() for p, ls in sorted(self.losses.items())},
            "learned": {p: dataclasses.asdict(v) for p, v in sorted(self.learned.items())},
            "links": self.link_ids,
            "programs": self.prog_ids,
            "managed_by_daemon": self.managed,
        }


def counters(map_fd: int, cgroup_id: int) -> maps.Counters | None:
    """One cgroup's per-CPU counters, summed; None if it has none."""
    with contextlib.suppress(OSError):
        raw = bpfsys.map_lookup(
            map_fd, key_of(cgroup_id), maps.percpu_value_size(maps.COUNTERS_SIZE)
        )
        if raw is not None:
            return maps.decode_counters(raw)
    return None


def sweepstats(map_fd: int, cgroup_id: int) -> maps.SweepStats | None:
    with contextlib.suppress(OSError):
        raw = bpfsys.map_lookup(map_fd, key_of(cgroup_id), maps.SWEEPSTATS_SIZE)
        if raw is not None:
            return maps.SweepStats.decode(raw)
    return None


def enforce_counts(
    bypassed_fd: int | None, repaired_fd: int | None, cgroup_id: int
) -> maps.EnforceCounts | None:
    """What the cgroup hook did not see of one policy, and the repairs
    (pins of an older program version may have neither map: None)."""
    if bypassed_fd is None or repaired_fd is None:
        return None
    raws = []
    for fd, layout in ((bypassed_fd, maps.BYPASSED), (repaired_fd, maps.REPAIRED)):
        raw = None
        with contextlib.suppress(OSError):
            raw = bpfsys.map_lookup(fd, key_of(cgroup_id), layout.size)
        raws.append(raw)
    return maps.decode_enforce_counts(*raws)


def policy_value(pins: PinDir, cgroup_id: int) -> bytes | None:
    """One cgroup's raw entry in this version's policy hash, or None."""
    with pins.one(loader.MAP_POLICIES) as fd:
        if fd is None:
            return None
        return bpfsys.map_lookup(fd, key_of(cgroup_id), maps.POLICY_SIZE)


def policy_values(pins: PinDir) -> dict[int, bytes]:
    """Cgroup id -> raw bk_policy for every entry of this version's policy
    hash, read in one BPF_MAP_LOOKUP_BATCH per 4,096 entries (two bpf()
    calls an entry before)."""
    with pins.one(loader.MAP_POLICIES) as fd:
        if fd is None:
            return {}
        items = bpfsys.map_items(fd, 8, maps.POLICY_SIZE)
    return {int.from_bytes(k, sys.byteorder): v for k, v in items}


def storage_values(pins: PinDir, ids: Iterable[int]) -> dict[int, bytes]:
    """Cgroup id -> raw bk_policy in each cgroup's own storage, what its
    programs read (one lookup each: cgroup storage has no batch
    operations).  A cgroup without bpfkeep programs has none."""
    out = {}
    with pins.one(loader.MAP_POLICY) as fd:
        if fd is None:
            return {}
        for i in ids:
            with contextlib.suppress(OSError):
                raw = bpfsys.map_lookup(fd, key_of(i), maps.POLICY_SIZE)
                if raw is not None:
                    out[i] = raw
    return out


def read_counters(pins: PinDir, ids: Iterable[int]) -> dict[int, maps.Counters]:
    """Counters of these cgroups (this version's maps).  The kernel frees a
    cgroup's storage with its last bpfkeep link, so a missing entry also
    means the policy is no longer attached.  Two lookups a cgroup (cgroup
    storage has no batch operations): a scrape of 10,000 cgroups makes
    20,000, each into one buffer per map.  The enforce counts are hash maps
    holding only the policies that saw something: each read whole, in
    batches."""
    found = {}
    with contextlib.ExitStack() as stack:
        fd, sfd, bfd, rfd = (
            stack.enter_context(pins.one(n))
            for n in (
                loader.MAP_COUNTERS,
                loader.MAP_SWEEPSTATS,
                loader.MAP_BYPASSED,
                loader.MAP_REPAIRED,
            )
        )
        if fd is None:
            return {}
        read = bpfsys.map_reader(fd, maps.percpu_value_size(maps.COUNTERS_SIZE))
        read_sweep = bpfsys.map_reader(sfd, maps.SWEEPSTATS_SIZE) if sfd is not None else None
        # (Pins of an older program version may have neither map: no counts.)
        enforce = None
        if bfd is not None and rfd is not None:
            enforce = [
                dict(_items(map_fd, layout.size))
                for map_fd, layout in ((bfd, maps.BYPASSED), (rfd, maps.REPAIRED))
            ]
        for i in ids:
            key = key_of(i)
            try:
                raw = read(key)
                sraw = read_sweep(key) if raw is not None and read_sweep else None
            except OSError:
                continue
            if raw is not None:
                c = found[i] = maps.decode_counters(raw)
                c.sweep = maps.SweepStats.decode(sraw) if sraw is not None else None
                if enforce is not None:
                    bypassed, repaired = enforce
                    c.enforce = maps.decode_enforce_counts(bypassed.get(key), repaired.get(key))
    return found


def _items(map_fd: int, value_size: int) -> list[tuple[bytes, bytes]]:
    """A hash map keyed by cgroup id, whole (nothing if it cannot be read,
    as a failed lookup reads nothing)."""
    try:
        return bpfsys.map_items(map_fd, 8, value_size)
    except OSError:
        return []


def peer_rule_sets(objs: dict[str, int]) -> dict[int, tuple[Peer, ...]]:
    """Every peer-rule set read back from the kernel, by set id: each
    rule's address and ports, values, and the addresses it applies to (a
    host name's as resolved when it was written).  Both maps read whole,
    once, however many policies share them."""
    if loader.MAP_RULES not in objs or loader.MAP_PEERS not in objs:
        return {}
    rules: dict[tuple[int, int], Peer] = {}  # (set, rule number) -> rule
    for k, raw in bpfsys.map_items(objs[loader.MAP_RULES], maps.RULE_KEY.size, maps.RULE.size):
        _flags, _tag, ports, address, values = maps.decode_rule(raw)
        num = int(maps.RULE_KEY.unpack(k)["rule"])  # type: ignore[arg-type]
        rules[(maps.rule_key_set(k), num)] = Peer(address, ports, values)
    nets: dict[tuple[int, int], list] = {r: [] for r in rules}
    for k, v in bpfsys.map_items(objs[loader.MAP_PEERS], maps.PEER_KEY.size, maps.PEER.size):
        set_id, net = maps.peer_key_set(k), maps.peer_key_network(k)
        for num in maps.decode_peer(v):
            p = rules.get((set_id, num))
            own = parse_network(p.address) if p else None
            if p is not None and (own == net or (own is None and net.prefixlen == 128)):
                nets[(set_id, num)].append(net)
    out: dict[int, list[Peer]] = {}
    for r in sorted(rules):
        out.setdefault(r[0], []).append(
            dataclasses.replace(rules[r], networks=tuple(sorted(nets[r])))
        )
    return {set_id: tuple(ps) for set_id, ps in out.items()}


def attachments(pins: PinDir, paths: dict[int, Cgroup] | None = None) -> list[Attachment]:
    """Every cgroup with a bpfkeep policy, read from bpffs and the kernel,
    whichever program version it is attached with.  ``paths`` saves the
    walk of the cgroup tree when the caller already knows where the
    cgroups are (the daemon)."""
    ids = sorted(pins.pinned_ids())
    if not ids:
        return []
    cgs = dict(paths or {})
    missing = [i for i in ids if i not in cgs]
    if missing:
        cgs.update(by_ids(missing, cgroup2_mount()))
    out = []
    owners = pins.prog_owners()
    with contextlib.ExitStack() as stack:
        opened: dict[str, dict[str, int] | None] = {}
        rule_sets: dict[str, dict[int, tuple[Peer, ...]]] = {}  # by obj_dir, read when needed

        def objects_of(obj_dir: str | None) -> dict[str, int] | None:
            if obj_dir is None:
                return None
            if obj_dir not in opened:
                try:
                    opened[obj_dir] = stack.enter_context(pins.objects(obj_dir))
                except OSError:
                    opened[obj_dir] = None
            return opened[obj_dir]

        for cg_id in ids:
            lp = pins.link_progs(cg_id)
            links = {h: lid for h, (lid, _) in lp.items()}
            progs = {h: pid for h, (_, pid) in lp.items()}
            owner = next((owners.get(p) for p in progs.values() if p in owners), None)
            obj_dir = owner or (pins.obj_dir if not lp else None)
            objs = objects_of(obj_dir)
            policy = found = None
            managed = False
            if objs is not None:
                size = bpfsys.map_info(objs[loader.MAP_POLICIES])[3]
                raw = bpfsys.map_lookup(objs[loader.MAP_POLICIES], key_of(cg_id), size)
                decoded = maps.decode_any_policy(raw) if raw is not None else None
                if decoded is not None:
                    _, flags, policy = decoded
                    managed = bool(flags & maps.F_MANAGED)
                    set_id = maps.policy_peers(raw)[0] if len(raw) == maps.POLICY_SIZE else 0  # type: ignore[arg-type]
                    if set_id:
                        assert obj_dir is not None  # (objs came from it)
                        if obj_dir not in rule_sets:
                            rule_sets[obj_dir] = peer_rule_sets(objs)
                        policy = policy.with_peers(rule_sets[obj_dir].get(set_id, ()))
                found = counters(objs[loader.MAP_COUNTERS], cg_id)
                if found is not None and loader.MAP_SWEEPSTATS in objs:
                    found.sweep = sweepstats(objs[loader.MAP_SWEEPSTATS], cg_id)
                if found is not None:
                    found.enforce = enforce_counts(
                        objs.get(loader.MAP_BYPASSED), objs.get(loader.MAP_REPAIRED), cg_id
                    )
            out.append(Attachment(cg_id, cgs.get(cg_id), policy, found, links, progs, managed))
    lost = losses(pins, ids)
    paths = learned(pins)
    by_id = {a.cgroup_id: a for a in out}
    for a in out:
        a.losses = lost.get(a.cgroup_id, {})
    for key, got in paths.items():
        owner, tag, plen, net = maps.decode_path_key(key)
        a = by_id.get(owner)
        if a is None or a.policy is None:
            continue
        if tag == 0:
            label = show_network(Network((net, plen)))
        else:
            rule = next((r for r in a.policy.peers if maps.rule_tag(r.label) == tag), None)
            if rule is None:
                continue  # a rule the policy no longer has
            label = rule.label
        a.learned[label] = got
    return out


def rule_labels(objs: dict[str, int]) -> dict[tuple[int, int], str]:
    """(peer-rule set, rule tag) -> the rule's label, for every set."""
    out = {}
    if loader.MAP_RULES not in objs:
        return out
    for k, raw in bpfsys.map_items(objs[loader.MAP_RULES], maps.RULE_KEY.size, maps.RULE.size):
        _flags, tag, ports, address, _values = maps.decode_rule(raw)
        out[(maps.rule_key_set(k), tag)] = Peer(address, ports).label
    return out


def losses(pins: PinDir, ids: Iterable[int] | None = None) -> dict[int, dict[str, maps.Losses]]:
    """Policy cgroup id -> peer label ("*": the policy's own values) -> its
    lost connections, for these cgroups (None: all).  Counters of rules a
    policy no longer has are left out."""
    wanted = None if ids is None else set(ids)
    out: dict[int, dict[str, maps.Losses]] = {}
    with contextlib.suppress(OSError), pins.objects() as objs:
        raw = bpfsys.map_items(objs[loader.MAP_LOSSES], maps.LOSS_KEY.size, maps.LOSSES.size)
        if not raw:
            return out
        labels: dict[tuple[int, int], str] | None = None
        sets: dict[int, int] = {}
        for k, v in raw:
            owner, tag = maps.loss_key_of(k)
            if wanted is not None and owner not in wanted:
                continue
            if tag == 0:
                label = ANY
            else:
                if owner not in sets:
                    p = bpfsys.map_lookup(
                        objs[loader.MAP_POLICIES], key_of(owner), maps.POLICY_SIZE
                    )
                    sets[owner] = maps.policy_peers(p)[0] if p is not None else 0
                if labels is None:
                    labels = rule_labels(objs)
                found = labels.get((sets[owner], tag))
                if found is None:
                    continue  # a rule the policy no longer has
                label = found
            got = maps.Losses.decode(v)
            mine = out.setdefault(owner, {})
            if label in mine:
                mine[label].merge(got)
            else:
                mine[label] = got
    return out


def learned(pins: PinDir) -> dict[bytes, maps.Learned]:
    """bk_path_key -> what the daemon learned of that path's idle limit."""
    with pins.one(loader.MAP_LEARNED) as fd:
        if fd is None:
            return {}
        items = bpfsys.map_items(fd, maps.PATH_KEY.size, maps.LEARNED.size)
    return {k: maps.Learned.decode(v) for k, v in items}
