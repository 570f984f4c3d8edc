"""inet_diag: every TCP socket of the calling thread's network namespace.

The kernel's inet_diag (``ss``'s source) describes each TCP socket with its
state, addresses, inode, cookie (the same as ``bpf_get_socket_cookie``),
the timer it has pending and the cgroup that owns it
(``INET_DIAG_CGROUP_ID``, Linux 5.7+).  The netlink dump is spoken
directly (``socket`` + ``struct``): decoding 10,000 sockets with pyroute2's
generic message classes takes ~0.7 s; this takes a few milliseconds.  The
tests check the decoding against pyroute2's ``DiagSocket`` and ``ss``.

This module is also the one table of TCP states.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from collections.abc import Collection

from bpfkeep.errors import EnvironmentProblem

# include/net/tcp_states.h
(
    ESTABLISHED,
    SYN_SENT,
    SYN_RECV,
    FIN_WAIT1,
    FIN_WAIT2,
    TIME_WAIT,
    CLOSE,
    CLOSE_WAIT,
    LAST_ACK,
    LISTEN,
    CLOSING,
    NEW_SYN_RECV,
) = range(1, 13)
STATE_NAMES = {
    ESTABLISHED: "ESTABLISHED",
    SYN_SENT: "SYN_SENT",
    SYN_RECV: "SYN_RECV",
    FIN_WAIT1: "FIN_WAIT1",
    FIN_WAIT2: "FIN_WAIT2",
    TIME_WAIT: "TIME_WAIT",
    CLOSE: "CLOSE",
    CLOSE_WAIT: "CLOSE_WAIT",
    LAST_ACK: "LAST_ACK",
    LISTEN: "LISTEN",
    CLOSING: "CLOSING",
    NEW_SYN_RECV: "NEW_SYN_RECV",
}


def state_name(state: int) -> str:
    return STATE_NAMES.get(state, str(state))


def states_mask(states: tuple[int, ...] | list[int]) -> int:
    """The dump request's bit mask of these states."""
    return sum(1 << s for s in states)


# Full sockets only: TIME_WAIT and request sockets (SYN_RECV, NEW_SYN_RECV)
# have no owner, no cgroup and no options of their own.
FULL_SOCKETS = states_mask([s for s in STATE_NAMES if s not in (TIME_WAIT, SYN_RECV, NEW_SYN_RECV)])

# idiag_timer, as net/ipv4/inet_diag.c fills it (ss -o names in brackets)
TIMER_NONE, TIMER_RETRANSMIT, TIMER_KEEPALIVE, TIMER_TIMEWAIT, TIMER_PROBE0 = range(5)
TIMER_NAMES = {
    TIMER_NONE: "none",
    TIMER_RETRANSMIT: "retransmit",  # also loss probe / reorder timeout ("on")
    TIMER_KEEPALIVE: "keepalive",
    TIMER_TIMEWAIT: "timewait",
    TIMER_PROBE0: "probe0",  # zero-window probe ("persist")
}
FAMILIES = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}

# include/uapi/linux/netlink.h, sock_diag.h, inet_diag.h
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
# The request of inet_diag's first version (struct inet_diag_req), still
# served: it carries no family, and its dump walks the TCP tables once for
# IPv4 and IPv6 together -- one walk of 100,000 sockets, not two.
TCPDIAG_GETSOCK = 18
NLM_F_REQUEST = 0x01
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_TYPE_MASK = 0x3FFF
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_INFO = 2  # struct tcp_info, asked for with ext bit 1 << (2 - 1)
INET_DIAG_BC_JMP = 1
INET_DIAG_BC_CGROUP_COND = 13  # kernel >= 5.7 (17 was sent before: refused, EINVAL)
INET_DIAG_CGROUP_ID = 21  # kernel >= 5.7, sent for every full socket

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NLATTR = struct.Struct("=HH")  # len, type
# inet_diag_req_v2: family, protocol, ext, pad, states, inet_diag_sockid (all 0)
_REQ = struct.Struct("=BBBBI48x")
# inet_diag_req: family (none), src_len, dst_len, ext, sockid, states, dbs
_REQ_COMPAT = struct.Struct("=BBBB48xII")
_PORTS = struct.Struct(">HH")
_U64 = struct.Struct("=Q")
_I32 = struct.Struct("=i")
# inet_diag_bc_op {u8 code; u8 yes; u16 no}, + u64 cgroup id for a cgroup
# condition.  The kernel runs the ops from the first: a true condition goes
# on ``yes`` bytes, a false one ``no`` bytes (a jump op always ``no``);
# ending exactly at the end accepts the socket, past it rejects it.
_BC_OP = struct.Struct("=BBH")
_BC_CGROUP = struct.Struct("=BBHQ")
# The bytecode of one request is at most a netlink attribute (u16 length).
MAX_FILTER_CGROUPS = 1024

