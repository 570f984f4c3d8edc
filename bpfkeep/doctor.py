"""``bpfkeep doctor``: can this host use bpfkeep, and how.

One line per check, OK / WARN / FAIL, and what to do about each problem.
FAIL means the BPF side cannot work here (exit status 1); WARN means it
works with a limitation or a step bpfkeep takes itself.  The doctor only
reads: it loads nothing, mounts nothing, and imports bcc (~74 MB of LLVM)
only in a throw-away child process.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable

from bpfkeep.audit.sockets import scan
from bpfkeep.errors import BpfkeepError, EnvironmentProblem, UsageError
from bpfkeep.kernel.cgroups import hidden_mount, netns_hint, read_mounts
from bpfkeep.kernel.privileges import (
    BPFFS_DEFAULT,
    CAPS,
    LOAD_CAPS,
    SWEEP_CAPS,
    capabilities,  # noqa: F401 - part of the doctor's interface (tests)
    existing,
    is_bpffs,
    missing_load_caps,
    mountable_bpffs,
    own_capabilities,
)
from bpfkeep.kernel.procfs import KEEPALIVE_SYSCTLS, SYSCTL_DIR, keepalive_sysctls
from bpfkeep.options import OPTIONS, dead_peer_seconds
from bpfkeep.pins.pindir import PinDir, pin_dir_default
from bpfkeep.preload import library_path
from bpfkeep.progs import kheaders
from bpfkeep.progs.loader import OBJECTS

OK, WARN, FAIL = "OK", "WARN", "FAIL"
MIN_KERNEL = (5, 10)  # cgroup storage shared by both hooks, the core options from sock_ops
# Before 5.15, configuring net_cls/net_prio (cgroup v1) made the kernel stop
# recording sockets' cgroup v2 ("cgroup: disabling cgroup2 socket matching
# due to net_prio or net_cls activation"): programs on child cgroups would
# no longer see their sockets.
MIXED_V1_FIXED = (5, 15)
CGROUP_ID_IN_DIAG = (5, 7)  # INET_DIAG_CGROUP_ID (commit b1f3e43dbfac)


@dataclasses.dataclass
class Check:
    name: str
    status: str  # OK, WARN, FAIL
    message: str
    fix: str | None = None
    details: dict[str, object] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


# -- pure helpers ------------------------------------------------------------


def format_duration(seconds: int) -> str:
    """7875 -> "2 h 11 min 15 s"; zero parts are left out; 0 -> "0 s"."""
    seconds = int(seconds)
    if seconds <= 0:
        return "0 s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        n, seconds = divmod(seconds, size)
        if n:
            parts.append(f"{n} {unit}")
    return " ".join(parts)


def worst_case(time: int, intvl: int, probes: int) -> int:
    """Seconds from the last packet until keepalive drops a dead peer."""
    return dead_peer_seconds(time, intvl, probes)


def keepalive_summary(time: int, intvl: int, probes: int) -> str:
    """ "7200 + 9 × 75 s = 2 h 11 min 15 s" """
    total = worst_case(time, intvl, probes)
    return f"{time} + {probes} × {intvl} s = {format_duration(total)}"


def parse_kernel_version(release: str) -> tuple[int, int]:
    """ "6.18.0-1-amd64" -> (6, 18); (0, 0) when it is not recognisable."""
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def bpf_options_for_kernel(version: tuple[int, int]) -> list[str]:
    """Socket options this kernel's sock_ops accepts from bpfkeep, in table
    order (TCP_DEFER_ACCEPT never: the kernel refuses it from BPF)."""
    return [o.optname for o in OPTIONS if o.bpf and o.bpf_since <= tuple(version)]


def kernel_config_values(text: str, names: Iterable[str]) -> dict[str, str | None]:
    """CONFIG_X -> "y" / "m" / value, or None when not set."""
    wanted = set(names)
    found: dict[str, str | None] = dict.fromkeys(wanted)
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in wanted:
            found[key] = value
    return found


# -- checks ------------------------------------------------------------------


def check_kernel(release: str) -> Check:
    version = parse_kernel_version(release)
    accepted = bpf_options_for_kernel(version)
    refused = [
        f"{o.optname} (Linux {o.bpf_since[0]}.{o.bpf_since[1]})"
        for o in OPTIONS
        if o.bpf and o.optname not in accepted
    ]
    preload_only = [o.optname for o in OPTIONS if not o.bpf]
    details = {
        "release": release,
        "version": list(version),
        "bpf_options": accepted,
        "bpf_refused": refused,
        "preload_only": preload_only,
    }
    if version < MIN_KERNEL:
        return Check(
            "kernel",
            FAIL,
            f"Linux {release}: bpfkeep's BPF programs need Linux >= "
            f"{MIN_KERNEL[0]}.{MIN_KERNEL[1]}",
            "upgrade the kernel; meanwhile the LD_PRELOAD shim works on any "
            "kernel (bpfkeep exec -- COMMAND)",
            details,
        )
    msg = f"Linux {release}: sock_ops sets {', '.join(accepted)}"
    if refused:
        msg += f"; not {', '.join(refused)}: preload shim only here"
    msg += f"; {', '.join(preload_only)}: preload shim only"
    return Check("kernel", OK, msg, None, details)


def _read_kernel_config(release: str) -> tuple[str | None, str]:
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            return f.read(), "/proc/config.gz"
    except OSError:
        pass
    path = f"/boot/config-{release}"
    try:
        with open(path) as f:
            return f.read(), path
    except OSError:
        return None, path


def check_kernel_config(release: str) -> Check:
    needed = ("CONFIG_BPF_SYSCALL", "CONFIG_CGROUP_BPF")
    audit = ("CONFIG_INET_DIAG", "CONFIG_INET_TCP_DIAG")
    text, where = _read_kernel_config(release)
    if text is None:
        return Check(
            "kernel config",
            WARN,
            f"cannot read the kernel configuration (/proc/config.gz, {where}): "
            f"{' and '.join(needed)} not confirmed",
            "check that the kernel was built with CONFIG_BPF_SYSCALL=y and CONFIG_CGROUP_BPF=y",
        )
    values = kernel_config_values(text, needed + audit)
    missing = [k for k in needed if values[k] != "y"]
    if missing:
        return Check(
            "kernel config",
            FAIL,
            f"{where}: {', '.join(missing)} not set: the kernel cannot run cgroup BPF programs",
            "use a kernel built with CONFIG_BPF_SYSCALL=y and CONFIG_CGROUP_BPF=y; "
            "meanwhile bpfkeep exec -- COMMAND (LD_PRELOAD)",
            {"source": where, "values": values},
        )
    no_diag = [k for k in audit if values[k] not in ("y", "m")]
    if no_diag:
        return Check(
            "kernel config",
            WARN,
            f"{where}: {', '.join(no_diag)} not set: bpfkeep audit cannot list sockets",
            "use a kernel with CONFIG_INET_DIAG and CONFIG_INET_TCP_DIAG (y or m)",
            {"source": where, "values": values},
        )
    return Check(
        "kernel config",
        OK,
        f"{where}: " + ", ".join(f"{k}={values[k]}" for k in needed + audit),
        None,
        {"source": where, "values": values},
    )


def _v1_controllers(proc_mounts: str = "/proc/mounts") -> set[str]:
    ctrls: set[str] = set()
    with open(proc_mounts) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 4 and fields[2] == "cgroup":
                ctrls.update(fields[3].split(","))
    return ctrls


def check_cgroup2(version: tuple[int, int]) -> Check:
    mounts = read_mounts()
    hint = netns_hint()
    if not mounts.cgroup2 and hint:
        return Check(
            "cgroup2",
            FAIL,
            "no cgroup2 filesystem in this mount namespace, and the host's "
            f"(at {hidden_mount('cgroup2')}) is out of reach",
            hint,
        )
    if not mounts.cgroup2:
        return Check(
            "cgroup2",
            FAIL,
            "no cgroup2 filesystem is mounted: BPF programs attach to cgroup v2 only",
            "mount -t cgroup2 none /sys/fs/cgroup (or boot with "
            "systemd.unified_cgroup_hierarchy=1)",
        )
    details: dict[str, object] = {"mount": mounts.cgroup2, "hybrid": bool(mounts.v1)}
    where = mounts.cgroup2
    if mounts.via:
        where += " (the host's, through " + mounts.via + ": this mount namespace hides it)"
    if not mounts.v1:
        return Check("cgroup2", OK, f"cgroup2 at {where} (unified)", None, details)
    msg = (
        f"cgroup2 at {where}; hybrid layout ({len(mounts.v1)} cgroup v1 "
        "hierarchies too): give --cgroup paths under the cgroup2 mount"
    )
    risky = sorted(_v1_controllers() & {"net_cls", "net_prio"})
    if risky and version < MIXED_V1_FIXED:
        return Check(
            "cgroup2",
            WARN,
            msg + f"; {'/'.join(risky)} v1 is mounted and this kernel (< 5.15) stops "
            "attributing sockets to cgroup v2 once it is configured",
            "check dmesg for 'disabling cgroup2 socket matching'; unmount or stop "
            "configuring net_cls/net_prio, or use a kernel >= 5.15",
            details,
        )
    return Check("cgroup2", OK, msg, None, details)


def check_bpffs(pin_dir: str) -> Check:
    pins = PinDir(pin_dir)
    pin_dir = pins.pin_dir
    fs = existing(pin_dir)
    details: dict[str, object] = {"pin_dir": pin_dir, "mounted": False}
    if is_bpffs(fs):
        details["mounted"] = True
        try:
            pins.check()  # bpfkeep's own directory, and a name bpffs takes
        except UsageError as e:
            return Check("bpffs", FAIL, str(e), None, details)
        return Check("bpffs", OK, f"bpffs mounted at {fs} (pins under {pin_dir})", None, details)
    hint = netns_hint()
    if hint and hidden_mount("bpf"):
        return Check(
            "bpffs",
            FAIL,
            f"{fs} is not on a bpf filesystem in this mount namespace, and the host's "
            f"bpffs (at {hidden_mount('bpf')}) is out of reach",
            hint,
            details,
        )
    if mountable_bpffs(pin_dir):
        fstab = f"bpf {BPFFS_DEFAULT} bpf defaults 0 0"
        return Check(
            "bpffs",
            WARN,
            f"bpffs is not mounted at {BPFFS_DEFAULT}: bpfkeep attach mounts it (as root), "
            "but policies pinned there vanish if something unmounts it",
            f"mount -t bpf bpf {BPFFS_DEFAULT}, and add '{fstab}' to /etc/fstab",
            details,
        )
    try:
        pins.check()  # says where a pin directory can be instead
    except UsageError as e:
        return Check("bpffs", FAIL, str(e), None, details)
    return Check("bpffs", FAIL, f"{fs} is not on a bpf filesystem", None, details)


def check_privileges(status_path: str = "/proc/self/status") -> Check:
    caps = own_capabilities(status_path)
    have = ", ".join(c for c in CAPS if c in caps) or "none of " + ", ".join(CAPS)
    details = {"euid": os.geteuid(), "capabilities": sorted(caps)}
    missing = missing_load_caps(caps)
    unit = "AmbientCapabilities=" + " ".join((*LOAD_CAPS, *SWEEP_CAPS))
    if missing:
        return Check(
            "privileges",
            FAIL,
            f"uid {os.geteuid()}, effective: {have}: cannot load or attach BPF programs "
            f"(missing {', '.join(missing)})",
            f"run as root, or give bpfkeep {', '.join(LOAD_CAPS)} (systemd: {unit}, "
            "as deploy/bpfkeep.service does); without privileges: bpfkeep exec -- "
            "COMMAND (LD_PRELOAD)",
            details,
        )
    sweep_missing = [c for c in SWEEP_CAPS if c not in caps]
    if sweep_missing:
        return Check(
            "privileges",
            WARN,
            f"uid {os.geteuid()}, effective: {have}: can attach, but existing sockets in "
            "other network namespaces or held by other users' processes cannot be "
            f"swept (missing {', '.join(sweep_missing)})",
            f"give bpfkeep {', '.join(SWEEP_CAPS)} too (systemd: {unit})",
            details,
        )
    return Check("privileges", OK, f"uid {os.geteuid()}, effective: {have}", None, details)


def _programs_pinned(pin_dir: str) -> bool:
    obj_dir = PinDir(pin_dir).obj_dir
    return all(os.path.exists(os.path.join(obj_dir, n)) for n in OBJECTS)


_BCC_PROBE = (
    "import sys, bcc\n"
    "sys.stdout.write(str(getattr(bcc, '__version__', '?')))\n"
    "sys.exit(0 if hasattr(bcc, 'BPF') else 3)\n"
)


def check_bcc(loaded: bool) -> Check:
    """bcc compiles the programs; imported in a child so the doctor stays light."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _BCC_PROBE],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        rc, out, err = proc.returncode, proc.stdout.strip(), proc.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        rc, out, err = -1, "", str(e)
    details = {"python": sys.executable, "loaded": loaded}
    if rc == 0:
        details["version"] = out
        return Check("bcc", OK, f"bcc {out} importable by {sys.executable}", None, details)
    fix = (
        "apt-get install python3-bpfcc, and run bpfkeep from a venv made with "
        "/usr/bin/python3 -m venv --system-site-packages"
    )
    if rc == 3:
        why = "the module named bcc is not BCC (PyPI's 'bcc' is an unrelated project)"
        fix = "pip uninstall bcc; " + fix
    else:
        why = f"bcc is not importable by {sys.executable} ({(err.splitlines() or ['?'])[-1]})"
    if loaded:
        return Check(
            "bcc",
            WARN,
            f"{why}; not needed now (the programs are already loaded), "
            "needed to load them again, e.g. after a reboot",
            fix,
            details,
        )
    return Check("bcc", FAIL, why + ": the BPF programs cannot be compiled", fix, details)


