"""Fast, root-free tests of pure logic: the option table, parsing, header
lookup, path resolution and the map layouts."""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path

import pytest

from bpfkeep import options
from bpfkeep import peers as bpfkeep_peers
from bpfkeep.cli import build_parser, policy_from_args
from bpfkeep.errors import EnvironmentProblem, UsageError
from bpfkeep.kernel.cgroups import Mounts, read_mounts, resolve
from bpfkeep.options import BY_KEY, Policy, default_user_timeout, parse_value
from bpfkeep.progs import kheaders
from bpfkeep.progs import maps as bpfmaps

REPO = Path(__file__).resolve().parent.parent


def test_defaults_match_libkeepalive():
    p = Policy.from_mapping({})
    assert (p.keepidle, p.keepintvl, p.keepcnt) == (15, 15, 9)
    assert p.user_timeout == 150_000
    assert (p.syncnt, p.maxseg, p.window_clamp, p.defer_accept) == (0, 0, 0, 0)
    assert p.mode == "set"


def test_user_timeout_derived_from_values_in_force():
    assert Policy.from_mapping({"keepidle": 2, "keepintvl": 1, "keepcnt": 3}).user_timeout == 5000
    # Operator order: libkeepalive once computed idle + intvl * cnt * 1000.
    assert default_user_timeout(10, 2, 3) == 16_000
    assert Policy.from_mapping({"keepidle": 2, "user_timeout": 0}).user_timeout == 0
    assert Policy.from_mapping({"user_timeout": 777}).user_timeout == 777
    # Times left to the host's sysctls: no derived timeout.
    assert Policy.from_mapping({"keepidle": 0}).user_timeout == 0


@pytest.mark.parametrize(
    "key, raw, ok",
    [
        ("keepidle", "1", 1),
        ("keepidle", "32767", 32767),
        ("keepidle", "0", 0),
        ("keepidle", "32768", None),
        ("keepidle", "-1", None),
        ("keepidle", "1.5", None),
        ("keepidle", "", None),
        ("keepidle", " 7 ", None),
        ("keepidle", "7\n", None),
        ("keepidle", "1_000", None),
        ("keepidle", "+7", None),
        ("keepidle", "\u0661\u0665", None),  # Arabic-Indic 15: int() takes it, we do not
        ("keepidle", "\uff11\uff15", None),  # fullwidth 15
        ("keepidle", "007", 7),
        ("keepidle", "9" * 5000, None),  # beyond int()'s digit limit: still one line
        ("keepidle", "-" + "9" * 5000, None),
        ("keepidle", 2**70, None),
        ("keepidle", "0x10", None),
        ("keepcnt", "127", 127),
        ("keepcnt", "128", None),
        ("maxseg", "87", None),
        ("maxseg", "88", 88),
        ("user_timeout", str(2**31 - 1), 2**31 - 1),
        ("user_timeout", str(2**31), None),
        ("keepidle", True, None),
        ("keepidle", 5, 5),
    ],
)
def test_parse_value_strict(key, raw, ok):
    if ok is None:
        with pytest.raises(UsageError) as e:
            parse_value(BY_KEY[key], raw)
        assert key in str(e.value)
    else:
        assert parse_value(BY_KEY[key], raw) == ok


def test_parse_value_messages_are_short_single_lines():
    for raw in ("9" * 5000, "a\nb" * 1000, 10**4000):
        with pytest.raises(UsageError) as e:
            parse_value(BY_KEY["keepidle"], raw)
        msg = str(e.value)
        assert "\n" not in msg and len(msg) < 200 and msg.startswith("keepidle: "), msg


def test_derived_user_timeout_fits_an_int():
    """TCP_USER_TIMEOUT is an int: the largest keepalive times would derive
    (32767 + 32767 * 127) * 1000 = 4,194,176,000 ms, which the kernel
    refuses.  The shim caps it at INT_MAX (preload/policy.c); so does this."""
    assert default_user_timeout(32767, 32767, 127) == 2**31 - 1
    p = Policy.from_mapping({"keepidle": 32767, "keepintvl": 32767, "keepcnt": 127})
    assert p.user_timeout == 2**31 - 1
    assert Policy(keepidle=32767, keepintvl=32767, keepcnt=127).user_timeout == 2**31 - 1
    # Just below the cap: exact.
    assert default_user_timeout(32767, 16651, 127) == 2_147_444_000


