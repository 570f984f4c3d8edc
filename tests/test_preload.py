"""The LD_PRELOAD shim (preload/) and bpfkeep.preload, with real programs.

Programs run under ``strace -f -e trace=network``, as libkeepalive tests
itself: the setsockopt calls the shim makes are matched line by line.  The
result is then read back from the kernel: getsockopt inside the workload
(tests/preload_helpers/probe.py, sockprobe.c) and ``ss`` from outside.
Loopback only; no root needed.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import os
import pathlib
import random
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping

import pytest

from bpfkeep import peers, preload
from bpfkeep.errors import EnvironmentProblem, UsageError
from bpfkeep.options import OPTIONS, TUNABLE, Policy

ROOT = pathlib.Path(__file__).resolve().parent.parent
HELPERS = ROOT / "tests" / "preload_helpers"
PROBE = str(HELPERS / "probe.py")
PYTHON = "/usr/bin/python3"  # dynamically linked: the shim applies
INT_MAX = 2**31 - 1

DEFAULTS = {
    "TCP_KEEPIDLE": 15,
    "TCP_KEEPINTVL": 15,
    "TCP_KEEPCNT": 9,
    "TCP_USER_TIMEOUT": 150_000,
    "SO_KEEPALIVE": 1,
}

LINE = re.compile(r"^(?:(?P<pid>\d+) +)?(?P<call>\w+)\((?P<args>.*)\) += (?P<ret>-?\d+)")
SETSOCKOPT = re.compile(r"^(?P<fd>\d+), (?:SOL_SOCKET|SOL_TCP), (?P<opt>\w+), \[(?P<v>-?\d+)\], 4$")


# --- running programs -----------------------------------------------------


@dataclasses.dataclass
class Call:
    pid: str
    name: str
    args: str
    ret: int

    @property
    def fd(self) -> int | None:
        head = self.args.split(",", 1)[0]
        return int(head) if head.isdigit() else None


@dataclasses.dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    # the strace log; None: the program ran without strace because strace
    # cannot trace here -- a test that reads the log is skipped then
    raw_trace: str | None

    @property
    def trace(self) -> str:
        if self.raw_trace is None:
            require_strace()
            raise AssertionError("this program was not run under strace")
        return self.raw_trace

    def records(self) -> list[dict]:
        return [json.loads(x) for x in self.stdout.splitlines() if x.startswith("{")]

    def calls(self) -> list[Call]:
        out = []
        for line in self.trace.splitlines():
            m = LINE.match(line)
            if m:
                out.append(Call(m["pid"] or "", m["call"], m["args"], int(m["ret"])))
        return out

    def tcp_sockets(self) -> list[list[Call]]:
        """The calls on each TCP socket, from its socket() to the next
        socket()/accept() that reuses its fd (close is not traced)."""
        calls = self.calls()
        out = []
        for i, c in enumerate(calls):
            if not (
                c.name == "socket" and re.match(r"AF_INET6?, SOCK_STREAM", c.args) and c.ret >= 0
            ):
                continue
            life = []
            for later in calls[i + 1 :]:
                if later.pid != c.pid:
                    continue
                if later.name in ("socket", "accept", "accept4") and later.ret == c.ret:
                    break
                if later.fd == c.ret:
                    life.append(later)
            out.append(life)
        return out

    def accepted(self) -> dict[str, list[Call]]:
        """The calls on each connection accept() or accept4() returned, by
        the peer's address, until its fd is reused."""
        calls = self.calls()
        out = {}
        for i, c in enumerate(calls):
            m = re.search(r'inet_(?:addr\("|pton\(AF_INET6, ")([^"]+)"', c.args)
            if c.name not in ("accept", "accept4") or c.ret < 0 or not m:
                continue
            life = []
            for later in calls[i + 1 :]:
                if later.pid != c.pid:
                    continue
                if later.name in ("socket", "accept", "accept4") and later.ret == c.ret:
                    break
                if later.fd == c.ret:
                    life.append(later)
            out[m.group(1)] = life
        return out

    def sets(self, n: int = 0) -> dict[str, int]:
        """Successful setsockopt, option -> value, on the n-th TCP socket;
        each option at most once."""
        return self.sets_of(self.tcp_sockets()[n])

    def sets_of(self, life: list[Call]) -> dict[str, int]:
        """Successful setsockopt, option -> value, among a socket's calls;
        each option at most once."""
        out: dict[str, int] = {}
        for c in life:
            if c.name != "setsockopt":
                continue
            m = SETSOCKOPT.match(c.args)
            assert m and c.ret == 0, f"unexpected setsockopt: {c}"
            assert m["opt"] not in out, f"{m['opt']} set twice:\n{self.trace}"
            out[m["opt"]] = int(m["v"])
        return out

    def assert_set_before(self, call: str, n: int = 0) -> None:
        """On the n-th TCP socket the shim's setsockopt calls precede `call`,
        and SO_KEEPALIVE comes after the TCP_* options."""
        life = self.tcp_sockets()[n]
        first = next(i for i, c in enumerate(life) if c.name == call)
        opts = [i for i, c in enumerate(life) if c.name == "setsockopt"]
        assert opts and max(opts) < first, self.trace
        assert "SO_KEEPALIVE" in life[max(opts)].args, self.trace


class Shim:
    """Runs programs with libbpfkeep preloaded, under strace."""

    def __init__(self, lib: pathlib.Path, tmp: pathlib.Path) -> None:
        self.lib = lib
        self.tmp = tmp
        self.n = 0

    def command(
        self,
        argv: list[str],
        extra: Mapping[str, str] | None = None,
        *,
        strace: bool = True,
        preload_lib: bool = True,
        trace: str = "network",
    ) -> tuple[list[str], dict[str, str], pathlib.Path]:
        """argv (under strace when it can trace here), its environment, the
        trace file (read it with :func:`read_trace`)."""
        # A clean environment: no TCP_* variables inherited from the host.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        if preload_lib:
            env["LD_PRELOAD"] = str(self.lib)
        env.update(extra or {})
        self.n += 1
        out = self.tmp / f"trace{self.n}"
        if strace and strace_problem() is None:
            # -E: the shim goes into the traced program, not into strace.
            pre = ["-E", "LD_PRELOAD=" + env.pop("LD_PRELOAD")] if "LD_PRELOAD" in env else []
            argv = ["strace", "-f", "-qq", "-e", f"trace={trace}", "-o", str(out), *pre, *argv]
        return argv, env, out

    def run(
        self,
        argv: list[str],
        env: Mapping[str, str] | None = None,
        *,
        strace: bool = True,
        preload_lib: bool = True,
        check: bool = True,
        trace: str = "network",
    ) -> Result:
        cmd, full_env, trace_file = self.command(
            argv, env, strace=strace, preload_lib=preload_lib, trace=trace
        )
        p = subprocess.run(
            cmd, env=full_env, capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL
        )
        res = Result(p.returncode, p.stdout, p.stderr, read_trace(trace_file) if strace else None)
        if check:
            assert p.returncode == 0, f"{cmd} failed:\n{p.stdout}\n{p.stderr}"
        return res

    def probe(self, *args: str, env: Mapping[str, str] | None = None, **kw) -> Result:
        return self.run([PYTHON, PROBE, *args], env, **kw)


class Server:
    """A loopback listener in the test process; keeps what it accepts, or
    closes it at once (hold=False: for clients that wait for the peer)."""

    def __init__(self, host: str, hold: bool = True) -> None:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.hold = hold
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.hold:
                self.conns.append(conn)
            else:
                conn.close()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)
        for c in self.conns:
            c.close()


@pytest.fixture(scope="session")
def lib(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("preload")
    subprocess.run(["make", "-s", "-C", str(ROOT / "preload"), f"O={out}"], check=True)
    return out / "libbpfkeep.so"


@functools.cache
def strace_problem() -> str | None:
    """Why strace cannot trace here (not installed, ptrace refused by a
    container's seccomp profile or Yama), or None."""
    if shutil.which("strace") is None:
        return "strace not installed"
    p = subprocess.run(["strace", "-qq", "-o", os.devnull, "true"], capture_output=True)
    if p.returncode != 0:
        return f"strace cannot trace here: {p.stderr.decode().strip()}"
    return None


def require_strace() -> None:
    """Skip the test calling it.  Called when a test reads an strace log
    (Result.trace): only those tests are gated on ptrace; the others run
    their program without strace and pass or fail wherever the shim loads."""
    problem = strace_problem()
    if problem:
        pytest.skip(problem)


def read_trace(path: pathlib.Path) -> str | None:
    """What Shim.command's strace wrote; None when it ran without strace."""
    return None if strace_problem() else path.read_text()


@pytest.fixture
def shim(lib: pathlib.Path, tmp_path: pathlib.Path) -> Shim:
    return Shim(lib, tmp_path)


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server("127.0.0.1")
    yield s
    s.close()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A bound, non-listening port: connecting to it is refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


@pytest.fixture(scope="session")
def cc(tmp_path_factory: pytest.TempPathFactory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    out = tmp_path_factory.mktemp("cprogs")

    def build(name: str, src: pathlib.Path, *flags: str) -> pathlib.Path:
        exe = out / name
        if not exe.exists():
            subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(src), *flags], check=True)
        return exe

    return build


@pytest.fixture(scope="session")
def sockprobe(cc) -> pathlib.Path:
    return cc("sockprobe", HELPERS / "sockprobe.c")


