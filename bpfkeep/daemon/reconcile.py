"""Making the kernel match the config: attach, update and detach what the
rules say, for the whole tree (full) or below one directory (scan), and
what follows from inotify's events and the runtimes' answers.

Attachments made by hand (``bpfkeep attach``: links with no entry, or an
entry without the daemon's flag) are the operator's: left exactly as they
are, even when a rule matches their cgroup.
"""

from __future__ import annotations

import contextlib
import logging
import os

from bpfkeep import peers, runner
from bpfkeep.config import Rule
from bpfkeep.daemon.passes import Passes
from bpfkeep.daemon.scheduler import Retries
from bpfkeep.daemon.state import HAND, NONE, OURS, State
from bpfkeep.daemon.watch import Tree
from bpfkeep.daemon.workloads import Workloads
from bpfkeep.errors import BpfkeepError
from bpfkeep.kernel import inotify as ino
from bpfkeep.kernel.cgroups import Cgroup, printable
from bpfkeep.options import Policy
from bpfkeep.pins.attach import Writer
from bpfkeep.pins.pindir import fully_attached
from bpfkeep.progs import maps

log = logging.getLogger("bpfkeep")

LOG_EACH = 20  # changes of one kind in one reconcile logged a line each; beyond, one line


class Reconciler:
    def __init__(
        self, state: State, tree: Tree, workloads: Workloads, passes: Passes, retries: Retries
    ):
        self.state = state
        e = state.enforcer
        self.pin_dirs = (e.pin_dir, e.link_dir, e.obj_dir)  # watched by the healer
        self.resolver = peers.Resolver()
        self._canonical = Canonical()
        self._names_failing: set[str] = set()
        self.tree = tree
        self.workloads = workloads
        self.passes = passes
        self.retries = retries
        # What a full reconcile attached and updated: (what, cgroup, mode),
        # logged at its end (log_changes); None outside one.
        self._changes: list[tuple[str, str, str]] | None = None

    # -- errors ---------------------------------------------------------------------

    def failed(self, path: str | None, what: str, err: object) -> None:
        """Log and count an error, and walk ``path`` again later (backoff)."""
        self.state.errors += 1
        delay = self.retries.later(path)
        log.error("%s: %s (trying again in %.0f s)", what, err, delay)

    def walk_failed(self, path: str, e: OSError) -> None:
        self.failed(path, f"walking the cgroup tree at {printable(path)}", e.strerror or e)

    # -- the whole tree -------------------------------------------------------------

    def full(self, prune: bool = False, sweep_all: bool = False, report: bool = False) -> None:
        """Walk the directories that can hold matches (watching them), then
        make the kernel match the config.

        The kernel's side is read in bulk -- the policy hash in one batch,
        each cgroup's own storage with one lookup -- and compared as bytes:
        a cgroup whose policy is the config's in both maps costs no write
        (a reload that changes nothing writes nothing), and an entry
        changed by hand (bpftool) is written again.  A changed policy is
        written in place: each cgroup's storage, then the hash in one batch.

        ``prune``: also forget the pins of cgroups removed while no daemon
        watched (at start, and after inotify lost events); at run time their
        removal is seen.  ``sweep_all``: sweep every matching cgroup's
        existing sockets afterwards (at start); otherwise only those
        attached or changed now, or whose rule now asks for it.
        ``report``: log the cgroup rules that give no cgroup a policy (at
        start and after a reload: see unmatched)."""
        state, table, enforcer = self.state, self.state.table, self.state.enforcer
        failures = self.tree.failures
        desired: dict[int, tuple[Cgroup, Rule]] = {}
        seen: set[int] = set()
        asking: set[int] = set()  # containers whose runtime has not answered yet
        rels: list[str] = []  # what the walk saw, for report
        for cg in self.tree.walk(state.mount):
            seen.add(cg.id)
            if report:
                rels.append(cg.rel)
            rule = self.workloads.rule_for(cg)
            if rule is None and self.workloads.asking(cg.id):
                asking.add(cg.id)
            if rule:
                desired[cg.id] = (cg, rule)
        # Adopt what a previous daemon left (it kept working all along);
        # leave alone what was attached by hand.
        entries = enforcer.policy_values()
        pins = enforcer.link_pins()
        ours = [i for i in desired if i in entries and maps.managed_of(entries[i]) and i in pins]
        stored = enforcer.storage_values(ours)
        table.set_expected(set(desired), {i: cg for i, (cg, _) in desired.items()})
        sweep: list[Cgroup] = []
        self._changes = []
        try:
            # (Nothing to attach: no lock, and no loading of the programs.)
            batching = enforcer.batch() if desired else contextlib.nullcontext()
            with batching as batch:
                for cg_id, (cg, rule) in desired.items():
                    before = table.get(cg_id)
                    was = (before.attached, before.existing) if before else (NONE, True)
                    raw, own = entries.get(cg_id), stored.get(cg_id)
                    wrote = self.ensure(cg, rule, raw, own, pins.get(cg_id, set()), batch)
                    if not rule.existing or not table.is_ours(cg_id):
                        continue
                    if sweep_all or wrote or was[0] != OURS or not was[1]:
                        sweep.append(cg)
        finally:
            changes, self._changes = self._changes, None
            log_changes(changes)
        owned = {i for i, raw in entries.items() if maps.managed_of(raw) and i in pins}
        if self.tree.failures == failures:
            # Only a complete walk tells what the config no longer wants.
            # A container's attachment stays while its runtime is asked (at
            # start: what the previous daemon attached keeps working); the
            # answer decides (answered).
            for cg_id in (owned | set(table.ours())) - set(desired) - asking:
                self.forget(cg_id, "unwanted" if cg_id in owned else "released")
            self.workloads.forget(lambda i, _rel: i not in seen)
            self.retries.done(None)
        else:
            self.retries.later(None)
        with table.lock:
            for cg_id in set(table.attached(HAND)) - set(desired):
                table.get(cg_id).attached = NONE  # type: ignore[union-attr]
                table.tidy(cg_id)
        if prune:
            try:
                enforcer.prune(alive=table.ours())
            except (OSError, BpfkeepError) as e:
                state.errors += 1
                log.warning("pruning removed cgroups' pins failed: %s", e)
        with contextlib.suppress(OSError, BpfkeepError):
            runner.reap_stale_runs()  # what killed `bpfkeep run`s left behind
        # At start, after adoption and after a reload: the sockets that
        # exist carry the policies too (idempotent: sockets already under
        # their policy are left alone).
        self.passes.sweep(sweep)
        state.reconciles += 1
        if report:
            self.unmatched(rels, {rule.index for _, rule in desired.values()})

    def unmatched(self, rels: list[str], chosen: set[int]) -> None:
        """Log each cgroup rule that gives none of the cgroups ``rels`` its
        policy: one that matches none yet, with where the daemon watches for
        one, and one whose matches all take an earlier rule.  ``chosen``:
        the rules that gave some cgroup its policy.  (A rule for a service
        that does not exist on this host, or a path that is not what
        /proc/PID/cgroup shows, was otherwise silent: "enforcing 0
        cgroup(s)".)  Beyond LOG_EACH such rules, one line counts the rest:
        each costs a pass over the cgroups below its plain prefix."""
        cfg = self.state.cfg
        assert cfg
        idle = [rule for rule in cfg.rules if rule.index not in chosen]
        for rule in idle[:LOG_EACH]:
            name = f'policy[{rule.index}] (cgroup "{printable(rule.pattern)}")'
            prefix = "/".join(rule.plain_prefix())
            below = [r for r in rels if r.startswith(prefix + "/") or r == prefix]
            if any(rule.matches(r) for r in (below if prefix else rels)):
                log.warning(
                    "%s gives no cgroup a policy: an earlier rule matches its cgroups", name
                )
                continue
            where, rest = self.tree.watched_for(rule)
            log.warning(
                "%s matches no cgroup yet; watching %s%s",
                name,
                printable(where),
                f" for {printable(rest)}" if rest else "",
            )
        if len(idle) > LOG_EACH:
            log.warning("... and %d more rules that give no cgroup a policy", len(idle) - LOG_EACH)

    # -- below one directory --------------------------------------------------------

    def scan(self, top: str, fresh: list[Cgroup] | None = None) -> None:
        """Attach what a rule matches at or below ``top`` (a new directory,
        or one whose walk or attach failed before), then sweep them -- or,
        given ``fresh``, add them there for the caller to sweep at once."""
        mine = fresh is None
        fresh = [] if fresh is None else fresh
        enforcer, table = self.state.enforcer, self.state.table
        for cg in self.tree.walk(top):
            rule = self.workloads.rule_for(cg)
            if not rule:
                continue
            with table.lock:
                table.entry(cg).expected = True
            try:
                raw = enforcer.policy_value(cg.id)
                hooks = enforcer.pinned_hooks(cg.id)
                stored = enforcer.storage_values([cg.id]).get(cg.id) if hooks else None
            except OSError as e:
                self.failed(cg.path, cg.display, e)
                continue
            self.ensure(cg, rule, raw, stored, hooks)
            if rule.existing and table.is_ours(cg.id):
                fresh.append(cg)
        if mine:
            self.passes.sweep_new(fresh)

    def events(self) -> bool:
        """What inotify saw: new cgroups attached (and swept at once, one
        sweep for a burst), removed ones forgotten; a rename or a lost
        event (overflow) starts over with a full reconcile.  Returns
        whether something under the pin directory went (the healer's)."""
        rescan = pins = False
        fresh: list[Cgroup] = []
        for path, mask, name in self.tree.inotify.events():
            if path is None:
                rescan = True  # overflow: start over
                continue
            if path in self.pin_dirs:
                pins = True
                continue
            if mask & (ino.IN_MOVED_FROM | ino.IN_MOVED_TO):
                rescan = True  # rename: start over
                continue
            if not mask & ino.IN_ISDIR:
                continue
            child = os.path.join(path, name)
            if mask & ino.IN_CREATE:
                self.scan(child, fresh)
            elif mask & ino.IN_DELETE:
                self.removed(self.tree.rel(child))
        self.passes.sweep_new([cg for cg in fresh if self.state.table.is_ours(cg.id)])
        if rescan:
            self.full(prune=True)
        return pins

    def removed(self, rel: str) -> None:
        """The cgroup at ``rel`` and what was below it are gone."""
        table = self.state.table
        for cg_id in table.at_or_below(rel):
            e = table.get(cg_id)
            if e is not None and e.attached:
                log.info("cgroup /%s removed; forgetting it", printable(rel))
                self.forget(cg_id, "removed")
            elif e is not None:
                with table.lock:
                    e.expected = False
                    table.tidy(cg_id)
        self.workloads.forget(lambda _i, r: r == rel or r.startswith(rel + "/"))

    def answered(self) -> None:
        """The runtimes' answers: a container a rule now selects is attached
        and its sockets swept; one no rule selects loses the attachment a
        previous daemon made for it (kept while its runtime was asked)."""
        for cg, rule in self.workloads.results():
            if rule is not None:
                self.scan(cg.path)
                continue
            try:
                entry = self.state.enforcer.policy_entry(cg.id)
                managed = entry is not None and entry[1] and self.state.enforcer.pinned_hooks(cg.id)
            except OSError as e:
                self.failed(cg.path, cg.display, e)
                continue
            if managed or self.state.table.is_ours(cg.id):
                self.forget(cg.id, "unwanted")

    # -- one cgroup -------------------------------------------------------------------

    def ensure(
        self,
        cg: Cgroup,
        rule: Rule,
        raw: bytes | None,
        stored: bytes | None,
        hooks: set[str],
        batch: Writer | None = None,
    ) -> bool:
        """Attach or update unless what is in force already matches; True if
        it wrote.

        ``raw`` is the cgroup's entry in the policy hash, ``stored`` its own
        storage's, ``hooks`` those with a link pinned.  Links with no entry,
        or an entry without the daemon's flag, are an attachment made by
        hand: the operator's, left exactly as it is."""
        table = self.state.table
        if hooks and (raw is None or not maps.managed_of(raw)):
            self._leave_alone(cg, maps.policy_or_none(raw))
            return False
        e = table.get(cg.id)
        if e is not None and e.attached == HAND:
            with table.lock:
                e.attached = NONE
            log.info("%s: the hand-made attachment is gone; the daemon manages it", cg.display)
        attached = fully_attached(hooks)
        policy = self.policy_of(rule)
        if (
            attached
            and maps.policy_is(raw, cg.id, cg.level, policy)
            and maps.policy_is(stored, cg.id, cg.level, policy)
        ):
            self.remember(cg, policy, rule.existing)
            return False
        return self.attach(cg, policy, rule.existing, batch, update=attached)

    # -- host names in peer rules -----------------------------------------------------

    def policy_of(self, rule: Rule) -> Policy:
        """The rule's policy with its peer rules' host names resolved (the
        addresses known now; a name that does not resolve applies to no
        peer until it does: one warning, then it is tried again), as the
        one object every equal policy is (Canonical)."""
        return self._canonical(
            peers.resolve_names(rule.policy, self.resolver, self._unresolved_name)
        )

    def _unresolved_name(self, name: str, why: str) -> None:
        if name not in self._names_failing:
            self._names_failing.add(name)
            log.warning(
                "peer rule %s: the name does not resolve (%s); its rule applies to no peer "
                "until it does (tried again every %.0f s)",
                name,
                why,
                self.resolver.ttl,
            )

    def refresh_names(self) -> None:
        """Host names resolved again (their addresses kept HOST_TTL): each
        policy whose peers' addresses changed is updated in place, and its
        connections swept to it."""
        table, changed = self.state.table, []
        for name in list(self._names_failing):
            if self.resolver.networks(name)[1] is None:
                self._names_failing.discard(name)
                log.info("peer rule %s: the name resolves again", name)
        for _cg_id, e in list(table.ours().items()):
            if e.policy is None or not any(p.is_name for p in e.policy.peers):
                continue
            rule = self.workloads.rule_for(e.cgroup)
            if rule is None:
                continue
            policy = self.policy_of(rule)
            updated = policy != e.policy and self.attach(e.cgroup, policy, e.existing, update=True)
            if updated and e.existing:
                changed.append(e.cgroup)
        self.passes.sweep(changed)

    def attach(
        self,
        cg: Cgroup,
        policy: Policy,
        existing: bool = True,
        batch: Writer | None = None,
        *,
        update: bool = False,
    ) -> bool:
        """Attach, or with ``update`` (links in place) write the policy in
        place -- in ``batch`` if given; an update that finds no program
        attached attaches."""
        try:
            if batch is None:
                what = self.state.enforcer.attach(cg, policy, managed=True, prune=False)
            elif update and batch.update(cg, policy):
                what = "updated"
            else:
                what = batch.attach(cg, policy, managed=True)
        except (BpfkeepError, OSError) as e:
            if not os.path.isdir(cg.path):
                return False  # gone meanwhile
            self.failed(cg.path, cg.display, e)
            return False
        self.remember(cg, policy, existing)
        if self._changes is not None:
            self._changes.append((what, cg.display, policy.mode))
        else:
            log.info("%s %s (%s)", what, cg.display, policy.mode)
        return True

    def remember(self, cg: Cgroup, policy: Policy, existing: bool = True) -> None:
        table = self.state.table
        e = table.get(cg.id)
        if (
            e is not None
            and e.cgroup == cg
            and e.attached == OURS
            and e.policy == policy
            and e.existing == existing
        ):
            return
        with table.lock:
            e = table.entry(cg)
            e.attached, e.policy, e.existing = OURS, policy, existing

    def _leave_alone(self, cg: Cgroup, policy: Policy | None) -> None:
        table = self.state.table
        e = table.get(cg.id)
        if e is None or e.attached != HAND:
            log.warning(
                "%s: has a policy attached by hand (bpfkeep attach); the daemon leaves it "
                "alone (bpfkeep detach --cgroup %s lets the daemon manage it)",
                cg.display,
                cg.display,
            )
        with table.lock:
            e = table.entry(cg)
            e.attached, e.policy, e.existing = HAND, policy, True

    def forget(self, cg_id: int, why: str) -> None:
        """Stop tracking a cgroup.  ``why``: "unwanted" (ours, and the config
        no longer matches it: detach), "removed" (the cgroup is gone: the
        kernel took its programs, drop our pins), "released" (no longer
        ours: touch nothing)."""
        table = self.state.table
        with table.lock:
            e = table.get(cg_id)
            was = e.attached if e is not None else NONE
            if e is not None:
                e.attached, e.policy, e.expected = NONE, None, False
                table.tidy(cg_id)
        if was == HAND or why == "released":
            return
        try:
            if self.state.enforcer.detach_id(cg_id) and why == "unwanted":
                log.info("detached %s (no longer in the config)", e.cgroup.display if e else cg_id)
        except (BpfkeepError, OSError) as err:
            self.failed(None, f"detach cgroup id {cg_id}", err)


