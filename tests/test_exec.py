"""`bpfkeep exec`, `bpfkeep run --via preload|auto` and `preload-path`, end to
end through the real CLI, the real shim and real programs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import as_nobody, bpfkeep_cmd

from bpfkeep import cli as cli_module
from bpfkeep import peers, runner


def values(stdout: str, role: str = "client") -> dict[str, int]:
    line = next(ln for ln in stdout.splitlines() if ln.startswith(role + " "))
    return {k: int(v) for k, v in (f.split("=") for f in line.split()[1:])}


@pytest.fixture()
def port(spawn, probes):
    srv = spawn([probes["dynamic"], "listen", "127.0.0.1", "0", "hold"])
    return srv.expect("ready").split()[1]


def cli(
    *args: str, env: dict | None = None, pin_dir: str = "/nonexistent"
) -> subprocess.CompletedProcess:
    return subprocess.run(
        bpfkeep_cmd(pin_dir, *args), capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_preload_path_prints_the_shipped_library():
    out = cli("preload-path")
    assert out.returncode == 0
    path = out.stdout.strip()
    assert os.path.isabs(path) and path.endswith("libbpfkeep.so") and os.path.isfile(path)


def test_exec_applies_the_policy_to_a_dynamic_program(probes, port):
    out = cli("exec", "--keepidle", "33", "--keepcnt", "4", "--",
              probes["dynamic"], "connect", "127.0.0.1", port)  # fmt: skip
    assert out.returncode == 0, out.stderr
    v = values(out.stdout)
    assert (v["keepalive"], v["keepidle"], v["keepintvl"], v["keepcnt"]) == (1, 33, 15, 4)
    assert v["user_timeout"] == (33 + 15 * 4) * 1000


def test_exec_enforce_mode_and_existing_preload_kept(probes, port, tmp_path):
    out = cli("exec", "--mode", "enforce", "--keepidle", "20", "--",
              probes["dynamic"], "connect", "127.0.0.1", port, "set", "keepalive=0",
              "set", "keepidle=900")  # fmt: skip
    v = values(out.stdout, "client-after")
    assert v["keepalive"] == 1 and v["keepidle"] == 20


def test_exec_passes_exit_status_and_appends_to_ld_preload(tmp_path):
    out = cli("exec", "--", "sh", "-c", 'echo "$LD_PRELOAD"; exit 9',
              env={"LD_PRELOAD": "libc.so.6"})  # fmt: skip
    assert out.returncode == 9
    entries = out.stdout.strip().replace(":", " ").split()
    assert entries[0] == "libc.so.6" and entries[-1].endswith("libbpfkeep.so")


def test_exec_warns_about_static_programs(probes, port):
    out = cli("exec", "--", probes["static"], "connect", "127.0.0.1", port)
    assert out.returncode == 0
    assert "statically linked" in out.stderr and "--via bpf" in out.stderr
    assert values(out.stdout)["keepalive"] == 0  # the shim cannot reach it


def test_exec_warns_about_go_programs():
    """A dynamically linked Go program (Debian's promtool) makes its socket
    system calls without libc: the shim cannot reach it either."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus, a Go program) not installed")
    out = cli("exec", "--", promtool, "--version")
    assert out.returncode == 0, out.stderr
    notices = [ln for ln in out.stderr.splitlines() if ln.startswith("bpfkeep:")]
    assert len(notices) == 1 and "a Go program" in notices[0] and "--via bpf" in notices[0]


