"""The collector: bpfkeep's metric families from a snapshot of the daemon,
read from the BPF maps at scrape time (per-CPU counters summed), in the
manner of ebpf_exporter.  Each family is one line of a table: its name,
type, help, labels and how a row (one attached cgroup) gives its samples.
The families with a series per cgroup are metrics.family.CgroupFamily:
written in the text format straight from the rows (a scrape of 10,000
cgroups writes ~330,000 samples).
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector as _CollectorBase

from bpfkeep import __version__
from bpfkeep.kernel.procfs import keepalive_sysctls
from bpfkeep.metrics.family import CgroupFamily, CgroupLabels, CgroupTable, Samples
from bpfkeep.metrics.workloads import with_workload_labels
from bpfkeep.options import BPF_OPTIONS, Policy, dead_peer_bound
from bpfkeep.progs.maps import CALLBACKS, Counters, Losses


@dataclasses.dataclass
class Row:
    """One attached cgroup as the collector sees it."""

    cgroup: str  # label value: "/system.slice/nginx.service"
    policy: Policy | None
    counters: Counters | None
    losses: dict[str, Losses] | None = None  # peer label ("*": none) -> lost connections


@dataclasses.dataclass(frozen=True)
class PathRow:
    """One path a policy learns its idle limit for (keepidle = "auto")."""

    cgroup: str
    peer: str  # the peer rule's label, or the network learned for
    limit: float | None  # seconds; None: nothing lost yet
    keepidle: int  # in force for the path's connections


@dataclasses.dataclass
class Snapshot:
    rows: list[Row]
    expected: list[str]  # cgroups the config says should have a policy
    reconcile_errors: int = 0
    reconciles: int = 0
    coverage: dict[str, tuple[int, int]] | None = None  # cgroup -> (armed, established)
    audit_errors: int = 0
    unmanaged: list[str] = dataclasses.field(default_factory=list)  # attached by hand
    # Containers: cgroup -> {"namespace", "pod", "container"} where the
    # runtime told; "container" adds them to every per-cgroup series,
    # "namespace" sums Kubernetes containers' series per namespace, "none"
    # leaves them out (see with_workload_labels).
    workloads: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    workload_labels: str = "container"
    # The last sweep and audit pass's CPU time (None: no pass yet), and the
    # wait before the next pass it leads to (None: no pass yet, audits off).
    audit_cpu_seconds: float | None = None
    audit_every_seconds: float | None = None
    # Container cgroups seen that no runtime identified (daemon.workloads).
    containers_unidentified: int = 0
    paths: list[PathRow] = dataclasses.field(default_factory=list)
    # (cgroup, peer) -> established connections whose keepalive cannot beat
    # their path's known idle limit (the periodic pass; outside policies too).
    at_risk: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    enforce: EnforceSnapshot | None = None
    # Sweeps asked for (new cgroups, reloads, changed policies) and not done
    # yet (None: the daemon does not say).
    sweep_backlog: int | None = None


@dataclasses.dataclass
class EnforceSnapshot:
    """Enforce mode past the cgroup hook (daemon.enforce)."""

    every_seconds: float  # between two passes over the enforced cgroups
    tracing: bool  # setsockopt past the hook caught at once
    repairs: int  # repair sweeps run on the tracing programs' word
    repair_cpu_seconds: float
    pass_cpu_seconds: float | None  # the last pass's (None: none yet)


@dataclasses.dataclass(frozen=True)
class PerCgroup:
    """A family with one or more series per attached cgroup: its labels
    start with ``cgroup``, then ``labels``."""

    name: str
    kind: type  # CounterMetricFamily or GaugeMetricFamily
    help: str
    labels: tuple[str, ...]
    samples: Callable[[Row, tuple[int, int, int]], Samples]  # (row, host sysctls)


def _by_option(pick: Callable[[Counters], dict[str, int] | None]) -> Callable:
    def samples(row: Row, _host: tuple[int, int, int]) -> Samples:
        d = (pick(row.counters) or {}) if row.counters else {}
        # zip and map, not a generator: a scrape of 10,000 cgroups takes
        # ~240,000 samples from these.
        return zip(map(_AS_LABEL.__getitem__, d), d.values(), strict=True)

    return samples


# (name,) for each option and callback name: one tuple each, not one a sample.
_AS_LABEL = {k: (k,) for k in (*(o.key for o in BPF_OPTIONS), *CALLBACKS)}


def _failures(pick: Callable[[Counters], dict[tuple[str, str], int] | None]) -> Callable:
    # The keys are (option, errno) already.
    return lambda row, _host: ((pick(row.counters) or {}) if row.counters else {}).items()


def _sockets(row: Row, _host: tuple[int, int, int]) -> Samples:
    c = row.counters
    if c is None:
        return ()
    out = list(zip(map(_AS_LABEL.__getitem__, c.seen), c.seen.values(), strict=True))
    if c.sweep is not None:
        # The sweep counts as one more "callback": sockets that existed
        # before the policy (or its last update).
        out.append((("sweep",), c.sweep.swept))
    return out


def _one(value: Callable[[Row], float | None]) -> Callable:
    def samples(row: Row, _host: tuple[int, int, int]) -> Samples:
        v = value(row)
        return [] if v is None else [((), v)]

    return samples


PER_CGROUP: tuple[PerCgroup, ...] = (
    PerCgroup(
        "bpfkeep_policy_attached",
        GaugeMetricFamily,
        "1 for each cgroup with a bpfkeep policy attached in the kernel",
        ("mode",),
        lambda row, _host: [((row.policy.mode if row.policy else "unknown",), 1)],
    ),
    PerCgroup(
        "bpfkeep_policy_dead_peer_bound_seconds",
        GaugeMetricFamily,
        "keepidle + keepintvl * keepcnt of the attached policy "
        "(a time left at 0: the host's net.ipv4.tcp_keepalive_* sysctl)",
        (),
        lambda row, host: [((), dead_peer_bound(row.policy, host))] if row.policy else [],
    ),
    PerCgroup(
        "bpfkeep_sockets",
        CounterMetricFamily,
        "TCP sockets the policy was applied to, by socket callback",
        ("callback",),
        _sockets,
    ),
    PerCgroup(
        "bpfkeep_sockets_inherited",
        CounterMetricFamily,
        "Accepted sockets that inherited keepalive from their listener",
        (),
        _one(lambda row: row.counters.inherited if row.counters else None),
    ),
    PerCgroup(
        "bpfkeep_sockets_exempt",
        CounterMetricFamily,
        "New TCP sockets left as they were: their peer is exempt by a peer rule",
        (),
        _one(lambda row: row.counters.exempt if row.counters else None),
    ),
    PerCgroup(
        "bpfkeep_options_applied",
        CounterMetricFamily,
        "Socket options set successfully",
        ("option",),
        _by_option(lambda c: c.applied),
    ),
    PerCgroup(
        "bpfkeep_option_failures",
        CounterMetricFamily,
        "Socket options the kernel refused, by errno",
        ("option", "errno"),
        _failures(lambda c: c.failed),
    ),
    PerCgroup(
        "bpfkeep_setsockopt_rewritten",
        CounterMetricFamily,
        "Application setsockopt calls rewritten in enforce mode",
        ("option",),
        _by_option(lambda c: c.rewritten),
    ),
    PerCgroup(
        "bpfkeep_enforce_bypassed",
        CounterMetricFamily,
        "setsockopt calls past the cgroup hook (a 32-bit call, another tool's program) that "
        "left an option outside the enforced policy, by option; counted where the kernel runs "
        "bpfkeep's fexit programs",
        ("option",),
        _by_option(lambda c: c.enforce.bypassed if c.enforce else None),
    ),
    PerCgroup(
        "bpfkeep_enforce_repaired",
        CounterMetricFamily,
        "Sockets of an enforced policy the daemon brought back within it after a setsockopt "
        "the cgroup hook did not see, by option set back",
        ("option",),
        _by_option(lambda c: c.enforce.repaired if c.enforce else None),
    ),
    PerCgroup(
        "bpfkeep_sweep_kept_program_values",
        CounterMetricFamily,
        "Existing sockets the sweep left with their program's own keepalive (set mode)",
        (),
        _one(
            lambda row: row.counters.sweep.app_own if row.counters and row.counters.sweep else None
        ),
    ),
    PerCgroup(
        "bpfkeep_sweep_options_applied",
        CounterMetricFamily,
        "Socket options the sweep set on sockets that already existed",
        ("option",),
        _by_option(lambda c: c.sweep.applied if c.sweep else None),
    ),
    PerCgroup(
        "bpfkeep_sweep_option_failures",
        CounterMetricFamily,
        "Socket options the kernel refused to the sweep, by errno",
        ("option", "errno"),
        _failures(lambda c: c.sweep.failed if c.sweep else None),
    ),
    PerCgroup(
        "bpfkeep_connections_lost",
        CounterMetricFamily,
        "Connections of the policy the kernel ended in error, by peer rule (* for the "
        "policy's own values) and reason: keepalive (probes unanswered: a dead peer caught "
        "while idle), user_timeout (data unacknowledged past TCP_USER_TIMEOUT), retransmits "
        "(the kernel's retry limit), reset (a RST from the peer or a middlebox)",
        ("peer", "reason"),
        lambda row, _host: [
            ((peer, reason), n)
            for peer, ls in sorted((row.losses or {}).items())
            for reason, n in ls.lost.items()
        ],
    ),
)
# Where the families of cgroup lists (not rows) go among PER_CGROUP's.
AFTER_ATTACHED = 1


class Collector(_CollectorBase):
    """Yields bpfkeep's metric families from a snapshot source."""

    def __init__(
        self,
        source: Callable[[], Snapshot],
        keepalive_sysctls: Callable[[], tuple[int, int, int]] = keepalive_sysctls,
    ):
        self._source = source
        # What a policy's keepalive time left at 0 is: the host's sysctl,
        # read at scrape time.
        self._sysctls = keepalive_sysctls

    def describe(self) -> Iterator:
        # Lets the registry learn the names without reading the maps.
        yield from self._families(Snapshot([], []))

    def collect(self) -> Iterator:
        yield from self._families(self._source())

    def _families(self, snap: Snapshot) -> Iterator:
        info = InfoMetricFamily("bpfkeep_build", "bpfkeep version and running kernel")
        info.add_metric([], {"version": __version__, "kernel": platform.release()})
        yield info
        host = self._sysctls() if any(r.policy for r in snap.rows) else (0, 0, 0)
        cgroups = CgroupLabels(snap.workloads, snap.workload_labels)
        table = CgroupTable(snap.rows, lambda row: row.cgroup, cgroups, host)
        per_cgroup = [
            table.family(spec.name, spec.kind, spec.help, spec.labels, spec.samples)
            for spec in PER_CGROUP
        ]
        yield from per_cgroup[:AFTER_ATTACHED]
        yield _listed(
            cgroups,
            "bpfkeep_policy_expected",
            "1 for each existing cgroup that the daemon's config gives a policy",
            snap.expected,
        )
        yield _listed(
            cgroups,
            "bpfkeep_policy_unmanaged",
            "1 for each cgroup the config matches whose policy was attached by hand "
            "(bpfkeep attach): the daemon leaves it alone",
            snap.unmanaged,
        )
        yield from per_cgroup[AFTER_ATTACHED:]
        for family in (_idle_before_loss(snap.rows), *_paths(snap)):
            yield with_workload_labels(family, snap.workloads, snap.workload_labels)
        yield from _daemon(snap, cgroups)