def check_headers(loaded: bool) -> Check:
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env and os.path.isdir(env):
        return Check("kernel headers", OK, f"BCC_KERNEL_SOURCE={env}", None, {"tree": env})
    tree = kheaders.running_kernel_tree()
    if tree:
        what = "the kernel's built-in headers" if tree == "kheaders" else tree
        return Check("kernel headers", OK, f"running kernel's: {what}", None, {"tree": tree})
    sets = kheaders.find_header_sets()
    if sets:
        hs = sets[0]
        dirs = hs.arch_dir + (f" + {hs.common_dir}" if hs.common_dir else "")
        return Check(
            "kernel headers",
            OK,
            f"none for the running kernel; distro set {hs.version} ({dirs}), which "
            "bpfkeep merges for bcc (the programs use UAPI types only)",
            None,
            {"tree": hs.arch_dir, "version": hs.version},
        )
    msg = "no kernel headers for bcc (none for the running kernel, no distro set in /usr/src)"
    if loaded:
        return Check(
            "kernel headers",
            WARN,
            msg + "; not needed now (the programs are already loaded)",
            kheaders.package_hint(),
        )
    return Check("kernel headers", FAIL, msg, kheaders.package_hint())


def check_preload() -> Check:
    try:
        path = library_path()
    except EnvironmentProblem as e:
        return Check(
            "preload shim",
            WARN,
            "the LD_PRELOAD fallback (bpfkeep exec, TCP_DEFER_ACCEPT) is not available",
            str(e),
        )
    return Check(
        "preload shim",
        OK,
        f"{path} (bpfkeep exec; the only way to set TCP_DEFER_ACCEPT)",
        None,
        {"path": str(path)},
    )


