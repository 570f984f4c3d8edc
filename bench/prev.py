"""The previous BPF programs (commit 946e221), for a side-by-side cost.

Before issue 8, bpfkeep's sock_ops program marked a socket as its own by
writing ``bpf_sock_ops.reply`` and marked configured listeners with the
RTO_CB callback flag; its policy (``struct bk_policy``, ``=QI8II``:
cgroup_id, flags, val[8], pad) lived in cgroup storage.  Today ownership is
kept in socket storage (``BPF_MAP_TYPE_SK_STORAGE`` with ``BPF_F_CLONE``).

The sources are taken from git at run time (``git show 946e221:bpf/...``)
into a temporary directory, compiled with bcc in a child process (so bcc's
LLVM never lives in the bench), and pinned in a pin directory of their own;
the bench then attaches them with bpf_links, as the old Enforcer did (both
hooks, sock_ops and cgroup/setsockopt), and writes the policy in the old
layout.  Everything is removed again with the session.

    python -m bench.prev SRC_DIR OBJ_DIR    # the child: compile and pin
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile

from bench.common import REPO, BenchError, compile_in_subprocess, log

COMMIT = "946e221"
FILES = ("keepalive.bpf.c", "bpfkeep.h", "bpfkeep_options.h")
OLD_POLICY_FMT = "=QI8II"  # struct bk_policy at 946e221
F_ACTIVE, F_ENFORCE = 0x1, 0x2
# Pinned objects in OBJ_DIR: (pin name, bcc name)
PROGS = (("prog_sockops", b"bk_sockops"), ("prog_setsockopt", b"bk_setsockopt"))
MAPS = (("map_policy", b"bk_policy"), ("map_counters", b"bk_counters"),
        ("map_policies", b"bk_policies"))  # fmt: skip


def sources(dest: str) -> None:
    """Write the three source files of COMMIT into dest."""
    for name in FILES:
        proc = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{COMMIT}:bpf/{name}"],
            capture_output=True,
            check=False,
        )
        if proc.returncode:
            raise BenchError(
                f"cannot read bpf/{name} of commit {COMMIT} ({proc.stderr.decode().strip()}): "
                "run the bench from a git checkout of bpfkeep with its history, "
                "or leave out the prev-* variants (--variants)"
            )
        with open(os.path.join(dest, name), "wb") as f:
            f.write(proc.stdout)


def encode_policy(cgroup_id: int, policy) -> bytes:
    """A policy in the old layout (bpfkeep/bpfmaps.py at 946e221)."""
    from bpfkeep.options import BPF_OPTIONS

    flags = F_ACTIVE | (F_ENFORCE if policy.mode == "enforce" else 0)
    vals = [policy.value(o.key) for o in BPF_OPTIONS]
    if len(vals) != 8:
        raise BenchError(f"the old layout has 8 options, this bpfkeep {len(vals)}")
    return struct.pack(OLD_POLICY_FMT, cgroup_id, flags, *vals, 0)


class Programs:
    """The old programs, compiled and pinned in ``pin_dir``; ``attach``
    puts them on a cgroup with a policy."""

    def __init__(self, session, pin_dir: str):
        self.session = session
        self.obj_dir = os.path.join(pin_dir, "obj")
        self.link_dir = os.path.join(pin_dir, "links")
        self.pin_dir = pin_dir
        os.makedirs(self.link_dir)
        session.defer(lambda: shutil.rmtree(pin_dir, ignore_errors=True))

        with tempfile.TemporaryDirectory(prefix="bpfkeep-prev-") as src:
            sources(src)
            compile_in_subprocess("bench.prev", [src, self.obj_dir], f"the programs of {COMMIT}")
        log(f"previous programs ({COMMIT}) compiled and pinned in {self.obj_dir}")

    def _obj(self, name: str) -> int:
        from bpfkeep.kernel import bpfsys

        return bpfsys.obj_get(os.path.join(self.obj_dir, name))

    def attach(self, path: str, policy) -> None:
        from bpfkeep.kernel import bpfsys

        cg_id = os.stat(path).st_ino
        cgfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        links: list[int] = []

        def undo() -> None:
            for lfd in links:
                with contextlib.suppress(OSError):
                    bpfsys.link_detach(lfd)
                os.close(lfd)

        self.session.defer(undo)
        try:
            for hook, atype in (("sockops", bpfsys.BPF_CGROUP_SOCK_OPS),
                                ("setsockopt", bpfsys.BPF_CGROUP_SETSOCKOPT)):  # fmt: skip
                prog = self._obj(f"prog_{hook}")
                try:
                    links.append(bpfsys.link_create(prog, cgfd, atype))
                finally:
                    os.close(prog)
        finally:
            os.close(cgfd)
        key = struct.pack("=Q", cg_id)
        value = encode_policy(cg_id, policy)
        for name, flags in (("map_policy", bpfsys.BPF_EXIST), ("map_policies", bpfsys.BPF_ANY)):
            fd = self._obj(name)
            try:
                bpfsys.map_update(fd, key, value, flags)
            finally:
                os.close(fd)


def _compile_and_pin(src: str, obj_dir: str) -> None:
    from bcc import BPF, BPFAttachType
    from bcc.libbcc import lib as libbcc

    from bpfkeep.kernel import bpfsys
    from bpfkeep.progs.loader import BPF_PROG_TYPE_CGROUP_SOCKOPT

    b = BPF(
        src_file=os.path.join(src, FILES[0]).encode(),
        cflags=[f"-I{src}", "-Wno-unused-function"],
    )
    fds = {
        "prog_sockops": b.load_func(b"bk_sockops", BPF.SOCK_OPS).fd,
        "prog_setsockopt": b.load_func(
            b"bk_setsockopt",
            BPF_PROG_TYPE_CGROUP_SOCKOPT,
            attach_type=BPFAttachType.CGROUP_SETSOCKOPT,
        ).fd,
    }
    for pinned, name in MAPS:
        fd = libbcc.bpf_table_fd(b.module, name)
        if fd < 0:
            raise RuntimeError(f"bcc lost map {name.decode()}")
        fds[pinned] = fd
    os.makedirs(obj_dir, exist_ok=True)
    for name, fd in fds.items():
        bpfsys.obj_pin(fd, os.path.join(obj_dir, name))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m bench.prev SRC_DIR OBJ_DIR", file=sys.stderr)
        return 2
    try:
        _compile_and_pin(*argv)
    except Exception as e:  # bcc raises bare Exception
        lines = str(e).strip().splitlines()
        print(f"bench.prev: {lines[-1] if lines else e!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
