"""Helpers shared by bpfkeep's tests and benchmarks (``bench/`` imports
them as ``tests.support``); not part of the installed package.

Real network namespaces, a reference sock_ops program and a line reader
for child processes.  Everything made here is removed by its own cleanup.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import shutil
import signal
import subprocess
import time
import uuid

from bpfkeep.kernel import bpfsys

BPF_PROG_TYPE_SOCK_OPS = 13


class NetnsPair:
    """A client and a server host, each in its own network namespace,
    joined through a bridge in a third ("the network").

    Cutting the server takes its link down while the client's own link
    stays up, as when a peer vanishes behind a NAT box or firewall: the
    client's probes and retransmissions leave and are lost.  (With a bare
    veth pair the client's carrier drops too and the kernel's timers take
    its local-error paths instead.)  Addresses are private to these
    namespaces; nothing leaves them.
    """

    def __init__(self, prefix: str = "bk", subnet: str = "10.77.0"):
        tag = uuid.uuid4().hex[:6]
        self.client, self.server, self.net = (f"{prefix}{r}-{tag}" for r in "csn")
        self.client_if, self.server_if = f"v{prefix}c{tag}", f"v{prefix}s{tag}"
        self.client_ip, self.server_ip = f"{subnet}.1", f"{subnet}.2"
        self.ip = shutil.which("ip") or "ip"
        self._made: list[str] = []
        try:
            self._setup()
        except BaseException:
            self.cleanup()
            raise

    def _setup(self) -> None:
        for ns in (self.client, self.server, self.net):
            self._ip("netns", "add", ns)
            self._made.append(ns)
            self._ip("-n", ns, "link", "set", "lo", "up")
        self._ip("-n", self.net, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self.net, "link", "set", "br0", "up")
        for ns, ifname, addr in (
            (self.client, self.client_if, self.client_ip),
            (self.server, self.server_if, self.server_ip),
        ):
            port = "p" + ifname
            self._ip(
                "-n", self.net, "link", "add", port, "type", "veth", "peer", "name", ifname,
                "netns", ns,
            )  # fmt: skip
            self._ip("-n", self.net, "link", "set", port, "master", "br0", "up")
            self._ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
            self._ip("-n", ns, "link", "set", ifname, "up")

    def _ip(self, *args: str) -> None:
        subprocess.run([self.ip, *args], check=True, capture_output=True)

    def cut_server(self) -> None:
        """The server vanishes from the network: its link goes down."""
        self._ip("-n", self.server, "link", "set", self.server_if, "down")

    def cleanup(self) -> None:
        for ns in self._made:
            out = subprocess.run([self.ip, "netns", "pids", ns], capture_output=True, text=True)
            for pid in out.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run([self.ip, "netns", "del", ns], capture_output=True, check=False)
        self._made.clear()

    def __enter__(self) -> NetnsPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def load_sockops(insns: list[int], name: bytes) -> int:
    """Load raw BPF instructions as a sock_ops program, as a foreign tool's
    object would be loaded (no bcc); returns its fd."""
    return bpfsys.prog_load(BPF_PROG_TYPE_SOCK_OPS, insns, name)


BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_F_NO_PREALLOC = 1  # (an LPM trie needs it)


class _MapCreateOpts(ctypes.Structure):
    """struct bpf_map_create_opts, up to map_flags (libbpf reads ``sz``)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("btf_fd", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
    ]


def map_create(
    map_type: int, name: bytes, key_size: int, value_size: int, entries: int, flags: int = 0
) -> int:
    """A BPF map of the test's own (libbpf's bpf_map_create); its fd."""
    lib = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)
    u32 = ctypes.c_uint32
    lib.bpf_map_create.restype = ctypes.c_int
    lib.bpf_map_create.argtypes = [ctypes.c_int, ctypes.c_char_p, u32, u32, u32, ctypes.c_void_p]
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=flags)
    fd = lib.bpf_map_create(map_type, name, key_size, value_size, entries, ctypes.byref(opts))
    if fd < 0:
        raise OSError(ctypes.get_errno(), f"bpf_map_create: {os.strerror(ctypes.get_errno())}")
    return fd


def load_empty_sockops(name: bytes = b"empty_sockops") -> int:
    """Load ``r0 = 1; exit`` as a sock_ops program ("another tool", or the
    cost floor of any sock_ops program); returns its fd."""
    return load_sockops([0x00000001000000B7, 0x0000000000000095], name)


class LineReader:
    """A child's stdout, line by line, with a timeout.  Raw reads: a
    buffered reader would hide lines already read from select()."""

    def __init__(self, proc: subprocess.Popen, *, consume: bool = False):
        self.proc = proc
        self.lines: list[str] = []
        self.consume = consume  # drop lines up to each match
        self._buf = b""

    def expect(self, prefix: str, timeout: float = 10) -> str | None:
        """The first line starting with prefix, or None after timeout/EOF."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            for i, ln in enumerate(self.lines):
                if ln.startswith(prefix):
                    if self.consume:
                        del self.lines[: i + 1]
                    return ln
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buf += chunk
            *done, self._buf = self._buf.split(b"\n")
            self.lines += [d.decode() for d in done]
