"""``bpfkeep`` with the daemon's reloads profiled (bench.reload --profile).

    python bench/profiled.py OUT.prof ARGS...

runs ``bpfkeep ARGS...`` (the bpfkeep on PYTHONPATH: the checkout under
test) with cProfile on while the daemon reloads (``Daemon.reload``; the
sweeps it asks for run on the daemon's sweeping thread, not profiled), and
writes the statistics to OUT.prof when it exits.  Run as a script, not as
``-m bench.profiled``: another checkout's ``bench`` package must not
shadow this one.
"""

from __future__ import annotations

import atexit
import cProfile
import functools
import os
import sys


def main(argv: list[str]) -> int:
    out, args = argv[0], argv[1:]
    # Not bench/ first on the path (its cli.py, common.py, ...): the
    # checkout's bpfkeep and the libraries only.
    if sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]
    from bpfkeep import cli
    from bpfkeep.daemon import loop

    prof = cProfile.Profile()
    depth = [0]
    armed = [False]  # from the first reload on: not the sweep the start queued

    def profiled(fn, arms: bool = False):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            armed[0] |= arms
            if not armed[0]:
                return fn(*a, **kw)
            depth[0] += 1
            if depth[0] == 1:
                prof.enable()
            try:
                return fn(*a, **kw)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    prof.disable()

        return wrapper

    loop.Daemon.reload = profiled(loop.Daemon.reload, arms=True)
    atexit.register(prof.dump_stats, out)
    return cli.main(args)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
