"""Thin ctypes layer over libbpf's low-level API (libbpf.so.1).

bcc is only needed to compile and load the programs (bpfkeep.loader, in a
short-lived process).  Everything after that -- attaching, updating a
policy, reading counters, detaching -- works on pinned objects through
these calls, which cost a few MB instead of bcc's ~190 MB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import struct
from collections.abc import Callable

# enum bpf_attach_type (include/uapi/linux/bpf.h)
BPF_CGROUP_SOCK_OPS = 3
BPF_CGROUP_SETSOCKOPT = 22
BPF_TRACE_ITER = 28
BPF_ANY = 0
BPF_EXIST = 2
BPF_F_ALLOW_MULTI = 1 << 1


class BpfError(OSError):
    """A failed bpf() call; ``errno`` is set, ``str()`` names the call."""


@functools.cache
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    c_int, c_uint, c_void_p, c_char_p = (
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_void_p,
        ctypes.c_char_p,
    )
    u32p = ctypes.POINTER(ctypes.c_uint32)
    sigs = {
        "bpf_obj_pin": (c_int, [c_int, c_char_p]),
        "bpf_obj_get": (c_int, [c_char_p]),
        "bpf_link_create": (c_int, [c_int, c_int, c_uint, c_void_p]),
        "bpf_link_detach": (c_int, [c_int]),
        "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, ctypes.c_uint64]),
        "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
        "bpf_map_delete_elem": (c_int, [c_int, c_void_p]),
        "bpf_map_get_next_key": (c_int, [c_int, c_void_p, c_void_p]),
        "bpf_obj_get_info_by_fd": (c_int, [c_int, c_void_p, u32p]),
        "bpf_prog_attach": (c_int, [c_int, c_int, c_uint, c_uint]),
        "bpf_prog_detach2": (c_int, [c_int, c_int, c_uint]),
        "bpf_iter_create": (c_int, [c_int]),
        "bpf_map_update_batch": (c_int, [c_int, c_void_p, c_void_p, u32p, c_void_p]),
        "bpf_map_lookup_batch": (
            c_int,
            [c_int, c_void_p, c_void_p, c_void_p, c_void_p, u32p, c_void_p],
        ),
        "bpf_map_delete_batch": (c_int, [c_int, c_void_p, u32p, c_void_p]),
        "bpf_enable_stats": (c_int, [c_int]),
        "bpf_raw_tracepoint_open": (c_int, [c_char_p, c_int]),
        "bpf_prog_load": (c_int, [c_int, c_char_p, c_char_p, c_void_p, ctypes.c_size_t, c_void_p]),
    }
    for fname, (res, args) in sigs.items():
        fn = getattr(lib, fname)
        fn.restype, fn.argtypes = res, args
    return lib


def _check(ret: int, what: str) -> int:
    if ret < 0:
        # libbpf >= 1.0 returns -errno and also sets errno.
        err = -ret if ret != -1 else (ctypes.get_errno() or errno.EPERM)
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ret


def obj_pin(fd: int, path: str) -> None:
    _check(_lib().bpf_obj_pin(fd, os.fsencode(path)), f"pin {path}")


def obj_get(path: str) -> int:
    return _check(_lib().bpf_obj_get(os.fsencode(path)), f"open pinned {path}")


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    return _check(_lib().bpf_link_create(prog_fd, target_fd, attach_type, None), "link_create")


def iter_run(prog_fd: int) -> None:
    """Run an iterator program once over its target, in the calling
    thread's network namespace: the kernel walks the objects (and runs the
    program on each) as the iterator fd is read to its end."""
    lfd = _check(_lib().bpf_link_create(prog_fd, 0, BPF_TRACE_ITER, None), "link_create (iterator)")
    try:
        ifd = _check(_lib().bpf_iter_create(lfd), "iter_create")
        try:
            while True:
                try:
                    if not os.read(ifd, 65536):
                        return
                except InterruptedError:
                    continue
        finally:
            os.close(ifd)
    finally:
        os.close(lfd)


def prog_load(prog_type: int, insns: list[int], name: bytes, license_: bytes = b"GPL") -> int:
    """Load raw BPF instructions (one u64 each) as a program; its fd.  (For
    the tests' and the benchmark's stand-ins for other tools' programs;
    bpfkeep's own are compiled by bcc in progs.loader.)"""
    buf = (ctypes.c_uint64 * len(insns))(*insns)
    return _check(
        _lib().bpf_prog_load(prog_type, name, license_, buf, len(insns), None),
        f"loading program {name.decode()}",
    )


def raw_tracepoint_open(name: str | None, prog_fd: int) -> int:
    """Attach a raw tracepoint program, or (``name`` None) a tracing program
    (fentry, fexit) to the function it was loaded for; the returned fd is a
    bpf_link (pin it to keep the program attached after this process)."""
    what = f"raw tracepoint {name}" if name else "tracing program"
    return _check(
        _lib().bpf_raw_tracepoint_open(name.encode() if name else None, prog_fd), f"attach {what}"
    )


def link_detach(link_fd: int) -> None:
    _check(_lib().bpf_link_detach(link_fd), "link_detach")


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int) -> None:
    """Legacy BPF_PROG_ATTACH (used by tests to play "another tool")."""
    _check(_lib().bpf_prog_attach(prog_fd, target_fd, attach_type, flags), "attach")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    _check(_lib().bpf_prog_detach2(prog_fd, target_fd, attach_type), "detach")


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    _check(_lib().bpf_map_update_elem(fd, key, value, flags), "map update")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    buf = ctypes.create_string_buffer(value_size)
    ret = _lib().bpf_map_lookup_elem(fd, key, buf)
    if ret == -errno.ENOENT or (ret == -1 and ctypes.get_errno() == errno.ENOENT):
        return None
    _check(ret, "map lookup")
    return buf.raw


