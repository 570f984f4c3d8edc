"""results.json -> results.md (tables) and the charts (PNG, matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path


def _f(x: float | None, fmt: str = ".2f", none: str = "–") -> str:
    return none if x is None else format(x, fmt)


def _ok(flag: bool | None) -> str:
    return "" if flag is None else ("✅" if flag else "❌ missed")


def host_line(meta: dict) -> str:
    return (
        f"Linux {meta['kernel']}, {meta['cpu']} ({meta['cpus']} CPUs), "
        f"{meta['date']}, bpfkeep {meta['commit']}, "
        f"{'quick' if meta['quick'] else 'full'} run, {meta['duration_s']:.0f} s"
    )


COST_INTRO = (
    "Loopback connect + accept + close in one process: the listener, the client "
    "and the accepted socket all live in the variant's own cgroup (so the policy "
    "covers both ends), pinned to one CPU. CPU time of that process per "
    "connection: loopback packets are processed in the sending system call, so it "
    "holds the kernel's work on both ends. × none = median of the per-round ratios "
    'to the "none" run of the same round, with the 95 % confidence interval of '
    "that median (bootstrap) and the interquartile range of the rounds."
)

# The two methods side by side: what differs, in one paragraph.
METHODS_EXPLAINED = (
    "Both methods count the same thing: the CPU time of one process that holds "
    "the listener, the client and the accepted socket, all in the variant's "
    "cgroup (the accepted socket belongs to its listener's cgroup), i.e. both "
    "ends of every connection. They differ only in how a connection ends. The "
    "bench's method (rst) puts SO_LINGER {1, 0} on the listener and closes the "
    "accepted socket first: one RST ends both sockets and nothing enters "
    "TIME_WAIT. The plain method (fin) closes the client first with no linger: "
    "FIN and ACK both ways, and the client socket becomes a TIME_WAIT socket. "
    "That makes the bare connection dearer, while the work a keepalive tool adds "
    "(options set at connect, listen and accept; a timer armed and deleted) stays "
    "the same: the µs added per connection agree between the methods, the "
    "ratios do not (ratio = 1 + added / bare connection)."
)


def _added_us(cost: dict) -> dict[str, float]:
    """Per variant: median over the rounds of (variant - none), in µs."""
    import statistics

    base = next(r for r in cost["variants"] if r["variant"] == "none")["cpu_ns_per_conn"]
    return {
        r["variant"]: statistics.median(
            (x - b) / 1000 for x, b in zip(r["cpu_ns_per_conn"], base, strict=True)
        )
        for r in cost["variants"]
    }


def _cost_rows(cost: dict) -> list[str]:
    lines = [
        "| variant | CPU µs / conn | × none | 95 % CI | IQR | wall µs / conn "
        "| wall × none | target |",
        "|---|---:|---:|---|---|---:|---:|---|",
    ]
    for r in cost["variants"]:
        w = r["wall"]
        target = "" if r["target"] is None else f"≤ {r['target']:.2f}× {_ok(r['meets_target'])}"
        lo, hi = r["ratio_ci95"]
        lines.append(
            f"| {r['label']} | {r['median_us']:.2f} | **{r['ratio']:.3f}×** | "
            f"{lo:.3f}–{hi:.3f} | {r['ratio_p25']:.3f}–{r['ratio_p75']:.3f} | "
            f"{w['median_us']:.2f} | {w['ratio']:.3f}× | {target} |"
        )
    return lines


def _cost_checks(cost: dict) -> list[str]:
    lines: list[str] = []
    c = cost.get("checks", {})
    names = {"preload-shim": "defaults, five options", "preload-shim-4": "the same four options"}
    for key, what in names.items():
        chk = c.get(f"{key}_vs_libkeepalive")
        if isinstance(chk, dict):
            lo, hi = chk["ratio_ci95"]
            lines += [
                "",
                f"LD_PRELOAD shim ({what}) vs libkeepalive0, paired per round: "
                f"{chk['ratio']:.3f}× (95 % CI {lo:.3f}–{hi:.3f}; target: no slower, "
                f"i.e. the interval reaches 1: {_ok(chk['no_slower'])}).",
            ]
    pairs = {
        "bpf-default_vs_prev-default": ("the previous programs (946e221)", None),
        "bpf-default_vs_app-setsockopt": (
            "the application setting the options itself",
            "below, i.e. the whole interval under 1",
        ),
    }
    for key, (what, target) in pairs.items():
        chk = c.get(key)
        if isinstance(chk, dict):
            lo, hi = chk["ratio_ci95"]
            tail = f"; target: {target}: {_ok(chk['below'])}" if target else ""
            lines += [
                "",
                f"bpfkeep BPF, default policy, vs {what}, paired per round: "
                f"{chk['ratio']:.3f}× (95 % CI {lo:.3f}–{hi:.3f}{tail}).",
            ]
    return lines


def _inside_rows(cost: dict) -> list[str]:
    """The in-program pass: time inside each BPF variant's programs."""
    rows = [r for r in cost["variants"] if r.get("inside")]
    if not rows:
        return []
    ref = next((r["inside"] for r in rows if r["variant"] == "part-five"), None)
    lines = [
        "",
        "Time inside the BPF programs per connection, from the kernel's run-time "
        "statistics (BPF_ENABLE_STATS; runs of their own after the rounds, "
        f"median of {rows[0]['inside'].get('samples', 3)} runs of the same connections): "
        "the helpers they call (bpf_setsockopt: the kernel's "
        "work for each option, the keepalive timer armed) included. Counting adds "
        "two clock reads to every program run, the same for every variant: the "
        "empty program's figure is mostly that. Beside the ratios, this tells "
        "apart costs a few tens of nanoseconds apart.",
        "",
        "| variant | ns / conn inside | program runs / conn |"
        + (" + ns over the five options |" if ref else ""),
        "|---|---:|---:|" + ("---:|" if ref else ""),
    ]
    for r in rows:
        x = r["inside"]
        extra = f" {x['ns_per_conn'] - ref['ns_per_conn']:+.0f} |" if ref else ""
        lines.append(f"| {r['label']} | {x['ns_per_conn']:.0f} | {x['runs_per_conn']:.2f} |{extra}")
    return lines


