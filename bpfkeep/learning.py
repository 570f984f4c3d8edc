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
- **Idle, then data both ways** bounds T from below: the path let that
  much idle time pass.

Not fooled:

- a RST nobody asked for (the peer restarting, a program aborting its own
  connection) is no evidence: only one answering our own transmission is;
- a path that also loses connections that were busy (nothing idle about
  them) within BURST seconds of an idle one is failing, not forgetting:
  the idle losses of that window are set aside;
- evidence ages: the upper bound doubles back toward keepidle_max every
  AGE seconds without a new loss, so one stray loss does not hold keepidle
  down for ever.

keepidle = half the upper bound (at least the lower bound when that is
higher, within keepidle_min..keepidle_max): the first probe goes out
halfway to the limit, so one lost probe (retried keepintvl later), the
kernel's timer slack (up to 1/8 of a long timer) and round trips still
fit before the middlebox forgets.  Each loss at least halves keepidle: a
path whose limit is T costs at most log2(keepidle_max / T) losses, and in
practice one or two (the first loss's idle time is already close to T).
"""

from __future__ import annotations

import dataclasses
import math

AGE = 3600.0  # seconds without a loss after which the upper bound doubles back
BURST = 2.0  # seconds around a busy connection's loss in which idle losses are set aside
BUSY = 1.0  # a connection heard from within this many seconds was busy, not idle
MARGIN = 0.5  # keepidle = MARGIN x the upper bound


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
    pending: list[Loss] = dataclasses.field(default_factory=list)

    @property
    def limit(self) -> float | None:
        """The idle limit in force: the learned one, or the stated one."""
        known = [v for v in (self.upper, self.stated) if v is not None]
        return min(known) if known else None

    def keepidle(self) -> int:
        limit = self.limit
        if limit is None:
            return self.keepidle_max
        k = max(MARGIN * limit, min(self.lower, limit * 0.9))
        return int(min(self.keepidle_max, max(self.keepidle_min, math.floor(k))))

    def loss(self, loss: Loss) -> None:
        """A loss on this path: held BURST seconds (settle) before it counts."""
        self.pending.append(loss)

    def settle(self, now: float) -> bool:
        """Take the losses older than BURST as evidence -- unless a busy
        connection was lost within BURST of them; age the upper bound.
        True if keepidle changed."""
        before = self.keepidle()
        ready = [loss for loss in self.pending if now - loss.at >= BURST]
        if ready:
            self.pending = [loss for loss in self.pending if now - loss.at < BURST]
            busy = [loss.at for loss in (*ready, *self.pending) if loss.path_idle < BUSY]
            for loss in ready:
                x = loss.evidence()
                if x is None or any(abs(loss.at - b) <= BURST for b in busy):
                    self.ignored += 1
                    continue
                self.losses += 1
                if self.upper is None or x < self.upper:
                    self.upper = x
                self.upper_at = loss.at
        if self.upper is not None and now - self.upper_at >= AGE:
            steps = int((now - self.upper_at) // AGE)
            self.upper = min(float(self.keepidle_max) * 2, self.upper * 2**steps)
            self.upper_at += steps * AGE
            if self.upper >= self.keepidle_max * 2:
                self.upper = None  # aged out entirely
        return self.keepidle() != before

    def survived(self, idle: float) -> bool:
        """A connection of this path sat idle this long and then carried
        data both ways.  True if keepidle changed."""
        before = self.keepidle()
        if idle > self.lower:
            self.lower = idle if self.upper is None else min(idle, self.upper)
        return self.keepidle() != before
