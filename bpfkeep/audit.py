"""``bpfkeep audit``: which TCP sockets really have keepalive, read from the kernel.

The kernel's inet_diag (``ss``'s source) describes every TCP socket of the
current network namespace, with the cgroup that owns it
(``INET_DIAG_CGROUP_ID``, kernel >= 5.7) and the timer it has pending.
For a socket past the handshake the only user of ``sk_timer`` is the
keepalive timer, and an established socket with SO_KEEPALIVE always has it
armed (it re-arms itself after every run), so ``idiag_timer == 2`` is
"keepalive on" and 0 is "off".  It is a view from outside, and needs no
privileges.  With privileges, :func:`policy_check` reads the values in
force on every socket under a policy (a read-only pass of the sweep
program) and compares them with the policy.

Two cases where the kernel cannot tell us:

- listeners never run a keepalive timer (``tcp_set_keepalive`` skips
  LISTEN); what they pass on to accepted sockets shows on those sockets.
  Listeners are listed apart and left out of coverage.
- inet_diag reports one timer per socket, and a pending retransmit (1) or
  zero-window probe (4) timer hides the keepalive timer.  Such sockets are
  busy sending, their keepalive state is *unknown*: ``keepalive`` is False
  but ``keepalive_known`` is False too, and coverage leaves them out of
  both counts rather than calling every bulk transfer uncovered.

The netlink dump is spoken directly (``socket`` + ``struct``): decoding
10 000 sockets with pyroute2's generic message classes takes ~0.7 s, too
slow for a scrape every 15 s; this takes a few milliseconds and keeps the
daemon that imports this module small.  The tests check the decoding
against pyroute2's ``DiagSocket`` and ``ss``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import socket
import struct
import sys
from collections.abc import Iterable, Iterator

from bpfkeep.errors import EnvironmentProblem

# include/uapi/linux/netlink.h, sock_diag.h, inet_diag.h
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x01
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_TYPE_MASK = 0x3FFF
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_CGROUP_COND = 17  # kernel >= 5.7
INET_DIAG_CGROUP_ID = 21  # kernel >= 5.7, sent for every full socket

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NLATTR = struct.Struct("=HH")  # len, type
# inet_diag_req_v2: family, protocol, ext, pad, states, inet_diag_sockid (all 0)
_REQ = struct.Struct("=BBBBI48x")
# inet_diag_msg: family, state, timer, retrans, sport, dport (big endian),
# src, dst, if, cookie, expires, rqueue, wqueue, uid, inode
_MSG = struct.Struct("=BBBB2s2s16s16sIQIIIII")
_PORTS = struct.Struct(">HH")
_U64 = struct.Struct("=Q")
_I32 = struct.Struct("=i")
# inet_diag_bc_op {u8 code; u8 yes; u16 no} + u64 cgroup id.  yes: next op
# (the end: accept); no: 4 bytes past the end (reject), as ss does it.
_BC_CGROUP = struct.Struct("=BBHQ")

# include/net/tcp_states.h
STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
}
ESTABLISHED, FIN_WAIT2, LISTEN = "ESTABLISHED", "FIN_WAIT2", "LISTEN"
# Full sockets only: TIME_WAIT and request sockets (SYN_RECV, NEW_SYN_RECV)
# have no owner, no cgroup and no options of their own.
_STATE_MASK = sum(
    1 << s for s, name in STATES.items() if name not in ("TIME_WAIT", "SYN_RECV", "NEW_SYN_RECV")
)

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


@dataclasses.dataclass(frozen=True)
class SocketRecord:
    """One TCP socket as the kernel describes it."""

    family: str  # "ipv4" or "ipv6"
    state: str  # kernel name: ESTABLISHED, LISTEN, CLOSE_WAIT, ...
    local: str  # "127.0.0.1:5432", "[::1]:5432"
    remote: str  # "0.0.0.0:*" for listeners, as ss prints it
    inode: int  # 0: no file (not yet accepted, or closed by its program)
    cgroup_id: int  # 0: unknown (kernel < 5.7, or no cgroup data)
    timer: int  # idiag_timer: 0 none, 1 retransmit, 2 keepalive, 4 zero-window probe
    keepalive: bool  # keepalive timer seen armed
    pid: int | None  # a process holding the socket (lowest pid), if found
    comm: str | None

    @property
    def keepalive_known(self) -> bool:
        """Whether ``keepalive`` is a fact: not for listeners (no timer ever)
        nor while a retransmit or zero-window probe timer hides it."""
        return self.state != LISTEN and self.timer not in (TIMER_RETRANSMIT, TIMER_PROBE0)

    @property
    def timer_name(self) -> str:
        return TIMER_NAMES.get(self.timer, str(self.timer))

    def as_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["timer_name"] = self.timer_name
        d["keepalive_known"] = self.keepalive_known
        return d


# -- inet_diag ------------------------------------------------------------


def _request(family: int, cgroup_id: int | None, seq: int, states: int = _STATE_MASK) -> bytes:
    body = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, states)
    if cgroup_id is not None:
        op = _BC_CGROUP.pack(
            INET_DIAG_BC_CGROUP_COND, _BC_CGROUP.size, _BC_CGROUP.size + 4, cgroup_id
        )
        body += _NLATTR.pack(_NLATTR.size + len(op), INET_DIAG_REQ_BYTECODE) + op
    hdr = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
    )
    return hdr + body


# (family, state, timer, sport, dport, src, dst, inode, cgroup id, cookie)
_Raw = tuple[int, int, int, int, int, bytes, bytes, int, int, int]


def _parse(buf: memoryview, n: int, seq: int, out: list[_Raw]) -> bool:
    """Decode one datagram of the dump into ``out``; True at NLMSG_DONE."""
    off = 0
    while off + _NLMSGHDR.size <= n:
        mlen, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(buf, off)
        if mlen < _NLMSGHDR.size or off + mlen > n:
            raise OSError(errno.EBADMSG, "truncated inet_diag message")
        body = off + _NLMSGHDR.size
        if mseq != seq:
            pass  # not ours (cannot happen on a private socket); skip
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
        elif mtype == SOCK_DIAG_BY_FAMILY:
            (
                fam,
                state,
                timer,
                _retrans,
                sp,
                dp,
                src,
                dst,
                _if,
                cookie,
                _exp,
                _rq,
                _wq,
                _uid,
                ino,
            ) = _MSG.unpack_from(buf, body)
            cgroup_id = 0
            a, end = body + _MSG.size, off + mlen
            while a + _NLATTR.size <= end:
                alen, atype = _NLATTR.unpack_from(buf, a)
                if alen < _NLATTR.size:
                    break
                if atype & NLA_TYPE_MASK == INET_DIAG_CGROUP_ID and alen >= 12:
                    (cgroup_id,) = _U64.unpack_from(buf, a + _NLATTR.size)
                    break
                a += (alen + 3) & ~3
            sport, dport = _PORTS.unpack(sp + dp)
            out.append((fam, state, timer, sport, dport, src, dst, ino, cgroup_id, cookie))
        off += (mlen + 3) & ~3
    return False


def _dump(family: int, cgroup_id: int | None, states: int = _STATE_MASK) -> list[_Raw]:
    out: list[_Raw] = []
    seq = 1
    with socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG
    ) as s:
        s.bind((0, 0))
        s.sendall(_request(family, cgroup_id, seq, states))
        buf = bytearray(1 << 18)
        view = memoryview(buf)
        while True:
            n = s.recv_into(buf)
            if n == 0 or _parse(view, n, seq, out):
                return out


def _dump_family(family: int, cgroup_id: int | None) -> list[_Raw]:
    """One family's sockets, filtered by cgroup in the kernel when it can."""
    try:
        return _dump(family, cgroup_id)
    except OSError as e:
        if cgroup_id is None or e.errno != errno.EINVAL:
            raise
    # Kernel < 5.7: no cgroup condition in the bytecode; filter here.
    return [r for r in _dump(family, None) if r[8] == cgroup_id]


