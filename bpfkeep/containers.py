"""Containers and Kubernetes pods: from a cgroup v2 path to the workload
that runs in it, and from a workload's name back to its cgroup.

Two halves:

- **The cgroup path** (pure functions): the container runtimes and the
  kubelet name a container's cgroup after its id, and a pod's after its
  uid.  ``parse()`` reads (runtime hint, container id, pod uid) from the
  layouts of the systemd and cgroupfs drivers (see LAYOUTS below).
- **The runtime's metadata** for an id: name and labels, with the labels
  the kubelet puts on every container (``io.kubernetes.pod.namespace``,
  ``io.kubernetes.pod.name``, ``io.kubernetes.container.name``).  docker
  and podman answer over their unix sockets (podman's docker-compatible
  API, served by ``podman system service``; without it, from podman's
  files: bpfkeep.podman); containerd and CRI-O are read
  without gRPC from the OCI bundle's ``config.json`` the runtime keeps
  for each running container (annotations
  ``io.kubernetes.cri.sandbox-namespace``, ``...sandbox-name``,
  ``...container-name`` for containerd; the kubelet label names for
  CRI-O).

Every runtime call has a deadline (``Sources.timeout``, for the whole
call, not per read) and every answer a size bound: a stalled or hostile
runtime costs at most that, and its container is "not known yet" and
tried again later (see ``Lookups``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import glob
import http.client
import json
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from bpfkeep import podman
from bpfkeep.errors import EnvironmentProblem, UsageError

# The kubelet's labels on every container of a pod (docker, podman, CRI-O
# show them as labels or annotations; containerd's CRI plugin as the
# io.kubernetes.cri.* annotations of the OCI spec, mapped to these).
K8S_NAMESPACE = "io.kubernetes.pod.namespace"
K8S_POD = "io.kubernetes.pod.name"
K8S_CONTAINER = "io.kubernetes.container.name"
K8S_POD_UID = "io.kubernetes.pod.uid"
CRI_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
CRI_POD = "io.kubernetes.cri.sandbox-name"
CRI_CONTAINER = "io.kubernetes.cri.container-name"
CRI_POD_UID = "io.kubernetes.cri.sandbox-uid"

MAX_BODY = 4 << 20  # bytes of one runtime answer or config.json (an OCI spec is ~10-50 KiB)
DEFAULT_TIMEOUT = 1.0  # seconds for one runtime call, connect to last byte

# -- the cgroup path -----------------------------------------------------------

_ID = r"[0-9a-f]{64}"
# The last segment: the container.  (runtime hint, regex with group "id")
_LEAVES = (
    ("docker", re.compile(rf"docker-(?P<id>{_ID})\.scope")),  # systemd driver
    ("containerd", re.compile(rf"cri-containerd-(?P<id>{_ID})\.scope")),
    ("crio", re.compile(rf"crio-(?P<id>{_ID})\.scope")),
    ("podman", re.compile(rf"libpod-(?P<id>{_ID})(?:\.scope)?")),  # both drivers
    (None, re.compile(rf"(?P<id>{_ID})")),  # cgroupfs driver: the bare id
)
# A pod's cgroup: kubepods/<qos>/pod<uid> (cgroupfs) or
# kubepods-<qos>-pod<uid with _ for ->.slice, kubepods-pod<uid>.slice for
# guaranteed QoS (systemd).
_POD_CGROUPFS = re.compile(
    r"pod(?P<uid>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
)
_POD_SYSTEMD = re.compile(
    r"kubepods(?:-[a-z]+)?-pod(?P<uid>[0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12})\.slice"
)
# Whose a bare id is under the runtimes' default parents (cgroupfs driver).
_PARENT_HINT = {"docker": "docker", "libpod_parent": "podman"}

# Directories below which the runtimes put containers by default (first
# path segment); the daemon watches these when it has workload rules.
# "system.slice" only one level deep (docker-<id>.scope, crio-<id>.scope).
CONTAINER_ROOTS = ("docker", "libpod_parent", "kubepods", "kubepods.slice", "machine.slice")


@dataclasses.dataclass(frozen=True)
class CgroupInfo:
    """What a container's cgroup path tells: the runtime (None: any of
    them, the bare-id layout), the container id, the pod uid if any."""

    runtime: str | None
    id: str
    pod_uid: str | None = None
    # The cgroup's directory, where the caller knows it: podman's files
    # are found from the processes in it (see bpfkeep.podman).
    path: str = dataclasses.field(default="", compare=False)


def parse(rel: str) -> CgroupInfo | None:
    """The container a cgroup path (relative to the cgroup2 mount) is
    for, or None.  Layouts (``<id>`` is 64 hex digits):

    - ``kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice/
      cri-containerd-<id>.scope`` (``crio-<id>.scope``, ``docker-<id>.scope``),
      ``kubepods.slice/kubepods-pod<uid>.slice/...`` (guaranteed QoS)
    - ``kubepods/<qos>/pod<uid>/<id>``, ``kubepods/pod<uid>/<id>``
    - ``docker/<id>``, ``system.slice/docker-<id>.scope``
    - ``libpod_parent/libpod-<id>``, ``machine.slice/libpod-<id>.scope``
    - any parent (``--cgroup-parent``) with one of these last segments.

    The monitors' scopes (``crio-conmon-<id>``, ``libpod-conmon-<id>``)
    are not containers."""
    parts = [p for p in rel.split("/") if p]
    if not parts:
        return None
    leaf = parts[-1]
    found = next(((h, m) for h, rx in _LEAVES if (m := rx.fullmatch(leaf))), None)
    if found is None:
        return None
    hint, m = found
    uid = None
    for p in parts[:-1]:
        pm = _POD_CGROUPFS.fullmatch(p)
        if pm:
            uid = pm["uid"]
        else:
            pm = _POD_SYSTEMD.fullmatch(p)
            if pm:
                uid = pm["uid"].replace("_", "-")
    if hint is None and len(parts) >= 2:
        hint = _PARENT_HINT.get(parts[-2])
    return CgroupInfo(hint, m["id"], uid)


def may_hold_containers(rel: str) -> bool:
    """Could a container's cgroup appear at or below ``rel``?  (Which
    directories the daemon watches for workload rules.)"""
    parts = [p for p in rel.split("/") if p]
    if not parts:
        return True
    if parts[0] in CONTAINER_ROOTS:
        return True
    return parts == ["system.slice"]


def pod_cgroup(rel: str) -> str | None:
    """The pod's cgroup of a container's cgroup (its parent in the kubepods
    layouts), or None outside a pod."""
    parts = [p for p in rel.split("/") if p]
    if len(parts) >= 2 and parse(rel) is not None:
        p = parts[-2]
        if _POD_CGROUPFS.fullmatch(p) or _POD_SYSTEMD.fullmatch(p):
            return "/".join(parts[:-1])
    return None


# -- workloads and selectors -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
    """A container as its runtime describes it."""

    id: str
    runtime: str
    name: str  # docker/podman name; containerd and CRI-O: the kubelet's container name
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    @property
    def namespace(self) -> str:
        return self.label_map.get(K8S_NAMESPACE, "")

    @property
    def pod(self) -> str:
        return self.label_map.get(K8S_POD, "")

    @property
    def container(self) -> str:
        """The kubelet's container name in a pod, else the runtime's name."""
        return self.label_map.get(K8S_CONTAINER, "") or self.name

    def metric_labels(self) -> dict[str, str]:
        return {"namespace": self.namespace, "pod": self.pod, "container": self.container}


@dataclasses.dataclass(frozen=True)
class Selector:
    """The workload keys of one [[policy]]: every key given must match."""

    container: str | None = None  # glob on Workload.name
    labels: tuple[tuple[str, str], ...] = ()  # exact values
    pod: tuple[str, str, str | None] | None = None  # namespace, pod, container globs

    def matches(self, w: Workload) -> bool:
        if self.container is not None and not fnmatch.fnmatchcase(w.name, self.container):
            return False
        have = w.label_map
        if any(have.get(k) != v for k, v in self.labels):
            return False
        if self.pod is not None:
            ns, pod, ctr = self.pod
            if not w.namespace or not w.pod:
                return False  # not a Kubernetes container
            if not fnmatch.fnmatchcase(w.namespace, ns) or not fnmatch.fnmatchcase(w.pod, pod):
                return False
            if ctr is not None and not fnmatch.fnmatchcase(w.label_map.get(K8S_CONTAINER, ""), ctr):
                return False
        return True

    def describe(self) -> str:
        out = []
        if self.container is not None:
            out.append(f"container={self.container}")
        if self.labels:
            out.append("labels=" + ",".join(f"{k}={v}" for k, v in self.labels))
        if self.pod is not None:
            out.append("pod=" + "/".join(p for p in self.pod if p is not None))
        return " ".join(out)


def parse_pod(value: str) -> tuple[str, str, str | None]:
    """``NAMESPACE/POD`` or ``NAMESPACE/POD/CONTAINER`` (globs); ValueError."""
    parts = value.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f'expected "NAMESPACE/POD" or "NAMESPACE/POD/CONTAINER", got {value!r}')
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


# -- where the runtimes are --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sources:
    """Where to ask; "" turns a runtime off.  The [containers] table."""

    docker_socket: str = "/var/run/docker.sock"
    podman_socket: str = "/run/podman/podman.sock"
    # containerd's state directory: its shims keep each task's OCI bundle
    # in io.containerd.runtime.v2.task/<namespace>/<id>/config.json (k8s.io
    # for the CRI plugin, moby for docker's containers).
    containerd_root: str = "/run/containerd"
    # CRI-O's (containers/storage) run root: overlay-containers/<id>/userdata/config.json
    crio_root: str = "/run/containers/storage"
    timeout: float = DEFAULT_TIMEOUT


class BadAnswer(Exception):
    """A runtime answered something we cannot use."""


@dataclasses.dataclass
class Lookup:
    """The result of asking the runtimes about one id."""

    workload: Workload | None
    problems: list[str]  # runtimes that could not be asked, with why
    # Runtime -> why it could not be asked (its API down, its files
    # unreadable), for the runtimes this container could belong to.
    down: dict[str, str] = dataclasses.field(default_factory=dict)
    # Found without the runtime's API (podman's files): how, and what is
    # missing ("" if nothing).
    via: str = ""
    missing: str = ""

    @property
    def unreachable(self) -> bool:
        return self.workload is None and bool(self.problems)


# What to do when a runtime cannot be asked (the daemon's warning).
FIX = {
    "podman": "systemctl enable --now podman.socket (podman's API; or podman system service), "
    "or set [containers] podman_socket to where it listens",
    "docker": "start docker (systemctl enable --now docker.socket), "
    "or set [containers] docker_socket to where it listens",
    "containerd": "set [containers] containerd_root to containerd's state directory",
    "crio": "set [containers] crio_root to CRI-O's run root",
}
# The API is not served there at all (podman's default): its files may tell.
_NOT_SERVED = (FileNotFoundError, ConnectionRefusedError)


class _DeadlineSocket(socket.socket):
    """A unix stream socket whose every read is bounded by one deadline
    for the whole exchange (a runtime that drips a byte per second cannot
    hold us past it)."""

    deadline = 0.0

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        return left

    def recv_into(self, buffer, nbytes=0, flags=0):  # type: ignore[override]
        self.settimeout(self._left())
        return super().recv_into(buffer, nbytes, flags)

    def sendall(self, data, flags=0):  # type: ignore[override]
        self.settimeout(self._left())
        return super().sendall(data, flags)


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = _DeadlineSocket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.deadline = time.monotonic() + float(self.timeout or DEFAULT_TIMEOUT)
        try:
            s.settimeout(s._left())
            s.connect(self._path)
        except BaseException:
            s.close()
            raise
        self.sock = s


def http_get(sock_path: str, path: str, timeout: float) -> tuple[int, bytes]:
    """GET over a unix socket: (status, body); the whole call within
    ``timeout`` seconds, the body at most MAX_BODY bytes.  OSError,
    TimeoutError or BadAnswer otherwise."""
    conn = _UnixHTTP(sock_path, timeout)
    try:
        conn.request("GET", path, headers={"Accept": "application/json"})
        resp = conn.getresponse()
        body = resp.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            raise BadAnswer(f"answer larger than {MAX_BODY} bytes")
        return resp.status, body
    except http.client.HTTPException as e:
        raise BadAnswer(f"bad HTTP answer ({type(e).__name__})") from None
    finally:
        conn.close()


def _str_map(raw: object) -> dict[str, str]:
    if not isinstance(raw, dict):
        return {}
    return {str(k): str(v) for k, v in raw.items() if isinstance(v, str | int | float)}


def _ask_api(runtime: str, sock_path: str, cid: str, timeout: float) -> Workload | None:
    """docker's Engine API, or podman's docker-compatible one: GET
    /containers/<id>/json.  None: the runtime does not know the id."""
    status, body = http_get(sock_path, f"/containers/{cid}/json", timeout)
    if status == 404:
        return None
    if status != 200:
        raise BadAnswer(f"HTTP {status}")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply
        raise BadAnswer("answer is not JSON") from None
    if not isinstance(data, dict):
        raise BadAnswer("answer is not a JSON object")
    cfg = data.get("Config") if isinstance(data.get("Config"), dict) else {}
    name = data.get("Name") if isinstance(data.get("Name"), str) else ""
    labels = _str_map(cfg.get("Labels"))
    return Workload(cid, runtime, name.lstrip("/"), tuple(sorted(labels.items())))


def _read_bounded(path: str) -> bytes:
    # O_NONBLOCK: a FIFO planted there must not hang us.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        with open(fd, "rb", closefd=False) as f:
            data = f.read(MAX_BODY + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_BODY:
        raise BadAnswer(f"{path}: larger than {MAX_BODY} bytes")
    return data


def _annotations(path: str) -> dict[str, str] | None:
    try:
        data = json.loads(_read_bounded(path))
    except FileNotFoundError:
        return None
    except (ValueError, RecursionError):
        raise BadAnswer(f"{path}: not JSON") from None
    if not isinstance(data, dict):
        raise BadAnswer(f"{path}: not an OCI spec")
    return _str_map(data.get("annotations"))


def _from_containerd(root: str, cid: str) -> Workload | None:
    """containerd's CRI containers, from the bundle's OCI spec.  Bundles
    without the CRI annotations (docker's, in namespace moby) are left to
    the runtime that made them."""
    pattern = os.path.join(glob.escape(root), "io.containerd.runtime.v2.task", "*", cid)
    for bundle in sorted(glob.glob(pattern))[:8]:
        ann = _annotations(os.path.join(bundle, "config.json"))
        if not ann or (CRI_NAMESPACE not in ann and K8S_NAMESPACE not in ann):
            continue
        labels = dict(ann)
        for k8s, cri in (
            (K8S_NAMESPACE, CRI_NAMESPACE),
            (K8S_POD, CRI_POD),
            (K8S_CONTAINER, CRI_CONTAINER),
            (K8S_POD_UID, CRI_POD_UID),
        ):
            if cri in ann:
                labels.setdefault(k8s, ann[cri])
        return Workload(
            cid, "containerd", labels.get(K8S_CONTAINER, ""), tuple(sorted(labels.items()))
        )
    return None


def _from_crio(root: str, cid: str) -> Workload | None:
    """CRI-O's containers, from the bundle's OCI spec: the kubelet's label
    names as annotations, the pod's labels as JSON in
    io.kubernetes.cri-o.Labels."""
    ann = _annotations(os.path.join(root, "overlay-containers", cid, "userdata", "config.json"))
    if not ann or K8S_NAMESPACE not in ann:
        return None  # podman keeps a config.json there too, without them
    labels = {}
    with contextlib.suppress(ValueError, RecursionError):
        labels = _str_map(json.loads(ann.get("io.kubernetes.cri-o.Labels", "{}")))
    for k in (K8S_NAMESPACE, K8S_POD, K8S_CONTAINER, K8S_POD_UID):
        if k in ann:
            labels.setdefault(k, ann[k])
    return Workload(cid, "crio", labels.get(K8S_CONTAINER, ""), tuple(sorted(labels.items())))


def lookup(info: CgroupInfo, sources: Sources) -> Lookup:
    """Ask the runtimes about one container: the one the cgroup names
    first, then the others.  Never raises (an answer we cannot use is a
    problem of that runtime); at most ~timeout per socket asked.  podman
    without its API service: from its files (_from_podman_files)."""
    problems: list[str] = []
    down: dict[str, str] = {}
    # A bare id (kubelet's cgroupfs layout, a custom parent): the bundles
    # first, a file read each, then the sockets.
    order = ["containerd", "crio", "docker", "podman"]
    if info.runtime in order:
        order.remove(info.runtime)
        order.insert(0, info.runtime)
    for runtime in order:
        sock = {"docker": sources.docker_socket, "podman": sources.podman_socket}.get(runtime)
        try:
            if sock is not None:
                if not sock:
                    continue
                if info.runtime not in (None, runtime) and not os.path.exists(sock):
                    continue  # another runtime's container; this one is not here
                try:
                    w = _ask_api(runtime, sock, info.id, sources.timeout)
                except _NOT_SERVED as e:
                    if runtime != "podman" or not info.path:
                        raise
                    found = _from_podman_files(info, f"{sock}: {e.strerror}")
                    if found.workload is not None or found.down:
                        problems += found.problems
                        down.update(found.down)
                        if found.workload is not None:
                            return dataclasses.replace(found, problems=problems, down=down)
                        continue
                    w = None  # conmon is not this container's: not podman's
            elif runtime == "containerd":
                if not sources.containerd_root:
                    continue
                w = _from_containerd(sources.containerd_root, info.id)
            else:
                if not sources.crio_root:
                    continue
                w = _from_crio(sources.crio_root, info.id)
        except (OSError, BadAnswer) as e:
            why = (
                e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
            )
            problems.append(f"{runtime} at {sock}: {why}" if sock else f"{runtime}: {why}")
            down[runtime] = f"{sock}: {why}" if sock else why
            continue
        if w is not None:
            return Lookup(w, problems, down)
    return Lookup(None, problems, down)


def _from_podman_files(info: CgroupInfo, api: str) -> Lookup:
    """podman's API is not served (``api`` says why): the container's
    name from its conmon, its labels from podman's database.  A Lookup
    with the workload; or with podman down (a container of podman's, by
    its cgroup, that its files do not tell); or empty (not podman's)."""
    try:
        found = podman.identify(info.path, info.id)
    except podman.NotFound as e:
        if info.runtime != "podman":
            return Lookup(None, [])  # a bare id: maybe another runtime's
        why = f"{api}; podman's files: {e}"
        return Lookup(None, [f"podman at {why}"], {"podman": why})
    labels = by_labels(found.labels or {})
    w = Workload(info.id, "podman", found.name, labels)
    via = (
        f"podman's API is not served ({api}): containers are identified from podman's "
        f"files, conmon and the database under their storage root (first: {found.db})"
    )
    return Lookup(w, [], {}, via=via, missing=found.why_no_labels)


# -- finding containers by name (the CLI) -----------------------------------------


def container_cgroups(mount: str) -> Iterator[tuple[str, CgroupInfo]]:
    """(relative path, info) of every container cgroup below the runtimes'
    default parents (CONTAINER_ROOTS, system.slice)."""
    stack = [mount]
    prefix = mount.rstrip("/") + "/"
    while stack:
        path = stack.pop()
        rel = path[len(prefix) :] if path != mount else ""
        if rel:
            info = parse(rel)
            if info is not None:
                yield rel, dataclasses.replace(info, path=path)
        if not may_hold_containers(rel):
            continue
        with contextlib.suppress(OSError), os.scandir(path) as it:
            stack.extend(d.path for d in it if d.is_dir(follow_symlinks=False))


def find(
    mount: str, sources: Sources, *, container: str | None = None, pod: str | None = None
) -> str:
    """The cgroup (relative to the mount) of one running container named
    ``container`` exactly, or of the pod ``NAMESPACE/NAME`` (its pod
    cgroup, which holds all its containers, restarted ones included), or
    of one container of a pod ``NAMESPACE/NAME/CONTAINER``.  One line
    naming the fix otherwise: not found, ambiguous, runtime unreachable."""
    want = f"container {container}" if container is not None else f"pod {pod}"
    ns = pname = cname = None
    if pod is not None:
        try:
            ns, pname, cname = parse_pod(pod)
        except ValueError as e:
            raise UsageError(f"--pod: {e}") from None
    problems: dict[str, None] = {}
    hits: list[tuple[str, Workload]] = []
    asked = 0
    for rel, info in container_cgroups(mount):
        asked += 1
        res = lookup(info, sources)
        problems.update(dict.fromkeys(res.problems))
        w = res.workload
        if w is None:
            continue
        if (container is not None and w.name == container) or (
            pod is not None
            and (w.namespace, w.pod) == (ns, pname)
            and (cname is None or w.label_map.get(K8S_CONTAINER) == cname)
        ):
            hits.append((rel, w))
    if not hits:
        if problems:
            raise EnvironmentProblem(
                f"{want}: not found, and could not ask {'; '.join(problems)}: start the "
                "runtime's API (podman: systemctl enable --now podman.socket) or say where it "
                "is with --config FILE ([containers] table)"
            )
        raise UsageError(
            f"{want}: no running container has it ({asked} container cgroup(s) under "
            f"{mount}); docker ps / podman ps / crictl ps list them"
        )
    if pod is not None and cname is None:
        pods = {pod_cgroup(rel) for rel, _ in hits}
        if None in pods:
            raise UsageError(
                f"{want}: its containers are not in a pod cgroup (kubepods layout); name one "
                f"container: --pod {pod}/CONTAINER"
            )
        if len(pods) > 1:
            shown = ", ".join(sorted(p or "" for p in pods))
            raise UsageError(f"{want}: found in {len(pods)} pod cgroups: {shown}")
        return pods.pop() or ""
    if len(hits) > 1:
        shown = ", ".join(f"/{rel} ({w.runtime})" for rel, w in hits[:4])
        raise UsageError(
            f"{want}: {len(hits)} containers match ({shown}); name exactly one "
            "(or use --cgroup PATH)"
        )
    return hits[0][0]


# -- the daemon's lookups, off its loop ----------------------------------------------

RETRY_FIRST = 0.05  # seconds before asking again about an id no runtime knew
RETRY_MAX = 2.0
GIVE_UP_AFTER = 60.0  # then log once; a reload or restart asks again
DOWN_AFTER = 1.0  # seconds a container waits before its runtime counts as down


class Lookups:
    """Runtime lookups for the daemon, on one worker thread so that a slow
    runtime never holds up the reconcile loop (attaching, inotify).

    ``submit(key, rel)`` queues a container cgroup; the worker asks the
    runtimes and, while none knows the id yet (the cgroup appears before
    the runtime marks the container running, and a busy runtime answers
    late), asks again with a backoff from 50 ms to 2 s for at most
    GIVE_UP_AFTER seconds.  Results are collected with
    ``results()``; ``fd`` becomes readable when there are some."""

    def __init__(self, sources: Sources, ask: Callable[[CgroupInfo, Sources], Lookup] = lookup):
        self.sources = sources
        self._ask = ask
        self._todo: queue.Queue[tuple[int, str, CgroupInfo, float] | None] = queue.Queue()
        self._done: list[tuple[int, str, Lookup]] = []  # no workload: given up
        self._lock = threading.Lock()
        self._pending: dict[int, str] = {}  # key -> rel, asked or to be asked
        self._cancelled: set[int] = set()
        # Pending keys whose last try found a runtime they need down.
        self._down: dict[int, Lookup] = {}
        self.rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None

    @property
    def fd(self) -> int:
        return self.rfd

    def submit(self, key: int, rel: str, path: str = "") -> bool:
        """Ask about the container cgroup ``rel`` (``path``: its directory)."""
        info = parse(rel)
        if info is None:
            return False
        info = dataclasses.replace(info, path=path)
        with self._lock:
            if key in self._pending:
                self._cancelled.discard(key)  # wanted again before the worker dropped it
                return True
            self._pending[key] = rel
            self._cancelled.discard(key)
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="containers", daemon=True)
            self._thread.start()
        self._todo.put((key, rel, info, time.monotonic()))
        return True

    def cancel(self, which: Callable[[int, str], bool]) -> None:
        """Stop asking about the pending cgroups ``which(key, rel)`` picks
        (removed ones)."""
        with self._lock:
            self._cancelled |= {k for k, rel in self._pending.items() if which(k, rel)}

    def is_pending(self, key: int) -> bool:
        with self._lock:
            return key in self._pending

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def down(self) -> dict[int, Lookup]:
        """The pending containers whose last try found a runtime they need
        down (not identified until it comes back), with that try."""
        with self._lock:
            return dict(self._down)

    def results(self) -> list[tuple[int, str, Lookup]]:
        with contextlib.suppress(BlockingIOError):
            os.read(self.rfd, 4096)
        with self._lock:
            out, self._done = self._done, []
        return out

    def _finish(self, key: int, rel: str, result: Lookup) -> None:
        with self._lock:
            self._pending.pop(key, None)
            self._down.pop(key, None)
            if key in self._cancelled:
                self._cancelled.discard(key)
                return
            self._done.append((key, rel, result))
        with contextlib.suppress(BlockingIOError):
            os.write(self._wfd, b"x")

    def _note_down(self, key: int, res: Lookup, asked_for: float) -> None:
        """Keep the try of a container a runtime it needs is down for, and
        wake the loop at the first such try (the daemon warns then, not
        after GIVE_UP_AFTER).  Not in the first DOWN_AFTER seconds: a new
        container's cgroup is empty and its monitor still starting then,
        which podman's files cannot tell from a runtime out of reach."""
        down = bool(res.down) and asked_for >= DOWN_AFTER
        with self._lock:
            first = key not in self._down
            if down:
                self._down[key] = res
            else:
                self._down.pop(key, None)
        if first and down:
            with contextlib.suppress(BlockingIOError):
                os.write(self._wfd, b"x")

    def _work(self) -> None:
        waiting: list[tuple[float, float, int, str, CgroupInfo, float]] = []  # due, delay, ...
        while True:
            timeout = None
            if waiting:
                waiting.sort()
                timeout = max(0.0, waiting[0][0] - time.monotonic())
            try:
                item = self._todo.get(timeout=timeout)
            except queue.Empty:
                item = None
            else:
                if item is None:
                    return
                key, rel, info, since = item
                waiting.append((0.0, RETRY_FIRST / 2, key, rel, info, since))
                waiting.sort()
            now = time.monotonic()
            while waiting and waiting[0][0] <= now:
                _, delay, key, rel, info, since = waiting.pop(0)
                with self._lock:
                    if key in self._cancelled:
                        self._pending.pop(key, None)
                        self._down.pop(key, None)
                        self._cancelled.discard(key)
                        continue
                try:
                    res = self._ask(info, self.sources)
                except Exception as e:  # never kill the worker
                    res = Lookup(None, [f"lookup failed: {e}"])
                if res.workload is not None:
                    self._finish(key, rel, res)
                elif time.monotonic() - since >= GIVE_UP_AFTER:
                    self._finish(key, rel, res)  # no workload: given up
                else:
                    self._note_down(key, res, time.monotonic() - since)
                    delay = min(delay * 2, RETRY_MAX)
                    waiting.append((time.monotonic() + delay, delay, key, rel, info, since))
                now = time.monotonic()

    def close(self) -> None:
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join(timeout=5)
        for fd in (self.rfd, self._wfd):
            with contextlib.suppress(OSError):
                os.close(fd)


def by_labels(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(k), str(v)) for k, v in labels.items()))
