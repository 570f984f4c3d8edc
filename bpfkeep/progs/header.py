"""bpf/bpfkeep.h as userspace reads it: its integer defines and the
layouts of its structs, parsed from the very header the BPF programs are
compiled from (the installed package's copy, which bpf/bpfkeep_options.h,
generated from the option table, joins).  Nothing is mirrored by hand;
tests/test_layout.py compares the layouts with the BTF of the loaded
programs' maps.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import math
import operator
import re
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

from bpfkeep.errors import EnvironmentProblem

HEADER = "bpfkeep.h"


def bpf_dir() -> Path:
    """Where the BPF C sources are: inside the installed package, or the
    source tree's bpf/ when running from a checkout."""
    pkg = Path(__file__).resolve().parent.parent
    for cand in (pkg / "_bpf", pkg.parent / "bpf"):
        if (cand / HEADER).is_file():
            return cand
    raise EnvironmentProblem(f"{HEADER} not found next to the bpfkeep package: reinstall bpfkeep")


def source_version(src: Path | None = None) -> str:
    """A short hash of the BPF sources: names the pinned object directory,
    so a bpfkeep whose programs differ loads its own and migrates."""
    src = src or bpf_dir()
    h = hashlib.sha256()
    for f in sorted(src.iterdir()):
        if f.suffix in (".c", ".h"):
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def unit_text(path: Path) -> str:
    """A BPF translation unit as one text: each ``#include "..."`` file
    written in place of its include, once (the files are guarded anyway);
    ``#include <...>`` is left to the compiler.  bcc registers programs and
    rewrites its map syntax only in the text it is handed, never in an
    included file (bpf/bpfkeep.bpf.c says more)."""
    return _unit_text(path.resolve(), set())


def _unit_text(path: Path, done: set[Path]) -> str:
    done.add(path)
    out = []
    for line in path.read_text().splitlines():
        m = _INCLUDE.fullmatch(line)
        if not m:
            out.append(line)
            continue
        included = (path.parent / m.group(1)).resolve()
        if included not in done:
            out.append(_unit_text(included, done))
    return "\n".join(out)


# -- reading the header ------------------------------------------------------------

# The fixed-width types the header is written in (no padding holes: a
# test checks the compiled object), as struct module codes.
_CTYPES = {
    "__u8": "B",
    "__u16": "H",
    "__u32": "I",
    "__u64": "Q",
    "__s8": "b",
    "__s16": "h",
    "__s32": "i",
    "__s64": "q",
}
_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)
_DEFINE = re.compile(r"^\s*#\s*define\s+(\w+)(\(?)(.*)$", re.M)
_STRUCT = re.compile(r"\bstruct\s+(\w+)\s*\{([^{}]*)\}\s*;")
_MEMBER = re.compile(r"^(\w+)\s+(\w+)\s*((?:\[[^\]]+\]\s*)*)$")


class HeaderError(EnvironmentProblem):
    """The installed bpfkeep.h cannot be read as this code expects."""


@dataclasses.dataclass(frozen=True)
class Member:
    """One member of a C struct: fixed-width scalar or (nested) array."""

    name: str
    ctype: str  # "__u32"
    dims: tuple[int, ...]  # () for a scalar; (8, 8) for x[8][8]
    offset: int  # bytes

    @property
    def count(self) -> int:
        return math.prod(self.dims)

    @property
    def size(self) -> int:
        return struct.calcsize(_CTYPES[self.ctype]) * self.count


