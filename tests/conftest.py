"""Fixtures for tests against the real kernel: scratch cgroups, a private
bpffs pin directory, network namespaces and the sockprobe workload.

Nothing here attaches to the root cgroup; everything made is removed, also
when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROGS = Path(__file__).resolve().parent / "progs"


def is_root() -> bool:
    return os.geteuid() == 0


def pytest_collection_modifyitems(config, items):
    if is_root():
        return
    skip = pytest.mark.skip(reason="needs root: the real kernel, cgroups and BPF")
    for item in items:
        if "kernel" in item.keywords:
            if os.environ.get("CI"):
                raise pytest.UsageError("CI must run the kernel tests as root")
            item.add_marker(skip)


# -- programs ---------------------------------------------------------------


@pytest.fixture(scope="session")
def probes(tmp_path_factory) -> dict[str, str]:
    """sockprobe built twice: dynamically linked and with -static."""
    out = tmp_path_factory.mktemp("probes")
    built = {}
    for kind, flags in (("dynamic", []), ("static", ["-static"])):
        exe = out / f"sockprobe-{kind}"
        subprocess.run(
            [
                "gcc",
                "-O2",
                "-Wall",
                "-Wextra",
                "-Werror",
                *flags,
                "-o",
                str(exe),
                str(PROGS / "sockprobe.c"),
            ],
            check=True,
        )
        built[kind] = str(exe)
    return built


def as_nobody(argv: list[str]) -> list[str]:
    """argv run as user nobody with no capabilities (setpriv, util-linux)."""
    setpriv = shutil.which("setpriv")
    if not setpriv:
        pytest.fail("setpriv (util-linux) is missing")
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", *argv]


def bpfkeep_cmd(pin_dir: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "bpfkeep", "--pin-dir", pin_dir, *args]


@pytest.fixture()
def bk(pin_dir):
    """Run the real CLI in its own process; returns CompletedProcess."""

    def run(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            bpfkeep_cmd(pin_dir, *args), capture_output=True, text=True, timeout=120, **kw
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"bpfkeep {' '.join(args)} exited {proc.returncode}: {proc.stderr}"
            )
        return proc

    return run


# -- bpffs ------------------------------------------------------------------


@pytest.fixture(scope="session")
def bpffs() -> str:
    root = "/sys/fs/bpf"
    with open("/proc/mounts") as f:
        mounted = any(ln.split()[1] == root and ln.split()[2] == "bpf" for ln in f)
    if not mounted:
        subprocess.run(["mount", "-t", "bpf", "bpf", root], check=True)
    return root


@pytest.fixture(scope="session")
def shared_objects(bpffs) -> Iterator[str]:
    """A pin dir whose programs are compiled once for the session (bcc
    compiling costs ~2 s); tests get their own link directories below."""
    from bpfkeep import loader

    base = os.path.join(bpffs, f"bpfkeep-test-{uuid.uuid4().hex[:8]}")
    os.makedirs(base)
    objdir = os.path.join(base, "obj")
    loader.load(objdir)
    yield objdir
    for name in os.listdir(objdir):
        os.unlink(os.path.join(objdir, name))
    os.rmdir(objdir)
    os.rmdir(base)


@pytest.fixture()
def pin_dir(bpffs, shared_objects) -> Iterator[str]:
    """A private pin directory sharing the session's loaded programs."""
    from bpfkeep.enforcer import Enforcer

    d = os.path.join(bpffs, f"bpfkeep-test-{uuid.uuid4().hex[:8]}")
    obj_dir = Enforcer(d).obj_dir
    os.makedirs(obj_dir)
    # Same programs and maps, pinned again under this directory.
    from bpfkeep import bpfsys, loader

    for name in loader.OBJECTS:
        fd = bpfsys.obj_get(os.path.join(shared_objects, name))
        try:
            bpfsys.obj_pin(fd, os.path.join(obj_dir, name))
        finally:
            os.close(fd)
    yield d
    Enforcer(d).destroy()


# -- cgroups ----------------------------------------------------------------


class Cgroups:
    """Scratch cgroups under one per-test parent, removed at the end."""

    def __init__(self):
        from bpfkeep.cgroups import cgroup2_mount

        self.mount = cgroup2_mount()
        self.base = os.path.join(self.mount, f"bpfkeep-test-{uuid.uuid4().hex[:8]}")
        os.mkdir(self.base)

    def make(self, rel: str) -> str:
        path = os.path.join(self.base, rel)
        os.makedirs(path, exist_ok=True)
        return path

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.mount)

    def cleanup(self) -> None:
        for dirpath, _dirs, _files in sorted(os.walk(self.base), key=lambda t: -t[0].count("/")):
            for pid in _pids(dirpath):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while True:
                try:
                    os.rmdir(dirpath)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)