def _idle_before_loss(rows: list[Row]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(
        "bpfkeep_idle_before_loss_seconds",
        "How long each lost connection had been idle (no data either way) when the "
        "kernel ended it, by peer rule",
        labels=["cgroup", "peer"],
    )
    for row in rows:
        for peer, ls in sorted((row.losses or {}).items()):
            family.add_metric([row.cgroup, peer], ls.cumulative(), ls.idle_seconds)
    return family


def _paths(snap: Snapshot) -> tuple[GaugeMetricFamily, ...]:
    """What was learned of each path, and the connections at risk."""
    limit = GaugeMetricFamily(
        "bpfkeep_peer_idle_limit_seconds",
        "The idle limit known of a path (keepidle = auto): the shortest idle a connection "
        "was lost after, or the rule's idle_limit when lower; absent until one is known",
        labels=["cgroup", "peer"],
    )
    keepidle = GaugeMetricFamily(
        "bpfkeep_peer_keepidle_seconds",
        "The keepidle in force for a path's connections (keepidle = auto): a peer rule's, "
        "or a network's once a limit was learned of it",
        labels=["cgroup", "peer"],
    )
    for p in sorted(snap.paths, key=lambda p: (p.cgroup, p.peer)):
        if p.limit is not None:
            limit.add_metric([p.cgroup, p.peer], p.limit)
        keepidle.add_metric([p.cgroup, p.peer], p.keepidle)
    risk = GaugeMetricFamily(
        "bpfkeep_connections_at_risk",
        "Established connections whose keepalive cannot beat their path's known idle "
        "limit (keepalive off, or keepidle at or above it), by cgroup (the policy's, or "
        "the connection's own outside every policy) and peer",
        labels=["cgroup", "peer"],
    )
    for (cg, peer), n in sorted(snap.at_risk.items()):
        risk.add_metric([cg, peer], n)
    return limit, keepidle, risk


def _listed(cgroups: CgroupLabels, name: str, help_: str, listed: list[str]) -> CgroupFamily:
    return CgroupFamily(
        name, GaugeMetricFamily, help_, (), lambda: ((cg, (((), 1),)) for cg in listed), cgroups
    )


def _daemon(snap: Snapshot, cgroups: CgroupLabels) -> Iterator:
    """The daemon's own health and the periodic audit."""
    yield GaugeMetricFamily(
        "bpfkeep_attached_policies", "Cgroups with a bpfkeep policy", value=len(snap.rows)
    )
    yield CounterMetricFamily(
        "bpfkeep_reconciles", "Reconcile passes of the daemon", value=snap.reconciles
    )
    yield CounterMetricFamily(
        "bpfkeep_reconcile_errors",
        "Errors the daemon met while keeping the policies attached: failed attach, "
        "update, detach or walk of the cgroup tree, and pins or links it had to restore",
        value=snap.reconcile_errors,
    )
    yield GaugeMetricFamily(
        "bpfkeep_containers_unidentified",
        "Container cgroups seen that no runtime identified: none knew the id, or one that "
        "could be theirs cannot be asked (its API down); workload rules do not apply to them",
        value=snap.containers_unidentified,
    )
    coverage = sorted((snap.coverage or {}).items())
    yield CgroupFamily(
        "bpfkeep_audit_sockets",
        GaugeMetricFamily,
        "Established TCP sockets per attached cgroup, by keepalive timer state "
        "(inet_diag; sockets the policy has not reached show as off)",
        ("keepalive",),
        lambda: ((cg, ((("armed",), a), (("off",), t - a))) for cg, (a, t) in coverage),
        cgroups,
    )
    yield CounterMetricFamily(
        "bpfkeep_audit_errors", "Failed socket audits", value=snap.audit_errors
    )
    if snap.audit_cpu_seconds is not None:
        yield GaugeMetricFamily(
            "bpfkeep_audit_pass_cpu_seconds",
            "CPU time of the last periodic sweep and audit pass",
            value=snap.audit_cpu_seconds,
        )
    if snap.enforce is not None:
        yield from _enforce(snap.enforce)
    if snap.audit_every_seconds is not None:
        yield GaugeMetricFamily(
            "bpfkeep_audit_interval_seconds",
            "Seconds a whole periodic sweep and audit pass takes now: audit_interval, "
            "or 1000 times the CPU time a whole pass needs when longer (the passes "
            "take ~0.1 % of a CPU however many sockets the host has; namespaces of "
            "owners that cost little are swept every audit_interval regardless)",
            value=snap.audit_every_seconds,
        )
    if snap.sweep_backlog is not None:
        yield GaugeMetricFamily(
            "bpfkeep_sweep_backlog",
            "Sweeps of existing sockets asked for and not done yet (new cgroups, "
            "reloads, changed policies, repairs, relearned keepidle): network "
            "namespaces and requests waiting",
            value=snap.sweep_backlog,
        )


def _enforce(e: EnforceSnapshot) -> Iterator:
    yield GaugeMetricFamily(
        "bpfkeep_enforce_tracing",
        "1 when a setsockopt the cgroup hook does not see (a 32-bit call) is caught at once "
        "(the kernel runs bpfkeep's fexit programs); 0: the enforce pass repairs it",
        value=1 if e.tracing else 0,
    )
    yield GaugeMetricFamily(
        "bpfkeep_enforce_interval_seconds",
        "Seconds between passes over the enforced cgroups (enforce_interval, or the audit "
        "interval when shorter; no backoff, but out of the periodic sweeps' CPU budget): the "
        "bound on a repair without tracing",
        value=e.every_seconds,
    )
    yield CounterMetricFamily(
        "bpfkeep_enforce_repairs", "Repair sweeps on the tracing programs' word", value=e.repairs
    )
    yield CounterMetricFamily(
        "bpfkeep_enforce_repair_cpu_seconds",
        "CPU time of those repairs (each waits 20 times the last one's)",
        value=e.repair_cpu_seconds,
    )
    if e.pass_cpu_seconds is not None:
        yield GaugeMetricFamily(
            "bpfkeep_enforce_pass_cpu_seconds",
            "CPU time of the last pass over the enforced cgroups",
            value=e.pass_cpu_seconds,
        )