def kernel_default(name: str) -> int:
    return int(pathlib.Path(f"/proc/sys/net/ipv4/{name}").read_text())


# --- the library itself -------------------------------------------------------


def test_exports_only_the_wrappers(lib: pathlib.Path) -> None:
    if shutil.which("nm") is None:
        pytest.skip("nm not installed")
    out = subprocess.run(
        ["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True
    ).stdout
    assert {line.split()[-1] for line in out.splitlines()} == {
        "connect",
        "listen",
        "socket",
        "setsockopt",
        # only to forget the fds socket() saw created as TCP
        "close",
        "dup2",
        "dup3",
        "accept",
        "accept4",
        # TCP Fast Open connects without connect()
        "sendto",
        "sendmsg",
    }


def need_ncat() -> str:
    """Nmap's ncat (scripts/setup.sh installs it), called by its own name:
    ``nc`` is whichever netcat the alternatives system picked, and
    netcat-openbsd connects, listens and sets options differently."""
    ncat = shutil.which("ncat")
    if ncat is None:
        pytest.skip("ncat not installed (scripts/setup.sh installs it)")
    return ncat


# --- client side (connect) ---------------------------------------------------


def test_client_defaults_strace_getsockopt_and_ss(shim: Shim, server: Server) -> None:
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) not installed")
    cmd, env, trace = shim.command(
        [PYTHON, PROBE, "client", "127.0.0.1", str(server.port), "--hold"]
    )
    p = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        got = json.loads(p.stdout.readline())
        # From outside: the kernel has the keepalive timer armed.
        ss = subprocess.run(
            ["ss", "-tnoH", "state", "established", "sport", "=", f":{got['local_port']}"],
            capture_output=True,
            text=True,
        ).stdout
    finally:
        p.communicate("", timeout=10)
    assert p.returncode == 0
    assert "timer:(keepalive," in ss, ss
    # Inside: what getsockopt reads back.
    assert got["keepalive"] == 1
    assert (got["keepidle"], got["keepintvl"], got["keepcnt"]) == (15, 15, 9)
    assert got["user_timeout"] == 150_000
    # What the shim asked for, and in what order.
    res = Result(0, "", "", read_trace(trace))
    assert res.sets() == DEFAULTS
    res.assert_set_before("connect")


KEEPALIVE_TIME = "tcp_keepalive_time"


CLIENT_ENV = [
    pytest.param(
        {
            "TCP_KEEPIDLE": "7",
            "TCP_KEEPINTVL": "3",
            "TCP_KEEPCNT": "4",
            "TCP_SYNCNT": "2",
            "TCP_MAXSEG": "1200",
            "TCP_WINDOW_CLAMP": "40000",
            "TCP_DEFER_ACCEPT": "5",  # listen side only
        },
        {
            "TCP_KEEPIDLE": 7,
            "TCP_KEEPINTVL": 3,
            "TCP_KEEPCNT": 4,
            "TCP_USER_TIMEOUT": (7 + 3 * 4) * 1000,
            "TCP_SYNCNT": 2,
            "TCP_MAXSEG": 1200,
            "TCP_WINDOW_CLAMP": 40000,
            "SO_KEEPALIVE": 1,
        },
        id="all-options",
    ),
    pytest.param(
        {"TCP_USER_TIMEOUT": "4000"}, {**DEFAULTS, "TCP_USER_TIMEOUT": 4000}, id="user-timeout"
    ),
    pytest.param(
        {"TCP_USER_TIMEOUT": "0"},
        {k: v for k, v in DEFAULTS.items() if k != "TCP_USER_TIMEOUT"},
        id="zero-is-kernel-default",
    ),
    pytest.param({"TCP_USER_TIMEOUT": "-1"}, DEFAULTS, id="minus-one-derives"),
    pytest.param(
        {"TCP_KEEPIDLE": "0"},
        {
            "TCP_KEEPINTVL": 15,
            "TCP_KEEPCNT": 9,
            "TCP_USER_TIMEOUT": KEEPALIVE_TIME,  # derived from the kernel's
            "SO_KEEPALIVE": 1,
        },
        id="derived-from-kernel-value",
    ),
    pytest.param(
        {"TCP_KEEPIDLE": "32767", "TCP_KEEPINTVL": "32767", "TCP_KEEPCNT": "127"},
        {
            "TCP_KEEPIDLE": 32767,
            "TCP_KEEPINTVL": 32767,
            "TCP_KEEPCNT": 127,
            "TCP_USER_TIMEOUT": INT_MAX,
            "SO_KEEPALIVE": 1,
        },
        id="derived-clamped",
    ),
    pytest.param(
        {
            "FORCE_KEEPALIVE_IDLE": "20",
            "FORCE_KEEPALIVE_INTVL": "4",
            "FORCE_KEEPALIVE_CNT": "3",
        },
        {
            "TCP_KEEPIDLE": 20,
            "TCP_KEEPINTVL": 4,
            "TCP_KEEPCNT": 3,
            "TCP_USER_TIMEOUT": 32000,
            "SO_KEEPALIVE": 1,
        },
        id="force-keepalive-aliases",
    ),
    pytest.param(
        {"TCP_KEEPIDLE": "30", "FORCE_KEEPALIVE_IDLE": "20", "KEEPIDLE": "10"},
        {**DEFAULTS, "TCP_KEEPIDLE": 30, "TCP_USER_TIMEOUT": 165_000},
        id="canonical-wins",
    ),
    pytest.param(
        {"KEEPIDLE": "25", "KEEPCNT": "2"},
        {**DEFAULTS, "TCP_KEEPIDLE": 25, "TCP_KEEPCNT": 2, "TCP_USER_TIMEOUT": 55_000},
        id="original-libkeepalive-names",
    ),
]
# The options left out of a case's setsockopt calls stay at the kernel's
# defaults: the sysctls of this network namespace (or none at all).
UNSET = {
    "TCP_KEEPIDLE": "tcp_keepalive_time",
    "TCP_KEEPINTVL": "tcp_keepalive_intvl",
    "TCP_KEEPCNT": "tcp_keepalive_probes",
    "TCP_USER_TIMEOUT": None,
    "TCP_SYNCNT": "tcp_syn_retries",
}


def _want(want: dict) -> dict:
    if want.get("TCP_USER_TIMEOUT") == KEEPALIVE_TIME:
        want = {**want, "TCP_USER_TIMEOUT": (kernel_default(KEEPALIVE_TIME) + 15 * 9) * 1000}
    return want


@pytest.mark.parametrize(("env", "want"), CLIENT_ENV)
def test_client_env(shim: Shim, server: Server, env: dict, want: dict) -> None:
    """What the socket ends with, read back with getsockopt: no strace."""
    want = _want(want)
    res = shim.probe("client", "127.0.0.1", str(server.port), env=env, strace=False)
    got = res.records()[0]
    assert got["keepalive"] == 1
    for opt, sysctl in UNSET.items():
        default = kernel_default(sysctl) if sysctl else 0
        assert got[opt[4:].lower()] == want.get(opt, default), opt


@pytest.mark.parametrize(("env", "want"), CLIENT_ENV)
def test_client_env_strace(shim: Shim, server: Server, env: dict, want: dict) -> None:
    """What the shim asked the kernel for, once each, before connect()."""
    res = shim.probe("client", "127.0.0.1", str(server.port), env=env)
    assert res.sets() == _want(want)
    res.assert_set_before("connect")


def test_ncat_client_nonblocking_connect(shim: Shim) -> None:
    ncat = need_ncat()
    server = Server("127.0.0.1", hold=False)
    try:
        res = shim.run([ncat, "127.0.0.1", str(server.port)], {"TCP_KEEPIDLE": "42"})
    finally:
        server.close()
    assert res.sets() == {**DEFAULTS, "TCP_KEEPIDLE": 42, "TCP_USER_TIMEOUT": 177_000}
    res.assert_set_before("connect")
    # ncat connects without blocking: the caller still sees EINPROGRESS.
    assert re.search(r"connect\(.*= -1 EINPROGRESS", res.trace), res.trace


def test_ipv6_client(shim: Shim) -> None:
    srv = Server("::1")
    try:
        res = shim.probe("client", "::1", str(srv.port))
    finally:
        srv.close()
    assert res.sets() == DEFAULTS
    assert res.records()[0]["keepalive"] == 1


def test_threaded_client(shim: Shim, server: Server) -> None:
    res = shim.probe("threads", "127.0.0.1", str(server.port), "16", strace=False)
    results = res.records()[0]["results"]
    assert len(results) == 16
    assert all(r["keepalive"] == 1 and r["keepidle"] == 15 for r in results)


def test_fork_and_exec_child_gets_it(shim: Shim, server: Server) -> None:
    res = shim.probe("forkexec", "127.0.0.1", str(server.port), env={"TCP_KEEPIDLE": "33"})
    child, parent = res.records()
    assert parent["child_status"] == 0 and child["pid"] != parent["parent"]
    assert child["keepalive"] == 1 and child["keepidle"] == 33