def _method_line(cost: dict) -> str:
    p = cost["params"]
    label = p.get("method_label", "bench method: RST close")
    note = p.get("method_note", "")
    return (
        f"**{label}** ({p.get('method', 'rst')}): {note}. {p['conns']} connections "
        f"per run, {p['rounds']} interleaved rounds, CPU {p['cpu']}."
    )


def cost_table(cost: dict, heading: bool = True) -> list[str]:
    lines = ["## What it costs a connection", "", COST_INTRO, ""] if heading else []
    lines += [_method_line(cost), ""]
    lines += _cost_rows(cost)
    lines += _cost_checks(cost)
    lines += _inside_rows(cost)
    lines += ["", "Variants:", ""]
    lines += [f"- **{r['label']}**: {r['note']}" for r in cost["variants"] if r["note"]]
    return lines


def methods_table(costs: list[dict]) -> list[str]:
    """The same variants measured by each method, side by side: the ratio
    to "none" and the CPU time added per connection."""

    def name(c: dict) -> str:
        return c["params"].get("method", "rst")

    head = " | ".join(f"{name(c)}: × none (95 % CI) | {name(c)}: + µs / conn" for c in costs)
    bare = ", ".join(
        f"{name(c)} {next(r for r in c['variants'] if r['variant'] == 'none')['median_us']:.2f} µs"
        for c in costs
    )
    lines = [
        "### The two methods side by side",
        "",
        METHODS_EXPLAINED,
        "",
        f"The bare connection (no keepalive tool), CPU time: {bare}.",
        "",
        f"| variant | {head} |",
        "|---|" + "---:|---:|" * len(costs),
    ]
    rows = {name(c): {r["variant"]: r for r in c["variants"]} for c in costs}
    added = {name(c): _added_us(c) for c in costs}
    for r in costs[0]["variants"]:
        cells = []
        for c in costs:
            x = rows[name(c)].get(r["variant"])
            if x is None:
                cells += ["–", "–"]
                continue
            lo, hi = x["ratio_ci95"]
            cells += [
                f"{x['ratio']:.3f}× ({lo:.3f}–{hi:.3f})",
                f"{added[name(c)][r['variant']]:+.2f}",
            ]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return lines


