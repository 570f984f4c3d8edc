"""Enforce mode on every path the kernel offers to set an option: the
32-bit system call and io_uring's compat ring, which run no cgroup/setsockopt
program; a buffer changed while the call runs; MPTCP sockets; another tool's
program that writes after ours.  Real sockets, set through each path by
tests/progs/sockhole.c, read back with getsockopt in the workload and ss
from outside; the daemon's repairs counted in a real scrape."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import PROGS, in_kmatrix_guest
from neighbours import attached as sockops_neighbour
from neighbours import setsockopt_attached
from test_daemon import DaemonProc, free_port, rule, sample, scrape
from test_privileges import BPFKEEP as BPFKEEP_MODULE
from test_privileges import as_unit_sandboxed

from bpfkeep.daemon.enforce import REPAIR_GAP
from bpfkeep.daemon.passes import RESWEEP_AFTER
from bpfkeep.progs import loader
from bpfkeep.progs.kheaders import bcc_environment

X86_64 = platform.machine() == "x86_64"
POLICY = {"keepidle": 30, "keepintvl": 5, "keepcnt": 3, "user_timeout": 45000}
WEAK = ["keepalive=0", "keepidle=30000", "user_timeout=0"]  # what a program sets
ENFORCE_INTERVAL = 30.0  # the daemon's default (bpfkeep.config)
# A socket is back within the policy within the interval and one pass;
# with the tracing programs at once (a repair waits REPAIR_GAP, or 20 times
# the last one's CPU time: seconds at most under QEMU's emulation).
TRACED_BOUND = 10.0


@pytest.fixture(scope="session")
def sockhole(tmp_path_factory) -> str:
    """tests/progs/sockhole.c, static and not position-independent: the
    values its 32-bit calls point at must sit below 4 GiB."""
    if not X86_64:
        pytest.skip(f"the 32-bit system call is int $0x80 of x86_64; this is {platform.machine()}")
    exe = tmp_path_factory.mktemp("sockhole") / "sockhole"
    subprocess.run(
        [
            "gcc",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-static",
            "-no-pie",
            "-pthread",
            "-o",
            str(exe),
            str(PROGS / "sockhole.c"),
        ],
        check=True,
    )
    return str(exe)


def report(line: str) -> None:
    """A measurement, printed; in the kernel-matrix guest as a "kmatrix:"
    line, which scripts/kernel-matrix.sh passes on from a run that passed."""
    print(("\nkmatrix: " if in_kmatrix_guest() else "") + line)


def policy_args() -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in POLICY.items()] + ["--mode", "enforce"]


def within(v: dict[str, int]) -> bool:
    """The socket's values within POLICY (enforce: lower values pass)."""
    return (
        v["keepalive"] == 1
        and 0 < v["keepidle"] <= POLICY["keepidle"]
        and 0 < v["keepintvl"] <= POLICY["keepintvl"]
        and 0 < v["keepcnt"] <= POLICY["keepcnt"]
        and 0 < v["user_timeout"] <= POLICY["user_timeout"]
    )


@pytest.fixture()
def daemon(pin_dir, tmp_path):
    """Daemons on the test's pin directory (test_daemon's DaemonProc)."""
    made: list[DaemonProc] = []

    def make(cfg: Path) -> DaemonProc:
        work = tmp_path / f"d{len(made)}"
        work.mkdir()
        made.append(DaemonProc(pin_dir, cfg, work))
        return made[-1]

    yield make
    for d in made:
        d.close()


@pytest.fixture()
def tcp_listener():
    srv = socket.create_server(("127.0.0.1", 0), backlog=128)
    yield srv.getsockname()[1]
    srv.close()


# -- the cgroup hook itself ----------------------------------------------------------