def test_nonblocking_connect_called_again_applies_once(shim: Shim, server: Server) -> None:
    """The policy goes on at the first connect() only; what the program
    sets afterwards stands in set mode, as on the kernel path (issue 10)."""
    res = shim.probe("nonblock", "127.0.0.1", str(server.port))
    got = res.records()[0]
    assert got["first"] == "EINPROGRESS" and got["last"] == "EISCONN", got
    assert (got["keepalive"], got["keepidle"]) == (0, 1800), got
    life = res.tcp_sockets()[0]
    connects = [i for i, c in enumerate(life) if c.name == "connect"]
    sets = [c.args for c in life if c.name == "setsockopt"]
    assert len(connects) == 3, res.trace
    # The policy's five before the first connect, then only the program's two.
    assert [i for i, c in enumerate(life) if c.name == "setsockopt"][4] < connects[0]
    assert len(sets) == 7 and sets[5:] == [
        f"{life[0].fd}, SOL_SOCKET, SO_KEEPALIVE, [0], 4",
        f"{life[0].fd}, SOL_TCP, TCP_KEEPIDLE, [1800], 4",
    ], sets


@pytest.mark.parametrize("how", ["sendto", "sendmsg"])
def test_tcp_fast_open_connects_get_the_policy(shim: Shim, server: Server, how: str) -> None:
    """sendto()/sendmsg() with MSG_FASTOPEN connect without connect()."""
    if not kernel_default("tcp_fastopen") & 1:
        pytest.skip("net.ipv4.tcp_fastopen has client mode off")
    res = shim.probe("tfo", "127.0.0.1", str(server.port), how, env={"TCP_SYNCNT": "3"})
    assert res.sets() == {**DEFAULTS, "TCP_SYNCNT": 3}
    res.assert_set_before(how)
    got = res.records()[0]
    assert (got["keepalive"], got["keepidle"], got["syncnt"]) == (1, 15, 3)


# --- server side (listen) ---------------------------------------------------------


def _connect_when_listening(port: int, payload: bytes) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                c.sendall(payload)  # TCP_DEFER_ACCEPT waits for data
                return
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def test_python_listener(shim: Shim) -> None:
    env = {"TCP_DEFER_ACCEPT": "5", "TCP_SYNCNT": "3", "TCP_KEEPIDLE": "20"}
    cmd, env, trace = shim.command([PYTHON, PROBE, "server", "127.0.0.1"], env)
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    try:
        port = json.loads(p.stdout.readline())["port"]
        _connect_when_listening(port, b"x")
        got = json.loads(p.stdout.readline())
    finally:
        p.communicate(timeout=10)
    res = Result(p.returncode, "", "", read_trace(trace))
    assert res.sets() == {
        **DEFAULTS,
        "TCP_KEEPIDLE": 20,
        "TCP_USER_TIMEOUT": 155_000,
        "TCP_DEFER_ACCEPT": 5,  # no TCP_SYNCNT: connect side only
    }
    res.assert_set_before("listen")
    # The accepted socket inherited the listener's options.
    acc = got["accepted"]
    assert (acc["keepalive"], acc["keepidle"], acc["user_timeout"]) == (1, 20, 155_000)
    assert got["listener"]["defer_accept"] > 0


def test_listen_called_again_applies_once(shim: Shim) -> None:
    """nginx sets so_keepalive after its first listen() and listens again:
    its choice stands in set mode, as on the kernel path (issue 10)."""
    res = shim.probe("relisten", "127.0.0.1")
    got = res.records()[0]
    assert (got["keepalive"], got["keepidle"]) == (0, 1800), got
    sets = [c.args.split(", ")[2:4] for c in res.tcp_sockets()[0] if c.name == "setsockopt"]
    assert sets == [
        ["TCP_KEEPIDLE", "[15]"],
        ["TCP_KEEPINTVL", "[15]"],
        ["TCP_KEEPCNT", "[9]"],
        ["TCP_USER_TIMEOUT", "[150000]"],
        ["SO_KEEPALIVE", "[1]"],
        ["SO_KEEPALIVE", "[0]"],
        ["TCP_KEEPIDLE", "[1800]"],
    ], res.trace


def test_ncat_listener(shim: Shim) -> None:
    ncat = need_ncat()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd, env, trace = shim.command([ncat, "-l", "127.0.0.1", str(port)], {"TCP_DEFER_ACCEPT": "3"})
    p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        _connect_when_listening(port, b"hello\n")
        out, _ = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
    assert out == b"hello\n"
    res = Result(p.returncode, "", "", read_trace(trace))
    assert res.sets() == {**DEFAULTS, "TCP_DEFER_ACCEPT": 3, "SO_REUSEADDR": 1}  # ncat's own
    res.assert_set_before("listen")


# --- what must stay untouched ---------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [{}, {"BPFKEEP_HOOK": "socket"}, {"BPFKEEP_ENFORCE": "1"}],
    ids=["connect-listen", "socket-hook", "enforce"],
)
def test_udp_and_unix_untouched(shim: Shim, tmp_path: pathlib.Path, env: dict) -> None:
    res = shim.probe("others", str(tmp_path), env=env)
    # Follow what each fd is, as the kernel saw it created (strace sees raw
    # system calls too); a setsockopt may only ever hit a TCP socket.
    kind: dict[str, str] = {}
    touched_tcp = 0
    for line in res.trace.splitlines():
        m = re.search(r"\b(socket|dup2|dup3)\((.*)\)\s+=\s+(\d+)", line)
        if m and m.group(1) == "socket":
            tcp = "AF_INET" in m.group(2) and "SOCK_STREAM" in m.group(2)
            tcp = tcp and "IPPROTO_MPTCP" not in m.group(2)
            kind[m.group(3)] = "tcp" if tcp else "other"
        elif m:
            kind[m.group(3)] = kind.get(m.group(2).split(",")[0].strip(), "other")
        m = re.search(r"\bsetsockopt\((\d+),", line)
        if m:
            assert kind.get(m.group(1)) == "tcp", line
            touched_tcp += 1
    if env.get("BPFKEEP_HOOK") != "socket":
        assert touched_tcp == 0, res.trace  # the TCP sockets never connect
    got = res.records()[0]
    assert got.pop("mptcp_keepalive") in (0, -1)  # -1: no MPTCP in this kernel
    assert got == {
        "udp_keepalive": 0,
        "unix_keepalive": 0,
        "udp_listen_errno": 95,
        "recycled_keepalive": 0,
        "replaced_keepalive": 0,
    }


@pytest.mark.parametrize("env", [{}, {"BPFKEEP_ENFORCE": "1"}], ids=["set", "enforce"])
def test_fd_closed_behind_the_shims_back_and_reused(
    shim: Shim, sockprobe: pathlib.Path, server: Server, env: dict
) -> None:
    """A TCP fd closed where the shim cannot see it (fclose(fdopen()),
    close_range) whose number comes back as a socketpair, a raw socket or
    an accepted connection: connect() and listen() on those must leave them
    alone (issue 9 #12; the accepted connection got the policy until
    accept() was wrapped)."""
    res = shim.run([str(sockprobe), "reuse", str(server.port)], env)
    lines = [ln.split() for ln in res.stdout.splitlines() if ln.startswith("reuse ")]
    done = {(w[1], w[2]): w[3:] for w in lines if w[3] != "unavailable"}
    assert ("fclose", "socketpair") in done and ("close_range", "socketpair") in done, lines
    assert ("fclose", "accept") in done and ("close_range", "accept") in done, lines
    if os.geteuid() == 0:  # raw sockets need CAP_NET_RAW
        assert ("fclose", "raw") in done and ("close_range", "raw") in done, lines
    for case, fields in done.items():
        assert fields == ["same=1", "keepalive=0"], (case, res.stdout)
    # The kernel was asked nothing: no TCP socket here ever connects or listens.
    assert "setsockopt(" not in res.trace, res.trace


def test_keepalive_off_disables_the_shim(shim: Shim, server: Server) -> None:
    """The original libkeepalive's KEEPALIVE=off switch."""
    res = shim.probe(
        "client", "127.0.0.1", str(server.port), env={"KEEPALIVE": "Off", "BPFKEEP_ENFORCE": "1"}
    )
    assert res.sets() == {}
    assert res.records()[0]["keepalive"] == 0


def test_static_program_not_affected(shim: Shim, cc, server: Server) -> None:
    try:
        static = cc("sockprobe-static", HELPERS / "sockprobe.c", "-static")
    except subprocess.CalledProcessError:
        pytest.skip("no static libc")
    assert preload.is_static_executable(str(static))
    res = shim.run([str(static), "client", str(server.port)])
    # A documented limitation: no dynamic loader, no LD_PRELOAD.
    assert "setsockopt(" not in res.trace
    assert json.loads(res.stdout) == {"keepalive": 0, "keepidle": kernel_default(KEEPALIVE_TIME)}


# --- invisibility: errno, return values, failures -------------------------------


# With peer rules connect() reads the address (a bad one must still give
# EFAULT) and asks for a rule.
PEER_RULES_ENV = {"BPFKEEP_PEERS": "127.0.0.1,keepidle=300;127.0.0.2,exempt"}


@pytest.mark.parametrize("env", [{}, PEER_RULES_ENV], ids=["", "peer-rules"])
def test_errno_untouched_c(
    shim: Shim, sockprobe: pathlib.Path, server: Server, closed_port: int, env: dict
) -> None:
    argv = [str(sockprobe), "errno", str(server.port), str(closed_port)]
    bare = shim.run(argv, preload_lib=False, strace=False)  # the checks hold without it
    res = shim.run(argv, env, strace=False)
    for r in (bare, res):
        assert "FAIL" not in r.stdout and r.stdout.count("ok ") == 10, r.stdout
    assert "keepalive 1" in res.stdout and "keepalive 0" in bare.stdout