# One socket as the dump describes it, a plain tuple (20,000 of them are
# built per pass):
# (family, state, timer, sport, dport, src, dst, inode, cgroup id, cookie)
Raw = tuple[int, int, int, int, int, bytes, bytes, int, int, int]


def request(
    family: int | None,
    cgroups: int | Collection[int] | None,
    seq: int,
    states: int = FULL_SOCKETS,
    ext: int = 0,
) -> bytes:
    """A dump request, filtered in the kernel to the sockets of ``cgroups``
    (one id or several) when given: SOCK_DIAG_BY_FAMILY for one family,
    or with ``family`` None the first version's TCPDIAG_GETSOCK (both);
    ``ext``: extensions asked for (bits)."""
    if family is None:
        mtype, body = TCPDIAG_GETSOCK, _REQ_COMPAT.pack(0, 0, 0, ext, states, 0)
    else:
        mtype, body = SOCK_DIAG_BY_FAMILY, _REQ.pack(family, socket.IPPROTO_TCP, ext, 0, states)
    if cgroups is not None:
        ops = cgroup_bytecode([cgroups] if isinstance(cgroups, int) else sorted(cgroups))
        body += _NLATTR.pack(_NLATTR.size + len(ops), INET_DIAG_REQ_BYTECODE) + ops
    hdr = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), mtype, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    return hdr + body


def cgroup_bytecode(ids: list[int]) -> bytes:
    """Sockets of any of these cgroups, as ``ss`` compiles "cgroup A or
    cgroup B ...": each condition, when true, goes on to a jump to the end
    (a condition's own jump, a u8, would not reach past 21 of them); when
    false, to the next condition, or from the last one past the end.  The
    kernel checks that every jump lands on an op met by following the
    true branches from the first (inet_diag_bc_audit)."""
    if not 0 < len(ids) <= MAX_FILTER_CGROUPS:
        raise ValueError(f"a dump filters by 1..{MAX_FILTER_CGROUPS} cgroups, not {len(ids)}")
    cond, jmp = _BC_CGROUP.size, _BC_OP.size
    total = len(ids) * cond + (len(ids) - 1) * jmp
    out, at = [], 0
    for i, cg in enumerate(ids):
        last = i == len(ids) - 1
        out.append(_BC_CGROUP.pack(INET_DIAG_BC_CGROUP_COND, cond, cond + jmp, cg))
        at += cond
        if not last:
            out.append(_BC_OP.pack(INET_DIAG_BC_JMP, jmp, total - at))  # to the end: accepted
            at += jmp
    return b"".join(out)


# inet_diag_msg as one struct: family, state, timer, retrans, sport, dport
# (network order: read apart), src, dst, if, cookie, expires, rqueue,
# wqueue, uid, inode.
_MSG = struct.Struct("=BBBB4x16s16sIQIIIII")
_MSG_PORTS = _NLMSGHDR.size + 4
_CGROUP_ATTR = struct.Struct("=HHQ")  # INET_DIAG_CGROUP_ID: header and value
# Where the cgroup attribute sits, by message length: the kernel sends the
# same attributes in the same order for every socket of a kind, so it is
# looked for once per length and then only checked (a walk of the
# attributes per socket was a third of the decoding).
_CGROUP_AT: dict[int, int] = {}


