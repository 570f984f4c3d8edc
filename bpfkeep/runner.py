"""``bpfkeep run`` and ``bpfkeep exec``: one command under a policy.

``run`` supervises like ``systemd-run --scope --wait``: COMMAND starts in a
fresh child cgroup of bpfkeep's own with the policy attached, and both stay
for as long as any process is in that cgroup -- a program that daemonizes
(nginx without ``daemon off``) stays covered after its main process exits.
The exit status is the main process's, as a shell reports it (127: not
found, 126: not executable, 128+N: killed by signal N).  Processes are
never moved out of the cgroup.

What a ``run`` owns is recorded in a state file under ``/run/bpfkeep/runs``
(tmpfs: gone at reboot, like the cgroups it names): the cgroup, its id,
the pin directory and run's pid with the pid's start time.  A ``run`` that
is killed (SIGKILL) cannot clean up; the next ``run``, ``status`` or the
daemon does, once the cgroup has emptied: :func:`reap_stale_runs`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import select
import signal
import sys
import time

from bpfkeep import peers
from bpfkeep.enforcer import Enforcer
from bpfkeep.errors import BpfkeepError, EnvironmentProblem, PermissionProblem, UsageError
from bpfkeep.kernel import cgroups
from bpfkeep.kernel.privileges import require_privileges
from bpfkeep.options import Policy
from bpfkeep.preload import preload_env, unreachable_reason

FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
RUN_STATE_DIR = "/run/bpfkeep/runs"
RUN_STATE_ENV = "BPFKEEP_RUN_STATE_DIR"
NOT_FOUND, NOT_EXECUTABLE = 127, 126  # the shell's (and env's) statuses


def _exit_status(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _notice(msg: str) -> None:
    print(f"bpfkeep: {msg}", file=sys.stderr)


def _exec_failure_status(err: int) -> int:
    """127 when the command is not there, 126 when it is but cannot run."""
    return NOT_FOUND if err in (errno.ENOENT, errno.ENOTDIR) else NOT_EXECUTABLE


def exec_preload(policy: Policy, cmd: list[str], *, hook: str = "connect") -> int:
    """Replace this process with COMMAND under the LD_PRELOAD shim.  Peer
    rules' host names are resolved here, once: the shim never resolves a
    name (not inside the program's connect())."""
    reason = _unreachable(cmd[0])
    if reason:
        _notice(
            f"warning: {cmd[0]} is {reason}: the LD_PRELOAD shim cannot "
            "reach it; use bpfkeep run --via bpf (needs root/CAP_BPF)"
        )
    policy = peers.resolve_names(policy, peers.Resolver(), failed=_unresolved)
    env = preload_env(policy, os.environ, hook=hook)
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as e:
        _notice(f"cannot run {cmd[0]}: {e.strerror}")
        return _exec_failure_status(e.errno or 0)
    return NOT_FOUND  # not reached


def _unresolved(name: str, why: str) -> None:
    _notice(
        f"warning: peer {name} does not resolve ({why}): its rule applies to no "
        "connection of this program (the shim does not resolve names again)"
    )


def _unreachable(program: str) -> str | None:
    """Why the shim cannot reach the program; None also when the program
    cannot be read: exec then reports it, with the shell's exit status."""
    try:
        return unreachable_reason(program)
    except UsageError:
        return None


def run(policy: Policy, cmd: list[str], *, via: str = "auto", pin_dir: str | None = None) -> int:
    if via == "preload":
        return exec_preload(policy, cmd)
    if policy.defer_accept:
        if via == "bpf":
            raise UsageError(
                "--defer-accept: the kernel refuses TCP_DEFER_ACCEPT from BPF; use --via preload"
            )
        _notice("TCP_DEFER_ACCEPT cannot be set from BPF: ignored (use --via preload)")
    try:
        return run_bpf(policy, cmd, pin_dir=pin_dir)
    except BpfkeepError as e:
        if via == "bpf" or isinstance(e, UsageError):
            raise
        _refuse_useless_fallback(cmd[0], e)
        if isinstance(e, PermissionProblem):
            _notice(
                "no BPF privileges (root or CAP_BPF+CAP_PERFMON+CAP_NET_ADMIN): falling back "
                "to the LD_PRELOAD shim"
            )
        else:
            _notice(f"BPF unavailable ({e}): falling back to the LD_PRELOAD shim")
        return exec_preload(policy, cmd)


def _refuse_useless_fallback(program: str, e: BpfkeepError) -> None:
    """The shim cannot reach every program: falling back to it for one of
    those would run the program with no policy at all.  That is an error,
    with what to do instead."""
    reason = _unreachable(program)
    if not reason:
        return
    if isinstance(e, PermissionProblem):
        why = "BPF needs root or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN"
    else:
        why = f"BPF is unavailable: {e}"
    msg = f"{program} is {reason}: the LD_PRELOAD shim cannot reach it, and {why}"
    hint = cgroups.netns_hint()
    if hint and hint not in msg:
        msg += f"; {hint}"
    raise type(e)(msg)


# -- what a run owns -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunState:
    """One ``run``'s cgroup, as recorded while it runs."""

    cgroup: str  # absolute path of the scratch cgroup
    cgroup_id: int  # 0 until the cgroup exists
    pin_dir: str | None
    pid: int  # the bpfkeep run process
    start: int  # its start time (/proc/PID/stat field 22), against pid reuse

    @property
    def file(self) -> str:
        return os.path.join(state_dir(), f"{self.pid}-{self.start}")

    def save(self) -> None:
        os.makedirs(state_dir(), mode=0o700, exist_ok=True)
        tmp = self.file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dataclasses.asdict(self), f)
        os.replace(tmp, self.file)

    def forget(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.file)

    def run_alive(self) -> bool:
        return _start_time(self.pid) == self.start


