"""Containers in the daemon: which rule a container's cgroup falls under,
once its runtime has told its name and labels (asked off the loop by
containers.Lookups)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from bpfkeep import containers
from bpfkeep.config import Rule
from bpfkeep.daemon.state import State
from bpfkeep.kernel.cgroups import Cgroup, printable

log = logging.getLogger("bpfkeep")


class Workloads:
    def __init__(self, state: State, lookups: containers.Lookups):
        self.state = state
        self.lookups = lookups
        # What was said once since the start or the last reload: runtimes
        # down ("down:<runtime>"), containers read from a runtime's files.
        self._said: set[str] = set()

    def watches(self, rel: str) -> bool:
        """Watch ``rel`` for new cgroups: a cgroup rule could match below
        it, or (with workload rules) a runtime could put a container there."""
        cfg = self.state.cfg
        assert cfg
        if cfg.watch(rel):
            return True
        return bool(cfg.workload_rules) and containers.may_hold_containers(rel)

    def rule_for(self, cg: Cgroup) -> Rule | None:
        """The rule for a cgroup.  For a container's cgroup with workload
        rules in the config: the runtime is asked (off the loop); until it
        answers only the cgroup rules apply, and the answer attaches the
        policy and sweeps the sockets made meanwhile (results)."""
        cfg = self.state.cfg
        assert cfg
        if not cfg.workload_rules:
            return cfg.policy_for(cg.rel)
        e = self.state.table.get(cg.id)
        workload = e.workload if e is not None else None
        if workload is None and not (e is not None and e.unresolved):
            self.lookups.submit(cg.id, cg.rel, cg.path)
        return cfg.workload_rule(cg.rel, workload)

    def asking(self, cg_id: int) -> bool:
        return self.lookups.is_pending(cg_id)

    def results(self) -> list[tuple[Cgroup, Rule | None]]:
        """The containers the runtimes answered for since the last call,
        each with the rule it now falls under (None: none)."""
        cfg, table = self.state.cfg, self.state.table
        assert cfg
        out = []
        self._say_down()
        for cg_id, rel, res in self.lookups.results():
            path = os.path.join(self.state.mount, rel)
            try:
                if os.stat(path).st_ino != cg_id:
                    continue  # removed (and maybe made again) meanwhile
            except OSError:
                continue
            cg = Cgroup(path, rel, cg_id)
            if res.workload is None:
                with table.lock:
                    table.entry(cg).unresolved = True
                why = "; ".join(res.problems) or "no runtime knows it"
                # A runtime down was warned about once already: its
                # containers are counted, not each warned about again.
                said = res.down and all(f"down:{r}" in self._said for r in res.down)
                (log.info if said else log.warning)(
                    "/%s: container not found by any runtime after %.0f s (%s); its workload "
                    "rules apply after a reload ([containers] in the config says where the "
                    "runtimes are)",
                    printable(rel),
                    containers.GIVE_UP_AFTER,
                    why,
                )
                continue
            w = res.workload
            if res.via:
                self._once(f"via:{w.runtime}", log.info, "%s", res.via)
            if res.missing:
                self._once(
                    f"missing:{w.runtime}",
                    log.warning,
                    "%s containers' labels cannot be read (%s): rules with labels or pod do not "
                    "match them, rules with container names do; fix: %s",
                    w.runtime,
                    res.missing,
                    containers.FIX.get(w.runtime, "see [containers] in the config"),
                )
            with table.lock:
                table.entry(cg).workload = w
            rule = cfg.workload_rule(rel, w)
            if rule is not None:
                log.info(
                    "container %s (%s, /%s): policy[%d]",
                    printable(w.name or w.id[:12]),
                    w.runtime,
                    printable(rel),
                    rule.index,
                )
            out.append((cg, rule))
        return out

    def forget(self, gone: Callable[[int, str], bool]) -> None:
        """Forget what the runtimes told of the cgroups ``gone(id, rel)``
        picks, and stop asking about them."""
        table = self.state.table
        with table.lock:
            for i, e in table.items():
                if (e.workload or e.unresolved) and gone(i, e.cgroup.rel):
                    e.workload, e.unresolved = None, False
                    table.tidy(i)
        self.lookups.cancel(gone)

    def _say_down(self) -> None:
        """One warning for each runtime found down while a container needs
        it, at its first try: workload rules cannot apply meanwhile."""
        whys: dict[str, list[str]] = {}  # runtime -> why, for each container waiting
        for res in self.lookups.down().values():
            for runtime, why in res.down.items():
                whys.setdefault(runtime, []).append(why)
        for runtime, found in sorted(whys.items()):
            self._once(
                f"down:{runtime}",
                log.warning,
                "%s cannot be asked about containers (%s): %d container(s) not identified so "
                "far, and workload rules do not apply to them until it can "
                "(bpfkeep_containers_unidentified counts them); fix: %s",
                runtime,
                found[0],
                len(found),
                containers.FIX.get(runtime, "see [containers] in the config"),
            )

    def _once(self, what: str, say: Callable[..., None], *args: object) -> None:
        if what not in self._said:
            self._said.add(what)
            say(*args)

    def unidentified(self) -> int:
        """Container cgroups seen that no runtime identified: given up on,
        or waiting for a runtime that is down (the caller holds the table's
        lock)."""
        given_up = sum(1 for _, e in self.state.table.items() if e.unresolved)
        return given_up + len(self.lookups.down())

    def ask_again(self) -> None:
        """After a reload: the containers no runtime knew are asked again,
        and a runtime still down is warned about again."""
        self._said.clear()
        table = self.state.table
        with table.lock:
            for i, e in table.items():
                if e.unresolved:
                    e.unresolved = False
                    table.tidy(i)

    def labels(self) -> dict[str, dict[str, str]]:
        """cgroup label -> workload labels of the attached containers (the
        caller holds the table's lock)."""
        return {
            e.cgroup.display: e.workload.metric_labels()
            for e in (e for _, e in self.state.table.items())
            if e.workload is not None and e.attached
        }
