"""The daemon as a real process: real config files, signals, inotify on the
real cgroup tree, a real HTTP scrape, and a real Prometheus server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, bpfkeep_cmd, bpftool_prog_ids, host_keepalive, host_sysctl
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.kernel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DaemonProc:
    def __init__(self, pin_dir: str, config: Path, tmp: Path, *extra: str):
        self.pin_dir, self.config, self.tmp, self.extra = pin_dir, config, tmp, extra
        self.proc: subprocess.Popen | None = None
        self.log = tmp / "daemon.log"
        self.notify_path = str(tmp / "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.messages: list[str] = []  # received, not yet matched
        self.consumed: list[str] = []  # matched by wait_message, in order

    def start(self, *, prefix: tuple[str, ...] = (), **extra_env: str) -> float:
        """Start (under ``prefix``, e.g. unshare); return seconds until
        systemd's READY=1 arrived."""
        env = {**os.environ, "NOTIFY_SOCKET": self.notify_path, **extra_env}
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [
                *prefix,
                *bpfkeep_cmd(self.pin_dir, "daemon", "--config", str(self.config), *self.extra),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "a"),  # noqa: SIM115 - the child owns it
            env=env,
        )
        self.wait_message("READY=1", timeout=60)
        return time.monotonic() - t0

    def wait_message(self, needle: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.messages:
                if needle in m:
                    self.messages.remove(m)
                    self.consumed.append(m)
                    return m
            exited = self.proc is not None and self.proc.poll() is not None
            # Once the daemon is gone, only drain what it already sent.
            self.notify.settimeout(0.05 if exited else max(0.01, deadline - time.monotonic()))
            try:
                self.messages.append(self.notify.recv(4096).decode())
            except TimeoutError:
                break
        raise AssertionError(f"no {needle!r} from the daemon; log:\n{self.log.read_text()}")

    def signal(self, sig: int) -> None:
        assert self.proc
        self.proc.send_signal(sig)

    def wait_log(self, needle: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ln in self.log.read_text().splitlines():
                if needle in ln:
                    return ln
            time.sleep(0.05)
        raise AssertionError(f"no log line with {needle!r}:\n{self.log.read_text()}")

    def stop(self) -> int:
        assert self.proc
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=20)

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.notify.close()


@pytest.fixture()
def daemon(pin_dir, tmp_path):
    made: list[DaemonProc] = []

    def make(config: Path, *extra: str) -> DaemonProc:
        d = DaemonProc(pin_dir, config, tmp_path / f"d{len(made)}", *extra)
        made.append(d)
        return d

    for i in range(4):
        (tmp_path / f"d{i}").mkdir()
    yield make
    for d in made:
        d.close()


def write_config(path: Path, port: int, rules: str, audit: int = 0) -> Path:
    path.write_text(
        f'[metrics]\nlisten = "127.0.0.1:{port}"\n[daemon]\naudit_interval = {audit}\n' + rules
    )
    return path


def rule(pattern: str, **values) -> str:
    body = "".join(
        f"{k} = {json.dumps(v) if isinstance(v, str) else v}\n" for k, v in values.items()
    )
    return f'[[policy]]\ncgroup = "{pattern}"\n{body}'


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(metrics, name, **labels) -> float | None:
    return metrics.get((name, tuple(sorted(labels.items()))))


def keepidle_of_new_connection(spawn, probes, cgroup: str, port: int) -> int:
    cli = spawn([probes["static"], "connect", "127.0.0.1", str(port), "hold"], cgroup=cgroup)
    return cli.values("client")["keepidle"]


@pytest.fixture()
def listener():
    """A loopback listener whose accept queue holds every connection the
    test makes (sockprobe's listens with a backlog of 16: a test that polls
    by connecting filled it on slow kernels, and connect() then hung)."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=4096)
    yield srv.getsockname()[1]
    srv.close()


def wait_until(pred, timeout: float, step: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


def test_daemon_reconciles_scrapes_and_reloads(daemon, cgroups, spawn, probes, listener, tmp_path):
    a = cgroups.make("a.service")
    cgroups.make("not-a-service")
    base = cgroups.rel(cgroups.base)
    port = free_port()
    cfg = write_config(
        tmp_path / "bpfkeep.toml", port, rule(f"{base}/*.service", mode="enforce", keepidle=61)
    )
    d = daemon(cfg)
    d.start()

    # Attached at start, enforced on a real static program.
    assert keepidle_of_new_connection(spawn, probes, a, listener) == 61
    assert keepidle_of_new_connection(
        spawn, probes, cgroups.make("not-a-service"), listener
    ) == host_sysctl("tcp_keepalive_time")
    for _ in range(2):
        keepidle_of_new_connection(spawn, probes, a, listener)
    m = scrape(port)
    label = "/" + cgroups.rel(a)
    assert sample(m, "bpfkeep_sockets_total", cgroup=label, callback="connect") == 3
    assert sample(m, "bpfkeep_options_applied_total", cgroup=label, option="keepidle") == 3
    assert sample(m, "bpfkeep_policy_attached", cgroup=label, mode="enforce") == 1
    assert sample(m, "bpfkeep_policy_expected", cgroup=label) == 1
    assert sample(m, "bpfkeep_attached_policies") == 1

    # A service that starts later is attached within a second (inotify).
    t0 = time.monotonic()
    b = cgroups.make("b.service")
    assert wait_until(lambda: bpftool_prog_ids(b, "cgroup_sock_ops"), timeout=1.0), (
        d.log.read_text()
    )
    elapsed = time.monotonic() - t0
    print(f"new cgroup attached after {elapsed * 1000:.0f} ms")
    assert keepidle_of_new_connection(spawn, probes, b, listener) == 61
    progs_before = (
        bpftool_prog_ids(a, "cgroup_sock_ops"),
        bpftool_prog_ids(a, "cgroup_setsockopt"),
    )

    # SIGHUP with a broken config: one line naming file and key; nothing changes.
    good = cfg.read_text()
    cfg.write_text(good.replace("keepidle = 61", "keepidle = 99999"))
    d.signal(signal.SIGHUP)
    line = d.wait_log("reload rejected")
    assert str(cfg) in line and "keepidle" in line and "out of range" in line
    assert keepidle_of_new_connection(spawn, probes, a, listener) == 61
    cfg.write_text(good.replace("keepidle = 61", "keepidel = 5"))
    d.signal(signal.SIGHUP)
    assert "keepidel" in d.wait_log("unknown key")

    # SIGHUP with a changed policy: updated in place, same programs.
    cfg.write_text(good.replace("keepidle = 61", "keepidle = 62"))
    d.signal(signal.SIGHUP)
    d.wait_log("updated /" + cgroups.rel(a))
    assert keepidle_of_new_connection(spawn, probes, a, listener) == 62
    assert (
        bpftool_prog_ids(a, "cgroup_sock_ops"),
        bpftool_prog_ids(a, "cgroup_setsockopt"),
    ) == progs_before

    # A cgroup that disappears is forgotten.
    procs = Path(b) / "cgroup.procs"
    for pid in procs.read_text().split():
        os.kill(int(pid), signal.SIGKILL)
    wait_until(lambda: not procs.read_text(), 5)
    wait_until(lambda: _try_rmdir(b), 5)
    d.wait_log(f"/{cgroups.rel(b)} removed")
    m = scrape(port)
    assert sample(m, "bpfkeep_policy_attached", cgroup="/" + cgroups.rel(b), mode="enforce") is None

    # SIGTERM: exits 0, enforcement stays.
    assert d.stop() == 0
    assert keepidle_of_new_connection(spawn, probes, a, listener) == 62


def _try_rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def test_kill9_restart_adopts_without_gap_or_duplicates(
    daemon, cgroups, spawn, probes, listener, tmp_path, bk
):
    a = cgroups.make("a.service")
    base = cgroups.rel(cgroups.base)
    cfg = write_config(tmp_path / "c.toml", free_port(), rule(f"{base}/*.service", keepidle=41))
    d1 = daemon(cfg)
    d1.start()
    d1.proc.kill()
    d1.proc.wait()
    # While no daemon runs, a connection still gets keepalive.
    assert keepidle_of_new_connection(spawn, probes, a, listener) == 41
    d2 = daemon(cfg)
    d2.start()
    assert len(bpftool_prog_ids(a, "cgroup_sock_ops")) == 1
    assert len(bpftool_prog_ids(a, "cgroup_setsockopt")) == 1
    (att,) = json.loads(bk("status", "--json").stdout)
    assert att["managed_by_daemon"] and att["policy"]["keepidle"] == 41
    # The adopted attachment's counters kept counting across the restart.
    assert att["counters"]["seen"]["connect"] == 1
    assert "attached" not in d2.log.read_text()  # adopted, not re-attached
    assert d2.stop() == 0


def test_removed_rule_detached_and_detach_on_exit(daemon, cgroups, tmp_path, bk):
    a, b = cgroups.make("a.service"), cgroups.make("b.worker")
    base = cgroups.rel(cgroups.base)
    port = free_port()
    both = rule(f"{base}/*.service", keepidle=30) + rule(f"{base}/*.worker", keepidle=40)
    cfg = write_config(tmp_path / "c.toml", port, both)
    # A policy attached by hand is not the daemon's: it stays.
    manual = cgroups.make("manual")
    bk("attach", "--cgroup", manual, "--keepidle", "50")
    d = daemon(cfg, "--detach-on-exit")
    d.start()
    assert bpftool_prog_ids(b, "cgroup_sock_ops")
    cfg.write_text(cfg.read_text().split("[[policy]]")[0] + rule(f"{base}/*.service", keepidle=30))
    d.signal(signal.SIGHUP)
    d.wait_log("detached /" + cgroups.rel(b))
    assert bpftool_prog_ids(b, "cgroup_sock_ops") == []
    assert bpftool_prog_ids(a, "cgroup_sock_ops")
    assert d.stop() == 0
    assert bpftool_prog_ids(a, "cgroup_sock_ops") == []
    assert len(bpftool_prog_ids(manual, "cgroup_sock_ops")) == 1


def test_systemd_notify_status_and_watchdog(daemon, cgroups, tmp_path):
    cgroups.make("a.service")
    cfg = write_config(
        tmp_path / "c.toml", free_port(), rule(f"{cgroups.rel(cgroups.base)}/*.service")
    )
    d = daemon(cfg)
    d.start(WATCHDOG_USEC="400000")  # WatchdogSec=0.4s: a ping every 0.2 s
    # The message start() waited for: READY=1 comes with the first STATUS=.
    (ready,) = [m for m in d.consumed if "READY=1" in m]
    assert "STATUS=enforcing 1 cgroup(s)" in ready, ready
    for _ in range(3):
        d.wait_message("WATCHDOG=1", timeout=2)
    d.signal(signal.SIGHUP)
    assert "enforcing 1 cgroup(s)" in d.wait_message("STATUS=")
    assert d.stop() == 0
    d.wait_message("STOPPING=1")


def test_dead_peer_gauge_counts_a_time_left_at_zero_as_the_hosts(daemon, cgroups, tmp_path):
    """A time left at 0 is the host's sysctl (per network namespace; the
    daemon's here): keepcnt 0 with 60/10 is 60 + 10 x tcp_keepalive_probes
    (150 s on a default host), not 60; keepidle 0 is tcp_keepalive_time
    plus the probes, not left out."""
    cnt0, idle0 = cgroups.make("cnt0.service"), cgroups.make("idle0.service")
    full = cgroups.make("full.service")
    base = cgroups.rel(cgroups.base)
    port = free_port()
    rules = (
        rule(f"{base}/cnt0.service", keepidle=60, keepintvl=10, keepcnt=0)
        + rule(f"{base}/idle0.service", keepidle=0)
        + rule(f"{base}/full.service", keepidle=2, keepintvl=1, keepcnt=3)
    )
    d = daemon(write_config(tmp_path / "c.toml", port, rules))
    d.start()
    m = scrape(port)
    time_, _intvl, probes = host_keepalive()

    def bound(cg: str) -> float | None:
        return sample(m, "bpfkeep_policy_dead_peer_bound_seconds", cgroup="/" + cgroups.rel(cg))

    assert bound(cnt0) == 60 + 10 * probes
    assert bound(idle0) == time_ + 15 * 9
    assert bound(full) == 5
    assert d.stop() == 0


def test_dead_peer_gauge_with_a_user_timeout_is_what_the_kernel_does(
    daemon, cgroups, tmp_path, spawn, probes, netns_pair
):
    """An explicit user timeout replaces the probe count: the kernel drops
    a dead idle peer at the first keepalive timer where a probe is out and
    the user timeout has passed.  The gauge must say when that is, which
    the kernel shows as the probes the socket sent before its reset:
    bound = keepidle + keepintvl x probes."""
    ut, derived = cgroups.make("ut.service"), cgroups.make("derived.service")
    base = cgroups.rel(cgroups.base)
    port = free_port()
    values = dict(keepidle=2, keepintvl=1, keepcnt=6)
    rules = rule(f"{base}/ut.service", user_timeout=4000, **values) + rule(
        f"{base}/derived.service", **values
    )
    d = daemon(write_config(tmp_path / "c.toml", port, rules))
    d.start()
    srv = spawn(
        [probes["static"], "listen", netns_pair.server_ip, "0", "hold"], netns=netns_pair.server
    )
    srv_port = srv.expect("ready").split()[1]
    clients = {}
    for cg in (ut, derived):
        clients[cg] = spawn(
            [probes["static"], "wait", netns_pair.server_ip, srv_port],
            cgroup=cg,
            netns=netns_pair.client,
        )
        clients[cg].values("client")  # connected (before the cut below)
    assert clients[ut].values("client")["user_timeout"] == 4000
    netns_pair.cut_server()
    for c in clients.values():
        c.send_line()
    m = scrape(port)
    for cg, c in clients.items():
        res = c.expect("recv", timeout=30)
        fields = dict(f.split("=") for f in res.split()[1:])
        assert fields["errno"] == "ETIMEDOUT", res
        sent_probes = int(fields["segs"]) - 1  # the last one is the reset
        bound = sample(m, "bpfkeep_policy_dead_peer_bound_seconds", cgroup="/" + cgroups.rel(cg))
        assert bound == 2 + 1 * sent_probes, (cg, res, bound)
    assert d.stop() == 0


def test_bad_config_at_start_is_one_line_and_exit_2(pin_dir, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[policy]]\ncgroup = "x/*.service"\nkeepcnt = 500\n')
    proc = subprocess.run(
        bpfkeep_cmd(pin_dir, "daemon", "--config", str(cfg)), capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert f"{cfg}:3: policy[0].keepcnt" in proc.stderr and "out of range" in proc.stderr


def test_promtool_accepts_the_metrics_and_rules(daemon, cgroups, tmp_path):
    if not shutil.which("promtool"):
        pytest.fail("promtool missing: scripts/setup.sh installs Debian's prometheus")
    cgroups.make("a.service")
    port = free_port()
    cfg = write_config(
        tmp_path / "c.toml", port, rule(f"{cgroups.rel(cgroups.base)}/*.service"), audit=1
    )
    d = daemon(cfg)
    d.start()
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    rules = REPO / "deploy" / "prometheus"
    for args in (["check", "rules", "rules.yml"], ["test", "rules", "rules_test.yml"]):
        res = subprocess.run(["promtool", *args], cwd=rules, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr


def test_real_prometheus_sees_counters_move(daemon, cgroups, spawn, probes, listener, tmp_path):
    prom = shutil.which("prometheus")
    if not prom:
        pytest.fail("prometheus missing: scripts/setup.sh installs Debian's prometheus")
    a = cgroups.make("a.service")
    port, prom_port = free_port(), free_port()
    cfg = write_config(tmp_path / "c.toml", port, rule(f"{cgroups.rel(cgroups.base)}/*.service"))
    daemon(cfg).start()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n"
        f"scrape_configs:\n  - job_name: bpfkeep\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{port}']\n"
    )
    server = subprocess.Popen(
        [prom, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        label = "/" + cgroups.rel(a)
        query = f'bpfkeep_sockets_total{{callback="connect",cgroup="{label}"}}'

        def value():
            url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode(
                {"query": query}
            )
            try:
                res = json.loads(urllib.request.urlopen(url, timeout=2).read())
            except OSError:
                return None
            r = res["data"]["result"]
            return float(r[0]["value"][1]) if r else None

        assert wait_until(lambda: value() == 0.0, 30, 0.2), value()
        for _ in range(5):
            keepidle_of_new_connection(spawn, probes, a, listener)
        assert wait_until(lambda: value() == 5.0, 30, 0.2), value()
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_systemd_unit_verifies(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze missing")
    unit = (REPO / "deploy" / "bpfkeep.service").read_text()
    exe = shutil.which("bpfkeep") or str(Path(sys.executable).parent / "bpfkeep")
    (tmp_path / "bpfkeep.service").write_text(unit.replace("/usr/local/bin/bpfkeep", exe))
    res = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "bpfkeep.service")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "Type=notify" in unit and "WatchdogSec=" in unit


def test_shipped_config_is_valid(pin_dir):
    cfg = REPO / "deploy" / "bpfkeep.toml"
    res = subprocess.run(
        bpfkeep_cmd(pin_dir, "daemon", "--config", str(cfg), "--check"),
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0 and "1 policy rule" in res.stdout, res.stderr


def test_sockets_older_than_the_policy_are_swept_and_audited(
    daemon, cgroups, spawn, probes, listener, tmp_path
):
    a = cgroups.make("a.service")
    child = cgroups.make("a.service/worker")  # covered by a.service's policy
    old = spawn([probes["static"], "connect", "127.0.0.1", str(listener), "hold"], cgroup=a)
    assert old.values("client")["keepalive"] == 0  # before any policy
    port = free_port()
    cfg = write_config(
        tmp_path / "c.toml", port, rule(f"{cgroups.rel(cgroups.base)}/*.service"), audit=1
    )
    daemon(cfg).start()
    for cg in (a, child):
        new = spawn([probes["static"], "connect", "127.0.0.1", str(listener), "hold"], cgroup=cg)
        assert new.values("client")["keepalive"] == 1
    label = "/" + cgroups.rel(a)

    def gauges():
        m = scrape(port)
        armed = sample(m, "bpfkeep_audit_sockets", cgroup=label, keepalive="armed")
        off = sample(m, "bpfkeep_audit_sockets", cgroup=label, keepalive="off")
        return (armed, off) if armed == 3 else None

    # The connection made before the daemon started was swept at start.
    assert wait_until(gauges, timeout=10, step=0.2) == (3.0, 0.0), scrape(port)
    old.send_line()
    assert old.values("now-client")["keepidle"] == 15


def test_the_periodic_pass_says_what_it_cost_and_when_the_next_one_runs(
    daemon, cgroups, spawn, probes, listener, tmp_path
):
    """The pass backs off on a host with many sockets (1000 times its CPU
    time): how far is on /metrics, not only in the daemon's head."""
    a = cgroups.make("a.service")
    spawn([probes["static"], "connect", "127.0.0.1", str(listener), "hold"], cgroup=a)
    port = free_port()
    cfg = write_config(
        tmp_path / "c.toml", port, rule(f"{cgroups.rel(cgroups.base)}/*.service"), audit=1
    )
    dproc = daemon(cfg)
    dproc.start()
    before = scrape(port)
    assert not [k for k in before if k[0].startswith("bpfkeep_audit_pass")]  # no pass yet

    def both():
        m = scrape(port)
        cpu = m.get(("bpfkeep_audit_pass_cpu_seconds", ()))
        every = m.get(("bpfkeep_audit_interval_seconds", ()))
        return (cpu, every) if cpu is not None and every is not None else None

    got = wait_until(both, timeout=10, step=0.2)
    assert got, scrape(port)
    cpu, every = got
    # The pass ran in the daemon: no more CPU than the daemon used so far.
    with open(f"/proc/{dproc.proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    used = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    assert 0 < cpu <= used + 0.02, (cpu, used)
    assert every == pytest.approx(max(1.0, 1000 * cpu)), (cpu, every)


def test_turning_audits_off_takes_the_next_pass_off_metrics(
    daemon, cgroups, spawn, probes, listener, tmp_path
):
    """audit_interval = 0 on reload: no periodic pass runs any more, so
    /metrics must not announce one (bpfkeep_audit_interval_seconds)."""
    a = cgroups.make("a.service")
    spawn([probes["static"], "connect", "127.0.0.1", str(listener), "hold"], cgroup=a)
    port = free_port()
    rules = rule(f"{cgroups.rel(cgroups.base)}/*.service")
    cfg = write_config(tmp_path / "c.toml", port, rules, audit=1)
    d = daemon(cfg)
    d.start()
    assert wait_until(
        lambda: ("bpfkeep_audit_interval_seconds", ()) in scrape(port), timeout=10, step=0.2
    ), scrape(port)
    write_config(cfg, port, rules, audit=0)
    d.signal(signal.SIGHUP)
    d.wait_log("reloaded")
    m = scrape(port)
    assert ("bpfkeep_audit_interval_seconds", ()) not in m, m


# -- a hostile local user and a broken environment ------------------------------


def proc_status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            if ln.startswith(key + ":"):
                return int(ln.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def open_fds(pid: int) -> set[int]:
    return {int(n) for n in os.listdir(f"/proc/{pid}/fd")}


def test_idle_metrics_connections_cannot_starve_the_daemon(
    daemon, cgroups, spawn, probes, listener, tmp_path
):
    """500 idle connections to /metrics: the daemon keeps a bounded number
    of threads and descriptors, a new cgroup still gets its programs, and a
    normal scrape still works."""
    cgroups.make("a.service")
    port = free_port()
    cfg = write_config(
        tmp_path / "c.toml", port, rule(f"{cgroups.rel(cgroups.base)}/*.service", keepidle=61)
    )
    d = daemon(cfg)
    d.start()
    pid = d.proc.pid
    idle = []
    try:
        for _ in range(500):
            s = socket.socket()
            s.setblocking(False)  # a full backlog must not block the test
            s.connect_ex(("127.0.0.1", port))
            idle.append(s)
        # Let the daemon see them all (it accepts in a loop of its own).
        wait_until(lambda: False, timeout=1.0, step=0.1)
        threads, fds = proc_status(pid, "Threads"), len(open_fds(pid))
        print(f"with 500 idle connections: {threads} threads, {fds} descriptors")
        assert threads <= 4
        assert fds <= 64
        b = cgroups.make("b.service")
        assert wait_until(lambda: bpftool_prog_ids(b, "cgroup_sock_ops"), timeout=30), (
            d.log.read_text()
        )
        assert keepidle_of_new_connection(spawn, probes, b, listener) == 61
        m = scrape(port)
        assert sample(m, "bpfkeep_policy_attached", cgroup="/" + cgroups.rel(b), mode="set") == 1
        assert proc_status(pid, "Threads") <= 4 and len(open_fds(pid)) <= 64
    finally:
        for s in idle:
            s.close()
    assert d.stop() == 0


def test_out_of_descriptors_is_logged_counted_and_retried(
    daemon, cgroups, spawn, probes, listener, tmp_path
):
    """The daemon's RLIMIT_NOFILE is lowered so that a new cgroup cannot be
    walked or attached: the error is logged and counted, and the cgroup is
    attached once descriptors are available again."""
    import resource

    cgroups.make("a.service")
    base = cgroups.rel(cgroups.base)
    port = free_port()
    rules = rule(f"{base}/*.service", keepidle=62) + rule(f"{base}/*/*.service", keepidle=62)
    cfg = write_config(tmp_path / "c.toml", port, rules)
    d = daemon(cfg)
    d.start()
    pid = d.proc.pid
    before = sample(scrape(port), "bpfkeep_reconcile_errors_total")
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    # Every new descriptor now fails with EMFILE; open ones keep working.
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (0, limits[1]))
    try:
        b = cgroups.make("b.service")  # attaching it fails
        # (Other errors may come first: the sweep of a.service's sockets
        # needs descriptors too.)
        line = d.wait_log(cgroups.rel(b), timeout=30)
        assert "Too many open files" in line, line
        # Listing g fails: only a retry of the walk can find g/c.service.
        c = cgroups.make("g/c.service")
        line = d.wait_log(f"walking the cgroup tree at {os.path.dirname(c)}:", timeout=30)
        assert "Too many open files" in line, line
        assert bpftool_prog_ids(b, "cgroup_sock_ops") == []
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
    for cg in (b, c):
        assert wait_until(lambda cg=cg: bpftool_prog_ids(cg, "cgroup_sock_ops"), timeout=90), (
            d.log.read_text()
        )
        assert keepidle_of_new_connection(spawn, probes, cg, listener) == 62
    assert sample(scrape(port), "bpfkeep_reconcile_errors_total") > before
    assert d.proc.poll() is None
    assert d.stop() == 0


def test_cgroup_names_that_are_not_utf8(daemon, cgroups, spawn, probes, listener, tmp_path):
    """Names are bytes: one made before the start and one made at run time
    are both attached, and scrapes carry them as escaped UTF-8 labels."""
    at_start = cgroups.make(os.fsdecode(b"old\xff.service"))
    port = free_port()
    cfg = write_config(
        tmp_path / "c.toml", port, rule(f"{cgroups.rel(cgroups.base)}/*.service", keepidle=63)
    )
    d = daemon(cfg)
    d.start()
    at_run = cgroups.make(os.fsdecode(b"new\xfe.service"))
    assert wait_until(lambda: bpftool_prog_ids(at_run, "cgroup_sock_ops"), timeout=30), (
        d.log.read_text()
    )
    m = scrape(port)  # was an HTTP 500
    base = cgroups.rel(cgroups.base)
    for path, label in ((at_start, "old\\xff.service"), (at_run, "new\\xfe.service")):
        assert keepidle_of_new_connection(spawn, probes, path, listener) == 63
        assert sample(m, "bpfkeep_policy_attached", cgroup=f"/{base}/{label}", mode="set") == 1
        assert sample(m, "bpfkeep_policy_expected", cgroup=f"/{base}/{label}") == 1
    assert d.stop() == 0


def test_a_raw_byte_and_a_literal_backslash_are_two_cgroups(
    daemon, cgroups, spawn, probes, listener, tmp_path, bk
):
    """A cgroup named with the bytes ``bad\\xff\\xfe`` and one named with
    the characters ``bad\\xff\\xfe`` (a backslash): two label values on
    /metrics, two names in status and status --json -- not two identical
    series, which Prometheus refuses, nor two rows of the same name."""
    raw = cgroups.make(os.fsdecode(b"bad\xff\xfe"))
    literal = cgroups.make("bad\\xff\\xfe")
    base = cgroups.rel(cgroups.base)
    port = free_port()
    d = daemon(write_config(tmp_path / "c.toml", port, rule(f"{base}/bad*", keepidle=65)))
    d.start()
    for cg in (raw, literal):
        assert keepidle_of_new_connection(spawn, probes, cg, listener) == 65
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    series = [
        (s.name, tuple(sorted(s.labels.items())))
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    ]
    assert len(series) == len(set(series)), "two series with the same labels"
    names = {dict(labels)["cgroup"] for n, labels in series if n == "bpfkeep_policy_attached"}
    assert names == {f"/{base}/bad\\xff\\xfe", f"/{base}/bad\\\\xff\\\\xfe"}
    assert {a["cgroup"] for a in json.loads(bk("status", "--json").stdout)} == names
    rows = [ln.split()[0] for ln in bk("status").stdout.splitlines() if ln.startswith("/")]
    assert sorted(rows) == sorted(names)
    assert d.stop() == 0


def test_a_rule_written_as_a_path_under_the_cgroup2_mount_is_that_cgroup(
    daemon, cgroups, spawn, probes, listener, tmp_path, pin_dir
):
    """``cgroup = "/sys/fs/cgroup/unified/x"``, as attach --cgroup takes
    it: --check says ok and the daemon attaches x (it used to become the
    pattern "sys/fs/cgroup/unified/x", which matches nothing)."""
    a = cgroups.make("a.service")
    cfg = write_config(tmp_path / "c.toml", free_port(), rule(a, keepidle=66))
    check = subprocess.run(
        bpfkeep_cmd(pin_dir, "daemon", "--config", str(cfg), "--check"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 0 and "ok, 1 policy rule" in check.stdout, check.stderr
    d = daemon(cfg)
    d.start()
    assert keepidle_of_new_connection(spawn, probes, a, listener) == 66
    assert "matches no cgroup" not in d.log.read_text()
    assert d.stop() == 0


def _v1_mount() -> str:
    from bpfkeep.kernel.cgroups import read_mounts

    v1 = read_mounts().v1
    if not v1:
        pytest.skip("no cgroup v1 hierarchy mounted on this host")
    return v1[0]


def test_a_cgroup_v1_rule_is_refused_by_check_at_start_and_on_reload(
    daemon, cgroups, spawn, probes, listener, tmp_path, pin_dir
):
    """A rule naming a cgroup v1 path can never match: one line naming the
    file, the key and the fix -- from --check, from a daemon starting (exit
    2) and from a reload (rejected, the old policies stay)."""
    mount = cgroups.mount
    v1 = f"{_v1_mount()}/bpfkeep-test-v1/*.service"
    port = free_port()
    bad = write_config(tmp_path / "v1.toml", port, rule(v1, keepidle=67))
    for extra in (("--check",), ()):
        proc = subprocess.run(
            bpfkeep_cmd(pin_dir, "daemon", "--config", str(bad), *extra),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 2, (extra, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        for needle in ("v1.toml:", "policy[0].cgroup", "cgroup v1", mount):
            assert needle in lines[0], lines[0]
    a = cgroups.make("a.service")
    good = rule(f"{cgroups.rel(cgroups.base)}/*.service", keepidle=68)
    cfg = write_config(tmp_path / "c.toml", port, good)
    d = daemon(cfg)
    d.start()
    assert keepidle_of_new_connection(spawn, probes, a, listener) == 68
    cfg.write_text(bad.read_text())
    d.signal(signal.SIGHUP)
    assert "cgroup v1" in d.wait_message("STATUS=reload rejected")
    assert keepidle_of_new_connection(spawn, probes, a, listener) == 68
    assert d.stop() == 0


def test_rules_that_match_nothing_yet_are_logged_once_per_load(daemon, cgroups, tmp_path):
    """The shipped config on a host without system.slice used to say only
    "enforcing 0 cgroup(s)".  Now each rule that matches nothing yet is
    logged at start and at each reload, once, with the directory watched
    for it; one whose cgroups all take an earlier rule is named too."""
    base = cgroups.rel(cgroups.base)
    cgroups.make("m.service")
    port = free_port()
    text = (REPO / "deploy" / "bpfkeep.toml").read_text()
    assert 'cgroup = "system.slice/*.service"' in text
    text = text.replace(
        'cgroup = "system.slice/*.service"', f'cgroup = "{base}/system.slice/*.service"'
    ).replace('listen = "127.0.0.1:9977"', f'listen = "127.0.0.1:{port}"')
    text += f'[[policy]]\ncgroup = "{base}/m.service"\n[[policy]]\ncgroup = "{base}/m.*"\n'
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    d = daemon(cfg)
    d.start()

    def lines(needle: str) -> list[str]:
        return [ln for ln in d.log.read_text().splitlines() if needle in ln]

    (first,) = lines("policy[0]")
    assert "matches no cgroup yet" in first, first
    assert f"watching {cgroups.base} for system.slice/*.service" in first, first
    (shadowed,) = lines("policy[2]")
    assert "an earlier rule" in shadowed, shadowed
    assert lines("policy[1]") == []  # it matches m.service
    d.signal(signal.SIGHUP)
    d.wait_message("STATUS=")
    assert len(lines("policy[0]")) == 2
    svc = cgroups.make("system.slice/a.service")  # now it matches
    assert wait_until(lambda: bpftool_prog_ids(svc, "cgroup_sock_ops"), 30), d.log.read_text()
    d.signal(signal.SIGHUP)
    d.wait_message("STATUS=")
    assert len(lines("policy[0]")) == 2
    assert d.stop() == 0


def test_one_daemon_per_pin_directory(
    daemon, cgroups, spawn, probes, listener, tmp_path, bk, pin_dir
):
    """A second daemon with another config and the same pin directory used
    to start without a word and detach the first one's attachments as "no
    longer in the config".  It now exits non-zero with one line naming the
    pid that keeps the pin directory, and touches nothing -- also after an
    rm -rf of the pin directory (which the first heals).  attach and detach
    by hand still run beside the daemon, which leaves what they attach
    alone."""
    a, b = cgroups.make("a.service"), cgroups.make("b.service")
    base = cgroups.rel(cgroups.base)
    first = write_config(tmp_path / "one.toml", free_port(), rule(f"{base}/a.service", keepidle=71))
    d = daemon(first)
    d.start()
    assert keepidle_of_new_connection(spawn, probes, a, listener) == 71
    other = write_config(
        tmp_path / "two.toml",
        free_port(),
        rule(f"{base}/b.service", keepidle=72) + rule(f"{base}/a.service", keepidle=73),
    )

    def second_refused() -> None:
        try:
            proc = subprocess.run(
                bpfkeep_cmd(pin_dir, "daemon", "--config", str(other)),
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.fail("a second daemon started on the same pin directory")
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert f"pid {d.proc.pid}" in line and pin_dir in line, line
        assert keepidle_of_new_connection(spawn, probes, a, listener) == 71
        assert bpftool_prog_ids(b, "cgroup_sock_ops") == []

    second_refused()
    # By hand beside the daemon: not held up by its lock, and left alone.
    t0 = time.monotonic()
    bk("attach", "--cgroup", b, "--keepidle", "74")
    assert time.monotonic() - t0 < 30
    d.signal(signal.SIGHUP)
    d.wait_message("STATUS=")
    assert keepidle_of_new_connection(spawn, probes, b, listener) == 74
    bk("detach", "--cgroup", b)
    assert bpftool_prog_ids(b, "cgroup_sock_ops") == []
    # rm -rf of the pin directory: the daemon restores it and still keeps it.
    shutil.rmtree(pin_dir)
    d.wait_log(f"/{cgroups.rel(a)}: restored", timeout=120)
    second_refused()
    assert "detached" not in d.log.read_text()
    assert d.stop() == 0
    # Once it is gone, the next one starts.
    d2 = daemon(other)
    d2.start()
    assert keepidle_of_new_connection(spawn, probes, a, listener) == 73
    assert d2.stop() == 0


def test_hand_made_attachment_is_left_alone(daemon, cgroups, spawn, probes, listener, tmp_path, bk):
    """``bpfkeep attach --mode enforce --keepidle 50`` by hand, then a daemon
    whose rule matches the same cgroup: the attachment keeps its mode and
    values, and a reload whose rule no longer matches does not detach it."""
    m_cg = cgroups.make("m.service")
    bk("attach", "--cgroup", m_cg, "--mode", "enforce", "--keepidle", "50")
    base = cgroups.rel(cgroups.base)
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", port, rule(f"{base}/*.service", keepidle=25))
    d = daemon(cfg)
    d.start()
    label = "/" + cgroups.rel(m_cg)

    def enforced_50() -> None:
        # A program raising its keepidle is capped: enforce mode, 50.
        cli = spawn(
            [probes["static"], "connect", "127.0.0.1", str(listener), "set", "keepidle=900",
             "hold"], cgroup=m_cg,
        )  # fmt: skip
        assert cli.values("client")["keepidle"] == 50
        assert keepidle_of_new_connection(spawn, probes, m_cg, listener) == 50
        (att,) = json.loads(bk("status", "--json").stdout)
        assert not att["managed_by_daemon"]
        assert att["policy"]["keepidle"] == 50 and att["policy"]["mode"] == "enforce"

    enforced_50()
    assert "attached by hand" in d.wait_log(label)
    m = scrape(port)
    assert sample(m, "bpfkeep_policy_unmanaged", cgroup=label) == 1
    assert sample(m, "bpfkeep_policy_attached", cgroup=label, mode="enforce") == 1

    d.signal(signal.SIGHUP)  # same config: still left alone, logged only once
    assert "attached by hand" in d.wait_message("STATUS=")
    cfg.write_text(cfg.read_text().replace("*.service", "*.worker"))
    d.signal(signal.SIGHUP)  # the rule no longer matches
    d.wait_message("STATUS=")
    enforced_50()
    assert len(bpftool_prog_ids(m_cg, "cgroup_sock_ops")) == 1
    log = d.log.read_text()
    assert log.count("attached by hand") == 1, log
    assert "detached" not in log, log
    assert sample(scrape(port), "bpfkeep_policy_unmanaged", cgroup=label) is None
    assert d.stop() == 0
    enforced_50()


def test_daemon_restores_removed_pins(daemon, cgroups, spawn, probes, listener, tmp_path, pin_dir):
    """One link pin, then the whole pin directory, removed under a running
    daemon: enforcement is restored, logged and counted."""
    from bpfkeep.enforcer import Enforcer

    a = cgroups.make("a.service")
    port = free_port()
    cfg = write_config(
        tmp_path / "c.toml", port, rule(f"{cgroups.rel(cgroups.base)}/*.service", keepidle=64)
    )
    d = daemon(cfg)
    d.start()
    assert keepidle_of_new_connection(spawn, probes, a, listener) == 64
    errors = sample(scrape(port), "bpfkeep_reconcile_errors_total")

    def restored() -> bool:
        return keepidle_of_new_connection(spawn, probes, a, listener) == 64

    link = os.path.join(Enforcer(pin_dir).link_dir, f"{os.stat(a).st_ino}_sockops")
    os.unlink(link)  # the kernel detaches the link with its last reference
    assert wait_until(restored, timeout=60, step=0.2), d.log.read_text()
    assert "sockops" in d.wait_log("removed under the daemon")
    after_link = sample(scrape(port), "bpfkeep_reconcile_errors_total")
    assert after_link > errors

    shutil.rmtree(os.path.dirname(link))  # every link, the objects stay
    assert wait_until(restored, timeout=60, step=0.2), d.log.read_text()
    assert wait_until(
        lambda: sample(scrape(port), "bpfkeep_reconcile_errors_total") > after_link, 30, 0.2
    )
    after_link = sample(scrape(port), "bpfkeep_reconcile_errors_total")

    shutil.rmtree(pin_dir)
    assert wait_until(restored, timeout=120, step=0.5), d.log.read_text()
    d.wait_log("loading them again")
    d.wait_log(f"/{cgroups.rel(a)}: restored")
    assert sample(scrape(port), "bpfkeep_reconcile_errors_total") > after_link
    assert len(bpftool_prog_ids(a, "cgroup_sock_ops")) == 1
    assert d.stop() == 0


def test_hand_attach_over_a_daemon_cgroup_is_then_left_alone(
    daemon, cgroups, spawn, probes, listener, tmp_path, bk
):
    """An operator re-attaches a daemon-managed cgroup by hand: from then on
    it is theirs; neither a reload that still matches nor one that no
    longer does changes or detaches it."""
    a = cgroups.make("a.service")
    base = cgroups.rel(cgroups.base)
    cfg = write_config(tmp_path / "c.toml", free_port(), rule(f"{base}/*.service", keepidle=25))
    d = daemon(cfg)
    d.start()
    assert keepidle_of_new_connection(spawn, probes, a, listener) == 25
    bk("attach", "--cgroup", a, "--keepidle", "40")
    matching = cfg.read_text()
    cfg.write_text(matching.replace("*.service", "*.worker"))
    d.signal(signal.SIGHUP)
    d.wait_message("STATUS=")
    assert keepidle_of_new_connection(spawn, probes, a, listener) == 40
    cfg.write_text(matching)
    d.signal(signal.SIGHUP)
    assert "1 attached by hand" in d.wait_message("STATUS=")
    assert keepidle_of_new_connection(spawn, probes, a, listener) == 40
    assert "detached" not in d.log.read_text()
    assert d.stop() == 0


def test_audit_backoff_counts_the_cpu_of_the_sweeps_threads(
    pin_dir, cgroups, tmp_path, monkeypatch
):
    """The periodic pass's CPU decides how long a whole pass takes at 0.1 %
    of a CPU; the sweep does a namespace's work in a thread that enters it
    (kernel.netns.Entered), whose CPU the sweeping thread's own clock never
    sees (with 10,000 held connections a pass every audit_interval took
    1.8 % of a CPU instead of backing off).  Work done there must count."""
    from bpfkeep import config as bk_config
    from bpfkeep.daemon.passes import Passes
    from bpfkeep.daemon.state import State
    from bpfkeep.enforcer import Enforcer
    from bpfkeep.kernel.cgroups import Cgroup, cgroup2_mount
    from bpfkeep.options import Policy
    from bpfkeep.sweep import runs

    cfg = write_config(tmp_path / "bpfkeep.toml", free_port(), "", audit=1)
    state = State(str(cfg), Enforcer(pin_dir), cfg=bk_config.load(str(cfg)), mount=cgroup2_mount())
    app = Cgroup.at(cgroups.make("app"), state.mount)
    state.enforcer.attach(app, Policy.from_mapping({"keepidle": 30}), managed=True)
    with state.table.lock:
        entry = state.table.entry(app)
        entry.attached, entry.policy = "ours", Policy.from_mapping({"keepidle": 30})
    passes = Passes(state)

    def busy(self, ns) -> None:  # a namespace's work, in the thread entering it
        def burn() -> None:
            t0 = time.thread_time()
            while time.thread_time() - t0 < 0.3:
                pass

        self.sweep.entered.call(burn, ns.tid)

    monkeypatch.setattr(runs.Apply, "run", busy)
    passes.start()
    try:
        passes.audit(lambda _cg: True)
        assert wait_until(lambda: passes.audit_cost is not None, timeout=30), passes.backlog()
    finally:
        passes.stop()
    assert passes.audit_cost >= 0.3
    assert passes.every() >= 300
