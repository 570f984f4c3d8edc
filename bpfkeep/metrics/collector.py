"""The collector: bpfkeep's metric families from a snapshot of the daemon,
read from the BPF maps at scrape time (per-CPU counters summed), in the
manner of ebpf_exporter.  Each family is one line of a table: its name,
type, help, labels and how a row (one attached cgroup) gives its samples.
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector as _CollectorBase

from bpfkeep import __version__
from bpfkeep.kernel.procfs import keepalive_sysctls
from bpfkeep.metrics.workloads import with_workload_labels
from bpfkeep.options import Policy, dead_peer_bound
from bpfkeep.progs.maps import Counters, Losses


@dataclasses.dataclass
class Row:
    """One attached cgroup as the collector sees it."""

    cgroup: str  # label value: "/system.slice/nginx.service"
    policy: Policy | None
    counters: Counters | None
    losses: dict[str, Losses] | None = None  # peer label ("*": none) -> lost connections


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
    # Sweeps asked for (new cgroups, reloads, changed policies) and not done
    # yet (None: the daemon does not say).
    sweep_backlog: int | None = None


Samples = Iterable[tuple[tuple[str, ...], float]]  # (label values after cgroup, value)


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
    return lambda row, _host: (
        ((opt,), n) for opt, n in ((pick(row.counters) or {}) if row.counters else {}).items()
    )


def _failures(pick: Callable[[Counters], dict[tuple[str, str], int] | None]) -> Callable:
    return lambda row, _host: (
        ((opt, err), n)
        for (opt, err), n in ((pick(row.counters) or {}) if row.counters else {}).items()
    )


def _sockets(row: Row, _host: tuple[int, int, int]) -> Samples:
    c = row.counters
    if c is None:
        return
    yield from (((cb,), n) for cb, n in c.seen.items())
    if c.sweep is not None:
        # The sweep counts as one more "callback": sockets that existed
        # before the policy (or its last update).
        yield ("sweep",), c.sweep.swept


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
        lambda row, _host: (
            ((peer, reason), n)
            for peer, ls in sorted((row.losses or {}).items())
            for reason, n in ls.lost.items()
        ),
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
        snap = self._source()
        for family in self._families(snap):
            yield with_workload_labels(family, snap.workloads, snap.workload_labels)

    def _families(self, snap: Snapshot) -> Iterator:
        info = InfoMetricFamily("bpfkeep_build", "bpfkeep version and running kernel")
        info.add_metric([], {"version": __version__, "kernel": platform.release()})
        yield info
        host = self._sysctls() if any(r.policy for r in snap.rows) else (0, 0, 0)
        per_cgroup = [self._per_cgroup(spec, snap.rows, host) for spec in PER_CGROUP]
        yield from per_cgroup[:AFTER_ATTACHED]
        yield _listed(
            "bpfkeep_policy_expected",
            "1 for each existing cgroup that the daemon's config gives a policy",
            snap.expected,
        )
        yield _listed(
            "bpfkeep_policy_unmanaged",
            "1 for each cgroup the config matches whose policy was attached by hand "
            "(bpfkeep attach): the daemon leaves it alone",
            snap.unmanaged,
        )
        yield from per_cgroup[AFTER_ATTACHED:]
        yield _idle_before_loss(snap.rows)
        yield from _daemon(snap)

    @staticmethod
    def _per_cgroup(spec: PerCgroup, rows: list[Row], host: tuple[int, int, int]):
        family = spec.kind(spec.name, spec.help, labels=["cgroup", *spec.labels])
        for row in rows:
            for values, n in spec.samples(row, host):
                family.add_metric([row.cgroup, *values], n)
        return family


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


def _listed(name: str, help_: str, cgroups: list[str]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_, labels=["cgroup"])
    for cg in cgroups:
        family.add_metric([cg], 1)
    return family


def _daemon(snap: Snapshot) -> Iterator:
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
    audit = GaugeMetricFamily(
        "bpfkeep_audit_sockets",
        "Established TCP sockets per attached cgroup, by keepalive timer state "
        "(inet_diag; sockets the policy has not reached show as off)",
        labels=["cgroup", "keepalive"],
    )
    for cg, (armed, total) in sorted((snap.coverage or {}).items()):
        audit.add_metric([cg, "armed"], armed)
        audit.add_metric([cg, "off"], total - armed)
    yield audit
    yield CounterMetricFamily(
        "bpfkeep_audit_errors", "Failed socket audits", value=snap.audit_errors
    )
    if snap.audit_cpu_seconds is not None:
        yield GaugeMetricFamily(
            "bpfkeep_audit_pass_cpu_seconds",
            "CPU time of the last periodic sweep and audit pass",
            value=snap.audit_cpu_seconds,
        )
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
            "reloads, changed policies): network namespaces and requests waiting",
            value=snap.sweep_backlog,
        )
