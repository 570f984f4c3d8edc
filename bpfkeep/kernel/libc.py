"""libc through ctypes, loaded once: the calls Python 3.11's os module
lacks (setns, statfs, inotify)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

CLONE_NEWNET = 0x40000000  # include/uapi/linux/sched.h


@functools.cache
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def check(ret: int, what: str) -> int:
    """``ret`` of a libc call, or OSError with its errno."""
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def setns(fd: int, nstype: int) -> None:
    check(libc().setns(fd, nstype), "setns")


def statfs_type(path: str) -> int | None:
    """statfs(2)'s f_type of the filesystem holding ``path`` (os.statvfs
    has none), or None when it cannot be read.  Works for /proc/PID/root/...
    paths too, which a mount table lookup would not."""
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type comes first
    if libc().statfs(os.fsencode(path), buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value
