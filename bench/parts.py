"""The pieces of a keepalive sock_ops program, each priced on its own.

``bench/parts.bpf.c`` is compiled once per piece list (``-DBK_PARTS=``)
with bcc in a child process, as bench/prev.py does, pinned in a pin
directory of its own and attached like the empty program.  The variants
add one piece at a time to "keepalive on both ends with the five options",
so that the table says what a socket storage lookup, a getsockopt, a
storage element created per socket and one cloned to every accepted
socket each cost a connection.

    python -m bench.parts OBJ_DIR NAME=PARTS ...    # the child
"""

from __future__ import annotations

import os
import shutil
import sys

from bench.common import REPO, compile_in_subprocess, log

SOURCE = REPO / "bench" / "parts.bpf.c"
KEEPALIVE, FOUR, GETKA, LOOKUP, CREATE, CLONE = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20
FIVE = KEEPALIVE | FOUR
# variant name -> (pieces, label, note)
PARTS = {
    "part-ka": (KEEPALIVE, "piece: SO_KEEPALIVE only", "one bpf_setsockopt at connect and listen"),
    "part-five": (
        FIVE,
        "piece: the five options",
        "keepidle, keepintvl, keepcnt, user_timeout, then SO_KEEPALIVE; nothing else",
    ),
    "part-five-getka": (
        FIVE | GETKA,
        "piece: five + getsockopt at accept",
        "+ bpf_getsockopt(SO_KEEPALIVE) on every accepted socket",
    ),
    "part-five-lookup": (
        FIVE | LOOKUP,
        "piece: five + storage lookups",
        "+ bpf_sk_storage_get without F_CREATE at connect and accept (none found)",
    ),
    "part-five-create": (
        FIVE | CREATE,
        "piece: five + a record per client",
        "+ bpf_sk_storage_get(F_CREATE) at connect: allocated, freed at close",
    ),
    "part-five-clone": (
        FIVE | CREATE | CLONE,
        "piece: five + records cloned at accept",
        "+ a BPF_F_CLONE record on the listener: copied to every accepted socket",
    ),
}


class Parts:
    """The piece programs, compiled and pinned in ``pin_dir``."""

    def __init__(self, session, pin_dir: str):

        self.session = session
        self.obj_dir = pin_dir
        session.defer(lambda: shutil.rmtree(pin_dir, ignore_errors=True))
        specs = [f"{name}={parts}" for name, (parts, _, _) in PARTS.items()]
        compile_in_subprocess("bench.parts", [self.obj_dir, *specs], "bench/parts.bpf.c")
        log(f"piece programs compiled and pinned in {self.obj_dir}")

    def attach(self, name: str, path: str) -> None:
        from bpfkeep.kernel import bpfsys

        self.session.attach_sockops(bpfsys.obj_get(os.path.join(self.obj_dir, name)), path)


def _compile_and_pin(obj_dir: str, specs: list[str]) -> None:
    from bcc import BPF

    from bpfkeep.kernel import bpfsys

    os.makedirs(obj_dir, exist_ok=True)
    for spec in specs:
        name, _, parts = spec.partition("=")
        b = BPF(src_file=str(SOURCE).encode(), cflags=[f"-DBK_PARTS={int(parts)}"])
        fn = b.load_func(b"bk_parts", BPF.SOCK_OPS)
        bpfsys.obj_pin(fn.fd, os.path.join(obj_dir, name))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print("usage: python -m bench.parts OBJ_DIR NAME=PARTS ...", file=sys.stderr)
        return 2
    try:
        _compile_and_pin(argv[0], argv[1:])
    except Exception as e:  # bcc raises bare Exception
        lines = str(e).strip().splitlines()
        print(f"bench.parts: {lines[-1] if lines else e!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