def check_audit(version: tuple[int, int]) -> Check:
    try:
        records = scan(with_owners=False)
    except BpfkeepError as e:
        return Check("audit", WARN, f"bpfkeep audit cannot work: {e}", "modprobe tcp_diag")
    with_id = sum(1 for r in records if r.cgroup_id)
    # Judged from the version, not from the sockets: a socket may have no
    # cgroup id on any kernel (an orphan in FIN-WAIT-2 has lost its owner).
    if version < CGROUP_ID_IN_DIAG:
        return Check(
            "audit",
            WARN,
            f"Linux < {CGROUP_ID_IN_DIAG[0]}.{CGROUP_ID_IN_DIAG[1]}: inet_diag reports no "
            "cgroup ids, so bpfkeep audit cannot attribute sockets to cgroups",
            f"use Linux >= {CGROUP_ID_IN_DIAG[0]}.{CGROUP_ID_IN_DIAG[1]} for per-cgroup audit",
            {"sockets": len(records)},
        )
    return Check(
        "audit",
        OK,
        f"inet_diag lists {len(records)} TCP socket{'s' if len(records) != 1 else ''} "
        "in this network namespace, "
        f"{with_id} with their cgroup",
        None,
        {"sockets": len(records)},
    )


def check_sysctls(sysctl_dir: str = SYSCTL_DIR) -> Check:
    try:
        v = dict(zip(KEEPALIVE_SYSCTLS, keepalive_sysctls(sysctl_dir), strict=True))
    except (OSError, ValueError, IndexError) as e:
        return Check(
            "keepalive sysctls",
            WARN,
            f"cannot read net.ipv4.tcp_keepalive_*: {e}",
            "check that /proc/sys is mounted",
        )
    t, i, p = (v[n] for n in KEEPALIVE_SYSCTLS)
    total = worst_case(t, i, p)
    return Check(
        "keepalive sysctls",
        OK,
        f"net.ipv4.tcp_keepalive_time={t} intvl={i} probes={p}: a socket with keepalive "
        f"on and no times of its own notices a dead peer after {keepalive_summary(t, i, p)} "
        "(this network namespace; policy values of 0 fall back to these)",
        None,
        {**v, "worst_case_seconds": total},
    )