def state_dir() -> str:
    return os.environ.get(RUN_STATE_ENV) or RUN_STATE_DIR


def _start_time(pid: int | str) -> int | None:
    """A process's start time in clock ticks after boot, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def _load_states() -> list[RunState]:
    try:
        names = os.listdir(state_dir())
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if name.endswith(".tmp"):
            continue
        try:
            with open(os.path.join(state_dir(), name)) as f:
                found.append(RunState(**json.load(f)))
        except (OSError, ValueError, TypeError):
            continue
    return found


def populated(path: str) -> bool:
    """Whether a cgroup or any cgroup below it holds a process."""
    try:
        with open(os.path.join(path, "cgroup.events")) as f:
            return "populated 1" in f.read().splitlines()
    except FileNotFoundError:
        return False


def _remove_empty(path: str) -> bool:
    """Remove an empty cgroup and the (empty) cgroups the command made below
    it, deepest first; never moves a process.  False if one is busy."""
    if not os.path.isdir(path):
        return True
    try:
        for dirpath, _dirs, _files in sorted(os.walk(path), key=lambda t: -t[0].count("/")):
            with contextlib.suppress(FileNotFoundError):
                cgroups.remove(dirpath)
    except OSError:
        return False
    return True


def reap_stale_runs() -> list[str]:
    """Clean up after ``run`` processes that were killed: detach the policy
    from each one's cgroup and remove the cgroup, once no process is left
    in it (until then the policy keeps covering what runs there).  Returns
    the cgroups removed.  Needs root (or CAP_BPF etc.); quietly does
    nothing without."""
    done = []
    for st in _load_states():
        if st.run_alive() or populated(st.cgroup):
            continue
        try:
            if st.cgroup_id:
                Enforcer(st.pin_dir).detach_id(st.cgroup_id)
            if not _remove_empty(st.cgroup):
                continue
        except (OSError, BpfkeepError):
            continue
        st.forget()
        done.append(st.cgroup)
    return done


# -- run --------------------------------------------------------------------------


def run_bpf(policy: Policy, cmd: list[str], *, pin_dir: str | None = None) -> int:
    """Run COMMAND in a fresh child cgroup with the policy attached; keep
    both until the cgroup is empty; return the main process's exit status."""
    require_privileges()
    mount = cgroups.cgroup2_mount()
    parent = cgroups.own_cgroup(mount)
    enf = Enforcer(pin_dir)
    enf.check_pin_dir()  # before anything is made
    with contextlib.suppress(OSError):
        reap_stale_runs()
    me = os.getpid()
    path = os.path.join(parent, f"bpfkeep-run-{me}-{time.monotonic_ns() % 10**9}")
    state = RunState(path, 0, enf.pin_dir, me, _start_time(me) or 0)
    try:
        state.save()  # before the cgroup exists: a kill in between leaks nothing
    except OSError as e:
        raise EnvironmentProblem(
            f"cannot record the run in {state_dir()} ({e.strerror}): check that /run is writable"
        ) from None
    try:
        os.mkdir(path)
        cg = cgroups.resolve(path)
        state = dataclasses.replace(state, cgroup_id=cg.id)
        state.save()
        enf.attach(cg, policy)
        try:
            return _supervise(path, cmd)
        finally:
            enf.detach(cg)
    finally:
        if _remove_empty(path):
            state.forget()


