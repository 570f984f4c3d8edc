"""Workloads for tests/test_preload.py, run by /usr/bin/python3 under the shim.

Each mode prints one JSON line per result on stdout: what the kernel says
about the program's own sockets (getsockopt), so that the test can compare
it with what strace saw the shim ask for.

    probe.py client HOST PORT [--hold]   connect; --hold: wait for stdin EOF
    probe.py server HOST                 listen; print port; accept one
    probe.py others DIR                  UDP and AF_UNIX sockets only
    probe.py errno HOST CLOSED OPEN      refused and non-blocking connects
    probe.py enforce HOST PORT           try to weaken keepalive after connect
    probe.py threads HOST PORT N         N threads connect at once
    probe.py forkexec HOST PORT          fork; the child execs `client`
    probe.py nonblock HOST PORT          non-blocking connect() called again
                                         after the program's own setsockopt
    probe.py relisten HOST               listen(), own setsockopt, listen()
                                         again (what nginx does)
    probe.py tfo HOST PORT sendto|sendmsg  TCP Fast Open: connect by sending
    probe.py peers [--weaken] [--nonblock] HOST PORT...
                                         connect to each in turn (refused is
                                         fine); --weaken: then try to weaken
                                         keepalive, as `enforce`;
                                         --nonblock: without waiting
    probe.py serve HOST N [OPT=VAL]... [--late OPT=VAL...]
                                         set the options on a listener (those
                                         after --late once it listens),
                                         listen, print port, accept N (with
                                         accept4), then report each and the
                                         listener
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import sys
import threading

TCP_OPTS = {
    "keepidle": socket.TCP_KEEPIDLE,
    "keepintvl": socket.TCP_KEEPINTVL,
    "keepcnt": socket.TCP_KEEPCNT,
    "user_timeout": socket.TCP_USER_TIMEOUT,
    "syncnt": socket.TCP_SYNCNT,
    "defer_accept": socket.TCP_DEFER_ACCEPT,
}


def emit(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def opts(s: socket.socket) -> dict[str, int]:
    out = {"keepalive": s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)}
    for name, num in TCP_OPTS.items():
        out[name] = s.getsockopt(socket.IPPROTO_TCP, num)
    return out


def family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def client(host: str, port: str, *rest: str) -> None:
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.connect((host, int(port)))
    emit(pid=os.getpid(), local_port=s.getsockname()[1], **opts(s))
    if "--hold" in rest:
        sys.stdin.read()
    s.close()


def server(host: str) -> None:
    ls = socket.socket(family(host), socket.SOCK_STREAM)
    ls.bind((host, 0))
    ls.listen(4)
    emit(port=ls.getsockname()[1])
    ls.settimeout(10)
    conn, _ = ls.accept()
    emit(listener=opts(ls), accepted=opts(conn))
    conn.close()
    ls.close()


def others(tmpdir: str) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.connect(udp.getsockname())
    udp.send(b"x")
    try:
        udp.listen(1)
    except OSError as e:
        listen_errno = e.errno
    path = os.path.join(tmpdir, "unix.sock")
    us = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    us.bind(path)
    us.listen(1)
    uc = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    uc.connect(path)
    ud = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ud.bind(path + "-dgram")
    ud.connect(path + "-dgram")
    ud.send(b"x")
    # An fd that socket() made as TCP, closed (or replaced by dup2) and
    # reused by a UDP socket the shim did not see created (a raw system
    # call): the shim must not take it for TCP.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    sys_socket = 41  # x86-64 SYS_socket

    def raw_udp() -> int:
        fd = libc.syscall(sys_socket, socket.AF_INET, socket.SOCK_DGRAM, 0)
        assert fd >= 0
        return fd

    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    reused = tcp.fileno()
    tcp.close()
    fd = raw_udp()
    assert fd == reused
    recycled = socket.socket(fileno=fd)
    recycled.connect(udp.getsockname())
    tcp2 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    other = raw_udp()
    os.dup2(other, tcp2.fileno())
    os.close(other)
    replaced = socket.socket(fileno=os.dup(tcp2.fileno()))
    replaced.connect(udp.getsockname())
    # MPTCP: a stream socket with TCP underneath that answers TCP_INFO, but
    # not TCP (SO_PROTOCOL IPPROTO_MPTCP).  -1: the kernel has no MPTCP.
    try:
        mp = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_MPTCP)
    except OSError:
        mptcp_keepalive = -1
    else:
        mp.connect_ex(udp.getsockname())  # refused: nothing listens there
        mp2 = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_MPTCP)
        mp2.bind(("127.0.0.1", 0))
        mp2.listen(1)
        mptcp_keepalive = mp.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) + mp2.getsockopt(
            socket.SOL_SOCKET, socket.SO_KEEPALIVE
        )
    emit(
        mptcp_keepalive=mptcp_keepalive,
        udp_keepalive=udp.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        unix_keepalive=uc.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        udp_listen_errno=listen_errno,
        recycled_keepalive=recycled.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        replaced_keepalive=replaced.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
    )


def errnos(host: str, closed_port: str, open_port: str) -> None:
    s = socket.socket(family(host), socket.SOCK_STREAM)
    refused = s.connect_ex((host, int(closed_port)))
    s.close()
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.setblocking(False)
    nonblocking = s.connect_ex((host, int(open_port)))
    s.close()
    emit(refused=errno.errorcode.get(refused), nonblocking=errno.errorcode.get(nonblocking))


def enforce(host: str, port: str) -> None:
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.connect((host, int(port)))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10000)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 0)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
    udp_keepalive = udp.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    emit(udp_keepalive=udp_keepalive, **opts(s))


def weaken(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10000)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 0)


def peers(*args: str) -> None:
    pairs = [a for a in args if not a.startswith("--")]
    for host, port in zip(pairs[::2], pairs[1::2], strict=True):
        s = socket.socket(family(host), socket.SOCK_STREAM)
        s.setblocking("--nonblock" not in args)
        rc = s.connect_ex((host, int(port)))
        if "--weaken" in args and rc in (0, errno.EINPROGRESS):
            weaken(s)
        state = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        emit(host=host, port=int(port), rc=errno.errorcode.get(rc, rc), state=state, **opts(s))
        s.close()


def set_own(s: socket.socket, items: tuple[str, ...]) -> None:
    for item in items:
        name, value = item.split("=")
        if name == "keepalive":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(value))
        else:
            s.setsockopt(socket.IPPROTO_TCP, TCP_OPTS[name], int(value))


def serve(host: str, n: str, *own: str) -> None:
    early = own[: own.index("--late")] if "--late" in own else own
    ls = socket.socket(family(host), socket.SOCK_STREAM)
    ls.bind((host, 0))
    set_own(ls, early)
    ls.listen(16)
    set_own(ls, own[len(early) + 1 :])
    emit(port=ls.getsockname()[1])
    ls.settimeout(10)
    conns = []
    for _ in range(int(n)):
        conn, addr = ls.accept()
        conns.append(conn)
        emit(peer=addr[0], **opts(conn))
    emit(listener=opts(ls))


def threads(host: str, port: str, n: str) -> None:
    results: list[dict[str, int]] = []
    lock = threading.Lock()
    start = threading.Barrier(int(n))

    def one() -> None:
        start.wait()
        s = socket.socket(family(host), socket.SOCK_STREAM)
        s.connect((host, int(port)))
        got = opts(s)
        s.close()
        with lock:
            results.append(got)

    workers = [threading.Thread(target=one) for _ in range(int(n))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    emit(results=results)


def forkexec(host: str, port: str) -> None:
    pid = os.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, __file__, "client", host, port])
    _, status = os.waitpid(pid, 0)
    emit(parent=os.getpid(), child_status=os.waitstatus_to_exitcode(status))


def own_choices(s: socket.socket) -> None:
    """What a program may choose for itself after its first connect() or
    listen(): keepalive off, a longer idle time."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1800)


