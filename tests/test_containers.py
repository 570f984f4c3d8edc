"""Containers and pods: the cgroup layouts and the runtimes' answers (pure,
no root), then podman and Debian's docker.io for real: containers made
here from busybox-static and the static sockprobe, the daemon choosing
them by name, labels and pod, read back with getsockopt inside the
container and ss from its network namespace."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import IMAGE, bpftool_prog_ids, cgroup_dirs_to_make, remove_cgroup_everywhere
from prometheus_client import CollectorRegistry
from test_daemon import daemon, free_port, scrape  # noqa: F401 - the fixture

from bpfkeep import containers
from bpfkeep import podman as podman_files
from bpfkeep.containers import CgroupInfo, Selector, Workload, parse
from bpfkeep.metrics.collector import Collector, PathRow, Row, Snapshot
from bpfkeep.options import Policy

ID = "0123456789abcdef" * 4
UID = "5f1a2b3c-0d4e-4f5a-8b6c-7d8e9fa0b1c2"
UIDU = UID.replace("-", "_")

# -- the cgroup layouts ------------------------------------------------------


@pytest.mark.parametrize(
    "rel, want",
    [
        # kubelet, systemd driver: containerd, CRI-O, docker (dockershim/cri-dockerd)
        (
            f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UIDU}.slice/"
            f"cri-containerd-{ID}.scope",
            CgroupInfo("containerd", ID, UID),
        ),
        (
            f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UIDU}.slice/"
            f"crio-{ID}.scope",
            CgroupInfo("crio", ID, UID),
        ),
        (
            f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UIDU}.slice/"
            f"docker-{ID}.scope",
            CgroupInfo("docker", ID, UID),
        ),
        # guaranteed QoS: no QoS slice
        (
            f"kubepods.slice/kubepods-pod{UIDU}.slice/cri-containerd-{ID}.scope",
            CgroupInfo("containerd", ID, UID),
        ),
        # kubelet, cgroupfs driver
        (f"kubepods/besteffort/pod{UID}/{ID}", CgroupInfo(None, ID, UID)),
        (f"kubepods/burstable/pod{UID}/{ID}", CgroupInfo(None, ID, UID)),
        (f"kubepods/pod{UID}/{ID}", CgroupInfo(None, ID, UID)),  # guaranteed
        (f"kubepods/besteffort/pod{UID}/libpod-{ID}", CgroupInfo("podman", ID, UID)),
        # docker and podman on their own
        (f"docker/{ID}", CgroupInfo("docker", ID)),
        (f"system.slice/docker-{ID}.scope", CgroupInfo("docker", ID)),
        (f"libpod_parent/libpod-{ID}", CgroupInfo("podman", ID)),
        (f"machine.slice/libpod-{ID}.scope", CgroupInfo("podman", ID)),
        (f"system.slice/crio-{ID}.scope", CgroupInfo("crio", ID)),
        (f"my-parent/{ID}", CgroupInfo(None, ID)),  # --cgroup-parent
        # not containers
        (f"machine.slice/libpod-conmon-{ID}.scope", None),
        (f"system.slice/crio-conmon-{ID}.scope", None),
        (f"kubepods/besteffort/pod{UID}", None),
        (f"kubepods.slice/kubepods-pod{UIDU}.slice", None),
        ("system.slice/docker.service", None),
        (f"docker/{ID[:-1]}", None),
        (f"docker/{ID.upper()}", None),
        ("", None),
    ],
)
def test_cgroup_layouts(rel, want):
    assert parse(rel) == want
    assert parse("/" + rel + "/") == want


def test_pod_cgroup_and_where_containers_may_appear():
    assert (
        containers.pod_cgroup(f"kubepods/besteffort/pod{UID}/{ID}")
        == f"kubepods/besteffort/pod{UID}"
    )
    slice_ = f"kubepods.slice/kubepods-pod{UIDU}.slice"
    assert containers.pod_cgroup(f"{slice_}/cri-containerd-{ID}.scope") == slice_
    assert containers.pod_cgroup(f"docker/{ID}") is None
    assert containers.pod_cgroup(f"kubepods/besteffort/pod{UID}") is None
    for rel in ("", "docker", "kubepods/burstable/x", "system.slice", "libpod_parent"):
        assert containers.may_hold_containers(rel), rel
    for rel in ("system.slice/nginx.service", "user.slice", "init.scope"):
        assert not containers.may_hold_containers(rel), rel


def _w(name="web-1", **labels) -> Workload:
    return Workload(ID, "docker", name, containers.by_labels(labels))


def k8s(ns, pod, ctr, **more) -> Workload:
    labels = {containers.K8S_NAMESPACE: ns, containers.K8S_POD: pod, containers.K8S_CONTAINER: ctr}
    return Workload(ID, "containerd", ctr, containers.by_labels({**labels, **more}))


def test_selectors():
    assert Selector(container="web-*").matches(_w("web-1"))
    assert not Selector(container="web-*").matches(_w("db-1"))
    db = Selector(labels=(("tier", "db"),))
    assert db.matches(_w(tier="db", other="x")) and not db.matches(_w(tier="web"))
    assert not db.matches(_w())
    both = Selector(container="a*", labels=(("tier", "db"),))  # every key given must match
    assert both.matches(_w("ab", tier="db")) and not both.matches(_w("b", tier="db"))
    pod = Selector(pod=("payments", "api-*", None))
    assert pod.matches(k8s("payments", "api-7d9f", "app"))
    assert not pod.matches(k8s("payments", "web-1", "app"))
    assert not pod.matches(k8s("other", "api-1", "app"))
    assert not pod.matches(_w("api-1"))  # not a Kubernetes container
    one = Selector(pod=("payments", "api-*", "app"))
    assert one.matches(k8s("payments", "api-1", "app"))
    assert not one.matches(k8s("payments", "api-1", "sidecar"))
    assert containers.parse_pod("a/b") == ("a", "b", None)
    assert containers.parse_pod("a/b/c") == ("a", "b", "c")
    for bad in ("a", "a/", "/b", "a/b/c/d", "a//c"):
        with pytest.raises(ValueError, match="NAMESPACE/POD"):
            containers.parse_pod(bad)


# -- the runtimes' answers, bounded --------------------------------------------


class FakeRuntime:
    """An HTTP server on a unix socket that answers as told (or drips, or
    floods), in a thread."""

    def __init__(self, path: str, handler):
        self.path = path
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(8)
        self.handler = handler
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            with c, contextlib.suppress(OSError):
                req = b""
                while b"\r\n\r\n" not in req:
                    chunk = c.recv(4096)
                    if not chunk:
                        break
                    req += chunk
                self.handler(c, req.split(b" ")[1].decode() if b" " in req else "")

    def close(self):
        self.stop.set()
        self.srv.close()


def reply(c, status: int, body: bytes) -> None:
    c.sendall(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n" % (status, len(body)) + body)


@pytest.fixture()
def fake_runtime(tmp_path):
    made = []

    def make(handler) -> str:
        path = str(tmp_path / f"rt{len(made)}.sock")
        made.append(FakeRuntime(path, handler))
        return path

    yield make
    for f in made:
        f.close()


def test_docker_api_answer(fake_runtime):
    def answer(c, path):
        if path == f"/containers/{ID}/json":
            reply(c, 200, json.dumps({"Name": "/web-1", "Config": {"Labels": {"t": "x"}}}).encode())
        else:
            reply(c, 404, b'{"message": "no such container"}')

    sock = fake_runtime(answer)
    src = containers.Sources(docker_socket=sock, podman_socket="", containerd_root="", crio_root="")
    got = containers.lookup(CgroupInfo("docker", ID), src)
    assert got.workload == Workload(ID, "docker", "web-1", (("t", "x"),))
    other = containers.lookup(CgroupInfo("docker", "f" * 64), src)
    assert other.workload is None and not other.problems  # not known (yet)


def test_a_stalled_or_flooding_runtime_is_bounded(fake_runtime):
    """A runtime that drips a byte at a time forever, or sends more than
    MAX_BODY, costs one bounded call: without the deadline for the whole
    exchange (not per read) the first call would never return."""

    def drip(c, _path):
        c.sendall(b"HTTP/1.1 200 OK\r\n")
        while True:
            c.sendall(b"X: y\r\n")
            time.sleep(0.05)

    def flood(c, _path):
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (containers.MAX_BODY + 10))
        chunk = b"x" * 65536
        with contextlib.suppress(OSError):
            for _ in range(containers.MAX_BODY // len(chunk) + 2):
                c.sendall(chunk)

    with pytest.raises(TimeoutError):
        containers.http_get(fake_runtime(drip), "/containers/x/json", 0.5)
    with pytest.raises(containers.BadAnswer, match="larger than"):
        containers.http_get(fake_runtime(flood), "/containers/x/json", 30)
    deep = fake_runtime(lambda c, _p: reply(c, 200, b"[" * 100_000))
    src = containers.Sources(docker_socket=deep, podman_socket="", containerd_root="", crio_root="")
    res = containers.lookup(CgroupInfo("docker", ID), src)
    assert res.workload is None and "not JSON" in res.problems[0]
    src = containers.Sources(
        docker_socket=fake_runtime(drip), podman_socket="", containerd_root="", crio_root="",
        timeout=0.3,
    )  # fmt: skip
    res = containers.lookup(CgroupInfo("docker", ID), src)
    assert res.workload is None and res.unreachable and "timed out" in res.problems[0]
    gone = containers.Sources(docker_socket="/nonexistent/docker.sock", podman_socket="")
    res = containers.lookup(CgroupInfo(None, ID), dataclasses.replace(gone, containerd_root=""))
    assert res.unreachable and "No such file" in res.problems[0]


def test_find_by_name_errors(fake_runtime, tmp_path):
    """attach --container/--pod: exactly one match, else one line naming
    the fix (a directory tree stands in for the cgroup2 mount)."""
    from bpfkeep.errors import EnvironmentProblem, UsageError

    a, b, c = "a" * 64, "b" * 64, "c" * 64
    pod = f"kubepods/besteffort/pod{UID}"
    for rel in (f"docker/{a}", f"docker/{b}", f"{pod}/{c}", "system.slice/x.service"):
        (tmp_path / "cg" / rel).mkdir(parents=True)
    kubelet = {
        containers.K8S_NAMESPACE: "shop",
        containers.K8S_POD: "db-0",
        containers.K8S_CONTAINER: "pg",
    }
    names = {a: ("web", {}), b: ("web", {}), c: ("k8s_app", kubelet)}

    def answer(conn, path):
        cid = path.split("/")[2]
        if cid not in names:
            return reply(conn, 404, b"{}")
        name, labels = names[cid]
        reply(conn, 200, json.dumps({"Name": "/" + name, "Config": {"Labels": labels}}).encode())

    src = containers.Sources(fake_runtime(answer), "", "", "")
    mount = str(tmp_path / "cg")
    with pytest.raises(UsageError, match=r"container web: 2 containers match .*name exactly one"):
        containers.find(mount, src, container="web")
    with pytest.raises(UsageError, match="container nope: no running container has it"):
        containers.find(mount, src, container="nope")
    assert containers.find(mount, src, container="k8s_app") == f"{pod}/{c}"
    assert containers.find(mount, src, pod="shop/db-0") == pod
    assert containers.find(mount, src, pod="shop/db-0/pg") == f"{pod}/{c}"
    with pytest.raises(UsageError, match="no running container"):
        containers.find(mount, src, pod="shop/db-0/other")
    down = containers.Sources(str(tmp_path / "none.sock"), "", "", "")
    with pytest.raises(EnvironmentProblem, match=r"not found, and could not ask docker at .*none"):
        containers.find(mount, down, container="web")


def _spec(path: Path, annotations: dict[str, str]) -> None:
    path.mkdir(parents=True)
    (path / "config.json").write_text(
        json.dumps({"ociVersion": "1.0.2", "annotations": annotations})
    )


def test_containerd_and_crio_bundles(tmp_path):
    """containerd's CRI annotations and CRI-O's kubelet-named ones, read
    from the OCI bundle as the shims lay it out; docker's bundles (in
    containerd's moby namespace) carry none and are left to docker."""
    ctrd = tmp_path / "containerd"
    _spec(
        ctrd / "io.containerd.runtime.v2.task" / "k8s.io" / ID,
        {
            containers.CRI_NAMESPACE: "payments",
            containers.CRI_POD: "api-1",
            containers.CRI_CONTAINER: "app",
            containers.CRI_POD_UID: UID,
        },
    )
    other = "e" * 64
    _spec(ctrd / "io.containerd.runtime.v2.task" / "moby" / other, {})
    crio = tmp_path / "crio"
    crio_id = "c" * 64
    _spec(
        crio / "overlay-containers" / crio_id / "userdata",
        {
            containers.K8S_NAMESPACE: "shop",
            containers.K8S_POD: "db-0",
            containers.K8S_CONTAINER: "postgres",
            "io.kubernetes.cri-o.Labels": json.dumps({"tier": "db"}),
        },
    )
    src = containers.Sources("", "", str(ctrd), str(crio))
    w = containers.lookup(CgroupInfo("containerd", ID, UID), src).workload
    assert w is not None and (w.namespace, w.pod, w.container) == ("payments", "api-1", "app")
    assert Selector(pod=("payments", "api-*", "app")).matches(w)
    assert containers.lookup(CgroupInfo(None, other), src).workload is None
    w = containers.lookup(CgroupInfo("crio", crio_id), src).workload
    assert w is not None and (w.namespace, w.pod, w.container) == ("shop", "db-0", "postgres")
    assert Selector(labels=(("tier", "db"),)).matches(w)
    # A huge or broken spec is an answer we cannot use, not a crash.
    deep = "d" * 64
    _spec(
        crio / "overlay-containers" / deep / "userdata",
        {containers.K8S_NAMESPACE: "x", "io.kubernetes.cri-o.Labels": "[" * 100_000},
    )
    assert containers.lookup(CgroupInfo("crio", deep), src).workload.namespace == "x"
    big = "b" * 64
    p = ctrd / "io.containerd.runtime.v2.task" / "k8s.io" / big
    p.mkdir(parents=True)
    (p / "config.json").write_bytes(b"{" + b" " * (containers.MAX_BODY + 1))
    res = containers.lookup(CgroupInfo("containerd", big), src)
    assert res.workload is None and "larger than" in res.problems[0]


