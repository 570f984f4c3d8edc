"""``bpfkeep audit``: the command line over audit.sockets (what inet_diag
shows, no privileges) and audit.check (the values in force, as root)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterable, Iterator

from bpfkeep import learning, peers
from bpfkeep.audit.check import (
    CHECKED,
    EXEMPT,
    OFF,
    OK,
    OWN,
    check_summary,
    describe,
    known_limits,
    policy_check,
)
from bpfkeep.audit.sockets import (
    ESTABLISHED_NAME,
    LISTEN_NAME,
    SocketRecord,
    coverage,
    scan,
    unknown,
)
from bpfkeep.enforcer import Enforcer
from bpfkeep.errors import BpfkeepError
from bpfkeep.kernel.cgroups import by_ids, resolve
from bpfkeep.kernel.privileges import has_bpf_privileges


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="which TCP sockets have keepalive armed, per cgroup (read from the kernel)",
        description="List the TCP sockets of this network namespace with their "
        "cgroup, owner and keepalive timer, and per cgroup how many established "
        "sockets have keepalive armed.  With privileges, also check every socket "
        "under a bpfkeep policy (in every network namespace of its processes): the "
        "values in force, read from the kernel, against the policy, with the "
        "reason for each socket that differs.",
    )
    p.add_argument(
        "--cgroup",
        metavar="PATH",
        help="only this cgroup's sockets (not its descendants'); cgroup v2 path, "
        "absolute or relative to the cgroup2 mount",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _cgroup_names(ids: Iterable[int]) -> dict[int, str]:
    ids = {i for i in ids if i}
    try:
        found = by_ids(ids)
    except BpfkeepError:  # no cgroup2 mount: ids are all we have
        found = {}
    names = {0: "(unknown cgroup)"}
    for i in ids:
        names[i] = found[i].display if i in found else f"(removed cgroup {i})"
    return names


def _policy_cgroups(pin_dir: str | None) -> set[int]:
    """Cgroup ids bpfkeep has links pinned for (best effort: needs to read
    the pin directory, nothing more)."""
    with contextlib.suppress(OSError):
        return Enforcer(pin_dir).pinned_ids()
    return set()


def _path_or_none(name: str) -> str | None:
    return name if name.startswith("/") else None


def _covering(name: str, policy_names: set[str]) -> str | None:
    """The cgroup whose policy applies to sockets of cgroup ``name``: itself
    or its nearest ancestor with a policy."""
    probe = name
    while True:
        if probe in policy_names:
            return probe
        if probe in ("/", "") or not probe.startswith("/"):
            return None
        probe = probe.rsplit("/", 1)[0] or "/"


def _limits(pin_dir: str | None) -> learning.Limits | None:
    """The idle limits known of paths (needs to read bpfkeep's maps)."""
    if not has_bpf_privileges():
        return None
    try:
        return known_limits(Enforcer(pin_dir).attachments())
    except (BpfkeepError, OSError):
        return None


def at_risk(
    r: SocketRecord, limits: learning.Limits | None, owner: int | None
) -> learning.Known | None:
    """The idle limit an established socket's keepalive cannot beat (its
    policy's, ``owner``; or a network's), or None."""
    if limits is None or r.state != ESTABLISHED_NAME or not r.keepalive_known:
        return None
    end = peers.endpoint(r.remote)
    known = limits.of(owner, *end) if end else None
    if known is None or not learning.at_risk(known, r.keepalive, r.keepidle_seen):
        return None
    return known


def _rows(
    records: list[SocketRecord], names: dict[int, str], risk: dict[int, learning.Known]
) -> Iterator[list[str]]:
    for r in records:
        if r.state == LISTEN_NAME:
            ka = "-"
        elif not r.keepalive_known:
            ka = f"? ({r.timer_name})"
        else:
            ka = "armed" if r.keepalive else "off"
        owner = f"{r.pid}/{r.comm}" if r.pid is not None else "-"
        known = risk.get(id(r))
        row = [r.state, r.local, r.remote, ka, owner, names[r.cgroup_id]]
        if risk:
            row.append(describe(known) if known else "-")
        yield row


def _table(rows: list[list[str]], header: list[str], out) -> None:
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def coverage_line(name: str, armed: int, total: int, busy: int = 0) -> str:
    """``/system.slice/x.service: 12/14 established sockets with keepalive
    armed (2 uncovered)``"""
    line = f"{name}: {armed}/{total} established sockets with keepalive armed"
    notes = []
    if total - armed:
        notes.append(f"{total - armed} uncovered")
    if busy:
        notes.append(f"{busy} more busy retransmitting: keepalive not visible")
    return line + (f" ({'; '.join(notes)})" if notes else "")


def run(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    # A --pin-dir that is no pin directory is an error, not an empty
    # policy check.
    Enforcer(getattr(args, "pin_dir", None)).check_pin_dir()
    cgroup_id = None
    if getattr(args, "cgroup", None):
        # Read-only: the root cgroup is as fine to look at as any other.
        cgroup_id = resolve(args.cgroup, force_root=True).id
    records = scan(cgroup_id)
    records.sort(
        key=lambda r: (r.cgroup_id, r.state != ESTABLISHED_NAME, r.state, r.local, r.remote)
    )
    policy_ids = _policy_cgroups(getattr(args, "pin_dir", None))
    checks, unreachable, why_not = _policy_check_or_reason(getattr(args, "pin_dir", None))
    names = _cgroup_names({r.cgroup_id for r in records} | policy_ids)
    policy_names = {names[i] for i in policy_ids if names[i].startswith("/")}
    cov = coverage(records)
    busy = unknown(records)
    limits = _limits(getattr(args, "pin_dir", None))
    policy_id = {names[i]: i for i in policy_ids}
    risk: dict[int, learning.Known] = {}
    for r in records:
        covering = _covering(names[r.cgroup_id], policy_names)
        known = at_risk(r, limits, policy_id.get(covering) if covering else None)
        if known is not None:
            risk[id(r)] = known
    summary = []
    for cg in sorted(cov, key=lambda i: names[i]):
        armed, total = cov[cg]
        summary.append(
            {
                "cgroup_id": cg,
                "cgroup": _path_or_none(names[cg]),
                "policy_from": _covering(names[cg], policy_names),
                "armed": armed,
                "established": total,
                "uncovered": total - armed,
                "unknown": busy.get(cg, 0),
            }
        )
    if args.json:
        socks = []
        for r in records:
            d = r.as_dict()
            d["cgroup"] = _path_or_none(names[r.cgroup_id])
            known = risk.get(id(r))
            d["at_risk"] = (
                {"idle_limit": known.limit, "source": known.source, "peer": known.label}
                if known
                else None
            )
            socks.append(d)
        check = None
        if checks is not None:
            check = {
                "sockets": [c.as_dict() for c in checks],
                "summary": check_summary(checks),
                "unreachable": unreachable,
            }
        json.dump(
            {"sockets": socks, "coverage": summary, "policy_check": check, "why_not": why_not},
            out,
            indent=2,
        )
        out.write("\n")
        return 0

    header = ["STATE", "LOCAL", "REMOTE", "KEEPALIVE", "PID/COMM", "CGROUP"]
    if risk:
        header.append("AT RISK")
    conns = [r for r in records if r.state != LISTEN_NAME]
    listeners = [r for r in records if r.state == LISTEN_NAME]
    if conns:
        _table(list(_rows(conns, names, risk)), header, out)
    else:
        print("no TCP connections", file=out)
    if listeners:
        print(
            "\nlisteners (no keepalive timer of their own; accepted sockets inherit "
            "the listener's options):",
            file=out,
        )
        _table(list(_rows(listeners, names, risk)), header, out)
    print("\ncoverage (this network namespace):", file=out)
    if not summary:
        print("  no established TCP sockets", file=out)
    for s in summary:
        line = coverage_line(names[s["cgroup_id"]], s["armed"], s["established"], s["unknown"])
        if s["policy_from"]:
            line += f" [policy: {s['policy_from']}]"
        print("  " + line, file=out)
    if risk:
        print(
            f"  {len(risk)} connection(s) AT RISK: their keepalive cannot beat their path's "
            "idle limit (keepalive off, or keepidle at or above it)",
            file=out,
        )
    print_policy_check(checks, unreachable, why_not, out)
    return 0


def _policy_check_or_reason(pin_dir: str | None):
    """(checks, unreachable, None), or (None, None, why the check cannot run)."""
    if not has_bpf_privileges():
        return None, None, "run as root to read the values in force on each socket"
    try:
        checks, unreachable = policy_check(pin_dir)
    except BpfkeepError as e:
        return None, None, str(e)
    except OSError as e:  # e.g. only another bpfkeep version's objects pinned
        return None, None, f"cannot read bpfkeep's objects ({e}); run bpfkeep attach or doctor"
    return checks, unreachable, None


def print_policy_check(checks, unreachable, why_not, out) -> None:
    print("\npolicy check (values in force, read from the kernel):", file=out)
    if why_not:
        print(f"  not available: {why_not}", file=out)
        return
    if not checks:
        print("  no TCP socket under a bpfkeep policy", file=out)
    # Each policy's sockets by peer rule and at risk, in one pass.
    peers_of: dict[str, dict[str, int]] = {}
    risky_in: dict[str, int] = {}
    for c in checks:
        by = peers_of.setdefault(c.policy_cgroup, {})
        by[c.peer] = by.get(c.peer, 0) + 1
        if c.at_risk:
            risky_in[c.policy_cgroup] = risky_in.get(c.policy_cgroup, 0) + 1
    for cg, counts in sorted(check_summary(checks).items()):
        total = sum(counts.values()) - counts[EXEMPT]
        line = f"  {cg}: {counts[OK]}/{total} sockets at the policy"
        extra = []
        risky = risky_in.get(cg, 0)
        if risky:
            extra.append(f"{risky} at risk")
        if counts[OWN]:
            extra.append(f"{counts[OWN]} with the program's own values (set mode)")
        if counts[OFF]:
            extra.append(f"{counts[OFF]} off-policy")
        if counts[EXEMPT]:
            extra.append(f"{counts[EXEMPT]} of exempt peers, left alone")
        by_peer = peers_of.get(cg, {})
        if set(by_peer) != {peers.ANY}:
            extra.append(
                "by peer rule: " + ", ".join(f"{p} {n}" for p, n in sorted(by_peer.items()))
            )
        print(line + (f" ({'; '.join(extra)})" if extra else ""), file=out)
    odd = [c for c in checks if c.verdict not in (OK, EXEMPT) or c.at_risk]
    if odd:
        rows = [
            [
                c.state,
                c.local,
                c.remote,
                c.peer,
                " ".join(str(c.values[k]) for k in CHECKED),
                c.verdict + (" AT RISK" if c.at_risk else ""),
                "; ".join(x for x in (c.reason if c.verdict != OK else "", c.at_risk) if x),
            ]
            for c in odd
        ]
        print("", file=out)
        header = ["STATE", "LOCAL", "REMOTE", "PEER", "KA IDLE INTVL CNT UT", "VERDICT", "WHY"]
        _table(rows, header, out)
    for what, why in sorted((unreachable or {}).items()):
        print(f"  {what}: not checked: {why}", file=out)
