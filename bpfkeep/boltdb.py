"""Read-only lookups in a bbolt database file (go.etcd.io/bbolt), the store
podman 4 keeps its containers' configuration in
(``<root>/libpod/bolt_state.db``), without bbolt or a lock.

The layout (bbolt's page.go, node.go, bucket.go, db.go): the file is pages
of ``page_size`` bytes.  Pages 0 and 1 are meta pages; the valid one (magic,
version, FNV-1a checksum) with the higher transaction id names the root
bucket's page.  Every page starts with a 16-byte header (id u64, flags u16,
count u16, overflow u32); a branch page holds ``count`` 16-byte elements
(pos u32, ksize u32, child page u64), a leaf page ``count`` 16-byte
elements (flags u32, pos u32, ksize u32, vsize u32), each key at its
element's address plus ``pos``, the value right after the key.  A leaf
element with flag 1 is a nested bucket: its value starts with the bucket's
root page (u64) and sequence (u64); root page 0 means an inline bucket,
whose leaf page follows in the value itself.  Keys are sorted bytewise.

bbolt writes copy-on-write and switches meta pages last, so a reader
without the lock sees the last committed tree unless a writer reuses its
pages while it reads: a lookup that finds a page it cannot make sense of
raises BoltError, and the caller may try again.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct

MAGIC = 0xED0CDAED
VERSION = 2
BRANCH, LEAF, META = 0x01, 0x02, 0x04
BUCKET_LEAF = 0x01
_PAGE = struct.Struct("=QHHI")  # id, flags, count, overflow
_META = struct.Struct("=IIII QQ QQQ Q")  # magic .. txid, checksum
_BRANCH_ELEM = struct.Struct("=IIQ")
_LEAF_ELEM = struct.Struct("=IIII")
_BUCKET = struct.Struct("=QQ")
MAX_DEPTH = 64  # a B+tree this deep is not one


class BoltError(Exception):
    """Not a bbolt file, or a page that makes no sense (a write in between)."""


def _fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


class BoltFile:
    """One bbolt file, mapped read-only.  ``get(path, key)``: the value of
    ``key`` in the bucket named by the list ``path`` (bucket names from the
    root), or None."""

    def __init__(self, path: str):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            size = os.fstat(fd).st_size
            if size < 2 * 1024:
                raise BoltError(f"{path}: too small for a bbolt file")
            self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.path = path
        self.page_size, self._root = self._meta()

    def close(self) -> None:
        self._map.close()

    def __enter__(self) -> BoltFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _meta(self) -> tuple[int, int]:
        """(page size, root bucket page) of the newest valid meta page: the
        first tells the page size, the second is one page further."""
        first = self._meta_at(0)
        size = first[1] if first else mmap.PAGESIZE
        metas = [m for m in (first, self._meta_at(size)) if m is not None]
        if not metas:
            raise BoltError(f"{self.path}: not a bbolt file (no valid meta page)")
        _txid, page_size, root = max(metas)
        return page_size, root

    def _meta_at(self, at: int) -> tuple[int, int, int] | None:
        """(txid, page size, root page) of a valid meta page at ``at``."""
        start = at + _PAGE.size
        try:
            magic, version, page_size, _flags, root, _seq, _free, _high, txid, checksum = (
                _META.unpack_from(self._map, start)
            )
        except struct.error:
            return None
        raw = bytes(self._map[start : start + _META.size - 8])
        if magic != MAGIC or version != VERSION or checksum != _fnv1a64(raw):
            return None
        if not 512 <= page_size <= 1 << 20:
            return None
        return txid, page_size, root

    def _page(self, pgid: int) -> tuple[int, int, int]:
        """(offset, flags, count) of a page."""
        at = pgid * self.page_size
        if pgid < 2 or at + _PAGE.size > len(self._map):
            raise BoltError(f"{self.path}: page {pgid} out of the file")
        _id, flags, count, _overflow = _PAGE.unpack_from(self._map, at)
        return at, flags, count

    def get(self, path: list[bytes], key: bytes) -> bytes | None:
        root: tuple[int, bytes | None] = (self._root, None)  # (page, inline page)
        for name in path:
            found = self._lookup(root, name)
            if found is None:
                return None
            flags, value = found
            if not flags & BUCKET_LEAF or len(value) < _BUCKET.size:
                return None  # a plain value where a bucket was expected
            page, _seq = _BUCKET.unpack_from(value)
            root = (page, value[_BUCKET.size :] if page == 0 else None)
        found = self._lookup(root, key)
        if found is None or found[0] & BUCKET_LEAF:
            return None
        return found[1]

    def _lookup(self, root: tuple[int, bytes | None], key: bytes) -> tuple[int, bytes] | None:
        pgid, inline = root
        if inline is not None:
            return _leaf_find(inline, 0, key, self.path)
        for _ in range(MAX_DEPTH):
            at, flags, count = self._page(pgid)
            if flags & LEAF:
                return _leaf_find(self._map, at, key, self.path)
            if not flags & BRANCH:
                raise BoltError(f"{self.path}: page {pgid} is neither branch nor leaf")
            keys, children = [], []
            for i in range(count):
                e = at + _PAGE.size + i * _BRANCH_ELEM.size
                pos, ksize, child = _BRANCH_ELEM.unpack_from(self._map, e)
                keys.append(bytes(self._map[e + pos : e + pos + ksize]))
                children.append(child)
            i = bisect.bisect_right(keys, key) - 1
            if i < 0:
                return None
            pgid = children[i]
        raise BoltError(f"{self.path}: tree deeper than {MAX_DEPTH}")


def _leaf_find(buf, at: int, key: bytes, where: str) -> tuple[int, bytes] | None:
    """(flags, value) of ``key`` in the leaf page at ``at`` of ``buf``."""
    try:
        _id, flags, count, _overflow = _PAGE.unpack_from(buf, at)
        if not flags & LEAF:
            raise BoltError(f"{where}: expected a leaf page")
        for i in range(count):
            e = at + _PAGE.size + i * _LEAF_ELEM.size
            eflags, pos, ksize, vsize = _LEAF_ELEM.unpack_from(buf, e)
            k = bytes(buf[e + pos : e + pos + ksize])
            if k == key:
                value = bytes(buf[e + pos + ksize : e + pos + ksize + vsize])
                if len(value) != vsize:
                    raise BoltError(f"{where}: value past the end of the file")
                return eflags, value
            if k > key:
                return None
    except struct.error:
        raise BoltError(f"{where}: page past the end of the file") from None
    return None
