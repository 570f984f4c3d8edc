"""Other tools' programs, as bpfkeep meets them on real hosts.

Hand-assembled (a few instructions each) so that they load without bcc,
like a foreign tool's object would: one writes ``bpf_sock_ops.reply`` on
every callback (the kernel's samples/bpf/tcp_synrto_kern.c idiom), one sets
``BPF_SOCK_OPS_RTO_CB_FLAG`` on every socket it sees; a cgroup/setsockopt
program turns every SO_KEEPALIVE write to 0.
"""

from __future__ import annotations

import contextlib
import ctypes
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


# Another tool's cgroup/setsockopt program that turns keepalive off: every
# SO_KEEPALIVE write becomes 0.  Attached after bpfkeep's on the same
# cgroup, it runs after ours and has the last word on what the kernel
# applies (struct bpf_sockopt: sk 0, optval 8, optval_end 16, level 24,
# optname 28).
BPF_PROG_TYPE_CGROUP_SOCKOPT = 25
LDX_MEM_W, LDX_MEM_DW, ST_MEM_W, ADD64_IMM = 0x61, 0x79, 0x62, 0x07
JNE_IMM, JGT_REG = 0x55, 0x2D
KEEPALIVE_OFF = [
    _insn(LDX_MEM_W, dst=2, src=1, off=24),  # r2 = ctx->level
    _insn(JNE_IMM, dst=2, off=8, imm=1),  # != SOL_SOCKET: out
    _insn(LDX_MEM_W, dst=2, src=1, off=28),  # r2 = ctx->optname
    _insn(JNE_IMM, dst=2, off=6, imm=9),  # != SO_KEEPALIVE: out
    _insn(LDX_MEM_DW, dst=2, src=1, off=8),  # r2 = ctx->optval
    _insn(LDX_MEM_DW, dst=3, src=1, off=16),  # r3 = ctx->optval_end
    _insn(MOV64_REG, dst=4, src=2),  # r4 = r2
    _insn(ADD64_IMM, dst=4, imm=4),  # r4 += 4
    _insn(JGT_REG, dst=4, src=3, off=1),  # r4 > optval_end: out
    _insn(ST_MEM_W, dst=2, off=0, imm=0),  # *(u32 *)optval = 0
    *RETURN_1,  # out: carry on
]


class _LoadOpts(ctypes.Structure):
    # struct bpf_prog_load_opts, up to expected_attach_type (libbpf reads
    # the fields after sz as zero)
    _fields_ = [("sz", ctypes.c_size_t), ("attempts", ctypes.c_int), ("attach", ctypes.c_int)]


@contextlib.contextmanager
def setsockopt_attached(cgroup: str) -> Iterator[int]:
    """KEEPALIVE_OFF on ``cgroup`` (legacy multi attach), detached
    afterwards; yields its program id."""
    lib = bpfsys._lib()
    buf = (ctypes.c_uint64 * len(KEEPALIVE_OFF))(*KEEPALIVE_OFF)
    opts = _LoadOpts(ctypes.sizeof(_LoadOpts), 0, bpfsys.BPF_CGROUP_SETSOCKOPT)
    fd = lib.bpf_prog_load(
        BPF_PROG_TYPE_CGROUP_SOCKOPT,
        b"keepalive_off",
        b"GPL",
        buf,
        len(KEEPALIVE_OFF),
        ctypes.cast(ctypes.byref(opts), ctypes.c_void_p),
    )
    if fd < 0:
        raise OSError(-fd, f"loading keepalive_off: {os.strerror(-fd)}")
    cgfd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        bpfsys.prog_attach(fd, cgfd, bpfsys.BPF_CGROUP_SETSOCKOPT, bpfsys.BPF_F_ALLOW_MULTI)
        try:
            yield bpfsys.prog_id(fd)
        finally:
            with contextlib.suppress(OSError):
                bpfsys.prog_detach(fd, cgfd, bpfsys.BPF_CGROUP_SETSOCKOPT)
    finally:
        os.close(cgfd)
        os.close(fd)
