"""The policy check (privileged): every socket under a bpfkeep policy, in
every network namespace of the policy's processes, with the values in
force read from the kernel by a read-only pass of the sweep program,
against the policy."""

from __future__ import annotations

import dataclasses

from bpfkeep import learning, peers
from bpfkeep.enforcer import Enforcer
from bpfkeep.kernel.privileges import require_privileges
from bpfkeep.kernel.procfs import keepalive_sysctls
from bpfkeep.kernel.sockdiag import ESTABLISHED, LISTEN, state_name
from bpfkeep.options import Policy, default_user_timeout
from bpfkeep.pins import read
from bpfkeep.progs import maps
from bpfkeep.sweep import runs
from bpfkeep.sweep.engine import Outcome

# What the check compares: the options that decide when a dead peer is
# noticed.  (getsockopt(TCP_MAXSEG) reports the MSS in use, not the value
# asked for, so it cannot be compared.)
CHECKED = ("keepalive", "keepidle", "keepintvl", "keepcnt", "user_timeout")
OK, OWN, OFF = "at-policy", "program's own (set mode)", "off-policy"
EXEMPT = "exempt"  # its peer rule leaves it as the program made it


@dataclasses.dataclass(frozen=True)
class PolicyCheck:
    """One socket under a policy, with the values in force on it."""

    netns: str
    state: str
    local: str
    remote: str
    cgroup_id: int
    policy_cgroup: str  # the policy that covers it
    mode: str
    values: dict[str, int]  # read from the kernel (bpf_getsockopt); -1: unknown
    verdict: str  # OK, OWN, OFF or EXEMPT
    reason: str
    peer: str = peers.ANY  # the peer rule it falls under (its label; * for none)
    at_risk: str = ""  # why its keepalive cannot beat its path's idle limit ("": it can)

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def verdict(policy: Policy, flags: int, entry: maps.SweepEntry) -> tuple[str, str]:
    """Whether the values in force match the policy, and why not."""
    vals = entry.values()
    index = {o.key: i for i, o in enumerate(maps.BPF_OPTIONS)}
    app = {k for k in CHECKED if entry.rec_app >> index[k] & 1}
    want = {k: policy.value(k) for k in CHECKED if policy.value(k)}
    if flags & maps.F_UT_DERIVED and app & {"keepidle", "keepintvl", "keepcnt"}:
        # The user timeout follows the times in force (set by the program).
        want["user_timeout"] = default_user_timeout(
            vals["keepidle"], vals["keepintvl"], vals["keepcnt"]
        )
    if policy.mode == "enforce":
        bad = [
            k
            for k, cap in want.items()
            if (vals[k] != 1 if k == "keepalive" else not 0 < vals[k] <= cap)
        ]
        if not bad:
            return OK, ""
        return OFF, "above the policy's bound: " + ", ".join(f"{k}={vals[k]}" for k in bad)
    differ = [k for k, v in want.items() if vals[k] != v]
    if not differ:
        return OK, ""
    if set(differ) <= app:
        return OWN, "set by the program: " + ", ".join(f"{k}={vals[k]}" for k in differ)
    if entry.rec_owner == 0:
        return OFF, (
            "never reached by bpfkeep: made before the policy and not swept "
            "(attached with --no-existing, or a kernel without the sweep)"
        )
    return OFF, "differs: " + ", ".join(f"{k}={vals[k]} (policy {want[k]})" for k in differ)


