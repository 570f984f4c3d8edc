"""The daemon's config and systemd plumbing: pure logic, no root."""

from __future__ import annotations

import os
import socket

import pytest

from bpfkeep import config
from bpfkeep.config import ConfigError, loads
from bpfkeep.daemon import reconcile, systemd
from bpfkeep.kernel.cgroups import Mounts


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
        ("[daemon]\naudit_interval = inf\n", "f.toml:2: daemon.audit_interval: expected seconds"),
        ("[daemon]\naudit_interval = 1e308\n", "0 (no audit) or 1..86400"),
        ("[daemon]\naudit_interval = nan\n", "daemon.audit_interval: expected seconds"),
        ("[daemon]\naudit_interval = -inf\n", "daemon.audit_interval"),
        ("[daemon]\naudit_interval = 0.5\n", "daemon.audit_interval"),
        ("[daemon]\naudit_interval = 86401\n", "daemon.audit_interval"),
        ('[daemon]\naudit_interval = "15"\n', "daemon.audit_interval"),
        ("[daemon]\nenforce_interval = 61\n", "f.toml:2: daemon.enforce_interval: expected"),
        ("[daemon]\nenforce_interval = 0\n", "daemon.enforce_interval"),
        ("[daemon]\nenforce_interval = nan\n", "daemon.enforce_interval"),
        ("[daemon]\nenforce_interval = true\n", "daemon.enforce_interval"),
        ('[metrics]\nlisten = "127.0.0.1:0"\n', "f.toml:2: metrics.listen: port '0' is"),
        ('[metrics]\nlisten = "127.0.0.1:\u0661\u0665"\n', "is not 1..65535"),
        ('[metrics]\nlisten = "127.0.0.1: 9977"\n', "is not 1..65535"),
        ('[metrics]\nlisten = "127.0.0.1:9_977"\n', "is not 1..65535"),
        ('[[policy]]\ncgroup = "a"\nkeepidle = "1_000"\n', "expected a whole number"),
        ('[[policy]]\ncgroup = "a"\nexisting = "no"\n', "f.toml:3: policy[0].existing: expected"),
        ('[[policy]]\ncgroup = "a"\n[[policy]]\ncgroup = "b"\nexisting = 0\n',
         "f.toml:5: policy[1].existing: expected true or false"),
        ("policy = [1]\n", "policy[0]: write each policy as a [[policy]] table"),
        ('policy = [{cgroup = "a", keepcnt = 500}]\n', "f.toml: policy[0].keepcnt: 500 is out"),
        ('[[policy]]\ncgroup = "a"\n"a\\nb" = 1\n', 'f.toml:3: policy[0]."a\\nb": unknown key'),
        ('[[policy]]\ncgroup = "a"\n[policy.x]\n', "f.toml:3: policy[0].x: unknown key"),
        ("[[policy]]\ncgroup = 'a'\nkeepidle = 1" + "0" * 5000 + "\n", "f.toml:3: not valid TOML"),
        ("a = " + "[" * 5000 + "]" * 5000 + "\n", "f.toml: not valid TOML: arrays or"),
        ('[[policy]]\ncgroup = "a"\nkeepidle = 0x\n', "f.toml:3: not valid TOML: Expected newline"),
    ],
)  # fmt: skip
def test_errors_name_file_line_and_key(text, expect):
    with pytest.raises(ConfigError) as e:
        loads(text, "f.toml")
    msg = str(e.value)
    assert expect in msg and "\n" not in msg
    assert msg.startswith("f.toml")


def test_audit_interval_range():
    for text, value in (("0", 0.0), ("1", 1.0), ("86400", 86400.0), ("15.5", 15.5)):
        assert loads(f"[daemon]\naudit_interval = {text}\n").audit_interval == value


def test_enforce_interval_range_and_default():
    assert loads("").enforce_interval == 30.0
    for text, value in (("1", 1.0), ("60", 60.0), ("2.5", 2.5)):
        assert loads(f"[daemon]\nenforce_interval = {text}\n").enforce_interval == value


