"""Sweeps cannot be turned against the daemon: they run off its loop, a
network namespace at a time, fairly between the namespaces' owners and
within a CPU budget (bpfkeep.daemon.sweeps); and what they cost a socket
(bpfkeep.sweep, kernel.procfs, kernel.netns, kernel.sockdiag).

The real-daemon tests use real network namespaces of an unprivileged user
(nobody, ``unshare -rn``) in a subtree delegated to it, and assert what
happens, never how fast: the benchmarks (bench/nsload.py, bench/churn.py,
bench/sweepcost.py) print the figures."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_daemon import daemon, free_port, rule, sample, scrape, wait_until, write_config  # noqa: F401

NOBODY = 65534


def admit_all(_kind: int, _owner: int) -> bool:
    return True


def events_only(kind: int, _owner: int) -> bool:
    return kind == 0


# -- the fair queue (pure) ---------------------------------------------------------


def test_events_go_first_and_the_owner_with_the_least_cpu_lately_next():
    from bpfkeep.daemon.sweeps import ENFORCED, EVENT, SETMODE, FairQueue

    q = FairQueue(now=0.0)
    q.push(SETMODE, 7, "set-7")
    q.push(ENFORCED, 7, "enf-7")
    for i in range(3):
        q.push(EVENT, 65534, f"user-{i}")
    q.push(EVENT, 0, "root-0")
    q.charge(EVENT, 65534, 5.0, now=0.0)  # the user's namespaces cost a lot lately
    got = [q.pick(0.0, admit=admit_all) for _ in range(6)]
    # Root's event first, the user's after; then enforced before set mode.
    assert got == ["root-0", "user-0", "user-1", "user-2", "enf-7", "set-7"]
    assert q.pick(0.0, admit=admit_all) is None
    assert q.events == 0


def test_an_owner_that_used_much_cpu_waits_behind_others_until_it_is_forgotten():
    from bpfkeep.daemon.sweeps import EVENT, SERVED_HALF_LIFE, FairQueue

    q = FairQueue(now=0.0)
    q.charge(EVENT, 1, 1.0, now=0.0)
    q.charge(EVENT, 2, 0.1, now=0.0)
    q.push(EVENT, 1, "a")
    q.push(EVENT, 2, "b")
    assert q.pick(0.0, admit=admit_all) == "b"
    q.push(EVENT, 2, "b2")
    q.charge(EVENT, 2, 0.5, now=10 * SERVED_HALF_LIFE)  # owner 1's second is long past
    assert q.pick(10 * SERVED_HALF_LIFE, admit=admit_all) == "a"


def test_event_cpu_does_not_count_against_an_owner_in_the_periodic_pass():
    """Every new cgroup's sweep may visit our own namespace: its periodic
    turn (the enforce backstop of the host's cgroups) must not pay for
    them."""
    from bpfkeep.daemon.sweeps import ENFORCED, EVENT, FairQueue
    from bpfkeep.kernel.netns import OURS

    q = FairQueue(now=0.0)
    q.charge(EVENT, OURS, 100.0, now=0.0)
    q.charge(ENFORCED, NOBODY, 0.5, now=0.0)
    q.push(ENFORCED, NOBODY, "user")
    q.push(ENFORCED, OURS, "host")
    assert q.pick(0.0, admit=admit_all) == "host"


def test_the_periodic_pass_waits_for_cpu_but_not_behind_events_forever():
    from bpfkeep.daemon.sweeps import ENFORCED, EVENT, PERIODIC_MAX_WAIT, FairQueue

    q = FairQueue(now=0.0)
    q.push(ENFORCED, 0, "backstop")
    assert q.pick(0.0, admit=events_only) is None  # no CPU left in its budget
    for i in range(3):
        q.push(EVENT, 0, f"event-{i}")
    assert q.pick(0.1, admit=admit_all) == "event-0"
    assert q.pick(PERIODIC_MAX_WAIT + 0.2, admit=admit_all) == "backstop"
    assert q.pick(PERIODIC_MAX_WAIT + 0.3, admit=admit_all) == "event-1"


def test_the_budget_holds_heavy_owners_and_lets_light_ones_backstop_on_credit(tmp_path):
    """The periodic pass gets 1/1000 of a CPU.  An owner whose namespaces
    used it up waits for it; an owner that costs little still gets its
    enforced namespaces walked (on credit, paid back before anyone runs
    again): one user's 600 namespaces do not stretch the backstop of the
    host's enforced cgroups."""
    from bpfkeep import config as bk_config
    from bpfkeep.daemon import sweeps
    from bpfkeep.daemon.state import State
    from bpfkeep.enforcer import Enforcer

    cfg = write_config(tmp_path / "c.toml", free_port(), "")
    state = State(str(cfg), Enforcer(str(tmp_path / "pins")), cfg=bk_config.load(str(cfg)))
    s = sweeps.Sweeps(state, lambda _p: None)
    now = time.monotonic()
    s.queue.charge(sweeps.ENFORCED, NOBODY, 2.0, now)  # 600 namespaces walked lately
    s._tokens, s._tokens_at = -0.001, now  # the budget used up
    assert not s._admit(sweeps.ENFORCED, NOBODY, now=now)
    assert s._admit(sweeps.ENFORCED, 0, now=now)  # light: on credit
    assert not s._admit(sweeps.SETMODE, 0, now=now)  # not for set mode's
    s._tokens = -sweeps.BUCKET  # the credit used up too
    assert not s._admit(sweeps.ENFORCED, 0, now=now)
    assert s._admit(sweeps.EVENT, NOBODY, now=now)  # events are not budgeted
    s._tokens = 0.001
    assert s._admit(sweeps.ENFORCED, NOBODY, now=now)


def test_a_failure_in_the_sweeping_thread_is_logged_once_not_in_a_loop(tmp_path, monkeypatch):
    """An unexpected error between two namespaces drops what was queued and
    waits: the thread neither dies nor spins (it once wrote 400,000 error
    lines in a minute)."""
    from bpfkeep import config as bk_config
    from bpfkeep.daemon import sweeps
    from bpfkeep.daemon.state import State
    from bpfkeep.enforcer import Enforcer
    from bpfkeep.kernel.cgroups import Cgroup

    cfg = write_config(tmp_path / "c.toml", free_port(), "")
    state = State(str(cfg), Enforcer(str(tmp_path / "pins")), cfg=bk_config.load(str(cfg)))

    def broken(self, inbox, due):
        raise RuntimeError("broken")

    monkeypatch.setattr(sweeps.Sweeps, "_plan", broken)
    s = sweeps.Sweeps(state, lambda _p: None)
    s.start()
    try:
        s.ask([Cgroup("/nonexistent", "nonexistent", 12345)])
        assert wait_until(lambda: state.errors >= 1, timeout=10)
        time.sleep(0.3)
        assert state.errors == 1
    finally:
        s.stop()


# -- what a process holds, read again only when it changed --------------------------


def test_held_sockets_are_read_again_only_for_processes_that_changed():
    from bpfkeep.kernel.procfs import HeldSockets

    held = HeldSockets()
    pid = os.getpid()
    # Before Linux 6.2 /proc/PID/fd has no size (its number of open files):
    # every look reads the process again, and its version still moves only
    # when its sockets changed.
    counted = os.stat(f"/proc/{pid}/fd").st_size > 0
    with socket.socket() as a, socket.socket(socket.AF_UNIX) as u:
        first = held.of(pid)
        assert os.fstat(a.fileno()).st_ino in first and os.fstat(u.fileno()).st_ino in first
        version = held.version(pid)
        reads = held.reads
        assert held.of(pid) == first  # nothing changed: not read (where counted)
        assert held.reads == reads + (0 if counted else 1)
        assert held.version(pid) == version
        with socket.socket() as b:
            reads = held.reads
            assert os.fstat(b.fileno()).st_ino in held.of(pid)  # one more file: read
            assert held.reads == reads + 1 and held.version(pid) == version + 1
            assert held.is_tcp(pid, os.fstat(b.fileno()).st_ino)
        assert not held.is_tcp(pid, os.fstat(u.fileno()).st_ino)


def test_held_sockets_are_read_again_after_max_age_even_if_the_count_stayed():
    """One socket closed and another received between two reads leave the
    number of open files alone: max_age bounds how long that goes unseen."""
    from bpfkeep.kernel.procfs import HeldSockets

    held = HeldSockets(max_age=0.0)
    pid = os.getpid()
    a = socket.socket()
    ino_a = os.fstat(a.fileno()).st_ino
    assert ino_a in held.of(pid)
    a.close()
    with socket.socket() as b:  # same number of open files
        assert os.fstat(b.fileno()).st_ino in held.of(pid)
        assert ino_a not in held.of(pid)


# -- the kernel interfaces -----------------------------------------------------------


@pytest.mark.kernel
def test_a_call_stuck_in_a_namespace_leaves_its_thread_behind(netns):
    from bpfkeep.kernel import netns as kns

    holder = subprocess.Popen(["ip", "netns", "exec", netns, "sleep", "60"])
    try:
        want = os.stat(f"/run/netns/{netns}").st_ino

        def inside() -> int:
            return os.stat("/proc/thread-self/ns/net").st_ino

        assert wait_until(lambda: os.stat(f"/proc/{holder.pid}/ns/net").st_ino == want, 10)
        entered = kns.Entered("bpfkeep-test")
        assert entered.call(inside, holder.pid) == want
        assert entered.call(inside, None) == os.stat("/proc/self/ns/net").st_ino
        release = threading.Event()
        with pytest.raises(kns.Stuck):
            entered.call(lambda: release.wait(30), holder.pid, deadline=0.2)
        assert entered.stuck() == 1
        assert entered.call(inside, holder.pid) == want  # a new thread
        release.set()
        assert wait_until(lambda: entered.stuck() == 0, 10)
        entered.close()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.kernel
def test_dumps_filtered_by_several_cgroups_and_of_both_families_at_once(cgroups):
    from bpfkeep.kernel import sockdiag

    a, b, c = (cgroups.make(n) for n in ("a", "b", "c"))
    code = (
        "import socket, sys\n"
        "l4 = socket.create_server(('127.0.0.1', 0)); l6 = socket.create_server(('::1', 0),"
        " family=socket.AF_INET6)\n"
        "c4 = socket.create_connection(l4.getsockname()); c6 = socket.create_connection("
        "l6.getsockname()[:2])\n"
        "print('ready', flush=True); sys.stdin.read()\n"
    )
    procs = []
    for cg in (a, b, c):
        p = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lambda cg=cg: Path(cg, "cgroup.procs").write_text("0"),
        )
        assert p.stdout.readline().strip() == "ready"
        procs.append(p)
    try:
        ids = {os.stat(p).st_ino for p in (a, b)}
        every = sockdiag.dump()
        # Filtered in the kernel, not refused (EINVAL) and then filtered
        # here, as every filtered dump was before.
        for family in (None, socket.AF_INET, socket.AF_INET6):
            got = sockdiag._dump_family(family, ids, sockdiag.FULL_SOCKETS)
            assert got and {r[8] for r in got} == ids
        two = sockdiag.dump(cgroup_id=ids)
        assert {r[8] for r in two} == ids
        assert sorted(two) == sorted(r for r in every if r[8] in ids)
        assert len(two) == 2 * 6  # listener, client, accepted; IPv4 and IPv6
        # The first version's request (both families in one walk) and
        # the current one's, a family at a time, see the same sockets.
        per_family = sockdiag._dump_families((socket.AF_INET, socket.AF_INET6), ids, 0xFFF)
        assert sorted(per_family) == sorted(sockdiag.dump(0xFFF, ids))
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.kernel
def test_cgroups_are_found_by_id_without_walking_the_tree(cgroups, monkeypatch):
    """A walk of the cgroup tree is a second on a host with 20,000 cgroups;
    the sweep asks for the cgroup of every socket held across cgroups."""
    from bpfkeep.kernel import cgroups as kcg

    deep = cgroups.make("a/b c/d")
    gone = cgroups.make("gone")
    gone_id = os.stat(gone).st_ino
    os.rmdir(gone)

    def no_walk(*_a, **_k):
        raise AssertionError("walked the cgroup tree")

    monkeypatch.setattr(kcg.os, "walk", no_walk)
    found = kcg.by_ids({os.stat(deep).st_ino, gone_id}, cgroups.mount)
    assert list(found.values()) == [kcg.Cgroup(deep, cgroups.rel(deep), os.stat(deep).st_ino)]