def _cgroup_of(buf: memoryview, off: int, mlen: int) -> int:
    """The INET_DIAG_CGROUP_ID of the message at ``off`` (0 if none)."""
    at = _CGROUP_AT.get(mlen)
    if at is not None:
        alen, atype, value = _CGROUP_ATTR.unpack_from(buf, off + at)
        if alen == _CGROUP_ATTR.size and atype & NLA_TYPE_MASK == INET_DIAG_CGROUP_ID:
            return value
    a, end = off + _NLMSGHDR.size + _MSG.size, off + mlen
    while a + _NLATTR.size <= end:
        alen, atype = _NLATTR.unpack_from(buf, a)
        if alen < _NLATTR.size:
            break
        if atype & NLA_TYPE_MASK == INET_DIAG_CGROUP_ID and alen >= 12:
            if alen == _CGROUP_ATTR.size and a + alen <= end:
                _CGROUP_AT[mlen] = a - off
            return _U64.unpack_from(buf, a + _NLATTR.size)[0]
        a += (alen + 3) & ~3
    return 0


# struct tcp_info: the times since the last data sent, data received and
# ACK received (ms), after its eight u8 and nine u32 fields.
_TCP_INFO_TIMES = struct.Struct("=44xI4xII")


def _times_of(buf: memoryview, off: int, mlen: int, expires: int) -> Times | None:
    """The message's Times from its INET_DIAG_INFO (None without one)."""
    a, end = off + _NLMSGHDR.size + _MSG.size, off + mlen
    while a + _NLATTR.size <= end:
        alen, atype = _NLATTR.unpack_from(buf, a)
        if alen < _NLATTR.size:
            break
        if (
            atype & NLA_TYPE_MASK == INET_DIAG_INFO
            and alen >= _NLATTR.size + _TCP_INFO_TIMES.size
            and a + alen <= end
        ):
            return (*_TCP_INFO_TIMES.unpack_from(buf, a + _NLATTR.size), expires)
        a += (alen + 3) & ~3
    return None


def parse(buf: memoryview, n: int, seq: int, out: list[Raw], times: list | None = None) -> bool:
    """Decode one datagram of the dump into ``out``; True at NLMSG_DONE.
    ``times``: also (last data sent, last data received, last ACK received
    -- ms ago, from INET_DIAG_INFO --, the timer's expiry in ms) per
    socket (None without tcp_info)."""
    off = 0
    head, msg, ports, append = (
        _NLMSGHDR.unpack_from,
        _MSG.unpack_from,
        _PORTS.unpack_from,
        out.append,
    )
    while off + _NLMSGHDR.size <= n:
        mlen, mtype, _flags, mseq, _pid = head(buf, off)
        if mlen < _NLMSGHDR.size or off + mlen > n:
            raise OSError(errno.EBADMSG, "truncated inet_diag message")
        body = off + _NLMSGHDR.size
        if mseq != seq:
            pass  # not ours (cannot happen on a private socket); skip
        elif mtype in (SOCK_DIAG_BY_FAMILY, TCPDIAG_GETSOCK):
            if mlen < _NLMSGHDR.size + _MSG.size:
                raise OSError(errno.EBADMSG, "truncated inet_diag message")
            fam, state, timer, _retrans, src, dst, _if, cookie, exp, _rq, _wq, _uid, ino = msg(
                buf, body
            )
            sport, dport = ports(buf, off + _MSG_PORTS)
            append(
                (fam, state, timer, sport, dport, src, dst, ino, _cgroup_of(buf, off, mlen), cookie)
            )
            if times is not None:
                times.append(_times_of(buf, off, mlen, exp))
        elif mtype == NLMSG_DONE:
            # The payload is the dump's final status (negative errno).
            if mlen >= _NLMSGHDR.size + _I32.size:
                (err,) = _I32.unpack_from(buf, body)
                if err < 0:
                    raise OSError(-err, os.strerror(-err))
            return True
        elif mtype == NLMSG_ERROR:
            (err,) = _I32.unpack_from(buf, body)
            if err:
                raise OSError(-err, os.strerror(-err))
            return True
        off += (mlen + 3) & ~3
    return False


_BUFFERS = threading.local()  # one receive buffer per thread, kept