def test_listen_port_range():
    assert loads('[metrics]\nlisten = "127.0.0.1:1"\n').listen == ("127.0.0.1", 1)
    assert loads('[metrics]\nlisten = "[::1]:65535"\n').listen == ("::1", 65535)


def test_existing_key():
    r0, r1 = loads('[[policy]]\ncgroup = "a"\n[[policy]]\ncgroup = "b"\nexisting = false\n').rules
    assert r0.existing is True and r1.existing is False


def check_line(argv, capsys) -> str:
    from bpfkeep import cli

    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def test_non_utf8_file_is_one_line(tmp_path, capsys):
    """A stray Latin-1 byte was a UnicodeDecodeError traceback on --check
    and killed the daemon on SIGHUP."""
    f = tmp_path / "bad.toml"
    f.write_bytes(b'[[policy]]\ncgroup = "caf\xe9"\n')
    with pytest.raises(ConfigError) as e:
        config.load(str(f))
    assert str(e.value) == (f"{f}:2: not UTF-8 (byte 0xe9 at offset 24); save the file as UTF-8")
    err = check_line(["daemon", "--config", str(f), "--check"], capsys)
    assert err.startswith(f"bpfkeep: {f}:2: not UTF-8")


def test_not_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # opened without O_NONBLOCK, this waits for a writer forever
    with pytest.raises(ConfigError, match=r"fifo\.toml: not a regular file"):
        config.load(str(fifo))
    with pytest.raises(ConfigError, match="not a regular file"):
        config.load(str(tmp_path))


@pytest.mark.skipif(os.geteuid() != 0, reason="the ownership check is the root daemon's")
@pytest.mark.parametrize(
    "mode, uid, expect",
    [
        (0o644, 0, None),
        (0o600, 0, None),
        (0o666, 0, "is writable by others: chmod go-w "),
        (0o664, 0, "is writable by others: chmod go-w "),
        (0o646, 0, "is writable by others: chmod go-w "),
        (0o644, 65534, "owned by uid 65534, not root"),
    ],
)
def test_root_refuses_a_config_others_can_write(tmp_path, capsys, mode, uid, expect):
    f = tmp_path / "c.toml"
    f.write_text('[[policy]]\ncgroup = "a"\n')
    os.chmod(f, mode)
    os.chown(f, uid, -1)
    if expect is None:
        assert len(config.load(str(f)).rules) == 1
        return
    with pytest.raises(ConfigError) as e:
        config.load(str(f))
    assert str(e.value).startswith(f"{f}: {expect}")
    if "chmod" in expect:
        assert str(e.value).endswith(f"chmod go-w {f}")
    check_line(["daemon", "--config", str(f), "--check"], capsys)


def test_the_same_file_again_is_the_same_config(tmp_path):
    """load(previous=): the same bytes and mounts give the Config back
    unparsed; changed bytes, or other mounts, are parsed; the file is read
    and checked each time (a file others can now write is refused even
    with the same bytes)."""
    f = tmp_path / "c.toml"
    f.write_text('[[policy]]\ncgroup = "a"\nkeepidle = 30\n')
    mounts = Mounts("/sys/fs/cgroup", ())
    first = config.load(str(f), mounts)
    assert config.load(str(f), mounts, previous=first) is first
    other = config.load(str(f), Mounts("/other/cgroup2", ()), previous=first)
    assert other is not first and other.rules == first.rules
    f.write_text('[[policy]]\ncgroup = "a"\nkeepidle = 31\n')
    changed = config.load(str(f), mounts, previous=first)
    assert changed is not first and changed.rules[0].policy.keepidle == 31
    if os.geteuid() == 0:
        f.write_text('[[policy]]\ncgroup = "a"\nkeepidle = 30\n')
        os.chmod(f, 0o666)
        with pytest.raises(ConfigError, match="writable by others"):
            config.load(str(f), mounts, previous=first)


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


HYBRID = Mounts("/sys/fs/cgroup/unified", ("/sys/fs/cgroup/memory", "/sys/fs/cgroup/cpu"))


