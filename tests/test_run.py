"""`bpfkeep run` as a supervisor (issue 10): daemonizing programs stay
covered, run returns when the cgroup is empty, a killed run is cleaned up
later, shell exit statuses; bpfkeep under `ip netns exec`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from conftest import as_nobody, bpfkeep_cmd
from test_exec import _accepted_keepalive, _free_ports

pytestmark = pytest.mark.kernel


@pytest.fixture()
def run_env(tmp_path):
    """The CLI's environment with a private record of runs (so that this
    test's cleanup and other tests' runs stay apart)."""
    state = tmp_path / "runs"
    return {**os.environ, "BPFKEEP_RUN_STATE_DIR": str(state)}


@pytest.fixture()
def run_cgroups():
    """Cgroups the runs of a test made: whatever is left in them is killed
    and they are removed at the end, also when the test fails."""
    made: list[str] = []
    yield made
    from bpfkeep.kernel.cgroups import remove_tree

    for path in made:
        # Only run's own scratch cgroups: a program that escaped (or a run
        # that moved it out) must never make this kill a whole tree.
        if os.path.basename(path).startswith("bpfkeep-run-"):
            remove_tree(path)


class _Run:
    """`bpfkeep run ...` in the background; stderr to a file, so that a
    failing test never blocks on a pipe an escaped process holds open."""

    def __init__(self, argv: list[str], env: dict, tmp) -> None:
        self.err_path = tmp / f"run-{uuid.uuid4().hex[:6]}.err"
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env
            )

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()


def _cgroup_of(pid: int) -> str:
    from bpfkeep.kernel.cgroups import own_cgroup

    return own_cgroup(pid=str(pid))


def _wait_line(run: _Run, prefix: str) -> str:
    assert run.proc.stdout is not None
    for line in run.proc.stdout:
        if line.startswith(prefix):
            return line.strip()
    pytest.fail(f"no {prefix!r} line; exit {run.proc.wait()}: {run.stderr}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


# -- exit statuses ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["/nonexistent"], 127, "bpfkeep: cannot run /nonexistent: No such file or directory"),
        (["{tmp}/data"], 126, "bpfkeep: cannot run {tmp}/data: Permission denied"),
        (["sh", "-c", "kill -TERM $$"], 143, None),
        (["sh", "-c", "exit 7"], 7, None),
    ],
)
def test_run_exit_status_follows_the_shell(bk, run_env, tmp_path, argv, status, message):
    (tmp_path / "data").write_text("not a program\n")
    (tmp_path / "data").chmod(0o644)
    argv = [a.format(tmp=tmp_path) for a in argv]
    message = message and message.format(tmp=tmp_path)
    out = bk("run", "--via", "bpf", "--", *argv, check=False, env=run_env)
    assert out.returncode == status, out.stderr
    if message:
        assert out.stderr.strip().splitlines() == [message]
    assert json.loads(bk("status", "--json", env=run_env).stdout) == []


def test_run_forwards_signals_to_the_main_process(pin_dir, run_env, run_cgroups, tmp_path):
    script = 'trap "exit 5" USR1; echo pid $$; while :; do sleep 1; done'
    run = _Run(bpfkeep_cmd(pin_dir, "run", "--", "sh", "-c", script), run_env, tmp_path)
    try:
        run_cgroups.append(_cgroup_of(int(_wait_line(run, "pid").split()[1])))
        run.proc.send_signal(signal.SIGUSR1)
        assert run.proc.wait(timeout=60) == 5, run.stderr
    finally:
        _stop(run.proc)


# -- a daemonizing program: nginx -------------------------------------------------

NGINX_DAEMON_CONF = """
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{ listen 127.0.0.1:{port}; }}
}}
"""


@pytest.fixture()
def nginx_daemon(tmp_path):
    """argv of an nginx that daemonizes (the default: no `daemon off`), its
    port and its pid file."""
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if nginx is None:
        pytest.skip("nginx not installed (apt-get install nginx-light)")
    (port,) = _free_ports(1)
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_DAEMON_CONF.format(tmp=tmp_path, port=port))
    argv = [nginx, "-e", str(tmp_path / "error.log"), "-p", str(tmp_path), "-c", str(conf)]
    pid_file = tmp_path / "nginx.pid"
    yield argv, port, pid_file
    if pid_file.exists():  # the test failed with nginx still running
        subprocess.run([*argv, "-s", "stop"], capture_output=True, check=False)


def _connect(port: int, proc: subprocess.Popen) -> socket.socket:
    give_up = time.monotonic() + 60  # a guard against hanging, not a measurement
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=5)
        except ConnectionRefusedError:
            if time.monotonic() > give_up:
                pytest.fail(f"nginx never listened on {port}: {proc.poll()}")
            time.sleep(0.05)


def test_run_keeps_a_daemonized_nginx_covered(
    pin_dir, run_env, run_cgroups, nginx_daemon, tmp_path
):
    """nginx forks its master and the first process exits 0 at once: run
    keeps the cgroup and the policy until nginx is stopped, and returns 0
    only then; the cgroup is gone afterwards."""
    argv, port, pid_file = nginx_daemon
    run = _Run(bpfkeep_cmd(pin_dir, "run", "--keepidle", "7", "--", *argv), run_env, tmp_path)
    p = run.proc
    try:
        # The daemonized master writes its pid file once it has configured
        # its listeners (and forked): only then is it the process to ask.
        give_up = time.monotonic() + 60  # a guard against hanging, not a measurement
        while not pid_file.exists() or not pid_file.read_text().strip():
            if time.monotonic() > give_up:
                pytest.fail(f"nginx never wrote {pid_file}: {run.stderr}")
            time.sleep(0.05)
        conn = _connect(port, p)
        with conn:
            master = int(pid_file.read_text())
            cg = _cgroup_of(master)
            assert os.path.basename(cg).startswith("bpfkeep-run-"), cg
            run_cgroups.append(cg)
            keepalive = _accepted_keepalive(port)
            assert keepalive is not None and keepalive <= 7, keepalive
        # The process run started has exited (nginx daemonized) ...
        children = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text()
        assert children.split() == [], children
        # ... yet run is still there, and so is the policy.
        assert p.poll() is None
        status = json.loads(subprocess.run(
            bpfkeep_cmd(pin_dir, "status", "--json"), capture_output=True, text=True,
            env=run_env, check=True,
        ).stdout)  # fmt: skip
        assert [a["cgroup"].rsplit("/", 1)[-1] for a in status] == [os.path.basename(cg)]
        subprocess.run([*argv, "-s", "quit"], check=True, capture_output=True)
        assert p.wait(timeout=60) == 0, run.stderr
        assert not os.path.exists(cg)
        assert "waiting for the" in run.stderr
    finally:
        _stop(p)
    status = subprocess.run(
        bpfkeep_cmd(pin_dir, "status", "--json"), capture_output=True, text=True, env=run_env
    )
    assert json.loads(status.stdout) == []


# -- a killed run -------------------------------------------------------------------


def test_killed_run_is_cleaned_up_by_status(pin_dir, run_env, run_cgroups, tmp_path):
    """SIGKILL of run: what it ran keeps the policy while it lives; once the
    cgroup is empty, the next status detaches and removes it."""
    from bpfkeep.runner import wait_empty

    run = _Run(
        bpfkeep_cmd(pin_dir, "run", "--keepidle", "8", "--",
                    "sh", "-c", "echo pid $$; exec sleep 1000"),
        run_env, tmp_path,
    )  # fmt: skip
    p = run.proc
    try:
        child = int(_wait_line(run, "pid").split()[1])
        cg = _cgroup_of(child)
        run_cgroups.append(cg)
        p.kill()
        p.wait()
    finally:
        _stop(p)

    def status() -> list[dict]:
        out = subprocess.run(
            bpfkeep_cmd(pin_dir, "status", "--json"),
            capture_output=True, text=True, env=run_env, check=True,
        )  # fmt: skip
        return json.loads(out.stdout)

    # sleep is still there: covered, left alone.
    cg_id = os.stat(cg).st_ino
    assert [a["cgroup_id"] for a in status()] == [cg_id]
    assert os.path.isdir(cg) and os.listdir(run_env["BPFKEEP_RUN_STATE_DIR"])
    os.kill(child, signal.SIGKILL)
    wait_empty(cg)
    assert status() == []
    assert not os.path.exists(cg)
    assert os.listdir(run_env["BPFKEEP_RUN_STATE_DIR"]) == []


# -- network namespaces: ip netns exec ----------------------------------------------


def _in_netns(ns: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=120, **kw
    )


def test_netns_exec_hides_the_mounts(netns):
    """What the test below relies on: ip netns exec shows neither cgroup2
    nor bpffs."""
    mounts = _in_netns(netns, ["cat", "/proc/self/mounts"]).stdout
    types = {ln.split()[2] for ln in mounts.splitlines()}
    assert "cgroup2" not in types and "bpf" not in types


def test_attach_run_and_doctor_under_ip_netns_exec(
    pin_dir, cgroups, spawn, probes, netns, run_env, run_cgroups
):
    cg = cgroups.make("ns")
    # attach, with the cgroup named as the host sees it (absolute) ...
    out = _in_netns(netns, bpfkeep_cmd(pin_dir, "attach", "--cgroup", cg, "--keepidle", "11"))
    assert out.returncode == 0, out.stderr
    srv = spawn([probes["dynamic"], "listen", "127.0.0.1", "0", "hold"])
    port = srv.expect("ready").split()[1]
    cli = spawn([probes["static"], "connect", "127.0.0.1", port], cgroup=cg)
    assert cli.values("client")["keepidle"] == 11
    # ... and relative; the pins are the host's (status outside sees them).
    out = _in_netns(
        netns, bpfkeep_cmd(pin_dir, "attach", "--cgroup", cgroups.rel(cg), "--keepidle", "12")
    )
    assert out.returncode == 0 and out.stdout.startswith("updated"), out.stderr
    status = subprocess.run(
        bpfkeep_cmd(pin_dir, "status", "--json"), capture_output=True, text=True, check=True
    )
    assert [a["policy"]["keepidle"] for a in json.loads(status.stdout)] == [12]

    # run: a static program in the namespace gets the policy from the kernel.
    srv = spawn([probes["dynamic"], "listen", "127.0.0.1", "0", "hold"], netns=netns)
    port = srv.expect("ready").split()[1]
    out = _in_netns(
        netns,
        bpfkeep_cmd(pin_dir, "run", "--keepidle", "13", "--",
                    probes["static"], "connect", "127.0.0.1", port),
        env=run_env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert re.search(r"^client .*keepalive=1 keepidle=13 ", out.stdout, re.M), out.stdout
    assert "falling back" not in out.stderr

    # doctor: cgroup2 and bpffs found, BPF usable.
    out = _in_netns(netns, [*bpfkeep_cmd(pin_dir, "doctor", "--json")])
    assert out.returncode == 0, out.stdout + out.stderr
    checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
    assert checks["cgroup2"]["status"] == "OK" and checks["bpffs"]["status"] == "OK"
    assert checks["bpffs"]["details"]["mounted"]


@pytest.fixture()
def shared_probe(probes):
    """The static probe where user nobody may run it."""
    shared = tempfile.mkdtemp(prefix="bpfkeep-run-")
    os.chmod(shared, 0o755)
    yield shutil.copy(probes["static"], shared)
    shutil.rmtree(shared)


def test_unreachable_mounts_name_nsenter(netns, shared_probe):
    """Without the privileges to reach the host's mounts: no silent fallback
    to the shim for a static program, and no advice to mount cgroup2 or
    reboot -- an error naming nsenter --net."""
    argv = bpfkeep_cmd("/sys/fs/bpf/bpfkeep-none", "run", "--keepidle", "9", "--",
                       shared_probe, "connect", "127.0.0.1", "9")  # fmt: skip
    out = _in_netns(netns, as_nobody(argv))
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert f"nsenter --net=/run/netns/{netns}" in lines[0] and "statically linked" in lines[0]
    assert "client " not in out.stdout  # never ran unprotected

    out = _in_netns(netns, as_nobody(bpfkeep_cmd("/sys/fs/bpf/bpfkeep", "doctor", "--json")))
    checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
    assert checks["cgroup2"]["status"] == "FAIL"
    assert f"nsenter --net=/run/netns/{netns}" in checks["cgroup2"]["fix"]
    assert "unified_cgroup_hierarchy" not in checks["cgroup2"]["fix"]