@pytest.mark.kernel
@pytest.mark.parametrize(("option", "good", "bad"), [("keepalive", 1, 0), ("keepidle", 10, 30000)])
def test_a_buffer_changed_during_the_call_cannot_pass_the_hook(
    bk, cgroups, spawn, sockhole, tcp_listener, option, good, bad
):
    """Above a page the hook sees a copy of the buffer's first page; had
    it let the kernel read the application's buffer again, a second thread
    flipping the value between the two reads would set what the hook
    never saw (it did: within a few thousand calls)."""
    cg = cgroups.make("app")
    bk("attach", "--cgroup", cgroups.rel(cg), *policy_args())
    race = ["race", f"{option}={good}/{bad}", "100000"]
    p = spawn([sockhole, "connect", "127.0.0.1", str(tcp_listener), *race], cgroup=cg)
    line = p.expect("race ", timeout=120)
    assert "won=0 calls=100000" in line, line
    assert within(p.values("client"))


# -- the daemon brings back what the hook did not see ----------------------------------


def config(path: Path, port: int, rules: str, **daemon_keys: float) -> Path:
    """A daemon config; audits an hour apart unless given: as if the audit
    pass had backed off (it did, to 290 s, on a host with many sockets)."""
    keys = {"audit_interval": 3600, **daemon_keys}
    body = "".join(f"{k} = {v}\n" for k, v in keys.items())
    path.write_text(f'[metrics]\nlisten = "127.0.0.1:{port}"\n[daemon]\n{body}{rules}')
    return path


def enforced_rule(pattern: str) -> str:
    return rule(pattern, mode="enforce", **POLICY)


def steps(via: str, values: list[str]) -> list[str]:
    return [w for v in values for w in (via, v)]