def test_errno_untouched_python(shim: Shim, server: Server, closed_port: int) -> None:
    res = shim.probe("errno", "127.0.0.1", str(closed_port), str(server.port))
    assert res.records()[0] == {"refused": "ECONNREFUSED", "nonblocking": "EINPROGRESS"}


def test_without_dlsym_uses_system_calls(
    shim: Shim, sockprobe: pathlib.Path, server: Server, closed_port: int, tmp_path: pathlib.Path
) -> None:
    out = tmp_path / "nodlsym"
    subprocess.run(
        ["make", "-s", "-C", str(ROOT / "preload"), f"O={out}", "CPPFLAGS=-DBK_TEST_NO_DLSYM"],
        check=True,
    )
    shim.lib = out / "libbpfkeep.so"
    res = shim.run(
        [str(sockprobe), "errno", str(server.port), str(closed_port)],
        {"LIBKEEPALIVE_DEBUG": "1", "BPFKEEP_ENFORCE": "1"},
        strace=False,
    )
    assert "FAIL" not in res.stdout and "keepalive 1" in res.stdout, res.stdout
    assert 'dlsym(RTLD_NEXT, "connect") failed' in res.stderr
    # accept() and accept4() (Python's) with peer rules: the system call.
    cmd, env, _ = shim.command(
        [PYTHON, PROBE, "serve", "127.0.0.1", "1"], PEER_RULES_ENV, strace=False
    )
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    try:
        port = json.loads(p.stdout.readline())["port"]
        client = _connect_from("127.0.0.1", port)
        accepted = json.loads(p.stdout.readline())
        p.wait(timeout=15)
        client.close()
    finally:
        if p.poll() is None:
            p.kill()
    assert (accepted["keepalive"], accepted["keepidle"]) == (1, 300), accepted


def test_bad_values_fall_back_to_defaults(shim: Shim, server: Server) -> None:
    bad = {
        "TCP_KEEPIDLE": "abc",
        "TCP_KEEPINTVL": "-5",
        "TCP_KEEPCNT": "1000",
        "TCP_USER_TIMEOUT": "12x",
        "TCP_MAXSEG": "10",
        "TCP_SYNCNT": " 3",
        "BPFKEEP_HOOK": "bogus",
    }
    quiet = shim.probe("client", "127.0.0.1", str(server.port), env=bad)
    assert quiet.stderr == ""
    loud = shim.probe(
        "client", "127.0.0.1", str(server.port), env={**bad, "LIBKEEPALIVE_DEBUG": ""}
    )
    for res in (quiet, loud):
        assert res.sets() == DEFAULTS
        assert res.records()[0]["keepidle"] == 15
    lines = loud.stderr.splitlines()
    assert len(lines) == len(bad)
    for name, value in bad.items():
        assert any(f'{name}="{value}"' in line for line in lines), (name, lines)


# --- enforce mode --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["enforce", "set"])
def test_enforce(shim: Shim, server: Server, mode: str) -> None:
    env = {"BPFKEEP_ENFORCE": "yes"} if mode == "enforce" else {}
    res = shim.probe("enforce", "127.0.0.1", str(server.port), env=env)
    got = res.records()[0]
    assert got["udp_keepalive"] == 0  # never touched: not TCP
    assert got["keepintvl"] == 5  # below the policy: passes
    asked = [c.args for c in res.tcp_sockets()[0] if c.name == "setsockopt"]
    if mode == "enforce":
        assert (got["keepalive"], got["keepidle"], got["user_timeout"]) == (1, 15, 150_000)
        # The kernel never saw the application's values.
        assert not any("[0]" in a or "[10000]" in a for a in asked), asked
    else:
        assert (got["keepalive"], got["keepidle"], got["user_timeout"]) == (0, 10000, 0)


@pytest.mark.parametrize(
    "env",
    # BPFKEEP_ENFORCE; or a peer rule for 127.0.0.1 enforcing the policy's
    # values, whose caps look the socket's peer up first.
    [{"BPFKEEP_ENFORCE": "1"}, {"BPFKEEP_PEERS": "127.0.0.1,mode=enforce"}],
    ids=["enforce", "peer-rule"],
)
def test_enforce_bad_pointer_gives_efault_not_a_crash(
    shim: Shim, sockprobe: pathlib.Path, server: Server, env: dict
) -> None:
    """A C program passing setsockopt pointers the kernel cannot read gets
    -1/EFAULT under enforce mode, exactly as without the shim (issue 9 #8)."""
    argv = [str(sockprobe), "badptr", str(server.port)]
    bare = shim.run(argv, preload_lib=False, strace=False)
    res = shim.run(argv, env, strace=False, check=False)
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr)
    for r in (bare, res):
        assert "FAIL" not in r.stdout and r.stdout.count("ok ") == 15, r.stdout
    # Good pointers are still capped: the program's 0 and 10000 did not stick.
    assert "keepalive 1 keepidle 15" in res.stdout, res.stdout
    assert "keepalive 0 keepidle 10000" in bare.stdout, bare.stdout


# --- BPFKEEP_HOOK=socket ----------------------------------------------------------


def test_socket_hook(shim: Shim, server: Server) -> None:
    res = shim.probe(
        "client",
        "127.0.0.1",
        str(server.port),
        env={"BPFKEEP_HOOK": "socket", "TCP_SYNCNT": "3", "TCP_DEFER_ACCEPT": "2"},
    )
    # At socket() the role is unknown: every option, straight after it.
    assert res.sets() == {**DEFAULTS, "TCP_SYNCNT": 3, "TCP_DEFER_ACCEPT": 2}
    res.assert_set_before("connect")
    assert "SO_TYPE" not in res.trace  # socket()'s arguments suffice
    assert res.records()[0]["keepalive"] == 1


def test_socket_hook_under_another_connect_wrapper(
    shim: Shim, cc, server: Server, tmp_path: pathlib.Path
) -> None:
    """A preload that wraps connect() without calling the next one hides it
    from the default hook; BPFKEEP_HOOK=socket still works."""
    src = tmp_path / "other.c"
    src.write_text(
        "#include <sys/socket.h>\n#include <sys/syscall.h>\n#include <unistd.h>\n"
        "int connect(int fd, const struct sockaddr *a, socklen_t l)\n"
        "{ return (int)syscall(SYS_connect, fd, a, l); }\n"
    )
    other = cc("other.so", src, "-shared", "-fPIC")
    both = f"{other}:{shim.lib}"
    args = ("client", "127.0.0.1", str(server.port))
    hidden = shim.probe(*args, env={"LD_PRELOAD": both}, strace=False)
    assert hidden.records()[0]["keepalive"] == 0
    seen = shim.probe(*args, env={"LD_PRELOAD": both, "BPFKEEP_HOOK": "socket"}, strace=False)
    assert seen.records()[0]["keepalive"] == 1


# --- peer rules (BPFKEEP_PEERS) ----------------------------------------------------
#
# Loopback only: 127.0.0.0/8 is all local, so 127.0.0.2 and 127.0.0.3 are
# peers of their own; a connect() to a port where nothing listens is
# refused at once, and the shim has set its options before it, so values
# can be read back from refused sockets too.


@pytest.fixture
def servers() -> Iterator[dict[str, Server]]:
    """Listeners on 127.0.0.1, 127.0.0.2, 127.0.0.3 and ::1."""
    made = {host: Server(host) for host in ("127.0.0.1", "127.0.0.2", "127.0.0.3", "::1")}
    yield made
    for s in made.values():
        s.close()


def _peers(shim: Shim, env: dict, *targets: tuple[str, int], **kw) -> tuple[Result, list[dict]]:
    """probe.py peers: one connection per (host, port), in order; the
    records, in the same order."""
    args = [x for host, port in targets for x in (host, str(port))]
    res = shim.probe("peers", *args, env=env, **kw)
    got = res.records()
    assert [(r["host"], r["port"]) for r in got] == list(targets)
    return res, got


def _policy_of(got: dict) -> tuple[int, int, int, int, int]:
    return (
        got["keepalive"],
        got["keepidle"],
        got["keepintvl"],
        got["keepcnt"],
        got["user_timeout"],
    )


def test_peer_rules_give_each_peer_its_values(shim: Shim, servers: dict[str, Server]) -> None:
    """Two IPv4 peers and ::1.  Keys a rule does not give come from the
    policy; a rule's derived user timeout follows its own times."""
    env = {
        "TCP_KEEPIDLE": "20",
        "BPFKEEP_PEERS": "127.0.0.2,keepidle=300,keepcnt=2 ; ::1, keepintvl=7, user_timeout=9000",
    }
    targets = [(h, servers[h].port) for h in ("127.0.0.1", "127.0.0.2", "::1")]
    res, got = _peers(shim, env, *targets)
    want = [
        {**DEFAULTS, "TCP_KEEPIDLE": 20, "TCP_USER_TIMEOUT": 155_000},  # the policy's
        {**DEFAULTS, "TCP_KEEPIDLE": 300, "TCP_KEEPCNT": 2, "TCP_USER_TIMEOUT": 330_000},
        {**DEFAULTS, "TCP_KEEPIDLE": 20, "TCP_KEEPINTVL": 7, "TCP_USER_TIMEOUT": 9000},
    ]
    for n, (w, g) in enumerate(zip(want, got, strict=True)):
        assert g["rc"] == 0, g
        assert res.sets(n) == w, (n, res.trace)
        res.assert_set_before("connect", n)
        # What the kernel holds, read back on the connected socket.
        assert _policy_of(g) == (
            1,
            w["TCP_KEEPIDLE"],
            w["TCP_KEEPINTVL"],
            w["TCP_KEEPCNT"],
            w["TCP_USER_TIMEOUT"],
        )


