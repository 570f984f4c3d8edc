"""The LD_PRELOAD fallback: find libbpfkeep.so and build a program's environment.

The shim (``preload/``) reads libkeepalive's environment names; this module
turns a :class:`~bpfkeep.options.Policy` into them.  It has no state: every
function takes what it needs and returns a new value.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import pathlib
import re
import shutil
import stat
import struct
from collections.abc import Mapping
from typing import BinaryIO

from bpfkeep.errors import EnvironmentProblem, UsageError
from bpfkeep.options import TUNABLE, Policy
from bpfkeep.peers import Network, show_network

LIB_NAME = "libbpfkeep.so"
LIB_ENV = "BPFKEEP_PRELOAD_LIB"
HOOKS = ("connect", "socket")
PEERS_ENV = "BPFKEEP_PEERS"
# What the shim holds (BK_PEER_MAX_RULES and BK_PEER_MAX_NETS in
# preload/policy.h; tests/test_preload.py keeps them equal): more would be
# ignored there, so preload_env refuses it here.
MAX_PEER_RULES = 64
MAX_PEER_ADDRESSES = 256

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
    0 stays "0" (kernel default).  BPFKEEP_ENFORCE, BPFKEEP_HOOK and
    BPFKEEP_PEERS are set or removed to match ``policy.mode``, ``hook`` and
    ``policy.peers`` (host names resolved already: peers.resolve_names), and
    an inherited KEEPALIVE=off (the original libkeepalive's off switch,
    honoured by the shim) is removed: the caller asked for this policy.
    """
    if hook not in HOOKS:
        raise UsageError(f"hook: {hook!r} is not one of {', '.join(HOOKS)}")
    if policy.peers and hook == "socket":
        raise UsageError(
            "--hook socket sets the options at socket(), before the peer is known: "
            "peer rules need --hook connect"
        )
    peers = peers_value(policy)
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
    if peers:
        env[PEERS_ENV] = peers
    else:
        env.pop(PEERS_ENV, None)
    if env.get("KEEPALIVE", "").lower() == "off":
        del env["KEEPALIVE"]
    return env


def peers_value(policy: Policy) -> str:
    """The policy's peer rules as the shim reads them (BPFKEEP_PEERS; the
    grammar is in preload/README.md): one item per rule, in the order
    written, separated by ``;``.  An item is the rule's networks joined by
    ``|`` (a host name's addresses, the name kept as ``name=``), its
    ``port=``, then ``exempt`` or the values in which the rule differs from
    the policy -- the shim takes the others from the policy, whose values
    preload_env writes out in full.  A host name that resolved to nothing
    applies to no connection (peers.resolve_names reported it): left out.
    """
    items = []
    addresses = 0
    for peer in policy.peers:
        if not peer.networks:
            continue
        addresses += len(peer.networks)
        fields = ["|".join(_shim_network(n) for n in peer.networks)]
        if peer.ports is not None:
            lo, hi = peer.ports
            fields.append(f"port={lo}" if lo == hi else f"port={lo}-{hi}")
        if peer.is_name:
            fields.append(f"name={peer.address}")
        if peer.policy is None:
            fields.append("exempt")
        else:
            fields += [
                f"{opt.key}={peer.policy.value(opt.key)}"
                for opt in TUNABLE
                if opt.side != "listen" and peer.policy.value(opt.key) != policy.value(opt.key)
            ]
            if peer.policy.mode != policy.mode:
                fields.append(f"mode={peer.policy.mode}")
        items.append(",".join(fields))
    if len(items) > MAX_PEER_RULES or addresses > MAX_PEER_ADDRESSES:
        raise UsageError(
            f"peer rules: the LD_PRELOAD shim holds at most {MAX_PEER_RULES} rules with "
            f"{MAX_PEER_ADDRESSES} addresses between them, this policy has {len(items)} "
            f"with {addresses}: merge them into CIDRs, or use bpfkeep run --via bpf"
        )
    return ";".join(items)


def _shim_network(net: Network) -> str:
    """A network as the shim parses it: without an IPv6 scope (which the
    lookup ignores, here and in the kernel), IPv4 ones as IPv4."""
    return show_network(ipaddress.IPv6Network((int(net.network_address), net.prefixlen)))


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
    elf = _inspect(path_or_name)
    return elf is not None and not elf.interp


def unreachable_reason(path_or_name: str) -> str | None:
    """Why the LD_PRELOAD shim cannot reach the program, or None.

    Statically linked programs have no dynamic loader to preload anything.
    Set-user-ID and set-group-ID programs run in secure mode, in which the
    loader ignores LD_PRELOAD paths.
    Go programs, even dynamically linked ones (cgo), make their socket
    system calls directly, not through libc's connect/listen: they carry a
    ``.go.buildinfo`` section (Go 1.13+) or a ``.note.go.buildid`` note,
    both kept by ``strip``.  Scripts, other files and ELF files too broken
    to read: None (nothing is known to be wrong).
    """
    path = _resolve(path_or_name)
    elf = _inspect(path)
    if elf is None:
        return None
    if not elf.interp:
        return "statically linked"
    if elf.sections & _GO_SECTIONS:
        return "a Go program (Go makes its socket system calls without libc)"
    if _secure_exec(path):
        return "set-user-ID or set-group-ID (the dynamic loader ignores LD_PRELOAD for it)"
    return None