def map_reader(fd: int, value_size: int) -> Callable[[bytes], bytes | None]:
    """map_lookup for many keys of one map (maps without batch lookups:
    cgroup storage): one buffer, and the library function looked up once."""
    buf = ctypes.create_string_buffer(value_size)
    lookup = _lib().bpf_map_lookup_elem

    def read(key: bytes) -> bytes | None:
        ret = lookup(fd, key, buf)
        if ret == 0:
            return buf.raw
        if ret == -errno.ENOENT or (ret == -1 and ctypes.get_errno() == errno.ENOENT):
            return None
        _check(ret, "map lookup")
        return None

    return read


def map_delete(fd: int, key: bytes) -> bool:
    ret = _lib().bpf_map_delete_elem(fd, key)
    if ret == -errno.ENOENT or (ret == -1 and ctypes.get_errno() == errno.ENOENT):
        return False
    _check(ret, "map delete")
    return True


def map_empty(fd: int, key_size: int) -> bool:
    """Whether a hash map holds nothing (one bpf() call, a key's buffer)."""
    nxt = ctypes.create_string_buffer(key_size)
    return _lib().bpf_map_get_next_key(fd, None, nxt) != 0


def map_keys(fd: int, key_size: int) -> list[bytes]:
    keys: list[bytes] = []
    prev = None
    nxt = ctypes.create_string_buffer(key_size)
    while _lib().bpf_map_get_next_key(fd, prev, nxt) == 0:
        keys.append(nxt.raw)
        prev = ctypes.create_string_buffer(nxt.raw, key_size)
    return keys


# Errors meaning "this kernel has no batch operations for this map type"
# (BPF_MAP_*_BATCH: Linux 5.6 for hash maps): do it one element at a time.
_NO_BATCH = {errno.EINVAL, errno.EOPNOTSUPP, 524}  # 524: ENOTSUPP (kernel-internal)


def map_update_batch(fd: int, keys: list[bytes], values: list[bytes]) -> None:
    """BPF_MAP_UPDATE_BATCH: every (key, value) in one bpf() call (BPF_ANY).
    Not atomic: on an error the elements before it are written."""
    if not keys:
        return
    count = ctypes.c_uint32(len(keys))
    ret = _lib().bpf_map_update_batch(fd, b"".join(keys), b"".join(values), count, None)
    if ret < 0 and abs(ret if ret != -1 else ctypes.get_errno()) in _NO_BATCH:
        for k, v in zip(keys, values, strict=True):
            map_update(fd, k, v)
        return
    _check(ret, f"map update batch ({count.value} of {len(keys)} written)")


def map_delete_batch(fd: int, keys: list[bytes]) -> None:
    """BPF_MAP_DELETE_BATCH: every key in one bpf() call.  Every key must be
    in the map (the kernel stops at the first one that is not: ENOENT,
    the ones before it deleted)."""
    if not keys:
        return
    count = ctypes.c_uint32(len(keys))
    ret = _lib().bpf_map_delete_batch(fd, b"".join(keys), count, None)
    if ret < 0 and abs(ret if ret != -1 else ctypes.get_errno()) in _NO_BATCH:
        for k in keys:
            map_delete(fd, k)
        return
    _check(ret, f"map delete batch ({count.value} of {len(keys)} deleted)")


