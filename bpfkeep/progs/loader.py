"""Compile bpfkeep's BPF programs with bcc and pin them in bpffs.

Run as its own short-lived process (``python -m bpfkeep.progs.loader
OBJ_DIR``) so that bcc's LLVM (~190 MB: importing bcc alone takes a process
to ~74 MB, compiling to ~190 MB) never lives in the CLI or the
daemon: they open the pinned objects through libbpf instead.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

from bpfkeep.errors import BpfkeepError, EnvironmentProblem, PermissionProblem
from bpfkeep.kernel import bpfsys, procfs
from bpfkeep.progs import btfdefs, maps
from bpfkeep.progs.header import bpf_dir, unit_text
from bpfkeep.progs.kheaders import bcc_environment

# The translation unit of all three programs: bcc gets it as one text
# (header.unit_text; bpf/bpfkeep.bpf.c says why).
SOURCE = "bpfkeep.bpf.c"
# Pinned object names in PIN_DIR/obj (programs and maps).
PROG_SOCKOPS = "prog_sockops"
PROG_SETSOCKOPT = "prog_setsockopt"
MAP_POLICY = "map_policy"  # cgroup storage: the attachment's own policy
MAP_COUNTERS = "map_counters"  # per-CPU cgroup storage
MAP_POLICIES = "map_policies"  # hash cgroup id -> policy
MAP_SK = "map_sk"  # socket storage: each socket's owner (struct bk_sk)
MAP_SWEEP = "map_sweep"  # hash cookie -> struct bk_sweep: the sweep's work list
MAP_SWEEPSTATS = "map_sweepstats"  # hash cgroup id -> sweep counters
MAP_PEERS = "map_peers"  # LPM trie (peer-rule set, address) -> struct bk_peer
MAP_RULES = "map_rules"  # hash (peer-rule set, rule) -> struct bk_rule
MAP_LOSSES = "map_losses"  # hash (policy, rule tag) -> lost connections
MAP_CONFIG = "map_config"  # array[1]: struct bk_config (HZ, idle buckets)
MAP_LEARNED = "map_learned"  # hash path -> struct bk_learned (keepidle = "auto")
MAP_LOSS_EVENTS = "map_loss_events"  # ring buffer of struct bk_loss_event
# Enforce mode past the cgroup hook (bpf/bypass.bpf.c, daemon/enforce.py).
MAP_BYPASS = "map_bypass"  # hash (policy, cookie) -> sockets to repair
MAP_BYPASSED = "map_bypassed"  # hash cgroup id -> calls past the hook, by option
MAP_REPAIRED = "map_repaired"  # hash cgroup id -> sockets repaired (the daemon writes it)
MAP_BYPASS_BELL = "map_bypass_bell"  # ring buffer: the daemon's doorbell
# The sweep of existing sockets (iter/tcp).  Optional: a kernel that
# cannot load it (before 5.15) still gets the cgroup programs; the sweep
# then says so once (bpfkeep.sweep.engine).
PROG_SWEEP = "prog_sweep"
OBJECTS = (
    PROG_SOCKOPS,
    PROG_SETSOCKOPT,
    MAP_POLICY,
    MAP_COUNTERS,
    MAP_POLICIES,
    MAP_SK,
    MAP_SWEEP,
    MAP_SWEEPSTATS,
    MAP_PEERS,
    MAP_RULES,
    MAP_LOSSES,
    MAP_CONFIG,
    MAP_LOSS_EVENTS,
    MAP_LEARNED,
    MAP_BYPASS,
    MAP_BYPASSED,
    MAP_REPAIRED,
    MAP_BYPASS_BELL,
)
# Lost connections (a raw tracepoint reading struct sock at the running
# kernel's offsets, from its BTF).  Optional: without BTF the rest works;
# its link is pinned beside it, so counting outlives the process.
PROG_LOSS = "prog_loss"
LINK_LOSS = "link_loss"
LOSS_TRACEPOINT = "inet_sk_error_report"
BPF_PROG_TYPE_CGROUP_SOCKOPT = 25  # no named constant in bcc 0.26
# setsockopt past the cgroup hook, caught when the protocol's handler
# returns (fexit; BTF, trampolines, struct arguments: Linux 6.1).
# Optional: without them the daemon's periodic enforce pass is the bound.
# Each program and its link are pinned as prog_bypass_X, link_bypass_X.
BYPASS_PROGS = {
    "tcp": b"kretfunc__tcp_setsockopt",
    "sock": b"kretfunc__sock_setsockopt",
    "mptcp": b"kretfunc__mptcp_setsockopt",
}


def _compile_and_pin(obj_dir: str) -> None:
    try:
        # Here only: bcc brings LLVM (~74 MB imported, ~190 MB compiling),
        # which must never live in the CLI or the daemon.
        from bcc import BPF, BPFAttachType
        from bcc.libbcc import lib as libbcc
    except ImportError:
        raise EnvironmentProblem(
            "bcc is not importable: apt-get install python3-bpfcc, and use a "
            "venv made with /usr/bin/python3 -m venv --system-site-packages"
        ) from None
    src = bpf_dir()
    # The loss program reads struct sock at this kernel's offsets (BTF);
    # the bypass programs too, and share its owner lookup.
    loss_flags, loss_error = btfdefs.loss_cflags()
    bypass_flags, bypass_error = btfdefs.bypass_cflags() if loss_flags else ([], loss_error)

    class Unit(BPF):
        """bcc attaches the functions named kretfunc__* when it compiles
        them (and fails whole if it cannot): ours are loaded, attached and
        pinned below, each on its own."""

        def _trace_autoload(self) -> None:
            pass

    try:
        b = Unit(
            text=unit_text(src / SOURCE).encode(),
            cflags=[f"-I{src}", "-Wno-unused-function", *loss_flags, *bypass_flags],
        )
        sockops = b.load_func(b"bk_sockops", BPF.SOCK_OPS)
        setsockopt = b.load_func(
            b"bk_setsockopt",
            BPF_PROG_TYPE_CGROUP_SOCKOPT,
            attach_type=BPFAttachType.CGROUP_SETSOCKOPT,
        )
    except Exception as e:  # bcc raises bare Exception
        msg = _last_line(e)
        if "Operation not permitted" in msg or ("Permission denied" in msg and os.geteuid()):
            raise PermissionProblem(
                f"loading the BPF programs was refused ({msg}): it needs root "
                "or CAP_BPF+CAP_PERFMON+CAP_NET_ADMIN; without them use the LD_PRELOAD "
                "fallback (bpfkeep exec)"
            ) from None
        raise EnvironmentProblem(f"loading the BPF programs failed: {msg}") from None
    fds = {PROG_SOCKOPS: sockops.fd, PROG_SETSOCKOPT: setsockopt.fd}
    sweep_error = ""
    try:
        fds[PROG_SWEEP] = b.load_func(b"bpf_iter__tcp", BPF.TRACING).fd
    except Exception as e:  # bcc raises bare Exception
        sweep_error = _last_line(e)
    if loss_flags:
        try:
            fds[PROG_LOSS] = b.load_func(b"bk_loss", BPF.RAW_TRACEPOINT).fd
        except Exception as e:  # bcc raises bare Exception
            loss_error = _last_line(e)
    bypass: dict[str, int] = {}
    bypass_errors = []
    for what, fn in BYPASS_PROGS.items() if bypass_flags else ():
        if what == "mptcp" and not any(f.startswith("-DBK_O_MSK_FIRST=") for f in bypass_flags):
            continue  # no MPTCP in this kernel
        try:
            bypass[what] = b.load_func(fn, BPF.TRACING).fd
        except Exception as e:  # bcc raises bare Exception
            bypass_errors.append(f"{fn.decode().removeprefix('kretfunc__')}: {_refused(e)}")
    for pinned, name in (
        (MAP_POLICY, b"bk_policy"),
        (MAP_COUNTERS, b"bk_counters"),
        (MAP_POLICIES, b"bk_policies"),
        (MAP_SK, b"bk_sk"),
        (MAP_SWEEP, b"bk_sweep"),
        (MAP_SWEEPSTATS, b"bk_sweepstats"),
        (MAP_PEERS, b"bk_peers"),
        (MAP_RULES, b"bk_rules"),
        (MAP_LOSSES, b"bk_losses"),
        (MAP_CONFIG, b"bk_config"),
        (MAP_LOSS_EVENTS, b"bk_loss_events"),
        (MAP_LEARNED, b"bk_learned"),
        (MAP_BYPASS, b"bk_bypass"),
        (MAP_BYPASSED, b"bk_bypassed"),
        (MAP_REPAIRED, b"bk_repaired"),
        (MAP_BYPASS_BELL, b"bk_bypass_bell"),
    ):
        fd = libbcc.bpf_table_fd(b.module, name)
        if fd < 0:
            raise EnvironmentProblem(f"bcc lost map {name.decode()}")
        fds[pinned] = fd
    # bpffs cannot rename, so pin in place; the caller holds the pin
    # directory's lock and load() treats a partial set as absent.
    os.makedirs(obj_dir, exist_ok=True)
    for name in (*OBJECTS, PROG_SWEEP, PROG_LOSS, LINK_LOSS, *bypass_pins()):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(obj_dir, name))
    if PROG_SWEEP in fds:
        bpfsys.obj_pin(fds[PROG_SWEEP], os.path.join(obj_dir, PROG_SWEEP))
    else:
        print(f"bpfkeep: notice: the sweep program did not load: {sweep_error}", file=sys.stderr)
    # What the loss program needs to know: HZ (its times are jiffies) and
    # the idle histogram's buckets.
    hz = procfs.kernel_hz() or 0
    bpfsys.map_update(fds[MAP_CONFIG], bytes(4), maps.config_value(hz))
    if PROG_LOSS in fds:
        bpfsys.obj_pin(fds[PROG_LOSS], os.path.join(obj_dir, PROG_LOSS))
        attach_loss(fds[PROG_LOSS], obj_dir)
    else:
        print(f"bpfkeep: notice: lost connections are not counted: {loss_error}", file=sys.stderr)
    bypass_errors += attach_bypass(bypass, obj_dir)
    if bypass_errors or not bypass:
        why = "; ".join(bypass_errors) or bypass_error or "not built"
        print(
            "bpfkeep: notice: a setsockopt the cgroup hook does not see (a 32-bit call) "
            f"is repaired by the periodic enforce pass, not at once: {why}",
            file=sys.stderr,
        )
    for name in OBJECTS:  # the complete set last: load() tests for it
        bpfsys.obj_pin(fds[name], os.path.join(obj_dir, name))


def attach_loss(prog_fd: int, obj_dir: str) -> None:
    """The loss program on the inet_sk_error_report tracepoint, its link
    pinned beside it: counting goes on after this process, until the
    object directory goes."""
    lfd = bpfsys.raw_tracepoint_open(LOSS_TRACEPOINT, prog_fd)
    try:
        bpfsys.obj_pin(lfd, os.path.join(obj_dir, LINK_LOSS))
    finally:
        os.close(lfd)


def bypass_pins() -> list[str]:
    """The pin names of the bypass programs and their links."""
    return [f"{kind}_bypass_{what}" for what in BYPASS_PROGS for kind in ("prog", "link")]


def bypass_links(obj_dir: str) -> list[str]:
    """The bypass programs attached (their link pins) in ``obj_dir``."""
    return [w for w in BYPASS_PROGS if os.path.exists(os.path.join(obj_dir, f"link_bypass_{w}"))]


def attach_bypass(progs: dict[str, int], obj_dir: str) -> list[str]:
    """Each bypass program on the function it traces, pinned with its link
    (the link keeps it attached after this process); what failed, said."""
    errors = []
    for what, fd in progs.items():
        try:
            lfd = bpfsys.raw_tracepoint_open(None, fd)
        except OSError as e:
            errors.append(f"{what}: {e}")
            continue
        try:
            bpfsys.obj_pin(fd, os.path.join(obj_dir, f"prog_bypass_{what}"))
            bpfsys.obj_pin(lfd, os.path.join(obj_dir, f"link_bypass_{what}"))
        finally:
            os.close(lfd)
    return errors


def _refused(e: Exception) -> str:
    """bcc says "Need super-user privileges" for any EPERM from the kernel,
    also when root is refused a program type (no trampolines here)."""
    msg = _last_line(e)
    if "super-user" in msg and os.geteuid() == 0:
        return "the kernel refused it (EPERM: no fexit programs here)"
    return msg


def _last_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else repr(e)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bpfkeep.progs.loader OBJ_DIR", file=sys.stderr)
        return 2
    try:
        _compile_and_pin(argv[0])
    except BpfkeepError as e:
        print(f"bpfkeep: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"bpfkeep: pinning the BPF objects failed: {e}", file=sys.stderr)
        return 1
    return 0


def load(obj_dir: str) -> None:
    """Make sure the programs are loaded and pinned at ``obj_dir``."""
    if all(os.path.exists(os.path.join(obj_dir, n)) for n in OBJECTS):
        return
    env = bcc_environment()
    # The loader must import bcc, which only the system Python has.
    proc = subprocess.run(
        [sys.executable, "-m", "bpfkeep.progs.loader", obj_dir],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    if proc.returncode == 0:
        # What the kernel left out (the sweep, the loss or bypass programs):
        # said once, where the programs were loaded.
        for ln in proc.stderr.splitlines():
            if ln.startswith("bpfkeep: notice: "):
                print(ln, file=sys.stderr)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("bpfkeep: ")]
        msg = lines[-1][len("bpfkeep: ") :] if lines else proc.stderr.strip()[-400:]
        if proc.returncode == PermissionProblem.exit_code:
            raise PermissionProblem(msg)
        raise EnvironmentProblem(msg or f"the BPF loader exited with {proc.returncode}")


if __name__ == "__main__":
    raise SystemExit(main())