def test_conmon_command_lines():
    """The options podman gives conmon (podman 4.3's, as seen on a running
    container): the id, the name and podman's storage root; the root from
    the bundle when the exit command does not say it."""
    root = "/var/lib/containers/storage"
    bundle = f"{root}/overlay-containers/{ID}/userdata"
    argv = [
        "/usr/bin/conmon", "--api-version", "1", "-c", ID, "-u", ID, "-r", "/usr/bin/runc",
        "-b", bundle, "-p", "/run/containers/storage/pidfile", "-n", "web-1",
        "--exit-dir", "/run/libpod/exits", "--full-attach", "-s",
        "-l", f"k8s-file:{bundle}/ctr.log",
        "--log-level", "warning", "--runtime-arg", "--log-format=json", "--runtime-arg", "--log",
        "--runtime-arg=/run/oci-log", "--conmon-pidfile", "/run/conmon.pid",
        "--exit-command", "/usr/bin/podman", "--exit-command-arg", "--root",
        "--exit-command-arg", "/srv/podman", "--exit-command-arg", "--runroot",
        "--exit-command-arg", "/run/containers/storage", "--exit-command-arg", "container",
        "--exit-command-arg", "cleanup", "--exit-command-arg", ID,
    ]  # fmt: skip
    opts = podman_files.conmon_options(argv)
    assert (opts["cid"], opts["name"], opts["root"]) == (ID, "web-1", "/srv/podman")
    no_exit = [a for a in argv if a not in ("--exit-command-arg", "--root", "/srv/podman")]
    assert podman_files.conmon_options(no_exit)["root"] == root
    long = ["conmon", f"--cid={ID}", "--name", "db", "--bundle", bundle]
    assert podman_files.conmon_options(long) == {
        "cid": ID,
        "name": "db",
        "bundle": bundle,
        "root": root,
    }