@pytest.mark.parametrize(
    "mounts, pattern, rel",
    [
        (HYBRID, "/sys/fs/cgroup/unified/x", "x"),
        (HYBRID, "/sys/fs/cgroup/unified/system.slice/*.service/", "system.slice/*.service"),
        (HYBRID, "/system.slice/*.service", "system.slice/*.service"),  # as /proc/PID/cgroup
        (Mounts("/sys/fs/cgroup", ()), "/sys/fs/cgroup/kubepods/**", "kubepods/**"),
        (None, "/sys/fs/cgroup/unified/x", "sys/fs/cgroup/unified/x"),  # loads() alone
    ],
)
def test_a_rule_under_the_cgroup2_mount_is_relative_to_it(mounts, pattern, rel):
    assert loads(f'[[policy]]\ncgroup = "{pattern}"\n', mounts=mounts).rules[0].pattern == rel


@pytest.mark.parametrize(
    "pattern, needles",
    [
        ("/sys/fs/cgroup/memory/x", ["cgroup v1", "cgroup2 mount at /sys/fs/cgroup/unified"]),
        ("/sys/fs/cgroup/cpu/a/*.service", ["cgroup v1"]),
        ("/sys/fs/cgroup/x", ["not under the cgroup2 mount at /sys/fs/cgroup/unified"]),
        ("/sys/fs/cgroup/unified", ["the root cgroup"]),
    ],
)
def test_a_rule_that_can_never_match_is_refused(pattern, needles):
    with pytest.raises(ConfigError) as e:
        loads(f'[[policy]]\ncgroup = "{pattern}"\n', "f.toml", mounts=HYBRID)
    msg = str(e.value)
    assert msg.startswith("f.toml:2: policy[0].cgroup: ") and "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


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
        assert systemd.sd_notify("READY=1\nSTATUS=x", {"NOTIFY_SOCKET": path})
        assert s.recv(100) == b"READY=1\nSTATUS=x"
    assert not systemd.sd_notify("READY=1", {})  # not under systemd: silently nothing


