"""The daemon's TOML configuration (see deploy/bpfkeep.toml).

Errors name the file, the key and, where it can be found, the line.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
import re
import tomllib

from bpfkeep.errors import UsageError
from bpfkeep.options import BY_KEY, TUNABLE, Policy, parse_value

DEFAULT_LISTEN = ("127.0.0.1", 9977)
POLICY_KEYS = {"cgroup", "mode"} | {o.key for o in TUNABLE if o.bpf}
SECTIONS = {"metrics", "daemon", "policy"}


class ConfigError(UsageError):
    """A config file problem: ``str()`` names the file, key and line."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """One [[policy]] table: which cgroups, and what policy."""

    pattern: str  # relative to the cgroup2 mount; glob per path segment, ** = any depth
    policy: Policy
    index: int  # position in the file (first matching rule wins)

    def segments(self) -> list[str]:
        return [s for s in self.pattern.strip("/").split("/") if s]

    def matches(self, rel: str) -> bool:
        return _match(self.segments(), [s for s in rel.split("/") if s])

    def may_match_below(self, rel: str) -> bool:
        """Could a descendant of ``rel`` match?  (Which directories to watch.)"""
        return _prefix(self.segments(), [s for s in rel.split("/") if s])


def _match(pat: list[str], parts: list[str]) -> bool:
    if not pat:
        return not parts
    if pat[0] == "**":
        return any(_match(pat[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pat[0]) and _match(pat[1:], parts[1:])


def _prefix(pat: list[str], parts: list[str]) -> bool:
    """True if ``parts`` can be extended into a path matching ``pat``."""
    if not parts:
        return bool(pat)
    if not pat:
        return False
    if pat[0] == "**":
        return True
    return fnmatch.fnmatchcase(parts[0], pat[0]) and _prefix(pat[1:], parts[1:])


@dataclasses.dataclass(frozen=True)
class Config:
    path: str
    listen: tuple[str, int]
    rules: tuple[Rule, ...]
    detach_on_exit: bool = False
    audit_interval: float = 15.0

    def policy_for(self, rel: str) -> Rule | None:
        for rule in self.rules:
            if rule.matches(rel):
                return rule
        return None

    def watch(self, rel: str) -> bool:
        return any(r.may_match_below(rel) for r in self.rules)


def _line_of(text: str, key: str, policy_index: int | None) -> int | None:
    """Best-effort line number of ``key`` (in the n-th [[policy]] table)."""
    lines = text.splitlines()
    start = 0
    if policy_index is not None:
        seen = -1
        for i, ln in enumerate(lines):
            if re.match(r"\s*\[\[\s*policy\s*\]\]", ln):
                seen += 1
                if seen == policy_index:
                    start = i
                    break
        else:
            return None
    for i in range(start, len(lines)):
        if i > start and policy_index is not None and re.match(r"\s*\[", lines[i]):
            break
        k = re.escape(key)
        if re.match(rf"\s*({k}\s*=|\[+\s*{k}\s*\]+)", lines[i]):
            return i + 1
    return start + 1 if policy_index is not None else None


def _where(path: str, text: str, key: str, idx: int | None = None, name: str = "") -> str:
    line = _line_of(text, key, idx)
    at = f":{line}" if line else ""
    return f"{path}{at}: {name or key}"


def parse_listen(raw: object) -> tuple[str, int]:
    if not isinstance(raw, str) or ":" not in raw:
        raise ValueError('expected "HOST:PORT", e.g. "127.0.0.1:9977"')
    host, _, port = raw.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"{host!r} is not an IP address") from None
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} is not 0..65535")
    return host, int(port)


def loads(text: str, path: str = "<config>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    unknown = set(data) - SECTIONS
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(
            f"{_where(path, text, key)}: unknown key (expected [metrics], [daemon], [[policy]])"
        )

    listen = DEFAULT_LISTEN
    metrics = data.get("metrics", {})
    if not isinstance(metrics, dict):
        raise ConfigError(f"{path}: metrics: must be a table [metrics]")
    for key, value in metrics.items():
        if key != "listen":
            raise ConfigError(f"{_where(path, text, key, name='metrics.' + key)}: unknown key")
        try:
            listen = parse_listen(value)
        except ValueError as e:
            raise ConfigError(f"{_where(path, text, key, name='metrics.listen')}: {e}") from None

    daemon = data.get("daemon", {})
    if not isinstance(daemon, dict):
        raise ConfigError(f"{path}: daemon: must be a table [daemon]")
    detach_on_exit, audit_interval = False, 15.0
    for key, value in daemon.items():
        where = _where(path, text, key, name="daemon." + key)
        if key == "detach_on_exit":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: expected true or false")
            detach_on_exit = value
        elif key == "audit_interval":
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"{where}: expected seconds >= 0 (0 turns the audit off)")
            audit_interval = float(value)
        else:
            raise ConfigError(f"{where}: unknown key")

    rules = []
    policies = data.get("policy", [])
    if not isinstance(policies, list):
        raise ConfigError(f"{path}: policy: write each policy as a [[policy]] table")
    for i, table in enumerate(policies):
        rules.append(_rule(path, text, i, table))
    return Config(path, listen, tuple(rules), detach_on_exit, audit_interval)


def _rule(path: str, text: str, i: int, table: dict) -> Rule:
    name = f"policy[{i}]"
    for key in table:
        if key not in POLICY_KEYS:
            hint = ""
            if key in BY_KEY and not BY_KEY[key].bpf:
                hint = " (the kernel refuses it from BPF; only the LD_PRELOAD shim sets it)"
            raise ConfigError(f"{_where(path, text, key, i, f'{name}.{key}')}: unknown key{hint}")
    if "cgroup" not in table:
        raise ConfigError(f"{_where(path, text, '[[policy]]', i, name)}: missing key cgroup")
    pattern = table["cgroup"]
    if not isinstance(pattern, str) or not pattern.strip("/"):
        raise ConfigError(
            f"{_where(path, text, 'cgroup', i, name + '.cgroup')}: expected a non-empty path "
            'relative to the cgroup2 mount, e.g. "system.slice/*.service" (the root is not allowed)'
        )
    if ".." in pattern.split("/"):
        raise ConfigError(f"{_where(path, text, 'cgroup', i, name + '.cgroup')}: '..' not allowed")
    values: dict[str, object] = {}
    for key, value in table.items():
        if key == "cgroup":
            continue
        where = _where(path, text, key, i, f"{name}.{key}")
        if key == "mode":
            if value not in ("set", "enforce"):
                raise ConfigError(f'{where}: expected "set" or "enforce", got {value!r}')
            values[key] = value
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        try:
            values[key] = parse_value(BY_KEY[key], value)
        except UsageError as e:
            raise ConfigError(f"{where}: {str(e).partition(': ')[2]}") from None
    return Rule(pattern.strip("/"), Policy.from_mapping(values), i)


def load(path: str) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return loads(text, path)
