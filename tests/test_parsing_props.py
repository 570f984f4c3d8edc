"""Property-based tests (hypothesis) of everything that parses user input:
the config file (as text and as bytes on disk), option values, and the
CLI's policy flags.

Every outcome is either a valid result -- every value in range -- or one
line naming the file (and line where known) and key: a ConfigError, a
UsageError, or argparse's exit 2.  Never another exception.  The deadline
only catches a hang (a parse that never returns); nothing here is timed.
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import io
import json
import math
import os
import re
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpfkeep import cli, config
from bpfkeep.config import ConfigError, loads
from bpfkeep.errors import UsageError
from bpfkeep.options import (
    BY_KEY,
    INT_MAX,
    MODES,
    TUNABLE,
    Policy,
    default_user_timeout,
    parse_value,
)

PROPS = settings(
    max_examples=300,
    deadline=datetime.timedelta(seconds=20),  # a hang detector, not a timing
    database=None,  # write nothing into the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- config text ---------------------------------------------------------------

KNOWN_KEYS = sorted(
    config.POLICY_KEYS | {"listen", "audit_interval", "detach_on_exit", "defer_accept", "x"}
)
HEADERS = [
    "",
    "[metrics]",
    "[daemon]",
    "[[policy]]",
    "[[policy]]",
    "[[policy]]",
    "[policy]",
    "[x]",
    "[[daemon]]",
    "[policy.x]",
]


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def toml_float(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return repr(x)


scalars = st.one_of(
    st.integers(-3, 70_000).map(str),
    st.integers().map(str),
    st.sampled_from(["0", "1", "15", "32767", "32768", "65535", "86400", "86401", str(INT_MAX)]),
    st.sampled_from(["1_000", "0x10", "0o17", "+15", "1" + "0" * 5000, "1e308", "-0.0"]),
    st.floats().map(toml_float),
    st.booleans().map(lambda b: "true" if b else "false"),
    st.text(max_size=20).map(json.dumps),
    st.sampled_from(
        [
            '"set"',
            '"enforce"',
            '"127.0.0.1:9977"',
            '"127.0.0.1:0"',
            '"[::1]:9977"',
            '"localhost:1"',
            '"system.slice/*.service"',
            '"**/**/db-*.scope"',
            '"a/../b"',
            '"/"',
            '"\\u0661\\u0665"',
            "1979-05-27T07:32:00Z",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.lists(st.tuples(st.sampled_from(KNOWN_KEYS), inner), max_size=3).map(
            lambda kvs: "{" + ", ".join(f"{k} = {v}" for k, v in kvs) + "}"
        ),
    ),
    max_leaves=6,
)
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(min_size=1, max_size=6)).map(toml_key)
lines = st.one_of(
    st.tuples(keys, values).map(lambda kv: f"{kv[0]} = {kv[1]}"),
    st.sampled_from(HEADERS),
    st.text(max_size=12),  # garbage
    st.just("# comment"),
)


@st.composite
def config_texts(draw) -> str:
    text = "\n".join(draw(st.lists(lines, max_size=14)))
    if draw(st.booleans()):
        text += "\n"
    return text


valid_policies = st.fixed_dictionaries(
    {"cgroup": st.sampled_from(['"a"', '"s/*.service"', '"**/x"', '"k/**"'])},
    optional={
        "mode": st.sampled_from(['"set"', '"enforce"']),
        "existing": st.sampled_from(["true", "false"]),
        **{o.key: st.integers(0, o.maximum).map(str) for o in TUNABLE if o.bpf},
    },
)


@st.composite
def mostly_valid_texts(draw) -> str:
    """Configs close to valid, so that validation (not only TOML syntax)
    is reached most of the time."""
    out = []
    if draw(st.booleans()):
        out.append(f'[metrics]\nlisten = "127.0.0.1:{draw(st.integers(-1, 70_000))}"')
    if draw(st.booleans()):
        interval = draw(st.one_of(st.integers(-2, 90_000).map(str), st.floats().map(toml_float)))
        out.append(f"[daemon]\naudit_interval = {interval}")
    for table in draw(st.lists(valid_policies, max_size=4)):
        out.append("[[policy]]\n" + "\n".join(f"{k} = {v}" for k, v in table.items()))
    text = "\n".join(out) + "\n"
    if draw(st.booleans()):  # one line replaced by anything
        ls = text.split("\n")
        ls[draw(st.integers(0, len(ls) - 1))] = draw(lines)
        text = "\n".join(ls)
    return text


LINE_AT = re.compile(r"(?::(?P<line>\d+))?: (?P<rest>.+)")


def check_config_error(msg: str, path: str, text_lines: int) -> None:
    assert "\n" not in msg and "\r" not in msg, msg
    assert msg.startswith(path + ":"), msg
    m = LINE_AT.fullmatch(msg[len(path) :])
    assert m, msg
    if m["line"]:
        assert 1 <= int(m["line"]) <= text_lines, msg
    if "not valid TOML" not in msg and "UTF-8" not in msg:
        # names a key (metrics.x, daemon.x, policy[N].x, policy[N], a top-level
        # name; TOML-quoted when not bare), then the problem
        assert re.fullmatch(
            r'(?:[\w.\[\]-]+|(?:[\w.\[\]-]*"(?:[^"\\]|\\.)*"\.?)+): \S.*', m["rest"]
        ), msg


def check_valid(cfg: config.Config) -> None:
    host, port = cfg.listen
    assert isinstance(host, str) and 1 <= port <= 65535
    assert cfg.audit_interval == 0 or 1 <= cfg.audit_interval <= config.AUDIT_MAX
    assert isinstance(cfg.detach_on_exit, bool)
    for i, r in enumerate(cfg.rules):
        assert r.index == i and r.segments() and ".." not in r.segments()
        assert isinstance(r.existing, bool)
        assert r.policy.mode in MODES
        for opt in TUNABLE:
            v = getattr(r.policy, opt.key)
            assert type(v) is int and (v == 0 or opt.minimum <= v <= opt.maximum), (opt.key, v)
        assert r.policy.user_timeout <= INT_MAX
    for rel in ("", "a", "s/x.service", "k/a/b/x"):
        cfg.policy_for(rel)
        cfg.watch(rel)


def check_text(text: str) -> None:
    try:
        cfg = loads(text, "f.toml")
    except ConfigError as e:
        check_config_error(str(e), "f.toml", text.count("\n") + 1)
    else:
        check_valid(cfg)


@PROPS
@given(config_texts())
def test_config_text_is_valid_or_one_line(text):
    check_text(text)


@PROPS
@given(mostly_valid_texts())
def test_near_valid_config_is_valid_or_one_line(text):
    check_text(text)


@PROPS
@given(st.text(max_size=200))
def test_any_text_is_valid_or_one_line(text):
    check_text(text)


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="bpfkeep-props-") as d:
        yield d


@st.composite
def config_bytes(draw) -> bytes:
    base = draw(st.one_of(mostly_valid_texts(), config_texts())).encode()
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    at = draw(st.integers(0, len(base)))
    return base[:at] + draw(st.binary(min_size=1, max_size=4)) + base[at:]


@PROPS
@given(data=config_bytes())
def test_config_bytes_on_disk_are_valid_or_one_line(scratch, data):
    path = os.path.join(scratch, "c.toml")
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o644)
    try:
        cfg = config.load(path)
    except ConfigError as e:
        check_config_error(str(e), path, data.count(b"\n") + 1)
    else:
        check_valid(cfg)


# -- glob matching ---------------------------------------------------------------

segments = st.sampled_from(["a", "b", "ab", "*", "a*", "?", "[ab]", "**", "[a"])
patterns = st.lists(segments, min_size=1, max_size=6)
paths = st.lists(st.sampled_from(["a", "b", "ab", "ba", "[a"]), max_size=6)


def reference_match(pat: list[str], parts: list[str]) -> bool:
    """The recursive matcher the automaton replaced: exponential, but
    obviously right on small inputs."""
    if not pat:
        return not parts
    if pat[0] == "**":
        return any(reference_match(pat[1:], parts[i:]) for i in range(len(parts) + 1))
    return (
        bool(parts)
        and fnmatch.fnmatchcase(parts[0], pat[0])
        and reference_match(pat[1:], parts[1:])
    )


def reference_prefix(pat: list[str], parts: list[str]) -> bool:
    if not parts:
        return bool(pat)
    if not pat:
        return False
    if pat[0] == "**":
        return True
    return fnmatch.fnmatchcase(parts[0], pat[0]) and reference_prefix(pat[1:], parts[1:])


@PROPS
@given(st.lists(patterns, min_size=1, max_size=5), st.lists(paths, min_size=1, max_size=8))
def test_indexed_matching_agrees_with_first_match_by_reference(pats, rels):
    text = "".join(f'[[policy]]\ncgroup = "{"/".join(p)}"\n' for p in pats)
    cfg = loads(text)
    for parts in rels:
        rel = "/".join(parts)
        want = next((i for i, p in enumerate(pats) if reference_match(p, parts)), None)
        got = cfg.policy_for(rel)
        assert (got.index if got else None) == want, (pats, rel)
        assert cfg.watch(rel) == any(reference_prefix(p, parts) for p in pats), (pats, rel)
        for i, p in enumerate(pats):
            assert cfg.rules[i].matches(rel) == reference_match(p, parts), (p, rel)


# -- option values and the CLI ---------------------------------------------------

raw_values = st.one_of(
    st.text(max_size=12),
    st.from_regex(r"-?[0-9]{1,12}", fullmatch=True),
    st.from_regex(r"\s*[+-]?[0-9_]{1,8}\s*", fullmatch=True),
    st.text(alphabet=st.characters(categories=["Nd", "No"]), min_size=1, max_size=4),
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.booleans(),
    st.none(),
    st.binary(max_size=4),
    st.lists(st.integers(), max_size=2),
)


def model(opt, raw) -> int | None:
    """What parse_value must answer: ASCII decimal (an optional minus), in
    range or 0; anything else refused."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, str):
        if not re.fullmatch(r"-?[0-9]+", raw):
            return None
        raw = int(raw) if len(raw) < 50 else opt.maximum + 1
    if type(raw) is not int:
        return None
    return raw if raw == 0 or opt.minimum <= raw <= opt.maximum else None


