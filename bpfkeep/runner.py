"""``bpfkeep run`` and ``bpfkeep exec``: one command under a policy."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from bpfkeep import cgroups
from bpfkeep.errors import BpfkeepError, PermissionProblem, UsageError
from bpfkeep.options import Policy

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _exit_status(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _notice(msg: str) -> None:
    print(f"bpfkeep: {msg}", file=sys.stderr)


def exec_preload(policy: Policy, cmd: list[str], *, hook: str = "connect") -> int:
    """Replace this process with COMMAND under the LD_PRELOAD shim."""
    from bpfkeep.preload import preload_env, unreachable_reason

    reason = unreachable_reason(cmd[0])
    if reason:
        _notice(
            f"warning: {cmd[0]} is {reason}: the LD_PRELOAD shim cannot "
            "reach it; use bpfkeep run --via bpf (needs root/CAP_BPF)"
        )
    env = preload_env(policy, os.environ, hook=hook)
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as e:
        raise UsageError(f"cannot run {cmd[0]}: {e.strerror}") from None
    return 127  # not reached


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
        if isinstance(e, PermissionProblem):
            _notice(
                "no BPF privileges (root or CAP_BPF+CAP_PERFMON+CAP_NET_ADMIN): falling back "
                "to the LD_PRELOAD shim"
            )
        else:
            _notice(f"BPF unavailable ({e}): falling back to the LD_PRELOAD shim")
        return exec_preload(policy, cmd)


def run_bpf(policy: Policy, cmd: list[str], *, pin_dir: str | None = None) -> int:
    """Run COMMAND in a fresh child cgroup with the policy attached; remove
    both afterwards; return COMMAND's exit status."""
    from bpfkeep.enforcer import Enforcer, require_privileges

    require_privileges()
    mount = cgroups.cgroup2_mount()
    parent = cgroups.own_cgroup(mount)
    enf = Enforcer(pin_dir)
    path = cgroups.make_child(parent, "bpfkeep-run")
    try:
        cg = cgroups.resolve(path)
        enf.attach(cg, policy)
        try:
            return _spawn_in(path, cmd)
        finally:
            enf.detach(cg)
    finally:
        cgroups.remove(path, evacuate_to=parent)


def _spawn_in(cgroup_path: str, cmd: list[str]) -> int:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: join the cgroup before exec, so every socket is in it
        try:
            os.close(r)
            cgroups.move(0, cgroup_path)
            os.set_inheritable(w, False)
            os.execvp(cmd[0], cmd)
        except OSError as e:
            os.write(w, f"cannot run {cmd[0]}: {e.strerror}".encode())
        finally:
            os._exit(127)
    os.close(w)
    old = {s: signal.signal(s, lambda n, _f: os.kill(pid, n)) for s in FORWARDED}
    try:
        with os.fdopen(r, "rb") as f:
            err = f.read().decode()  # empty once exec succeeded (CLOEXEC)
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except ChildProcessError:
                return 127
            except InterruptedError:
                continue
    finally:
        for s, h in old.items():
            with contextlib.suppress(ValueError):
                signal.signal(s, h)
    if err:
        raise UsageError(err)
    return _exit_status(status)
