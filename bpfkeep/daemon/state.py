"""What the daemon knows: its config, and one table of the cgroups it knows,
read by the scrape thread under the table's lock."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator

from bpfkeep.config import Config
from bpfkeep.containers import Workload
from bpfkeep.enforcer import Enforcer
from bpfkeep.kernel.cgroups import Cgroup
from bpfkeep.options import Policy

# Entry.attached
NONE, OURS, HAND = "", "ours", "hand"


@dataclasses.dataclass(slots=True)
class Entry:
    """One cgroup the daemon knows of."""

    cgroup: Cgroup
    # OURS: attached by the daemon, with this policy; HAND: attached by
    # hand (bpfkeep attach, no "managed" flag), matched by the config and
    # never modified or detached; NONE: not attached.
    attached: str = NONE
    policy: Policy | None = None
    existing: bool = True  # its rule sweeps the sockets that already exist
    expected: bool = False  # the config gives it a policy
    # A container's cgroup: what its runtime told, or that none knew it
    # (asked again on reload).
    workload: Workload | None = None
    unresolved: bool = False

    def idle(self) -> bool:
        """Nothing worth keeping: the entry can go."""
        return not (self.attached or self.expected or self.workload or self.unresolved)


class Table:
    """The cgroups the daemon knows, by id (and by path).  Writes happen on
    the daemon's loop; every write and the scrape thread's reads hold
    ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._entries: dict[int, Entry] = {}
        self._by_rel: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, cg_id: int) -> Entry | None:
        return self._entries.get(cg_id)

    def entry(self, cg: Cgroup) -> Entry:
        """The entry of ``cg``, made if new (the caller holds the lock).
        The Cgroup first seen is kept: each walk makes new ones, and
        holding both was ~0.5 kB a cgroup."""
        e = self._entries.get(cg.id)
        if e is not None and e.cgroup.rel == cg.rel:
            return e
        if e is None:
            e = self._entries[cg.id] = Entry(cg)
        else:  # the same cgroup at another path (renamed)
            if self._by_rel.get(e.cgroup.rel) == cg.id:
                del self._by_rel[e.cgroup.rel]
            e.cgroup = cg
        self._by_rel[cg.rel] = cg.id
        return e

    def tidy(self, cg_id: int) -> None:
        """Drop the entry if nothing is left in it (the caller holds the lock)."""
        e = self._entries.get(cg_id)
        if e is not None and e.idle():
            del self._entries[cg_id]
            if self._by_rel.get(e.cgroup.rel) == cg_id:
                del self._by_rel[e.cgroup.rel]

    def remove(self, cg_id: int) -> Entry | None:
        with self.lock:
            e = self._entries.pop(cg_id, None)
            if e is not None and self._by_rel.get(e.cgroup.rel) == cg_id:
                del self._by_rel[e.cgroup.rel]
        return e

    def at_or_below(self, rel: str) -> list[int]:
        """Ids of the known cgroups at or below the path ``rel``."""
        return [i for r, i in self._by_rel.items() if r == rel or r.startswith(rel + "/")]

    def items(self) -> list[tuple[int, Entry]]:
        return list(self._entries.items())

    def attached(self, how: str) -> dict[int, Entry]:
        """Id -> entry of the cgroups attached OURS or HAND."""
        return {i: e for i, e in self._entries.items() if e.attached == how}

    def ours(self) -> dict[int, Entry]:
        return self.attached(OURS)

    def is_ours(self, cg_id: int) -> bool:
        e = self._entries.get(cg_id)
        return e is not None and e.attached == OURS

    def count(self, how: str) -> int:
        return sum(1 for e in self._entries.values() if e.attached == how)

    def expected(self) -> Iterator[Entry]:
        return (e for e in self._entries.values() if e.expected)

    def set_expected(self, ids: set[int], cgs: dict[int, Cgroup]) -> None:
        """Exactly these cgroups are what the config gives a policy."""
        with self.lock:
            for i, e in list(self._entries.items()):
                if e.expected and i not in ids:
                    e.expected = False
                    self.tidy(i)
            for i in ids:
                self.entry(cgs[i]).expected = True


@dataclasses.dataclass
class State:
    """The daemon's config, its attachments and its table, shared by the
    collaborators (reconcile, workloads, heal, passes)."""

    config_path: str
    enforcer: Enforcer
    table: Table = dataclasses.field(default_factory=Table)
    cfg: Config | None = None
    mount: str = ""
    errors: int = 0  # reconcile errors, for bpfkeep_reconcile_errors_total
    reconciles: int = 0
