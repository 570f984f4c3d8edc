"""A podman container's name and labels from what podman leaves on the
host, for when its API is not served (podman's default: no daemon, and
``podman system service`` or the ``podman.socket`` unit only if someone
enabled it).

- **conmon**, the monitor podman starts for every container and leaves
  running beside it, is the container's ancestor (its subreaper): walking
  up the parents of a process in the container's cgroup reaches it.  Its
  command line carries the container id (``-c``), the name (``-n``) and,
  in the exit command it will run, podman's storage root (``--root``).
- **podman's database** under that root: podman 4 keeps each container's
  configuration, labels included, as JSON in a bbolt file
  (``<root>/libpod/bolt_state.db``: bucket ``ctr``, the container id, key
  ``config``), read here without podman (bpfkeep.boltdb).  podman 4.8 and
  later may keep it in SQLite instead (``<root>/db.sql``): not read here,
  the name from conmon is all there is then.

Nothing here runs podman: the daemon has few capabilities, a read-only
file system (ProtectSystem=strict) and must not wait on a podman process.
Everything read is root's: conmon must run as root (rootful podman; rootless
containers live below user.slice, where bpfkeep does not look), and the
database is a regular file.
"""

from __future__ import annotations

import dataclasses
import json
import os

from bpfkeep.boltdb import BoltError, BoltFile

DEFAULT_ROOT = "/var/lib/containers/storage"  # podman's --root for root
BOLT_DB = "libpod/bolt_state.db"
SQLITE_DB = "db.sql"
MAX_HOPS = 4  # container init -> (runc init -> runc create ->) conmon
MAX_CONFIG = 4 << 20  # bytes of one container's config JSON


class NotFound(Exception):
    """podman's files do not tell (yet): why, in a few words."""


@dataclasses.dataclass(frozen=True)
class Monitor:
    """What a container's conmon process tells."""

    pid: int
    cid: str
    name: str
    root: str  # podman's storage root


@dataclasses.dataclass(frozen=True)
class Found:
    name: str
    labels: dict[str, str] | None  # None: podman's database could not be read
    why_no_labels: str = ""
    db: str = ""


