"""inotify, for the daemon's watch on the cgroup tree and the pin directory."""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from bpfkeep.kernel.libc import check, libc

# include/uapi/linux/inotify.h
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_IGNORED, IN_ISDIR, IN_Q_OVERFLOW = 0x400, 0x8000, 0x40000000, 0x4000
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
# New and removed cgroups (directories) and renames.
WATCH_MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF
# Under the pin directory: what goes away (an unpinned link is detached).
PIN_MASK = IN_DELETE | IN_MOVED_FROM | IN_DELETE_SELF

_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len


class Inotify:
    """One inotify instance: watches by path, events with the watched path."""

    def __init__(self) -> None:
        self._add = libc().inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.fd = check(libc().inotify_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")
        self.paths: dict[int, str] = {}  # wd -> absolute path
        self.wds: dict[str, int] = {}

    def watch(self, path: str, mask: int = WATCH_MASK) -> bool:
        """Watch a directory; False if it does not exist (any more)."""
        if path in self.wds:
            return True
        wd = self._add(self.fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOENT, errno.ENOTDIR):
                return False
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        self.paths[wd], self.wds[path] = path, wd
        return True

    def events(self) -> list[tuple[str | None, int, str]]:
        """(watched dir or None on overflow, mask, name) for pending events."""
        out = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            off = 0
            while off < len(buf):
                wd, mask, _cookie, length = _EVENT.unpack_from(buf, off)
                # Names are bytes: keep them as the os module does (surrogates),
                # so that a cgroup whose name is not UTF-8 is still found.
                start = off + _EVENT.size
                name = os.fsdecode(buf[start : start + length].split(b"\0", 1)[0])
                off = start + length
                if mask & IN_Q_OVERFLOW:
                    out.append((None, mask, ""))
                    continue
                path = self.paths.get(wd)
                if mask & IN_IGNORED:
                    if path is not None:
                        self.paths.pop(wd, None)
                        self.wds.pop(path, None)
                    continue
                if path is not None:
                    out.append((path, mask, name))

    def close(self) -> None:
        os.close(self.fd)