def test_exempt_peer_left_as_the_program_made_it(shim: Shim, servers: dict[str, Server]) -> None:
    env = {"TCP_SYNCNT": "3", "BPFKEEP_PEERS": "127.0.0.2,exempt;::1,exempt"}
    targets = [(h, servers[h].port) for h in ("127.0.0.2", "127.0.0.1", "::1")]
    res, got = _peers(shim, env, *targets)
    assert res.sets(0) == {} and res.sets(2) == {}, res.trace  # not one setsockopt
    assert res.sets(1) == {**DEFAULTS, "TCP_SYNCNT": 3}
    for g in (got[0], got[2]):
        assert (g["keepalive"], g["user_timeout"]) == (0, 0), g
        assert g["keepidle"] == kernel_default(KEEPALIVE_TIME)
        assert g["syncnt"] == kernel_default("tcp_syn_retries")
    assert (got[1]["keepalive"], got[1]["syncnt"]) == (1, 3)


@pytest.fixture
def closed_ports() -> Iterator[list[int]]:
    """Three bound, non-listening ports on 127.0.0.1."""
    socks = [socket.socket() for _ in range(3)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    yield [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()


def test_port_rules(shim: Shim, closed_ports: list[int]) -> None:
    """A port rule over none at the same prefix, the narrower range over
    the wider, the first written between equals -- but the longest prefix
    first: a port rule of a shorter prefix loses to any rule of a longer."""
    p1, p2, p3 = closed_ports
    rules = [
        "127.0.0.1,port=1-65535,keepidle=101",
        f"127.0.0.1,port={p1},keepidle=102",
        f"127.0.0.0/8,port={p2},keepidle=103",
        "127.0.0.0/8,keepidle=104",
        f"127.0.0.1/32,port={p1},keepidle=105",  # the same as the second: first written wins
        f"127.0.0.2,port={min(p3, 65000)}-{min(p3, 65000) + 10},keepidle=106",
        "127.0.0.2,port=1-65535,keepidle=107",
    ]
    env = {"BPFKEEP_PEERS": ";".join(rules)}
    targets = [
        ("127.0.0.1", p1),  # 102: the narrowest range at /32
        ("127.0.0.1", p2),  # 101: /32's 1-65535 beats /8's port p2
        ("127.0.0.3", p2),  # 103: /8 with port p2 beats /8 without
        ("127.0.0.3", p1),  # 104
        ("127.0.0.2", min(p3, 65000) + 5),  # 106: 11 ports beat 65535
        ("127.0.0.2", 1),  # 107
    ]
    _res, got = _peers(shim, env, *targets, strace=False)
    assert [g["keepidle"] for g in got] == [102, 101, 103, 104, 106, 107], got


def test_longest_prefix_wins(shim: Shim, closed_ports: list[int]) -> None:
    port = closed_ports[0]
    env = {
        "BPFKEEP_PEERS": "127.0.0.0/8,keepidle=200;127.0.0.2/32,keepidle=300;"
        "127.0.0.0/16,keepidle=250;::/0,keepidle=99"
    }
    hosts = ["127.0.0.2", "127.0.0.1", "127.1.0.1", "::1"]
    _res, got = _peers(shim, env, *[(h, port) for h in hosts], strace=False)
    assert [g["keepidle"] for g in got] == [300, 250, 200, 99], got


def test_ipv4_mapped_peers_match_ipv4_rules(shim: Shim, servers: dict[str, Server]) -> None:
    """An IPv6 socket talking to ::ffff:127.0.0.2 gets 127.0.0.2's rule,
    and an IPv4 rule written the IPv6 way matches IPv4 sockets."""
    env = {"BPFKEEP_PEERS": "127.0.0.2,keepidle=300;::ffff:127.0.0.0/104,keepidle=250"}
    targets = [
        ("::ffff:127.0.0.2", servers["127.0.0.2"].port),
        ("127.0.0.3", servers["127.0.0.3"].port),
        ("::1", servers["::1"].port),
    ]
    _res, got = _peers(shim, env, *targets, strace=False)
    assert [g["rc"] for g in got] == [0, 0, 0]
    assert [g["keepidle"] for g in got] == [300, 250, 15], got


def _connect_from(source: str, port: int, payload: bytes = b"x") -> socket.socket:
    c = socket.socket()
    c.bind((source, 0))
    c.connect(("127.0.0.1", port))
    c.sendall(payload)  # TCP_DEFER_ACCEPT waits for data
    return c


def test_accepted_connections_get_their_clients_rule(shim: Shim) -> None:
    """With peer rules the listener is left as the program made it (but for
    TCP_DEFER_ACCEPT, a listener's option) and each accepted connection
    gets its client's rule; an exempt client's inherits exactly what the
    program set on the listener."""
    env = {
        "TCP_DEFER_ACCEPT": "5",
        "TCP_KEEPCNT": "4",
        "BPFKEEP_PEERS": "127.0.0.2,keepidle=300;127.0.0.3,exempt",
    }
    # The program's own choices on its listener, before listen().
    cmd, full_env, trace = shim.command(
        [PYTHON, PROBE, "serve", "127.0.0.1", "3", "keepalive=1", "keepidle=1800"], env
    )
    p = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, text=True)
    clients = []
    try:
        port = json.loads(p.stdout.readline())["port"]
        clients = [_connect_from(src, port) for src in ("127.0.0.2", "127.0.0.3", "127.0.0.1")]
        # Not communicate(): it reads the pipe past what readline() has
        # buffered already, losing lines the probe wrote at once.
        out = p.stdout.read()
        p.wait(timeout=15)
    finally:
        for c in clients:
            c.close()
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0
    records = [json.loads(x) for x in out.splitlines()]
    acc = {r["peer"]: r for r in records if "peer" in r}
    listener = records[-1]["listener"]
    assert listener["keepalive"] == 1 and listener["keepidle"] == 1800  # the program's
    assert listener["user_timeout"] == 0 and listener["defer_accept"] > 0
    assert (acc["127.0.0.2"]["keepalive"], acc["127.0.0.2"]["keepidle"]) == (1, 300)
    assert acc["127.0.0.2"]["keepcnt"] == 4
    assert acc["127.0.0.2"]["user_timeout"] == (300 + 15 * 4) * 1000
    assert acc["127.0.0.3"] == {"peer": "127.0.0.3", **listener, "defer_accept": 0}
    assert (acc["127.0.0.1"]["keepidle"], acc["127.0.0.1"]["keepcnt"]) == (15, 4)
    assert acc["127.0.0.1"]["user_timeout"] == (15 + 15 * 4) * 1000
    res = Result(p.returncode, "", "", read_trace(trace))
    # The listener: the program's two options, and TCP_DEFER_ACCEPT.
    assert res.sets(0) == {"SO_KEEPALIVE": 1, "TCP_KEEPIDLE": 1800, "TCP_DEFER_ACCEPT": 5}
    lives = res.accepted()
    assert res.sets_of(lives["127.0.0.3"]) == {}
    assert res.sets_of(lives["127.0.0.2"]) == {
        "TCP_KEEPIDLE": 300,
        "TCP_KEEPINTVL": 15,
        "TCP_KEEPCNT": 4,
        "TCP_USER_TIMEOUT": 360_000,
        "SO_KEEPALIVE": 1,
    }


@pytest.mark.parametrize("mode", ["set", "enforce"])
def test_listener_choices_after_listen_stand_on_what_it_accepts(shim: Shim, mode: str) -> None:
    """What the program sets on its listener after listen() (nginx's
    so_keepalive) stands on each connection in set mode, as on the kernel
    path; what it set before listen() is replaced, as before connect().
    Enforce mode replaces both.  An exempt client's connection has all the
    program's values, in enforce mode too: the listener is not capped."""
    env = {"BPFKEEP_PEERS": "127.0.0.2,keepidle=300,keepcnt=2;127.0.0.3,exempt"}
    if mode == "enforce":
        env["BPFKEEP_ENFORCE"] = "1"
    cmd, full_env, _ = shim.command(
        [PYTHON, PROBE, "serve", "127.0.0.1", "3", "keepidle=1800", "--late", "keepalive=0",
         "keepintvl=33"],
        env,
        strace=False,
    )  # fmt: skip
    p = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, text=True)
    clients = []
    try:
        port = json.loads(p.stdout.readline())["port"]
        clients = [_connect_from(src, port) for src in ("127.0.0.2", "127.0.0.1", "127.0.0.3")]
        out = p.stdout.read()  # not communicate(), see test_accept_in_c_gets_...
        p.wait(timeout=15)
    finally:
        for c in clients:
            c.close()
        if p.poll() is None:
            p.kill()
    acc = {r["peer"]: r for r in map(json.loads, out.splitlines()) if "peer" in r}
    got = {
        peer: (r["keepalive"], r["keepidle"], r["keepintvl"], r["keepcnt"])
        for peer, r in acc.items()
    }
    exempt = (0, 1800, 33, kernel_default("tcp_keepalive_probes"))
    if mode == "set":
        assert got == {
            "127.0.0.2": (0, 300, 33, 2),
            "127.0.0.1": (0, 15, 33, 9),
            "127.0.0.3": exempt,
        }
    else:
        assert got == {
            "127.0.0.2": (1, 300, 15, 2),
            "127.0.0.1": (1, 15, 15, 9),
            "127.0.0.3": exempt,
        }