def checks(pin_dir: str) -> list[Check]:
    release = platform.release()
    version = parse_kernel_version(release)
    loaded = _programs_pinned(pin_dir)
    return [
        check_kernel(release),
        check_kernel_config(release),
        check_cgroup2(version),
        check_bpffs(pin_dir),
        check_privileges(),
        check_bcc(loaded),
        check_headers(loaded),
        check_preload(),
        check_audit(version),
        check_sysctls(),
    ]


# -- command line --------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="check whether this host can run bpfkeep, and what to fix",
        description="Check the kernel, cgroup2, bpffs, privileges, bcc, kernel headers, "
        "the LD_PRELOAD shim and the host's keepalive sysctls.  Exit status 1 when "
        "bpfkeep's BPF side cannot work here (a FAIL line), 0 otherwise.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    pin_dir = os.path.abspath(getattr(args, "pin_dir", None) or pin_dir_default())
    results = checks(pin_dir)
    usable = not any(c.status == FAIL for c in results)
    if args.json:
        json.dump({"bpf_usable": usable, "checks": [c.as_dict() for c in results]}, out, indent=2)
        out.write("\n")
        return 0 if usable else 1
    width = max(len(c.name) for c in results)
    for c in results:
        print(f"{c.status:<4}  {c.name:<{width}}  {c.message}", file=out)
        if c.fix:
            print(f"{'':<4}  {'':<{width}}  fix: {c.fix}", file=out)
    warnings = sum(c.status == WARN for c in results)
    if usable:
        tail = f" ({warnings} warning{'s' if warnings != 1 else ''})" if warnings else ""
        print(f"\nbpfkeep can attach policies on this host{tail}.", file=out)
    else:
        print(
            "\nbpfkeep cannot attach policies on this host: fix the FAIL lines; "
            "meanwhile the LD_PRELOAD shim works without privileges (bpfkeep exec -- COMMAND).",
            file=out,
        )
    return 0 if usable else 1
