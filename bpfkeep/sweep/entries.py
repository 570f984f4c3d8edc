"""The sweep's work items (``struct bk_sweep``): what the iterator is to do
with each target socket, made from the target and the namespace's
keepalive sysctls."""

from __future__ import annotations

from collections.abc import Callable

from bpfkeep import peers
from bpfkeep.kernel.sockdiag import LISTEN, SYN_SENT
from bpfkeep.options import Policy
from bpfkeep.progs import maps
from bpfkeep.sweep.engine import Make, Target


def apply_entry(target: Target, defaults: dict[str, int]) -> maps.SweepEntry:
    flags = maps.SWI_SYN_SENT if target.state == SYN_SENT else 0
    flags |= maps.SWI_HELD if target.held else 0
    if target.peered and target.state == LISTEN:
        # The listener of a policy whose values depend on the peer gets its
        # own values -- or, when the policy's listeners stay bare
        # (maps.bare_listeners), stays as the program made it: what
        # bpfkeep gave it before goes back to the namespace's defaults
        # (the kernel decides which).
        vals = _defaults_to_reset(defaults)
        return maps.SweepEntry(
            target.owner,
            maps.SWEEP_APPLY,
            flags | maps.SWI_LISTEN | maps.undo_flags(list(vals)),
            val=tuple(vals.get(o.key, 0) for o in maps.BPF_OPTIONS),
        )
    return maps.SweepEntry(
        target.owner, maps.SWEEP_APPLY, flags, peer=target.peer, port=target.port
    )


_RESET = {"keepalive": 0, "keepidle": 0, "keepintvl": 0, "keepcnt": 0, "user_timeout": 0}


def _defaults_to_reset(defaults: dict[str, int]) -> dict[str, int]:
    """The keepalive options as a socket has them when nothing set them:
    keepalive off, no user timeout, the namespace's times."""
    return {**_RESET, **{k: v for k, v in defaults.items() if k in _RESET}}


def values_for(policy: Policy, target: Target) -> Policy | None:
    """The values ``policy`` gave this target's socket: its own, a peer
    rule's, or None (an exempt peer: it gave none)."""
    if not policy.peers:
        return policy
    ps = maps.peer_set(policy)
    if ps is None:
        return policy
    address, _, port = target.remote.rpartition(":")
    rule = peers.match(ps.table, address, int(port) if port.isdigit() else 0)
    return policy if rule == 0 else policy.peers[rule - 1].policy


def handover_entry(former: Policy) -> Make:
    """Work items for sockets whose policy is gone, handed to an ancestor's:
    a socket without a record that carries ``former``'s values got them
    from bpfkeep, not from its program."""

    def make(target: Target, defaults: dict[str, int]) -> maps.SweepEntry:
        e = apply_entry(target, defaults)
        given = values_for(former, target)
        if given is not None:
            e.in_flags |= maps.SWI_FP
            e.fp = maps.fingerprint(given)
        return e

    return make


# TCP_WINDOW_CLAMP cannot go back to 0 ("none") once a socket listens: the
# kernel accepts 0 only on a closed socket (tcp_set_window_clamp).  The
# largest clamp is the same as none: an accepted socket's clamp is the
# smaller of it and 65535 << the window scale, as without a clamp
# (tcp_select_initial_window).
NO_WINDOW_CLAMP = 2**31 - 1


def undo_entry(policy: Policy) -> Make:
    """Work items that take a detached policy's values off a socket: the
    options the program did not set itself go back to the namespace's
    defaults (keepalive off, no user timeout)."""
    reset = dict(_RESET)
    if policy.maxseg:
        reset["maxseg"] = 0
    if policy.window_clamp:
        reset["window_clamp"] = NO_WINDOW_CLAMP

    def make(target: Target, defaults: dict[str, int]) -> maps.SweepEntry:
        given = values_for(policy, target)
        if given is None:
            return read_entry(target, defaults)  # an exempt peer's: never touched
        vals = {**reset, **{k: v for k, v in defaults.items() if k in reset}}
        return maps.SweepEntry(
            target.owner,
            maps.SWEEP_UNDO,
            maps.undo_flags(list(vals)) | maps.SWI_FP,
            val=tuple(vals.get(o.key, 0) for o in maps.BPF_OPTIONS),
            fp=maps.fingerprint(given),
        )

    return make


def keep_entry(policy: Policy) -> Make:
    """Work items for a detached policy's connections: their values stay
    (detach takes the policy off listeners only), but a socket without a
    record gets one saying the values were bpfkeep's -- else a policy
    attached later (a parent's, the same cgroup's again) would take them
    for the program's own and leave them."""

    def make(target: Target, defaults: dict[str, int]) -> maps.SweepEntry:
        given = values_for(policy, target)
        if given is None:
            return read_entry(target, defaults)  # an exempt peer's: never touched
        return maps.SweepEntry(
            target.owner,
            maps.SWEEP_UNDO,
            maps.SWI_FP | maps.SWI_KEEP,
            fp=maps.fingerprint(given),
        )

    return make


def read_entry(target: Target, _defaults: dict[str, int]) -> maps.SweepEntry:
    return maps.SweepEntry(0, maps.SWEEP_READ)


def relearn_entry(
    policies: dict[int, Policy], before: Callable[[int, str, bytes], int | None]
) -> Make:
    """Work items after the keepidle learned for some paths changed (no
    generation changes with it): every socket's values are checked again
    (SWI_RECHECK), and one still at what bpfkeep gave it before --
    ``before(owner, label, address16)``, the keepidle its path had then --
    is recognised as bpfkeep's (SWI_FP), not taken for the program's own."""

    def make(target: Target, defaults: dict[str, int]) -> maps.SweepEntry:
        e = apply_entry(target, defaults)
        e.in_flags |= maps.SWI_RECHECK
        policy = policies.get(target.owner)
        if policy is None or target.state == LISTEN:
            return e
        address, _, port = target.remote.rpartition(":")
        _label, old = peers.effective(
            policy,
            address,
            int(port) if port.isdigit() else 0,
            lambda label, a16: before(target.owner, label, a16),
        )
        if old is not None:
            e.in_flags |= maps.SWI_FP
            e.fp = maps.fingerprint(old)
        return e

    return make


# Their items depend only on the owner, the socket's state and whether it
# is held, for owners whose values do not depend on the peer: the sweep
# makes and encodes one per kind, not one per socket (engine.Sweep).
apply_entry.by_kind = True  # type: ignore[attr-defined]
read_entry.by_kind = True  # type: ignore[attr-defined]
