"""Config loading and rule lookup at scale (no root, no kernel).

    .venv/bin/python -m bench.configload [--sizes 1000,4000,10000]

For each size N it builds a config of N [[policy]] tables and prints:

- load: ``config.loads`` of the text (TOML parse, validation, rules);
- error: the same text with a bad value in its last table, so that the
  line number has to be found (one pass over the text);
- index: building the rules' automaton (at the first lookup);
- lookup: ``policy_for`` and ``watch`` for N cgroups, as the daemon's
  start-up walk asks them, with plain-path rules ("system.slice/uI.service")
  and with glob rules ("**/uI-*.scope"), each cgroup matching one rule.

and the ratio of each time to the smallest size's: linear work grows
like the size ratio (1000 -> 10000: about 10x), quadratic work like its
square (about 100x; loading was 3.6 s at 1,000 and 54 s at 4,000).  The
daemon's targets at 10,000 policies: READY within 3 s, a reload within
1 s -- loading is only part of either.
"""

from __future__ import annotations

import argparse
import time

from bpfkeep import config

POLICY = 'mode = "enforce"\nkeepidle = 60\nkeepintvl = 10\nkeepcnt = 6\n'


def plain(n: int) -> str:
    return "".join(f'[[policy]]\ncgroup = "system.slice/u{i}.service"\n{POLICY}' for i in range(n))


def globs(n: int) -> str:
    return "".join(f'[[policy]]\ncgroup = "**/u{i}-*.scope"\n{POLICY}' for i in range(n))


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def lookups(cfg: config.Config, rels: list[str]) -> None:
    for rel in rels:
        cfg.policy_for(rel)
        cfg.watch(rel)


def measure(n: int) -> dict[str, float]:
    text = plain(n)
    load, cfg = timed(lambda: config.loads(text, "bench.toml"))
    bad = text + '[[policy]]\ncgroup = "x"\nkeepcnt = 500\n'

    def error() -> None:
        try:
            config.loads(bad, "bench.toml")
        except config.ConfigError:
            return
        raise AssertionError("the bad value was accepted")

    err, _ = timed(error)
    rels = [f"system.slice/u{i}.service" for i in range(n)]
    index, _ = timed(lambda: cfg.policy_for(""))  # built at the first lookup
    look, _ = timed(lambda: lookups(cfg, rels))
    gtext = globs(n)
    gload, gcfg = timed(lambda: config.loads(gtext, "bench.toml"))
    gindex, _ = timed(lambda: gcfg.policy_for(""))
    glook, _ = timed(lambda: lookups(gcfg, [f"user.slice/u{i}-1.scope" for i in range(n)]))
    return {
        "load_s": load,
        "error_s": err,
        "index_s": index,
        "lookup_s": look,
        "glob_load_s": gload,
        "glob_index_s": gindex,
        "glob_lookup_s": glook,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.configload", description=__doc__)
    p.add_argument("--sizes", default="1000,4000,10000", help="policy counts, comma-separated")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = [(n, measure(n)) for n in sizes]
    base_n, base = rows[0]
    cols = list(base)
    print(f"{'policies':>9} " + " ".join(f"{c:>14}" for c in cols))
    for n, r in rows:
        print(f"{n:>9} " + " ".join(f"{r[c]:>13.3f}s" for c in cols))
    for n, r in rows[1:]:
        ratios = " ".join(f"{r[c] / base[c] if base[c] else 0:>13.1f}x" for c in cols)
        print(f"{f'x{n / base_n:g}':>9} " + ratios)
    print("(x: size ratio to the first row; linear work grows by about the same factor)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