def test_policy_defaults_come_from_the_option_table():
    fields = {f.name: f for f in dataclasses.fields(Policy)}
    assert list(fields) == [o.key for o in options.TUNABLE] + [
        "mode",
        "peers",
        "auto",
        "keepidle_min",
        "keepidle_max",
        "idle_limit",
    ]
    for opt in options.TUNABLE:
        if opt.default is not None:
            assert fields[opt.key].default == opt.default, opt.key
    assert Policy() == Policy.from_mapping({})


@pytest.mark.parametrize(
    "values",
    [
        {"keepidle": 60},
        {"keepintvl": 1, "keepcnt": 2},
        {"keepidle": 0},
        {"keepidle": 60, "user_timeout": 5},
        {"keepidle": 60, "user_timeout": 0},
        {"keepidle": 32767, "keepintvl": 32767, "keepcnt": 127},
        {"mode": "enforce", "maxseg": 1400},
    ],
)
def test_policy_constructor_and_from_mapping_agree(values):
    """Policy(keepidle=60).user_timeout was 150000 (a hand-kept default)
    while from_mapping derived 195000: both derive from the values now."""
    assert Policy(**values) == Policy.from_mapping(values)
    assert Policy(**values).user_timeout == Policy.from_mapping(values).user_timeout


def test_unknown_key_and_mode_rejected():
    with pytest.raises(UsageError, match="unknown policy key 'keepidel'"):
        Policy.from_mapping({"keepidel": 3})
    with pytest.raises(UsageError, match="mode"):
        Policy.from_mapping({"mode": "strict"})


def test_cli_flags_follow_the_table():
    parser = build_parser()
    args = parser.parse_args(
        [
            "attach",
            "--cgroup",
            "x",
            "--keepidle",
            "4",
            "--window-clamp",
            "9000",
            "--mode",
            "enforce",
        ]
    )
    p = policy_from_args(args)
    assert (p.keepidle, p.window_clamp, p.mode) == (4, 9000, "enforce")
    assert p.user_timeout == (4 + 15 * 9) * 1000
    help_text = parser._subparsers._group_actions[0].choices["attach"].format_help()
    for opt in options.TUNABLE:
        if opt.bpf:
            assert opt.flag in help_text
    assert "--defer-accept" not in help_text  # BPF cannot set it
    run_help = parser._subparsers._group_actions[0].choices["exec"].format_help()
    assert "--defer-accept" in run_help


def test_generated_headers_are_current():
    for rel, guard in options.GENERATED.items():
        assert (REPO / rel).read_text() == options.c_header(guard), (
            f"{rel} is stale: run python -m bpfkeep.options"
        )


def test_policy_round_trips_through_map_encoding():
    p = Policy.from_mapping({"keepidle": 9, "maxseg": 1400, "mode": "enforce"})
    cg, flags, back = bpfmaps.decode_policy(bpfmaps.encode_policy(1234, p))
    # keepidle 9 with the default 15 x 9 derives the user timeout: it
    # follows the times the program sets (F_UT_DERIVED).
    assert flags == bpfmaps.F_ACTIVE | bpfmaps.F_ENFORCE | bpfmaps.F_UT_DERIVED
    assert cg == 1234 and back == p
    explicit = Policy.from_mapping({"user_timeout": 5000})
    _, flags, _ = bpfmaps.decode_policy(bpfmaps.encode_policy(1, explicit))
    assert flags == bpfmaps.F_ACTIVE
    assert bpfmaps.policy_gen(p) != bpfmaps.policy_gen(explicit)
    again = Policy.from_mapping({"keepidle": 9, "maxseg": 1400, "mode": "enforce"})
    assert bpfmaps.policy_gen(p) == bpfmaps.policy_gen(again)
    # The derived value written out is the operator's: fixed, another policy.
    fixed = Policy.from_mapping(p.as_dict())
    assert fixed != p and not bpfmaps.policy_flags(fixed) & bpfmaps.F_UT_DERIVED


