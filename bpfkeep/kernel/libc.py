"""libc through ctypes, loaded once: the calls Python 3.11's os module
lacks (setns, statfs, inotify, open_by_handle_at, prctl)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import struct

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


PR_SET_NAME = 15  # include/uapi/linux/prctl.h


def name_thread(name: str) -> None:
    """Name the calling thread as ``top -H`` and /proc/PID/task/TID/comm
    show it (at most 15 bytes); failures ignored."""
    libc().prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


# struct file_handle {u32 handle_bytes; int handle_type; u8 f_handle[]} as
# kernfs (cgroup2) makes it: FILEID_KERNFS and the node's 64-bit id.
FILEID_KERNFS = 0xFE
_KERNFS_HANDLE = struct.Struct("=IiQ")


def open_kernfs_id(mount_fd: int, node_id: int, flags: int) -> int:
    """open_by_handle_at(2) of the kernfs node ``node_id`` (a cgroup's id)
    on the file system of ``mount_fd``: an fd, or OSError (ESTALE: no such
    node now; EPERM: needs CAP_DAC_READ_SEARCH)."""
    handle = ctypes.create_string_buffer(_KERNFS_HANDLE.pack(8, FILEID_KERNFS, node_id))
    return check(libc().open_by_handle_at(mount_fd, handle, flags), "open_by_handle_at")
