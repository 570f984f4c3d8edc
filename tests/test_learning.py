"""Learning a path's idle limit, without the kernel: the evidence a path
gets (losses and idle times survived) on a clock the test drives.

The real thing -- a router that forgets idle flows, the kernel's loss
events, the daemon's sweep -- is in test_learning_path.py; here the rule
itself is checked on many paths, limits and client habits at once.
"""

from __future__ import annotations

import itertools
import os
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfkeep import learning, peers
from bpfkeep.learning import AGE, BURST, Known, Limits, Loss, Path
from bpfkeep.options import Policy


def lost(at: float, idle: float, *, reason: str = "reset", keepidle: float = 0, solicited=True):
    return Loss(at=at, reason=reason, path_idle=idle, keepidle=keepidle, solicited=solicited)


def settled(path: Path, loss: Loss) -> Path:
    path.loss(loss)
    return path


def test_nothing_lost_keeps_keepidle_max():
    p = Path(10, 300)
    assert p.keepidle() == 300
    assert p.limit is None


def test_the_first_loss_drops_to_the_minimum_then_it_climbs_to_half_the_limit():
    p = settled(Path(10, 300), lost(0.0, 350.0))
    assert p.limit == 350.0
    assert p.keepidle() == 10  # at once: the connections of the path are swept to it
    climbed = []
    while True:
        k = p.keepidle()
        climbed.append(k)
        if not p.survived(k):
            break
    assert climbed == [10, 20, 40, 80, 160, 175]  # doubling per idle survived, up to U/2
    assert p.keepidle() == 175


def test_a_loss_counts_at_once_and_a_busy_one_soon_after_takes_it_back():
    p = Path(10, 300)
    assert p.loss(lost(0.0, 100.0))
    assert p.keepidle() == 10  # the next connection need not wait
    assert p.loss(lost(BURST / 2, 0.1))  # busy: the path is failing, not forgetting
    assert p.keepidle() == 300 and p.limit is None
    assert (p.losses, p.ignored) == (0, 2)
    assert not p.loss(lost(BURST, 80.0))  # idle, just after a busy one: set aside too
    assert p.loss(lost(BURST * 3, 80.0))  # later: evidence
    assert p.limit == 80.0


def test_a_reset_nobody_asked_for_is_no_evidence():
    p = settled(Path(10, 300), lost(0.0, 500.0, solicited=False))
    assert p.keepidle() == 300 and p.ignored == 1 and p.losses == 0


def test_a_peer_restarting_does_not_lower_the_limit():
    """Its connections reset at once, busy and idle alike: the busy ones
    (heard from just now) show it is the peer failing, not the path
    forgetting -- even the idle ones' RSTs answering our data are set aside."""
    p = Path(10, 300)
    p.loss(lost(0.0, 200.0))  # idle, answered our data
    p.loss(lost(0.3, 0.2))  # busy
    p.loss(lost(0.5, 90.0, solicited=False))
    assert p.keepidle() == 300
    assert (p.losses, p.ignored) == (0, 3)


def test_a_keepalive_loss_bounds_the_limit_by_the_keepidle_in_force():
    p = settled(Path(10, 300), lost(0.0, 300 + 9 * 75, reason="keepalive", keepidle=300))
    assert p.limit == 300


def test_evidence_ages_back_to_keepidle_max():
    p = settled(Path(10, 300), lost(0.0, 100.0))
    p.age(AGE + 1)
    assert p.limit == 200.0
    p.age(3 * AGE + 1)
    assert p.limit is None and p.keepidle() == 300


def test_a_limit_that_holds_is_rechecked_less_and_less_often():
    """Aging bets the path changed; a loss back at the old limit confirms
    it, and the next bet waits twice as long."""
    p, t, lost_at = Path(10, 300), 0.0, []
    p.loss(lost(t, 240.0, reason="keepalive", keepidle=240))  # Azure: 4 min
    while t < 30 * 86400:
        t += 60.0
        p.age(t)
        if p.keepidle() >= 240:  # the next idle connection dies at the limit
            lost_at.append(t)
            p.loss(lost(t, 240.0, reason="keepalive", keepidle=p.keepidle()))
    gaps = [b - a for a, b in itertools.pairwise(lost_at)]
    assert len(lost_at) <= 12, lost_at  # not one an hour (720 in 30 days)
    assert gaps == sorted(gaps)


def test_a_stricter_path_restarts_the_climb():
    p = settled(Path(10, 300), lost(0.0, 100.0))
    for k in (10, 20, 40):
        p.survived(k)
    assert p.keepidle() == 50
    settled(p, lost(10.0, 30.0))  # the path now forgets after at most 30 s
    assert p.keepidle() == 10