@PROPS
@given(st.sampled_from(TUNABLE), raw_values)
def test_parse_value_is_strict_and_one_line(opt, raw):
    want = model(opt, raw)
    try:
        got = parse_value(opt, raw)
    except UsageError as e:
        msg = str(e)
        assert want is None, (raw, msg)
        assert "\n" not in msg and msg.startswith(f"{opt.key}: ") and len(msg) < 200, msg
    else:
        assert got == want, raw


flags = st.sampled_from([o for o in TUNABLE if o.bpf])
flag_values = st.one_of(
    st.text(max_size=12), st.from_regex(r"-?[0-9]{1,6}", fullmatch=True), st.integers().map(str)
)


@PROPS
@given(st.lists(st.tuples(flags, flag_values), max_size=3), st.sampled_from(["attach", "run"]))
def test_cli_policy_flags_are_valid_or_one_line(pairs, command):
    argv = [command] + (["--cgroup", "x"] if command == "attach" else [])
    for opt, value in pairs:
        argv += [opt.flag, value]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = cli.build_parser().parse_args(argv)
    except SystemExit as e:
        assert e.code == 2
        out = err.getvalue()
        assert len(out.splitlines()) == 1 and out.endswith("\n"), out
        return
    policy = cli.policy_from_args(args)  # stops here: nothing is attached
    for opt, value in dict(pairs).items():  # the last of a repeated flag wins
        assert getattr(policy, opt.key) == model(BY_KEY[opt.key], value)
    assert policy.user_timeout <= INT_MAX


