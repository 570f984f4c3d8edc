"""The daemon's own text-format writer against prometheus_client's: the
same bytes for every family bpfkeep makes, odd cgroup names included, and
generate_latest's own output for anything else (no root needed); and on
real counters read back from the kernel (root)."""

from __future__ import annotations

import os
import random
import socket

import pytest
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families

from bpfkeep.audit.sockets import established_coverage
from bpfkeep.enforcer import Enforcer
from bpfkeep.kernel.cgroups import printable
from bpfkeep.metrics.collector import Collector, Row, Snapshot
from bpfkeep.metrics.exposition import exposition
from bpfkeep.options import Policy
from bpfkeep.progs.maps import Counters, SweepStats

ODD = [
    "/system.slice/nginx.service",
    '/a"quoted"/b',
    "/back\\slash",
    "/new\nline",
    "/dé.service",
    "/kubepods/besteffort/poda/x",
    "",
    # A name with the raw bytes 0xff 0xfe and one with the characters
    # \\xff\\xfe: two names, two label values (see cgroups.printable).
    "/deleg/" + printable(os.fsdecode(b"bad\xff\xfe")),
    "/deleg/" + printable("bad\\xff\\xfe"),
]


def _counters(i: int) -> Counters:
    return Counters(
        seen={"connect": 3 + i, "listen": 1, "passive_established": 2 * i},
        inherited=i,
        applied={"keepidle": 3, "keepintvl": 3, "user_timeout": 10**7 + i},
        failed={("maxseg", "EINVAL"): 1} if i % 2 else {},
        rewritten={"keepidle": i},
        sweep=SweepStats(swept=i, app_own=1, applied={"keepidle": i}, failed={}),
    )


def _snapshot(mode: str) -> Snapshot:
    rows = [
        Row(cg, Policy(keepidle=30 + i) if i % 3 else Policy(), _counters(i))
        for i, cg in enumerate(ODD)
    ]
    return Snapshot(
        rows,
        expected=ODD[:4],
        reconcile_errors=2,
        reconciles=7,
        coverage={cg: (i, 2 * i) for i, cg in enumerate(ODD)},
        audit_errors=1,
        unmanaged=[ODD[1]],
        workloads={
            ODD[5]: {"namespace": "shop", "pod": "a", "container": "app"},
            ODD[2]: {"container": 'web"1'},
        },
        workload_labels=mode,
        audit_cpu_seconds=0.401,
        audit_every_seconds=401.0,
    )


@pytest.mark.parametrize("mode", ["container", "namespace", "none"])
def test_the_daemons_families_are_written_as_generate_latest_writes_them(mode):
    reg = CollectorRegistry()
    reg.register(Collector(lambda: _snapshot(mode), keepalive_sysctls=lambda: (7200, 75, 9)))
    ours = exposition(reg)
    assert ours == generate_latest(reg)
    # And it parses: every sample of the daemon's families is there, each
    # series once.
    series = [
        (s.name, tuple(sorted(s.labels.items())))
        for f in text_string_to_metric_families(ours.decode())
        for s in f.samples
    ]
    assert len(series) > 100 and len(series) == len(set(series))


def test_other_families_are_left_to_generate_latest():
    reg = CollectorRegistry()
    Counter("things", "with _created", ["k"], registry=reg).labels('a"b').inc(3)
    Gauge("level", "help with \\ and \n", registry=reg).set(1.5e20)
    Histogram("lat", "a histogram", registry=reg).observe(0.2)
    Info("build", "info", registry=reg).info({"version": "1\n2"})
    Counter("ugly", "a label name generate_latest escapes", ["a.b"], registry=reg).labels("x").inc()
    assert exposition(reg) == generate_latest(reg)


def test_random_label_values():
    rng = random.Random(8)
    alphabet = 'ab"\\\n\t é€\x00{}=,'
    reg = CollectorRegistry()
    g = Gauge("g", "random", ["cgroup", "mode"], registry=reg)
    for _ in range(300):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        g.labels(value, rng.choice(["set", "enforce"])).set(rng.uniform(-1e9, 1e9))
    assert exposition(reg) == generate_latest(reg)


@pytest.mark.kernel
def test_real_counters_are_written_as_the_old_path_writes_them(bk, pin_dir, cgroups, spawn, probes):
    """Real data: cgroups attached through the CLI (odd names among them),
    connections made in them, counters and sweep statistics read back from
    the kernel as the daemon reads them, the audit's real coverage; then
    the text written straight from the rows (exposition) against the old
    path (prometheus_client families, with_workload_labels, generate_latest)."""
    names = ["plain", 'quo"te', "back\\slash", "dé"]
    paths = [cgroups.make(n) for n in names]
    for i, p in enumerate(paths):
        mode = ["--mode", "enforce"] if i % 2 else []
        bk("attach", "--cgroup", p, "--keepidle", str(30 + i), "--maxseg", "1200", *mode)
    srv = socket.create_server(("127.0.0.1", 0), backlog=64)
    port = srv.getsockname()[1]
    try:
        held = [
            spawn([probes["static"], "connect", "127.0.0.1", str(port), "hold"], cgroup=p)
            for p in paths
            for _ in range(2)
        ]
        for h in held:
            h.values("client")
        accepted = [srv.accept()[0] for _ in held]
        enf = Enforcer(pin_dir)
        by_id = {a.cgroup_id: a for a in enf.attachments() if a.cgroup is not None}
        ids = [os.stat(p).st_ino for p in paths]
        counters = enf.read_counters(ids)
        rows = sorted(
            (Row(by_id[i].cgroup.display, by_id[i].policy, counters[i]) for i in ids),
            key=lambda r: r.cgroup,
        )
        assert all(r.counters and r.counters.seen["connect"] >= 2 for r in rows)
        cov = established_coverage()
        coverage = {by_id[i].cgroup.display: cov.get(i, (0, 0)) for i in ids}
        assert any(armed for armed, _ in coverage.values())
        for mode in ("container", "namespace", "none"):
            snap = Snapshot(
                rows,
                expected=[r.cgroup for r in rows],
                reconciles=3,
                coverage=coverage,
                unmanaged=[rows[0].cgroup],
                workloads={
                    rows[1].cgroup: {"namespace": "shop", "pod": "a", "container": "app"},
                    rows[2].cgroup: {"namespace": "shop", "pod": "b", "container": "app"},
                    rows[3].cgroup: {"container": "web-1"},
                },
                workload_labels=mode,
            )
            reg = CollectorRegistry()
            reg.register(Collector(lambda snap=snap: snap))
            assert exposition(reg) == generate_latest(reg), mode
        for c in accepted:
            c.close()
    finally:
        srv.close()
