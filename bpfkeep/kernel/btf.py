"""The running kernel's BTF (``/sys/kernel/btf/vmlinux``): where a member
of a kernel struct is, in this kernel.

bcc compiles against a distro header set, not the running kernel's, and
applies no CO-RE relocation: a ``struct sock`` field read at the headers'
offset reads the wrong bytes on another kernel (sk_cgrp_data is at 648 in
Debian 12's 6.1 headers, at 672 on 6.18).  A program that must read kernel
structs (the loss tracepoint) is given the offsets this module finds in the
kernel's own type information, as ``-D`` macros at compile time.

The format (Documentation/bpf/btf.rst): a header, then the type section,
one ``struct btf_type`` per type (ids from 1) followed by its kind's data,
then the string section.
"""

from __future__ import annotations

import dataclasses
import functools
import struct

from bpfkeep.errors import EnvironmentProblem

VMLINUX = "/sys/kernel/btf/vmlinux"
BTF_MAGIC = 0xEB9F
# BTF_KIND_*
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
_QUALIFIERS = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)

_HEADER = struct.Struct("=HBBIIIII")  # magic, version, flags, hdr_len, type/str off, len
_TYPE = struct.Struct("=III")  # name_off, info, size|type
_U32x3 = struct.Struct("=III")


class BtfError(EnvironmentProblem):
    """The kernel's BTF is missing, unreadable, or lacks what we need."""


@dataclasses.dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    bit_offset: int
    bitfield: int  # bits; 0: not a bitfield


@dataclasses.dataclass(frozen=True)
class Type:
    kind: int
    name: str
    size_or_type: int  # size (INT, STRUCT, UNION, ENUM, DATASEC) or the type referred to
    members: tuple[Member, ...] = ()  # STRUCT, UNION
    array: tuple[int, int] = (0, 0)  # ARRAY: (element type, number of elements)


class Btf:
    """Types of one BTF blob, looked up by name and member path."""

    def __init__(self, data: bytes):
        if len(data) < _HEADER.size:
            raise BtfError("BTF: too short")
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(
            data
        )
        if magic != BTF_MAGIC:
            raise BtfError("BTF: bad magic (not BTF, or another byte order)")
        types = data[hdr_len + type_off : hdr_len + type_off + type_len]
        self._strings = data[hdr_len + str_off : hdr_len + str_off + str_len]
        self.types: list[Type | None] = [None]  # type id 0 is void
        self._by_name: dict[tuple[int, str], int] = {}
        self._enumerators: dict[str, int] = {}  # name -> value, every ENUM's
        self._parse(types)

    def _str(self, off: int) -> str:
        end = self._strings.find(b"\0", off)
        return self._strings[off:end].decode("ascii", "replace")

    def _parse(self, buf: bytes) -> None:
        off, n = 0, len(buf)
        while off + _TYPE.size <= n:
            name_off, info, size_or_type = _TYPE.unpack_from(buf, off)
            off += _TYPE.size
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            kflag = info >> 31
            name = self._str(name_off) if name_off else ""
            members: tuple[Member, ...] = ()
            array = (0, 0)
            if kind in (INT, VAR, DECL_TAG):
                off += 4
            elif kind == ARRAY:
                elem, _index, nelems = _U32x3.unpack_from(buf, off)
                array = (elem, nelems)
                off += 12
            elif kind in (STRUCT, UNION):
                ms = []
                for _ in range(vlen):
                    m_name, m_type, m_off = _U32x3.unpack_from(buf, off)
                    off += 12
                    bits, at = (m_off >> 24, m_off & 0xFFFFFF) if kflag else (0, m_off)
                    ms.append(Member(self._str(m_name) if m_name else "", m_type, at, bits))
                members = tuple(ms)
            elif kind == ENUM:
                for _ in range(vlen):
                    e_name, e_val = struct.unpack_from("=Ii", buf, off)
                    off += 8
                    self._enumerators.setdefault(self._str(e_name), e_val)
            elif kind == ENUM64:
                off += 12 * vlen
            elif kind == FUNC_PROTO:
                off += 8 * vlen
            elif kind == DATASEC:
                off += 12 * vlen
            t = Type(kind, name, size_or_type, members, array)
            if name and kind in (STRUCT, UNION):
                self._by_name.setdefault((kind, name), len(self.types))
            self.types.append(t)

    def resolve(self, type_id: int) -> tuple[int, Type]:
        """Through typedefs and qualifiers to the type itself."""
        for _ in range(32):
            t = self.types[type_id]
            if t is None or t.kind not in _QUALIFIERS:
                return type_id, t  # type: ignore[return-value]
            type_id = t.size_or_type
        raise BtfError(f"BTF: type {type_id}: qualifiers nested too deeply")

    def struct(self, name: str) -> int:
        for kind in (STRUCT, UNION):
            i = self._by_name.get((kind, name))
            if i is not None:
                return i
        raise BtfError(f"BTF: no struct {name} in this kernel")

    def _find(self, type_id: int, name: str) -> tuple[int, Member] | None:
        """(bit offset, member) of ``name`` in a struct or union, looking
        into anonymous members (``union { struct { __be32 skc_daddr; ...}}``)."""
        _, t = self.resolve(type_id)
        for m in t.members:
            if m.name == name:
                return m.bit_offset, m
        for m in t.members:
            if not m.name:
                _, inner = self.resolve(m.type_id)
                if inner is not None and inner.kind in (STRUCT, UNION):
                    found = self._find(m.type_id, name)
                    if found is not None:
                        return m.bit_offset + found[0], found[1]
        return None

    def offset(self, struct_name: str, path: str) -> int:
        """Byte offset of ``path`` ("a.b.c") in ``struct struct_name``."""
        type_id, bits = self.struct(struct_name), 0
        for part in path.split("."):
            found = self._find(type_id, part)
            if found is None:
                raise BtfError(f"BTF: struct {struct_name} has no {path} in this kernel")
            at, member = found
            if member.bitfield or at % 8:
                raise BtfError(f"BTF: {struct_name}.{path} is a bitfield")
            bits += at
            type_id = member.type_id
        return bits // 8

    def has(self, struct_name: str, path: str) -> bool:
        try:
            self.offset(struct_name, path)
        except BtfError:
            return False
        return True

    def size(self, struct_name: str, path: str) -> int:
        """sizeof the member at ``path`` (scalars, structs, arrays)."""
        type_id = self.struct(struct_name)
        for part in path.split("."):
            found = self._find(type_id, part)
            if found is None:
                raise BtfError(f"BTF: struct {struct_name} has no {path} in this kernel")
            type_id = found[1].type_id
        return self._sizeof(type_id)

    def enumerator(self, name: str) -> int:
        """The value of an enumerator (``SOCK_KEEPOPEN`` of enum sock_flags)."""
        try:
            return self._enumerators[name]
        except KeyError:
            raise BtfError(f"BTF: no enumerator {name} in this kernel") from None

    def _sizeof(self, type_id: int) -> int:
        _, t = self.resolve(type_id)
        if t.kind == PTR:
            return 8
        if t.kind == ARRAY:
            return self._sizeof(t.array[0]) * t.array[1]
        return t.size_or_type


@functools.cache
def vmlinux(path: str = VMLINUX) -> Btf:
    try:
        with open(path, "rb") as f:
            return Btf(f.read())
    except OSError as e:
        raise BtfError(
            f"cannot read the kernel's BTF ({path}: {e.strerror}): a kernel built with "
            "CONFIG_DEBUG_INFO_BTF=y is needed"
        ) from None
