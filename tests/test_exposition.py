"""The daemon's own text-format writer against prometheus_client's: the
same bytes for every family bpfkeep makes, odd cgroup names included, and
generate_latest's own output for anything else (no root needed)."""

from __future__ import annotations

import os
import random

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
