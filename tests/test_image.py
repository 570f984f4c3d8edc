"""The container image and the Kubernetes manifests.

- deploy/kubernetes/ parses, holds the kinds it should, and its DaemonSet
  asks for exactly the capabilities the container test below ran with
  (the systemd unit's set, tested on the host in tests/test_privileges.py).
- The image (scripts/build-image.sh: Debian packages only, no registry)
  builds here, and the daemon running in it under podman with exactly the
  DaemonSet's capabilities, host namespaces and mounts -- read from
  deploy/kubernetes/daemonset.yaml, not --privileged -- enforces keepalive
  on another container's sockets (the ones already open, through the
  sweep, and new ones), read back through getsockopt inside that
  container and ``ss`` in its network namespace, and is ready by its
  readiness probe.
"""

from __future__ import annotations

import os
import re
import subprocess
import tarfile
import tomllib
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import BPFKEEP, REPO, remove_pin_dir
from test_enforcer import assert_policy, assert_untouched

from bpfkeep import __version__
from bpfkeep.kernel.cgroups import cgroup2_mount

K8S = REPO / "deploy" / "kubernetes"
UNIT = REPO / "deploy" / "bpfkeep.service"


# -- the manifests --------------------------------------------------------------


def manifests() -> dict[str, dict]:
    """kind -> the one object of that kind, from every file kustomization.yaml lists."""
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    out: dict[str, dict] = {}
    for name in kust["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            assert doc["kind"] not in out, f"two {doc['kind']}s"
            out[doc["kind"]] = doc
    return out


def daemonset() -> tuple[dict, dict]:
    """(pod spec, the bpfkeep container) of the DaemonSet."""
    pod = manifests()["DaemonSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def unit_capabilities() -> set[str]:
    for line in UNIT.read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            return set(line.split("=", 1)[1].split())
    raise AssertionError("the unit names no CapabilityBoundingSet")


def test_manifests_parse_and_hold_what_a_cluster_needs():
    m = manifests()
    assert set(m) == {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "DaemonSet",
        "Service",
        "ServiceMonitor",
    }
    ns = m["Namespace"]["metadata"]["name"]
    for kind, obj in m.items():
        if kind != "Namespace":
            assert obj["metadata"]["namespace"] == ns, kind
    ds = m["DaemonSet"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert m["Service"]["spec"]["selector"].items() <= labels.items()
    assert m["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items() <= (
        m["Service"]["metadata"]["labels"].items()
    )
    pod, c = daemonset()
    assert {"operator": "Exists"} in pod["tolerations"]  # every node
    assert pod["automountServiceAccountToken"] is False
    assert c["image"] == f"localhost/bpfkeep:{__version__}"  # what build-image.sh tags
    assert c["imagePullPolicy"] == "Never"
    # The probe asks the daemon's own listener, at the port the config gives.
    (port,) = c["ports"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": port["name"]}
    cfg = tomllib.loads(m["ConfigMap"]["data"]["bpfkeep.toml"])
    assert cfg["metrics"]["listen"] == f"0.0.0.0:{port['containerPort']}"
    svc_port = m["Service"]["spec"]["ports"][0]
    assert svc_port["targetPort"] == port["name"]
    assert m["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == svc_port["name"]
    # The workload series carry namespace/pod/container of the workload
    # they count: the operator must not overwrite them with bpfkeep's own.
    assert m["ServiceMonitor"]["spec"]["endpoints"][0].get("honorLabels") is True
    # Workloads are chosen by the documented keys.
    keys = {k for rule in cfg["policy"] for k in rule}
    assert {"pod", "labels", "container"} <= keys
    assert any(re.fullmatch(r"[^/]+/.+", r.get("pod", "")) for r in cfg["policy"])


def test_manifests_match_the_kubernetes_api():
    """Every built-in object survives a round trip through the Kubernetes
    client's API models (Debian's python3-kubernetes): a misspelt or
    misplaced field is dropped on the way in, and the round trip differs.
    (The ServiceMonitor is a CRD of the Prometheus Operator: checked above.)"""
    try:
        from kubernetes.client import ApiClient
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("python3-kubernetes is missing: scripts/setup.sh installs it")
    client = ApiClient()
    for kind, obj in manifests().items():
        if kind == "ServiceMonitor":
            continue
        assert obj["apiVersion"] in ("v1", "apps/v1"), kind
        model = client._ApiClient__deserialize(obj, f"V1{kind}")  # what the client reads
        assert client.sanitize_for_serialization(model) == obj, kind


def test_daemonset_capabilities_are_the_tested_set():
    """The DaemonSet adds the unit's capabilities (tested on the host) and
    nothing else; test_daemon_in_a_container_enforces_on_another_container
    runs with exactly this list."""
    _pod, c = daemonset()
    sc = c["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    added = {"CAP_" + cap for cap in sc["capabilities"]["add"]}
    assert added == unit_capabilities()
    assert added == {
        "CAP_BPF",
        "CAP_PERFMON",
        "CAP_NET_ADMIN",
        "CAP_SYS_ADMIN",
        "CAP_SYS_PTRACE",
        "CAP_DAC_READ_SEARCH",
    }
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    # Every capability is explained in the manifest, next to the list.
    text = (K8S / "daemonset.yaml").read_text()
    for cap in sc["capabilities"]["add"]:
        line = next(ln for ln in text.splitlines() if ln.strip() == f"- {cap}")
        before = text[: text.index(line)].rsplit("add:", 1)[1]
        assert "#" in before, f"{cap} has no comment"


@pytest.mark.kernel
def test_configmap_policy_file_passes_the_daemons_check(tmp_path):
    cfg = tmp_path / "bpfkeep.toml"
    cfg.write_text(manifests()["ConfigMap"]["data"]["bpfkeep.toml"])
    cfg.chmod(0o644)  # as kubelet writes a ConfigMap's files
    proc = subprocess.run(
        [BPFKEEP, "daemon", "--config", str(cfg), "--check"], capture_output=True, text=True
    )
    if re.search(r"\.(pod|labels|container): unknown key", proc.stderr):
        pytest.skip("this bpfkeep does not know the container selectors yet: " + proc.stderr)
    assert proc.returncode == 0, proc.stderr


# -- the image, running ---------------------------------------------------------


def configmap_dir(root: Path, text: str) -> Path:
    """A directory laid out as kubelet mounts a ConfigMap: the file is a
    symlink through ..data to a timestamped directory."""
    data = root / "..2026_01_01_00_00_00.000000000"
    data.mkdir(parents=True)
    (data / "bpfkeep.toml").write_text(text)
    (data / "bpfkeep.toml").chmod(0o644)
    (root / "..data").symlink_to(data.name)
    (root / "bpfkeep.toml").symlink_to("..data/bpfkeep.toml")
    return root


def podman_args(config_dir: Path, *, host_pid: bool | None = None) -> tuple[list[str], list[str]]:
    """podman run options for the DaemonSet's pod, and the mounts left out.

    Capabilities, privilege escalation, the read-only root, hostPID and the
    volume mounts come from the manifest.  The pod's own network namespace
    is --network=none (loopback only: the test reaches the listener inside
    it, as kubelet reaches the pod's address).  Host paths that do not
    exist here (the containerd socket) are left out and reported.
    ``host_pid`` overrides the manifest's hostPID (to show why it is on)."""
    pod, c = daemonset()
    sc = c["securityContext"]
    args = ["--cap-drop=all", *(f"--cap-add=CAP_{cap}" for cap in sc["capabilities"]["add"])]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"  # podman's default profile
    if not sc["allowPrivilegeEscalation"]:
        args.append("--security-opt=no-new-privileges")
    if sc["readOnlyRootFilesystem"]:
        args += ["--read-only", "--read-only-tmpfs=false"]  # kubelet adds no tmpfs
    if pod["hostPID"] if host_pid is None else host_pid:
        args.append("--pid=host")
    assert pod["hostNetwork"] is False
    args.append("--network=none")
    volumes = {v["name"]: v for v in pod["volumes"]}
    skipped = []
    for m in c["volumeMounts"]:
        v = volumes[m["name"]]
        opts = []
        if m.get("readOnly"):
            opts.append("ro")
        if m.get("mountPropagation") == "HostToContainer":
            opts.append("rslave")
        if "configMap" in v:
            src = str(config_dir)
        else:
            src = v["hostPath"]["path"]
            if src == "/sys/fs/cgroup":
                src = cgroup2_mount()  # /sys/fs/cgroup/unified on a hybrid host
            if not os.path.exists(src) and v["hostPath"]["type"] == "DirectoryOrCreate":
                os.makedirs(src, mode=0o755)  # as kubelet does
            if not os.path.exists(src):
                assert v["hostPath"]["type"] == "Socket", src
                skipped.append(src)
                continue
        args.append(f"--volume={src}:{m['mountPath']}" + (":" + ",".join(opts) if opts else ""))
    return args, skipped


@pytest.fixture()
def image_pin_dir(bpffs, podman):
    """A pin directory of its own for the daemon in the container (never
    the host's /sys/fs/bpf/bpfkeep); everything under it detached at the
    end -- after the containers are gone, or the daemon would restore it."""
    d = os.path.join(bpffs, f"bpfkeep-test-img-{uuid.uuid4().hex[:8]}")
    yield d
    podman.cleanup()
    remove_pin_dir(d)


def in_netns(pid: int, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", *argv], capture_output=True, text=True, timeout=30
    )


def http_get(pid: int, url: str) -> tuple[int, str]:
    """A real HTTP request from inside the network namespace of ``pid``."""
    proc = in_netns(pid, "curl", "-s", "-m", "10", "-w", "\n%{http_code}", url)
    body, _, code = proc.stdout.rpartition("\n")
    return int(code or 0), body


def workload_image(podman, probes, tmp_path: Path) -> str:
    """An image holding only the static sockprobe (no base image)."""
    tar = tmp_path / "workload.tar"
    with tarfile.open(tar, "w") as t:
        t.add(probes["static"], arcname="sockprobe")
    return podman.import_tar(str(tar), f"localhost/bpfkeep-test-wl-{uuid.uuid4().hex[:8]}:latest")


def container_cgroup(pid: int) -> str:
    """The container's cgroup v2 path relative to the mount, as the host sees it."""
    with open(f"/proc/{pid}/cgroup") as f:
        for ln in f:
            if ln.startswith("0::"):
                return ln[3:].strip().lstrip("/")
    raise AssertionError(f"process {pid} has no cgroup v2 line")


def memory_peak(pid: int) -> int | None:
    """Peak memory of the container of ``pid`` in bytes (cgroup v2
    memory.peak, or v1 memory.max_usage_in_bytes on a hybrid host)."""
    with open(f"/proc/{pid}/cgroup") as f:
        lines = [ln.strip().split(":", 2) for ln in f]
    for _, ctrl, path in lines:
        if ctrl == "" and os.path.exists(p := f"{cgroup2_mount()}{path}/memory.peak"):
            return int(Path(p).read_text())
        if "memory" in ctrl.split(","):
            p = f"/sys/fs/cgroup/memory{path}/memory.max_usage_in_bytes"
            if os.path.exists(p):
                return int(Path(p).read_text())
    return None


def run_workload(podman, spawn, probes, tmp_path):
    """A container (its own network namespace, loopback only) with a
    static server and one connection to it, made before any policy."""
    image = workload_image(podman, probes, tmp_path)
    wl = podman.name("wl")
    listen = ["/sockprobe", "listen", "127.0.0.1", "0", "hold"]
    srv = spawn(podman.run_argv(wl, "-i", "--network=none", image, *listen))
    port = srv.expect("ready", timeout=60).split()[1]
    old = spawn(["podman", "exec", "-i", wl, "/sockprobe", "connect", "127.0.0.1", port, "hold"])
    assert_untouched(old.values("client", timeout=60))
    return wl, port, old


def start_daemon(podman, spawn, image, pin_dir, tmp_path, cgroup, *, host_pid=None):
    cfg = configmap_dir(
        tmp_path / "configmap",
        # audit_interval = 1: the periodic audit sweeps, then publishes
        # bpfkeep_audit_sockets; see swept().
        '[metrics]\nlisten = "0.0.0.0:9977"\n[daemon]\naudit_interval = 1\n\n'
        f'[[policy]]\ncgroup = "{cgroup}"\n'
        "keepidle = 31\nkeepintvl = 7\nkeepcnt = 4\nuser_timeout = 12345\n",
    )
    args, skipped = podman_args(cfg, host_pid=host_pid)
    assert skipped in ([], ["/run/containerd/containerd.sock"]), skipped
    name = podman.name("daemon")
    _pod, c = daemonset()
    proc = spawn(
        podman.run_argv(name, *args, "-e", f"BPFKEEP_PIN_DIR={pin_dir}", image, *c["args"])
    )
    return name, proc


def wait_ready(podman, name: str, proc) -> int:
    """The daemon container's PID once GET /ready answers 200 (kubelet's
    probe, from inside the pod's network namespace)."""
    import time

    deadline = time.monotonic() + 120
    seen = []
    while True:
        assert proc.proc.poll() is None, f"the daemon exited: {proc.proc.stderr.read()}"
        try:
            pid = podman.pid(name)
        except subprocess.CalledProcessError:
            pid = 0  # not started yet
        if pid:
            code, body = http_get(pid, "http://127.0.0.1:9977/ready")
            seen.append(code)
            if code == 200:
                assert body == "ready\n"
                return pid
        assert time.monotonic() < deadline, f"never ready: {seen[-5:]}"
        time.sleep(0.2)


def swept(pid: int, cgroup: str) -> str:
    """The daemon's metrics once a sweep of ``cgroup`` has certainly run:
    the periodic audit sweeps first and then publishes
    bpfkeep_audit_sockets for every attached cgroup."""
    import time

    deadline = time.monotonic() + 60
    needle = f'bpfkeep_audit_sockets{{cgroup="/{cgroup}",keepalive="armed"}}'
    while True:
        code, metrics = http_get(pid, "http://127.0.0.1:9977/metrics")
        if code == 200 and needle in metrics:
            return metrics
        assert time.monotonic() < deadline, metrics
        time.sleep(0.2)


@pytest.mark.kernel
def test_daemon_in_a_container_enforces_on_another_container(
    podman, daemon_image, image_pin_dir, spawn, probes, tmp_path
):
    wl, port, old = run_workload(podman, spawn, probes, tmp_path)
    wl_pid = podman.pid(wl)
    cgroup = container_cgroup(wl_pid)
    assert cgroup.startswith("libpod_parent/libpod-"), cgroup

    name, daemon = start_daemon(podman, spawn, daemon_image, image_pin_dir, tmp_path, cgroup)
    pid = wait_ready(podman, name, daemon)
    metrics = swept(pid, cgroup)

    # The connection opened before the policy: swept, read back through
    # getsockopt inside the workload container.
    old.send_line()
    assert_policy(old.values("now-client"))
    # A new connection: sock_ops, from its first packet.
    new = spawn(["podman", "exec", "-i", wl, "/sockprobe", "connect", "127.0.0.1", port, "hold"])
    assert_policy(new.values("client", timeout=60))
    # And from outside, in the workload's network namespace: every
    # established socket on the port has its keepalive timer armed.
    ss = in_netns(wl_pid, "ss", "-tinoH", "state", "established")
    timers = [ln for ln in ss.stdout.splitlines() if f":{port} " in ln + " "]
    assert len(timers) == 4, ss.stdout  # two connections, both ends
    assert all("timer:(keepalive," in ln for ln in timers), ss.stdout

    assert f'bpfkeep_policy_attached{{cgroup="/{cgroup}",mode="set"}} 1.0' in metrics
    # The pins are the host's: they outlive the container.
    assert os.listdir(os.path.join(image_pin_dir, "links"))

    rss = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[1]) // 1024
    peak = memory_peak(pid)
    print(
        f"daemon in the container: RSS {rss} MB; container memory peak "
        f"{peak // 2**20 if peak else '?'} MB (the first start compiles the programs)"
    )


@pytest.mark.kernel
def test_without_host_pid_only_new_connections_get_the_policy(
    podman, daemon_image, image_pin_dir, spawn, probes, tmp_path
):
    """Why the DaemonSet has hostPID: in its own PID namespace the daemon
    cannot see the workload's processes, so the sweep cannot enter their
    network namespace; sock_ops still covers new connections."""
    wl, port, old = run_workload(podman, spawn, probes, tmp_path)
    cgroup = container_cgroup(podman.pid(wl))
    name, daemon = start_daemon(
        podman, spawn, daemon_image, image_pin_dir, tmp_path, cgroup, host_pid=False
    )
    swept(wait_ready(podman, name, daemon), cgroup)
    new = spawn(["podman", "exec", "-i", wl, "/sockprobe", "connect", "127.0.0.1", port, "hold"])
    assert_policy(new.values("client", timeout=60))
    old.send_line()
    assert_untouched(old.values("now-client"))
