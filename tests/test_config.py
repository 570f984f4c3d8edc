"""The daemon's config and systemd plumbing: pure logic, no root."""

from __future__ import annotations

import socket

import pytest

from bpfkeep import config, daemon
from bpfkeep.config import ConfigError, loads


def test_example_keys_and_defaults():
    cfg = loads(
        '[metrics]\nlisten = "127.0.0.1:9977"\n'
        '[[policy]]\ncgroup = "system.slice/*.service"\nmode = "enforce"\n'
        "keepidle = 60\nkeepintvl = 10\nkeepcnt = 6\n"
    )
    assert cfg.listen == ("127.0.0.1", 9977)
    (r,) = cfg.rules
    assert r.policy.mode == "enforce" and r.policy.user_timeout == 120_000
    assert loads("").listen == config.DEFAULT_LISTEN and loads("").rules == ()
    assert loads('[[policy]]\ncgroup = "a"\n').rules[0].policy.keepidle == 15


@pytest.mark.parametrize(
    "text, expect",
    [
        ('[[policy]]\ncgroup = "a"\nkeepidle = 0x', "not valid TOML"),
        ('[[policy]]\ncgroup = "a"\n\nkeepidle = 40000\n', "f.toml:4: policy[0].keepidle"),
        ('[[policy]]\ncgroup = "a"\n[[policy]]\ncgroup = "b"\nkeepcnt = "9"\n',
         "f.toml:5: policy[1].keepcnt: expected a whole number"),
        ('[[policy]]\ncgroup = "a"\nkeepidel = 3\n', "f.toml:3: policy[0].keepidel: unknown key"),
        ('[[policy]]\ncgroup = "a"\ndefer_accept = 3\n', "only the LD_PRELOAD shim"),
        ('[[policy]]\ncgroup = "a"\nmode = "strict"\n', 'expected "set" or "enforce"'),
        ('[[policy]]\nkeepidle = 3\n', "policy[0]: missing key cgroup"),
        ('[[policy]]\ncgroup = "/"\n', "the root is not allowed"),
        ('[[policy]]\ncgroup = "a/../b"\n', "'..' not allowed"),
        ('[metrics]\nlisten = "9977"\n', "f.toml:2: metrics.listen"),
        ('[metrics]\nlisten = "127.0.0.1:99999"\n', "port"),
        ("[metric]\n", "f.toml:1: metric: unknown key"),
        ("[daemon]\ndetach_on_exit = 1\n", "daemon.detach_on_exit: expected true or false"),
        ('[[policy]]\ncgroup = "a"\nkeepidle = true\n', "expected a whole number"),
    ],
)  # fmt: skip
def test_errors_name_file_line_and_key(text, expect):
    with pytest.raises(ConfigError) as e:
        loads(text, "f.toml")
    msg = str(e.value)
    assert expect in msg and "\n" not in msg
    assert msg.startswith("f.toml")


def test_missing_file():
    with pytest.raises(ConfigError, match=r"/no/such\.toml: cannot read"):
        config.load("/no/such.toml")


@pytest.mark.parametrize(
    "pattern, rel, match",
    [
        ("system.slice/*.service", "system.slice/nginx.service", True),
        ("system.slice/*.service", "system.slice/nginx.service/child", False),
        ("system.slice/*.service", "user.slice/nginx.service", False),
        ("system.slice/nginx.service", "system.slice/nginx.service", True),
        ("**/db-*.scope", "a/b/db-1.scope", True),
        ("**/db-*.scope", "db-1.scope", True),
        ("kubepods/**", "kubepods/burstable/pod1", True),
        ("kubepods/**", "kubepods", True),
    ],
)
def test_glob_per_segment(pattern, rel, match):
    r = loads(f'[[policy]]\ncgroup = "{pattern}"\n').rules[0]
    assert r.matches(rel) is match


def test_watch_only_directories_that_can_hold_matches():
    cfg = loads('[[policy]]\ncgroup = "system.slice/*.service"\n')
    assert cfg.watch("") and cfg.watch("system.slice")
    assert not cfg.watch("user.slice") and not cfg.watch("system.slice/a.service")
    deep = loads('[[policy]]\ncgroup = "kubepods/**"\n')
    assert deep.watch("kubepods/burstable/pod1") and not deep.watch("system.slice")


def test_first_matching_rule_wins():
    cfg = loads(
        '[[policy]]\ncgroup = "s/db.service"\nkeepidle = 5\n'
        '[[policy]]\ncgroup = "s/*.service"\nkeepidle = 50\n'
    )
    assert cfg.policy_for("s/db.service").policy.keepidle == 5
    assert cfg.policy_for("s/web.service").policy.keepidle == 50
    assert cfg.policy_for("s/web.scope") is None


def test_sd_notify_datagram(tmp_path):
    path = str(tmp_path / "n.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        assert daemon.sd_notify("READY=1\nSTATUS=x", {"NOTIFY_SOCKET": path})
        assert s.recv(100) == b"READY=1\nSTATUS=x"
    assert not daemon.sd_notify("READY=1", {})  # not under systemd: silently nothing


def test_watchdog_interval():
    assert daemon.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert daemon.watchdog_interval({}) is None
    assert daemon.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None


def test_journal_formatter():
    import logging

    rec = logging.LogRecord("bpfkeep", logging.ERROR, __file__, 1, "boom %s", ("x",), None)
    assert daemon.JournalFormatter(True).format(rec) == "<3>boom x"
    assert "error: boom x" in daemon.JournalFormatter(False).format(rec)
