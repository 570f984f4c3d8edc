"""What an operator installs from deploy/ agrees with what the daemon
exports: the Grafana dashboard and the alerting rules name only metrics
the collector makes, and the dashboard is one a Grafana can import (no
root needed; promtool checks the rules themselves in test_daemon)."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

from bpfkeep.metrics.collector import Collector

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
NAME = re.compile(r"\bbpfkeep_[a-z0-9_]+")


def exported(families: bool = False) -> set[str]:
    """Every sample name /metrics can carry (and with ``families`` the
    families' own names, as descriptions mention them)."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "info": ("_info",),
    }
    names = set()
    for family in Collector(lambda: None).describe():  # type: ignore[arg-type,return-value]
        if families:
            names.add(family.name)
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana-dashboard.json").read_text())


def test_the_dashboard_names_only_exported_metrics():
    d = dashboard()
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in d["templating"]["list"] if v["type"] == "query"]
    named = {n for e in exprs for n in NAME.findall(e)}
    assert named, exprs
    assert named <= exported(), named - exported()
    # The families of lost connections and learned paths each have a panel.
    for family in (
        "bpfkeep_connections_lost_total",
        "bpfkeep_idle_before_loss_seconds_bucket",
        "bpfkeep_peer_idle_limit_seconds",
        "bpfkeep_peer_keepidle_seconds",
        "bpfkeep_connections_at_risk",
    ):
        assert family in named, family


def test_the_dashboards_panels_fit_the_grid_and_its_variables():
    panels = dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), ids
    cells = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for cell in itertools.product(
            range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])
        ):
            assert cell not in cells, (p["title"], cells.get(cell))
            cells[cell] = p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert 'instance=~"$instance"' in t["expr"], (p["title"], t["expr"])


def test_the_alerting_rules_name_only_exported_metrics():
    text = (DEPLOY / "prometheus" / "rules.yml").read_text()
    named = set(NAME.findall(text))
    assert {"bpfkeep_connections_lost_total", "bpfkeep_connections_at_risk"} <= named
    assert named <= exported(families=True), named - exported(families=True)