def wait_attached(metrics_port: int, label: str, timeout: float = 30) -> dict:
    """Until the daemon has attached the cgroup and swept it twice (right
    after, and RESWEEP_AFTER later): a repair seen afterwards is the
    enforce room's."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(metrics_port)
        if sample(m, "bpfkeep_policy_attached", cgroup=label, mode="enforce") == 1:
            time.sleep(RESWEEP_AFTER + 0.5)
            return m
        assert time.monotonic() < deadline, f"{label} not attached"
        time.sleep(0.05)


def tracing(metrics: dict) -> bool:
    return sample(metrics, "bpfkeep_enforce_tracing") == 1


def bound(metrics: dict) -> float:
    """The repair bound the daemon states, and a second for one pass."""
    if tracing(metrics):
        return TRACED_BOUND
    return sample(metrics, "bpfkeep_enforce_interval_seconds") + 1.0  # type: ignore[operator]


def started(p, via: str, n: int) -> int:
    """The workload's set lines (all accepted by the kernel: rc=0) and its
    local port."""
    for _ in range(n):
        line = p.expect("set ")
        if via.startswith("uring") and "rc=95" in line:
            pytest.skip("this kernel has no io_uring socket commands (Linux 6.7): EOPNOTSUPP")
        assert f"via={via} rc=0" in line, line
    return int(p.expect("ready").split()[2])


def until_within(p, timeout: float) -> tuple[dict[str, int], float]:
    """Poll the workload's socket until its values are within the policy;
    (the values, seconds it took)."""
    t0 = time.monotonic()
    while True:
        p.send_line()
        v = p.values("now-client", consume=True)
        elapsed = time.monotonic() - t0
        if within(v) or elapsed > timeout:
            return v, elapsed
        time.sleep(0.05)


def keepalive_timer(local_port: int) -> float | None:
    """Seconds left on the keepalive timer of the socket on this local
    port, as ss shows it from outside; None: no keepalive timer."""
    out = subprocess.run(
        ["ss", "-tinoH", "state", "established", f"( sport = :{local_port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"timer:\(keepalive,(?:(\d+)min)?(?:(\d+(?:\.\d+)?)sec)?(?:(\d+)ms)?", out)
    if not m:
        return None
    mins, secs, ms = m.groups()
    return int(mins or 0) * 60 + float(secs or 0) + int(ms or 0) / 1000


def repaired(metrics: dict, label: str, option: str) -> float:
    return sample(metrics, "bpfkeep_enforce_repaired_total", cgroup=label, option=option) or 0


def counted(metrics_port: int, label: str, option: str, timeout: float = 5) -> float:
    """The repairs of ``option`` a scrape shows, once there are some: the
    daemon counts right after the sweep whose effect the workload sees."""
    deadline = time.monotonic() + timeout
    while True:
        n = repaired(scrape(metrics_port), label, option)
        if n or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


@pytest.mark.kernel
@pytest.mark.parametrize("via", ["set32", "uring32"])
def test_a_32bit_setsockopt_is_brought_back_within_the_bound(
    daemon, cgroups, spawn, sockhole, tcp_listener, tmp_path, bk, via
):
    """A 64-bit program calls setsockopt through int $0x80 -- or io_uring
    on a ring the 32-bit io_uring_setup made -- in an enforced cgroup: the
    kernel runs no cgroup/setsockopt program for it, and SO_KEEPALIVE 0,
    keepidle 30000 and user timeout 0 reach the socket.  The daemon (its
    default interval, audits an hour apart) brings the socket back within
    the bound it states, counts it, and status shows it."""
    metrics_port = free_port()
    base = cgroups.rel(cgroups.base)
    d = daemon(config(tmp_path / "bpfkeep.toml", metrics_port, enforced_rule(f"{base}/app")))
    d.start()
    app = cgroups.make("app")
    label = "/" + cgroups.rel(app)
    m = wait_attached(metrics_port, label)
    assert sample(m, "bpfkeep_enforce_interval_seconds") == ENFORCE_INTERVAL

    p = spawn(
        [sockhole, "connect", "127.0.0.1", str(tcp_listener), *steps(via, WEAK), "hold"],
        cgroup=app,
    )
    local = started(p, via, len(WEAK))
    v, elapsed = until_within(p, bound(m) + 5)
    how = "at once (fexit)" if tracing(m) else "by the enforce pass"
    report(f"{via}: back within the policy after {elapsed:.2f} s, {how}; bound {bound(m):.0f} s")
    assert within(v), (v, d.log.read_text())
    assert elapsed <= bound(m), d.log.read_text()
    # From outside: the keepalive timer runs, at the policy's keepidle.
    timer = keepalive_timer(local)
    assert timer is not None and timer <= POLICY["keepidle"], timer

    for option in ("keepalive", "keepidle", "user_timeout"):
        assert counted(metrics_port, label, option) == 1, option
    m = scrape(metrics_port)
    if tracing(m):
        assert sample(m, "bpfkeep_enforce_bypassed_total", cgroup=label, option="keepalive") == 1
    else:  # the enforce pass repaired it: its CPU is on /metrics
        cpu = sample(m, "bpfkeep_enforce_pass_cpu_seconds")
        assert cpu is not None and 0 <= cpu < 5, cpu
    status = {a["cgroup"]: a for a in json.loads(bk("status", "--json").stdout)}
    assert status[label]["counters"]["enforce"]["repaired"]["keepalive"] == 1
    assert "Traceback" not in d.log.read_text()


@pytest.mark.kernel
def test_a_program_hammering_setsockopt_costs_one_repair_per_pass(
    daemon, cgroups, spawn, sockhole, tcp_listener, tmp_path
):
    """The same socket weakened again and again: it is noted once until
    repaired, so the daemon's repairs (and their CPU) stay bounded however
    fast the program calls."""
    metrics_port = free_port()
    base = cgroups.rel(cgroups.base)
    cfg = config(
        tmp_path / "bpfkeep.toml", metrics_port, enforced_rule(f"{base}/app"), enforce_interval=2
    )
    d = daemon(cfg)
    d.start()
    app = cgroups.make("app")
    wait_attached(metrics_port, "/" + cgroups.rel(app))
    weaken = steps("set32", ["keepalive=0"] * 20000)
    t0 = time.monotonic()
    p = spawn([sockhole, "connect", "127.0.0.1", str(tcp_listener), *weaken, "hold"], cgroup=app)
    started(p, "set32", 20000)
    calls_seconds = time.monotonic() - t0
    v, _ = until_within(p, 10)
    assert within(v), d.log.read_text()
    m = scrape(metrics_port)
    repairs = sample(m, "bpfkeep_enforce_repairs_total")
    cpu = sample(m, "bpfkeep_enforce_repair_cpu_seconds_total")
    report(f"20,000 calls in {calls_seconds:.2f} s: {repairs:.0f} repair(s), {cpu:.3f} s CPU")
    if tracing(m):
        label = "/" + cgroups.rel(app)
        bypassed = sample(m, "bpfkeep_enforce_bypassed_total", cgroup=label, option="keepalive")
        assert bypassed == 20000
        # One note per socket until repaired: a repair per gap at most.
        assert repairs <= 2 + calls_seconds / REPAIR_GAP
    # A repair per gap at most (the gap is 20 times a repair's CPU time):
    # its CPU stays under 5 % of the time the calls took, and then some.
    assert cpu <= 0.05 * calls_seconds + 0.5


@pytest.mark.kernel
def test_under_exactly_the_units_capabilities(
    cgroups, spawn, sockhole, tcp_listener, tmp_path, bpffs
):
    """The daemon as the shipped unit runs it (its capabilities and
    sandbox, a fresh pin directory: the programs are compiled and loaded
    under them) repairs the 32-bit call and counts it."""
    from conftest import remove_pin_dir

    pin_dir = os.path.join(bpffs, f"bpfkeep-unit-{uuid.uuid4().hex[:8]}")
    metrics_port = free_port()
    base = cgroups.rel(cgroups.base)
    cfg = config(
        tmp_path / "bpfkeep.toml", metrics_port, enforced_rule(f"{base}/app"), enforce_interval=3
    )
    cfg.chmod(0o600)
    log = tmp_path / "daemon.log"
    argv = [*BPFKEEP_MODULE, "--pin-dir", pin_dir, "daemon", "--config", str(cfg)]
    with open(log, "w") as err:
        proc = subprocess.Popen(as_unit_sandboxed(argv), stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 90
        while "enforcing" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        app = cgroups.make("app")
        label = "/" + cgroups.rel(app)
        m = wait_attached(metrics_port, label)
        p = spawn(
            [sockhole, "connect", "127.0.0.1", str(tcp_listener), *steps("set32", WEAK), "hold"],
            cgroup=app,
        )
        started(p, "set32", len(WEAK))
        v, elapsed = until_within(p, bound(m) + 5)
        report(f"under the unit: back within the policy after {elapsed:.2f} s")
        assert within(v), log.read_text()
        assert elapsed <= bound(m), log.read_text()
        assert counted(metrics_port, label, "keepalive") == 1
        assert "Traceback" not in log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        remove_pin_dir(pin_dir)


@pytest.mark.kernel
def test_another_tools_program_that_writes_after_ours(
    daemon, cgroups, spawn, sockhole, tcp_listener, tmp_path, request
):
    """Another tool's cgroup/setsockopt program on the same cgroup, attached
    after ours, turns every SO_KEEPALIVE write to 0 -- ours rewrote the
    program's 0 to 1, it has the last word; another's sock_ops program
    writes ops->reply on every callback.  The socket is brought back all
    the same, and counted."""
    metrics_port = free_port()
    base = cgroups.rel(cgroups.base)
    cfg = config(
        tmp_path / "bpfkeep.toml", metrics_port, enforced_rule(f"{base}/app"), enforce_interval=2
    )
    d = daemon(cfg)
    d.start()
    app = cgroups.make("app")
    label = "/" + cgroups.rel(app)
    m = wait_attached(metrics_port, label)
    stack = contextlib.ExitStack()
    request.addfinalizer(stack.close)  # detached before the cgroup goes
    stack.enter_context(setsockopt_attached(app))
    stack.enter_context(sockops_neighbour("writes-reply", app))

    p = spawn(
        [sockhole, "connect", "127.0.0.1", str(tcp_listener), "set", "keepalive=0", "hold"],
        cgroup=app,
    )
    local = started(p, "set", 1)
    v, elapsed = until_within(p, bound(m) + 5)
    report(f"beside a program that turns keepalive off: back after {elapsed:.2f} s")
    assert within(v), d.log.read_text()
    assert elapsed <= bound(m)
    timer = keepalive_timer(local)
    assert timer is not None and timer <= POLICY["keepidle"]
    assert counted(metrics_port, label, "keepalive") == 1


# -- MPTCP -----------------------------------------------------------------------------


def mptcp_usable() -> str | None:
    """Why MPTCP cannot be tested here, or None."""
    try:
        with open("/proc/sys/net/mptcp/enabled") as f:
            if f.read().strip() != "1":
                return "net.mptcp.enabled is 0 in this network namespace"
    except OSError:
        return "this kernel has no MPTCP (no net.mptcp.enabled)"
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262).close()
    except OSError as e:
        return f"socket(AF_INET, SOCK_STREAM, IPPROTO_MPTCP) failed: {e.strerror}"
    return None


@pytest.fixture()
def mptcp_listener():
    why = mptcp_usable()
    if why:
        pytest.skip(f"MPTCP is not usable: {why}")
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    yield srv.getsockname()[1]
    srv.close()


@pytest.mark.kernel
def test_mptcp_sockets_are_capped_like_tcp(
    daemon, cgroups, spawn, sockhole, mptcp_listener, tmp_path
):
    """An MPTCP socket (protocol 262) copies SO_KEEPALIVE and the keepalive
    times down to its TCP subflows.  Through the hook its program's weak
    values are capped on the MPTCP socket (getsockopt there) and so on the
    subflow (ss from outside); through the 32-bit call the subflow is
    brought back by the daemon -- the MPTCP socket itself, which neither a
    hook nor the TCP iterator reaches, keeps what the program wrote."""
    metrics_port = free_port()
    base = cgroups.rel(cgroups.base)
    cfg = config(
        tmp_path / "bpfkeep.toml", metrics_port, enforced_rule(f"{base}/app"), enforce_interval=2
    )
    d = daemon(cfg)
    d.start()
    app = cgroups.make("app")
    label = "/" + cgroups.rel(app)
    m = wait_attached(metrics_port, label)
    # TCP_USER_TIMEOUT is no MPTCP option (ENOPROTOOPT): the policy's is
    # on the subflows from their own connect().
    weak = ["keepalive=0", "keepidle=30000"]
    argv = [sockhole, "connect", "127.0.0.1", str(mptcp_listener), "mptcp"]

    # The MPTCP socket's local port is its first subflow's: ss shows that
    # subflow (a TCP socket) on it.
    hooked = spawn([*argv, *steps("set", weak), "hold"], cgroup=app)
    local = started(hooked, "set", len(weak))
    v = hooked.values("client")
    assert (v["keepalive"], v["keepidle"]) == (1, POLICY["keepidle"]), v
    timer = keepalive_timer(local)
    assert timer is not None and timer <= POLICY["keepidle"], timer

    compat = spawn([*argv, *steps("set32", weak), "hold"], cgroup=app)
    local = started(compat, "set32", len(weak))
    assert compat.values("client")["keepalive"] == 0  # the 32-bit call went through
    t0 = time.monotonic()
    while True:
        timer = keepalive_timer(local)
        if timer is not None and timer <= POLICY["keepidle"]:
            break
        assert time.monotonic() - t0 < bound(m) + 5, (timer, d.log.read_text())
        time.sleep(0.1)
    elapsed = time.monotonic() - t0
    report(f"MPTCP subflow back within the policy after {elapsed:.2f} s")
    assert elapsed <= bound(m)
    assert counted(metrics_port, label, "keepalive") == 1
    compat.send_line()
    assert compat.values("now-client")["keepalive"] == 0  # the MPTCP socket's own


# -- what the kernel lets load ----------------------------------------------------------


@pytest.mark.kernel
def test_the_tracing_programs_load_or_one_notice_says_why(bpffs):
    """Where the kernel runs fexit programs (Debian 12's 6.1 does) they are
    loaded and attached, their links pinned; where it does not, the rest
    loads and one notice says why."""
    obj = os.path.join(bpffs, f"bpfkeep-test-{uuid.uuid4().hex[:8]}", "obj")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bpfkeep.progs.loader", obj],
            env=bcc_environment(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        notices = [ln for ln in proc.stderr.splitlines() if "cgroup hook does not see" in ln]
        attached = loader.bypass_links(obj)
        report(f"tracing programs attached: {attached or 'none'}; {notices}")
        if in_kmatrix_guest():
            assert {"tcp", "sock"} <= set(attached), proc.stderr
        if attached:
            assert not notices
        else:
            assert len(notices) == 1, proc.stderr
    finally:
        if os.path.isdir(obj):
            for name in os.listdir(obj):
                os.unlink(os.path.join(obj, name))
            os.rmdir(obj)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(obj))


@pytest.mark.kernel
def test_what_the_tracing_programs_cost_a_setsockopt(cgroups, spawn, sockhole, tcp_listener, bpffs):
    """setsockopt in an enforced cgroup, timed with the tracing programs
    attached and after their links are gone: TCP_NODELAY (not enforced:
    two compares), TCP_KEEPIDLE and SO_KEEPALIVE (the policy looked up,
    the value read).  A new connection takes no traced path at all."""
    from conftest import remove_pin_dir

    from bpfkeep.enforcer import Enforcer

    pin_dir = os.path.join(bpffs, f"bpfkeep-test-{uuid.uuid4().hex[:8]}")
    try:
        app = cgroups.make("app")
        argv = [sys.executable, "-m", "bpfkeep", "--pin-dir", pin_dir, "attach"]
        proc = subprocess.run(
            [*argv, "--cgroup", cgroups.rel(app), *policy_args()],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        obj = Enforcer(pin_dir).obj_dir
        if not loader.bypass_links(obj):
            pytest.skip("this kernel runs no fexit programs: a setsockopt costs what it did")
        n = "50000"
        bench = ["bench", "nodelay=1", n, "bench", "keepidle=10", n, "bench", "keepalive=1", n]

        def timed() -> dict[str, float]:
            best: dict[str, float] = {}
            for _ in range(3):
                p = spawn([sockhole, "connect", "127.0.0.1", str(tcp_listener), *bench], cgroup=app)
                for name in ("nodelay", "keepidle", "keepalive"):
                    ns = float(p.expect(f"bench {name} ").split()[3].split("=")[1])
                    best[name] = min(best.get(name, ns), ns)
                p.close()
            return best

        traced = timed()
        for what in loader.bypass_links(obj):
            os.unlink(os.path.join(obj, f"link_bypass_{what}"))  # detached
        plain = timed()
        cost = {k: traced[k] - plain[k] for k in traced}
        report(
            "setsockopt, ns per call (traced - plain): "
            + ", ".join(f"{k} {traced[k]:.0f} - {plain[k]:.0f} = {cost[k]:+.0f}" for k in cost)
        )
        assert cost["nodelay"] < 2000  # QEMU's emulation included
    finally:
        remove_pin_dir(pin_dir)


# -- the room's arithmetic, without a kernel ------------------------------------------


class _FakeEnforcer:
    """What daemon.enforce asks of the Enforcer, recorded."""

    def __init__(self, notes):
        self.notes = notes
        self.swept: list[tuple[list, list]] = []
        self.counted: list[dict] = []

    def bypass_notes(self):
        notes, self.notes = self.notes, []
        return notes

    def sweep(self, cgs, keep):
        from bpfkeep.progs import maps
        from bpfkeep.sweep.engine import Outcome, Report, Target

        targets = [
            Target(cookie, owner, False, 1, owner, 0, 2, "", "")
            for owner, cookie in ((7, 70), (7, 71), (8, 80), (8, 81))
        ]
        kept = [t for t in targets if keep(t)]
        self.swept.append((cgs, kept))
        return Report([Outcome(t, maps.SweepEntry(t.owner, 1, applied=0b1)) for t in kept])

    def count_repaired(self, counts):
        self.counted.append(counts)


def _room(notes, existing=True, audit=15.0, audit_every=15.0):
    from types import SimpleNamespace

    from bpfkeep.config import Config
    from bpfkeep.daemon.enforce import Enforced
    from bpfkeep.daemon.state import OURS
    from bpfkeep.options import Policy

    enforce = Policy.from_mapping({"keepidle": 30, "mode": "enforce"})
    cfg = Config("", ("127.0.0.1", 0), (), audit_interval=audit)
    entries = {
        i: SimpleNamespace(
            attached=OURS, policy=enforce, cgroup=SimpleNamespace(id=i, display=str(i))
        )
        for i in (7, 8)
    }
    table = SimpleNamespace(lock=contextlib.nullcontext(), ours=lambda: entries)
    state = SimpleNamespace(cfg=cfg, table=table, enforcer=_FakeEnforcer(notes), errors=0)

    def request(cgs, req, periodic=False):
        # The sweeping thread, answering at once: the sweep, then the answer.
        req.done(state.enforcer.sweep(cgs, keep=req.keep), 0.0)
        return True

    passes = SimpleNamespace(unavailable=False, every=lambda: audit_every, request=request)
    return Enforced(state, passes, lambda cg: existing), state.enforcer


def test_the_enforce_pass_takes_no_backoff():
    """The audit backed off to 290 s: the enforced cgroups are still swept
    every enforce_interval; a shorter audit interval is taken; audits off
    change nothing."""
    assert _room([], audit_every=290.0)[0].every() == 30.0
    assert _room([], audit_every=15.0)[0].every() == 15.0
    assert _room([], audit=0, audit_every=290.0)[0].every() == 30.0


def test_notes_are_repaired_together_by_cookie():
    """Notes of two sockets of one policy, one MPTCP note (cookie 0) of
    another: one sweep, the first policy's two sockets by cookie, every
    socket of the other; counted per policy and option."""
    from bpfkeep.progs.maps import BypassNote

    notes = [
        BypassNote(7, 70, ("keepalive",), 5000),
        BypassNote(7, 71, ("keepidle",), 1),
        BypassNote(8, 0, ("keepalive",), 1),
        BypassNote(9, 90, ("keepalive",), 1),  # not the daemon's policy
    ]
    room, enf = _room(notes)
    room.repair()
    ((cgs, kept),) = enf.swept
    assert sorted(cg.id for cg in cgs) == [7, 8]
    assert sorted((t.owner, t.cookie) for t in kept) == [(7, 70), (7, 71), (8, 80), (8, 81)]
    assert enf.counted == [{7: {"keepalive": 2}, 8: {"keepalive": 2}}]
    assert room.repairs == 1


def test_without_existing_a_note_without_cookie_sweeps_nothing():
    """existing = false: old sockets stay as they were, so a note that
    names no socket is not turned into a sweep of every socket."""
    from bpfkeep.progs.maps import BypassNote

    room, enf = _room(
        [BypassNote(8, 0, ("keepalive",), 1), BypassNote(7, 71, ("keepidle",), 1)], existing=False
    )
    room.repair()
    ((_, kept),) = enf.swept
    assert [(t.owner, t.cookie) for t in kept] == [(7, 71)]


def test_a_repair_waits_for_its_gap(monkeypatch):
    """A repair that took 10 ms of CPU: the next waits 20 times that."""
    from bpfkeep.daemon import enforce
    from bpfkeep.progs.maps import BypassNote

    room, _ = _room([BypassNote(7, 70, ("keepalive",), 1)])
    clock = iter([0.0, 0.010])
    monkeypatch.setattr(enforce.time, "process_time", lambda: next(clock))
    monkeypatch.setattr(enforce.time, "monotonic", lambda: 100.0)
    room.repair()
    room.rang()
    assert room.next() == pytest.approx(100.0 + enforce.REPAIR_COST_FACTOR * 0.010)