def test_accept_in_c_gets_the_clients_rule(shim: Shim, probes: dict[str, str]) -> None:
    """accept() (the C probe), not only Python's accept4()."""
    env = {"BPFKEEP_PEERS": "127.0.0.2,keepidle=300,keepintvl=6"}
    cmd, full_env, _ = shim.command(
        [probes["dynamic"], "listen", "127.0.0.1", "0"], env, strace=False
    )
    p = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, text=True)
    try:
        port = int(p.stdout.readline().split()[1])
        client = _connect_from("127.0.0.2", port)
        # Not communicate(): it reads the pipe past what readline() has
        # buffered already, losing lines the probe wrote at once.
        out = p.stdout.read()
        p.wait(timeout=15)
        client.close()
    finally:
        if p.poll() is None:
            p.kill()
    line = next(x for x in out.splitlines() if x.startswith("accepted "))
    got = {k: int(v) for k, v in (f.split("=") for f in line.split()[1:])}
    assert (got["keepalive"], got["keepidle"], got["keepintvl"]) == (1, 300, 6), line
    listener = next(x for x in out.splitlines() if x.startswith("listener "))
    assert "keepalive=0 " in listener, listener  # no policy on the listener


def test_socket_activated_listeners_connections_get_their_rule(
    shim: Shim, probes: dict[str, str]
) -> None:
    """A listener another process made (systemd socket activation): the
    shim never saw it listen(), yet with peer rules each connection it
    accepts gets its client's rule."""
    lst = socket.create_server(("127.0.0.1", 0))
    handover = (
        "import os, sys\n"
        "os.dup2(int(sys.argv[1]), 3)\n"
        "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()))\n"
        "os.execv(sys.argv[2], sys.argv[2:])\n"
    )
    fd = lst.fileno()
    argv = [PYTHON, "-c", handover, str(fd), probes["dynamic"], "activated", "-", "0"]
    env = {"BPFKEEP_PEERS": "127.0.0.2,keepidle=300"}
    cmd, full_env, _ = shim.command(argv, env, strace=False)
    # Queued in the kernel before the program runs: accept() takes it.
    client = _connect_from("127.0.0.2", lst.getsockname()[1])
    try:
        p = subprocess.Popen(
            cmd, env=full_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            pass_fds=(fd,),
        )  # fmt: skip
        out, _ = p.communicate("accept\n", timeout=15)
    finally:
        client.close()
        lst.close()
    assert p.returncode == 0, out
    line = next(x for x in out.splitlines() if x.startswith("accepted "))
    assert " keepalive=1 keepidle=300 " in line, out


def test_enforce_caps_by_the_peers_rule(shim: Shim, servers: dict[str, Server]) -> None:
    """BPFKEEP_ENFORCE caps each socket by its peer's rule; an exempt peer
    and a rule with mode=set are not capped."""
    env = {
        "BPFKEEP_ENFORCE": "1",
        "BPFKEEP_PEERS": "127.0.0.2,keepidle=300;127.0.0.3,exempt;::1,mode=set",
    }
    hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "::1"]
    targets = [x for h in hosts for x in (h, str(servers[h].port))]
    got = shim.probe("peers", "--weaken", *targets, env=env, strace=False).records()
    assert [g["rc"] for g in got] == [0] * 4, got
    # keepalive, keepidle, user_timeout after the program's 0, 10000, 0
    assert [(g["keepalive"], g["keepidle"], g["user_timeout"]) for g in got] == [
        (1, 15, 150_000),  # the policy's values cap it
        (1, 300, 435_000),  # its rule's
        (0, 10000, 0),  # exempt: the program's
        (0, 10000, 0),  # mode=set: set at connect, not capped
    ]
    # Without BPFKEEP_ENFORCE, a rule may enforce on its own.
    env = {"BPFKEEP_PEERS": "127.0.0.2,mode=enforce"}
    targets = [x for h in hosts[:2] for x in (h, str(servers[h].port))]
    got = shim.probe("peers", "--weaken", *targets, env=env, strace=False).records()
    assert [(g["keepalive"], g["keepidle"]) for g in got] == [(0, 10000), (1, 15)]


def test_enforce_caps_a_connection_still_connecting(shim: Shim) -> None:
    """A non-blocking connect() still in SYN_SENT has no peer for
    getpeername(); SO_PEERNAME tells it, so enforce mode caps it by its
    rule.  The listener's accept queue is full: the SYN goes unanswered."""
    ls = socket.socket()
    ls.bind(("127.0.0.2", 0))
    ls.listen(0)
    port = ls.getsockname()[1]
    filler = socket.create_connection(("127.0.0.2", port))  # fills the queue
    try:
        env = {"BPFKEEP_ENFORCE": "1", "BPFKEEP_PEERS": "127.0.0.2,keepidle=300"}
        got = shim.probe(
            "peers", "--nonblock", "--weaken", "127.0.0.2", str(port), env=env, strace=False
        ).records()[0]
    finally:
        filler.close()
        ls.close()
    assert got["rc"] == "EINPROGRESS" and got["state"] == 2, got  # TCP_SYN_SENT
    assert (got["keepalive"], got["keepidle"], got["user_timeout"]) == (1, 300, 435_000), got


@pytest.mark.parametrize("how", ["sendto", "sendmsg"])
def test_tcp_fast_open_gets_the_peers_rule(shim: Shim, server: Server, how: str) -> None:
    if not kernel_default("tcp_fastopen") & 1:
        pytest.skip("net.ipv4.tcp_fastopen has client mode off")
    env = {"BPFKEEP_PEERS": "127.0.0.1,keepidle=300;127.0.0.2,exempt"}
    res = shim.probe("tfo", "127.0.0.1", str(server.port), how, env=env)
    assert res.sets() == {**DEFAULTS, "TCP_KEEPIDLE": 300, "TCP_USER_TIMEOUT": 435_000}
    res.assert_set_before(how)


def test_bad_peer_items_ignored_with_a_debug_line(shim: Shim, closed_ports: list[int]) -> None:
    """An item is applied as written or not at all: a bad value is never
    taken for 0 (the kernel default), and a host name is never resolved."""
    bad = [
        "127.0.0.2,keepidle=abc",
        "localhost,keepidle=5",
        "127.0.0.3,exempt,keepidle=4",
        "127.0.0.4/33,keepidle=6",
        "127.0.0.5,defer_accept=3",
        "127.0.0.6,port=0",
        "127.0.0.7,keepidle=7,keepidle=8",
        "127.0.0.8,keepidle=9,",
        "127.0.0.9,name=,keepidle=10",
    ]
    env = {"BPFKEEP_PEERS": ";".join([*bad, "127.0.0.1,keepidle=300"])}
    hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    targets = [(h, closed_ports[0]) for h in hosts]
    _r, quiet = _peers(shim, env, *targets, strace=False)
    loud_res, loud = _peers(shim, {**env, "BPFKEEP_DEBUG": "1"}, *targets, strace=False)
    assert _r.stderr == ""
    for got in (quiet, loud):
        assert [g["keepidle"] for g in got] == [300, 15, 15, 15, 15], got
        assert all(g["keepalive"] == 1 for g in got)  # no item made an exemption
    lines = [x for x in loud_res.stderr.splitlines() if "BPFKEEP_PEERS" in x]
    assert len(lines) == len(bad), loud_res.stderr
    for item, line in zip(bad, lines, strict=True):
        assert line.startswith(f'libbpfkeep: BPFKEEP_PEERS item "{item}": ') and line.endswith(
            ": ignored"
        ), line
    assert "host name" in lines[1]


def test_more_than_64_peer_rules_ignored_with_a_debug_line(
    shim: Shim, closed_ports: list[int]
) -> None:
    rules = [f"10.0.{i}.0/24,keepidle={i + 1}" for i in range(64)]
    env = {"BPFKEEP_PEERS": ";".join([*rules, "127.0.0.1,keepidle=300"]), "BPFKEEP_DEBUG": ""}
    res, got = _peers(shim, env, ("127.0.0.1", closed_ports[0]), strace=False)
    assert got[0]["keepidle"] == 15
    assert (
        'more than 64 rules: the 1 item(s) from "127.0.0.1,keepidle=300" on are ignored'
        in res.stderr
    )


def test_socket_hook_ignores_peer_rules(shim: Shim, server: Server) -> None:
    """At socket() the peer is not known: an exempt peer would get the
    policy all the same.  The rules are ignored, and the debug line says so."""
    env = {"BPFKEEP_HOOK": "socket", "BPFKEEP_PEERS": "127.0.0.1,exempt", "BPFKEEP_DEBUG": "1"}
    res = shim.probe("client", "127.0.0.1", str(server.port), env=env)
    assert res.sets() == DEFAULTS
    assert "BPFKEEP_PEERS ignored: BPFKEEP_HOOK=socket" in res.stderr


def test_no_peer_rules_no_extra_work(shim: Shim, server: Server) -> None:
    """Without BPFKEEP_PEERS a connect() costs what it did: the destination
    is not read, no peer is asked for."""
    res = shim.probe("client", "127.0.0.1", str(server.port), trace="network,process_vm_readv")
    life = [c.name for c in res.tcp_sockets()[0]]
    assert life[: life.index("connect") + 1] == ["getsockopt", *["setsockopt"] * 5, "connect"]
    assert "process_vm_readv" not in res.trace and "getpeername" not in res.trace
    # With rules the destination is read, once.
    ruled = shim.probe(
        "client",
        "127.0.0.1",
        str(server.port),
        env={"BPFKEEP_PEERS": "127.0.0.2,exempt"},
        trace="network,process_vm_readv",
    )
    assert ruled.trace.count("process_vm_readv(") == 1, ruled.trace