def test_bolt_reader_refuses_what_is_not_a_bbolt_file(tmp_path):
    from bpfkeep.boltdb import BoltError, BoltFile

    junk = tmp_path / "junk.db"
    junk.write_bytes(b"\xed\xda\x0c\xed" * 4096)
    with pytest.raises(BoltError, match="no valid meta page"):
        BoltFile(str(junk))
    (tmp_path / "small.db").write_bytes(b"x")
    with pytest.raises(BoltError, match="too small"):
        BoltFile(str(tmp_path / "small.db"))


def test_lookups_retry_until_the_runtime_knows_and_forget_cancelled():
    """The worker asks again (backoff) while no runtime knows the id: a
    container's cgroup appears before the runtime marks it running."""
    asked: list[str] = []

    def ask(info, _sources):
        asked.append(info.id)
        known = asked.count(info.id) >= 3
        return containers.Lookup(_w() if known else None, [])

    lk = containers.Lookups(containers.Sources(), ask)
    try:
        assert lk.submit(1, f"docker/{ID}")
        assert not lk.submit(2, "system.slice/nginx.service")  # not a container
        deadline = time.monotonic() + 30
        got = []
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
            got = lk.results()
        assert [(k, r.workload.name) for k, _, r in got] == [(1, "web-1")]
        assert asked.count(ID) == 3 and lk.pending() == 0
        lk.submit(3, f"docker/{'a' * 64}")  # never known: cancelled when removed
        lk.cancel(lambda _k, rel: rel.startswith("docker/"))
        while lk.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lk.pending() == 0 and lk.results() == []
    finally:
        lk.close()