def test_an_update_is_encoded_as_encode_policy_would():
    """maps.updated_policy (a template per policy and old value, given each
    cgroup's id and generation) against encode_policy for the same update:
    active or not, nesting flags, old values that differ or not, peer rules."""
    a = Policy.from_mapping({"keepidle": 60, "mode": "enforce"})
    b = Policy.from_mapping({"keepidle": 61, "mode": "enforce"})
    c = b.with_peers(
        bpfkeep_peers.build({"keepidle": 61}, [{"address": "10.0.0.0/8", "keepidle": 300}])
    )
    nest = bpfmaps.F_HAS_ANCESTOR
    olds = [
        bpfmaps.encode_policy(7, a, level=2, managed=True, gen=5, nesting=nest),
        bpfmaps.encode_policy(7, a, level=2, managed=True, gen=5, active=False),
        bpfmaps.encode_policy(7, b, level=2, managed=True, gen=5),
        bpfmaps.encode_policy(7, c, level=2, managed=True, gen=5, prev=a),
    ]
    for old in olds:
        for new in (a, b, c):
            for cg_id, gen in ((7, 99), (1 << 40, 1)):
                flags = bpfmaps.policy_raw_flags(old)
                active = bool(flags & bpfmaps.F_ACTIVE)
                want = bpfmaps.encode_policy(
                    cg_id,
                    new,
                    level=2,
                    managed=True,
                    gen=gen,
                    nesting=flags & bpfmaps.F_NESTING,
                    prev=bpfmaps.decode_policy(old)[2] if active else None,
                    prev_peers=bpfmaps.policy_peers(old)[0] if active else 0,
                )
                got = bpfmaps.updated_policy(cg_id, new, old, level=2, managed=True, gen=gen)
                assert got == want


def test_legacy_policy_layout_still_decodes():
    p = Policy.from_mapping({"keepidle": 9, "mode": "enforce"})
    vals = [p.value(o.key) for o in bpfmaps.BPF_OPTIONS]
    legacy = struct.pack(
        bpfmaps.LEGACY_POLICY_FMT, 77, bpfmaps.F_ACTIVE | bpfmaps.F_ENFORCE, *vals, 0
    )
    assert bpfmaps.decode_any_policy(legacy) == (77, bpfmaps.F_ACTIVE | bpfmaps.F_ENFORCE, p)
    assert bpfmaps.decode_any_policy(b"\0" * 13) is None


def test_counters_summed_over_cpus():
    one = [0] * bpfmaps.COUNTERS_WORDS
    one[0] = 2  # seen connect
    one[4 + 1] = 5  # applied keepidle
    raw = b"".join(int.to_bytes(w, 8, "little") for _ in range(3) for w in one)
    c = bpfmaps.decode_counters(raw)
    assert c.seen["connect"] == 6 and c.applied["keepidle"] == 15


# -- headers ---------------------------------------------------------------


def _fake_headers(src: Path, version: str, flavour: str = "amd64") -> None:
    (src / f"linux-headers-{version}-{flavour}" / "include" / "generated").mkdir(parents=True)
    (src / f"linux-headers-{version}-{flavour}" / "arch" / "x86").mkdir(parents=True)
    common = src / f"linux-headers-{version}-common"
    (common / "include" / "linux").mkdir(parents=True)
    (common / "include" / "linux" / "types.h").write_text("/* */")
    (common / "arch" / "x86" / "include").mkdir(parents=True)


def test_header_sets_newest_first_and_merged(tmp_path):
    src = tmp_path / "src"
    _fake_headers(src, "5.10.0-30")
    _fake_headers(src, "6.1.0-56")
    sets = kheaders.find_header_sets(str(src))
    assert [s.version for s in sets] == ["6.1.0-56", "5.10.0-30"]
    merged = kheaders.merged_tree(sets[0], cache_dir=str(tmp_path / "cache"))
    assert os.path.islink(os.path.join(merged, "include", "linux", "types.h"))
    assert os.path.isdir(os.path.join(merged, "include", "generated"))
    # Built once, reused.
    assert kheaders.merged_tree(sets[0], cache_dir=str(tmp_path / "cache")) == merged