def _pids(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


@pytest.fixture()
def cgroups() -> Iterator[Cgroups]:
    cg = Cgroups()
    try:
        yield cg
    finally:
        cg.cleanup()


# -- workloads --------------------------------------------------------------


class Probe:
    """A sockprobe process, optionally started inside a cgroup / netns."""

    def __init__(self, argv: list[str], cgroup: str | None = None, netns: str | None = None):
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        pre = None
        if cgroup:
            procs = os.path.join(cgroup, "cgroup.procs")

            def pre() -> None:  # runs in the child before exec
                with open(procs, "w") as f:
                    f.write("0")

        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=pre,
            bufsize=1,
        )
        self.lines: list[str] = []
        self._buf = b""

    def expect(self, prefix: str, timeout: float = 10) -> str:
        """Wait for a stdout line starting with prefix (raw reads: a
        buffered reader would hide lines from select)."""
        import select

        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            for ln in self.lines:
                if ln.startswith(prefix):
                    return ln
            left = deadline - time.monotonic()
            if left <= 0:
                break
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self._buf += chunk
            *done, self._buf = self._buf.split(b"\n")
            self.lines += [d.decode() for d in done]
        err = self.proc.stderr.read() if self.proc.poll() is not None else ""
        raise AssertionError(f"no line {prefix!r} from probe; got {self.lines} {err}")

    def values(self, role: str, timeout: float = 10) -> dict[str, int]:
        ln = self.expect(role + " ", timeout)
        return {k: int(v) for k, v in (f.split("=") for f in ln.split()[1:])}

    def send_line(self, text: str = "go") -> None:
        assert self.proc.stdin
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                if self.proc.stdin:
                    self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (subprocess.TimeoutExpired, BrokenPipeError):
                self.proc.kill()
                self.proc.wait()


@pytest.fixture()
def spawn() -> Iterator:
    started: list[Probe] = []

    def make(argv: list[str], cgroup: str | None = None, netns: str | None = None) -> Probe:
        p = Probe(argv, cgroup, netns)
        started.append(p)
        return p

    yield make
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
        p.proc.wait()


# -- network namespaces -----------------------------------------------------


class NetnsPair:
    """A client and a server host, each in its own namespace, joined through
    a bridge in a third ("the network"): client 10.77.0.1, server 10.77.0.2.

    Cutting the server takes its link down; the client's own link stays up,
    as when a peer vanishes behind a NAT box or firewall, so the client's
    packets leave and are lost (a veth pair alone would drop the client's
    carrier too and hide the retransmission timers behind local errors).
    """

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.client, self.server, self.net = f"bkc-{tag}", f"bks-{tag}", f"bkn-{tag}"
        self.client_if, self.server_if = f"vc{tag}", f"vs{tag}"
        self.client_ip, self.server_ip = "10.77.0.1", "10.77.0.2"
        self.ip = shutil.which("ip") or "ip"
        for ns in (self.client, self.server, self.net):
            self._ip("netns", "add", ns)
            self._ip("-n", ns, "link", "set", "lo", "up")
        self._ip("-n", self.net, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self.net, "link", "set", "br0", "up")
        for ns, ifname, addr in (
            (self.client, self.client_if, self.client_ip),
            (self.server, self.server_if, self.server_ip),
        ):
            port = "p" + ifname
            self._ip(
                "-n",
                self.net,
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                ifname,
                "netns",
                ns,
            )
            self._ip("-n", self.net, "link", "set", port, "master", "br0", "up")
            self._ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
            self._ip("-n", ns, "link", "set", ifname, "up")

    def _ip(self, *args: str) -> None:
        subprocess.run([self.ip, *args], check=True, capture_output=True)

    def cut_server(self) -> None:
        """The server vanishes from the network: its link goes down."""
        self._ip("-n", self.server, "link", "set", self.server_if, "down")

    def cleanup(self) -> None:
        for ns in (self.client, self.server, self.net):
            out = subprocess.run([self.ip, "netns", "pids", ns], capture_output=True, text=True)
            for pid in out.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run([self.ip, "netns", "del", ns], capture_output=True)


@pytest.fixture()
def netns_pair() -> Iterator[NetnsPair]:
    pair = NetnsPair()
    try:
        yield pair
    finally:
        pair.cleanup()


# -- reading the kernel from outside ---------------------------------------


def ss_keepalive_timers(port: int, netns: str | None = None) -> list[str]:
    """Timer fields of established TCP sockets on a port, as ss shows them."""
    cmd = ["ss", "-tinoH", "state", "established", f"( sport = :{port} or dport = :{port} )"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    timers = []
    for ln in out.splitlines():
        if ":" + str(port) not in ln:
            continue
        for field in ln.split():
            if field.startswith("timer:("):
                timers.append(field)
        if "timer:(" not in ln:
            timers.append("none")
    return timers


def bpftool_prog_ids(cgroup_path: str, hook: str) -> list[int]:
    """Program ids on a cgroup for one hook, as bpftool (not bpfkeep) reads them."""
    import json

    out = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", cgroup_path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [p["id"] for p in json.loads(out.strip() or "[]") if p.get("attach_type") == hook]
