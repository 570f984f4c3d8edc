"""The LD_PRELOAD fallback: find libbpfkeep.so and build a program's environment.

The shim (``preload/``) reads libkeepalive's environment names; this module
turns a :class:`~bpfkeep.options.Policy` into them.  It has no state: every
function takes what it needs and returns a new value.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import struct
from collections.abc import Mapping
from typing import BinaryIO

from bpfkeep.errors import EnvironmentProblem, UsageError
from bpfkeep.options import TUNABLE, Policy

LIB_NAME = "libbpfkeep.so"
LIB_ENV = "BPFKEEP_PRELOAD_LIB"
HOOKS = ("connect", "socket")

# ld.so splits LD_PRELOAD on blanks and colons.
_PRELOAD_SEPARATORS = " :"

_PT_INTERP = 3
_PN_XNUM = 0xFFFF


def library_path(environ: Mapping[str, str] | None = None) -> pathlib.Path:
    """The first existing shim: $BPFKEEP_PRELOAD_LIB, the installed copy, the
    source tree's build.  ``environ`` defaults to the process environment."""
    env = os.environ if environ is None else environ
    package = pathlib.Path(__file__).resolve().parent
    candidates = []
    if env.get(LIB_ENV):
        candidates.append(pathlib.Path(env[LIB_ENV]))
    candidates += [
        package / "_lib" / LIB_NAME,  # where `pip install` puts it
        package.parent / "preload" / LIB_NAME,  # source tree: make -C preload
    ]
    for path in candidates:
        if path.is_file():
            return path.absolute()
    raise EnvironmentProblem(
        f"{LIB_NAME} not found (looked at {', '.join(map(str, candidates))}): "
        f"build it with `make -C {package.parent / 'preload'}` "
        f"or point {LIB_ENV} at it"
    )


def _split_preload(value: str) -> list[str]:
    return [entry for entry in re.split(r"[ :]+", value) if entry]


def _same_file(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def preload_env(
    policy: Policy, environ: Mapping[str, str], *, hook: str = "connect"
) -> dict[str, str]:
    """A copy of ``environ`` that runs a program under the shim with ``policy``.

    The shim is appended to LD_PRELOAD (existing entries kept, not added
    twice); every tunable option is written under its canonical name, so
    inherited aliases (FORCE_KEEPALIVE_*, KEEPIDLE...) cannot override it;
    0 stays "0" (kernel default).  BPFKEEP_ENFORCE and BPFKEEP_HOOK are set
    or removed to match ``policy.mode`` and ``hook``, and an inherited
    KEEPALIVE=off (the original libkeepalive's off switch, honoured by the
    shim) is removed: the caller asked for this policy.
    """
    if hook not in HOOKS:
        raise UsageError(f"hook: {hook!r} is not one of {', '.join(HOOKS)}")
    lib = str(library_path(environ))
    if any(sep in lib for sep in _PRELOAD_SEPARATORS):
        raise EnvironmentProblem(
            f"{lib}: LD_PRELOAD cannot name a path with a blank or a colon; "
            f"install {LIB_NAME} elsewhere or set {LIB_ENV}"
        )

    env = dict(environ)
    entries = _split_preload(env.get("LD_PRELOAD", ""))
    if not any(_same_file(entry, lib) for entry in entries):
        entries.append(lib)
    env["LD_PRELOAD"] = ":".join(entries)

    for opt in TUNABLE:
        env[opt.env[0]] = str(policy.value(opt.key))
    if policy.mode == "enforce":
        env["BPFKEEP_ENFORCE"] = "1"
    else:
        env.pop("BPFKEEP_ENFORCE", None)
    if hook == "socket":
        env["BPFKEEP_HOOK"] = "socket"
    else:
        env.pop("BPFKEEP_HOOK", None)
    if env.get("KEEPALIVE", "").lower() == "off":
        del env["KEEPALIVE"]
    return env


def _resolve(path_or_name: str) -> str:
    if os.sep in path_or_name:
        return path_or_name
    found = shutil.which(path_or_name)
    if found is None:
        raise UsageError(f"{path_or_name}: command not found in PATH")
    return found


def is_static_executable(path_or_name: str) -> bool:
    """True if the program ignores LD_PRELOAD: an ELF file without PT_INTERP.

    A name without a slash is looked up in PATH.  Scripts (``#!``) are run by
    an interpreter, normally dynamic: False.  Anything else that is not ELF,
    or a truncated ELF file: False.
    """
    path = _resolve(path_or_name)
    try:
        with open(path, "rb") as f:
            return _elf_without_interp(f)
    except OSError as e:
        raise UsageError(f"cannot run {path}: {e.strerror}") from None


def _elf_without_interp(f: BinaryIO) -> bool:
    ident = f.read(64)
    if len(ident) < 52 or ident[:4] != b"\x7fELF":
        return False
    elf_class, data = ident[4], ident[5]
    if elf_class not in (1, 2) or data not in (1, 2):
        return False
    order = "<" if data == 1 else ">"
    if elf_class == 2:
        (phoff,) = struct.unpack_from(order + "Q", ident, 0x20)
        (shoff,) = struct.unpack_from(order + "Q", ident, 0x28)
        phentsize, phnum = struct.unpack_from(order + "HH", ident, 0x36)
        sh_info_off = 0x2C
    else:
        (phoff,) = struct.unpack_from(order + "I", ident, 0x1C)
        (shoff,) = struct.unpack_from(order + "I", ident, 0x20)
        phentsize, phnum = struct.unpack_from(order + "HH", ident, 0x2A)
        sh_info_off = 0x1C
    if phnum == _PN_XNUM:  # the real count is in section 0's sh_info
        f.seek(shoff + sh_info_off)
        raw = f.read(4)
        if len(raw) < 4:
            return False
        (phnum,) = struct.unpack(order + "I", raw)
    if phentsize < 4:
        return False
    f.seek(phoff)
    table = f.read(phentsize * phnum)
    if len(table) < phentsize * phnum:
        return False
    for i in range(phnum):
        (p_type,) = struct.unpack_from(order + "I", table, i * phentsize)
        if p_type == _PT_INTERP:
            return False
    return True