def test_no_headers_names_the_package(monkeypatch):
    monkeypatch.setattr(kheaders, "running_kernel_tree", lambda: None)
    monkeypatch.setattr(kheaders, "find_header_sets", lambda: [])
    with pytest.raises(EnvironmentProblem, match="apt-get install linux-headers-"):
        kheaders.bcc_environment({})


def test_explicit_bcc_kernel_source_is_respected(monkeypatch):
    monkeypatch.setattr(kheaders, "find_header_sets", lambda: [])
    env = kheaders.bcc_environment({"BCC_KERNEL_SOURCE": "/x"})
    assert env["BCC_KERNEL_SOURCE"] == "/x"


# -- cgroup paths ------------------------------------------------------------


@pytest.fixture()
def fake_tree(tmp_path):
    cg2 = tmp_path / "unified"
    for d in ("", "system.slice", "system.slice/nginx.service"):
        (cg2 / d).mkdir(exist_ok=True)
        (cg2 / d / "cgroup.procs").write_text("")
    v1 = tmp_path / "cpu"
    (v1 / "x").mkdir(parents=True)
    (cg2 / "plain").mkdir()
    return Mounts(str(cg2), (str(v1),)), cg2, v1


def test_resolve_relative_and_absolute(fake_tree):
    mounts, cg2, _ = fake_tree
    a = resolve("system.slice/nginx.service", mounts=mounts)
    b = resolve("/system.slice/nginx.service", mounts=mounts)
    c = resolve(str(cg2 / "system.slice/nginx.service"), mounts=mounts)
    assert a == b == c and a.rel == "system.slice/nginx.service"
    assert a.id == os.stat(cg2 / "system.slice/nginx.service").st_ino


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("nope", "no such cgroup"),
        ("../etc", "outside the cgroup2 mount"),
        ("plain", "not a cgroup v2 directory"),
        ("", "empty path"),
        ("/", "root cgroup"),
    ],
)
def test_resolve_errors(fake_tree, spec, needle):
    mounts, _, _ = fake_tree
    with pytest.raises(UsageError, match=needle):
        resolve(spec, mounts=mounts)


def test_resolve_a_file_is_not_a_cgroup(fake_tree, tmp_path):
    """/etc/passwd was answered "no such cgroup ... create it (mkdir
    <cgroup2>/etc/passwd)"."""
    mounts, cg2, _ = fake_tree
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0::/root:/bin/sh\n")
    (tmp_path / "etc").mkdir()
    for spec in (str(passwd), str(tmp_path / "etc"), str(cg2 / ".." / "passwd")):
        with pytest.raises(UsageError) as e:
            resolve(spec, mounts=mounts)
        msg = str(e.value)
        assert f"not under the cgroup2 mount at {cg2}" in msg and "mkdir" not in msg, msg
    with pytest.raises(UsageError) as e:
        resolve("system.slice/cgroup.procs", mounts=mounts)
    assert "is not a directory" in str(e.value) and "mkdir" not in str(e.value)
    # A path that exists nowhere is still a cgroup to create.
    with pytest.raises(UsageError, match="mkdir"):
        resolve(str(tmp_path / "nowhere"), mounts=mounts)
    with pytest.raises(UsageError) as e:
        resolve("a\nb", mounts=mounts)
    assert "\n" not in str(e.value)


def test_resolve_v1_and_forced_root(fake_tree):
    mounts, _cg2, v1 = fake_tree
    with pytest.raises(UsageError, match="cgroup v1 path: use a path under the cgroup2 mount"):
        resolve(str(v1 / "x"), mounts=mounts)
    assert resolve("/", mounts=mounts, force_root=True).is_root


def test_read_mounts(tmp_path):
    f = tmp_path / "mounts"
    f.write_text(
        "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n"
        "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
    )
    m = read_mounts(str(f))
    assert m.cgroup2 == "/sys/fs/cgroup/unified" and m.v1 == ("/sys/fs/cgroup/cpu",)
