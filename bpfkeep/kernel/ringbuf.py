"""Reading a BPF ring buffer (BPF_MAP_TYPE_RINGBUF, Linux 5.8) from
Python: its pages mapped into this process, as libbpf's ring_buffer does.

The map's fd is readable (poll, select) while records wait.  Layout
(kernel/bpf/ringbuf.c): at offset 0 one page holding the consumer
position, which the reader writes; then a page holding the producer
position, then the data, mapped twice in a row so that a record that wraps
around the end reads as one.  Each record starts with an 8-byte header: its
length, with BUSY (still being written) and DISCARD bits, then data padded
to 8 bytes.
"""

from __future__ import annotations

import mmap
import os
import struct

from bpfkeep.kernel import bpfsys

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8
_POS = struct.Struct("=Q")
_LEN = struct.Struct("=I")


class RingBuffer:
    """The records of one ring buffer map, read in order."""

    def __init__(self, fd: int, *, owns_fd: bool = False):
        self.fd = fd
        self._owns_fd = owns_fd
        page = mmap.PAGESIZE
        self.size = bpfsys.map_max_entries(fd)
        self._mask = self.size - 1
        self._cons = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, 0, 0)
        try:
            self._prod = mmap.mmap(
                fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ, 0, page
            )
        except OSError:
            self._cons.close()
            raise

    def close(self) -> None:
        self._prod.close()
        self._cons.close()
        if self._owns_fd:
            os.close(self.fd)

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, limit: int = 1 << 16) -> list[bytes]:
        """The records written since the last read (at most ``limit``),
        consumed: the fd is no longer readable for them."""
        page = mmap.PAGESIZE
        cons = _POS.unpack_from(self._cons, 0)[0]
        prod = _POS.unpack_from(self._prod, 0)[0]
        out = []
        while cons < prod and len(out) < limit:
            at = page + (cons & self._mask)
            length = _LEN.unpack_from(self._prod, at)[0]
            if length & _BUSY:
                break  # still being written
            n = length & ~(_BUSY | _DISCARD)
            if not length & _DISCARD:
                out.append(bytes(self._prod[at + _HDR : at + _HDR + n]))
            cons += (n + _HDR + 7) & ~7
        _POS.pack_into(self._cons, 0, cons)
        return out