def detect_table(det: dict) -> list[str]:
    lines = [
        "## Time to detect a dead peer",
        "",
        "Client and server in their own network namespaces behind a bridge; the "
        "server's link is cut, the client blocks in recv(). Time until ETIMEDOUT "
        f"({det['params']['reps']} repetitions), against the policy's bound; target: "
        f"worst case within bound + {det['params']['slack_s']} s. Tool `app`: the "
        "program sets the options itself with setsockopt, i.e. the kernel's own "
        "timing; the last column is what a tool adds to it.",
        "",
        "| scenario | tool | bound s | median s | worst s | over bound s | target | "
        "median vs app s |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    app = {r["scenario"]: r["median_s"] for r in det["rows"] if r["tool"] == "app"}
    for r in det["rows"]:
        err = f" ({'; '.join(r['errors'])})" if r["errors"] else ""
        base = app.get(r["scenario"])
        vs_app = None if base is None or r["median_s"] is None else r["median_s"] - base
        lines.append(
            f"| {r['label']} | {r['tool']} | {r['bound_s']:.1f} | {_f(r['median_s'])} | "
            f"{_f(r['max_s'])} | {_f(r['over_bound_s'], '+.2f')} | "
            f"{_ok(r['meets_target'])}{err} | {_f(vs_app, '+.2f')} |"
        )
    return lines


def daemon_table(dm: dict) -> list[str]:
    t, c = dm["targets"], dm["checks"]
    rows: list[tuple[str, str, str]] = []
    for kind, what in (("warm", "programs pinned"), ("cold", "cold (compiles the programs)")):
        if f"start_{kind}_s" in dm:
            rows.append(
                (
                    f"start → READY=1, {what}, median",
                    f"{dm[f'start_{kind}_s']['median']:.2f} s",
                    f"≤ {t['start_to_enforcing_s']:.0f} s {_ok(c[f'start_{kind}_ok'])}",
                )
            )
    idle, load, held = dm.get("idle"), dm.get("load"), dm.get("held")
    if "steady_rss_mb" in c:
        rows.append(
            (
                "RSS, idle / highest seen in any part of the run",
                f"{_f(idle and idle['rss_mb'], '.1f')} MB / {c['steady_rss_mb']:.1f} MB",
                f"≤ {t['rss_mb']:.0f} MB {_ok(c['rss_ok'])}",
            )
        )
    if idle:
        rows.append(
            (
                f"CPU idle ({idle['window_s']:.0f} s window, audits included)",
                f"{idle['cpu_percent']:.3f} %",
                "~0",
            )
        )
    if load:
        rows.append(
            (
                f"CPU while the workload opens {load['workload_per_second']:.0f} conn/s "
                "in an enforced cgroup",
                f"{load['cpu_percent']:.3f} % ({load['rss_mb']:.1f} MB)",
                "",
            )
        )
    scale = {r["cgroups"]: r for r in dm.get("scale", [])}
    for n in sorted(scale):
        s = scale[n]
        target = ""
        if n == 100:
            target = f"≤ {t['scrape_100_ms']:.0f} ms {_ok(c.get('scrape_100_ok'))}"
        rows.append(
            (
                f"scrape /metrics, {n} cgroups (median of {s['scrape']['n']}, "
                f"{s['scrape']['bytes'] // 1024} KiB)",
                f"{s['scrape']['median_ms']:.1f} ms (p90 {s['scrape']['p90_ms']:.1f})",
                target,
            )
        )
    for n in sorted(scale):
        s = scale[n]
        rows += [
            (
                f"{n} cgroups: start → READY, attaching all ({s['attached']} attached)",
                f"{s['start_attach_s']:.2f} s",
                "",
            ),
            (f"{n} cgroups: restart → READY, adopting all", f"{s['start_adopt_s']:.2f} s", ""),
            (
                f"{n} cgroups: SIGHUP with a changed policy → done "
                f"({s['updated_by_reload']} updated)",
                f"{s['reload_update_s']:.2f} s",
                "",
            ),
            (f"{n} cgroups: RSS", f"{s['rss_mb']:.1f} MB", ""),
        ]
    if held and idle:
        n = held["connections"]
        rows += [
            (
                f"{n} idle keepalive connections ({2 * n} sockets) in an enforced cgroup: "
                "RSS / CPU / scrape",
                f"{held['rss_mb']:.1f} MB / {held['cpu_percent']:.3f} % / "
                f"{held['scrape']['median_ms']:.1f} ms",
                f"without: {idle['rss_mb']:.1f} MB / {idle['cpu_percent']:.3f} % / "
                f"{idle['scrape']['median_ms']:.1f} ms",
            ),
            (
                "one audit pass (established sockets from inet_diag, counted as the daemon does)",
                f"{held['audit_pass_with']['cpu_ms']:.0f} ms CPU, "
                f"{held['audit_pass_with']['sockets']} established sockets",
                f"without: {held['audit_pass_before']['cpu_ms']:.1f} ms, "
                f"{held['audit_pass_before']['sockets']} sockets",
            ),
        ]
        dp = held.get("daemon_pass") or {}
        if "cpu_s" in dp and "every_s" in dp:
            rows.append(
                (
                    "the daemon's last periodic pass, sweep included (its /metrics): "
                    "CPU / wait before the next / long-run share of a CPU",
                    f"{dp['cpu_s'] * 1000:.0f} ms / {dp['every_s']:.0f} s / "
                    f"{100 * dp['cpu_s'] / dp['every_s']:.3f} %",
                    "≤ 0.1 % " + _ok(dp["cpu_s"] / dp["every_s"] <= 0.001 + 1e-9),
                )
            )
    lines = [
        "## The daemon",
        "",
        "`bpfkeep daemon` from this checkout, Type=notify through a private "
        "NOTIFY_SOCKET, config as shipped (enforce, 60/10/6, audit every 15 s) "
        "matching only scratch cgroups. CPU time summed over the daemon's threads.",
        "",
        "| measurement | value | target / compare |",
        "|---|---:|---|",
    ]
    lines += [f"| {a} | {b} | {c_} |" for a, b, c_ in rows]
    for step, err in dm.get("errors", {}).items():
        lines.append(f"\n**{step} failed:** {err}")
    return lines


def markdown(results: dict) -> str:
    lines = ["# bpfkeep benchmark results", "", host_line(results["meta"]), ""]
    costs = [results[k] for k in ("cost", "cost-fin") if k in results]
    for i, (key, png) in enumerate(
        (k, p) for k, p in (("cost", "cost.png"), ("cost-fin", "cost-fin.png")) if k in results
    ):
        lines += [*cost_table(results[key], heading=i == 0), ""]
        lines += [f"![connection cost, {results[key]['params'].get('method', 'rst')}]({png})", ""]
    if len(costs) > 1:
        lines += [*methods_table(costs), ""]
    if "detect" in results:
        lines += [*detect_table(results["detect"]), ""]
        lines += ["![time to detect a dead peer](detect.png)", ""]
    if "daemon" in results:
        lines += [*daemon_table(results["daemon"]), ""]
    for section, err in results.get("errors", {}).items():
        lines += [f"**{section} failed:** {err}", ""]
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    return "\n".join(lines)


# -- charts ---------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cost_chart(cost: dict, path: Path) -> None:
    plt = _plt()
    rows = cost["variants"]
    names = [r["label"] for r in rows]
    ratios = [r["ratio"] for r in rows]
    lo = [r["ratio"] - r["ratio_p25"] for r in rows]
    hi = [r["ratio_p75"] - r["ratio"] for r in rows]
    colors = [
        "#888888" if r["variant"] in ("none", "empty-sockops") else
        "#9ecae1" if r["variant"].startswith("prev") else
        "#bbbbbb" if r["variant"].startswith("part") else
        "#1f77b4" if r["variant"].startswith("bpf") else
        "#2ca02c" if r["variant"].startswith("preload") else "#d62728"
        for r in rows
    ]  # fmt: skip
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(rows) + 1.6))
    y = range(len(rows))[::-1]
    ax.barh(list(y), ratios, xerr=[lo, hi], color=colors, capsize=3)
    for yy, r in zip(y, rows, strict=True):
        ax.text(r["ratio_p75"] + 0.003, yy, f"{r['ratio']:.3f}×", va="center", fontsize=8)
    ax.set_yticks(list(y), names, fontsize=8)
    ax.axvline(1.0, color="black", lw=0.8)
    for r in rows:
        if r["target"]:
            ax.axvline(r["target"], color="#1f77b4", ls="--", lw=0.8)
            ax.text(r["target"], len(rows) - 0.4, f" target {r['target']:.2f}×", fontsize=7)
    left = min(0.97, min(r["ratio_p25"] for r in rows) - 0.01)
    right = max(r["ratio_p75"] for r in rows) + 0.04
    ax.set_xlim(left, right)
    ax.set_xlabel("CPU time per connection, × no keepalive tool (median, IQR)")
    method = cost["params"].get("method", "rst")
    how = {"rst": "RST close", "fin": "plain close, FIN + TIME_WAIT"}.get(method, method)
    ax.set_title(f"What keepalive costs a loopback connect+accept+close ({how})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def detect_chart(det: dict, path: Path) -> None:
    """Time to ETIMEDOUT minus the bound, per scenario and tool."""
    plt = _plt()
    rows = det["rows"]
    slack = det["params"]["slack_s"]
    scen = list(dict.fromkeys(r["scenario"] for r in rows))
    tools = list(dict.fromkeys(r["tool"] for r in rows))
    colors = {
        "bpf": "#1f77b4",
        "preload": "#2ca02c",
        "libkeepalive": "#d62728",
        "app": "#7f7f7f",  # the kernel alone: the program sets the options itself
    }
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(tools)
    labelled: set[str] = set()
    for i, s in enumerate(scen):
        for j, t in enumerate(tools):
            r = next((x for x in rows if x["scenario"] == s and x["tool"] == t), None)
            if not r or not r["samples_s"]:
                continue
            x = i - 0.4 + width * (j + 0.5)
            over = [v - r["bound_s"] for v in r["samples_s"]]
            label = None if t in labelled else t
            labelled.add(t)
            ax.bar(x, r["median_s"] - r["bound_s"], width * 0.9, color=colors.get(t), label=label)
            ax.plot([x] * len(over), over, "k.", ms=4)
            ax.text(x, max(over) + 0.01, f"{r['median_s']:.2f}", ha="center", fontsize=7)
    ax.axhline(0, color="black", lw=0.8)
    ax.axhline(slack, color="gray", ls=":", lw=1)
    ax.text(-0.45, slack, f"target: bound + {slack} s", va="bottom", fontsize=8, color="gray")
    labels = [
        f"{next(r['label'] for r in rows if r['scenario'] == s)}\n(bound "
        f"{next(r['bound_s'] for r in rows if r['scenario'] == s):g} s)"
        for s in scen
    ]
    ax.set_xticks(range(len(scen)), labels, fontsize=8)
    ax.set_ylabel("seconds after the bound")
    ax.set_title("Dead peer: time to ETIMEDOUT minus the policy's bound (bars: median, dots: runs)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0, 0.9))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "results.json", out_dir / "results.md"]
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown(results))
    try:
        for key, png in (("cost", "cost.png"), ("cost-fin", "cost-fin.png")):
            if key in results:
                cost_chart(results[key], out_dir / png)
                written.append(out_dir / png)
        if "detect" in results:
            detect_chart(results["detect"], out_dir / "detect.png")
            written.append(out_dir / "detect.png")
    except ImportError:
        print(
            "bench: matplotlib missing, no charts (pip install '.[bench]')",
            flush=True,
        )
    return written