@dataclasses.dataclass(frozen=True)
class Layout:
    """A struct as the C compiler lays it out (natural alignment)."""

    name: str
    members: tuple[Member, ...]
    size: int

    @functools.cached_property
    def fmt(self) -> str:
        """struct module format, padding spelled out."""
        parts, at = ["="], 0
        for m in self.members:
            if m.offset > at:
                parts.append(f"{m.offset - at}x")
            parts.append(f"{m.count}{_CTYPES[m.ctype]}")
            at = m.offset + m.size
        if self.size > at:
            parts.append(f"{self.size - at}x")
        return "".join(parts)

    def view(self, *names: str) -> str:
        """struct module format that reads only these scalar members (in
        the struct's order) and skips the rest: for decoding many values
        of which a few members matter."""
        parts, at = ["="], 0
        for m in self.members:
            if m.name not in names:
                continue
            if m.dims:
                raise HeaderError(f"struct {self.name}.{m.name}: an array, not a scalar")
            if m.offset > at:
                parts.append(f"{m.offset - at}x")
            parts.append(_CTYPES[m.ctype])
            at = m.offset + m.size
        if len(parts) - 1 - sum(p.endswith("x") for p in parts) != len(names):
            raise HeaderError(f"struct {self.name} has not all of {', '.join(names)}")
        if self.size > at:
            parts.append(f"{self.size - at}x")
        return "".join(parts)

    def pack(self, **values: int | Sequence[int]) -> bytes:
        """Members by name; absent ones are 0; arrays flat, in C order."""
        unknown = set(values) - {m.name for m in self.members}
        if unknown:
            raise TypeError(f"struct {self.name} has no member {sorted(unknown)[0]}")
        flat: list[int] = []
        for m in self.members:
            v = values.get(m.name, 0)
            if m.dims:
                v = list(v) if not isinstance(v, int) else [v] * m.count
                if len(v) != m.count:
                    raise ValueError(f"struct {self.name}.{m.name}: {len(v)} values, not {m.count}")
                flat += v
            else:
                flat.append(int(v))  # type: ignore[arg-type]
        return self._struct.pack(*flat)

    @functools.cached_property
    def _struct(self) -> struct.Struct:
        return struct.Struct(self.fmt)

    @functools.cached_property
    def _slots(self) -> tuple[tuple[str, int, int], ...]:
        """(name, first word, word count; 0 for a scalar) of each member."""
        out, i = [], 0
        for m in self.members:
            out.append((m.name, i, m.count if m.dims else 0))
            i += m.count
        return tuple(out)

    def member(self, name: str) -> Member:
        for m in self.members:
            if m.name == name:
                return m
        raise HeaderError(f"bpfkeep.h: struct {self.name} has no member {name}")

    def span(self, first: str, last: str | None = None) -> slice:
        """The bytes of members ``first`` through ``last`` (default: just
        ``first``), for comparing and splicing raw values."""
        a, b = self.member(first), self.member(last or first)
        return slice(a.offset, b.offset + b.size)

    def unpack(self, raw: bytes, offset: int = 0) -> dict[str, int | tuple[int, ...]]:
        """Members by name; arrays flat, in C order."""
        return self._members(self._struct.unpack_from(raw, offset))

    def unpack_summed(self, raw: bytes) -> dict[str, int | tuple[int, ...]]:
        """Members by name, each summed over the copies of the struct that
        ``raw`` holds one after the other (a per-CPU map value: one per
        possible CPU): each copy unpacked at once, then added word by word."""
        copies = len(raw) // self.size
        if copies == 1:
            return self.unpack(raw)
        if not copies:
            return self._members((0,) * self._words)
        each = self._struct.iter_unpack(memoryview(raw)[: copies * self.size])
        total = next(each)
        for words in each:
            total = tuple(map(operator.add, total, words))
        return self._members(total)

    @functools.cached_property
    def _words(self) -> int:
        return sum(m.count for m in self.members)

    def _members(self, words: Sequence[int]) -> dict[str, int | tuple[int, ...]]:
        return {
            name: tuple(words[i : i + n]) if n else words[i]  # type: ignore[misc]
            for name, i, n in self._slots
        }


@dataclasses.dataclass(frozen=True)
class Header:
    defines: Mapping[str, int]  # object-like macros with an integer value
    structs: Mapping[str, Layout]

    def define(self, name: str) -> int:
        try:
            return self.defines[name]
        except KeyError:
            raise HeaderError(f"bpfkeep.h defines no {name}: reinstall bpfkeep") from None

    def struct(self, name: str) -> Layout:
        try:
            return self.structs[name]
        except KeyError:
            raise HeaderError(f"bpfkeep.h declares no struct {name}: reinstall bpfkeep") from None

    def enumerate(self, prefix: str) -> tuple[str, ...]:
        """The names after ``prefix`` of the defines numbering 0..n-1
        (BK_CB_CONNECT 0, BK_CB_LISTEN 1, ...), in their order."""
        found = {n[len(prefix) :]: v for n, v in self.defines.items() if n.startswith(prefix)}
        names = sorted(found, key=found.__getitem__)
        if [found[n] for n in names] != list(range(len(names))):
            raise HeaderError(f"bpfkeep.h: the {prefix}* values are not 0..{len(names) - 1}")
        return tuple(names)