def test_no_peer_rules_accept_asks_nothing(shim: Shim) -> None:
    """Without BPFKEEP_PEERS accepted connections inherit the listener's
    options, and accept() asks the kernel nothing more."""
    cmd, env, trace = shim.command([PYTHON, PROBE, "server", "127.0.0.1"])
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    try:
        port = json.loads(p.stdout.readline())["port"]
        _connect_when_listening(port, b"x")
        out, _ = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
    assert json.loads(out.splitlines()[-1])["accepted"]["keepidle"] == 15
    res = Result(p.returncode, "", "", read_trace(trace))
    (life,) = res.accepted().values()
    # Only Python's getsockname and the probe's getsockopt of the values:
    # no SO_PROTOCOL, no peer asked for, nothing set.
    assert {c.name for c in life} == {"getsockname", "getsockopt"}, life
    assert not any("SO_PROTOCOL" in c.args for c in life), life
    assert "getpeername" not in res.trace


# --- the shim's choice is bpfkeep.peers.match's ------------------------------------


@pytest.fixture(scope="session")
def peermatch(cc) -> pathlib.Path:
    """The shim's own policy.c and peers.c under a test driver."""
    pre = ROOT / "preload"
    return cc(
        "peermatch",
        HELPERS / "peermatch.c",
        str(pre / "policy.c"),
        str(pre / "peers.c"),
        f"-I{pre}",
        f"-I{ROOT / 'bpf'}",
        "-D_GNU_SOURCE",
        "-Wextra",
        "-Werror",
    )


V4_BASES = ["10.0.0.0", "10.1.0.0", "10.1.2.0", "10.1.2.3", "10.1.2.200", "127.0.0.1", "0.0.0.0"]
V6_BASES = ["fd00::", "fd00:1::", "fd00:1::5", "::1", "::ffff:10.1.0.0", "::"]
PORTS = [1, 79, 80, 85, 90, 443, 5432, 5439, 65535]


def _random_rules(rng: random.Random) -> tuple[dict, list[dict]]:
    """A policy's given values and its peer rule tables: few networks, so
    that they nest and overlap; ports and port ranges that overlap too."""
    given = {
        k: v
        for k, v in {
            "keepidle": rng.choice([None, 0, 15, 60]),
            "keepcnt": rng.choice([None, 0, 3]),
            "user_timeout": rng.choice([None, None, 0, 5000]),
            "mode": rng.choice(["set", "enforce"]),
        }.items()
        if v is not None
    }
    tables = []
    for _ in range(rng.randint(1, 12)):
        if rng.random() < 0.6:
            net = f"{rng.choice(V4_BASES)}/{rng.choice([0, 8, 16, 24, 31, 32])}"
        else:
            net = f"{rng.choice(V6_BASES)}/{rng.choice([0, 16, 64, 100, 104, 120, 128])}"
        table: dict[str, object] = {"address": net}
        if rng.random() < 0.5:
            lo = rng.choice(PORTS[:-1])
            table["port"] = (
                str(lo)
                if rng.random() < 0.5
                else f"{lo}-{rng.choice([p for p in PORTS if p >= lo])}"
            )
        if rng.random() < 0.25:
            table["exempt"] = True
        else:
            for key, choices in (
                ("keepidle", [300, 0, 7]),
                ("keepintvl", [5, 0]),
                ("user_timeout", [9000, 0]),
                ("maxseg", [1200]),
                ("mode", ["set", "enforce"]),
            ):
                if rng.random() < 0.3:
                    table[key] = rng.choice(choices)
        tables.append(table)
    return given, tables


def _random_peers(
    rng: random.Random, rules: tuple[peers.Peer, ...], n: int
) -> list[tuple[str, int]]:
    """Addresses in, at the edges of and outside the rules' networks, IPv4
    ones also written IPv4-mapped."""
    out = []
    for _ in range(n):
        net = rng.choice([p.networks[0] for p in rules])
        size = net.num_addresses
        pick = rng.choice([0, size - 1, rng.randrange(size), size, -1])
        addr = ipaddress.IPv6Address((int(net.network_address) + pick) % 2**128)
        text = str(addr.ipv4_mapped or addr) if rng.random() < 0.7 else str(addr)
        out.append((text, rng.choice(PORTS)))
    out += [("10.1.2.3", 80), ("::ffff:10.1.2.3", 80), ("192.0.2.1", 443), ("2001:db8::1", 80)]
    return out


def _shim_rules(policy: Policy) -> list[str]:
    """What peermatch prints for each rule: the values bpfkeep.peers gave it."""
    out = []
    for p in policy.peers:
        if p.policy is None:
            out.append("exempt")
            continue
        vals = " ".join(f"{o.key}={p.policy.value(o.key)}" for o in TUNABLE if o.side != "listen")
        out.append(f"{vals} mode={p.policy.mode}")
    return out


