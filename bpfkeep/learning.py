"""Idle limits learned from the path (``keepidle = "auto"``).

What kills an idle connection is a middlebox on the path that forgets idle
flows after some time T (a NAT gateway: 350 s; a load balancer: 4 min; a
firewall: 1 h).  Nobody tells T; bpfkeep learns it from what happens to
the connections of the path, and keeps keepidle below it.

A path is a peer rule of a policy, or -- for the policy's own values --
the peer's network: a /24 for IPv4 (a NAT gateway or load balancer serves
whole subnets, and a /24 is what one usually sits in front of), a /64 for
IPv6 (one link's prefix).

Evidence (``Loss``, from the kernel's loss events; ``survived``, from the
periodic pass):

- **Lost after sitting idle** bounds T from above.  A RST answering our
  own transmission (data we sent after the idle time, or a keepalive
  probe), or data/probes never answered: T was at most the path's idle time
  then -- the time since the peer was last heard, when we spoke again (for
  a keepalive probe: the keepidle in force).
- **Idle, then heard from again** bounds T from below: the path let that
  much idle time pass (data both ways after the idle time, or a keepalive
  probe answered).

Not fooled:

- a RST nobody asked for (the peer restarting, a program aborting its own
  connection) is no evidence: only one answering our own transmission is;
- a path that also loses connections that were busy (nothing idle about
  them) within BURST seconds of an idle one is failing, not forgetting:
  the idle losses of that window are set aside -- taken back if they
  counted already (a loss counts at once: the next connection must not
  wait for it);
- evidence ages: the upper bound doubles back toward keepidle_max every
  AGE seconds without a new loss, so one stray loss does not hold keepidle
  down for ever.  Aging is a bet that the path changed: a loss that comes
  back at the limit it had before confirms the limit, and the wait before
  the next bet doubles (up to AGE_MAX) -- a path with a steady limit loses
  a connection a week to re-checking, not one an hour.

keepidle, once a loss gave an upper bound U:

- at once keepidle_min -- the safest the policy allows: the connections of
  the path that exist now are swept down to it, and one idle for longer
  probes at once, so the first loss saves the others;
- then it climbs: each time a connection survives an idle of the keepidle
  it has (a keepalive probe answered), new connections get twice that
  (GROWTH) -- existing ones keep the value they survived with, so a step
  that goes too far costs the connections made since, not the path's;
- up to half of U: the first probe goes out halfway to the limit, so one
  lost probe (retried keepintvl later), the kernel's timer slack (up to
  1/8 of a long timer) and round trips still fit.

A loss's idle time may be far above the limit (a connection that sat idle
an hour and then spoke); halving from there could cost a loss per halving.
Dropping low and climbing costs at most one more, when a step crosses the
limit -- and that loss is at most twice the last idle survived, so the
keepidle it leaves (U/2) has been survived already.  A stated idle_limit is
taken as known: keepidle is half of it at once (options.learned_keepidle).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from bpfkeep import peers
from bpfkeep.options import Policy, learned_keepidle

AGE = 3600.0  # seconds without a loss after which the upper bound doubles back
AGE_MAX = 7 * 86400.0  # the longest wait between doublings of a confirmed limit
GROWTH = 2.0  # keepidle climbs by this factor per idle survived
BURST = 2.0  # seconds around a busy connection's loss in which idle losses are set aside
BUSY = 1.0  # a connection heard from within this many seconds was busy, not idle


@dataclasses.dataclass
class Loss:
    """One lost connection of a path, as the kernel reported it."""

    at: float  # when (monotonic seconds)
    reason: str  # keepalive, user_timeout, retransmits, reset
    path_idle: float  # seconds since the peer was last heard
    keepidle: float  # in force on the socket (0: unknown)
    solicited: bool  # it answered (or ignored) our own transmission

    def evidence(self) -> float | None:
        """The idle time this loss bounds the path's limit by, or None if
        it says nothing about idle limits."""
        if self.path_idle < BUSY:
            return None  # busy: the peer failing, not the path forgetting
        if self.reason == "reset" and not self.solicited:
            return None  # nobody asked: the peer restarting or aborting
        if self.reason == "keepalive" and self.keepidle:
            return self.keepidle  # the first probe was not answered
        return self.path_idle


@dataclasses.dataclass
class Path:
    """What is known of one path's idle limit, in seconds."""

    keepidle_min: int
    keepidle_max: int
    upper: float | None = None  # the shortest idle after which a connection was lost
    upper_at: float = 0.0  # when it was learned (or last aged)
    lower: float = 0.0  # the longest idle a connection survived
    stated: float | None = None  # the operator's idle_limit for the path
    losses: int = 0  # losses taken as evidence
    ignored: int = 0  # losses set aside (busy, unsolicited, a failing peer)
    # The losses of the last BURST seconds that counted, each with what was
    # known before it (upper, upper_at, lower): a busy loss takes them back.
    recent: list[tuple[float, tuple[float | None, float, float]]] = dataclasses.field(
        default_factory=list
    )
    busy_at: float = -BURST - 1.0  # when a busy connection was last lost
    age_every: float = AGE  # doubles each time aging proved wrong
    aged_from: float | None = None  # the upper bound before it last aged

    @property
    def limit(self) -> float | None:
        """The idle limit in force: the learned one, or the stated one."""
        known = [v for v in (self.upper, self.stated) if v is not None]
        return min(known) if known else None

    def keepidle(self) -> int:
        """The keepidle new connections of the path get (existing ones are
        swept to it when it goes down)."""
        cap = learned_keepidle(self.limit, self.keepidle_min, self.keepidle_max)
        if self.upper is None:
            return cap  # nothing lost: the stated limit, or keepidle_max
        return min(cap, max(self.keepidle_min, int(GROWTH * self.lower)))

    def loss(self, loss: Loss) -> bool:
        """A loss on this path, taken as evidence at once -- or set aside,
        and with it the losses of the BURST seconds before, when it was
        busy.  True if keepidle changed."""
        before = self.keepidle()
        self.recent = [r for r in self.recent if loss.at - r[0] <= BURST]
        if loss.path_idle < BUSY:
            self.busy_at = loss.at
            if self.recent:  # the path is failing, not forgetting: take them back
                self.upper, self.upper_at, self.lower = self.recent[0][1]
                self.losses -= len(self.recent)
                self.ignored += len(self.recent)
                self.recent = []
            self.ignored += 1
            return self.keepidle() != before
        x = loss.evidence()
        if x is None or loss.at - self.busy_at <= BURST:
            self.ignored += 1
            return False
        self.recent.append((loss.at, (self.upper, self.upper_at, self.lower)))
        self.losses += 1
        if self.aged_from is not None and x <= self.aged_from * GROWTH:
            self.age_every = min(AGE_MAX, self.age_every * 2)  # the limit held: bet less
        self.aged_from = None
        if self.upper is None or x < self.upper:
            self.upper = x
        if self.lower >= x:
            self.lower = 0.0  # the path got stricter: climb again
        self.upper_at = loss.at
        return self.keepidle() != before

    def age(self, now: float) -> bool:
        """Evidence ages: the upper bound doubles back every AGE seconds
        without a loss.  True if keepidle changed."""
        before = self.keepidle()
        if self.upper is not None and now - self.upper_at >= self.age_every:
            steps = int((now - self.upper_at) // self.age_every)
            if self.aged_from is None:
                self.aged_from = self.upper
            self.upper = min(float(self.keepidle_max) * 2, self.upper * 2**steps)
            self.upper_at += steps * self.age_every
            if self.upper >= self.keepidle_max * 2:
                self.upper = None  # aged out entirely
        return self.keepidle() != before

    def survived(self, idle: float) -> bool:
        """A connection of this path sat idle this long and was heard from
        again.  True if keepidle changed."""
        before = self.keepidle()
        if idle > self.lower:
            self.lower = idle if self.upper is None else min(idle, self.upper)
        return self.keepidle() != before


# -- connections at risk ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Known:
    """An idle limit known of a connection's path."""

    limit: float  # seconds
    source: str  # "learned" or "stated" (the operator's idle_limit)
    label: str  # the peer rule's label, "*", or the network learned for


def _better(a: Known | None, b: Known | None) -> Known | None:
    if a is None or b is None:
        return a or b
    return a if a.limit <= b.limit else b


class Limits:
    """The idle limits known of paths: a policy's own (its rules' stated
    idle_limit, what was learned for its paths), and for connections
    outside every policy the networks these are known of (a connection of
    an unmanaged service to a known NAT path is at risk too)."""

    def __init__(
        self, policies: Mapping[int, Policy], learned: Iterable[tuple[int, str, float]] = ()
    ):
        """``learned``: (policy cgroup id, path, the limit learned): the path
        is a peer rule's label, or the network learned for (as shown)."""
        self.policies = policies
        self._rule: dict[tuple[int, str], float] = {}
        self._net: dict[tuple[int, peers.Network], float] = {}
        # For connections outside every policy: prefix length -> network -> limit.
        self._outside: dict[int, dict[peers.Network, Known]] = {}
        for policy in policies.values():
            for rule in policy.peers:
                if rule.policy is not None and rule.policy.idle_limit:
                    for n in rule.networks:
                        self._add(n, Known(rule.policy.idle_limit, "stated", rule.label))
        for owner, label, limit in learned:
            policy = policies.get(owner)
            rule = next((r for r in policy.peers if r.label == label), None) if policy else None
            if rule is not None:
                self._rule[(owner, label)] = limit
                for n in rule.networks:
                    self._add(n, Known(limit, "learned", label))
                continue
            net = peers.parse_network(label)
            if net is not None:
                self._net[(owner, net)] = limit
                self._add(net, Known(limit, "learned", label))
        self._lens = sorted(self._outside, reverse=True)

    def _add(self, net: peers.Network, known: Known) -> None:
        by = self._outside.setdefault(net.prefixlen, {})
        by[net] = _better(by.get(net), known)  # type: ignore[assignment]

    def __bool__(self) -> bool:
        return bool(self._outside or self._rule or self._net) or any(
            p.idle_limit for p in self.policies.values()
        )

    def of(self, owner: int | None, address16: bytes, port: int) -> Known | None:
        """The idle limit of a connection's path: ``owner``, the policy that
        covers it (None: none does); the peer as 16 bytes (IPv4 mapped)."""
        policy = self.policies.get(owner) if owner is not None else None
        if policy is None:
            return self._outside_of(address16)
        label, values = peers.effective(policy, peers.show_address(address16), port)
        if values is None:
            return None  # exempt: the operator chose to leave it alone
        stated = Known(values.idle_limit, "stated", label) if values.idle_limit else None
        if label != peers.ANY:
            got = self._rule.get((owner, label))  # type: ignore[arg-type]
            return _better(stated, Known(got, "learned", label) if got else None)
        net = peers.path_of(address16)
        got = self._net.get((owner, net))  # type: ignore[arg-type]
        return _better(stated, Known(got, "learned", peers.show_network(net)) if got else None)

    def _outside_of(self, address16: bytes) -> Known | None:
        value = int.from_bytes(address16, "big")
        for plen in self._lens:
            mask = ((1 << plen) - 1) << (128 - plen)
            known = self._outside[plen].get(peers.Network((value & mask, plen)))
            if known is not None:
                return known  # the most specific network known
        return None


def at_risk(known: Known, keepalive: bool, keepidle: float | None) -> bool:
    """Whether the keepalive in force cannot beat the path's idle limit:
    keepalive off, or its keepidle at or above the limit (``keepidle``
    None: not seen, e.g. probes out)."""
    return not keepalive or (keepidle is not None and keepidle >= known.limit)