def _valid(opt) -> st.SearchStrategy[int]:
    edges = st.sampled_from([0, opt.minimum, opt.maximum])
    return edges | st.integers(opt.minimum, opt.maximum)


policy_values = st.fixed_dictionaries(
    {},
    optional={
        **{o.key: _valid(o) for o in TUNABLE},
        "mode": st.sampled_from(MODES),
    },
)


@given(policy_values)
def test_policy_constructor_and_from_mapping_agree_for_every_option(values):
    """One set of fields and defaults: ``Policy(**v)`` is what
    ``from_mapping(v)`` derives, for any subset of the options (the user
    timeout included: Policy(keepidle=60).user_timeout was 150000 while
    from_mapping derived 195000), from ints and from the strings a config
    or the CLI gives; and a policy survives as_dict() -- with its derived
    user timeout left out, as a config would: written out, a user timeout
    is explicit and stays fixed when a program sets its own times."""
    p = Policy(**values)
    assert p == Policy.from_mapping(values)
    assert p == Policy.from_mapping({k: str(v) for k, v in values.items()})
    written = {k: v for k, v in p.as_dict().items() if not (k == "user_timeout" and p.ut_derived)}
    assert Policy.from_mapping(written) == p
    assert p.ut_derived == ("user_timeout" not in values)
    for opt in TUNABLE:
        if opt.key not in values and opt.default is not None:
            assert getattr(p, opt.key) == opt.default, opt.key
    if "user_timeout" not in values:
        assert p.user_timeout == default_user_timeout(p.keepidle, p.keepintvl, p.keepcnt)


# -- cgroup names as text ---------------------------------------------------------


def _unprintable(text: str) -> bytes:
    """printable's inverse, written from its contract: ``\\\\`` is a
    backslash, ``\\xNN`` a byte that is not UTF-8, anything else itself."""
    out, i = bytearray(), 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1] == "\\":
            out += b"\\"
            i += 2
        elif text[i] == "\\":
            assert text[i + 1] == "x", text
            out.append(int(text[i + 2 : i + 4], 16))
            i += 4
        else:
            out += text[i].encode()
            i += 1
    return bytes(out)


@PROPS
@given(st.binary(max_size=40) | st.text(alphabet="\\xfe0/é", max_size=20).map(str.encode))
def test_printable_names_are_utf8_and_give_the_name_back(name):
    """A label value or a status row names exactly one cgroup: a raw byte
    (b"\\xff") and the four characters \\, x, f, f stay apart."""
    from bpfkeep.kernel.cgroups import printable

    text = printable(os.fsdecode(name))
    text.encode("utf-8")  # valid UTF-8: a Prometheus label may carry it
    assert _unprintable(text) == name


def test_a_raw_byte_and_a_literal_backslash_are_two_names():
    from bpfkeep.kernel.cgroups import printable

    raw, literal = os.fsdecode(b"bad\xff\xfe"), "bad\\xff\\xfe"
    assert printable(raw) == "bad\\xff\\xfe"
    assert printable(literal) == "bad\\\\xff\\\\xfe"