def _address(family: int, raw: bytes, port: int) -> str:
    if family == socket.AF_INET:
        return f"{socket.inet_ntop(socket.AF_INET, raw[:4])}:{port or '*'}"
    return f"[{socket.inet_ntop(socket.AF_INET6, raw)}]:{port or '*'}"


# -- owners ---------------------------------------------------------------


def owners(inodes: Iterable[int], proc: str = "/proc") -> dict[int, tuple[int, str]]:
    """socket inode -> (pid, comm) of the lowest-numbered process holding it.

    Reads ``/proc/PID/fd``; processes that vanish or that we may not look
    into are skipped (their sockets stay without owner).  Stops as soon as
    every inode is found.
    """
    targets = {f"socket:[{i}]": i for i in inodes if i}
    found: dict[int, int] = {}
    if not targets:
        return {}
    try:
        pids = sorted(int(p) for p in os.listdir(proc) if p.isdigit())
    except OSError:
        return {}
    for pid in pids:
        try:
            dfd = os.open(f"{proc}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            for fd in os.listdir(dfd):
                try:
                    ino = targets.get(os.readlink(fd, dir_fd=dfd))
                except OSError:
                    continue
                if ino is not None and ino not in found:
                    found[ino] = pid
        except OSError:
            pass
        finally:
            os.close(dfd)
        if len(found) == len(targets):
            break
    comms: dict[int, str] = {}
    for pid in set(found.values()):
        try:
            with open(f"{proc}/{pid}/comm") as f:
                comms[pid] = f.read().rstrip("\n")
        except OSError:
            comms[pid] = "?"
    return {ino: (pid, comms[pid]) for ino, pid in found.items()}


# -- the audit -------------------------------------------------------------


def scan(cgroup_id: int | None = None, *, with_owners: bool = True) -> list[SocketRecord]:
    """Every full TCP socket (IPv4 and IPv6) of the current network
    namespace, or only those of one cgroup (not its descendants).

    TIME_WAIT and half-open request sockets are left out (no owner, no
    cgroup).  ``with_owners=False`` skips the walk of /proc (the costly
    part on hosts with many processes) for callers that need only counts.
    """
    raws: list[_Raw] = []
    try:
        for family in (socket.AF_INET, socket.AF_INET6):
            raws += _dump_family(family, cgroup_id)
    except OSError as e:
        raise EnvironmentProblem(
            f"cannot read TCP sockets through inet_diag ({e.strerror or e}): "
            "load the modules (modprobe inet_diag tcp_diag)"
        ) from None
    own = owners({r[7] for r in raws}) if with_owners else {}
    records = []
    for fam, st, timer, sport, dport, src, dst, ino, cg, _cookie in raws:
        state = STATES.get(st, str(st))
        # An orphaned FIN_WAIT2 socket (closed by its program, no inode)
        # runs its FIN_WAIT2 timeout on sk_timer: that is not keepalive.
        keepalive = (
            timer == TIMER_KEEPALIVE and state != LISTEN and not (state == FIN_WAIT2 and ino == 0)
        )
        pid, comm = own.get(ino, (None, None))
        records.append(
            SocketRecord(
                family=FAMILIES.get(fam, str(fam)),
                state=state,
                local=_address(fam, src, sport),
                remote=_address(fam, dst, dport),
                inode=ino,
                cgroup_id=cg,
                timer=timer,
                keepalive=keepalive,
                pid=pid,
                comm=comm,
            )
        )
    return records


def coverage(records: Iterable[SocketRecord]) -> dict[int, tuple[int, int]]:
    """cgroup id -> (established sockets with keepalive armed, established
    sockets whose keepalive state is visible).

    Every cgroup with an established socket has an entry; sockets hidden
    behind a retransmit or zero-window probe timer count in neither number
    (see :func:`unknown`), so a cgroup whose sockets are all busy has (0, 0).
    """
    cov: dict[int, list[int]] = {}
    for r in records:
        if r.state != ESTABLISHED:
            continue
        c = cov.setdefault(r.cgroup_id, [0, 0])
        if r.keepalive_known:
            c[0] += r.keepalive
            c[1] += 1
    return {k: (v[0], v[1]) for k, v in cov.items()}


def established_coverage() -> dict[int, tuple[int, int]]:
    """``coverage(scan(with_owners=False))``, for the daemon's periodic
    audit: the kernel sends only ESTABLISHED sockets and they are counted
    straight from the dump, without building records (half the cost on a
    host with 20,000 sockets)."""
    cov: dict[int, list[int]] = {}
    try:
        raws = [
            r
            for family in (socket.AF_INET, socket.AF_INET6)
            for r in _dump(family, None, 1 << 1)  # TCP_ESTABLISHED
        ]
    except OSError as e:
        raise EnvironmentProblem(f"cannot read TCP sockets through inet_diag: {e}") from None
    for _fam, _st, timer, _sp, _dp, _src, _dst, _ino, cg, _cookie in raws:
        c = cov.setdefault(cg, [0, 0])
        if timer not in (TIMER_RETRANSMIT, TIMER_PROBE0):
            c[0] += timer == TIMER_KEEPALIVE
            c[1] += 1
    return {k: (v[0], v[1]) for k, v in cov.items()}


def unknown(records: Iterable[SocketRecord]) -> dict[int, int]:
    """cgroup id -> established sockets whose keepalive state is hidden."""
    out: dict[int, int] = {}
    for r in records:
        if r.state == ESTABLISHED and not r.keepalive_known:
            out[r.cgroup_id] = out.get(r.cgroup_id, 0) + 1
    return out


# -- the policy check (privileged) -----------------------------------------------

# What the check compares: the options that decide when a dead peer is
# noticed.  (getsockopt(TCP_MAXSEG) reports the MSS in use, not the value
# asked for, so it cannot be compared.)
CHECKED = ("keepalive", "keepidle", "keepintvl", "keepcnt", "user_timeout")
OK, OWN, OFF = "at-policy", "program's own (set mode)", "off-policy"


@dataclasses.dataclass(frozen=True)
class PolicyCheck:
    """One socket under a policy, with the values in force on it."""

    netns: str
    state: str
    local: str
    remote: str
    cgroup_id: int
    policy_cgroup: str  # the policy that covers it
    mode: str
    values: dict[str, int]  # read from the kernel (bpf_getsockopt); -1: unknown
    verdict: str  # OK, OWN or OFF
    reason: str

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def verdict(policy, flags: int, entry) -> tuple[str, str]:
    """Whether the values in force match the policy, and why not."""
    from bpfkeep import bpfmaps
    from bpfkeep.options import default_user_timeout

    vals = entry.values()
    index = {o.key: i for i, o in enumerate(bpfmaps.BPF_OPTIONS)}
    app = {k for k in CHECKED if entry.rec_app >> index[k] & 1}
    want = {k: policy.value(k) for k in CHECKED if policy.value(k)}
    if flags & bpfmaps.F_UT_DERIVED and app & {"keepidle", "keepintvl", "keepcnt"}:
        # The user timeout follows the times in force (set by the program).
        want["user_timeout"] = default_user_timeout(
            vals["keepidle"], vals["keepintvl"], vals["keepcnt"]
        )
    if policy.mode == "enforce":
        bad = [
            k
            for k, cap in want.items()
            if (vals[k] != 1 if k == "keepalive" else not 0 < vals[k] <= cap)
        ]
        if not bad:
            return OK, ""
        return OFF, "above the policy's bound: " + ", ".join(f"{k}={vals[k]}" for k in bad)
    differ = [k for k, v in want.items() if vals[k] != v]
    if not differ:
        return OK, ""
    if set(differ) <= app:
        return OWN, "set by the program: " + ", ".join(f"{k}={vals[k]}" for k in differ)
    if entry.rec_owner == 0:
        return OFF, (
            "never reached by bpfkeep: made before the policy and not swept "
            "(attached with --no-existing, or a kernel without the sweep)"
        )
    return OFF, "differs: " + ", ".join(f"{k}={vals[k]} (policy {want[k]})" for k in differ)


def policy_check(pin_dir: str | None) -> tuple[list[PolicyCheck], dict[str, str]]:
    """Every TCP socket under a bpfkeep policy, in every network namespace
    its cgroup's processes live in, with the values in force read from the
    kernel by a read-only pass of the sweep program.  Returns the checks
    and the namespaces that could not be entered (with the reason).

    Raises BpfkeepError without privileges or on a kernel without the sweep."""
    from bpfkeep import bpfmaps, sweep
    from bpfkeep.enforcer import Enforcer, require_privileges

    require_privileges()
    enf = Enforcer(pin_dir)
    atts = {a.cgroup_id: a for a in enf.attachments() if a.cgroup and a.policy}
    if not atts:
        return [], {}
    with enf.sweeper() as sw:
        sc = sweep.scope([a.cgroup for a in atts.values()], set(atts))
        report = sweep.sweep(sw, sc, sweep.read_entry)
    out = []
    for o in report.outcomes:
        att = atts.get(o.target.owner)
        if att is None or not o.entry.result & bpfmaps.SWR_SEEN:
            continue
        v, why = verdict(att.policy, bpfmaps.policy_flags(att.policy), o.entry)
        out.append(
            PolicyCheck(
                netns=o.netns,
                state=STATES.get(o.target.state, str(o.target.state)),
                local=o.target.local,
                remote=o.target.remote,
                cgroup_id=o.target.cgroup_id,
                policy_cgroup=att.cgroup.display,  # type: ignore[union-attr]
                mode=att.policy.mode,  # type: ignore[union-attr]
                values={k: o.entry.values()[k] for k in CHECKED},
                verdict=v,
                reason=why,
            )
        )
    return out, report.unreachable


# -- command line ----------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="which TCP sockets have keepalive armed, per cgroup (read from the kernel)",
        description="List the TCP sockets of this network namespace with their "
        "cgroup, owner and keepalive timer, and per cgroup how many established "
        "sockets have keepalive armed.  With privileges, also check every socket "
        "under a bpfkeep policy (in every network namespace of its processes): the "
        "values in force, read from the kernel, against the policy, with the "
        "reason for each socket that differs.",
    )
    p.add_argument(
        "--cgroup",
        metavar="PATH",
        help="only this cgroup's sockets (not its descendants'); cgroup v2 path, "
        "absolute or relative to the cgroup2 mount",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _cgroup_names(ids: Iterable[int]) -> dict[int, str]:
    from bpfkeep.cgroups import by_ids
    from bpfkeep.errors import BpfkeepError

    ids = {i for i in ids if i}
    try:
        found = by_ids(ids)
    except BpfkeepError:  # no cgroup2 mount: ids are all we have
        found = {}
    names = {0: "(unknown cgroup)"}
    for i in ids:
        names[i] = found[i].display if i in found else f"(removed cgroup {i})"
    return names


def _policy_cgroups(pin_dir: str | None) -> set[int]:
    """Cgroup ids bpfkeep has links pinned for (best effort: needs to read
    the pin directory, nothing more)."""
    from bpfkeep.enforcer import Enforcer

    with contextlib.suppress(OSError):
        return Enforcer(pin_dir).pinned_ids()
    return set()


def _path_or_none(name: str) -> str | None:
    return name if name.startswith("/") else None


def _covering(name: str, policy_names: set[str]) -> str | None:
    """The cgroup whose policy applies to sockets of cgroup ``name``: itself
    or its nearest ancestor with a policy."""
    probe = name
    while True:
        if probe in policy_names:
            return probe
        if probe in ("/", "") or not probe.startswith("/"):
            return None
        probe = probe.rsplit("/", 1)[0] or "/"


def _rows(records: list[SocketRecord], names: dict[int, str]) -> Iterator[list[str]]:
    for r in records:
        if r.state == LISTEN:
            ka = "-"
        elif not r.keepalive_known:
            ka = f"? ({r.timer_name})"
        else:
            ka = "armed" if r.keepalive else "off"
        owner = f"{r.pid}/{r.comm}" if r.pid is not None else "-"
        yield [r.state, r.local, r.remote, ka, owner, names[r.cgroup_id]]


def _table(rows: list[list[str]], header: list[str], out) -> None:
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def coverage_line(name: str, armed: int, total: int, busy: int = 0) -> str:
    """``/system.slice/x.service: 12/14 established sockets with keepalive
    armed (2 uncovered)``"""
    line = f"{name}: {armed}/{total} established sockets with keepalive armed"
    notes = []
    if total - armed:
        notes.append(f"{total - armed} uncovered")
    if busy:
        notes.append(f"{busy} more busy retransmitting: keepalive not visible")
    return line + (f" ({'; '.join(notes)})" if notes else "")


def run(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    cgroup_id = None
    if getattr(args, "cgroup", None):
        from bpfkeep.cgroups import resolve

        # Read-only: the root cgroup is as fine to look at as any other.
        cgroup_id = resolve(args.cgroup, force_root=True).id
    records = scan(cgroup_id)
    records.sort(key=lambda r: (r.cgroup_id, r.state != ESTABLISHED, r.state, r.local, r.remote))
    policy_ids = _policy_cgroups(getattr(args, "pin_dir", None))
    checks, unreachable, why_not = _policy_check_or_reason(getattr(args, "pin_dir", None))
    names = _cgroup_names({r.cgroup_id for r in records} | policy_ids)
    policy_names = {names[i] for i in policy_ids if names[i].startswith("/")}
    cov = coverage(records)
    busy = unknown(records)
    summary = []
    for cg in sorted(cov, key=lambda i: names[i]):
        armed, total = cov[cg]
        summary.append(
            {
                "cgroup_id": cg,
                "cgroup": _path_or_none(names[cg]),
                "policy_from": _covering(names[cg], policy_names),
                "armed": armed,
                "established": total,
                "uncovered": total - armed,
                "unknown": busy.get(cg, 0),
            }
        )
    if args.json:
        socks = []
        for r in records:
            d = r.as_dict()
            d["cgroup"] = _path_or_none(names[r.cgroup_id])
            socks.append(d)
        check = None
        if checks is not None:
            check = {
                "sockets": [c.as_dict() for c in checks],
                "summary": check_summary(checks),
                "unreachable": unreachable,
            }
        json.dump(
            {"sockets": socks, "coverage": summary, "policy_check": check, "why_not": why_not},
            out,
            indent=2,
        )
        out.write("\n")
        return 0

    header = ["STATE", "LOCAL", "REMOTE", "KEEPALIVE", "PID/COMM", "CGROUP"]
    conns = [r for r in records if r.state != LISTEN]
    listeners = [r for r in records if r.state == LISTEN]
    if conns:
        _table(list(_rows(conns, names)), header, out)
    else:
        print("no TCP connections", file=out)
    if listeners:
        print(
            "\nlisteners (no keepalive timer of their own; accepted sockets inherit "
            "the listener's options):",
            file=out,
        )
        _table(list(_rows(listeners, names)), header, out)
    print("\ncoverage (this network namespace):", file=out)
    if not summary:
        print("  no established TCP sockets", file=out)
    for s in summary:
        line = coverage_line(names[s["cgroup_id"]], s["armed"], s["established"], s["unknown"])
        if s["policy_from"]:
            line += f" [policy: {s['policy_from']}]"
        print("  " + line, file=out)
    print_policy_check(checks, unreachable, why_not, out)
    return 0


def _policy_check_or_reason(pin_dir: str | None):
    """(checks, unreachable, None), or (None, None, why the check cannot run)."""
    from bpfkeep.enforcer import has_bpf_privileges
    from bpfkeep.errors import BpfkeepError

    if not has_bpf_privileges():
        return None, None, "run as root to read the values in force on each socket"
    try:
        checks, unreachable = policy_check(pin_dir)
    except BpfkeepError as e:
        return None, None, str(e)
    except OSError as e:  # e.g. only another bpfkeep version's objects pinned
        return None, None, f"cannot read bpfkeep's objects ({e}); run bpfkeep attach or doctor"
    return checks, unreachable, None


def check_summary(checks: list[PolicyCheck]) -> dict[str, dict[str, int]]:
    """policy cgroup -> counts of sockets by verdict."""
    out: dict[str, dict[str, int]] = {}
    for c in checks:
        d = out.setdefault(c.policy_cgroup, {OK: 0, OWN: 0, OFF: 0})
        d[c.verdict] += 1
    return out


def print_policy_check(checks, unreachable, why_not, out) -> None:
    print("\npolicy check (values in force, read from the kernel):", file=out)
    if why_not:
        print(f"  not available: {why_not}", file=out)
        return
    if not checks:
        print("  no TCP socket under a bpfkeep policy", file=out)
    for cg, counts in sorted(check_summary(checks).items()):
        total = sum(counts.values())
        line = f"  {cg}: {counts[OK]}/{total} sockets at the policy"
        extra = []
        if counts[OWN]:
            extra.append(f"{counts[OWN]} with the program's own values (set mode)")
        if counts[OFF]:
            extra.append(f"{counts[OFF]} off-policy")
        print(line + (f" ({'; '.join(extra)})" if extra else ""), file=out)
    odd = [c for c in checks if c.verdict != OK]
    if odd:
        rows = [
            [
                c.state,
                c.local,
                c.remote,
                " ".join(str(c.values[k]) for k in CHECKED),
                c.verdict,
                c.reason,
            ]
            for c in odd
        ]
        print("", file=out)
        header = ["STATE", "LOCAL", "REMOTE", "KA IDLE INTVL CNT UT", "VERDICT", "WHY"]
        _table(rows, header, out)
    for what, why in sorted((unreachable or {}).items()):
        print(f"  {what}: not checked: {why}", file=out)
