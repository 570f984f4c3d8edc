"""The cgroup tree as the daemon sees it: walked only where a rule could
match, each such directory watched (inotify), so that a new cgroup is seen
within milliseconds and nothing is polled."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from bpfkeep.config import Rule
from bpfkeep.kernel.cgroups import Cgroup
from bpfkeep.kernel.inotify import Inotify


class Tree:
    """Walks of the cgroup2 tree below ``mount``.  ``watches(rel)``: could
    a cgroup below ``rel`` get a policy (the directory is watched and
    listed); ``failed(path, error)``: an error met (logged, counted,
    retried by the caller)."""

    def __init__(
        self,
        mount: str,
        inotify: Inotify,
        watches: Callable[[str], bool],
        failed: Callable[[str, OSError], None],
    ):
        self.mount = mount
        self.inotify = inotify
        self.watches = watches
        self._failed = failed
        self.failures = 0  # walks that met an error: incomplete

    def failed(self, path: str, e: OSError) -> None:
        self.failures += 1
        self._failed(path, e)

    def walk(self, top: str) -> Iterator[Cgroup]:
        """Cgroups at or below ``top`` that a rule could match; watches
        every directory that could contain a match.

        Every error is reported (``failed``): a directory that could not be
        listed (EMFILE, ENOMEM, ...) is walked again later.  A directory is
        watched before it is listed, so that nothing created in between is
        missed; stat and inotify need no file descriptor, so even out of
        descriptors a new cgroup is still seen and attempted."""
        prefix = self.mount.rstrip("/") + "/"
        # (path, cgroup id if known).  On cgroup2 (kernfs) a directory
        # entry's inode number is the cgroup id, as stat's is: the listing
        # gives it, and 10,000 cgroups cost no stat each.
        stack: list[tuple[str, int | None]] = [(os.path.normpath(top), None)]
        while stack:
            path, ino = stack.pop()
            if path != self.mount and not path.startswith(prefix):
                continue
            rel = path[len(prefix) :] if path != self.mount else ""
            if rel:
                if ino is None:
                    try:
                        ino = os.stat(path).st_ino
                    except FileNotFoundError:
                        continue  # removed meanwhile
                    except OSError as e:
                        self.failed(path, e)
                        continue
                yield Cgroup(path, rel, ino)
            if not self.watches(rel):
                continue
            try:
                self.inotify.watch(path)
            except OSError as e:
                self.failed(path, e)  # list it anyway
            try:
                with os.scandir(path) as it:
                    subdirs = [(d.path, d.inode()) for d in it if d.is_dir(follow_symlinks=False)]
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:
                self.failed(path, e)
                continue
            stack.extend(sorted(subdirs, reverse=True))

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.mount)

    def watched_for(self, rule: Rule) -> tuple[str, str]:
        """Where a rule's next match would appear: the deepest directory
        that exists along its plain-name prefix (walk watches it), and the
        rest of the pattern below it."""
        segments, path = rule.segments(), self.mount
        for i, name in enumerate(rule.plain_prefix()):
            below = os.path.join(path, name)
            if not os.path.isdir(below):
                return path, "/".join(segments[i:])
            path = below
        return path, "/".join(segments[len(rule.plain_prefix()) :])