def map_items(
    fd: int, key_size: int, value_size: int, chunk: int = 4096
) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a hash map, BPF_MAP_LOOKUP_BATCH: one bpf() call
    per ``chunk`` entries instead of two per entry."""
    kraw, vraw = map_items_raw(fd, key_size, value_size, chunk)
    return [
        (kraw[i * key_size : (i + 1) * key_size], vraw[i * value_size : (i + 1) * value_size])
        for i in range(len(kraw) // key_size)
    ]


def map_items_raw(
    fd: int, key_size: int, value_size: int, chunk: int = 4096
) -> tuple[bytes, bytes]:
    """Every key and value of a hash map as two byte strings (keys, values:
    fixed-size records back to back), BPF_MAP_LOOKUP_BATCH: for callers
    that decode tens of thousands of entries with struct.iter_unpack
    rather than a pair of bytes objects each."""
    keys_out, values_out = [], []
    # Where the kernel says how far it got: a bucket index (u32) for hash
    # maps, a key for the generic batch of other types (an LPM trie's).
    token = ctypes.create_string_buffer(max(8, key_size))
    first = True
    chunk = max(1, chunk)
    while True:
        keys = ctypes.create_string_buffer(key_size * chunk)
        values = ctypes.create_string_buffer(value_size * chunk)
        count = ctypes.c_uint32(chunk)
        ret = _lib().bpf_map_lookup_batch(
            fd, None if first else token, token, keys, values, count, None
        )
        err = 0 if ret >= 0 else (-ret if ret != -1 else ctypes.get_errno())
        if err == errno.ENOSPC and chunk < 1 << 20:
            chunk *= 4  # one bucket holds more than a chunk: retry bigger
            continue
        if err and err != errno.ENOENT:
            if first and err in _NO_BATCH:  # a kernel without batches: two calls an entry
                pairs = [
                    (k, v)
                    for k in map_keys(fd, key_size)
                    if (v := map_lookup(fd, k, value_size)) is not None
                ]
                return b"".join(k for k, _ in pairs), b"".join(v for _, v in pairs)
            _check(ret, "map lookup batch")
        keys_out.append(ctypes.string_at(keys, key_size * count.value))
        values_out.append(ctypes.string_at(values, value_size * count.value))
        if err == errno.ENOENT:  # the end of the map
            return b"".join(keys_out), b"".join(values_out)
        first = False


def enable_stats() -> int:
    """BPF_ENABLE_STATS (run time): every program counts its runs and the
    time spent in them while the returned fd stays open (Linux 5.8+)."""
    return _check(_lib().bpf_enable_stats(0), "enable stats")  # BPF_STATS_RUN_TIME


def _info(fd: int, size: int) -> bytes:
    buf = ctypes.create_string_buffer(size)
    ln = ctypes.c_uint32(size)
    _check(_lib().bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(ln)), "get_info")
    return buf.raw


def prog_id(fd: int) -> int:
    # struct bpf_prog_info: __u32 type; __u32 id; ...
    return struct.unpack_from("=II", _info(fd, 256))[1]


def map_info(fd: int) -> tuple[int, int, int, int]:
    """(type, id, key_size, value_size) of a map."""
    t, i, k, v = struct.unpack_from("=IIII", _info(fd, 128))
    return t, i, k, v


def map_max_entries(fd: int) -> int:
    # struct bpf_map_info: type, id, key_size, value_size, max_entries, ...
    return struct.unpack_from("=IIIII", _info(fd, 128))[4]


def link_info(fd: int) -> tuple[int, int, int, int, int]:
    """(link type, link id, prog id, cgroup id, attach type) of a link.

    struct bpf_link_info: type, id, prog_id, then a union aligned to 8:
    for cgroup links {__u64 cgroup_id; __u32 attach_type;}.  A link whose
    cgroup was removed reports cgroup id 0.
    """
    raw = _info(fd, 128)
    ltype, lid, pid = struct.unpack_from("=III", raw)
    cg_id, atype = struct.unpack_from("=QI", raw, 16)
    return ltype, lid, pid, cg_id, atype