def nonblock(host: str, port: str) -> None:
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.setblocking(False)
    addr = (host, int(port))
    first = s.connect_ex(addr)
    own_choices(s)
    again = s.connect_ex(addr)  # EALREADY while connecting, then EISCONN
    select.select([], [s], [], 10)
    last = s.connect_ex(addr)
    emit(
        first=errno.errorcode.get(first, first),
        again=errno.errorcode.get(again, again),
        last=errno.errorcode.get(last, last),
        **opts(s),
    )
    s.close()


def relisten(host: str) -> None:
    ls = socket.socket(family(host), socket.SOCK_STREAM)
    ls.bind((host, 0))
    ls.listen(4)
    own_choices(ls)
    ls.listen(64)
    emit(**opts(ls))
    ls.close()


def tfo(host: str, port: str, how: str) -> None:
    s = socket.socket(family(host), socket.SOCK_STREAM)
    addr = (host, int(port))
    if how == "sendto":
        s.sendto(b"x", socket.MSG_FASTOPEN, addr)
    else:
        s.sendmsg([b"x"], [], socket.MSG_FASTOPEN, addr)
    emit(**opts(s))
    s.close()


MODES = {
    "client": client,
    "server": server,
    "others": others,
    "errno": errnos,
    "enforce": enforce,
    "threads": threads,
    "forkexec": forkexec,
    "nonblock": nonblock,
    "relisten": relisten,
    "tfo": tfo,
    "peers": peers,
    "serve": serve,
}

if __name__ == "__main__":
    MODES[sys.argv[1]](*sys.argv[2:])