def _supervise(cgroup_path: str, cmd: list[str]) -> int:
    """Start COMMAND in the cgroup, forward signals, reap it, then wait
    until the cgroup is empty.  The main process's status is returned."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: join the cgroup before exec, so every socket is in it
        code = NOT_FOUND
        try:
            os.close(r)
            cgroups.move(0, cgroup_path)
            os.execvp(cmd[0], cmd)
        except OSError as e:
            code = _exec_failure_status(e.errno or 0)
            os.write(w, f"{code} cannot run {cmd[0]}: {e.strerror}".encode())
        finally:
            os._exit(code)
    os.close(w)
    main = {"pid": pid}  # 0 once the main process is reaped

    def forward(signum: int, _frame: object) -> None:
        # To the main process while it lives; then to whatever it left in
        # the cgroup (Ctrl-C still stops a daemonized program).
        targets = [main["pid"]] if main["pid"] else _cgroup_pids(cgroup_path)
        for target in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signum)

    old = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        with os.fdopen(r, "rb") as f:
            err = f.read().decode()  # empty once exec succeeded (CLOEXEC)
        _, status = os.waitpid(pid, 0)
        main["pid"] = 0
        if err:
            code, _, msg = err.partition(" ")
            _notice(msg)
            return int(code)
        left = _cgroup_pids(cgroup_path)
        if left:
            _notice(
                f"{cmd[0]} exited; waiting for the {len(left)} process(es) it left in "
                f"{cgroup_path} (pid {', '.join(map(str, left[:5]))}), which keep the policy"
            )
        wait_empty(cgroup_path)
    finally:
        for s, h in old.items():
            with contextlib.suppress(ValueError):
                signal.signal(s, h)
    return _exit_status(status)


def _cgroup_pids(path: str) -> list[int]:
    pids = []
    for dirpath, _dirs, _files in os.walk(path):
        pids += cgroups.procs(dirpath)
    return pids


def wait_empty(path: str) -> None:
    """Block until no process is left in the cgroup or below.  The kernel
    signals changes of cgroup.events to poll() as POLLPRI (kernfs_notify):
    no polling loop, no timer."""
    try:
        fd = os.open(os.path.join(path, "cgroup.events"), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        while True:
            # Reading re-arms the notification: a change after this read
            # wakes the poll below, even one before it is entered.
            if "populated 1" not in os.pread(fd, 4096, 0).decode().splitlines():
                return
            poller.poll()
    finally:
        os.close(fd)