@pytest.mark.kernel
def test_an_attach_does_not_wait_for_a_sweep_holding_the_work_list(bk, cgroups, pin_dir):
    """The work list has a lock of its own: a sweep walking a namespace of
    100,000 sockets, or blocked on a socket's lock, holds only that one."""
    from bpfkeep.enforcer import Enforcer

    app = cgroups.make("app")
    bk("attach", "--cgroup", cgroups.rel(app), "--keepidle", "30")  # programs loaded
    other = cgroups.make("other")
    with Enforcer(pin_dir).pins.worklist_lock():
        done = bk("attach", "--cgroup", cgroups.rel(other), "--no-existing")
    assert done.returncode == 0


# -- the real daemon against a user's namespaces -------------------------------------


def _as_nobody(argv: list[str]) -> list[str]:
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is missing"
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


def _delegate(path: str) -> None:
    """Hand a cgroup over to nobody, as systemd's Delegate= does."""
    os.chown(path, NOBODY, NOBODY)
    for f in ("cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):
        os.chown(os.path.join(path, f), NOBODY, NOBODY)


# nobody's process: a loopback connection held in its own namespace.
HOLD_A_CONNECTION = (
    "import socket, sys\n"
    "l = socket.create_server(('127.0.0.1', 0)); c = socket.create_connection(l.getsockname())\n"
    "a = l.accept()[0]; print('ready', flush=True); sys.stdin.read()\n"
)


class UserNamespaces:
    """Processes of nobody's, each in network namespaces of its own with a
    connection, in cgroups nobody made under a delegated subtree; all
    killed at the end."""

    def __init__(self, deleg: str):
        self.deleg = deleg
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str) -> subprocess.Popen:
        path = os.path.join(self.deleg, name)
        subprocess.run(_as_nobody(["mkdir", path]), check=True)
        script = f'ip link set lo up && exec {sys.executable} -c "$1"'
        p = subprocess.Popen(
            _as_nobody(["unshare", "-rn", "sh", "-c", script, "-", HOLD_A_CONNECTION]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: Path(path, "cgroup.procs").write_text("0"),
        )
        self.procs.append(p)
        assert p.stdout.readline().strip() == "ready"
        return p

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


@pytest.fixture()
def users(cgroups):
    deleg = cgroups.make("deleg")
    _delegate(deleg)
    u = UserNamespaces(deleg)
    try:
        yield u
    finally:
        u.close()


# A socket whose lock stays held: a send() from a page that userfaultfd
# never fills (the kernel copies the data with the socket locked).
HOLD_A_SOCKET_LOCK = """
import ctypes, mmap, os, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
uffd = libc.syscall(323, os.O_CLOEXEC)  # userfaultfd (x86_64)
assert uffd >= 0, ctypes.get_errno()
api = ctypes.create_string_buffer(struct.pack("=QQQ", 0xAA, 0, 0))
assert libc.ioctl(uffd, 0xC018AA3F, api) == 0, ctypes.get_errno()  # UFFDIO_API
region = mmap.mmap(-1, 1 << 16)  # never touched
addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
reg = ctypes.create_string_buffer(struct.pack("=QQQQ", addr, 1 << 16, 1, 0))
assert libc.ioctl(uffd, 0xC020AA00, reg) == 0, ctypes.get_errno()  # UFFDIO_REGISTER, missing
ls = socket.create_server(("127.0.0.1", 0))
c = socket.create_connection(ls.getsockname())
a, _ = ls.accept()
print("ready", flush=True)
libc.send(c.fileno(), ctypes.c_void_p(addr), 1 << 16, 0)  # blocks, the lock held
print("sent", flush=True)
"""


def _threads_on_a_socket_lock(pid: int) -> int:
    """How many threads of ``pid`` sleep waiting for a socket's lock."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                n += "lock_sock" in f.read()
        except OSError:
            continue
    return n


@contextlib.contextmanager
def _a_socket_lock_held(pid: int) -> Iterator[subprocess.Popen]:
    """A process in the network namespace of ``pid`` whose socket's lock
    stays held (HOLD_A_SOCKET_LOCK), killed at the end."""
    holder = subprocess.Popen(
        ["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-c", HOLD_A_SOCKET_LOCK],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
        yield holder
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.kernel
@pytest.mark.skipif(platform.machine() != "x86_64", reason="userfaultfd's number is x86_64's")
def test_a_new_cgroup_is_attached_and_swept_while_a_users_namespace_holds_the_sweep(
    daemon,  # noqa: F811 - the fixture imported above
    cgroups,
    users,
    spawn,
    probes,
    tmp_path,
):
    """A socket in one of nobody's namespaces has its lock held forever:
    the kernel's walk of that namespace blocks.  The daemon's loop does
    not: a new cgroup is attached while the walk is blocked, and its own
    sockets are swept once that namespace is given up.  (Before, the loop
    ran the sweep itself: the new cgroup waited the walk's 10 s deadline.)"""
    u = users.start("u1")
    with _a_socket_lock_held(u.pid) as holder:
        lst = socket.create_server(("127.0.0.1", 0), backlog=64)
        port = free_port()
        cfg = write_config(
            tmp_path / "c.toml",
            port,
            rule(f"{cgroups.rel(users.deleg)}/*", keepidle=40, mode="enforce"),
        )
        d = daemon(cfg)
        d.start()
        assert wait_until(lambda: _threads_on_a_socket_lock(d.proc.pid) >= 1, timeout=20)
        fresh = cgroups.make("deleg/root-new")  # root's, beside nobody's
        probe = spawn(
            [probes["static"], "connect", "127.0.0.1", str(lst.getsockname()[1]), "hold"],
            cgroup=fresh,
        )
        probe.values("client")
        attached = d.wait_log(f"attached /{cgroups.rel(fresh)}", timeout=20)
        given_up = d.wait_log("given up", timeout=30)
        log = d.log.read_text().splitlines()
        assert log.index(attached) < log.index(given_up), "\n".join(log)

        def swept() -> bool:
            probe.send_line()
            return probe.values("now-client", consume=True)["keepidle"] == 40

        assert wait_until(swept, timeout=20, step=0.2)
        assert holder.poll() is None  # its send() still blocked all along
        holder.kill()  # (a thread blocked on the lock holds up the daemon's exit)
        holder.wait()
        assert d.stop() == 0
        lst.close()


@pytest.mark.kernel
@pytest.mark.skipif(platform.machine() != "x86_64", reason="userfaultfd's number is x86_64's")
def test_the_look_at_idle_connections_never_holds_the_loop_on_a_socket_lock(
    daemon,  # noqa: F811 - the fixture imported above
    cgroups,
    users,
    spawn,
    probes,
    tmp_path,
):
    """keepidle = "auto" has the daemon look at every connection of the
    policy's namespaces (inet_diag with tcp_info), and the kernel takes each
    socket's lock to report tcp_info: a socket whose lock a process holds
    for ever held that look -- on the daemon's loop -- for ever, and no
    cgroup was attached after it.  The look gives that namespace up after
    a deadline and leaves it alone while the lock stays held."""
    u = users.start("u1")
    with _a_socket_lock_held(u.pid) as holder:
        lst = socket.create_server(("127.0.0.1", 0), backlog=64)
        port = free_port()
        cfg = write_config(
            tmp_path / "c.toml",
            port,
            rule(f"{cgroups.rel(users.deleg)}/*", keepidle="auto", keepidle_max=600),
            audit=1,
        )
        d = daemon(cfg)
        d.start()
        # The sweep's walk and the look (1 s after READY) both wait on it.
        assert wait_until(lambda: _threads_on_a_socket_lock(d.proc.pid) >= 2, timeout=30)
        fresh = cgroups.make("deleg/root-new")  # root's, beside nobody's
        probe = spawn(
            [probes["static"], "connect", "127.0.0.1", str(lst.getsockname()[1]), "hold"],
            cgroup=fresh,
        )
        probe.values("client")
        d.wait_log(f"attached /{cgroups.rel(fresh)}", timeout=30)
        d.wait_log("its connections are not looked at", timeout=5)
        # Later looks leave that namespace alone: the loop stays free.
        time.sleep(3)
        again = cgroups.make("deleg/root-again")
        d.wait_log(f"attached /{cgroups.rel(again)}", timeout=5)
        assert holder.poll() is None  # its send() still blocked all along
        holder.kill()  # (a thread blocked on the lock holds up the daemon's exit)
        holder.wait()
        assert d.stop() == 0
        lst.close()


@pytest.mark.kernel
def test_many_new_cgroups_each_connecting_at_once_all_covered_and_nothing_left_behind(
    daemon,  # noqa: F811 - the fixture imported above
    cgroups,
    spawn,
    probes,
    tmp_path,
):
    """Churn: cgroups made in a burst, each with a process that connects
    the moment it joins (before the attach, mostly): every connection ends
    with the policy, the sweeps asked for all get done, and no error."""
    churn = cgroups.make("churn")
    lst = socket.create_server(("127.0.0.1", 0), backlog=1024)
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", port, rule(f"{cgroups.rel(churn)}/*", keepidle=33))
    d = daemon(cfg)
    d.start()
    clients = []
    for i in range(30):
        path = cgroups.make(f"churn/c{i:02d}")
        clients.append(
            spawn(
                [probes["static"], "connect", "127.0.0.1", str(lst.getsockname()[1]), "hold"],
                cgroup=path,
            )
        )
    for c in clients:
        c.values("client")

    def covered(c) -> bool:
        c.send_line()
        return c.values("now-client", consume=True)["keepidle"] == 33

    for c in clients:
        assert wait_until(lambda c=c: covered(c), timeout=30, step=0.2)
    assert wait_until(lambda: sample(scrape(port), "bpfkeep_sweep_backlog") == 0, timeout=30)
    assert sample(scrape(port), "bpfkeep_reconcile_errors_total") == 0
    assert d.stop() == 0
    lst.close()
