"""Network namespaces: which ones a set of processes lives in (and whose
they are), and one long-lived thread that enters them in turn.

A network namespace is a thread's (setns): the kernel's TCP iterator and
an inet_diag socket see the namespace of the thread that creates them.  A
sweep of 600 namespaces used to start a thread per namespace, and one
more per iterator run; ``Entered`` keeps one thread and moves it.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable

from bpfkeep.kernel.libc import CLONE_NEWNET, name_thread, setns

OURS = -1  # Namespace.uid of our own namespace (every user's sockets are there)


@dataclasses.dataclass
class Namespace:
    """One network namespace that processes of a sweep live in."""

    inode: int
    tid: int | None  # a thread living in it, to enter it through (None: our own)
    uid: int  # the uid of the process entered through (OURS for our own)
    pids: set[int] = dataclasses.field(default_factory=set)  # processes with a thread in it


def of_processes(
    pids: Iterable[int], proc: str = "/proc", hidden: dict[str, str] | None = None
) -> dict[int, Namespace]:
    """netns inode -> the Namespace, for every namespace a thread of
    ``pids`` lives in, and our own.

    Every thread of every process counts (a thread that entered another
    namespace makes its sockets there; ``/proc/PID/task/TID/ns/net`` is the
    thread's own).  The uid is the one of the first process found in the
    namespace: who made it, as far as a sweep's fairness goes (a user's
    ``unshare -rn`` shows as that user from here).  Processes whose
    namespace we may not see are noted in ``hidden``."""
    out: dict[int, Namespace] = {}
    try:
        own = os.stat(f"{proc}/self/ns/net").st_ino
        out[own] = Namespace(own, None, OURS)
    except OSError:
        own = None
    for pid in pids:
        try:
            # /proc/PID/task has a link per thread, besides . and ..: one
            # thread (most processes) needs no listing.
            st = os.stat(f"{proc}/{pid}/task")
            tids = [pid] if st.st_nlink == 3 else [int(t) for t in os.listdir(f"{proc}/{pid}/task")]
        except (OSError, ValueError):
            tids = [pid]  # gone, or a /proc without task/: the process's own
        for tid in tids:
            try:
                ino = os.stat(f"{proc}/{pid}/task/{tid}/ns/net").st_ino
            except OSError as e:
                if hidden is not None and e.errno in (errno.EACCES, errno.EPERM):
                    hidden[f"process {pid}"] = (
                        "its network namespace is hidden from us (needs CAP_SYS_PTRACE)"
                    )
                    break
                continue
            ns = out.get(ino)
            if ns is None:
                try:
                    uid = os.stat(f"{proc}/{pid}").st_uid
                except OSError:
                    continue  # gone meanwhile
                ns = out[ino] = Namespace(ino, tid, uid)
            ns.pids.add(pid)
    return out


class Stuck(OSError):
    """A call given a deadline did not return (its thread is left behind)."""


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclasses.dataclass
class _Job:
    fn: Callable[[], object]
    tid: int | None
    # Held until the call is done (a bare lock: one wake-up, where an
    # Event's condition takes several).
    done: threading.Lock = dataclasses.field(default_factory=_held_lock)
    value: object = None
    error: BaseException | None = None


class Entered:
    """Runs calls in network namespaces from one thread of its own, which
    enters each namespace as asked (the caller's thread never changes
    namespace).

    A call that does not return within its deadline -- a kernel walk
    waiting for a socket's lock that a stuck process holds forever --
    leaves its thread behind; the next call starts another.  ``behind``
    lists the threads left so (alive until the kernel lets them go)."""

    def __init__(self, name: str = "bpfkeep-netns"):
        self.name = name
        self.behind: list[threading.Thread] = []
        self._thread: threading.Thread | None = None
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()

    def call(self, fn: Callable[[], object], tid: int | None, deadline: float | None = None):
        """``fn()`` in the network namespace thread ``tid`` lives in (None:
        ours); its result, or its exception.  Stuck after ``deadline`` s."""
        if self._thread is None or not self._thread.is_alive():
            self._start()
        job = _Job(fn, tid)
        self._jobs.put(job)
        if not job.done.acquire(timeout=-1 if deadline is None else deadline):
            # Left behind: it ends by itself whenever the kernel returns.
            assert self._thread is not None
            self.behind.append(self._thread)
            self._thread = None
            self._jobs.put(None)  # what it runs after this call: the end
            self._jobs = queue.SimpleQueue()
            raise Stuck(errno.ETIMEDOUT, f"{self.name} did not finish within {deadline:.1f} s")
        if job.error is not None:
            raise job.error
        return job.value

    def cpu_seconds(self) -> float:
        """CPU time of the thread now running calls (0 if none)."""
        t = self._thread
        if t is None or t.ident is None:
            return 0.0
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(t.ident))
        except OSError:
            return 0.0  # it ended meanwhile

    def stuck(self) -> int:
        """Threads left behind that the kernel has not let go yet."""
        self.behind = [t for t in self.behind if t.is_alive()]
        return len(self.behind)

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    def _start(self) -> None:
        jobs = self._jobs
        self._thread = threading.Thread(
            target=_serve, args=(jobs, self.name), name=self.name, daemon=True
        )
        self._thread.start()


def _serve(jobs: queue.SimpleQueue, name: str) -> None:
    """The thread of an Entered: enter, run, answer; until a None."""
    name_thread(name)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    here: int | None = None  # the tid whose namespace we are in (None: home)
    try:
        while True:
            job = jobs.get()
            if job is None:
                return
            try:
                if job.tid != here:
                    _enter(job.tid, home)
                    here = job.tid
                job.value = job.fn()
            except BaseException as e:  # handed to the caller
                job.error = e
                here = -1  # unknown after a failed setns: enter again next time
            job.done.release()
    finally:
        os.close(home)


def _enter(tid: int | None, home: int) -> None:
    if tid is None:
        setns(home, CLONE_NEWNET)
        return
    fd = os.open(f"/proc/{tid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd, CLONE_NEWNET)
    finally:
        os.close(fd)
