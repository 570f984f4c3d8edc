"""What every part of the benchmark shares: building the workload, scratch
cgroups, a private pin directory, processes started inside a cgroup (and a
network namespace), and the other tools compared with bpfkeep.

Everything made here is removed again by :class:`Session.close`, also
after a failure; nothing is ever attached to the root cgroup.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import statistics
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
BUILD = BENCH / "out" / "build"  # connloop for the benches run on their own
LIBKEEPALIVE_CANDIDATES = ("/usr/lib/libkeepalive.so.0", "/usr/lib/libkeepalive.so")
CLONE_NEWNET = 0x40000000


class BenchError(Exception):
    """The benchmark cannot run here; ``str()`` says why and what to do."""


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile (q in 0..1) of a non-empty list."""
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# -- building -----------------------------------------------------------


def build_connloop(out_dir: Path) -> str:
    exe = out_dir / "connloop"
    src = BENCH / "connloop.c"
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        out_dir.mkdir(parents=True, exist_ok=True)
        cmd = ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise BenchError(f"building connloop failed: {proc.stderr.strip()}")
    return str(exe)


def build_shim(out_dir: Path) -> str:
    """The LD_PRELOAD shim built from the current source tree (so that the
    benchmark measures what is checked out); the installed one otherwise."""
    proc = subprocess.run(
        ["make", "-s", "-C", str(REPO / "preload"), f"O={out_dir}"],
        capture_output=True,
        text=True,
        check=False,
    )
    lib = out_dir / "libbpfkeep.so"
    if proc.returncode == 0 and lib.is_file():
        return str(lib)
    from bpfkeep.preload import library_path

    log(f"building preload/ failed ({proc.stderr.strip()[-200:]}); using the installed shim")
    return str(library_path())


def libkeepalive_path() -> str | None:
    """Debian's libkeepalive0 (the original libkeepalive), if installed."""
    for cand in LIBKEEPALIVE_CANDIDATES:
        if os.path.isfile(cand):
            return cand
    return None


# -- processes ---------------------------------------------------------------


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def preexec(
    cgroup: str | None = None, netns: str | None = None, cpu: int | None = None
) -> Callable[[], None] | None:
    """A preexec_fn: enter a cgroup, a named network namespace, a CPU."""
    if cgroup is None and netns is None and cpu is None:
        return None
    procs = os.path.join(cgroup, "cgroup.procs") if cgroup else None
    nsfd_path = f"/run/netns/{netns}" if netns else None
    libc = _libc() if netns else None

    def fn() -> None:
        if procs:
            with open(procs, "w") as f:
                f.write("0")
        if nsfd_path and libc is not None:
            fd = os.open(nsfd_path, os.O_RDONLY)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                os._exit(121)
            os.close(fd)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    return fn


def spawn(
    argv: list[str],
    *,
    cgroup: str | None = None,
    netns: str | None = None,
    cpu: int | None = None,
    env: Mapping[str, str] | None = None,
    stdin: int | None = subprocess.PIPE,
) -> subprocess.Popen:
    return subprocess.Popen(
        argv,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(env) if env is not None else None,
        preexec_fn=preexec(cgroup, netns, cpu),
        bufsize=1,
    )


def run_to_end(
    argv: list[str],
    *,
    cgroup: str | None = None,
    cpu: int | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
) -> str:
    proc = spawn(argv, cgroup=cgroup, cpu=cpu, env=env, stdin=subprocess.DEVNULL)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BenchError(f"{' '.join(argv)}: no result within {timeout} s") from None
    if proc.returncode:
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode}: {err.strip()}")
    return out


def parse_kv(line: str) -> dict[str, str]:
    """``word k=v k=v`` -> {k: v}."""
    return dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)


def line_starting(out: str, prefix: str) -> str:
    for ln in out.splitlines():
        if ln.startswith(prefix):
            return ln
    raise BenchError(f"no {prefix!r} line in: {out.strip()[-300:]}")


class Lines:
    """A child's stdout line by line (tests/support: LineReader) that
    raises BenchError on a timeout."""

    def __init__(self, proc: subprocess.Popen):
        from tests.support import LineReader

        self.proc = proc
        self._reader = LineReader(proc, consume=True)

    @property
    def lines(self) -> list[str]:
        return self._reader.lines

    def expect(self, prefix: str, timeout: float = 10) -> str:
        ln = self._reader.expect(prefix, timeout)
        if ln is None:
            raise BenchError(f"no line {prefix!r} within {timeout} s; got {self.lines}")
        return ln


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 5) -> None:
    if proc.poll() is None:
        with contextlib.suppress(OSError, ValueError):
            if proc.stdin:
                proc.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        with contextlib.suppress(OSError, ValueError):
            if stream:
                stream.close()


# -- the empty sock_ops program (a floor reference) ---------------------------


def compile_in_subprocess(module: str, args: list[str], what: str) -> None:
    """Run ``python -m module args`` (it compiles BPF programs with bcc and
    pins them): bcc's LLVM stays out of the bench's own process.  Kernel
    headers as bpfkeep's own loader finds them; bench/ importable also when
    the caller runs with PYTHONSAFEPATH (the tests)."""
    from bpfkeep.progs.kheaders import bcc_environment

    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=str(REPO),
        env={**bcc_environment(), "PYTHONPATH": str(REPO)},
        check=False,
    )
    if proc.returncode:
        err = proc.stderr.strip().splitlines()
        raise BenchError(f"compiling {what} failed: {err[-1] if err else ''}")


