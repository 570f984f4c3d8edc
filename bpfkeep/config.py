"""The daemon's TOML configuration (see deploy/bpfkeep.toml).

Errors are one line naming the file, the key and, where it can be found,
the line.  Loading is linear in the size of the file.  Matching a cgroup
against all the rules is one dict lookup of its whole path for the rules
without a wildcard, and, if there are glob rules, one walk of its path
through one automaton built from them, where a glob is tested only where
it can apply.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import hashlib
import ipaddress
import json
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterable

from bpfkeep import containers, peers, tomltables
from bpfkeep.errors import UsageError
from bpfkeep.kernel.cgroups import Mounts, mount_relative, read_mounts
from bpfkeep.options import BY_KEY, TUNABLE, Policy, parse_value, show_value

DEFAULT_LISTEN = ("127.0.0.1", 9977)
WORKLOAD_KEYS = ("container", "labels", "pod")  # a rule names workloads instead of a cgroup
POLICY_KEYS = {"cgroup", "mode", "existing", "peer", "keepidle_min", "keepidle_max"}
POLICY_KEYS |= set(WORKLOAD_KEYS) | {o.key for o in TUNABLE if o.bpf}
SECTIONS = {"metrics", "daemon", "policy", "containers"}
# [metrics] workload_labels: which workload labels the per-cgroup series carry.
WORKLOAD_LABELS = ("container", "namespace", "none")
# [daemon] audit_interval: 0 (off) or 1 s .. 1 day.  Below a second an
# inet_diag dump of every socket would be most of the daemon's work; above a
# day the gauge is stale; inf, nan and 1e308 made the loop's sleep overflow
# or spin.
AUDIT_MAX = 86400
RESOLVE_MAX = 3600  # [daemon] resolve_interval, seconds
# [daemon] enforce_interval: the periodic pass over enforced cgroups, which
# brings back what a setsockopt the cgroup hook does not see changed (a
# 32-bit call), whatever the audit's backoff.  A socket is back within
# this interval and one pass's time: 1..60 s keeps that under a minute.
ENFORCE_INTERVAL = 30.0
ENFORCE_INTERVAL_MAX = 60


class ConfigError(UsageError):
    """A config file problem: ``str()`` names the file, key and line."""


# -- cgroup patterns ------------------------------------------------------


class _Segment:
    """One segment of a pattern: a literal name or an fnmatch glob,
    translated to a regular expression once."""

    __slots__ = ("regex", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.regex = re.compile(fnmatch.translate(text)) if _is_glob(text) else None

    def match(self, part: str) -> bool:
        if self.regex is None:
            return part == self.text
        return self.regex.match(part) is not None


_WILDCARD = re.compile(r"[*?[]")


def _is_glob(segment: str) -> bool:
    return _WILDCARD.search(segment) is not None


def _parts(rel: str) -> list[str]:
    return [s for s in rel.split("/") if s]


def _key(rel: str) -> str:
    """``rel`` as "a/b/c": no empty segments (what _parts would give)."""
    if "//" in rel or rel[:1] == "/" or rel[-1:] == "/":
        return "/".join(_parts(rel))
    return rel


class _Glob:
    """A cgroup pattern matched segment by segment; ``**`` is any number of
    segments (also none).

    Matching runs the pattern as an automaton over the path's segments: the
    live states are positions in the pattern, so a path costs at most
    (pattern length x path length) segment tests however many ``**`` the
    pattern has (trying every split, as a recursive matcher does, is
    exponential in them).
    """

    def __init__(self, segments: Iterable[str]) -> None:
        segs: list[_Segment | None] = []  # None: **
        for s in segments:
            if s == "**":
                if segs and segs[-1] is None:
                    continue  # a/**/**/b is a/**/b
                segs.append(None)
            else:
                segs.append(_Segment(s))
        self.segs = tuple(segs)
        self.literal = all(s is not None and s.regex is None for s in segs)
        # The first segment when it is a plain name: rules are indexed by it.
        first = segs[0] if segs else None
        self.head = first.text if first is not None and first.regex is None else None

    def _closure(self, states: set[int]) -> set[int]:
        # A ** may match no segment: the position after it is live too.
        # (Consecutive ** are collapsed, so one step is enough.)
        return states | {i + 1 for i in states if i < len(self.segs) and self.segs[i] is None}

    def _run(self, parts: list[str]) -> set[int]:
        end = len(self.segs)
        states = self._closure({0})
        for part in parts:
            nxt: set[int] = set()
            for i in states:
                if i == end:
                    continue
                seg = self.segs[i]
                if seg is None:
                    nxt.add(i)  # ** takes this segment and may take more
                elif seg.match(part):
                    nxt.add(i + 1)
            if not nxt:
                return nxt
            states = self._closure(nxt)
        return states

    def match(self, parts: list[str]) -> bool:
        return len(self.segs) in self._run(parts)

    def prefix(self, parts: list[str]) -> bool:
        """True if ``parts`` can be extended into a path that matches."""
        return any(i < len(self.segs) for i in self._run(parts))


@dataclasses.dataclass(frozen=True)
class Rule:
    """One [[policy]] table: which cgroups, and what policy."""

    pattern: str  # relative to the cgroup2 mount; glob per path segment, ** = any depth
    policy: Policy
    index: int  # position in the file (first matching rule wins)
    # Apply the policy to the TCP sockets that already exist when it is
    # attached (the sweep); false: only to sockets made afterwards.
    existing: bool = True
    # A workload rule (container/labels/pod keys) instead of a cgroup
    # pattern: ``pattern`` is then "" and the rule is in Config.workload_rules.
    selector: containers.Selector | None = None

    def segments(self) -> list[str]:
        return _parts(self.pattern)

    @functools.cached_property
    def glob(self) -> _Glob:
        return _Glob(self.segments())

    def matches(self, rel: str) -> bool:
        return self.glob.match(_parts(rel))

    def plain_prefix(self) -> list[str]:
        """The leading segments that are plain names (no wildcard, no **)."""
        out = []
        for s in self.segments():
            if s == "**" or _is_glob(s):
                break
            out.append(s)
        return out

    def may_match_below(self, rel: str) -> bool:
        """Could a descendant of ``rel`` match?  (Which directories to watch.)"""
        return self.glob.prefix(_parts(rel))


class _Node:
    """A state of all the rules' patterns run as one automaton: the pattern
    prefixes some rules share (a trie of segments)."""

    __slots__ = ("bare", "end", "globs", "lit", "loop", "prefixed", "star")

    def __init__(self, loop: bool = False) -> None:
        self.lit: dict[str, _Node] = {}  # plain-name children
        self.globs: dict[str, tuple[_Segment, _Node]] = {}  # glob children by text
        # The glob children again, by the plain text before their first
        # wildcard ("u5-" for u5-*.scope), so that a name tries only the
        # globs it can match; globs starting with a wildcard are "bare".
        self.prefixed: dict[int, dict[str, list[tuple[_Segment, _Node]]]] = {}
        self.bare: list[tuple[_Segment, _Node]] = []
        self.star: _Node | None = None  # the ** child
        self.loop = loop  # a ** state: takes any number of segments
        self.end: int | None = None  # first rule whose pattern ends here

    def child(self, seg: _Segment | None) -> _Node:
        if seg is None:
            if self.star is None:
                self.star = _Node(loop=True)
            return self.star
        if seg.regex is None:
            node = self.lit.get(seg.text)
            if node is None:
                node = self.lit[seg.text] = _Node()
            return node
        hit = self.globs.get(seg.text)
        if hit is None:
            hit = self.globs[seg.text] = (seg, _Node())
            head = re.split(r"[*?[]", seg.text, maxsplit=1)[0]
            if head:
                self.prefixed.setdefault(len(head), {}).setdefault(head, []).append(hit)
            else:
                self.bare.append(hit)
        return hit[1]

    def step(self, part: str, out: set[_Node]) -> None:
        """Add the states reached from this one by taking ``part``."""
        if self.loop:
            out.add(self)
        node = self.lit.get(part)
        if node is not None:
            out.add(node)
        for seg, node in self.bare:
            if seg.match(part):
                out.add(node)
        for n, by_head in self.prefixed.items():
            for seg, node in by_head.get(part[:n], ()):
                if seg.match(part):
                    out.add(node)

    def continues(self) -> bool:
        return self.loop or bool(self.lit or self.globs or self.star)


class _RuleIndex:
    """Every rule, indexed for a lookup that costs about what one rule does.

    A rule without a wildcard (most configs' bulk: one [[policy]] per
    service) is an entry of one dict keyed by its whole path, and the
    paths above it are a set (the directories to watch): a lookup is a
    dict lookup, not a walk.  The glob rules form one automaton (see _Glob
    for one pattern's): a lookup walks the path once, plain names are dict
    lookups and a glob is tested only where its position and its leading
    plain text fit.  The first rule in the file that matches wins: each
    final state knows the first rule ending there, and the exact dict the
    first rule of each path.

    (Indexing every rule segment by segment in the automaton cost ~12 us
    a rule and 4 containers a trie node: 0.12 s and ~5 MB at 10,000
    rules, paid on the daemon's first lookup after every load.)
    """

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules
        self.exact: dict[str, int] = {}  # path -> first rule naming it exactly
        self.above: set[str] = set()  # proper prefixes of those paths ("" included)
        self.root: _Node | None = None  # the glob rules' automaton, if any
        for pos, r in enumerate(rules):
            if _WILDCARD.search(r.pattern) is None:
                self._add_exact(_key(r.pattern), pos)
                continue
            if self.root is None:
                self.root = _Node()
            node = self.root
            for seg in r.glob.segs:
                node = node.child(seg)
            if node.end is None:
                node.end = pos

    def _add_exact(self, key: str, pos: int) -> None:
        if self.exact.setdefault(key, pos) != pos:
            return  # an earlier rule names the same path: it wins
        while key:
            key = key[: max(key.rfind("/"), 0)]
            if key in self.above:
                break  # and so are its own prefixes
            self.above.add(key)

    @staticmethod
    def _closure(states: set[_Node]) -> set[_Node]:
        todo = [n.star for n in states if n.star is not None]
        while todo:  # a ** may take no segment
            n = todo.pop()
            if n not in states:
                states.add(n)
                if n.star is not None:
                    todo.append(n.star)
        return states

    def _run(self, root: _Node, rel: str) -> set[_Node]:
        states = self._closure({root})
        for part in _parts(rel):
            nxt: set[_Node] = set()
            for node in states:
                node.step(part, nxt)
            if not nxt:
                return nxt
            states = self._closure(nxt)
        return states

    def policy_for(self, rel: str) -> Rule | None:
        key = _key(rel)
        first = self.exact.get(key)
        if self.root is not None:
            ends = [n.end for n in self._run(self.root, key) if n.end is not None]
            if ends and (first is None or min(ends) < first):
                first = min(ends)
        return None if first is None else self.rules[first]

    def watch(self, rel: str) -> bool:
        key = _key(rel)
        if key in self.above:
            return True
        return self.root is not None and any(n.continues() for n in self._run(self.root, key))


@dataclasses.dataclass(frozen=True)
class Config:
    path: str
    listen: tuple[str, int]
    rules: tuple[Rule, ...]
    detach_on_exit: bool = False
    audit_interval: float = 15.0
    enforce_interval: float = ENFORCE_INTERVAL
    # Rules that name containers or pods (see bpfkeep.containers), in file
    # order; their Rule.index counts among all rules.
    workload_rules: tuple[Rule, ...] = ()
    runtimes: containers.Sources = dataclasses.field(default_factory=containers.Sources)
    workload_labels: str = "container"
    # Peer rules naming hosts: their addresses are looked up again this often.
    resolve_interval: float = peers.HOST_TTL
    # load(): a hash of the file's bytes, its path and the mounts its rules
    # were read against; the same again is this Config again.
    digest: bytes = b""

    def workload_rule(self, rel: str, workload: containers.Workload | None) -> Rule | None:
        """The rule for a container's cgroup: the first in the file among
        the cgroup rules matching ``rel`` and the workload rules matching
        ``workload`` (None: not known yet, only the cgroup rules)."""
        rule = self.policy_for(rel)
        if workload is None:
            return rule
        for w in self.workload_rules:
            if rule is not None and w.index > rule.index:
                break
            if w.selector is not None and w.selector.matches(workload):
                return w
        return rule

    @functools.cached_property
    def _index(self) -> _RuleIndex:
        return _RuleIndex(self.rules)

    def policy_for(self, rel: str) -> Rule | None:
        """The first rule that matches the cgroup ``rel``, if any."""
        return self._index.policy_for(rel)

    def watch(self, rel: str) -> bool:
        """Could a cgroup below ``rel`` match a rule?"""
        return self._index.watch(rel)


# -- where things are in the text ----------------------------------------

_HEADER = re.compile(r"\s*(\[\[?)([^\]]*)\]")
_KEY = re.compile(r"""\s*("(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_-]+)\s*[.=]""")


def _unquote(token: str) -> str:
    token = token.strip()
    if token.startswith('"'):
        try:
            return str(json.loads(token))
        except ValueError:
            return token[1:-1]
    return token[1:-1] if token.startswith("'") else token


class _Lines:
    """Line numbers of keys, tables and [[policy]] tables, found in one pass
    over the text the first time an error needs one.

    (A scan per key made loading quadratic in the number of policies: 54 s
    at 4,000.)  Best effort: a key written in an inline table or as a
    dotted key of another table is found by name anywhere in the file, or
    not at all.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.scans = 0  # passes over the text (the tests count them)

    @functools.cached_property
    def _index(
        self,
    ) -> tuple[
        dict[str, int], dict[str, dict[str, int]], list[dict[str, int]], list[list[dict[str, int]]]
    ]:
        self.scans += 1
        top: dict[str, int] = {}  # top-level keys and table names
        tables: dict[str, dict[str, int]] = {}  # [name] -> key -> line
        policies: list[dict[str, int]] = []  # [[policy]] n -> key -> line ("": header)
        peer_lines: list[
            list[dict[str, int]]
        ] = []  # [[policy]] n -> [[policy.peer]] m -> key -> line
        anywhere: dict[str, int] = {}
        current = top
        # Lines as TOML counts them: \n only (splitlines() also breaks at
        # \x0c, \u2028 ..., which TOML allows in strings and comments).
        for n, line in enumerate(self.text.split("\n"), 1):
            h = _HEADER.match(line)
            if h:
                names = [_unquote(s) for s in h.group(2).split(".")]
                top.setdefault(names[0], n)
                if names == ["policy"] and h.group(1) == "[[":
                    current = {"": n}
                    policies.append(current)
                    peer_lines.append([])
                    continue
                if names == ["policy", "peer"] and h.group(1) == "[[" and policies:
                    policies[-1].setdefault("peer", n)
                    current = {"": n}
                    peer_lines[-1].append(current)
                    continue
                parent = policies[-1] if names[0] == "policy" and policies else None
                if parent is None:
                    parent = tables.setdefault(names[0], {})
                if len(names) > 1:
                    parent.setdefault(names[1], n)  # [policy.x]: policy's key x
                    current = {}
                else:
                    current = parent
                continue
            k = _KEY.match(line)
            if k:
                key = _unquote(k.group(1))
                current.setdefault(key, n)
                anywhere.setdefault(key, n)
        tables[""] = anywhere
        return top, tables, policies, peer_lines

    def line(
        self, key: str, table: str | None = None, index: int | None = None, peer: int | None = None
    ) -> int | None:
        top, tables, policies, peer_lines = self._index
        if table is None:
            return top.get(key)
        if table == "policy" and index is not None:
            if index >= len(policies):
                return None  # written as an inline array
            if peer is not None and peer < len(peer_lines[index]):
                return peer_lines[index][peer].get(key) or peer_lines[index][peer][""]
            return policies[index].get(key) or policies[index][""]
        return tables.get(table, {}).get(key) or tables[""].get(key)


def _name(key: str) -> str:
    """A key as TOML would write it: bare, or quoted (so it stays one line)."""
    if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", key):
        return key
    quoted = json.dumps(key)  # ASCII, escapes included
    return quoted if len(quoted) <= 66 else quoted[:62] + '..."'


def _file(path: str) -> str:
    return path if path.isprintable() else show_value(path, 200)


class _Where:
    """``file:line: name`` prefixes for one file's messages."""

    def __init__(self, path: str, text: str) -> None:
        self.path = _file(path)
        self.lines = _Lines(text)

    def __call__(
        self,
        key: str,
        name: str,
        table: str | None = None,
        index: int | None = None,
        peer: int | None = None,
    ) -> str:
        line = self.lines.line(key, table, index, peer)
        at = f":{line}" if line else ""
        return f"{self.path}{at}: {name}"


# -- parsing ---------------------------------------------------------------


def parse_listen(raw: object) -> tuple[str, int]:
    if not isinstance(raw, str) or ":" not in raw:
        raise ValueError('expected "HOST:PORT", e.g. "127.0.0.1:9977"')
    host, _, port = raw.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"{show_value(host)} is not an IP address") from None
    # ASCII digits only: str.isdigit() and int() also take "١٥" and "²".
    if not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        raise ValueError(f"port {show_value(port)} is not 1..65535")
    return host, int(port)


def _toml_error(path: str, e: Exception) -> str:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    m = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", msg)
    if m:
        return f"{_file(path)}:{m[2]}: not valid TOML: {m[1]} (column {m[3]})"
    return f"{_file(path)}: not valid TOML: {msg}"


def loads(text: str, path: str = "<config>", mounts: Mounts | None = None) -> Config:
    """Parse a config.  ``mounts``: the cgroup mounts that absolute cgroup
    paths in rules are checked against (load() passes the host's); without
    them such a path is taken as relative to the cgroup2 mount."""
    where = _Where(path, text)
    try:
        data = tomltables.loads(text)  # tomllib's result, table by table
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(_toml_error(path, e)) from None
    except ValueError:
        # int() refuses more than 4300 digits (sys.get_int_max_str_digits).
        m = re.search(r"[0-9_]{4300,}", text)
        line = f":{text.count(chr(10), 0, m.start()) + 1}" if m else ""
        raise ConfigError(
            f"{where.path}{line}: not valid TOML: a number with too many digits"
        ) from None
    except RecursionError:
        raise ConfigError(
            f"{where.path}: not valid TOML: arrays or tables nested too deeply"
        ) from None

    unknown = set(data) - SECTIONS
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(
            f"{where(key, _name(key))}: unknown key (expected [metrics], [daemon], [[policy]])"
        )

    listen = DEFAULT_LISTEN
    metrics = data.get("metrics", {})
    if not isinstance(metrics, dict):
        raise ConfigError(f"{where('metrics', 'metrics')}: must be a table [metrics]")
    workload_labels = "container"
    for key, value in metrics.items():
        if key == "workload_labels":
            if value not in WORKLOAD_LABELS:
                raise ConfigError(
                    f"{where(key, 'metrics.' + key, 'metrics')}: expected "
                    f'"container", "namespace" or "none", got {show_value(value)}'
                )
            workload_labels = value
            continue
        if key != "listen":
            raise ConfigError(f"{where(key, 'metrics.' + _name(key), 'metrics')}: unknown key")
        try:
            listen = parse_listen(value)
        except ValueError as e:
            raise ConfigError(f"{where(key, 'metrics.listen', 'metrics')}: {e}") from None

    daemon = data.get("daemon", {})
    if not isinstance(daemon, dict):
        raise ConfigError(f"{where('daemon', 'daemon')}: must be a table [daemon]")
    detach_on_exit, audit_interval = False, 15.0
    resolve_interval, enforce_interval = peers.HOST_TTL, ENFORCE_INTERVAL
    for key, value in daemon.items():
        if key == "detach_on_exit":
            if not isinstance(value, bool):
                raise ConfigError(
                    f"{where(key, 'daemon.' + key, 'daemon')}: expected true or false"
                )
            detach_on_exit = value
        elif key == "audit_interval":
            # (nan fails every comparison, inf and 1e308 the upper bound.)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (value == 0 or 1 <= value <= AUDIT_MAX)
            ):
                raise ConfigError(
                    f"{where(key, 'daemon.' + key, 'daemon')}: expected seconds, "
                    f"0 (no audit) or 1..{AUDIT_MAX}, got {show_value(value)}"
                )
            audit_interval = float(value)
        elif key == "resolve_interval":
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 1 <= value <= RESOLVE_MAX
            ):
                raise ConfigError(
                    f"{where(key, 'daemon.' + key, 'daemon')}: expected seconds, "
                    f"1..{RESOLVE_MAX}, got {show_value(value)}"
                )
            resolve_interval = float(value)
        elif key == "enforce_interval":
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (1 <= value <= ENFORCE_INTERVAL_MAX)
            ):
                raise ConfigError(
                    f"{where(key, 'daemon.' + key, 'daemon')}: expected seconds, "
                    f"1..{ENFORCE_INTERVAL_MAX}, got {show_value(value)}"
                )
            enforce_interval = float(value)
        else:
            raise ConfigError(f"{where(key, 'daemon.' + _name(key), 'daemon')}: unknown key")

    rules = []
    policies = data.get("policy", [])
    if not isinstance(policies, list):
        raise ConfigError(f"{where('policy', 'policy')}: write each policy as a [[policy]] table")
    shared: dict[tuple, Policy] = {}  # rules with the same values share one Policy
    for i, table in enumerate(policies):
        rules.append(_rule(where, i, table, shared, mounts))
    sources = _containers(where, data.get("containers", {}))
    return Config(
        path,
        listen,
        tuple(r for r in rules if r.selector is None),
        detach_on_exit,
        audit_interval,
        enforce_interval,
        workload_rules=tuple(r for r in rules if r.selector is not None),
        runtimes=sources,
        workload_labels=workload_labels,
        resolve_interval=resolve_interval,
    )


