"""Peer rules without the kernel: parsing, precedence, host names.

The kernel, the sweep and the audit all look a peer up in the table
``peers.flatten`` builds; here that table's answers are checked against
the rule as the README states it (the longest prefix, then a port over no
port, then the narrower range, then the first written), on random rules.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfkeep import config, peers
from bpfkeep.errors import UsageError
from bpfkeep.options import Policy


def build(*tables: dict, **values) -> tuple[peers.Peer, ...]:
    return peers.build(values, tables)


def rule_for(rules, address: str, port: int) -> int:
    return peers.match(peers.flatten(rules), address, port)


def test_the_most_specific_rule_wins():
    rules = build(
        {"address": "10.20.0.0/16", "keepidle": 300},
        {"address": "10.20.1.0/24", "port": "5432-5439", "keepcnt": 3},
        {"address": "10.20.1.0/24", "port": 5433, "keepcnt": 4},
        {"address": "127.0.0.0/8", "exempt": True},
        keepidle=60,
    )
    assert rule_for(rules, "10.20.1.5", 5433) == 3  # the narrower port range
    assert rule_for(rules, "10.20.1.5", 5434) == 2
    assert rule_for(rules, "10.20.1.5", 80) == 1  # no port rule: the /16's
    assert rule_for(rules, "10.20.9.9", 5433) == 1
    assert rule_for(rules, "127.0.0.1", 1) == 4
    assert rule_for(rules, "192.0.2.1", 1) == 0  # the policy's own values
    # IPv4-mapped IPv6 peers (an IPv6 socket talking to IPv4) match IPv4 rules.
    assert rule_for(rules, "::ffff:10.20.1.5", 5433) == 3
    assert rule_for(rules, "[::ffff:127.0.0.1]", 1) == 4


def test_a_longer_prefix_beats_a_port_on_a_shorter_one():
    rules = build(
        {"address": "10.0.0.0/8", "port": 443, "keepidle": 20},
        {"address": "10.1.0.0/16", "keepidle": 30},
    )
    assert rule_for(rules, "10.1.2.3", 443) == 2
    assert rule_for(rules, "10.9.2.3", 443) == 1


def test_rules_take_the_policys_values_for_keys_they_do_not_give():
    (rule,) = build({"address": "::1", "keepidle": 300}, keepidle=60, keepcnt=4, mode="enforce")
    assert rule.policy is not None
    assert (rule.policy.keepidle, rule.policy.keepcnt, rule.policy.mode) == (300, 4, "enforce")
    # A derived user timeout follows the rule's own times.
    assert rule.policy.user_timeout == (300 + 15 * 4) * 1000
    (fixed,) = build({"address": "::1", "keepidle": 300}, keepidle=60, user_timeout=5000)
    assert fixed.policy is not None and fixed.policy.user_timeout == 5000


@pytest.mark.parametrize(
    "table, message",
    [
        ({"address": "10.0.0.0/33"}, "is not a CIDR, an address or a host name"),
        ({"address": ""}, "expected a CIDR, an address or a host name"),
        ({"port": 5}, "address: missing"),
        ({"address": "::1", "port": 70000}, "expected a port 1..65535"),
        ({"address": "::1", "port": "9-3"}, "expected a port 1..65535"),
        ({"address": "::1", "exempt": True, "keepidle": 5}, "an exempt peer takes no values"),
        ({"address": "::1", "exempt": "yes"}, "expected true or false"),
        ({"address": "::1", "cgroup": "x"}, "unknown key in a peer rule"),
        ({"address": "::1", "defer_accept": 5}, "only the LD_PRELOAD shim sets it"),
        ({"address": "::1", "keepidle": 0.5}, "keepidle"),
    ],
)
def test_bad_rules_are_one_line_naming_the_key(table, message):
    with pytest.raises(UsageError) as e:
        peers.build({}, [table])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_same_peer_twice_is_refused():
    with pytest.raises(UsageError, match="is named by peer rule 0 already"):
        build({"address": "10.0.0.0/8"}, {"address": "10.0.0.0/8", "keepidle": 9})


def test_too_many_port_rules_at_one_address_are_refused():
    tables = [{"address": "10.0.0.0/8", "port": p} for p in range(1, 10)]
    with pytest.raises(UsageError, match="more than 8 port rules apply"):
        peers.build({}, tables)


def test_command_line_spec():
    assert peers.parse_spec("10.20.0.0/16,keepidle=300") == {
        "address": "10.20.0.0/16",
        "keepidle": "300",
    }
    assert peers.parse_spec("::1,exempt") == {"address": "::1", "exempt": True}
    assert peers.parse_spec("db.internal, port=5432-5439 ,keep-cnt=3") == {
        "address": "db.internal",
        "port": "5432-5439",
        "keep_cnt": "3",
    }
    with pytest.raises(UsageError, match="is not KEY=VALUE or exempt"):
        peers.parse_spec("::1,nonsense")


def test_config_keys_and_lines():
    cfg = config.loads(
        '[[policy]]\ncgroup = "app"\nkeepidle = 60\n'
        '[[policy.peer]]\naddress = "10.20.0.0/16"\nport = 5432\nkeepidle = 300\n'
        '[[policy.peer]]\naddress = "127.0.0.0/8"\nexempt = true\n',
        "f.toml",
    )
    (rule,) = cfg.rules
    assert [p.label for p in rule.policy.peers] == ["10.20.0.0/16 port 5432", "127.0.0.0/8"]
    with pytest.raises(config.ConfigError) as e:
        config.loads(
            '[[policy]]\ncgroup = "app"\n[[policy.peer]]\naddress = "10.0.0.0/8"\n'
            '[[policy.peer]]\naddress = "::1"\nkeepcnt = 999\n',
            "f.toml",
        )
    assert str(e.value).startswith("f.toml:7: policy[0].peer[1].keepcnt: 999 is out of range")


def test_policies_with_other_peer_rules_differ():
    a = Policy.from_mapping({"keepidle": 60})
    b = a.with_peers(build({"address": "::1", "exempt": True}))
    c = a.with_peers(build({"address": "::2", "exempt": True}))
    assert a != b != c and b == a.with_peers(build({"address": "::1", "exempt": True}))
    assert b.ut_derived and b.with_peers(()) == a


class FakeDns:
    def __init__(self, answers: dict[str, list[str]]):
        self.answers, self.asked = answers, 0

    def __call__(self, name: str) -> list[str]:
        self.asked += 1
        if name not in self.answers:
            raise OSError(-2, "Name or service not known")
        return self.answers[name]


def test_host_names_resolve_to_every_address_and_again_after_the_ttl():
    now = [0.0]
    dns = FakeDns({"db.internal": ["10.0.0.5", "fd00::5"]})
    r = peers.Resolver(dns, ttl=60, clock=lambda: now[0])
    policy = Policy().with_peers(build({"address": "db.internal", "port": 5432, "keepidle": 30}))
    failed: list[str] = []
    resolved = peers.resolve_names(policy, r, lambda n, why: failed.append(n))
    assert {peers.show_network(n) for n in resolved.peers[0].networks} == {"10.0.0.5", "fd00::5"}
    assert rule_for(resolved.peers, "10.0.0.5", 5432) == 1
    assert rule_for(resolved.peers, "fd00::5", 5432) == 1
    dns.answers["db.internal"] = ["10.0.0.6"]
    now[0] = 59
    assert peers.resolve_names(policy, r) == resolved  # within the TTL: as before
    now[0] = 61
    moved = peers.resolve_names(policy, r)
    assert moved != resolved and rule_for(moved.peers, "10.0.0.6", 5432) == 1
    assert rule_for(moved.peers, "10.0.0.5", 5432) == 0
    del dns.answers["db.internal"]
    now[0] = 200
    gone = peers.resolve_names(policy, r, lambda n, why: failed.append(f"{n}: {why}"))
    assert gone.peers[0].networks == () and failed == ["db.internal: Name or service not known"]


# -- precedence on random rules ---------------------------------------------------

V4 = st.builds(
    lambda a, n: ipaddress.IPv4Network((a, n), strict=False),
    st.integers(0, 2**32 - 1).map(lambda v: v & 0xFFFF00FF | 0x0A000000),  # 10.x.0.y
    st.integers(0, 32),
)
PORTS = st.one_of(st.none(), st.tuples(st.integers(1, 9), st.integers(0, 3)))


def _reference(rules: list[peers.Peer], address: str, port: int) -> int:
    """The rule as written in the README, by brute force."""
    addr = peers._as_v6(address)
    best, key = 0, None
    for i, p in enumerate(rules):
        for n in p.networks:
            if addr not in n:
                continue
            if p.ports is not None and not p.ports[0] <= port <= p.ports[1]:
                continue
            width = p.ports[1] - p.ports[0] if p.ports else 1 << 17
            k = (n.prefixlen, p.ports is not None, -width, -i)
            if key is None or k > key:
                best, key = i + 1, k
    return best


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(V4, PORTS), min_size=1, max_size=8, unique_by=lambda t: (t[0], t[1])),
    st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 12)), min_size=1, max_size=20),
)
def test_flattened_table_agrees_with_the_stated_precedence(rules, probes):
    tables = []
    for net, ports in rules:
        t: dict = {"address": str(net)}
        if ports is not None:
            t["port"] = f"{ports[0]}-{ports[0] + ports[1]}"
        tables.append(t)
    try:
        built = peers.build({}, tables)
    except UsageError:
        return  # more port rules at one address than the kernel scans
    for value, port in probes:
        address = str(ipaddress.IPv4Address(value & 0xFFFF00FF | 0x0A000000))
        assert rule_for(built, address, port) == _reference(list(built), address, port)


def test_a_trie_of_peers_reads_back_whole_in_batches() -> None:
    """The peer table is an LPM trie: the kernel's batch read of it says
    how far it got with a whole key (24 bytes), not a hash bucket's index
    (4).  A read of it into the hash maps' 8-byte cursor overran it (the
    process died of SIGSEGV).  Read in a process of its own, as ``status``
    reads it, with a batch smaller than the trie, under Python's debug
    allocator, which catches the overrun."""
    code = r"""
import sys
from bpfkeep.kernel import bpfsys
from bpfkeep.progs import maps
from support import BPF_F_NO_PREALLOC, BPF_MAP_TYPE_LPM_TRIE, map_create
fd = map_create(
    BPF_MAP_TYPE_LPM_TRIE, b"bk_test_peers", maps.PEER_KEY.size, maps.PEER.size, 64,
    BPF_F_NO_PREALLOC,
)
keys = {maps.PEER_KEY.pack(prefixlen=64 + 128, set=list((7).to_bytes(8, sys.byteorder)),
                           addr=[10, i, 0, 1] + [0] * 12) for i in range(40)}
for k in keys:
    bpfsys.map_update(fd, k, maps.PEER.pack(n=1))
got = bpfsys.map_items(fd, maps.PEER_KEY.size, maps.PEER.size, chunk=16)
assert {k for k, _ in got} == keys, (len(got), len(keys))
print("read", len(got))
"""
    # (Python's debug allocator guards each object: an overrun is caught.)
    env = {**os.environ, "PYTHONMALLOC": "debug", "PYTHONPATH": os.path.dirname(__file__)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.strip() == "read 40"