def test_watchdog_interval():
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert systemd.watchdog_interval({}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None


def test_journal_formatter():
    import logging

    rec = logging.LogRecord("bpfkeep", logging.ERROR, __file__, 1, "boom %s", ("x",), None)
    assert systemd.JournalFormatter(True).format(rec) == "<3>boom x"
    assert "error: boom x" in systemd.JournalFormatter(False).format(rec)


# -- scale -------------------------------------------------------------------


@pytest.fixture()
def text_scans(monkeypatch):
    """The passes loads() makes over the text to find line numbers."""
    made: list[config._Lines] = []

    class Counting(config._Lines):
        def __init__(self, text: str) -> None:
            super().__init__(text)
            made.append(self)

    monkeypatch.setattr(config, "_Lines", Counting)
    return lambda: sum(lines.scans for lines in made)


def test_thousands_of_policies_load_in_linear_time(text_scans):
    """A scan of the text per key made loading quadratic: 54 s at 4,000
    policies, past the unit's start timeout.  Now the text is scanned
    once, and only when an error needs a line number."""
    n = 4000
    body = "".join(
        f'[[policy]]\ncgroup = "s/u{i}.service"\nkeepidle = {i % 100 + 1}\n' for i in range(n)
    )
    cfg = loads(body, "f.toml")
    assert len(cfg.rules) == n and text_scans() == 0
    assert cfg.policy_for("s/u3999.service").index == n - 1
    assert cfg.policy_for("s/u4000.service") is None
    with pytest.raises(ConfigError) as e:
        loads(body + '[[policy]]\ncgroup = "x"\nkeepcnt = 500\n', "f.toml")
    assert str(e.value).startswith(f"f.toml:{3 * n + 3}: policy[{n}].keepcnt: 500 is out of range")
    assert text_scans() == 1


@pytest.fixture()
def segment_tests(monkeypatch):
    calls = [0]
    match = config._Segment.match

    def counting(self, part):
        calls[0] += 1
        return match(self, part)

    monkeypatch.setattr(config._Segment, "match", counting)
    return calls


def test_repeated_double_star_is_polynomial(segment_tests):
    """Trying every split for every ** was exponential in their number (27 s
    to start with 8 of them).  The automaton tests each (pattern segment,
    path segment) pair at most once per lookup."""
    pattern = "/".join(["**", "a*"] * 8 + ["b"])  # 17 segments, 8 non-adjacent **
    rule = loads(f'[[policy]]\ncgroup = "{pattern}"\n').rules[0]
    path = "/".join(["a"] * 40)
    assert not rule.matches(path)
    assert rule.matches(path + "/b")
    assert rule.may_match_below(path)
    assert segment_tests[0] <= 3 * 17 * 41
    consecutive = loads('[[policy]]\ncgroup = "' + "**/" * 8 + 'x"\n').rules[0]
    assert len(consecutive.glob.segs) == 2  # **/**/... is one **
    assert consecutive.matches(path + "/x") and not consecutive.matches(path)


def test_many_rules_are_looked_up_not_scanned(segment_tests):
    """10,000 rules x 10,000 cgroups were 1e8 fnmatch calls.  All rules
    form one automaton: plain names are dict lookups, and a glob is tested
    only where its position and leading plain text fit the name."""
    n = 10_000
    rules = "".join(f'[[policy]]\ncgroup = "s/u{i}.service"\n' for i in range(n))
    rules += "".join(f'[[policy]]\ncgroup = "**/db{i}-*.scope"\nkeepidle = 7\n' for i in range(n))
    rules += '[[policy]]\ncgroup = "s/*.service"\nkeepidle = 8\n'
    rules += '[[policy]]\ncgroup = "other/**"\nkeepidle = 9\n'
    cfg = loads(rules)
    for i in range(n):
        assert cfg.policy_for(f"s/u{i}.service").index == i
        assert cfg.watch(f"s/u{i}.service")  # **/db*-*.scope may be below
    # Per lookup, s/*.service is tested once; none of the **/db* globs is
    # (no name starts with "db"), where every rule was tried before.
    assert segment_tests[0] <= 2 * n
    segment_tests[0] = 0
    for i in range(0, n, 10):
        assert cfg.policy_for(f"user.slice/x/db{i}-1.scope").index == n + i
    assert segment_tests[0] <= 2 * 3 * (n // 10)  # a few per path segment
    assert cfg.policy_for("s/new.service").policy.keepidle == 8
    assert cfg.policy_for("other/a/b").policy.keepidle == 9
    assert cfg.watch("") and cfg.watch("s") and cfg.watch("other/a") and cfg.watch("user.slice")
    assert cfg.policy_for("user.slice") is None and cfg.policy_for("s") is None


def test_plain_rules_are_one_dict_lookup(monkeypatch):
    """A rule without a wildcard is an entry of one dict keyed by its whole
    path: building the index makes no per-segment objects for it and a
    lookup walks no automaton.  (Indexed segment by segment, 10,000 plain
    rules cost 0.12 s and ~5 MB to index, on the daemon's first lookup
    after every load: the load test counted that as 0.24 ms a cgroup.)"""
    made, steps = [0], [0]
    seg_init, step = config._Segment.__init__, config._Node.step

    def counting_init(self, text):
        made[0] += 1
        seg_init(self, text)

    def counting_step(self, part, out):
        steps[0] += 1
        step(self, part, out)

    monkeypatch.setattr(config._Segment, "__init__", counting_init)
    monkeypatch.setattr(config._Node, "step", counting_step)
    n = 10_000
    cfg = loads("".join(f'[[policy]]\ncgroup = "k/s/u{i}.service"\n' for i in range(n)))
    for i in range(0, n, 7):
        assert cfg.policy_for(f"k/s/u{i}.service").index == i
        assert cfg.policy_for(f"/k//s/u{i}.service/").index == i  # as _parts reads it
        assert not cfg.watch(f"k/s/u{i}.service")
    assert cfg.policy_for("k/s") is None and cfg.policy_for("k/s/u1.service/x") is None
    assert cfg.watch("") and cfg.watch("k") and cfg.watch("k/s") and not cfg.watch("k/t")
    assert made[0] == 0 and steps[0] == 0
    # A glob rule beside them is still tried, and the first rule in the file wins.
    cfg = loads(
        '[[policy]]\ncgroup = "k/s/a"\nkeepidle = 1\n'
        '[[policy]]\ncgroup = "k/*/b"\nkeepidle = 2\n'
        '[[policy]]\ncgroup = "k/s/b"\nkeepidle = 3\n'
        '[[policy]]\ncgroup = "k/s/a"\nkeepidle = 4\n'
    )
    assert [cfg.policy_for(p).policy.keepidle for p in ("k/s/a", "k/s/b", "k/t/b")] == [1, 2, 2]
    assert cfg.policy_for("k/t/a") is None
    assert cfg.watch("k/t") and not cfg.watch("k/t/b")


def test_rules_with_the_same_values_share_one_policy():
    """The daemon keeps a policy per cgroup: 10,000 tables with the same
    values are one object, not 10,000."""
    cfg = loads(
        "".join(
            f'[[policy]]\ncgroup = "s/u{i}"\nkeepidle = 5\nmode = "enforce"\n' for i in range(3)
        )
        + '[[policy]]\ncgroup = "s/v"\nmode = "enforce"\nkeepidle = 5\n'
        + '[[policy]]\ncgroup = "s/w"\nkeepidle = 6\n'
    )
    p = [r.policy for r in cfg.rules]
    assert p[0] is p[1] is p[2] is p[3] and p[4] is not p[0]
    assert p[0].keepidle == 5 and p[0].mode == "enforce" and p[4].keepidle == 6


def test_first_match_wins_across_plain_and_glob_rules():
    cfg = loads(
        '[[policy]]\ncgroup = "s/*.service"\nkeepidle = 1\n'
        '[[policy]]\ncgroup = "s/db.service"\nkeepidle = 2\n'
        '[[policy]]\ncgroup = "t/db.service"\nkeepidle = 3\n'
        '[[policy]]\ncgroup = "**/db.service"\nkeepidle = 4\n'
        '[[policy]]\ncgroup = "t/db.service"\nkeepidle = 5\n'
    )
    assert cfg.policy_for("s/db.service").policy.keepidle == 1
    assert cfg.policy_for("t/db.service").policy.keepidle == 3
    assert cfg.policy_for("u/v/db.service").policy.keepidle == 4


def test_line_numbers_count_newlines_only():
    """TOML allows U+2028 and U+2029 in comments; str.splitlines()
    counts them as line breaks, TOML does not."""
    text = '# a \u2029 b \u2028 c\n[[policy]]\ncgroup = "a"\nkeepcnt = 500\n'
    with pytest.raises(ConfigError, match=r"^f\.toml:4: policy\[0\]\.keepcnt"):
        loads(text, "f.toml")


# -- containers and pods -------------------------------------------------------


@pytest.mark.parametrize(
    "text, expect",
    [
        ('[[policy]]\ncgroup = "a"\ncontainer = "web"\n',
         "f.toml:2: policy[0].cgroup: a rule names either a cgroup or workloads (container)"),
        ('[[policy]]\nlabels = { a = "b" }\ncgroup = "a"\n', "not both"),
        ('[[policy]]\nkeepidle = 3\n', "missing key cgroup (or container, labels, pod)"),
        ('[[policy]]\ncontainer = ""\n', "f.toml:2: policy[0].container: expected a container"),
        ('[[policy]]\ncontainer = 3\n', "policy[0].container: expected a container name"),
        ('[[policy]]\nlabels = {}\n', "f.toml:2: policy[0].labels: expected a table of strings"),
        ('[[policy]]\nlabels = { a = 1 }\n', "policy[0].labels: expected a table of strings"),
        ('[[policy]]\nlabels = "a=b"\n', "policy[0].labels: expected a table of strings"),
        ('[[policy]]\npod = "payments"\n', 'f.toml:2: policy[0].pod: expected "NAMESPACE/POD"'),
        ('[[policy]]\npod = "a/b/c/d"\n', "policy[0].pod: expected"),
        ('[[policy]]\npod = 1\n', "policy[0].pod: expected"),
        ('[[policy]]\ncontainer = "a"\nkeepidle = 0x7fffffff\n', "policy[0].keepidle"),
        ('[containers]\ndocker = "/x"\n', "f.toml:2: containers.docker: unknown key (expected"),
        ('[containers]\ndocker_socket = "run/docker.sock"\n', "expected an absolute path"),
        ('[containers]\ntimeout = 0\n', "f.toml:2: containers.timeout: expected seconds, 0.01..10"),
        ('[containers]\ntimeout = "1"\n', "containers.timeout: expected seconds"),
        ("containers = 1\n", "containers: must be a table [containers]"),
        ('[metrics]\nworkload_labels = "pod"\n',
         'f.toml:2: metrics.workload_labels: expected "container", "namespace" or "none"'),
    ],
)  # fmt: skip
def test_workload_rule_errors(text, expect):
    with pytest.raises(ConfigError) as e:
        loads(text, "f.toml")
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_workload_rules_and_precedence():
    """A container's cgroup gets the first rule in the file among the
    cgroup rules matching its path and the workload rules matching the
    runtime's answer; until the runtime answers, the cgroup rules alone."""
    from bpfkeep.containers import K8S_CONTAINER, K8S_NAMESPACE, K8S_POD, Workload

    cfg = loads(
        '[metrics]\nworkload_labels = "namespace"\n'
        '[containers]\ndocker_socket = ""\npodman_socket = "/run/p.sock"\ntimeout = 0.5\n'
        '[[policy]]\ncontainer = "web-*"\nkeepidle = 1\n'
        '[[policy]]\ncgroup = "docker/*"\nkeepidle = 2\n'
        '[[policy]]\nlabels = { tier = "db" }\nkeepidle = 3\n'
        '[[policy]]\npod = "payments/api-*/app"\nmode = "enforce"\nkeepidle = 4\n'
    )
    assert [r.index for r in cfg.rules] == [1]
    assert [r.index for r in cfg.workload_rules] == [0, 2, 3]
    assert cfg.workload_labels == "namespace"
    assert cfg.runtimes.docker_socket == "" and cfg.runtimes.podman_socket == "/run/p.sock"
    assert cfg.runtimes.timeout == 0.5 and cfg.runtimes.containerd_root == "/run/containerd"
    cid = "a" * 64

    def w(name, **labels):
        return Workload(cid, "docker", name, tuple(sorted(labels.items())))

    docker, other = f"docker/{cid}", f"libpod_parent/libpod-{cid}"
    assert cfg.workload_rule(docker, None).index == 1  # not known yet: the cgroup rule
    assert cfg.workload_rule(docker, w("web-1")).index == 0  # earlier in the file
    assert cfg.workload_rule(docker, w("db", tier="db")).index == 1  # later: the cgroup rule
    assert cfg.workload_rule(other, w("db", tier="db")).index == 2
    assert cfg.workload_rule(other, w("x")) is None
    pod = {K8S_NAMESPACE: "payments", K8S_POD: "api-7f", K8S_CONTAINER: "app"}
    rule = cfg.workload_rule(other, w("k8s_app", **pod))
    assert rule.index == 3 and rule.policy.mode == "enforce"
    assert cfg.workload_rule(other, w("k8s_app", **{**pod, K8S_CONTAINER: "side"})) is None
    assert cfg.policy_for(docker).index == 1  # policy_for: cgroup rules only


def test_a_reconcile_logs_a_line_per_change_or_one_for_many(caplog):
    """10,000 updated cgroups are one log line with their number, not
    10,000 lines; a few are a line each (what an operator greps for)."""
    import logging

    caplog.set_level(logging.INFO, logger="bpfkeep")
    reconcile.log_changes([("updated", f"/s/u{i}", "set") for i in range(3)])
    assert [r.getMessage() for r in caplog.records] == [f"updated /s/u{i} (set)" for i in range(3)]
    caplog.clear()
    reconcile.log_changes(
        [("updated", f"/s/u{i}", "enforce") for i in range(10_000)] + [("attached", "/s/n", "set")]
    )
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[1] == "attached /s/n (set)"
    assert lines[0].startswith("updated 10000 cgroups: /s/u0 (enforce), /s/u1 (enforce)")
    assert lines[0].endswith("... and 9990 more")