CONTAINER_KEYS = {f.name for f in dataclasses.fields(containers.Sources)}
LOOKUP_TIMEOUT_MAX = 10.0  # seconds; a lookup runs off the daemon's loop, but not forever


def _containers(where: _Where, table: object) -> containers.Sources:
    """[containers]: where the runtimes are (absolute paths, "" turns one
    off) and the timeout of one call to a runtime."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where('containers', 'containers')}: must be a table [containers]")
    values: dict[str, object] = {}
    for key, value in table.items():
        name = where(key, "containers." + _name(key), "containers")
        if key not in CONTAINER_KEYS:
            raise ConfigError(f"{name}: unknown key (expected {', '.join(sorted(CONTAINER_KEYS))})")
        if key == "timeout":
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0.01 <= value <= LOOKUP_TIMEOUT_MAX
            ):
                raise ConfigError(
                    f"{name}: expected seconds, 0.01..{LOOKUP_TIMEOUT_MAX:g}, "
                    f"got {show_value(value)}"
                )
            values[key] = float(value)
            continue
        if not isinstance(value, str) or (value and not value.startswith("/")) or "\0" in value:
            raise ConfigError(
                f'{name}: expected an absolute path, or "" to turn it off, got {show_value(value)}'
            )
        values[key] = value
    return containers.Sources(**values)  # type: ignore[arg-type]


def _selector(at, table: dict) -> containers.Selector | None:
    """The workload keys of a [[policy]] table, or None if it has none."""
    if not any(k in table for k in WORKLOAD_KEYS):
        return None
    ctr = table.get("container")
    if ctr is not None and (not isinstance(ctr, str) or not ctr):
        raise ConfigError(
            f'{at("container")}: expected a container name or glob, e.g. "web-*", '
            f"got {show_value(ctr)}"
        )
    labels: tuple[tuple[str, str], ...] = ()
    if "labels" in table:
        raw = table["labels"]
        if (
            not isinstance(raw, dict)
            or not raw
            or not all(isinstance(v, str) for v in raw.values())
        ):
            raise ConfigError(
                f'{at("labels")}: expected a table of strings, e.g. {{ tier = "db" }}, '
                f"got {show_value(raw)}"
            )
        labels = containers.by_labels(raw)
    pod = None
    if "pod" in table:
        raw = table["pod"]
        try:
            if not isinstance(raw, str):
                raise ValueError(f'expected "NAMESPACE/POD", got {show_value(raw)}')
            pod = containers.parse_pod(raw)
        except ValueError as e:
            raise ConfigError(f"{at('pod')}: {e} (globs allowed)") from None
    return containers.Selector(ctr, labels, pod)


def _relative(at, pattern: str, mounts: Mounts | None) -> str:
    """A rule's cgroup pattern relative to the cgroup2 mount.  An absolute
    one is a path under the mount, as ``attach --cgroup`` takes it
    ("/sys/fs/cgroup/system.slice/*.service"), or one as /proc/PID/cgroup
    writes it ("/system.slice/*.service").  One that can never match is
    refused: a cgroup v1 path, the root, or a path elsewhere in the
    filesystem (its first name is there and not under the mount)."""
    if mounts is None or not mounts.cgroup2 or not pattern.startswith("/"):
        return pattern.strip("/")
    mount = mounts.cgroup2
    try:
        rel = mount_relative(pattern, mounts)
    except UsageError as e:
        raise ConfigError(f"{at('cgroup')}: {show_value(pattern, 80)}: {e}") from None
    if rel == "":
        raise ConfigError(
            f"{at('cgroup')}: {show_value(pattern, 80)} is the root cgroup (every process "
            'on the host), which a rule may not name; e.g. "system.slice/*.service"'
        )
    if rel is not None:
        return rel
    first = _parts(pattern)[0]
    if (
        not _is_glob(first)
        and os.path.lexists(f"{mounts.via}/{first}")
        and not os.path.lexists(os.path.join(mount, first))
    ):
        raise ConfigError(
            f"{at('cgroup')}: {show_value(pattern, 80)} is not under the cgroup2 mount at "
            f"{mount}: write a path under it, or relative to it (no leading /) as "
            '/proc/PID/cgroup shows it, e.g. "system.slice/*.service"'
        )
    return pattern.strip("/")


def _rule(
    where: _Where,
    i: int,
    table: object,
    shared: dict[tuple, Policy] | None = None,
    mounts: Mounts | None = None,
) -> Rule:
    name = f"policy[{i}]"

    def at(key: str) -> str:
        return where(key, f"{name}.{_name(key)}", "policy", i)

    if not isinstance(table, dict):
        raise ConfigError(
            f"{where('', name, 'policy', i)}: write each policy as a [[policy]] table"
        )
    for key in table:
        if key not in POLICY_KEYS:
            hint = ""
            if key in BY_KEY and not BY_KEY[key].bpf:
                hint = " (the kernel refuses it from BPF; only the LD_PRELOAD shim sets it)"
            if key == "idle_limit":
                hint = " here: a path's idle limit goes on a peer rule ([[policy.peer]])"
            raise ConfigError(f"{at(key)}: unknown key{hint}")
    selector = _selector(at, table)
    if selector is not None and "cgroup" in table:
        other = next(k for k in WORKLOAD_KEYS if k in table)
        raise ConfigError(
            f"{at('cgroup')}: a rule names either a cgroup or workloads ({other}), not "
            "both: split it into two [[policy]] tables"
        )
    if selector is None and "cgroup" not in table:
        raise ConfigError(
            f"{where('', name, 'policy', i)}: missing key cgroup (or container, labels, pod)"
        )
    pattern = table.get("cgroup", "-")
    if not isinstance(pattern, str) or not pattern.strip("/"):
        raise ConfigError(
            f"{at('cgroup')}: expected a non-empty path "
            'relative to the cgroup2 mount, e.g. "system.slice/*.service" (the root is not allowed)'
        )
    if ".." in pattern.split("/"):
        raise ConfigError(f"{at('cgroup')}: '..' not allowed")
    values: dict[str, object] = {}
    existing = True
    for key, value in table.items():
        if key in ("cgroup", "peer") or key in WORKLOAD_KEYS:
            continue
        if key == "mode":
            if value not in ("set", "enforce"):
                raise ConfigError(
                    f'{at(key)}: expected "set" or "enforce", got {show_value(value)}'
                )
            values[key] = value
            continue
        if key == "existing":
            if not isinstance(value, bool):
                raise ConfigError(f"{at(key)}: expected true or false, got {show_value(value)}")
            existing = value
            continue
        if key == "keepidle" and value == "auto":
            values[key] = value  # learned from the path (bpfkeep.learning)
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            extra = ' or "auto"' if key == "keepidle" else ""
            raise ConfigError(f"{at(key)}: expected a whole number{extra}, got {show_value(value)}")
        try:
            values[key] = parse_value(BY_KEY[key], value) if key in BY_KEY else value
        except UsageError as e:
            raise ConfigError(f"{at(key)}: {str(e).partition(': ')[2]}") from None
    # 10,000 [[policy]] tables with the same values are one Policy object,
    # built once (the daemon keeps one per cgroup).
    peer_tables = _peer_tables(at, table.get("peer"))
    memo = (tuple(sorted(values.items())), repr(peer_tables))
    policy = shared.get(memo) if shared is not None else None
    if policy is None:
        try:
            policy = Policy.from_mapping(values)
        except UsageError as e:
            key, _, msg = str(e).partition(": ")
            raise ConfigError(f"{at(key)}: {msg}") from None
        if peer_tables:
            try:
                policy = policy.with_peers(
                    peers.build(
                        values,
                        peer_tables,
                        where=lambda j, key: where(
                            key, f"{name}.peer[{j}].{_name(key)}", "policy", i, j
                        ),
                    )
                )
            except UsageError as e:
                raise ConfigError(str(e)) from None
        if shared is not None:
            shared[memo] = policy
    if selector is not None:
        return Rule("", policy, i, existing, selector)
    return Rule(_relative(at, pattern, mounts), policy, i, existing)


def _peer_tables(at: Callable[[str], str], raw: object) -> list[dict]:
    """The [[policy.peer]] tables of a policy (none: [])."""
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ConfigError(f"{at('peer')}: write each peer rule as a [[policy.peer]] table")
    return raw


# -- the file --------------------------------------------------------------


def _check_ownership(path: str, st: os.stat_result) -> None:
    """The root daemon takes policies for every cgroup of the host from
    this file: anyone who can write it can turn keepalive off everywhere."""
    if os.geteuid() != 0:
        return
    shown = _file(path)
    if st.st_uid != 0:
        raise ConfigError(
            f"{shown}: owned by uid {st.st_uid}, not root: the root daemon reads only "
            f"a config root owns (chown root {shown})"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"{shown}: is writable by others: chmod go-w {shown}")


def load(path: str, mounts: Mounts | None = None, previous: Config | None = None) -> Config:
    """Read and parse a config file; absolute cgroup paths in its rules are
    checked against ``mounts``, by default this host's (read_mounts).
    ``previous``: a Config load() returned before, returned again if the
    file holds the same bytes (and the mounts are the same): a reload
    that changes nothing parses nothing (0.4 s at 10,000 policies with
    peer rules).  The file is read and checked (owner, mode) all the same."""
    shown = _file(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise ConfigError(f"{shown}: cannot read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{shown}: not a regular file")
        _check_ownership(path, st)
        with open(fd, "rb", closefd=False) as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{shown}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            f"{shown}:{line}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "save the file as UTF-8"
        ) from None
    if mounts is None:
        try:
            mounts = read_mounts()
        except OSError:
            mounts = None  # no /proc: the daemon says what is missing
    digest = hashlib.blake2b(repr((path, mounts)).encode() + data, digest_size=16).digest()
    if previous is not None and previous.digest == digest:
        return previous
    return dataclasses.replace(loads(text, path, mounts), digest=digest)