def identify(cgroup_dir: str, cid: str, proc: str = "/proc") -> Found:
    """The name and labels of the podman container ``cid`` whose cgroup is
    ``cgroup_dir``.  NotFound when no conmon of it is found (not started
    yet, gone, or not podman's)."""
    mon = monitor(cgroup_dir, cid, proc)
    db = os.path.join(mon.root, BOLT_DB)
    try:
        config = _config(db, cid)
    except (OSError, BoltError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        if isinstance(e, FileNotFoundError) and os.path.exists(os.path.join(mon.root, SQLITE_DB)):
            why = f"podman keeps them in {os.path.join(mon.root, SQLITE_DB)} (SQLite), not read"
        return Found(mon.name, None, f"{db}: {why}", db)
    if config is None:
        return Found(mon.name, None, f"{db}: no container {cid[:12]} in it", db)
    name = config.get("name") if isinstance(config.get("name"), str) else mon.name
    raw = config.get("labels")
    labels = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
    return Found(name, labels, "", db)


def _config(db: str, cid: str) -> dict | None:
    """The container's config from podman's bbolt database; a write that
    got in the way of the read is tried again once."""
    for attempt in (1, 2):
        try:
            with BoltFile(db) as bolt:
                raw = bolt.get([b"ctr", cid.encode()], b"config")
            break
        except BoltError:
            if attempt == 2:
                raise
    if raw is None:
        return None
    if len(raw) > MAX_CONFIG:
        raise ValueError(f"config larger than {MAX_CONFIG} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise ValueError("config is not JSON") from None
    if not isinstance(data, dict) or data.get("id") not in (None, cid):
        raise ValueError("config is not this container's")
    return data


def monitor(cgroup_dir: str, cid: str, proc: str = "/proc") -> Monitor:
    """conmon of container ``cid``: up the parents of the processes in
    its cgroup (or in its first child cgroups, for a container that made
    its own)."""
    pids = _procs(cgroup_dir)
    if not pids:
        raise NotFound("no process in its cgroup yet")
    seen: set[int] = set()
    for pid in pids[:8]:
        for _ in range(MAX_HOPS):
            status = _status(proc, pid)
            if status is None:
                break
            ppid = int(status.get("PPid", "0") or 0)
            if ppid <= 1 or ppid in seen:
                break
            seen.add(ppid)
            mon = _conmon(proc, ppid, cid)
            if mon is not None:
                return mon
            pid = ppid
    raise NotFound("no conmon (podman's monitor) among its processes' parents")


def _procs(cgroup_dir: str) -> list[int]:
    pids = _read_procs(cgroup_dir)
    if pids:
        return pids
    try:
        with os.scandir(cgroup_dir) as it:
            children = sorted(e.path for e in it if e.is_dir(follow_symlinks=False))
    except OSError:
        return []
    for child in children[:4]:
        pids += _read_procs(child)
    return pids


def _read_procs(cgroup_dir: str) -> list[int]:
    try:
        with open(os.path.join(cgroup_dir, "cgroup.procs")) as f:
            return [int(x) for x in f.read(1 << 16).split()]
    except (OSError, ValueError):
        return []


def _status(proc: str, pid: int) -> dict[str, str] | None:
    try:
        with open(f"{proc}/{pid}/status") as f:
            return dict(ln.split(":\t", 1) for ln in f.read().splitlines() if ":\t" in ln)
    except OSError:
        return None


def _conmon(proc: str, pid: int, cid: str) -> Monitor | None:
    """The Monitor if ``pid`` is root's conmon for ``cid``."""
    try:
        with open(f"{proc}/{pid}/comm") as f:
            if f.read().strip() != "conmon":
                return None
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            argv = [a.decode("utf-8", "surrogateescape") for a in f.read(1 << 20).split(b"\0")]
        status = _status(proc, pid)
    except OSError:
        return None
    if status is None or status.get("Uid", "").split()[:1] != ["0"]:
        return None
    opts = conmon_options(argv)
    if opts.get("cid") != cid or not opts.get("name"):
        return None
    return Monitor(pid, cid, opts["name"], opts.get("root") or DEFAULT_ROOT)


# conmon's options that take a value (conmon --help, 2.1), short and long,
# and which of them are kept.
_TAKES_VALUE = {
    "-c": "cid", "--cid": "cid", "-n": "name", "--name": "name",
    "-b": "bundle", "--bundle": "bundle", "--exit-command-arg": "exit_arg",
    **dict.fromkeys((
        "--api-version", "-P", "--conmon-pidfile", "-p", "--container-pidfile",
        "-u", "--cuuid", "--exec-process-spec", "--exit-command", "--exit-delay",
        "--exit-dir", "--log-level", "-l", "--log-path", "--log-size-max",
        "--log-global-size-max", "--log-tag", "-0", "--persist-dir", "-r",
        "--runtime", "--runtime-arg", "--runtime-opt", "--sdnotify-socket",
        "--socket-dir-path", "-T", "--timeout", "--seccomp-notify-socket",
        "--seccomp-notify-plugins",
    ), ""),
}  # fmt: skip


def conmon_options(argv: list[str]) -> dict[str, str]:
    """cid, name, bundle and podman's root from conmon's command line
    (``--exit-command-arg --root --exit-command-arg PATH``; without it,
    from the bundle ``<root>/<driver>-containers/<id>/userdata``)."""
    out: dict[str, str] = {}
    exit_args: list[str] = []
    i = 1
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if eq and name in _TAKES_VALUE:
            key = _TAKES_VALUE[name]
        elif arg in _TAKES_VALUE and i + 1 < len(argv):
            key, value = _TAKES_VALUE[arg], argv[i + 1]
            i += 1
        else:
            key = ""
        if key == "exit_arg":
            exit_args.append(value)
        elif key:
            out[key] = value
        i += 1
    if "--root" in exit_args[:-1]:
        out["root"] = exit_args[exit_args.index("--root") + 1]
    elif out.get("bundle", "").endswith("/userdata"):
        parts = out["bundle"].rstrip("/").split("/")
        if len(parts) >= 4 and parts[-3].endswith("-containers"):
            out["root"] = "/".join(parts[:-3])
    return out