def test_a_stated_limit_gives_half_of_it_at_once():
    p = Path(10, 300, stated=350)
    assert p.keepidle() == 175
    settled(p, lost(0.0, 100.0))  # what is learned below it takes over
    assert p.limit == 100.0 and p.keepidle() == 10


def simulate(limit: float, keepidle_max: int, idles: list[float], keepidle_min: int = 1) -> int:
    """Connections one after another on a path that forgets after
    ``limit`` s, each sitting idle ``idle`` s before it speaks: the losses.
    A connection gets the path's keepidle when made, and a lower one when
    it goes down (the sweep); idle past it, it probes (answered while the
    path remembers); one that speaks first is answered if the path still
    remembers."""
    p, now, losses = Path(keepidle_min, keepidle_max), 0.0, 0
    for idle in idles:
        k = p.keepidle()
        elapsed, quiet = 0.0, 0.0  # the client's idle time; the path's (probes count)
        while elapsed < idle:
            k = min(k, p.keepidle())
            probes = k - quiet <= idle - elapsed  # a probe goes out before it speaks
            step = max(0.0, k - quiet) if probes else idle - elapsed
            if quiet + step >= limit:  # the path forgot before it spoke or probed
                now += step
                losses += 1
                p.loss(lost(now, quiet + step, keepidle=k if probes else 0))
                break
            now += step
            elapsed += step
            quiet += step
            if probes:
                p.survived(quiet)  # a probe answered: the path let that pass
                quiet = 0.0
    return losses


@settings(max_examples=300, deadline=None)
@given(
    limit=st.floats(5, 600),
    keepidle_max=st.integers(10, 3600),
    habit=st.lists(st.floats(0.1, 20), min_size=3, max_size=12),
)
def test_at_most_two_connections_are_lost_however_far_the_limit(limit, keepidle_max, habit):
    """keepidle_max above the limit, clients idle anything from a tenth to
    twenty times the limit: at most two connections are lost, then none."""
    idles = [limit * h for h in habit] + [limit * 3] * 5
    assert simulate(limit, max(keepidle_max, int(limit) + 1), idles) <= 2


def test_under_the_limit_nothing_is_lost():
    assert simulate(400.0, 300, [1000.0] * 5) == 0


def rule(address: str, **values) -> peers.Peer:
    (p,) = peers.build({"keepidle": 600}, [{"address": address, **values}])
    return p


def test_limits_of_a_policy_and_of_connections_outside_every_policy():
    nat = rule("0.0.0.0/0", idle_limit=350)
    db = rule("10.1.2.3", keepidle="auto")
    policy = Policy.from_mapping({"keepidle": 600}).with_peers((nat, db))
    limits = Limits({7: policy}, [(7, "10.1.2.3", 40.0), (7, "192.168.5.0/24", 100.0)])

    def v4(a: str) -> bytes:
        return peers._as_v6(a).packed  # type: ignore[union-attr]

    assert limits.of(7, v4("8.8.8.8"), 443) == Known(350, "stated", "0.0.0.0/0")
    assert limits.of(7, v4("10.1.2.3"), 5432) == Known(40.0, "learned", "10.1.2.3")
    # Outside every policy: the most specific network known.
    assert limits.of(None, v4("10.1.2.3"), 5432) == Known(40.0, "learned", "10.1.2.3")
    assert limits.of(None, v4("192.168.5.9"), 80) == Known(100.0, "learned", "192.168.5.0/24")
    assert limits.of(None, v4("8.8.8.8"), 80) == Known(350, "stated", "0.0.0.0/0")
    assert not Limits({}, [])


@pytest.mark.parametrize(
    ("keepalive", "keepidle", "risky"),
    [(False, None, True), (True, 400.0, True), (True, 350.0, True), (True, 175.0, False)],
)
def test_at_risk(keepalive, keepidle, risky):
    assert learning.at_risk(Known(350, "stated", "*"), keepalive, keepidle) is risky