def _source(path: Path, seen: frozenset[Path] = frozenset()) -> str:
    """The header's text, with its own ``#include "..."`` files inlined."""
    if path in seen:
        return ""
    text = path.read_text()

    def inline(m: re.Match[str]) -> str:
        return _source(path.parent / m.group(1), seen | {path})

    return _INCLUDE.sub(inline, text)


def _evaluate(expr: str, names: Mapping[str, str], depth: int = 0) -> int | None:
    """An integer constant expression of the header (literals, other
    defines, arithmetic and bit operators); None for anything else."""
    if depth > 32:
        return None
    # C integer suffixes (1u, 0x10UL) mean nothing to the value.
    expr = re.sub(r"\b(0[xX][0-9a-fA-F]+|[0-9]+)[uUlL]+\b", r"\1", expr)
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        return None

    def ev(node: ast.AST) -> int | None:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in names:
                return None
            return _evaluate(names[node.id], names, depth + 1)
        if isinstance(node, ast.UnaryOp):
            v = ev(node.operand)
            unary = {ast.USub: lambda: -v, ast.UAdd: lambda: v, ast.Invert: lambda: ~v}
            op = unary.get(type(node.op))
            return op() if op and v is not None else None
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            if a is None or b is None:
                return None
            ops = {
                ast.Add: lambda: a + b,
                ast.Sub: lambda: a - b,
                ast.Mult: lambda: a * b,
                ast.LShift: lambda: a << b,
                ast.RShift: lambda: a >> b,
                ast.BitOr: lambda: a | b,
                ast.BitAnd: lambda: a & b,
            }
            op = ops.get(type(node.op))
            return op() if op else None
        return None

    return ev(tree)


def parse_header(text: str) -> Header:
    """The integer defines and the structs of C header text (includes
    already inlined).  Strict about structs: a member that is not a
    fixed-width scalar or array of one is an error, not a guess."""
    code = _COMMENT.sub(" ", text).replace("\\\n", " ")
    raw: dict[str, str] = {}
    for m in _DEFINE.finditer(code):
        if not m.group(2):  # function-like macros (X(...)) are no constants
            raw[m.group(1)] = m.group(3)
    defines: dict[str, int] = {}
    for name, expr in raw.items():
        v = _evaluate(expr, raw)
        if v is not None:
            defines[name] = v
    structs: dict[str, Layout] = {}
    for m in _STRUCT.finditer(code):
        structs[m.group(1)] = _layout(m.group(1), m.group(2), defines)
    return Header(defines, structs)


def _layout(name: str, body: str, defines: Mapping[str, int]) -> Layout:
    members: list[Member] = []
    at, align = 0, 1
    for decl in (d.strip() for d in body.split(";")):
        if not decl:
            continue
        m = _MEMBER.match(" ".join(decl.split()))
        if not m or m.group(1) not in _CTYPES:
            raise HeaderError(f"bpfkeep.h: struct {name}: cannot read member {decl!r}")
        dims = []
        for d in re.findall(r"\[([^\]]+)\]", m.group(3)):
            n = _evaluate(d, {k: str(v) for k, v in defines.items()})
            if n is None or n <= 0:
                raise HeaderError(f"bpfkeep.h: struct {name}.{m.group(2)}: bad size [{d}]")
            dims.append(n)
        width = struct.calcsize(_CTYPES[m.group(1)])
        at = (at + width - 1) // width * width
        member = Member(m.group(2), m.group(1), tuple(dims), at)
        members.append(member)
        at += member.size
        align = max(align, width)
    return Layout(name, tuple(members), (at + align - 1) // align * align)


@functools.cache
def header(path: Path | None = None) -> Header:
    """bpfkeep.h of the installed package (or of the checkout), parsed."""
    if path is None:
        path = bpf_dir() / HEADER
    try:
        return parse_header(_source(path))
    except OSError as e:
        raise HeaderError(f"cannot read {path}: {e.strerror}: reinstall bpfkeep") from None