def test_namespace_aggregation_of_series():
    """workload_labels = "namespace": one series per namespace instead of
    one per container; "none": no workload labels."""
    a, b = "/kubepods/besteffort/poda/x", "/kubepods/besteffort/podb/y"
    wl = {
        a: {"namespace": "shop", "pod": "a", "container": "app"},
        b: {"namespace": "shop", "pod": "b", "container": "app"},
        "/docker/z": {"container": "web-1"},
    }
    rows = [Row(a, Policy(), None), Row(b, Policy(keepidle=30), None)]
    rows.append(Row("/docker/z", Policy(), None))
    rows.append(Row("/system.slice/x.service", Policy(), None))

    def get(mode):
        reg = CollectorRegistry()
        reg.register(Collector(lambda: Snapshot(rows, [], workloads=wl, workload_labels=mode)))
        return reg

    reg = get("container")
    v = reg.get_sample_value
    labels = {"cgroup": a, "mode": "set", "namespace": "shop", "pod": "a", "container": "app"}
    assert v("bpfkeep_policy_attached", labels) == 1
    assert v(
        "bpfkeep_policy_attached", {"cgroup": "/docker/z", "mode": "set", "container": "web-1"}
    )
    assert v("bpfkeep_policy_attached", {"cgroup": "/system.slice/x.service", "mode": "set"})
    reg = get("namespace")
    v = reg.get_sample_value
    assert v("bpfkeep_policy_attached", {"cgroup": "", "mode": "set", "namespace": "shop"}) == 2
    bound = v("bpfkeep_policy_dead_peer_bound_seconds", {"cgroup": "", "namespace": "shop"})
    assert bound == 30 + 15 * 9  # the largest
    assert v("bpfkeep_policy_attached", {"cgroup": a, "mode": "set"}) is None
    reg = get("none")
    assert reg.get_sample_value("bpfkeep_policy_attached", {"cgroup": a, "mode": "set"}) == 1


def test_a_paths_gauges_are_not_summed_per_namespace():
    """Two pods of a namespace learning the same path: its idle limit and
    keepidle per namespace are the largest of theirs, not their sum (a
    keepidle of 25 on a path that forgets after 40 s is not 50 on 80);
    the connections at risk add up."""
    a, b = "/kubepods/besteffort/poda/x", "/kubepods/besteffort/podb/y"
    wl = {
        a: {"namespace": "shop", "pod": "a", "container": "app"},
        b: {"namespace": "shop", "pod": "b", "container": "app"},
    }
    net = "10.1.2.0/24"
    snap = Snapshot(
        [Row(a, Policy(), None), Row(b, Policy(), None)],
        [],
        workloads=wl,
        workload_labels="namespace",
        paths=[PathRow(a, net, 40.0, 20), PathRow(b, net, 30.0, 15)],
        at_risk={(a, net): 2, (b, net): 3},
    )
    reg = CollectorRegistry()
    reg.register(Collector(lambda: snap))
    labels = {"cgroup": "", "peer": net, "namespace": "shop"}
    assert reg.get_sample_value("bpfkeep_peer_idle_limit_seconds", labels) == 40
    assert reg.get_sample_value("bpfkeep_peer_keepidle_seconds", labels) == 20
    assert reg.get_sample_value("bpfkeep_connections_at_risk", labels) == 5