def test_a_look_costs_its_own_cpu_not_the_other_threads(monkeypatch):
    """The look at idle connections is spaced by 1000 times its CPU; the
    daemon's sweeping thread and scrapes run meanwhile, and counting the
    process's CPU (theirs too) pushed the look -- and the at-risk counts --
    out by tens of seconds.  Its own thread's and its namespace threads'."""
    from types import SimpleNamespace

    from bpfkeep.daemon.learn import Learner

    def burn(seconds: float) -> None:
        t0 = time.thread_time()
        while time.thread_time() - t0 < seconds:
            pass

    learner = Learner(SimpleNamespace())  # type: ignore[arg-type]

    def look() -> None:
        burn(0.1)  # the look's own thread
        learner._entered.call(lambda: burn(0.1), None)  # the namespace thread
        time.sleep(0.4)  # meanwhile another thread works

    stop = threading.Event()

    def other() -> None:
        while not stop.is_set():
            burn(0.01)

    monkeypatch.setattr(learner, "_sample", look)
    t = threading.Thread(target=other)
    t.start()
    try:
        learner.sample()
    finally:
        stop.set()
        t.join()
    assert 0.2 <= learner.cost < 0.35, learner.cost


# -- how much the daemon keeps ----------------------------------------------------------


def _learned_map(max_entries: int) -> int:
    """A kernel hash map shaped as bk_learned, of this size."""
    from support import BPF_MAP_TYPE_HASH, map_create

    from bpfkeep.progs import maps

    key_size = len(maps.path_key(1, peers.ANY, bytes(16)))
    return map_create(
        BPF_MAP_TYPE_HASH, b"bk_test_learned", key_size, maps.LEARNED.size, max_entries
    )


def _learner_on(fd: int, policy: Policy):
    """A Learner whose daemon state holds one attached policy (cgroup id 7)
    and whose pin directory holds ``fd`` as bk_learned."""
    import contextlib
    from types import SimpleNamespace

    from bpfkeep.daemon.learn import Learner

    class Pins:
        @contextlib.contextmanager
        def one(self, _name):
            yield fd

        def ring(self, _name):
            return None  # loss events are given to take() below

    cgroup = SimpleNamespace(display="/app.service")
    entry = SimpleNamespace(attached="ours", policy=policy, existing=False, cgroup=cgroup)
    state = SimpleNamespace(table={7: entry}, enforcer=SimpleNamespace(pins=Pins()), errors=0)
    learner = Learner(state)  # type: ignore[arg-type]
    learner.open()
    return learner


def _peer(i: int) -> bytes:
    """The i-th /24 of 10.0.0.0/8, IPv4 mapped."""
    return bytes(10) + b"\xff\xff" + bytes([10, (i >> 8) & 0xFF, i & 0xFF, 9])


def _loss_event(owner: int, address16: bytes, idle_s: float) -> bytes:
    from bpfkeep.progs import maps

    return maps.LOSS_EVENT.pack(
        owner=owner,
        tag=0,
        reason=maps.LOSS_REASONS.index("reset"),
        idle_ms=int(idle_s * 1000),
        path_idle_ms=int(idle_s * 1000),
        unacked=1,
        addr=list(address16),
    )


def test_what_is_learned_of_networks_stays_within_the_kernels_map():
    """A server under keepidle = "auto" for its own values learns per
    client network: every /24 that lost a connection or survived an idle
    one.  Internet clients come from without end: the daemon keeps at most
    what the kernel's map holds -- networks nothing was learned of go
    first, then the limits learned longest ago, from the map too -- and
    puts on /metrics only the networks a limit was learned for."""
    from bpfkeep.kernel import bpfsys

    room = 256
    fd = _learned_map(room)
    try:
        learner = _learner_on(fd, Policy.from_mapping({"keepidle": "auto"}))
        # Clients that were idle and came back: nothing learned of a limit.
        for i in range(3 * room):
            learner.survived(7, _peer(i), 443, 30.0, 0.0)
        assert len(learner.paths) <= room
        assert learner.rows() == []  # no limit known of any: no series
        # Losses on ever more networks: each lowers its network's keepidle.
        lost = [_peer(10_000 + i) for i in range(2 * room)]
        learner.take(_loss_event(7, a, 400.0) for a in lost)
        assert learner.state.errors == 0  # no write refused by a full map
        assert len(learner.paths) <= room
        in_map = bpfsys.map_keys(fd, len(maps_key()))
        assert len(in_map) <= room
        # The latest are known, in the daemon and in the kernel.
        newest = {maps_key(a) for a in lost[-room // 2 :]}
        assert newest <= set(learner.paths)
        assert newest <= set(in_map)
        rows = learner.rows()
        assert rows and all(r.limit == 400.0 for r in rows), rows[:3]
        assert len(rows) <= room
    finally:
        os.close(fd)


def maps_key(address16: bytes = bytes(16)) -> bytes:
    from bpfkeep.progs import maps

    return maps.path_key(7, peers.ANY, address16)