def policy_check(pin_dir: str | None) -> tuple[list[PolicyCheck], dict[str, str]]:
    """Every TCP socket under a bpfkeep policy, in every network namespace
    its cgroup's processes live in, with the values in force read from the
    kernel by a read-only pass of the sweep program.  Returns the checks
    and the namespaces that could not be entered (with the reason).

    Raises BpfkeepError without privileges or on a kernel without the sweep."""
    require_privileges()
    enf = Enforcer(pin_dir)
    atts = {a.cgroup_id: a for a in enf.attachments() if a.cgroup and a.policy}
    if not atts:
        return [], {}
    report = runs.read(enf.pins, [a.cgroup for a in atts.values()], set(atts))  # type: ignore[misc]
    known = read.learned(enf.pins)
    limits = known_limits(atts.values())
    host = keepalive_sysctls(fallback=True)
    out = []
    for o in report.outcomes:
        att = atts.get(o.target.owner)
        if att is None or att.policy is None or not o.entry.result & maps.SWR_SEEN:
            continue
        label, v, why = _check_one(att.policy, att.cgroup_id, o, known)
        out.append(
            PolicyCheck(
                netns=o.netns,
                state=state_name(o.target.state),
                local=o.target.local,
                remote=o.target.remote,
                cgroup_id=o.target.cgroup_id,
                policy_cgroup=att.cgroup.display,  # type: ignore[union-attr]
                mode=att.policy.mode,  # type: ignore[union-attr]
                values={k: o.entry.values()[k] for k in CHECKED},
                verdict=v,
                reason=why,
                peer=label,
                at_risk=_risk(limits, att.cgroup_id, o, host) if v != EXEMPT else "",
            )
        )
    return out, report.unreachable


def known_limits(atts) -> learning.Limits:
    """The idle limits known of paths: the policies' peer rules
    (idle_limit) and what the daemon learned (bk_learned, via
    read.attachments)."""
    policies = {a.cgroup_id: a.policy for a in atts if a.policy is not None}
    learned = [
        (a.cgroup_id, label, got.upper_ms / 1000)
        for a in atts
        for label, got in a.learned.items()
        if got.upper_ms
    ]
    return learning.Limits(policies, learned)


def describe(known: learning.Known) -> str:
    """``idle limit 350 s (stated for 0.0.0.0/0)``"""
    how = "learned" if known.source == "learned" else "stated"
    return f"idle limit {known.limit:.0f} s ({how} for {known.label})"


def _risk(limits: learning.Limits, owner: int, o: Outcome, host: tuple[int, int, int]) -> str:
    """Why this socket's keepalive in force cannot beat its path's idle
    limit, or "" (it can, or no limit is known)."""
    if o.target.state != ESTABLISHED:
        return ""
    end = peers.endpoint(o.target.remote)
    known = limits.of(owner, *end) if end else None
    if known is None:
        return ""
    values = o.entry.values()
    if values["keepalive"] < 0:
        return ""  # not read
    keepalive = values["keepalive"] > 0
    keepidle = values["keepidle"] if values["keepidle"] > 0 else host[0]
    if not learning.at_risk(known, keepalive, keepidle):
        return ""
    what = "keepalive off" if not keepalive else f"keepidle {keepidle} s"
    return f"{what}, {describe(known)}"


def _check_one(
    policy: Policy, owner: int, o: Outcome, known: dict[bytes, maps.Learned]
) -> tuple[str, str, str]:
    """(peer rule, verdict, reason) of one socket: checked against what its
    peer gets (a peer rule's values, the keepidle learned for its path)."""
    per_peer = bool(policy.peers) or policy.auto
    if per_peer and o.target.state == LISTEN:
        return peers.ANY, OK, "a listener: each accepted socket gets its own peer's values"
    address, _, port = o.target.remote.rpartition(":")

    def learned(label: str, address16: bytes) -> int | None:
        got = known.get(maps.path_key(owner, label, address16))
        return got.keepidle if got else None

    label, values = peers.effective(policy, address, int(port) if port.isdigit() else 0, learned)
    if values is None:
        return label, EXEMPT, "its peer is exempt: left as the program made it"
    v, why = verdict(values, maps.policy_flags(values), o.entry)
    return label, v, why


def check_summary(checks: list[PolicyCheck]) -> dict[str, dict[str, int]]:
    """policy cgroup -> counts of sockets by verdict."""
    out: dict[str, dict[str, int]] = {}
    for c in checks:
        d = out.setdefault(c.policy_cgroup, {OK: 0, OWN: 0, OFF: 0, EXEMPT: 0})
        d[c.verdict] += 1
    return out
