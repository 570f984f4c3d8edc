"""Other tools' sock_ops programs, as bpfkeep meets them on real hosts.

Hand-assembled (a few instructions each) so that they load without bcc,
like a foreign tool's object would: one writes ``bpf_sock_ops.reply`` on
every callback (the kernel's samples/bpf/tcp_synrto_kern.c idiom), one sets
``BPF_SOCK_OPS_RTO_CB_FLAG`` on every socket it sees.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from support import load_sockops

from bpfkeep.kernel import bpfsys

BPF_FUNC_SOCK_OPS_CB_FLAGS_SET = 59
BPF_SOCK_OPS_RTO_CB_FLAG = 1
REPLY_OFFSET = 4  # struct bpf_sock_ops: __u32 op; union { ..., __u32 reply; ... }


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> int:
    return code | (dst | src << 4) << 8 | (off & 0xFFFF) << 16 | (imm & 0xFFFFFFFF) << 32


MOV64_IMM, MOV64_REG, STX_MEM_W, CALL, EXIT = 0xB7, 0xBF, 0x63, 0x85, 0x95
RETURN_1 = [_insn(MOV64_IMM, dst=0, imm=1), _insn(EXIT)]

REPLY_WRITER = [
    _insn(MOV64_IMM, dst=2, imm=-1),  # r2 = -1
    _insn(STX_MEM_W, dst=1, src=2, off=REPLY_OFFSET),  # ops->reply = r2
    *RETURN_1,
]
CB_FLAGS_SETTER = [
    _insn(MOV64_IMM, dst=2, imm=BPF_SOCK_OPS_RTO_CB_FLAG),  # r1 = ops already
    _insn(CALL, imm=BPF_FUNC_SOCK_OPS_CB_FLAGS_SET),
    *RETURN_1,
]
KINDS = {"writes-reply": REPLY_WRITER, "sets-cb-flags": CB_FLAGS_SETTER}


@contextlib.contextmanager
def attached(kind: str, cgroup: str) -> Iterator[int]:
    """A neighbour program on ``cgroup`` (legacy multi attach, as most tools
    still do), detached afterwards; yields its program id."""
    fd = load_sockops(KINDS[kind], kind.replace("-", "_").encode()[:15])
    cgfd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        bpfsys.prog_attach(fd, cgfd, bpfsys.BPF_CGROUP_SOCK_OPS, bpfsys.BPF_F_ALLOW_MULTI)
        try:
            yield bpfsys.prog_id(fd)
        finally:
            with contextlib.suppress(OSError):
                bpfsys.prog_detach(fd, cgfd, bpfsys.BPF_CGROUP_SOCK_OPS)
    finally:
        os.close(cgfd)
        os.close(fd)