def load_empty_sockops() -> int:
    """``r0 = 1; exit`` as a sock_ops program: the floor of any sock_ops tool."""
    from tests.support import load_empty_sockops as load

    try:
        return load(b"bench_empty")
    except OSError as e:
        raise BenchError(str(e)) from None


# -- the session: cgroups, pin dir, cleanup -----------------------------------


class Session:
    """Scratch cgroups under one parent, a private pin directory, and the
    cleanups to run at the end (in reverse order), whatever happens."""

    def __init__(self, tag: str | None = None, pin_dir: str | None = None):
        from bpfkeep.kernel.cgroups import cgroup2_mount

        if os.geteuid() != 0:
            raise BenchError("the benchmark needs root (BPF, cgroups, netns): run it with sudo")
        self.tag = tag or uuid.uuid4().hex[:8]
        self.mount = cgroup2_mount()
        self.cg_base = os.path.join(self.mount, f"bpfkeep-bench-{self.tag}")
        self.pin_dir = pin_dir or f"/sys/fs/bpf/bpfkeep-bench-{self.tag}"
        self._cleanups: list[Callable[[], None]] = []
        self._procs: list[subprocess.Popen] = []
        self._enforcer = None
        self._prev = None
        self._parts = None
        os.mkdir(self.cg_base)
        self.defer(self._remove_cgroups)

    # cleanup -------------------------------------------------------------

    def defer(self, fn: Callable[[], None]) -> None:
        self._cleanups.append(fn)

    def track(self, proc: subprocess.Popen) -> subprocess.Popen:
        self._procs.append(proc)
        return proc

    def close(self) -> None:
        for p in self._procs:
            stop(p, signal.SIGKILL, timeout=2)
        errors = []
        for fn in reversed(self._cleanups):
            try:
                fn()
            except Exception as e:  # clean up everything we can, then report
                errors.append(e)
        self._cleanups.clear()
        if errors:
            log(f"cleanup problems: {errors}")

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # cgroups -------------------------------------------------------------

    def cgroup(self, rel: str) -> str:
        """Make a scratch cgroup below this session's parent."""
        path = os.path.join(self.cg_base, rel)
        os.makedirs(path, exist_ok=True)
        return path

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.mount)

    def _remove_cgroups(self) -> None:
        from bpfkeep.kernel.cgroups import remove_tree

        remove_tree(self.cg_base)

    # bpfkeep ---------------------------------------------------------------

    def enforcer(self):
        """bpfkeep's Enforcer on this session's private pin directory
        (compiled on first use; destroyed at the end)."""
        from bpfkeep.enforcer import Enforcer

        if self._enforcer is None:
            enf = Enforcer(self.pin_dir)
            self.defer(enf.destroy)
            enf.prepare()
            self._enforcer = enf
        return self._enforcer

    def prev_programs(self):
        """The previous BPF programs (bench/prev.py), compiled on first use
        and pinned in a pin directory of their own."""
        from bench.prev import Programs

        if self._prev is None:
            self._prev = Programs(self, f"{self.pin_dir}-prev")
        return self._prev

    def parts(self):
        """The piece programs (bench/parts.py), compiled on first use."""
        from bench.parts import Parts

        if self._parts is None:
            self._parts = Parts(self, f"{self.pin_dir}-parts")
        return self._parts

    def attach(self, path: str, policy) -> None:
        from bpfkeep.kernel.cgroups import Cgroup

        cg = Cgroup(path, self.rel(path), os.stat(path).st_ino)
        enf = self.enforcer()
        enf.attach(cg, policy)
        # As `bpfkeep attach` does by default: the sweep of the sockets
        # that exist (none here), after which accepted sockets need no look.
        enf.sweep([cg])

    def attach_empty_sockops(self, path: str) -> None:
        self.attach_sockops(load_empty_sockops(), path)

    def attach_sockops(self, prog: int, path: str) -> None:
        """Attach a sock_ops program (an fd this session now owns) to the
        cgroup at ``path`` beside others; detached at the session's end."""
        from bpfkeep.kernel import bpfsys

        cgfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)

        def undo() -> None:
            with contextlib.suppress(OSError):
                bpfsys.prog_detach(prog, cgfd, bpfsys.BPF_CGROUP_SOCK_OPS)
            os.close(cgfd)
            os.close(prog)

        bpfsys.prog_attach(prog, cgfd, bpfsys.BPF_CGROUP_SOCK_OPS, bpfsys.BPF_F_ALLOW_MULTI)
        self.defer(undo)


def checkout(session: Session, ref: str) -> Path:
    """Another commit of this repository, checked out in a temporary
    ``git worktree`` (removed with the session): to run its daemon or its
    sweep beside this one's."""
    import tempfile

    dest = Path(tempfile.mkdtemp(prefix="bpfkeep-bench-against-"))
    proc = subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(dest), ref],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        shutil.rmtree(dest, ignore_errors=True)
        raise BenchError(f"cannot check out {ref}: {proc.stderr.strip()}")

    def remove() -> None:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(dest)],
            capture_output=True,
            check=False,
        )
        shutil.rmtree(dest, ignore_errors=True)

    session.defer(remove)
    return dest


@contextlib.contextmanager
def session(tag: str | None = None) -> Iterator[Session]:
    s = Session(tag)
    try:
        yield s
    finally:
        s.close()


def which(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise BenchError(f"{name} not found: apt-get install {name}")
    return found
