"""The daemon's side of keepidle = "auto" (bpfkeep.learning decides):

- it reads the kernel's loss events (a ring buffer the loss program
  writes; its descriptor wakes the loop) and gives each to its path;
- a path whose keepidle changed is written to the kernel's bk_learned map
  at once -- new connections get it at connect and accept -- and when it
  went down, the path's connections that exist now are swept to it (the
  first loss saves the others): a request to the daemon's sweeping thread
  (daemon.sweeps), an event, never a sweep on the loop;
- at the periodic pass it looks at every established connection of the
  policies' network namespaces (inet_diag with tcp_info: when each was
  last heard from, when its keepalive timer fires): which sat idle and were
  heard from again (lower bounds), and which are at risk -- keepalive off,
  or a keepidle at or above their path's known idle limit;
- what it learned is kept in bk_learned, pinned: a restart or an upgrade
  starts from it.

A path is a peer rule of a policy (by its label), or for the policy's own
values the peer's /24 (IPv4) or /64 (IPv6) network.  Clients come from
networks without end (a server facing the internet), so the daemon keeps
at most as many paths as the kernel's map holds: the networks nothing was
learned of go first, the longest untouched; then, if it must, the limits
learned longest ago -- from the map too (``_make_room``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Iterable

from bpfkeep import learning, peers
from bpfkeep.daemon.passes import Passes, Request
from bpfkeep.daemon.state import OURS, State
from bpfkeep.errors import BpfkeepError
from bpfkeep.kernel import bpfsys, netns, sockdiag
from bpfkeep.kernel.cgroups import Cgroup, by_ids
from bpfkeep.kernel.ringbuf import RingBuffer
from bpfkeep.kernel.sockdiag import TIMER_KEEPALIVE, TIMER_PROBE0, TIMER_RETRANSMIT
from bpfkeep.metrics.collector import PathRow
from bpfkeep.options import Policy
from bpfkeep.pins import read
from bpfkeep.progs import loader, maps
from bpfkeep.sweep import entries
from bpfkeep.sweep.engine import SweepUnavailable, scope

ESTABLISHED_ONLY = sockdiag.states_mask([sockdiag.ESTABLISHED])
# The kernel takes each socket's lock to report its tcp_info: a process
# stuck holding one (a send() from a page whose fault never completes)
# would hold the look -- and the daemon's loop it runs on -- for ever.  A
# namespace's dump is given up after this long, and that namespace left
# alone while the dump stays stuck.
LOOK_DEADLINE = 5.0
SLACK_MS = 500  # jiffies and the time a dump takes: differences below are noise

log = logging.getLogger("bpfkeep")


@dataclasses.dataclass
class Tracked:
    """One path the daemon learns for."""

    owner: int
    label: str  # the peer rule's label, or the network ("10.1.2.0/24")
    path: learning.Path
    written: int = 0  # the keepidle last written to the kernel
    network: bool = False  # for the policy's own values (not a peer rule)
    touched: float = 0.0  # when evidence last came (monotonic)


class Learner:
    def __init__(self, state: State, passes: Passes | None = None):
        """``passes``: the daemon's, whose sweeping thread runs the sweeps
        to a keepidle learned lower; without, they run here and now."""
        self.state = state
        self.passes = passes
        self.paths: dict[bytes, Tracked] = {}  # bk_path_key -> path
        self.room = maps.MAX_PATHS  # paths kept at most: bk_learned's size
        self.ring: RingBuffer | None = None
        self.events_seen = 0
        # The last look at each connection: (netns, cookie) -> (when, ms
        # since data sent, since data received, since heard from; its
        # keepidle, the longest its timer has shown).
        self._seen: dict[tuple[int, int], tuple[float, int, int, int, float]] = {}
        self.at_risk: dict[tuple[str, str], int] = {}  # (cgroup, peer) -> connections
        self.cost = 0.0  # CPU seconds of the last look
        self._entered = netns.Entered("bpfkeep-look")  # the thread that enters namespaces
        self._stuck: dict[int, threading.Thread] = {}  # netns inode -> its dump, left behind
        # The offset between the kernel map's epoch seconds and monotonic.
        self._epoch = time.time() - time.monotonic()

    # -- lifecycle -------------------------------------------------------------

    def open(self) -> None:
        """The ring buffer of loss events (its descriptor wakes the loop)."""
        self.ring = self.state.enforcer.pins.ring(loader.MAP_LOSS_EVENTS)
        if self.ring is None:
            log.warning("lost connections cannot be learned from: no ring buffer of loss events")
        with contextlib.suppress(OSError), self.state.enforcer.pins.one(loader.MAP_LEARNED) as fd:
            if fd is not None:
                self.room = bpfsys.map_max_entries(fd)

    def restore(self) -> None:
        """What was learned before a restart or an upgrade (bk_learned),
        for the policies that still learn (after the first reconcile)."""
        for key, got in read.learned(self.state.enforcer.pins).items():
            owner, tag, _plen, _net = maps.decode_path_key(key)
            bounds = self._bounds(owner, tag, key)
            if bounds is None:
                continue
            policy, label = bounds
            p = learning.Path(policy.keepidle_min, policy.keepidle_max)
            p.upper = got.upper_ms / 1000 if got.upper_ms else None
            p.upper_at = got.upper_at - self._epoch if got.upper_at else 0.0
            p.lower = got.lower_ms / 1000
            p.stated = policy.idle_limit or None
            p.losses, p.ignored = got.losses, got.ignored
            written = got.keepidle or p.keepidle()
            self.paths[key] = Tracked(owner, label, p, written, tag == 0, time.monotonic())

    @property
    def fd(self) -> int | None:
        return self.ring.fd if self.ring is not None else None

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        self._entered.close()

    # -- the policies that learn --------------------------------------------------

    def _policy_of(self, owner: int) -> Policy | None:
        e = self.state.table.get(owner)
        if e is None or not e.attached or e.policy is None:
            return None
        return e.policy

    def _bounds(self, owner: int, tag: int, key: bytes) -> tuple[Policy, str] | None:
        """(the values that learn for this path, its label), or None when
        the path's policy does not learn (any more)."""
        policy = self._policy_of(owner)
        if policy is None:
            return None
        if tag == 0:
            if not policy.auto:
                return None
            _o, _t, plen, net = maps.decode_path_key(key)
            return policy, peers.show_network(peers.Network((net, plen)))
        for rule in policy.peers:
            if maps.rule_tag(rule.label) == tag and rule.policy is not None:
                return (rule.policy, rule.label) if rule.policy.auto else None
        return None

    # -- evidence -------------------------------------------------------------------

    def events(self) -> None:
        """Loss events from the kernel, each to its path."""
        if self.ring is not None:
            self.take(self.ring.read())

    def take(self, events: Iterable[bytes]) -> None:
        """Loss events as the kernel writes them (struct bk_loss_event)."""
        now = time.monotonic()
        changed: dict[bytes, int] = {}
        for raw in events:
            self.events_seen += 1
            ev = maps.LOSS_EVENT.unpack(raw)
            owner, tag = int(ev["owner"]), int(ev["tag"])  # type: ignore[arg-type]
            policy = self._policy_of(owner)
            if policy is None:
                continue
            address16 = bytes(ev["addr"])  # type: ignore[arg-type]
            label = self._label(policy, tag, address16)
            key = maps.path_key(owner, label if tag else peers.ANY, address16)
            tracked = self.paths.get(key)
            if tracked is None:
                bounds = self._bounds(owner, tag, key)
                if bounds is None:
                    continue  # this path's keepidle is not learned
                tracked = self._track(key, owner, bounds[1], bounds[0], tag == 0)
            tracked.touched = now
            reason = maps.LOSS_REASONS[int(ev["reason"]) % len(maps.LOSS_REASONS)]  # type: ignore[arg-type]
            loss = learning.Loss(
                at=now,
                reason=reason,
                path_idle=int(ev["path_idle_ms"]) / 1000,  # type: ignore[arg-type]
                keepidle=int(ev["keepidle"]),  # type: ignore[arg-type]
                solicited=bool(ev["unacked"] or ev["probes"]),
            )
            if tracked.path.loss(loss):
                changed.setdefault(key, tracked.written)
        if changed:
            self._write(changed)

    @staticmethod
    def _label(policy: Policy, tag: int, address16: bytes) -> str:
        if tag == 0:
            return peers.show_network(peers.path_of(address16))
        return next((r.label for r in policy.peers if maps.rule_tag(r.label) == tag), str(tag))

    def survived(self, owner: int, address16: bytes, port: int, idle: float, probed: float) -> None:
        """A connection of ``owner`` to this peer sat idle at least ``idle``
        seconds and was heard from again -- ``probed``: the idle a keepalive
        probe answered showed it survived (0: data moved)."""
        policy = self._policy_of(owner)
        if policy is None:
            return
        label, values = peers.effective(policy, peers.show_address(address16), port)
        if values is None or not values.auto:
            return
        key = maps.path_key(owner, label, address16)
        now = time.monotonic()
        tracked = self.paths.get(key)
        if tracked is None:
            network = label == peers.ANY
            shown = peers.show_network(peers.path_of(address16)) if network else label
            tracked = self._track(key, owner, shown, values, network)
        tracked.touched = now
        idle = max(idle, probed)
        if tracked.path.survived(idle):
            self._write({key: tracked.written})

    def _track(self, key: bytes, owner: int, shown: str, values: Policy, network: bool) -> Tracked:
        """A path new to the daemon, within ``room`` (the caller says when
        it was touched)."""
        if len(self.paths) >= self.room:
            self._make_room()
        path = learning.Path(values.keepidle_min, values.keepidle_max)
        path.stated = values.idle_limit or None
        tracked = self.paths[key] = Tracked(owner, shown, path, path.keepidle(), network)
        return tracked

    def _make_room(self) -> None:
        """Down to 7/8 of ``room`` (so that this runs once per room/8 new
        paths, not on each): first the paths nothing was learned of -- only
        how long their connections survived idle, which speeds a climb
        that may never come -- the longest untouched first; then, only if
        more than that many limits were learned, the oldest of those,
        from the kernel's map too (its new connections start over from
        the policy's keepidle)."""
        keep = self.room - self.room // 8 - 1  # and the one coming
        order = sorted(
            self.paths.items(),
            key=lambda kv: (
                kv[1].path.upper is not None,
                kv[1].touched if kv[1].path.upper is None else kv[1].path.upper_at,
            ),
        )
        gone = [key for key, _t in order[: len(self.paths) - keep]]
        limits = sum(1 for key in gone if self.paths[key].path.upper is not None)
        for key in gone:
            del self.paths[key]
        self._unwrite(gone)
        if limits:
            log.warning(
                "%d learned idle limit(s) forgotten, the oldest: more paths learned than "
                "the kernel's map holds (%d)",
                limits,
                self.room,
            )
        else:
            log.debug("%d path(s) nothing was learned of forgotten", len(gone))

    def _unwrite(self, keys: list[bytes]) -> None:
        """Take these paths out of the kernel's map (where they are)."""
        with contextlib.suppress(OSError), self.state.enforcer.pins.one(loader.MAP_LEARNED) as fd:
            for key in keys if fd is not None else ():
                with contextlib.suppress(OSError):
                    bpfsys.map_delete(fd, key)

    # -- the periodic look ---------------------------------------------------------

    def every(self, interval: float) -> float:
        """The wait after a look: ``interval`` ([daemon] audit_interval),
        stretched to 1000 times the look's CPU time (a host with many
        connections)."""
        return max(interval, 1000 * self.cost)

    def sample(self) -> None:
        """Every established connection of the policies' network namespaces
        (and ours): survivals for the paths that learn, and the connections
        at risk (``at_risk``)."""
        # Its own CPU: this thread's and the namespace thread's -- not the
        # process's, which the sweeping thread and the scrapes share.
        t0, n0 = time.thread_time(), self._entered.cpu_seconds()
        try:
            self._sample()
        finally:
            n1 = self._entered.cpu_seconds()
            self.cost = time.thread_time() - t0 + (n1 - n0 if n1 >= n0 else n1)

    def _dump(self, ns: netns.Namespace) -> list | None:
        """The namespace's established connections with their times, from
        inside it; None if it cannot be read (now)."""
        stuck = self._stuck.get(ns.inode)
        if stuck is not None:
            if stuck.is_alive():
                return None  # its last dump still waits for a socket's lock
            del self._stuck[ns.inode]
        try:
            return self._entered.call(
                lambda: sockdiag.dump_times(ESTABLISHED_ONLY), ns.tid, LOOK_DEADLINE
            )  # type: ignore[return-value]
        except netns.Stuck:
            self._stuck[ns.inode] = self._entered.behind[-1]
            log.warning(
                "network namespace net:[%d]: a socket's lock was held for over %.0f s (a "
                "process stuck in a page fault inside send()?); its connections are not "
                "looked at while it stays so",
                ns.inode,
                LOOK_DEADLINE,
            )
        except (OSError, BpfkeepError) as e:
            log.debug("network namespace net:[%d] not read: %s", ns.inode, e)
        return None

    def _sample(self) -> None:
        table = self.state.table
        with table.lock:
            kept = {i: e for i, e in table.items() if e.attached and e.policy is not None}
        policies = {i: e.policy for i, e in kept.items()}
        self._forget()
        self.age()
        limits = self.limits(policies)  # type: ignore[arg-type]
        learns = any(p.learns for p in policies.values())  # type: ignore[union-attr]
        if not limits and not learns:
            self._seen, self.at_risk = {}, {}
            return
        sc = scope([e.cgroup for e in kept.values()], set(kept))
        seen: dict[tuple[int, int], tuple[float, int, int, int]] = {}
        risk: dict[tuple[int, str], int] = {}
        for space in netns.of_processes(sc.owner_of_pid).values():
            got = self._dump(space)
            if got is None:
                continue
            ns, now = space.inode, time.monotonic()
            for raw, times in got:  # type: ignore[union-attr]
                if times is None:
                    continue
                fam, _st, timer, _sp, dport, _src, dst, _ino, cg, cookie = raw
                sent, recv, ack, expires = times
                heard = min(recv, ack)
                owner = sc.owner_of_cgroup.get(cg)
                address16 = sockdiag.mapped(fam, dst)
                prev = self._seen.get((ns, cookie))
                # The keepalive timer shows keepidle (time since heard +
                # time to the next probe) between probes, and keepintvl
                # just after one: the longest it showed is the keepidle.
                keepidle = (expires + heard) / 1000 if timer == TIMER_KEEPALIVE else 0.0
                keepidle = max(keepidle, prev[4] if prev else 0.0)
                seen[(ns, cookie)] = (now, sent, recv, heard, keepidle)
                if owner is not None and learns and prev is not None:
                    self._look(owner, address16, dport, prev, now, times, keepidle)
                known = limits.of(owner, address16, dport)
                if known is None or timer in (TIMER_RETRANSMIT, TIMER_PROBE0):
                    continue  # no limit known, or its keepalive hidden by a busy timer
                keepalive = timer == TIMER_KEEPALIVE
                if learning.at_risk(known, keepalive, keepidle if keepalive else None):
                    where = (owner if owner is not None else -cg, known.label)
                    risk[where] = risk.get(where, 0) + 1
        self._seen = seen
        self.at_risk = self._named(risk)

    def _look(
        self,
        owner: int,
        address16: bytes,
        port: int,
        prev: tuple[float, int, int, int, float],
        now: float,
        times: sockdiag.Times,
        keepidle: float,
    ) -> None:
        """Compare a connection with the last look at it (times in ms ago;
        ``keepidle``: its own, as its timer shows it, 0 if not armed)."""
        t1, sent1, recv1, heard1, _ = prev
        sent, recv, ack, _expires = times
        heard = min(recv, ack)
        dt = (now - t1) * 1000
        if heard + SLACK_MS >= heard1 + dt:
            return  # not heard from since
        idle = min(sent1, heard1)  # the path's idle time at the last look
        data = sent + SLACK_MS < sent1 + dt or recv + SLACK_MS < recv1 + dt
        if data:
            if idle >= learning.BUSY * 1000:
                self.survived(owner, address16, port, idle / 1000, 0.0)
            return
        # No data: a keepalive probe was answered, after the socket's own
        # keepidle of quiet (several between two looks show as more: no
        # more than one keepidle is known to be survived).
        gap = (heard1 + dt - heard) / 1000
        if keepidle:
            self.survived(owner, address16, port, idle / 1000, min(gap, keepidle))

    def _forget(self) -> None:
        """Paths whose policy no longer learns (detached, or changed on
        reload) go, from bk_learned too; the others take the policy's
        bounds as they are now."""
        gone = []
        for key, t in self.paths.items():
            owner, tag, _plen, _net = maps.decode_path_key(key)
            bounds = self._bounds(owner, tag, key)
            if bounds is None:
                gone.append(key)
                continue
            values = bounds[0]
            t.path.keepidle_min, t.path.keepidle_max = values.keepidle_min, values.keepidle_max
            t.path.stated = values.idle_limit or None
        if not gone:
            return
        for key in gone:
            del self.paths[key]
        self._unwrite(gone)

    def _named(self, risk: dict[tuple[int, str], int]) -> dict[tuple[str, str], int]:
        """At-risk counts by (cgroup, peer): a policy's cgroup (its id), or
        for connections outside every policy their own cgroup (-id)."""
        outside = by_ids({-i for i, _ in risk if i < 0}, self.state.mount)
        out: dict[tuple[str, str], int] = {}
        for (i, label), n in risk.items():
            if i >= 0:
                name = self._cgroup_name(i)
            else:
                cg = outside.get(-i)
                name = cg.display if cg is not None else f"cgroup id {-i}"
            out[(name, label)] = out.get((name, label), 0) + n
        return out

    # -- settling -----------------------------------------------------------------------

    def age(self, now: float | None = None) -> None:
        """Age the evidence; write (and sweep) what changed -- a reload that
        changed a policy's bounds too."""
        now = time.monotonic() if now is None else now
        changed = {
            key: t.written
            for key, t in self.paths.items()
            if t.path.age(now) or t.path.keepidle() != t.written
        }
        if changed:
            self._write(changed)

    def _write(self, changed: dict[bytes, int]) -> None:
        """bk_learned for these paths (new connections get it at once),
        then -- for those whose keepidle went down -- a sweep of their
        connections that exist now (``changed``: the keepidle each path had
        before).  A climb is for new connections only: existing ones keep
        the value they survived with."""
        try:
            with self.state.enforcer.pins.one(loader.MAP_LEARNED) as fd:
                if fd is None:
                    return
                for key in changed:
                    t = self.paths.get(key)
                    if t is None:
                        continue  # forgotten meanwhile, to make room
                    bpfsys.map_update(fd, key, self._value(t).encode())
                    old, t.written = t.written, t.path.keepidle()
                    if old != t.written:
                        log.info(
                            "%s, peer %s: idle limit %s (%d loss(es), %d set aside); keepidle "
                            "%d s (was %s)",
                            self._cgroup_name(t.owner),
                            t.label,
                            f"{t.path.limit:.0f} s" if t.path.limit else "unknown",
                            t.path.losses,
                            t.path.ignored,
                            t.written,
                            f"{old} s" if old else "the policy's",
                        )
        except OSError as e:
            self.state.errors += 1
            log.error("writing learned idle limits: %s", e)
            return
        lower = {
            k: old for k, old in changed.items() if k in self.paths and self.paths[k].written < old
        }
        if lower:
            self._sweep(lower)
            self._seen = {}  # the keepidle each timer showed is no more

    def _value(self, t: Tracked) -> maps.Learned:
        p = t.path
        return maps.Learned(
            keepidle=p.keepidle(),
            limit=int(p.limit or 0),
            upper_ms=round((p.upper or 0) * 1000),
            lower_ms=round(p.lower * 1000),
            upper_at=int(p.upper_at + self._epoch) if p.upper is not None else 0,
            losses=p.losses,
            ignored=p.ignored,
        )

    def _sweep(self, changed: dict[bytes, int]) -> None:
        owners = {self.paths[k].owner for k in changed}
        cgs: list[Cgroup] = []
        policies: dict[int, Policy] = {}
        for owner in owners:
            e = self.state.table.get(owner)
            if e is None or e.attached != OURS or e.policy is None or not e.existing:
                continue
            cgs.append(e.cgroup)
            policies[owner] = e.policy

        def before(owner: int, label: str, address16: bytes) -> int | None:
            return changed.get(maps.path_key(owner, label, address16)) or None

        if not cgs:
            return
        make = entries.relearn_entry(policies, before)
        if self.passes is not None:

            def done(report, _cpu: float) -> None:
                if report.swept:
                    log.info("%s (learned keepidle)", report.summary())

            self.passes.request(cgs, Request(make=make, done=done))
            return
        try:
            report = self.state.enforcer.sweep(cgs, make)
        except SweepUnavailable:
            return
        except (BpfkeepError, OSError) as e:
            self.state.errors += 1
            log.error("sweeping to the learned keepidle: %s", e)
            return
        if report.swept:
            log.info("%s (learned keepidle)", report.summary())

    def _cgroup_name(self, owner: int) -> str:
        e = self.state.table.get(owner)
        return e.cgroup.display if e is not None else f"cgroup id {owner}"

    # -- what the metrics show ---------------------------------------------------------

    def rows(self) -> list[PathRow]:
        """The paths learned for, for the metrics (the scrape thread): every
        peer rule's, and the networks a limit was learned of -- not every
        network a client came from."""
        return [
            PathRow(self._cgroup_name(t.owner), t.label, t.path.limit, t.path.keepidle())
            for t in list(self.paths.values())
            if not t.network or t.path.upper is not None
        ]

    def limits(self, policies: dict[int, Policy]) -> learning.Limits:
        """The idle limits known (stated and learned), for the at-risk check."""
        learned = [
            (t.owner, t.label, t.path.upper)
            for t in list(self.paths.values())
            if t.path.upper is not None
        ]
        return learning.Limits(policies, learned)  # type: ignore[arg-type]