def test_shims_choice_is_peers_match(peermatch: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """Random rule sets and peers: the shim's matcher (its own C, fed the
    variable bpfkeep exec writes) picks the rule bpfkeep.peers.match picks
    from flatten, and each rule carries the values peers.build gave it."""
    rng = random.Random(18)
    checked = 0
    while checked < 150:
        given, tables = _random_rules(rng)
        try:
            rules = peers.build(given, tables)
        except UsageError:
            continue  # duplicates, too many port rules at one address: refused
        policy = Policy.from_mapping(given).with_peers(rules)
        env = preload.preload_env(policy, {**fake_lib(tmp_path), "PATH": "/usr/bin:/bin"})
        targets = _random_peers(rng, rules, 40)
        out = subprocess.run(
            [str(peermatch), "match"],
            input="".join(f"{a} {p}\n" for a, p in targets),
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        table = peers.flatten(rules)
        want = [str(peers.match(table, a, p)) for a, p in targets]
        assert out == want, (
            env["BPFKEEP_PEERS"],
            [t for t, o, w in zip(targets, out, want, strict=True) if o != w],
        )
        got_rules = subprocess.run(
            [str(peermatch), "rules"], env=env, capture_output=True, text=True, check=True
        ).stdout.splitlines()
        assert got_rules == _shim_rules(policy), env
        checked += 1


_DEBUG_CHOICE = re.compile(
    r"connect\(\d+\): peer (\S+) port (\d+): (?:peer rule (\d+)|no peer rule)"
)


def test_shims_choice_on_real_connects(shim: Shim, closed_ports: list[int]) -> None:
    """The same through the library itself: connections to random 127/8
    peers (refused at once), the rule each got read from its debug line."""
    rng = random.Random(1818)
    done = 0
    while done < 4:
        tables = []
        for _ in range(rng.randint(3, 9)):
            net = f"127.{rng.choice([0, 1])}.{rng.choice([0, 2])}.{rng.choice([0, 1, 5])}"
            table: dict[str, object] = {"address": f"{net}/{rng.choice([8, 16, 24, 30, 32])}"}
            if rng.random() < 0.5:
                table["port"] = str(rng.choice(closed_ports))
            table["keepidle"] = rng.randint(1, 999)
            tables.append(table)
        try:
            rules = peers.build({}, tables)
        except UsageError:
            continue
        env = {
            "BPFKEEP_PEERS": preload.peers_value(Policy().with_peers(rules)),
            "BPFKEEP_DEBUG": "1",
        }
        hosts = [
            f"127.{rng.choice([0, 1, 9])}.{rng.choice([0, 2, 3])}.{rng.choice([1, 2, 5, 7])}"
            for _ in range(25)
        ]
        targets = [(h, rng.choice(closed_ports)) for h in hosts]
        res, got = _peers(shim, env, *targets, strace=False)
        choices = [m.groups() for m in map(_DEBUG_CHOICE.search, res.stderr.splitlines()) if m]
        table = peers.flatten(rules)
        assert [(h, str(p)) for h, p, _ in choices] == [(h, str(p)) for h, p in targets]
        for (host, port), (_h, _p, rule), g in zip(targets, choices, got, strict=True):
            n = peers.match(table, host, port)
            assert int(rule or 0) == n, (env, host, port)
            assert g["keepidle"] == (rules[n - 1].policy.keepidle if n else 15)
        done += 1


# --- bpfkeep.preload ----------------------------------------------------------------


def fake_lib(tmp_path: pathlib.Path) -> dict[str, str]:
    lib = tmp_path / "libbpfkeep.so"
    lib.write_bytes(b"")
    return {"BPFKEEP_PRELOAD_LIB": str(lib)}


def test_preload_env_defaults(tmp_path: pathlib.Path) -> None:
    environ = {**fake_lib(tmp_path), "HOME": "/root"}
    env = preload.preload_env(Policy(), environ)
    assert env["LD_PRELOAD"] == str(tmp_path / "libbpfkeep.so")
    assert env["HOME"] == "/root"
    assert {k: env[k] for k in DEFAULTS if k != "SO_KEEPALIVE"} == {
        k: str(v) for k, v in DEFAULTS.items() if k != "SO_KEEPALIVE"
    }
    for name in ("TCP_SYNCNT", "TCP_MAXSEG", "TCP_WINDOW_CLAMP", "TCP_DEFER_ACCEPT"):
        assert env[name] == "0"  # kernel default
    assert "BPFKEEP_ENFORCE" not in env and "BPFKEEP_HOOK" not in env
    assert "LD_PRELOAD" not in environ  # the input is not changed


def test_preload_env_keeps_existing_preloads_once(tmp_path: pathlib.Path) -> None:
    environ = {**fake_lib(tmp_path), "LD_PRELOAD": "/a/x.so /b/y.so:libz.so"}
    env = preload.preload_env(Policy(), environ)
    lib = str(tmp_path / "libbpfkeep.so")
    assert env["LD_PRELOAD"].split(":") == ["/a/x.so", "/b/y.so", "libz.so", lib]
    again = preload.preload_env(Policy(), env)
    assert again["LD_PRELOAD"] == env["LD_PRELOAD"]


def test_preload_env_modes_and_hooks(tmp_path: pathlib.Path) -> None:
    inherited = {
        **fake_lib(tmp_path),
        "BPFKEEP_ENFORCE": "1",
        "BPFKEEP_HOOK": "socket",
        "KEEPALIVE": "off",
    }
    env = preload.preload_env(Policy(), inherited)
    assert not {"BPFKEEP_ENFORCE", "BPFKEEP_HOOK", "KEEPALIVE"} & set(env)
    env = preload.preload_env(Policy(mode="enforce"), fake_lib(tmp_path), hook="socket")
    assert env["BPFKEEP_ENFORCE"] == "1" and env["BPFKEEP_HOOK"] == "socket"
    with pytest.raises(UsageError):
        preload.preload_env(Policy(), fake_lib(tmp_path), hook="accept")


def test_preload_env_values(tmp_path: pathlib.Path) -> None:
    policy = Policy.from_mapping({"keepidle": 60, "user_timeout": 0, "defer_accept": 4})
    env = preload.preload_env(policy, fake_lib(tmp_path))
    assert env["TCP_KEEPIDLE"] == "60"
    assert env["TCP_USER_TIMEOUT"] == "0"
    assert env["TCP_DEFER_ACCEPT"] == "4"


def test_preload_env_runs_the_policy(shim: Shim, server: Server) -> None:
    """The helper's environment and the shim agree."""
    policy = Policy.from_mapping({"keepidle": 42, "keepintvl": 5, "keepcnt": 2, "mode": "enforce"})
    env = preload.preload_env(
        policy, {"PATH": os.environ.get("PATH", "/usr/bin"), "BPFKEEP_PRELOAD_LIB": str(shim.lib)}
    )
    res = shim.run([PYTHON, PROBE, "client", "127.0.0.1", str(server.port)], env, preload_lib=False)
    assert res.sets() == {
        "TCP_KEEPIDLE": 42,
        "TCP_KEEPINTVL": 5,
        "TCP_KEEPCNT": 2,
        "TCP_USER_TIMEOUT": 52_000,
        "SO_KEEPALIVE": 1,
    }
    got = res.records()[0]
    assert (got["keepalive"], got["keepidle"], got["user_timeout"]) == (1, 42, 52_000)


def _with_peers(given: dict, *specs: str) -> Policy:
    rules = peers.build(given, [peers.parse_spec(s) for s in specs])
    return Policy.from_mapping(given).with_peers(rules)


def test_preload_env_peer_rules(tmp_path: pathlib.Path) -> None:
    """One item per rule, in order; only the values where the rule differs
    from the policy (a derived user timeout follows the rule's times); a
    host name's addresses as alternatives, the name kept; a name that did
    not resolve left out; an IPv6 scope dropped (the lookup ignores it)."""
    policy = _with_peers(
        {"keepidle": 20},
        "10.20.0.0/16,keepidle=300",
        "::1,exempt",
        "127.0.0.1,port=5432-5439,keepcnt=3,mode=enforce",
        "db.example,port=80,keepintvl=5",
        "gone.example,keepidle=1",
        "fe80::1%eth0,user_timeout=5000",
        "::ffff:10.0.0.0/104,keepidle=20",
    )
    lookup = {"db.example": ["10.9.0.1", "fd00::9"], "gone.example": []}
    failed = []
    resolved = peers.resolve_names(
        policy, peers.Resolver(lookup.__getitem__), lambda name, why: failed.append(name)
    )
    assert failed == ["gone.example"]
    env = preload.preload_env(resolved, fake_lib(tmp_path))
    assert env["BPFKEEP_PEERS"].split(";") == [
        "10.20.0.0/16,keepidle=300,user_timeout=435000",
        "::1,exempt",
        "127.0.0.1,port=5432-5439,keepcnt=3,user_timeout=65000,mode=enforce",
        "10.9.0.1|fd00::9,port=80,name=db.example,keepintvl=5,user_timeout=65000",
        "fe80::1,user_timeout=5000",
        "10.0.0.0/8",  # the policy's values: only the rule's place
    ]
    assert env["TCP_KEEPIDLE"] == "20" and env["TCP_USER_TIMEOUT"] == "155000"


def test_preload_env_peer_rules_removed_refused_and_bounded(tmp_path: pathlib.Path) -> None:
    inherited = {**fake_lib(tmp_path), "BPFKEEP_PEERS": "127.0.0.1,exempt"}
    assert "BPFKEEP_PEERS" not in preload.preload_env(Policy(), inherited)
    ruled = _with_peers({}, "127.0.0.1,exempt")
    with pytest.raises(UsageError, match="before the peer is known"):
        preload.preload_env(ruled, fake_lib(tmp_path), hook="socket")
    many = _with_peers({}, *(f"10.0.{i}.0/24,keepidle=7" for i in range(65)))
    with pytest.raises(UsageError, match="at most 64 rules"):
        preload.preload_env(many, fake_lib(tmp_path))
    assert len(preload.peers_value(_with_peers({}, *(f"10.0.{i}.0/24" for i in range(64))))) > 0
    wide = _with_peers({}, "big.example,keepidle=7")
    addrs = [f"10.1.{i // 256}.{i % 256}" for i in range(257)]
    wide = peers.resolve_names(wide, peers.Resolver(lambda name: addrs))
    with pytest.raises(UsageError, match="256 addresses"):
        preload.preload_env(wide, fake_lib(tmp_path))


def test_shim_bounds_are_preloads() -> None:
    """preload.py refuses what the shim would ignore: the same bounds."""
    header = (ROOT / "preload" / "policy.h").read_text()
    bound = dict(re.findall(r"#define (BK_PEER_MAX_\w+) (\d+)", header))
    assert int(bound["BK_PEER_MAX_RULES"]) == preload.MAX_PEER_RULES
    assert int(bound["BK_PEER_MAX_NETS"]) == preload.MAX_PEER_ADDRESSES


def test_shim_rule_keys_are_the_policy_keys() -> None:
    """The shim finds a rule's KEY by the option's name less its "TCP_" or
    "SO_" (option_by_key in preload/policy.c): that is the policy key."""
    for opt in OPTIONS:
        assert opt.key == opt.optname.split("_", 1)[1].lower(), opt


def test_library_path(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = fake_lib(tmp_path)
    assert preload.library_path(env) == tmp_path / "libbpfkeep.so"
    monkeypatch.setattr(preload, "__file__", str(tmp_path / "pkg" / "bpfkeep" / "preload.py"))
    with pytest.raises(EnvironmentProblem, match="make -C"):
        preload.library_path({"BPFKEEP_PRELOAD_LIB": str(tmp_path / "missing.so")})
    installed = tmp_path / "pkg" / "bpfkeep" / "_lib" / "libbpfkeep.so"
    installed.parent.mkdir(parents=True)
    installed.write_bytes(b"")
    assert preload.library_path({}) == installed


def test_is_static_executable(tmp_path: pathlib.Path) -> None:
    assert not preload.is_static_executable("true")
    assert not preload.is_static_executable("/bin/true")
    assert not preload.is_static_executable(PYTHON)
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    assert not preload.is_static_executable(str(script))
    text = tmp_path / "text"
    text.write_text("hello")
    assert not preload.is_static_executable(str(text))
    truncated = tmp_path / "truncated"
    truncated.write_bytes(pathlib.Path("/bin/true").read_bytes()[:40])
    assert not preload.is_static_executable(str(truncated))
    with pytest.raises(UsageError):
        preload.is_static_executable("no-such-command-bpfkeep")


def test_unreachable_reason(tmp_path: pathlib.Path, cc) -> None:
    assert preload.unreachable_reason("/bin/true") is None
    assert preload.unreachable_reason(PYTHON) is None
    try:
        static = cc("sockprobe-static", HELPERS / "sockprobe.c", "-static")
    except subprocess.CalledProcessError:
        static = None
    if static:
        assert preload.unreachable_reason(str(static)) == "statically linked"
    # A C program carrying Go's build-info section is taken for Go.
    if shutil.which("objcopy"):
        fake = tmp_path / "fake-go"
        note = tmp_path / "buildinfo"
        note.write_bytes(b"\xff Go buildinf:")
        subprocess.run(
            ["objcopy", "--add-section", f".go.buildinfo={note}", "/bin/true", str(fake)],
            check=True,
        )
        assert "Go" in (preload.unreachable_reason(str(fake)) or "")
    # Section headers pointing past the end: still judged by PT_INTERP.
    broken = tmp_path / "broken"
    data = bytearray(pathlib.Path("/bin/true").read_bytes())
    data[0x28:0x30] = (len(data) + 4096).to_bytes(8, "little")  # e_shoff
    broken.write_bytes(bytes(data))
    assert preload.unreachable_reason(str(broken)) is None
    assert not preload.is_static_executable(str(broken))
