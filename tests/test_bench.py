"""The benchmark's own code (bench/): argument parsing, the report, the
connloop workload, and one tiny real run of the cost bench.

The full benchmark is not part of the suite (``sudo .venv/bin/python -m
bench``, see bench/README.md); these keep it working and take seconds.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # bench/ is not an installed package


def bench(name: str):
    return importlib.import_module(f"bench.{name}")


# -- no root needed ------------------------------------------------------------


def test_parser_accepts_the_documented_options():
    p = bench("cli").build_parser()
    a = p.parse_args(["--quick", "--only", "cost", "--only", "detect", "--rounds", "3"])
    assert a.quick and a.only == ["cost", "detect"] and a.rounds == 3
    a = p.parse_args(["--variants", "none,bpf-default", "--out", "/tmp/x", "--publish"])
    assert a.variants == "none,bpf-default" and a.out == Path("/tmp/x") and a.publish
    assert not p.parse_args([]).quick
    a = p.parse_args(["--method", "fin", "--method", "rst"])
    assert a.method == ["fin", "rst"] and p.parse_args([]).method is None


@pytest.mark.parametrize(
    "argv",
    [["--rounds", "0"], ["--conns", "many"], ["--only", "everything"], ["--method", "udp"]],
)
def test_parser_rejects_bad_values(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench("cli").build_parser().parse_args(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip()


def test_unknown_variant_is_refused():
    with pytest.raises(bench("common").BenchError, match="unknown cost variant"):
        bench("cost").variants("/nonexistent.so", ["none", "bpf-fast"])


@pytest.fixture(scope="module")
def connloop(tmp_path_factory) -> str:
    return bench("common").build_connloop(tmp_path_factory.mktemp("connloop"))


def _kv(out: str, prefix: str) -> dict[str, str]:
    common = bench("common")
    return common.parse_kv(common.line_starting(out, prefix))


def test_connloop_sets_nothing_unless_asked(connloop):
    out = subprocess.run(
        [connloop, "loop", "-n", "300", "-w", "0"], capture_output=True, text=True, check=True
    ).stdout
    assert _kv(out, "client ")["keepalive"] == "0"
    assert _kv(out, "accepted ")["keepalive"] == "0"
    res = _kv(out, "result ")
    assert int(res["conns"]) == 300 and float(res["cpu_ns_per_conn"]) > 0

    sets = ["--set", "keepidle=33", "--set", "user_timeout=4000", "--set", "keepalive=1"]
    out = subprocess.run(
        [connloop, "loop", "-n", "10", "-w", "0", *sets], capture_output=True, text=True, check=True
    ).stdout
    for role in ("client ", "accepted "):  # accepted sockets inherit the listener's
        got = _kv(out, role)
        assert (got["keepalive"], got["keepidle"], got["user_timeout"]) == ("1", "33", "4000")


@pytest.mark.kernel
@pytest.mark.parametrize(("close", "time_wait"), [("rst", 0), ("fin", 41)])
def test_connloop_close_methods(connloop, close, time_wait):
    """--close rst ends every connection with a RST (nothing in TIME_WAIT);
    --close fin closes plainly, the client first: each client socket (40
    and the one before the timing) is left in TIME_WAIT.  Counted with ss
    in a network namespace of the test's own (it goes with the process)."""
    script = (
        "ip link set lo up && "
        f"{connloop} loop -n 40 -w 0 --close {close} >/dev/null && "
        "ss -Htan state time-wait | wc -l"
    )
    out = subprocess.run(
        ["unshare", "--net", "sh", "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert int(out.strip()) == time_wait
    bad = subprocess.run([connloop, "loop", "--close", "soon"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def _fake_results(tmp_path: Path) -> dict:
    cost = bench("cost")
    vs = cost.variants("/nonexistent.so", ["none", "prev-default", "bpf-default"])
    times = {
        "none": [100.0, 110.0, 90.0],
        "prev-default": [101.0, 111.0, 91.0],
        "bpf-default": [102.0, 113.0, 92.0],
    }
    summary = cost.summarize(vs, times, times, {}, rounds=3, conns=10, warmup=0, cpu=0)
    fin = cost.summarize(
        vs, times, times, {}, rounds=3, conns=10, warmup=0, cpu=0, method="fin", method_label="x"
    )
    detect = {
        "params": {"reps": 1, "slack_s": 0.2},
        "rows": [
            {
                "scenario": "ka-2-1-3",
                "label": "keepalive 2/1/3",
                "tool": "bpf",
                "bound_s": 5.0,
                "median_s": 5.09,
                "max_s": 5.09,
                "over_bound_s": 0.09,
                "meets_target": True,
                "samples_s": [5.09],
                "errors": [],
            }
        ],
    }
    meta = {
        "kernel": "6.18",
        "cpu": "test",
        "cpus": 2,
        "date": "today",
        "commit": "abc",
        "quick": True,
        "duration_s": 1.0,
    }
    return {
        "meta": meta,
        "cost": summary,
        "cost-fin": fin,
        "detect": detect,
        "notes": ["a note"],
    }


def test_report_writes_json_markdown_and_charts(tmp_path):
    report = bench("report")
    results = _fake_results(tmp_path)
    row = results["cost"]["variants"][2]
    assert row["ratio"] == pytest.approx(1.02, abs=0.01)  # median of per-round ratios
    assert row["target"] == 1.03 and row["meets_target"] is True
    written = report.write(results, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    md = (tmp_path / "results.md").read_text()
    assert "| bpfkeep BPF, set mode, default policy |" in md
    # The new programs against the previous ones, paired per round.
    assert "vs the previous programs (946e221), paired per round: 1.011×" in md
    assert "### The two methods side by side" in md
    assert "| previous BPF programs (946e221), default policy | 1.010× (" in md
    assert "| keepalive 2/1/3 | bpf | 5.0 | 5.09 |" in md
    assert "- a note" in md
    pytest.importorskip("matplotlib")
    for name in ("cost.png", "cost-fin.png", "detect.png"):
        assert tmp_path / name in written
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


# -- the real kernel ---------------------------------------------------------------


@pytest.mark.kernel
def test_tiny_cost_run_end_to_end(tmp_path, capsys):
    """Three variants, both methods, one round, a few hundred connections:
    the whole path (build, scratch cgroups, private pin dirs, the previous
    programs compiled from git and attached, run, report)."""
    argv = ["--only", "cost", "--rounds", "1", "--conns", "300", "--method", "rst"]
    argv += ["--method", "fin", "--variants", "none,prev-default,bpf-default"]
    assert bench("cli").main([*argv, "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for section in ("cost", "cost-fin"):
        rows = {r["variant"]: r for r in results[section]["variants"]}
        assert set(rows) == {"none", "prev-default", "bpf-default"}
        assert rows["none"]["client_options"]["keepalive"] == 0
        for name in ("prev-default", "bpf-default"):  # read back from the kernel
            opts = rows[name]["client_options"]
            assert (opts["keepalive"], opts["keepidle"], opts["user_timeout"]) == (1, 15, 150_000)
            assert rows[name]["ratio"] > 0
    assert results["cost-fin"]["params"]["method"] == "fin"
    md = (tmp_path / "results.md").read_text()
    assert "| bpfkeep BPF, set mode, default policy |" in md
    assert "### The two methods side by side" in md
    assert "What it costs a connection" in capsys.readouterr().out
    # Everything this run made (its scratch cgroups, its pin dir and the
    # previous programs' pin dir) was removed again.  Other runs may go on
    # meanwhile: look at this run's own paths only.
    scratch = results["meta"]["scratch"]
    assert len(scratch) == 3 and all("bpfkeep-bench-" in p for p in scratch)
    assert [p for p in scratch if Path(p).exists()] == []