def _secure_exec(path: str) -> bool:
    """Whether running path changes this process's user or group, so that
    the kernel sets AT_SECURE and ld.so ignores LD_PRELOAD: a set-user-ID
    (set-group-ID) file owned by another user (group), on a file system
    not mounted nosuid, or file capabilities for a caller other than root."""
    try:
        st = os.stat(path)
        if os.statvfs(path).f_flag & os.ST_NOSUID:
            return False
    except OSError:
        return False
    if st.st_mode & stat.S_ISUID and st.st_uid != os.geteuid():
        return True
    if st.st_mode & stat.S_ISGID and st.st_gid != os.getegid():
        return True
    if os.geteuid() != 0:
        try:
            os.getxattr(path, "security.capability")
            return True
        except OSError:
            pass
    return False


_GO_SECTIONS = frozenset({".go.buildinfo", ".note.go.buildid"})
_SHN_XINDEX = 0xFFFF
_MAX_SECTIONS = 1 << 16
_MAX_SHSTRTAB = 1 << 20


@dataclasses.dataclass(frozen=True)
class _Elf:
    interp: bool  # has PT_INTERP: the dynamic loader runs it
    sections: frozenset[str]  # section names; empty if unreadable


def _inspect(path_or_name: str) -> _Elf | None:
    path = _resolve(path_or_name)
    try:
        with open(path, "rb") as f:
            return _read_elf(f)
    except OSError as e:
        raise UsageError(f"cannot run {path}: {e.strerror}") from None


def _read_elf(f: BinaryIO) -> _Elf | None:
    """PT_INTERP and the section names of an ELF file; None if it is not
    ELF or its program headers cannot be read."""
    ident = f.read(64)
    if len(ident) < 52 or ident[:4] != b"\x7fELF":
        return None
    elf_class, data = ident[4], ident[5]
    if elf_class not in (1, 2) or data not in (1, 2):
        return None
    order = "<" if data == 1 else ">"
    if elf_class == 2:
        if len(ident) < 64:
            return None
        phoff, shoff = struct.unpack_from(order + "QQ", ident, 0x20)
        phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from(
            order + "HHHHH", ident, 0x36
        )
        # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link
        sh_format, sh_min = order + "IIQQQQI", 0x2C
    else:
        phoff, shoff = struct.unpack_from(order + "II", ident, 0x1C)
        phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from(
            order + "HHHHH", ident, 0x2A
        )
        sh_format, sh_min = order + "IIIIIII", 0x1C
    section0 = None
    if shoff and shentsize >= sh_min:
        f.seek(shoff)
        raw = f.read(shentsize)
        if len(raw) == shentsize:
            section0 = struct.unpack_from(sh_format, raw)
    if phnum == _PN_XNUM:  # the real count is in section 0's sh_info
        if section0 is None:
            return None
        f.seek(shoff + sh_min)
        raw = f.read(4)
        if len(raw) < 4:
            return None
        (phnum,) = struct.unpack(order + "I", raw)
    if phentsize < 4:
        return None
    f.seek(phoff)
    table = f.read(phentsize * phnum)
    if len(table) < phentsize * phnum:
        return None
    interp = any(
        struct.unpack_from(order + "I", table, i * phentsize)[0] == _PT_INTERP for i in range(phnum)
    )
    return _Elf(
        interp,
        _section_names(f, order, shoff, shentsize, shnum, shstrndx, sh_format, sh_min, section0),
    )


def _section_names(
    f: BinaryIO,
    order: str,
    shoff: int,
    shentsize: int,
    shnum: int,
    shstrndx: int,
    sh_format: str,
    sh_min: int,
    section0: tuple | None,
) -> frozenset[str]:
    if section0 is None:
        return frozenset()
    if shnum == 0:  # extended numbering: the count is section 0's sh_size
        shnum = section0[5]
    if shstrndx == _SHN_XINDEX:  # and the string table's index its sh_link
        shstrndx = section0[6]
    if not 0 < shnum <= _MAX_SECTIONS or shstrndx >= shnum:
        return frozenset()
    f.seek(shoff)
    table = f.read(shentsize * shnum)
    if len(table) < shentsize * shnum:
        return frozenset()
    headers = [struct.unpack_from(sh_format, table, i * shentsize) for i in range(shnum)]
    strtab_off, strtab_size = headers[shstrndx][4], headers[shstrndx][5]
    if strtab_size > _MAX_SHSTRTAB:
        return frozenset()
    f.seek(strtab_off)
    strtab = f.read(strtab_size)
    names = set()
    for h in headers:
        end = strtab.find(b"\0", h[0])
        if h[0] < len(strtab) and end >= 0:
            names.add(strtab[h[0] : end].decode("latin-1"))
    return frozenset(names)
