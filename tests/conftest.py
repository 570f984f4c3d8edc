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
import tempfile
import time
import typing
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import LineReader, NetnsPair

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


# The venv's console script, not ``python -m bpfkeep``: the tests exercise
# what ``pip install`` put in the venv (entry point, BPF sources, option
# header, libbpfkeep.so), never the checkout's bpfkeep/ directory.
BPFKEEP = str(Path(sys.executable).parent / "bpfkeep")


def bpfkeep_cmd(pin_dir: str, *args: str) -> list[str]:
    return [BPFKEEP, "--pin-dir", pin_dir, *args]


@pytest.fixture(scope="session", autouse=True)
def _outside_the_checkout(tmp_path_factory) -> Iterator[None]:
    """Every process a test starts runs with its working directory outside
    the checkout, so that ``python -c``/``-m`` cannot import the checkout's
    bpfkeep/ from the current directory (tests/test_installed.py checks)."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    try:
        yield
    finally:
        os.chdir(old)


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
    from bpfkeep.progs import loader

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
    from bpfkeep.kernel import bpfsys
    from bpfkeep.progs import loader

    # (The bypass programs' links too: the daemon waits on their bell only
    # where its objects show them attached.)
    for name in (*loader.OBJECTS, loader.PROG_SWEEP, *loader.bypass_pins()):
        if not os.path.exists(os.path.join(shared_objects, name)):
            continue  # a kernel without the sweep, or without fexit
        fd = bpfsys.obj_get(os.path.join(shared_objects, name))
        try:
            bpfsys.obj_pin(fd, os.path.join(obj_dir, name))
        finally:
            os.close(fd)
    yield d
    remove_pin_dir(d)


def remove_pin_dir(d: str) -> None:
    """Everything a test's pin directory holds detached and unpinned, and
    the lock file a daemon killed on it left in /run."""
    from bpfkeep.enforcer import Enforcer
    from bpfkeep.pins.pindir import DaemonLock

    enf = Enforcer(d)
    if os.path.isdir(enf.pin_dir):
        enf.destroy()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(DaemonLock.path_of(enf.pins)[0])


# -- cgroups ----------------------------------------------------------------


class Cgroups:
    """Scratch cgroups under one per-test parent, removed at the end."""

    def __init__(self):
        from bpfkeep.kernel.cgroups import cgroup2_mount

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
        from bpfkeep.kernel.cgroups import remove_tree

        remove_tree(self.base)


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

    def __init__(
        self,
        argv: list[str],
        cgroup: str | None = None,
        netns: str | None = None,
        pass_fds: tuple[int, ...] = (),
    ):
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
            pass_fds=pass_fds,
        )
        self._reader = LineReader(self.proc)

    def expect(self, prefix: str, timeout: float = 10) -> str:
        ln = self._reader.expect(prefix, timeout)
        if ln is None:
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            raise AssertionError(f"no line {prefix!r} from probe; got {self.lines} {err}")
        return ln

    @property
    def lines(self) -> list[str]:
        return self._reader.lines

    def values(self, role: str, timeout: float = 10, *, consume: bool = False) -> dict[str, int]:
        """The first line of ``role``; ``consume`` removes it, so that the
        next call waits for a newer one (polling a held socket)."""
        ln = self.expect(role + " ", timeout)
        if consume:
            self.lines.remove(ln)
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

    def make(
        argv: list[str],
        cgroup: str | None = None,
        netns: str | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> Probe:
        p = Probe(argv, cgroup, netns, pass_fds)
        started.append(p)
        return p

    yield make
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
        p.proc.wait()


# -- network namespaces -----------------------------------------------------


@pytest.fixture()
def netns_pair() -> Iterator[NetnsPair]:
    """Client 10.77.0.1 and server 10.77.0.2 behind a bridge (see
    tests/support: NetnsPair for why not a bare veth pair)."""
    with NetnsPair() as pair:
        yield pair


@pytest.fixture()
def netns():
    """A network namespace with loopback up, removed at the end."""
    name = f"bk-ns-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        for pid in out.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], check=False)


# -- reading the kernel from outside ---------------------------------------


def host_sysctl(name: str, netns: str | None = None) -> int:
    """``net.ipv4.NAME`` of this network namespace (or of ``netns``): the
    value a socket gets when nothing sets the option.  These sysctls are
    per network namespace, and a tuned host differs from the kernel's
    compiled-in 7200/75/9 and 6 SYN retries: tests never hard-code them."""
    if netns is None:
        with open(f"/proc/sys/net/ipv4/{name}") as f:
            return int(f.read())
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "cat", f"/proc/sys/net/ipv4/{name}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout)


def host_keepalive(netns: str | None = None) -> tuple[int, int, int]:
    """(tcp_keepalive_time, tcp_keepalive_intvl, tcp_keepalive_probes)."""
    return (
        host_sysctl("tcp_keepalive_time", netns),
        host_sysctl("tcp_keepalive_intvl", netns),
        host_sysctl("tcp_keepalive_probes", netns),
    )


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


# -- containers (podman) ------------------------------------------------------

# Always with these: crun refuses this machine's hybrid cgroup layout, and
# root here lacks CAP_SYS_RESOURCE to raise the limits podman asks for.
PODMAN_RUN = [
    "--runtime",
    "runc",
    "--ulimit",
    "nofile=20000:20000",
    "--ulimit",
    "nproc=32768:32768",
]


def in_kmatrix_guest() -> bool:
    """scripts/qemu/guest-init.sh names the kernel-matrix guest so."""
    return os.uname().nodename == "kmatrix-guest"


class Podman:
    """Containers and images a test makes, removed at the end (also when
    the test fails or a ``podman run`` client was killed)."""

    def __init__(self) -> None:
        self.containers: list[str] = []
        self.images: list[str] = []

    def name(self, what: str) -> str:
        name = f"bpfkeep-test-{what}-{uuid.uuid4().hex[:8]}"
        self.containers.append(name)
        return name

    def run_argv(self, name: str, *args: str) -> list[str]:
        return ["podman", "run", "--rm", "--name", name, *PODMAN_RUN, *args]

    def import_tar(self, tar: str, tag: str) -> str:
        self.images.append(tag)
        subprocess.run(["podman", "import", "-q", tar, tag], check=True, capture_output=True)
        return tag

    def pid(self, name: str) -> int:
        out = subprocess.run(
            ["podman", "inspect", "--format", "{{.State.Pid}}", name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return int(out.strip())

    def cleanup(self) -> None:
        """Idempotent: a fixture that must outlive the containers calls it early."""
        for name in self.containers:
            subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True)
        for tag in self.images:
            subprocess.run(["podman", "rmi", "-f", tag], capture_output=True)
        self.containers, self.images = [], []


@pytest.fixture()
def podman() -> Iterator[Podman]:
    if in_kmatrix_guest():
        pytest.skip("no container runtime state in the kernel-matrix guest (QEMU)")
    if not shutil.which("podman") or not shutil.which("runc"):
        if os.environ.get("CI"):
            pytest.fail("podman and runc are missing: scripts/setup.sh installs them")
        pytest.skip("podman and runc are missing: run scripts/setup.sh")
    p = Podman()
    try:
        yield p
    finally:
        p.cleanup()


@pytest.fixture(scope="session")
def daemon_image() -> Iterator[str]:
    """bpfkeep's image built by scripts/build-image.sh from this checkout
    (the Debian root file system comes from its cache, which setup.sh
    fills), under a name of its own; removed at the end."""
    if in_kmatrix_guest():
        pytest.skip("no container runtime state in the kernel-matrix guest (QEMU)")
    tag = f"localhost/bpfkeep-test-{uuid.uuid4().hex[:8]}:latest"
    try:
        proc = subprocess.run(
            ["bash", str(REPO / "scripts" / "build-image.sh"), "--tag", tag],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        print(proc.stdout.strip().splitlines()[-1])  # "built TAG (N MB)"
        yield tag
    finally:
        subprocess.run(["podman", "rmi", "-f", tag], capture_output=True)


# -- container runtimes -----------------------------------------------------
#
# podman and Debian's docker.io, each with its own storage, state and
# socket under a temporary directory (nothing of the host's runtimes is
# used or touched), and an image made here from busybox-static and the
# static sockprobe.  crun refuses this host's hybrid cgroup layout: runc.
# Root here lacks CAP_SYS_RESOURCE: explicit ulimits.  Everything made is
# removed at the end of the session, also when a test failed.

ULIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]
IMAGE = "localhost/bpfkeep-test:1"


def cgroup_mounts() -> list[str]:
    with open("/proc/mounts") as f:
        return [ln.split()[1] for ln in f if ln.split()[2] in ("cgroup", "cgroup2")]


def remove_cgroup_everywhere(rel: str, timeout: float = 10) -> bool:
    """rmdir a cgroup path (and what is below it) in every hierarchy, v1
    included: runtimes given --cgroup-parent make the parents and leave
    them.  A monitor (podman's conmon) may still be leaving: retried."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for m in cgroup_mounts():
            top = os.path.join(m, rel.strip("/"))
            if not os.path.isdir(top):
                continue
            for d, _dirs, _files in sorted(os.walk(top), key=lambda t: -t[0].count("/")):
                with contextlib.suppress(FileNotFoundError):
                    try:
                        os.rmdir(d)
                    except OSError:
                        left.append(d)
        if not left or time.monotonic() > deadline:
            return not left
        time.sleep(0.1)


def cgroup_dirs_to_make(parent: str) -> list[str]:
    """A --cgroup-parent and each of its ancestors that does not exist
    yet: the runtime makes them and leaves them behind (remove them
    deepest first)."""
    from bpfkeep.kernel.cgroups import cgroup2_mount

    parts = parent.strip("/").split("/")
    out = []
    for i in range(len(parts), 0, -1):
        rel = "/".join(parts[:i])
        if i == len(parts) or not os.path.isdir(os.path.join(cgroup2_mount(), rel)):
            out.append(rel)
    return out


def _default_parent_made(rel: str) -> typing.Callable[[], None]:
    """For a runtime's default cgroup parent (docker, libpod_parent): a
    function that removes it at the end if it did not exist before and is
    empty then (an rmdir, in every hierarchy; a parent in use stays)."""
    from bpfkeep.kernel.cgroups import cgroup2_mount

    existed = os.path.isdir(os.path.join(cgroup2_mount(), rel))

    def cleanup() -> None:
        if existed:
            return
        deadline = time.monotonic() + 3  # in use by another podman or docker: it stays
        while True:
            left = False
            for m in cgroup_mounts():
                for d in (os.path.join(m, rel, "conmon"), os.path.join(m, rel)):
                    if not os.path.isdir(d):
                        continue
                    try:
                        os.rmdir(d)
                    except OSError:
                        left = True
            if not left or time.monotonic() > deadline:
                return
            time.sleep(0.1)

    return cleanup


def _unmount_below(path: str) -> None:
    with open("/proc/mounts") as f:
        points = [ln.split()[1] for ln in f if ln.split()[1].startswith(path.rstrip("/") + "/")]
    for p in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", p], check=False, capture_output=True)


def _image_tar(tmp: Path, probes: dict[str, str]) -> Path:
    root = tmp / "rootfs"
    (root / "bin").mkdir(parents=True)
    busybox = shutil.which("busybox") or "/bin/busybox"
    shutil.copy(busybox, root / "bin" / "busybox")
    for applet in ("sh", "sleep", "cat"):
        os.symlink("busybox", root / "bin" / applet)
    shutil.copy(probes["static"], root / "sockprobe")
    tar = tmp / "image.tar"
    subprocess.run(["tar", "-C", str(root), "-cf", str(tar), "."], check=True)
    return tar


class Runtime:
    """One container runtime with private storage: its CLI, its API socket
    (what bpfkeep asks), and the containers a test made."""

    def __init__(self, name: str, cli: list[str], socket_path: str, base: str, image: str = IMAGE):
        self.name, self.cli, self.socket, self.base = name, cli, socket_path, base
        self.image = image
        self.made: list[str] = []
        self.pod_parents: list[str] = []  # --cgroup-parent given, with ancestors made for it
        self.leftover: list[str] = []  # still busy after a test: tried again at the end

    def __call__(self, *args: str, check: bool = True, timeout: float = 60):
        proc = subprocess.run(
            [*self.cli, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{self.name} {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def run_args(
        self,
        name: str,
        *cmd: str,
        labels: dict[str, str] | None = None,
        network: str = "none",
        cgroup_parent: str | None = None,
        interactive: bool = False,
    ) -> list[str]:
        """argv of ``run`` (the caller starts it: detached or interactive)."""
        self.made.append(name)
        args = [*self.cli, "run", "--name", name, f"--network={network}", *ULIMITS]
        args += ["-i"] if interactive else ["-d"]
        for k, v in (labels or {}).items():
            args += ["--label", f"{k}={v}"]
        if cgroup_parent:
            self.pod_parents += [
                p for p in cgroup_dirs_to_make(cgroup_parent) if p not in self.pod_parents
            ]
            args += ["--cgroup-parent", cgroup_parent]
        return [*args, self.image, *cmd]

    def pid(self, name: str) -> int:
        return int(self("inspect", "-f", "{{.State.Pid}}", name).stdout.strip())

    def cgroup(self, name: str) -> str:
        """The container's cgroup v2 path relative to the mount, from the
        host's /proc/PID/cgroup (inside, a cgroup namespace shows /)."""
        with open(f"/proc/{self.pid(name)}/cgroup") as f:
            for ln in f:
                if ln.startswith("0::"):
                    return ln.strip()[3:].lstrip("/")
        raise AssertionError(f"{name}: no cgroup v2 line")

    def remove(self, *names: str) -> None:
        """Kill and remove (podman's rm -f would first wait 10 s for a PID 1
        that ignores SIGTERM)."""
        if names:
            self("rm", "-f", *(["-t", "0"] if self.name == "podman" else []), *names, check=False)

    def cleanup_test(self) -> None:
        self.remove(*self.made)
        self.made.clear()
        # Deepest first: a parent made for one test, then its new ancestors.
        busy = False
        for parent in sorted(self.pod_parents, key=lambda p: -p.count("/")):
            # Once one is still busy its ancestors are too: left for later.
            busy = busy or not remove_cgroup_everywhere(parent, timeout=2)
            if busy:
                self.leftover.append(parent)
        self.pod_parents.clear()

    def cleanup_session(self) -> None:
        """What was still busy after its test (a monitor process such as
        conmon leaving its cgroup late, or a zombie not yet reaped)."""
        for parent in sorted(self.leftover, key=lambda p: -p.count("/")):
            remove_cgroup_everywhere(parent, timeout=30)


def _skip_unless_runtimes_can_run(what: str) -> None:
    if not is_root():
        pytest.skip("needs root: container runtimes")
    if in_kmatrix_guest():
        pytest.skip(
            f"{what}: not run in the kernel-matrix QEMU guest (its root is a read-only "
            "snapshot of the host with no runtime state, storage or daemons; not tried there)"
        )


@pytest.fixture(scope="session")
def podman_rt(tmp_path_factory, probes) -> Iterator[Runtime]:
    """podman with its own root, runroot and tmpdir, and its API socket
    (podman system service: podman's docker-compatible API)."""
    _skip_unless_runtimes_can_run("podman")
    exe = shutil.which("podman")
    if not exe:
        pytest.skip("podman is not installed (scripts/setup.sh installs it)")
    base = tempfile.mkdtemp(prefix="bk-podman-", dir="/tmp")
    cli = [
        exe,
        "--root", f"{base}/root", "--runroot", f"{base}/run", "--tmpdir", f"{base}/tmp",
        "--cgroup-manager", "cgroupfs", "--runtime", "runc", "--events-backend", "file",
    ]  # fmt: skip
    sock = f"{base}/podman.sock"
    rt = Runtime("podman", cli, sock, base)
    service = None
    parent_cleanup = _default_parent_made("libpod_parent")
    try:
        tar = _image_tar(tmp_path_factory.mktemp("podman-image"), probes)
        rt("import", str(tar), IMAGE)
        probe = rt(
            "run", "--rm", "--network=none", *ULIMITS, IMAGE, "/bin/sh", "-c", ":", check=False
        )
        if probe.returncode != 0:
            pytest.skip(f"podman cannot run a container here: {probe.stderr.strip()[:300]}")
        service = subprocess.Popen(
            [*cli, "system", "service", "--time", "0", f"unix://{sock}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_api(sock, service)
        yield rt
    finally:
        if service is not None:
            service.terminate()
            try:
                service.wait(timeout=20)
            except subprocess.TimeoutExpired:
                service.kill()
                service.wait()
        subprocess.run([*cli, "rm", "-af", "-t", "0"], capture_output=True, check=False)
        subprocess.run([*cli, "system", "reset", "-f"], capture_output=True, check=False)
        _unmount_below(base)
        shutil.rmtree(base, ignore_errors=True)
        rt.cleanup_session()
        parent_cleanup()


@pytest.fixture()
def podman_default_rt(podman, tmp_path, probes) -> Iterator[Runtime]:
    """podman as a host has it by default: its default storage and run
    root (/var/lib/containers/storage, /run/containers/storage), and no API
    service -- ``socket`` is a path where nothing listens.  The test image
    is imported under a name of its own; it and the containers made are
    removed after the test (the podman fixture and cleanup_test)."""
    _skip_unless_runtimes_can_run("podman")
    image = f"localhost/bpfkeep-test-{uuid.uuid4().hex[:8]}:1"
    podman.import_tar(str(_image_tar(tmp_path / "image", probes)), image)
    cli = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
    rt = Runtime("podman", cli, str(tmp_path / "no-podman-api.sock"), str(tmp_path), image)
    parent_cleanup = _default_parent_made("libpod_parent")
    try:
        yield rt
    finally:
        rt.cleanup_test()
        rt.cleanup_session()
        parent_cleanup()


@pytest.fixture(scope="session")
def docker_rt(tmp_path_factory, probes) -> Iterator[Runtime]:
    """Debian's dockerd (docker.io) with the cgroupfs driver, no iptables
    and no bridge, its own data root, exec root, pidfile and socket; its
    own containerd (dockerd starts one under the exec root).  The docker
    CLI on PATH may be another version: Debian's /usr/bin/docker."""
    _skip_unless_runtimes_can_run("docker")
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    cli_exe = "/usr/bin/docker"
    if not os.access(dockerd, os.X_OK) or not os.access(cli_exe, os.X_OK):
        pytest.skip("docker.io is not installed (scripts/setup.sh installs it)")
    base = tempfile.mkdtemp(prefix="bk-docker-", dir="/tmp")
    sock = f"{base}/docker.sock"
    rt = Runtime("docker", [cli_exe, "-H", f"unix://{sock}"], sock, base)
    parent_cleanup = _default_parent_made("docker")
    log = open(f"{base}/dockerd.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            dockerd,
            "--exec-opt", "native.cgroupdriver=cgroupfs",
            "--iptables=false", "--ip6tables=false", "--ip-masq=false", "--bridge=none",
            "--data-root", f"{base}/data", "--exec-root", f"{base}/exec",
            "--pidfile", f"{base}/dockerd.pid", "-H", f"unix://{sock}",
        ],
        stdout=log,
        stderr=log,
    )  # fmt: skip
    try:
        try:
            _wait_api(sock, proc)
        except AssertionError as e:
            pytest.skip(f"dockerd does not start here: {e}")
        tar = _image_tar(tmp_path_factory.mktemp("docker-image"), probes)
        rt("import", str(tar), IMAGE)
        yield rt
    finally:
        ids = rt("ps", "-aq", check=False).stdout.split() if proc.poll() is None else []
        if ids:
            rt("rm", "-f", *ids, check=False)
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        _unmount_below(base)
        shutil.rmtree(base, ignore_errors=True)
        rt.cleanup_session()
        parent_cleanup()


def _wait_api(sock: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until GET /_ping on the runtime's socket answers 200."""
    from bpfkeep.containers import http_get

    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited with status {proc.returncode}")
        try:
            status, _ = http_get(sock, "/_ping", 2.0)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as e:
            last = e
        time.sleep(0.1)
    raise AssertionError(f"no answer on {sock} within {timeout} s ({last})")


@pytest.fixture(params=["podman", "docker"])
def runtime(request) -> Iterator[Runtime]:
    """Each test once with podman and once with docker; its containers
    (and --cgroup-parent directories) removed after it."""
    rt = request.getfixturevalue(f"{request.param}_rt")
    try:
        yield rt
    finally:
        rt.cleanup_test()
