"""TOML for configs of 10,000 tables: the same result as ``tomllib.loads``,
several times faster on the config's common shape.

tomllib (pure Python) takes ~1.6 s on this machine for a config of 10,000
``[[policy]]`` tables with 10 ``[[policy.peer]]`` tables each (6.8 MB),
more than the whole reload may take.  Such a file is mostly the same few
tables again: here the text is cut at its table headers, each table's
body (its ``key = value`` lines) is parsed once per distinct text, and the
tables are put together as TOML puts them.

Only what is read exactly is taken this way: headers ``[name]``,
``[[name]]`` and ``[[name.sub]]`` (bare keys), and bodies whose lines are
``bare_key = value`` with a string without escapes, a decimal integer or a
boolean, or blank, or a comment.  A body with anything else is parsed by
tomllib on its own; a header of any other form, a table defined twice, a
key given twice, a control character anywhere: the whole text goes to
tomllib, which gives the result or the error (with its line) as before.
tests/test_tomltables.py checks the result against tomllib's on generated
files.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

# Any line starting with "[": a header, or a line tomllib has to judge.
_SPLIT = re.compile(r"^([ \t]*\[.*)$", re.M)
_HEADER = re.compile(
    r"[ \t]*(?:\[\[([A-Za-z0-9_-]+)(?:\.([A-Za-z0-9_-]+))?\]\]|\[([A-Za-z0-9_-]+)\])"
    r"[ \t]*(?:#.*)?"
)
_LINE = re.compile(
    r"[ \t]*(?:([A-Za-z0-9_-]+)[ \t]*=[ \t]*"
    r"""(?:"([^"\\]*)"|'([^']*)'|(true|false)|([+-]?(?:0|[1-9](?:_?[0-9]){0,30})))"""
    r"[ \t]*)?(?:#.*)?"
)
# Control characters other than tab and newline (a lone or CRLF "\r"
# too): tomllib says where they are not allowed.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def loads(text: str) -> dict[str, Any]:
    """What ``tomllib.loads(text)`` returns, or raises."""
    fast = _tables(text)
    return tomllib.loads(text) if fast is None else fast


def _tables(text: str) -> dict[str, Any] | None:
    """The tables of ``text``; None: tomllib has to read it."""
    if _CONTROL.search(text):
        return None
    pieces = _SPLIT.split(text)  # body, header, body, header, body ...
    bodies: dict[str, dict[str, Any] | None] = {}  # body text -> its scalars
    headers: dict[str, tuple[str | None, ...] | None] = {}  # a few distinct lines
    root: dict[str, Any] = {}
    if not _fill(root, pieces[0], bodies):
        return None
    arrays: set[int] = set()  # the arrays of tables made by [[...]] headers
    for i in range(1, len(pieces), 2):
        line = pieces[i]
        if line in headers:
            names = headers[line]
        else:
            m = _HEADER.fullmatch(line)
            names = headers[line] = m.groups() if m is not None else None
        if names is None:
            return None
        name, sub, plain = names
        if plain is not None:
            if plain in root:
                return None  # defined twice (or a key): tomllib's error
            table = root[plain] = {}
        else:
            parent = root
            if sub is not None:
                tables = root.get(name)
                if tables is None or id(tables) not in arrays:
                    return None
                parent, name = tables[-1], sub
            tables = parent.get(name)
            if tables is None:
                tables = parent[name] = []
                arrays.add(id(tables))
            elif id(tables) not in arrays:
                return None
            table = {}
            tables.append(table)
        if not _fill(table, pieces[i + 1], bodies):
            return None
    return root


def _fill(table: dict[str, Any], body: str, bodies: dict[str, dict[str, Any] | None]) -> bool:
    """Put a body's keys into a table just made; False: the whole text goes
    to tomllib.  A body of scalars is parsed once per text (``bodies``)."""
    if body in bodies:
        values = bodies[body]
    else:
        values = bodies[body] = _scalars(body)
    if values is not None:
        table.update(values)  # scalars only: shared safely
        return True
    try:
        table.update(tomllib.loads(body))  # anything else, on its own
    except tomllib.TOMLDecodeError:
        return False
    return True


def _scalars(body: str) -> dict[str, Any] | None:
    """A body of bare keys with scalar values; None for anything else."""
    out: dict[str, Any] = {}
    for line in body.split("\n"):
        m = _LINE.fullmatch(line)
        if m is None:
            return None
        key, basic, literal, boolean, integer = m.groups()
        if key is None:
            continue  # blank or a comment
        if key in out:
            return None
        if basic is not None:
            out[key] = basic
        elif literal is not None:
            out[key] = literal
        elif boolean is not None:
            out[key] = boolean == "true"
        else:
            out[key] = int(integer)
    return out
