"""When the daemon's loop does what: named deadlines, and the retries of
what failed with their backoff."""

from __future__ import annotations

import math
import time

RETRY_FIRST, RETRY_MAX = 1.0, 60.0  # backoff of a failed walk or attach, seconds


class Scheduler:
    """Named deadlines (monotonic seconds).  The loop sleeps until the
    earliest, runs what is due, and sets the next."""

    def __init__(self) -> None:
        self._at: dict[str, float] = {}

    def at(self, name: str, when: float | None) -> None:
        """Run ``name`` at ``when``; None: not at all."""
        if when is None:
            self._at.pop(name, None)
        else:
            self._at[name] = when

    def after(self, name: str, seconds: float) -> None:
        self._at[name] = time.monotonic() + seconds

    def due(self, name: str, now: float) -> bool:
        """Whether ``name`` is due; if so it is taken off (set it again)."""
        when = self._at.get(name)
        if when is None or when > now:
            return False
        del self._at[name]
        return True

    def next(self, *more: float) -> float:
        """The earliest deadline, these included; inf if none."""
        return min([*self._at.values(), *more], default=math.inf)


class Retries:
    """What failed and is tried again: a path to walk again (None: the
    whole tree), with a backoff from RETRY_FIRST doubling to RETRY_MAX."""

    def __init__(self) -> None:
        self._due: dict[str | None, tuple[float, float]] = {}  # path -> (when, delay)

    def later(self, path: str | None) -> float:
        """Schedule ``path`` again; returns the delay."""
        _, delay = self._due.get(path, (0.0, RETRY_FIRST / 2))
        delay = min(delay * 2, RETRY_MAX)
        self._due[path] = (time.monotonic() + delay, delay)
        return delay

    def take(self, now: float) -> list[str | None]:
        """The paths due now, marked as running: a new failure while one
        runs schedules it again (see failed_again)."""
        due = [p for p, (when, _) in self._due.items() if when <= now]
        for p in due:
            self._due[p] = (math.inf, self._due[p][1])
        return due

    def failed_again(self, path: str | None) -> bool:
        """After running ``path``: True if it failed again (it stays
        scheduled); False, and it is forgotten, if it succeeded."""
        left = self._due.get(path)
        if left is None or left[0] == math.inf:
            self._due.pop(path, None)
            return False
        return True

    def pending(self, path: str | None) -> bool:
        return path in self._due

    def done(self, path: str | None) -> None:
        self._due.pop(path, None)

    def next(self) -> float:
        return min((when for when, _ in self._due.values()), default=math.inf)