def _dump_family(
    family: int | None, cgroups: Collection[int] | None, states: int, times: list | None = None
) -> list[Raw]:
    out: list[Raw] = []
    seq = 1
    ext = 1 << (INET_DIAG_INFO - 1) if times is not None else 0
    buf = getattr(_BUFFERS, "buf", None)
    if buf is None:
        buf = _BUFFERS.buf = bytearray(1 << 18)
    view = memoryview(buf)
    with socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG
    ) as s:
        s.bind((0, 0))
        s.sendall(request(family, cgroups, seq, states, ext))
        while True:
            n = s.recv_into(buf)
            if n == 0 or parse(view, n, seq, out, times):
                return out


# inet_diag missing (module not loaded) or refusing the request.
_UNAVAILABLE = (errno.ENOENT, errno.EINVAL, errno.EPROTONOSUPPORT)
_COMPAT = {"works": True}  # TCPDIAG_GETSOCK answered (until a kernel refuses it)


def dump(
    states: int = FULL_SOCKETS,
    cgroup_id: int | Collection[int] | None = None,
    times: list | None = None,
) -> list[Raw]:
    """Every TCP socket (IPv4 and IPv6) of the calling thread's network
    namespace in one of ``states``, or only those of one cgroup or of a few
    (not their descendants: filtered in the kernel, or here before Linux
    5.7; at most MAX_FILTER_CGROUPS).  ``times``: filled with each socket's
    Times (None without tcp_info), in the same order.

    Raises EnvironmentProblem when the kernel has no inet_diag to ask;
    other OSErrors (the namespace went away, ...) as they are."""
    cgroups = (
        None
        if cgroup_id is None
        else ({cgroup_id} if isinstance(cgroup_id, int) else set(cgroup_id))
    )
    if _COMPAT["works"]:
        try:
            got: list | None = None if times is None else []
            raws = _dump_families((None,), cgroups, states, got)
            if times is not None and got is not None:
                times += got
            return raws
        except EnvironmentProblem:
            _COMPAT["works"] = False  # then one family after the other
    return _dump_families((socket.AF_INET, socket.AF_INET6), cgroups, states, times)


def _dump_families(
    families: tuple[int | None, ...],
    cgroups: set[int] | None,
    states: int,
    times: list | None = None,
) -> list[Raw]:
    out: list[Raw] = []
    try:
        for family in families:
            try:
                got: list | None = None if times is None else []
                out += _dump_family(family, cgroups, states, got)
            except OSError as e:
                if cgroups is None or e.errno != errno.EINVAL:
                    raise
                # Before 5.7: no cgroup condition in the bytecode; filter here.
                got = None if times is None else []
                raws = _dump_family(family, None, states, got)
                keep = [i for i, r in enumerate(raws) if r[8] in cgroups]
                out += [raws[i] for i in keep]
                if got is not None:
                    got = [got[i] for i in keep]
            if times is not None and got is not None:
                times += got
    except OSError as e:
        if e.errno not in _UNAVAILABLE:
            raise
        raise EnvironmentProblem(
            f"cannot read TCP sockets through inet_diag ({e.strerror or e}): load the "
            "modules (modprobe inet_diag tcp_diag)"
        ) from None
    return out


def address(family: int, raw: bytes, port: int) -> str:
    """``127.0.0.1:5432``, ``[::1]:5432``; port 0 as ``*`` (ss's way)."""
    if family == socket.AF_INET:
        return f"{socket.inet_ntop(socket.AF_INET, raw[:4])}:{port or '*'}"
    return f"[{socket.inet_ntop(socket.AF_INET6, raw)}]:{port or '*'}"


_V4_MAPPED = bytes(10) + b"\xff\xff"


def mapped(family: int, raw: bytes) -> bytes:
    """An address as the 16 bytes of IPv6 (IPv4 as ::ffff:a.b.c.d)."""
    return _V4_MAPPED + raw[:4] if family == socket.AF_INET else raw[:16]


# (ms since data was last sent, since data was last received, since an
# ACK was last received -- from tcp_info --; ms until the socket's timer fires)
Times = tuple[int, int, int, int]


def dump_times(states: int, cgroup_id: int | None = None) -> list[tuple[Raw, Times | None]]:
    """dump(), each socket with its Times (None where the kernel gave no
    tcp_info)."""
    times: list[Times | None] = []
    raws = dump(states, cgroup_id, times)
    return list(zip(raws, times, strict=True))