class Canonical:
    """One object for each distinct policy, kept across reloads.  Each load
    of the config makes new Policy objects, equal to the last ones; two
    with 10 peer rules compare in ~40 us, rule by rule -- per cgroup in
    every cache keyed by policy (maps' encodings and peer-rule sets, the
    table's remember).  The same object compares at once.  Looked up by
    identity first: one full comparison per distinct object."""

    LIMIT = 16384  # distinct policies kept (BK_MAX_POLICIES); beyond, start over

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[Policy, Policy]] = {}  # id -> (policy, its one object)
        self._equal: dict[Policy, Policy] = {}

    def __call__(self, policy: Policy) -> Policy:
        hit = self._by_id.get(id(policy))
        if hit is not None and hit[0] is policy:
            return hit[1]
        if len(self._by_id) >= self.LIMIT:
            self._by_id.clear()  # (it holds the policies of earlier loads)
        if len(self._equal) >= self.LIMIT:
            self._equal.clear()
        one = self._equal.setdefault(policy, policy)
        self._by_id[id(policy)] = (policy, one)
        return one


def log_changes(changes: list[tuple[str, str, str]]) -> None:
    """One line per attached or updated cgroup -- or, for more than
    LOG_EACH of a kind (a reload changing 10,000 policies), one line with
    their number and the first few: 10,000 lines cost the reload ~0.2 s
    and bury the journal."""
    by_what: dict[str, list[str]] = {}
    for what, name, mode in changes:
        by_what.setdefault(what, []).append(f"{name} ({mode})")
    for what, names in by_what.items():
        if len(names) <= LOG_EACH:
            for n in names:
                log.info("%s %s", what, n)
        else:
            shown = LOG_EACH // 2
            log.info(
                "%s %d cgroups: %s, ... and %d more",
                what,
                len(names),
                ", ".join(names[:shown]),
                len(names) - shown,
            )
