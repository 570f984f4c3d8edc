"""Prometheus metrics: a custom collector that reads the BPF maps at scrape
time (per-CPU counters summed), in the manner of ebpf_exporter."""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector as _CollectorBase

from bpfkeep import __version__
from bpfkeep.bpfmaps import Counters
from bpfkeep.options import Policy


@dataclasses.dataclass
class Row:
    """One attached cgroup as the collector sees it."""

    cgroup: str  # label value: "/system.slice/nginx.service"
    policy: Policy | None
    counters: Counters | None


@dataclasses.dataclass
class Snapshot:
    rows: list[Row]
    expected: list[str]  # cgroups the config says should have a policy
    reconcile_errors: int = 0
    reconciles: int = 0
    coverage: dict[str, tuple[int, int]] | None = None  # cgroup -> (armed, established)
    audit_errors: int = 0


class Collector(_CollectorBase):
    """Yields bpfkeep's metric families from a snapshot source."""

    def __init__(self, source: Callable[[], Snapshot]):
        self._source = source

    def describe(self) -> Iterator:
        # Lets the registry learn the names without reading the maps.
        yield from self._families(Snapshot([], []))

    def collect(self) -> Iterator:
        yield from self._families(self._source())

    def _families(self, snap: Snapshot) -> Iterator:
        info = InfoMetricFamily("bpfkeep_build", "bpfkeep version and running kernel")
        info.add_metric([], {"version": __version__, "kernel": platform.release()})
        yield info

        attached = GaugeMetricFamily(
            "bpfkeep_policy_attached",
            "1 for each cgroup with a bpfkeep policy attached in the kernel",
            labels=["cgroup", "mode"],
        )
        expected = GaugeMetricFamily(
            "bpfkeep_policy_expected",
            "1 for each existing cgroup that the daemon's config gives a policy",
            labels=["cgroup"],
        )
        bound = GaugeMetricFamily(
            "bpfkeep_policy_dead_peer_bound_seconds",
            "keepidle + keepintvl * keepcnt of the attached policy",
            labels=["cgroup"],
        )
        sockets = CounterMetricFamily(
            "bpfkeep_sockets",
            "TCP sockets the policy was applied to, by socket callback",
            labels=["cgroup", "callback"],
        )
        inherited = CounterMetricFamily(
            "bpfkeep_sockets_inherited",
            "Accepted sockets that inherited keepalive from their listener",
            labels=["cgroup"],
        )
        applied = CounterMetricFamily(
            "bpfkeep_options_applied",
            "Socket options set successfully",
            labels=["cgroup", "option"],
        )
        failed = CounterMetricFamily(
            "bpfkeep_option_failures",
            "Socket options the kernel refused, by errno",
            labels=["cgroup", "option", "errno"],
        )
        rewritten = CounterMetricFamily(
            "bpfkeep_setsockopt_rewritten",
            "Application setsockopt calls rewritten in enforce mode",
            labels=["cgroup", "option"],
        )
        for row in snap.rows:
            mode = row.policy.mode if row.policy else "unknown"
            attached.add_metric([row.cgroup, mode], 1)
            if row.policy and row.policy.keepidle and row.policy.keepintvl:
                p = row.policy
                bound.add_metric([row.cgroup], p.keepidle + p.keepintvl * p.keepcnt)
            c = row.counters
            if c is None:
                continue
            for cb, n in c.seen.items():
                sockets.add_metric([row.cgroup, cb], n)
            inherited.add_metric([row.cgroup], c.inherited)
            for opt, n in c.applied.items():
                applied.add_metric([row.cgroup, opt], n)
            for (opt, err), n in c.failed.items():
                failed.add_metric([row.cgroup, opt, err], n)
            for opt, n in c.rewritten.items():
                rewritten.add_metric([row.cgroup, opt], n)
        for cg in snap.expected:
            expected.add_metric([cg], 1)
        yield from (attached, expected, bound, sockets, inherited, applied, failed, rewritten)

        yield GaugeMetricFamily(
            "bpfkeep_attached_policies", "Cgroups with a bpfkeep policy", value=len(snap.rows)
        )
        yield CounterMetricFamily(
            "bpfkeep_reconciles", "Reconcile passes of the daemon", value=snap.reconciles
        )
        yield CounterMetricFamily(
            "bpfkeep_reconcile_errors",
            "Cgroups the daemon failed to attach, update or detach",
            value=snap.reconcile_errors,
        )
        audit = GaugeMetricFamily(
            "bpfkeep_audit_sockets",
            "Established TCP sockets per attached cgroup, by keepalive timer state "
            "(inet_diag; sockets older than the policy show as off)",
            labels=["cgroup", "keepalive"],
        )
        for cg, (armed, total) in sorted((snap.coverage or {}).items()):
            audit.add_metric([cg, "armed"], armed)
            audit.add_metric([cg, "off"], total - armed)
        yield audit
        yield CounterMetricFamily(
            "bpfkeep_audit_errors", "Failed socket audits", value=snap.audit_errors
        )
