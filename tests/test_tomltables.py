"""bpfkeep.tomltables against tomllib: for any text, the same tables or
the same error (hypothesis, on files made of the lines configs have and
of the lines that make TOML tricky), and the common shape read without
tomllib.  Pure logic: no root, no kernel."""

from __future__ import annotations

import datetime
import tomllib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpfkeep import tomltables

PROPS = settings(
    max_examples=1500,
    deadline=datetime.timedelta(seconds=20),  # a hang detector, not a timing
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

HEADERS = [
    "[[policy]]",
    "[[policy.peer]]",
    "[metrics]",
    "[daemon]",
    "[[policy]]  # a comment",
    "  [[policy.peer]]",
    "[policy]",
    "[policy.peer]",
    "[[metrics]]",
    "[[daemon.x]]",
    "[[policy.peer.deep]]",
    "[ policy ]",
    '["policy"]',
    "[[policy]] x",
    "[]",
    "[a.b]",
    "[[a]]",
]
LINES = [
    "",
    "# a comment",
    "   ",
    'cgroup = "system.slice/*.service"',
    "keepidle = 60",
    "keepidle = 61  # idle",
    "keepidle = +7",
    "keepidle = -0",
    "keepidle = 1_000",
    "keepidle = 01",
    "keepidle = 1__0",
    "keepidle = 1.5",
    "keepidle = 1e3",
    "keepidle = inf",
    "keepidle = 0x1f",
    "keepidle = 99999999999999999999999999999999999999",
    "exempt = true",
    "exempt = false",
    "exempt = True",
    "mode = 'enforce'",
    'mode = "en\\u0066orce"',
    'mode = "a # not a comment"',
    'mode = "a" "b"',
    "mode = ",
    "= 1",
    'address = "10.20.0.0/16"',
    "port = 5432",
    'port = "5432-5439"',
    "peer = 1",
    "policy = 2",
    "metrics = 3",
    "a.b = 1",
    '"quoted" = 1',
    'labels = { tier = "db" }',
    "ports = [1, 2]",
    "ports = [",
    "  [1, 2],",
    "]",
    'note = """',
    "[[policy]]",
    '"""',
    "note = '''",
    "'''",
    "\tkeepcnt\t=\t6\t",
    'key = "tab\tinside"',
    "key = 'caf\u00e9'",
    'key = "\x01"',
    "# \x7f",
    "key = 1\r",
]

KEYS = ["cgroup", "keepidle", "mode", "address", "port", "exempt", "peer", "policy", "k_1", "9"]
VALUES = ['"x"', "'y'", "60", "+7", "-0", "1_000", "true", '"a # b"', "1.5", "[1, 2]", "01"]
key_lines = st.builds(
    "{}{} = {}{}".format,
    st.sampled_from(["", "  ", "\t"]),
    st.sampled_from(KEYS),
    st.sampled_from(VALUES),
    st.sampled_from(["", "  # why", " "]),
)
# Mostly what configs hold (so that many files are valid and read table
# by table), and now and then a line that makes TOML tricky.
texts = st.lists(
    st.one_of(
        st.sampled_from(HEADERS[:6]),
        key_lines,
        key_lines,
        st.sampled_from(HEADERS),
        st.sampled_from(LINES),
    ),
    max_size=16,
).map("\n".join)


def _config(tables: list[tuple[str, dict[str, str]]]) -> str:
    return "".join(h + "\n" + "".join(f"{k} = {v}\n" for k, v in d.items()) for h, d in tables)


# Tables with distinct keys: mostly valid files (a table defined twice, a
# key that is also a table, still happen).
configs = st.lists(
    st.tuples(
        st.sampled_from(HEADERS[:6] + ["[[policy]]", "[[policy.peer]]"] * 3),
        st.dictionaries(st.sampled_from(KEYS[:6] + KEYS[8:]), st.sampled_from(VALUES[:8])),
    ),
    max_size=10,
).map(_config)


def _outcome(fn, text):
    try:
        return "ok", fn(text)
    except tomllib.TOMLDecodeError as e:
        return "error", str(e)


@PROPS
@given(st.one_of(texts, configs))
def test_same_tables_or_the_same_error_as_tomllib(text):
    assert _outcome(tomltables.loads, text) == _outcome(tomllib.loads, text)


@PROPS
@given(st.text(alphabet=st.sampled_from("[].\"'#=\n \tpolicyer0-_1{}"), max_size=60))
def test_any_text_of_toml_punctuation(text):
    assert _outcome(tomltables.loads, text) == _outcome(tomllib.loads, text)


CONFIG = """\
[metrics]
listen = "127.0.0.1:9977"

[daemon]
audit_interval = 0

[[policy]]
cgroup = "system.slice/a.service"   # a comment
mode = "enforce"
keepidle = 60
[[policy.peer]]
address = "10.20.0.0/16"
port = "5432-5439"
keepidle = 300
[[policy.peer]]
address = "127.0.0.0/8"
exempt = true

[[policy]]
cgroup = "system.slice/b.service"
keepidle = 61
[[policy.peer]]
address = "10.20.0.0/16"
port = "5432-5439"
keepidle = 300
"""


def test_a_config_is_read_without_tomllib(monkeypatch):
    want = tomllib.loads(CONFIG)

    def refuse(_text):
        raise AssertionError("tomllib asked for the common shape")

    monkeypatch.setattr(tomltables.tomllib, "loads", refuse)
    got = tomltables.loads(CONFIG)
    assert got == want
    # Tables with the same text are separate tables.
    peers = [p for pol in got["policy"] for p in pol["peer"]]
    assert peers[0] == peers[2] and peers[0] is not peers[2]


@pytest.mark.parametrize(
    "text",
    [
        '[[policy]]\nlabels = { tier = "db" }\n',  # a body tomllib reads on its own
        "[[policy]]\nports = [\n  [1, 2],\n]\n",  # a line starting with "[" in a value
        "[metrics]\n[metrics]\n",  # defined twice: tomllib's error
        "[[policy]]\npeer = 1\n[[policy.peer]]\n",
        "a = 1\r\nb = 2\r\n",
    ],
)
def test_what_it_does_not_read_itself_is_tomllib_s(text):
    assert _outcome(tomltables.loads, text) == _outcome(tomllib.loads, text)