@pytest.mark.kernel
def test_a_stalled_runtime_does_not_hold_up_the_daemon(daemon, cgroups, tmp_path):  # noqa: F811
    """A runtime that accepts and never answers: while the daemon's lookup
    of a container waits on it, a new cgroup is attached (the lookup's
    connection is still open when the attach is logged)."""
    sock = str(tmp_path / "stalled.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock)
    srv.listen(8)
    open_conns: list[socket.socket] = []
    closed = threading.Event()

    def serve():
        with contextlib.suppress(OSError):
            c, _ = srv.accept()
            open_conns.append(c)
            while c.recv(4096):
                pass
            closed.set()  # the daemon gave up on it

    threading.Thread(target=serve, daemon=True).start()
    base = cgroups.rel(cgroups.base)
    port = free_port()
    conf = tmp_path / "c.toml"
    conf.write_text(
        f'[metrics]\nlisten = "127.0.0.1:{port}"\n[daemon]\naudit_interval = 0\n'
        f'[containers]\ndocker_socket = "{sock}"\npodman_socket = ""\n'
        'containerd_root = ""\ncrio_root = ""\ntimeout = 10\n'
        '[[policy]]\ncontainer = "nothing-here"\n'
        f'[[policy]]\ncgroup = "{base}/svc*"\nkeepidle = 5\n'
    )
    d = daemon(conf)
    d.start()
    try:
        cgroups.make(ID)  # looks like a container's cgroup (bare id)
        deadline = time.monotonic() + 30
        while not open_conns and time.monotonic() < deadline:
            time.sleep(0.02)
        assert open_conns, "the daemon never asked the runtime"
        cgroups.make("svc1")
        d.wait_log(f"attached /{base}/svc1", timeout=30)
        assert not closed.is_set()
    finally:
        srv.close()
        for c in open_conns:
            c.close()


# -- real runtimes ----------------------------------------------------------------

PORT = 7000


def runtime_config(path: Path, rt, rules: str, port: int, extra: str = "") -> Path:
    """A daemon config that asks only this test's runtime."""
    docker = rt.socket if rt.name == "docker" else ""
    podman = rt.socket if rt.name == "podman" else ""
    path.write_text(
        f'[metrics]\nlisten = "127.0.0.1:{port}"\n{extra}'
        "[daemon]\naudit_interval = 0\n"
        f'[containers]\ndocker_socket = "{docker}"\npodman_socket = "{podman}"\n'
        # dockerd's own containerd: its bundles have no CRI annotations
        # (they must be left to docker), CRI-O is not here.
        f'containerd_root = "{rt.base}/exec/containerd/daemon"\ncrio_root = ""\n' + rules
    )
    return path


def workload_rule(**keys) -> str:
    body = ""
    for k, v in keys.items():
        if isinstance(v, dict):
            inner = ", ".join(f"{kk} = {json.dumps(vv)}" for kk, vv in v.items())
            body += f"{k} = {{ {inner} }}\n"
        else:
            body += f"{k} = {json.dumps(v) if isinstance(v, str) else v}\n"
    return "[[policy]]\n" + body


def start_server(rt, name: str, **kw) -> int:
    """A container serving every connection on 127.0.0.1:PORT of its own
    network namespace (busybox nc, one cat per connection); clients join
    that namespace with --network=container:NAME.  Returns its pid."""
    argv = rt.run_args(name, "/bin/busybox", "nc", "-ll", "-p", str(PORT), "-e", "/bin/cat", **kw)
    subprocess.run(argv, check=True, capture_output=True, timeout=60)
    pid = rt.pid(name)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        out = nsenter_ss(pid, "-Hltn", f"sport = :{PORT}")
        if f":{PORT}" in out:
            return pid
        time.sleep(0.05)
    raise AssertionError(f"{name}: nothing listens on {PORT}")


def nsenter_ss(pid: int, *args: str) -> str:
    return subprocess.run(
        ["nsenter", "-t", str(pid), "-n", "ss", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def start_client(rt, spawn, name: str, server: str, **kw):
    """A container whose first and only action is the static sockprobe
    connecting to the server; it holds the connection and reports the
    values in force (getsockopt inside the container) per line on stdin."""
    argv = rt.run_args(
        name,
        "/sockprobe", "connect", "127.0.0.1", str(PORT), "hold",
        network=f"container:{server}", interactive=True, **kw,
    )  # fmt: skip
    probe = spawn(argv)
    probe.expect("ready", timeout=60)
    return probe


def settle(probe, keepidle: int, timeout: float = 30) -> dict[str, int]:
    """Ask the client for its values until they show ``keepidle`` (the
    daemon attaches and sweeps asynchronously) or the time is up; the
    last values either way."""
    deadline = time.monotonic() + timeout
    while True:
        probe.send_line()
        v = probe.values("now-client", consume=True)
        if (v["keepidle"] == keepidle and v["keepalive"] == 1) or time.monotonic() > deadline:
            return v
        time.sleep(0.1)


def at_connect(probe) -> dict[str, int]:
    return probe.values("client", timeout=10)


def tag() -> str:
    return uuid.uuid4().hex[:6]


@pytest.mark.kernel
def test_names_and_labels_select_containers(runtime, daemon, tmp_path, spawn, cgroups):  # noqa: F811
    t = tag()
    port = free_port()
    rules = workload_rule(container=f"bk-web-{t}*", keepidle=7, keepintvl=3, keepcnt=4)
    rules += workload_rule(labels={"tier": f"db-{t}"}, keepidle=11, keepintvl=3, keepcnt=4)
    d = daemon(runtime_config(tmp_path / "c.toml", runtime, rules, port))
    d.start()
    srv = f"bk-srv-{t}"
    start_server(runtime, srv)
    # Those that must get nothing first: the daemon asks the runtime in order.
    plain = start_client(runtime, spawn, f"bk-plain-{t}", srv)
    wrong = start_client(runtime, spawn, f"bk-wl-{t}", srv, labels={"tier": "web"})
    web = start_client(runtime, spawn, f"bk-web-{t}-1", srv)
    db = start_client(runtime, spawn, f"bk-db-{t}", srv, labels={"tier": f"db-{t}", "x": "y"})

    v = settle(web, 7)
    assert (v["keepalive"], v["keepidle"], v["keepintvl"], v["keepcnt"]) == (1, 7, 3, 4)
    assert v["user_timeout"] == (7 + 3 * 4) * 1000
    v = settle(db, 11)
    assert (v["keepalive"], v["keepidle"], v["keepintvl"], v["keepcnt"]) == (1, 11, 3, 4)
    for probe, name in ((plain, f"bk-plain-{t}"), (wrong, f"bk-wl-{t}")):
        probe.send_line()
        v = probe.values("now-client", consume=True)
        assert v["keepalive"] == 0 and v["keepidle"] == 7200, name
        cg = os.path.join(cgroups.mount, runtime.cgroup(name))
        assert bpftool_prog_ids(cg, "sock_ops") == [], name
    # From outside: ss in the containers' network namespace shows the
    # keepalive timer armed on the web client's socket (its peer port).
    pid = runtime.pid(f"bk-web-{t}-1")
    out = nsenter_ss(pid, "-tinoH", "state", "established", f"( dport = :{PORT} )")
    assert "timer:(keepalive" in out, out
    log = d.log.read_text()
    web_rel = runtime.cgroup(f"bk-web-{t}-1")
    assert web_rel in log
    assert runtime.cgroup(f"bk-plain-{t}") not in log

    # A restart adopts the attachment and keeps it while the runtime is
    # asked again: never detached, never attached anew.
    assert d.stop() == 0
    d2 = daemon(d.config)
    d2.start()
    d2.wait_log(f"container bk-web-{t}-1 ({runtime.name}, /{web_rel}): policy[0]", timeout=30)
    log = d2.log.read_text()
    assert "detached" not in log and f"attached /{web_rel}" not in log, log
    web.send_line()
    assert web.values("now-client", consume=True)["keepidle"] == 7


@pytest.mark.kernel
def test_pod_rule_selects_kubelet_labelled_containers_and_metrics_name_them(
    runtime,
    daemon,  # noqa: F811
    tmp_path,
    spawn,
):
    """No kubelet can run here: containers get the kubelet's labels and
    the cgroupfs driver's kubepods/<qos>/pod<uid>/ parent, as the kubelet
    makes them."""
    t = tag()
    ns = f"bk-{t}"
    port = free_port()
    rules = workload_rule(pod=f"{ns}/api-*/app", keepidle=9, keepintvl=2, keepcnt=3)
    d = daemon(runtime_config(tmp_path / "c.toml", runtime, rules, port))
    d.start()
    parent = f"/kubepods/besteffort/pod{uuid.uuid4()}"

    def kubelet(pod_ns, pod, ctr):
        return {
            containers.K8S_NAMESPACE: pod_ns,
            containers.K8S_POD: pod,
            containers.K8S_CONTAINER: ctr,
        }

    srv = f"bk-pause-{t}"
    start_server(runtime, srv, labels=kubelet(ns, "api-1", "POD"), cgroup_parent=parent)
    side = start_client(
        runtime, spawn, f"bk-side-{t}", srv,
        labels=kubelet(ns, "api-1", "sidecar"), cgroup_parent=parent,
    )  # fmt: skip
    other = start_client(
        runtime, spawn, f"bk-other-{t}", srv,
        labels=kubelet(f"other-{t}", "api-1", "app"), cgroup_parent=parent,
    )  # fmt: skip
    app = start_client(
        runtime, spawn, f"bk-app-{t}", srv,
        labels=kubelet(ns, "api-1", "app"), cgroup_parent=parent,
    )  # fmt: skip
    rel = runtime.cgroup(f"bk-app-{t}")
    assert rel.startswith(parent.strip("/") + "/")
    assert containers.parse(rel).pod_uid == parent.rpartition("pod")[2]
    v = settle(app, 9)
    assert (v["keepalive"], v["keepidle"], v["keepintvl"], v["keepcnt"]) == (1, 9, 2, 3)
    for probe in (side, other):
        probe.send_line()
        v = probe.values("now-client", consume=True)
        assert v["keepalive"] == 0 and v["keepidle"] == 7200

    # The series name the workload, as Prometheus scrapes them ...
    labels = {"cgroup": "/" + rel, "namespace": ns, "pod": "api-1", "container": "app"}
    m = scrape(port)
    key = ("bpfkeep_policy_attached", tuple(sorted({**labels, "mode": "set"}.items())))
    assert m.get(key) == 1, sorted(k for k in m if k[0] == "bpfkeep_policy_attached")
    sockets = [k for k in m if k[0] == "bpfkeep_sockets_total" and ("cgroup", "/" + rel) in k[1]]
    assert sockets and all(("namespace", ns) in k[1] for k in sockets)
    # ... and go with the container.
    runtime.remove(f"bk-app-{t}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = [k for k in scrape(port) if ("cgroup", "/" + rel) in k[1]]
        if not left:
            break
        time.sleep(0.2)
    assert not left
    d.wait_log(f"cgroup /{rel} removed; forgetting it")


@pytest.mark.kernel
def test_container_started_while_the_daemon_runs_is_covered_from_its_first_connection(
    runtime,
    daemon,  # noqa: F811
    tmp_path,
    spawn,
):
    """The no-gap bar: a static client whose first action in a new
    matching container is to connect ends with the policy, every time --
    by the callbacks when the daemon attached first, else by the sweep
    right after the attach."""
    t = tag()
    port = free_port()
    rules = workload_rule(container=f"bk-new-{t}-*", keepidle=5, keepintvl=2, keepcnt=3)
    d = daemon(runtime_config(tmp_path / "c.toml", runtime, rules, port))
    d.start()
    srv = f"bk-srv-{t}"
    start_server(runtime, srv)
    n, by_callback = 8, 0
    for i in range(n):
        probe = start_client(runtime, spawn, f"bk-new-{t}-{i}", srv)
        by_callback += at_connect(probe)["keepidle"] == 5
        v = settle(probe, 5)
        assert (v["keepalive"], v["keepidle"], v["keepintvl"], v["keepcnt"]) == (1, 5, 2, 3), i
        probe.close()
        runtime.remove(f"bk-new-{t}-{i}")
    print(
        f"{runtime.name}: {n}/{n} covered, {by_callback} at connect, {n - by_callback} by the sweep"
    )


@pytest.mark.kernel
def test_first_rule_in_the_file_wins_between_cgroup_and_workload_rules(
    runtime,
    daemon,  # noqa: F811
    tmp_path,
    spawn,
):
    """A container matched by a cgroup rule and a workload rule gets the
    rule that comes first in the file; a reload that swaps them updates
    its sockets.  (A custom --cgroup-parent is watched through the cgroup
    rule.)"""
    t = tag()
    port = free_port()
    parent = f"/bk-prec-{t}"
    wl = workload_rule(container=f"bk-pw-{t}", keepidle=7)
    cg = f'[[policy]]\ncgroup = "bk-prec-{t}/*"\nkeepidle = 13\n'
    conf = runtime_config(tmp_path / "c.toml", runtime, wl + cg, port)
    d = daemon(conf)
    d.start()
    srv = f"bk-srv-{t}"
    start_server(runtime, srv)
    named = start_client(runtime, spawn, f"bk-pw-{t}", srv, cgroup_parent=parent)
    plain = start_client(runtime, spawn, f"bk-pp-{t}", srv, cgroup_parent=parent)
    assert settle(named, 7)["keepidle"] == 7
    assert settle(plain, 13)["keepidle"] == 13
    runtime_config(conf, runtime, cg + wl, port)
    d.signal(1)  # SIGHUP
    d.wait_log("reloaded")
    assert settle(named, 13)["keepidle"] == 13
    assert settle(plain, 13)["keepidle"] == 13


@pytest.mark.kernel
def test_attach_and_detach_by_container_and_pod_name(runtime, bk, tmp_path, spawn):
    t = tag()
    conf = runtime_config(tmp_path / "c.toml", runtime, "", free_port())
    parent = f"/kubepods/burstable/pod{uuid.uuid4()}"
    labels = {
        containers.K8S_NAMESPACE: f"bk-{t}",
        containers.K8S_POD: "db-0",
        containers.K8S_CONTAINER: "pg",
    }
    srv = f"bk-srv-{t}"
    start_server(runtime, srv)
    probe = start_client(runtime, spawn, f"bk-c-{t}", srv, labels=labels, cgroup_parent=parent)
    rel = runtime.cgroup(f"bk-c-{t}")

    out = bk("attach", "--container", f"bk-c-{t}", "--config", str(conf), "--keepidle", "21")
    assert f"attached /{rel}:" in out.stdout
    assert settle(probe, 21)["keepidle"] == 21  # the sweep: it was connected already
    out = bk("detach", "--container", f"bk-c-{t}", "--config", str(conf))
    assert f"detached /{rel}" in out.stdout
    # The pod: its pod cgroup, which holds all its containers.
    out = bk("attach", "--pod", f"bk-{t}/db-0", "--config", str(conf), "--keepidle", "22")
    assert f"attached {parent}:" in out.stdout
    assert settle(probe, 22)["keepidle"] == 22
    out = bk("attach", "--pod", f"bk-{t}/db-0/pg", "--config", str(conf), "--keepidle", "23")
    assert f"attached /{rel}:" in out.stdout
    assert settle(probe, 23)["keepidle"] == 23

    missing = bk("attach", "--container", f"bk-none-{t}", "--config", str(conf), check=False)
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.count("\n") == 1 and "no running container" in missing.stderr
    down = tmp_path / "down.toml"
    down.write_text(f'[containers]\n{runtime.name}_socket = "{tmp_path}/nothing.sock"\n')
    unreachable = bk("attach", "--container", f"bk-c-{t}", "--config", str(down), check=False)
    if runtime.name == "podman":
        # Nothing on podman's socket: its files tell (bpfkeep.podman).
        assert unreachable.returncode == 0, unreachable.stderr
        assert f"updated /{rel}:" in unreachable.stdout  # attached above
        return
    assert unreachable.returncode == 69, unreachable.stderr
    assert "could not ask" in unreachable.stderr and "nothing.sock" in unreachable.stderr
    assert unreachable.stderr.count("\n") == 1


@pytest.mark.kernel
def test_podman_without_its_api_service_default_storage(
    podman_default_rt,
    daemon,  # noqa: F811
    tmp_path,
    spawn,
    cgroups,
):
    """podman as it comes: its default storage, and no API service (no
    daemon; nothing listens on the socket the config names).  The daemon
    finds the name from the container's conmon and the labels from
    podman's database, attaches, and the policy shows in getsockopt inside
    the container and in ss from its network namespace."""
    rt = podman_default_rt
    assert not os.path.exists(rt.socket)
    t = tag()
    port = free_port()
    rules = workload_rule(container=f"bk-web-{t}-*", keepidle=7, keepintvl=3, keepcnt=4)
    rules += workload_rule(labels={"tier": f"db-{t}"}, keepidle=11, keepintvl=3, keepcnt=4)
    d = daemon(runtime_config(tmp_path / "c.toml", rt, rules, port))
    d.start()
    srv = f"bk-srv-{t}"
    start_server(rt, srv)
    plain = start_client(rt, spawn, f"bk-plain-{t}", srv, labels={"tier": "web"})
    web = start_client(rt, spawn, f"bk-web-{t}-1", srv)
    db = start_client(rt, spawn, f"bk-db-{t}", srv, labels={"tier": f"db-{t}", "x": "y"})

    v = settle(web, 7)
    assert (v["keepalive"], v["keepidle"], v["keepintvl"], v["keepcnt"]) == (1, 7, 3, 4)
    v = settle(db, 11)
    assert (v["keepalive"], v["keepidle"], v["keepintvl"], v["keepcnt"]) == (1, 11, 3, 4)
    plain.send_line()
    v = plain.values("now-client", consume=True)
    assert v["keepalive"] == 0 and v["keepidle"] == 7200
    assert (
        bpftool_prog_ids(os.path.join(cgroups.mount, rt.cgroup(f"bk-plain-{t}")), "sock_ops") == []
    )
    out = nsenter_ss(
        rt.pid(f"bk-web-{t}-1"), "-tinoH", "state", "established", f"( dport = :{PORT} )"
    )
    assert "timer:(keepalive" in out, out
    web_rel, db_rel = rt.cgroup(f"bk-web-{t}-1"), rt.cgroup(f"bk-db-{t}")
    d.wait_log(f"container bk-web-{t}-1 (podman, /{web_rel}): policy[0]")
    d.wait_log(f"container bk-db-{t} (podman, /{db_rel}): policy[1]")
    d.wait_log("podman's API is not served")
    log = d.log.read_text()
    assert "cannot be asked" not in log and "not found by any runtime" not in log, log
    # What was read agrees with podman inspect, and the metrics name it.
    inspect = json.loads(rt("inspect", f"bk-db-{t}").stdout)[0]
    cid = inspect["Id"]
    found = podman_files.identify(os.path.join(cgroups.mount, db_rel), cid)
    assert (found.name, found.labels) == (inspect["Name"], inspect["Config"]["Labels"])
    assert found.db == "/var/lib/containers/storage/libpod/bolt_state.db"
    m = scrape(port)
    key = (("cgroup", "/" + web_rel), ("container", f"bk-web-{t}-1"), ("mode", "set"))
    assert m.get(("bpfkeep_policy_attached", key)) == 1


@pytest.mark.kernel
def test_a_runtime_that_cannot_be_asked_is_one_warning_and_a_count(
    podman_default_rt,
    daemon,  # noqa: F811
    tmp_path,
):
    """No API service, and podman's files out of reach: the daemon in a
    PID namespace of its own (as a pod without hostPID) sees no conmon.
    One warning naming the fix, however many containers; the metric
    counts them."""
    if not shutil.which("unshare"):
        pytest.skip("unshare (util-linux) is missing")
    rt = podman_default_rt
    t = tag()
    port = free_port()
    rules = workload_rule(container=f"bk-web-{t}-*", keepidle=7)
    d = daemon(runtime_config(tmp_path / "c.toml", rt, rules, port))
    d.start(prefix=("unshare", "--pid", "--fork", "--kill-child", "--mount-proc"))
    srv = f"bk-srv-{t}"
    start_server(rt, srv)
    for i in range(2):
        subprocess.run(
            rt.run_args(f"bk-web-{t}-{i}", "/bin/sleep", "600"), check=True,
            capture_output=True, timeout=60,
        )  # fmt: skip
    # At least these 3 (other podman containers on this host count too).
    deadline = time.monotonic() + 30
    while (unidentified := scrape(port).get(("bpfkeep_containers_unidentified", ()), 0)) < 3:
        assert time.monotonic() < deadline, unidentified
        time.sleep(0.2)
    line = d.wait_log("podman cannot be asked")
    print(line)
    assert "systemctl enable --now podman.socket" in line and rt.socket in line, line
    assert "not identified" in line
    log = d.log.read_text()
    assert log.count("cannot be asked") == 1, log
    assert "attached" not in log, log


@pytest.fixture()
def containerd_k8s(docker_rt):
    """The containerd dockerd runs (its socket under the exec root), in the
    namespace the CRI plugin uses (k8s.io), with the test image imported
    from docker.  Tasks made here are killed and removed after the test:
    their shims outlive containerd."""
    import shutil

    ctr = shutil.which("ctr")
    if not ctr:
        pytest.skip("ctr (containerd) is not installed (docker.io brings it)")
    sock = f"{docker_rt.base}/exec/containerd/containerd.sock"
    base = [ctr, "-a", sock, "-n", "k8s.io"]
    save = subprocess.Popen([*docker_rt.cli, "save", IMAGE], stdout=subprocess.PIPE)
    subprocess.run([*base, "images", "import", "-"], stdin=save.stdout, check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    save.stdout.close()
    assert save.wait() == 0
    image = subprocess.run(
        [*base, "images", "ls", "-q"], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    made: list[str] = []
    parents: list[str] = []

    def run_args(cid: str, cgroup: str, annotations: dict[str, str], netns: str, *cmd: str):
        made.append(cid)
        parents.extend(
            p for p in cgroup_dirs_to_make(cgroup.rpartition("/")[0]) if p not in parents
        )
        ann = [a for k, v in annotations.items() for a in ("--annotation", f"{k}={v}")]
        return [
            *base, "run", "--rm", *ann, "--cgroup", cgroup,
            "--with-ns", f"network:{netns}", image, cid, *cmd,
        ]  # fmt: skip

    yield run_args
    for cid in made:
        subprocess.run([*base, "task", "kill", "-s", "SIGKILL", cid], capture_output=True)
        for _ in range(50):  # the task goes once its process is reaped
            if subprocess.run([*base, "task", "rm", "-f", cid], capture_output=True).returncode:
                break
            time.sleep(0.1)
        subprocess.run([*base, "container", "rm", cid], capture_output=True)
    subprocess.run([*base, "images", "rm", image], capture_output=True)
    for p in sorted(parents, key=lambda p: -p.count("/")):
        remove_cgroup_everywhere(p)


@pytest.mark.kernel
def test_containerd_cri_annotations_select_pods(docker_rt, containerd_k8s, daemon, tmp_path, spawn):  # noqa: F811
    """containerd without its gRPC API: the task's OCI bundle, which
    containerd (here dockerd's own, 1.6) writes under its state directory
    before the cgroup exists, with the annotations containerd's CRI plugin
    sets on a pod's containers (set here with ctr run --annotation: no
    kubelet can run here), in the kubelet's cgroupfs layout."""
    t = tag()
    ns = f"bk-{t}"
    port = free_port()
    rules = workload_rule(pod=f"{ns}/api-*/app", keepidle=6, keepintvl=2, keepcnt=3)
    per_ns = 'workload_labels = "namespace"\n'
    d = daemon(runtime_config(tmp_path / "c.toml", docker_rt, rules, port, per_ns))
    d.start()
    srv = f"bk-srv-{t}"
    try:
        pid = start_server(docker_rt, srv)
        cid = uuid.uuid4().hex + uuid.uuid4().hex  # 64 hex digits, as CRI's ids
        cgroup = f"/kubepods/besteffort/pod{uuid.uuid4()}/{cid}"
        annotations = {
            containers.CRI_NAMESPACE: ns,
            containers.CRI_POD: "api-1",
            containers.CRI_CONTAINER: "app",
        }
        probe = spawn(containerd_k8s(
            cid, cgroup, annotations, f"/proc/{pid}/ns/net",
            "/sockprobe", "connect", "127.0.0.1", str(PORT), "hold",
        ))  # fmt: skip
        probe.expect("ready", timeout=60)
        v = settle(probe, 6)
        assert (v["keepalive"], v["keepidle"], v["keepintvl"], v["keepcnt"]) == (1, 6, 2, 3)
        d.wait_log(f"container app (containerd, {cgroup}): policy[0]")
        bundle = Path(docker_rt.base, "exec/containerd/daemon/io.containerd.runtime.v2.task/k8s.io")
        spec = json.loads((bundle / cid / "config.json").read_text())
        assert spec["linux"]["cgroupsPath"] == cgroup
        # workload_labels = "namespace": one series for the namespace.
        m = scrape(port)
        key = (("cgroup", ""), ("mode", "set"), ("namespace", ns))
        assert m.get(("bpfkeep_policy_attached", key)) == 1
        assert not [k for k in m if ("cgroup", cgroup) in k[1]]
    finally:
        docker_rt.cleanup_test()


@pytest.mark.kernel
def test_asking_the_runtimes_under_the_units_capabilities(
    docker_rt, containerd_k8s, pin_dir, tmp_path, spawn
):
    """The daemon with only deploy/bpfkeep.service's capabilities (no
    CAP_DAC_OVERRIDE) asks docker over its socket and reads containerd's
    bundles: both selected containers get the policy."""
    from test_privileges import BPFKEEP, as_unit

    t = tag()
    port = free_port()
    rules = workload_rule(container=f"bk-cap-{t}", keepidle=8)
    rules += workload_rule(pod=f"bk-{t}/api-1", keepidle=9)
    conf = runtime_config(tmp_path / "c.toml", docker_rt, rules, port)
    conf.chmod(0o600)
    log = tmp_path / "daemon.log"
    srv = f"bk-srv-{t}"
    try:
        pid = start_server(docker_rt, srv)
        with open(log, "w") as err:
            proc = subprocess.Popen(
                as_unit([*BPFKEEP, "--pin-dir", pin_dir, "daemon", "--config", str(conf)]),
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        try:
            deadline = time.monotonic() + 60
            while "enforcing" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            by_name = start_client(docker_rt, spawn, f"bk-cap-{t}", srv)
            cid = uuid.uuid4().hex + uuid.uuid4().hex
            annotations = {
                containers.CRI_NAMESPACE: f"bk-{t}",
                containers.CRI_POD: "api-1",
                containers.CRI_CONTAINER: "app",
            }
            by_pod = spawn(containerd_k8s(
                cid, f"/kubepods/besteffort/pod{uuid.uuid4()}/{cid}", annotations,
                f"/proc/{pid}/ns/net", "/sockprobe", "connect", "127.0.0.1", str(PORT), "hold",
            ))  # fmt: skip
            by_pod.expect("ready", timeout=60)
            assert settle(by_name, 8)["keepidle"] == 8, log.read_text()
            assert settle(by_pod, 9)["keepidle"] == 9, log.read_text()
            assert "Traceback" not in log.read_text() and "could not" not in log.read_text()
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    finally:
        docker_rt.cleanup_test()