def test_exec_warns_about_setuid_programs(probes, port, tmp_path):
    """A set-user-ID program owned by someone else runs in secure mode: the
    loader ignores LD_PRELOAD, and exec says so."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a set-user-ID file of another user")
    os.chmod(tmp_path, 0o755)
    prog = tmp_path / "sockprobe-setuid"
    shutil.copy(probes["dynamic"], prog)
    os.chown(prog, 65534, 65534)
    os.chmod(prog, 0o4755)
    out = cli("exec", "--keepidle", "33", "--", str(prog), "connect", "127.0.0.1", port)
    assert out.returncode == 0, out.stderr
    notices = [ln for ln in out.stderr.splitlines() if ln.startswith("bpfkeep:")]
    assert len(notices) == 1 and "set-user-ID" in notices[0], out.stderr
    assert values(out.stdout)["keepalive"] == 0  # indeed not reached


def test_exec_does_not_warn_about_dynamic_c_programs(probes, port):
    out = cli("exec", "--", probes["dynamic"], "connect", "127.0.0.1", port)
    assert out.returncode == 0 and "bpfkeep:" not in out.stderr, out.stderr


def test_run_via_preload(probes, port):
    out = cli("run", "--via", "preload", "--keepidle", "44", "--defer-accept", "5", "--",
              probes["dynamic"], "connect", "127.0.0.1", port)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert values(out.stdout)["keepidle"] == 44


def _run_as_nobody(probe_src: str, port: str) -> tuple[str, subprocess.CompletedProcess]:
    """`bpfkeep run --keepidle 45 -- PROBE connect` as nobody, on a copy of
    the probe that the unprivileged user may execute (removed after);
    returns the copy's path and the result."""
    shared = tempfile.mkdtemp(prefix="bpfkeep-exec-")
    os.chmod(shared, 0o755)
    probe = shutil.copy(probe_src, shared)
    try:
        return probe, subprocess.run(
            as_nobody(bpfkeep_cmd("/sys/fs/bpf/bpfkeep-none", "run", "--keepidle", "45",
                                  "--", probe, "connect", "127.0.0.1", port)),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        shutil.rmtree(shared)


@pytest.mark.kernel
def test_run_via_auto_falls_back_without_privileges(probes, port):
    _probe, out = _run_as_nobody(probes["dynamic"], port)
    assert out.returncode == 0, out.stderr
    notices = [ln for ln in out.stderr.splitlines() if ln.startswith("bpfkeep:")]
    assert len(notices) == 1 and "falling back to the LD_PRELOAD shim" in notices[0]
    assert values(out.stdout)["keepidle"] == 45


def test_exec_without_command():
    out = cli("exec", "--keepidle", "5")
    assert out.returncode == 2 and "no COMMAND" in out.stderr


def test_exec_missing_program():
    out = cli("exec", "--", "/no/such/program")
    assert out.returncode == 127  # as shells and env say "not found"
    assert out.stderr.strip().splitlines() == [
        "bpfkeep: cannot run /no/such/program: No such file or directory"
    ]


def test_module_runs_with_this_interpreter():
    assert (
        subprocess.run([sys.executable, "-m", "bpfkeep", "--help"], capture_output=True).returncode
        == 0
    )


# --- one semantics for both paths: nginx ----------------------------------

NGINX_CONF = """
daemon off;
master_process off;
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
    server {{ listen 127.0.0.1:{off} so_keepalive=off; }}
    server {{ listen 127.0.0.1:{own} so_keepalive=30m:60:20; }}
    server {{ listen 127.0.0.1:{plain}; }}
}}
"""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _seconds(ss_time: str) -> float:
    """ss's timer durations (print_ms_timer): '29min', '1min39sec', '12sec',
    '6.992ms' (6 s 992 ms), '250ms'."""
    m = re.fullmatch(r"(?:(\d+)min)?(?:(\d+)(?:sec|\.))?(?:(\d+)ms)?", ss_time)
    assert m and any(m.groups()), ss_time
    minutes, secs, ms = (int(g or 0) for g in m.groups())
    return minutes * 60 + secs + ms / 1000


def _accepted_keepalive(port: int) -> float | None:
    """Seconds left on the keepalive timer of the socket nginx accepted on
    port (None: keepalive off), as ss reads it from the kernel."""
    out = subprocess.run(
        ["ss", "-tnoH", "state", "established", "sport", "=", f":{port}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    lines = [ln for ln in out.splitlines() if f":{port} " in ln]
    assert len(lines) == 1, out
    m = re.search(r"timer:\((\w+),([^,]+),", lines[0])
    if m is None or m.group(1) != "keepalive":
        return None
    return _seconds(m.group(2))


@pytest.fixture()
def nginx_conf(tmp_path):
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if nginx is None:
        pytest.skip("nginx not installed (apt-get install nginx-light)")
    off, own, plain = _free_ports(3)
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp_path, off=off, own=own, plain=plain))
    argv = [nginx, "-e", str(tmp_path / "error.log"), "-p", str(tmp_path), "-c", str(conf)]
    return argv, {"off": off, "own": own, "plain": plain}


def _nginx_keepalive(cmd: list[str], ports: dict[str, int]) -> dict[str, float | None]:
    """Start cmd (nginx under bpfkeep), hold one connection per listener,
    read the accepted sockets' keepalive timers, stop it."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    conns = []
    give_up = time.monotonic() + 60  # a guard against hanging, not a measurement
    # nginx listens, then sets its so_keepalive on the listeners, then
    # writes its pid file: a connection made before that is accepted (by
    # the kernel) from a listener without nginx's values -- as it would be
    # without bpfkeep.  Connect once nginx has configured its listeners.
    pid_file = Path(cmd[cmd.index("-p") + 1]) / "nginx.pid"
    try:
        while not pid_file.exists():
            if p.poll() is not None:
                pytest.fail(f"{cmd} exited {p.returncode}: {p.stderr.read()}")
            if time.monotonic() > give_up:
                pytest.fail(f"nginx never wrote {pid_file}")
            time.sleep(0.05)
        for port in ports.values():
            while True:  # until nginx listens (or dies)
                if p.poll() is not None:
                    pytest.fail(f"{cmd} exited {p.returncode}: {p.stderr.read()}")
                if time.monotonic() > give_up:
                    pytest.fail(f"nginx never listened on {port}")
                try:
                    conns.append(socket.create_connection(("127.0.0.1", port), timeout=5))
                    break
                except ConnectionRefusedError:
                    time.sleep(0.05)
        return {name: _accepted_keepalive(port) for name, port in ports.items()}
    finally:
        for c in conns:
            c.close()
        p.send_signal(signal.SIGTERM)  # bpfkeep run forwards it
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _check_nginx(got: dict[str, float | None]) -> None:
    # so_keepalive=off, set after nginx's first listen(): stays off.
    assert got["off"] is None, got
    # so_keepalive=30m:60:20, likewise: nginx's 30 min idle, not the policy's 7 s.
    assert got["own"] is not None and got["own"] > 60, got
    # No so_keepalive: the policy's 7 s idle.
    assert got["plain"] is not None and got["plain"] <= 7, got


# A peer rule for another peer: the values of nginx's connections then go on
# at accept() (shim) or PASSIVE_ESTABLISHED (kernel), not on the listener.
WITH_PEER_RULES = [(), ("--peer", "127.0.0.2,exempt")]


@pytest.mark.parametrize("rules", WITH_PEER_RULES, ids=["", "peer-rules"])
def test_exec_nginx_keeps_its_own_so_keepalive(nginx_conf, rules):
    """The shim applies the policy at nginx's first listen() only; what nginx
    sets before its second listen() stands (issue 10, item 3).  With peer
    rules too, where accept() sets each connection's values: what nginx
    set on its listener after listen() stands there as well."""
    argv, ports = nginx_conf
    cmd = bpfkeep_cmd("/nonexistent", "exec", "--keepidle", "7", *rules, "--", *argv)
    _check_nginx(_nginx_keepalive(cmd, ports))


@pytest.mark.kernel
@pytest.mark.parametrize("rules", WITH_PEER_RULES, ids=["", "peer-rules"])
def test_run_via_bpf_nginx_agrees_with_the_shim(nginx_conf, pin_dir, rules):
    """The same nginx under the kernel path gives what the shim gives."""
    argv, ports = nginx_conf
    cmd = bpfkeep_cmd(pin_dir, "run", "--via", "bpf", "--keepidle", "7", *rules, "--", *argv)
    _check_nginx(_nginx_keepalive(cmd, ports))


# --- one semantics for both paths: a non-blocking client, TCP Fast Open ----

PROBE = os.path.join(os.path.dirname(__file__), "preload_helpers", "probe.py")
PATHS = ["exec", pytest.param("bpf", marks=pytest.mark.kernel)]


@pytest.fixture()
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    yield srv.getsockname()[1]
    srv.close()


def _probe_under(path: str, request, *args: str) -> dict:
    """probe.py ARGS under the shim (exec) or the kernel path (run --via bpf),
    policy keepidle 7; its JSON line (getsockopt on its own socket)."""
    if path == "exec":
        cmd = bpfkeep_cmd("/nonexistent", "exec", "--keepidle", "7", "--")
    else:
        cmd = bpfkeep_cmd(request.getfixturevalue("pin_dir"), "run", "--via", "bpf",
                          "--keepidle", "7", "--")  # fmt: skip
    out = subprocess.run(
        [*cmd, "/usr/bin/python3", PROBE, *args], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("path", PATHS)
def test_nonblocking_client_keeps_its_own_choices(path, request, listener):
    """connect(), the program's own setsockopt, connect() again: its
    choices stand on both paths."""
    got = _probe_under(path, request, "nonblock", "127.0.0.1", str(listener))
    assert (got["keepalive"], got["keepidle"]) == (0, 1800), got


@pytest.mark.parametrize("how", ["sendto", "sendmsg"])
@pytest.mark.parametrize("path", PATHS)
def test_tcp_fast_open_client_gets_the_policy(path, how, request, listener):
    with open("/proc/sys/net/ipv4/tcp_fastopen") as f:
        if not int(f.read()) & 1:
            pytest.skip("net.ipv4.tcp_fastopen has client mode off")
    got = _probe_under(path, request, "tfo", "127.0.0.1", str(listener), how)
    assert (got["keepalive"], got["keepidle"], got["keepcnt"]) == (1, 7, 9), got


def test_exec_not_executable(tmp_path):
    data = tmp_path / "data"
    data.write_text("not a program\n")
    data.chmod(0o644)
    out = cli("exec", "--", str(data))
    assert out.returncode == 126
    assert out.stderr.strip().splitlines() == [f"bpfkeep: cannot run {data}: Permission denied"]


@pytest.mark.kernel
def test_run_via_auto_refuses_the_shim_for_a_static_program(probes, port):
    """Without privileges run used to fall back to the shim, which cannot
    reach a static program: it ran with no policy and a warning."""
    probe, out = _run_as_nobody(probes["static"], port)
    missing = subprocess.run(
        as_nobody(bpfkeep_cmd("/sys/fs/bpf/bpfkeep-none", "run", "--", "/no/such/program")),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode != 0 and "client " not in out.stdout
    assert out.stderr.strip().splitlines() == [
        f"bpfkeep: {probe} is statically linked: the LD_PRELOAD shim cannot reach it, "
        "and BPF needs root or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN"
    ]
    assert missing.returncode == 127, missing.stderr


# --- peer rules through the shim ---------------------------------------------


@pytest.fixture()
def peer_ports(spawn, probes) -> dict[str, str]:
    """Listeners (the probe, holding what it accepts) on three peers."""
    out = {}
    for host in ("127.0.0.1", "127.0.0.2", "::1"):
        srv = spawn([probes["dynamic"], "listen", host, "0", "hold"])
        out[host] = srv.expect("ready").split()[1]
    return out


PEER_RULES = ("--keepidle", "20", "--peer", "127.0.0.2,keepidle=300", "--peer", "::1,exempt")


@pytest.mark.parametrize("command", [("exec",), ("run", "--via", "preload")])
def test_exec_and_run_pass_peer_rules(probes, peer_ports, command):
    """bpfkeep exec and run --via preload give the shim the rules: each
    peer gets its rule's values, the exempt one none, the others the
    policy's."""
    got = {}
    for host, port in peer_ports.items():
        out = cli(*command, *PEER_RULES, "--", probes["dynamic"], "connect", host, port)
        assert out.returncode == 0, out.stderr
        got[host] = values(out.stdout)
    assert (got["127.0.0.1"]["keepalive"], got["127.0.0.1"]["keepidle"]) == (1, 20)
    assert got["127.0.0.1"]["user_timeout"] == (20 + 15 * 9) * 1000
    assert (got["127.0.0.2"]["keepalive"], got["127.0.0.2"]["keepidle"]) == (1, 300)
    assert got["127.0.0.2"]["user_timeout"] == (300 + 15 * 9) * 1000  # its own times
    assert (got["::1"]["keepalive"], got["::1"]["user_timeout"]) == (0, 0)


def test_exec_resolves_peer_host_names_itself(probes, peer_ports):
    """The shim resolves no name: exec does, before the program starts,
    and passes the addresses with the name for the debug line."""
    out = cli("exec", "--peer", "localhost,keepidle=301", "--", probes["dynamic"], "connect",
              "127.0.0.1", peer_ports["127.0.0.1"], env={"BPFKEEP_DEBUG": "1"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert values(out.stdout)["keepidle"] == 301
    assert re.search(r"connect\(\d+\): peer 127\.0\.0\.1 port \d+: peer rule 1 \(localhost\)",
                     out.stderr), out.stderr  # fmt: skip


def test_exec_warns_about_a_peer_name_that_does_not_resolve(monkeypatch, capsys):
    """Its rule applies to no connection; the program still runs (no DNS
    query leaves this host: the lookup is replaced)."""

    def no_such_host(name):
        raise socket.gaierror(-2, "Name or service not known")

    ran = {}

    def execvpe(path, argv, env):
        ran.update(env=env, argv=argv)
        raise OSError(2, "No such file or directory")  # as if not found: exec returns

    monkeypatch.setattr(peers, "_getaddrinfo", no_such_host)
    monkeypatch.setattr(runner.os, "execvpe", execvpe)
    args = cli_module.build_parser().parse_args(
        ["exec", "--peer", "db.invalid,keepidle=5", "--peer", "127.0.0.2,exempt", "--", "true"]
    )
    runner.exec_preload(cli_module.policy_from_args(args), ["true"])
    err = capsys.readouterr().err
    assert "warning: peer db.invalid does not resolve (Name or service not known)" in err
    assert ran["env"]["BPFKEEP_PEERS"] == "127.0.0.2,exempt"


def test_exec_refuses_peer_rules_with_the_socket_hook():
    out = cli("exec", "--hook", "socket", "--peer", "127.0.0.2,exempt", "--", "true")
    assert out.returncode == 2
    assert "peer rules need --hook connect" in out.stderr, out.stderr


def test_peer_rule_refuses_keepalive():
    """keepalive in a peer rule (--peer, [[policy.peer]]) was taken in and
    dropped without a word: keepalive=0 did nothing."""
    out = cli("exec", "--peer", "10.0.0.0/8,keepalive=0", "--", "true")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "bpfkeep: --peer 10.0.0.0/8,keepalive=0: keepalive: keepalive is always on; exempt "
        "leaves these peers' connections as the program made them"
    ]
