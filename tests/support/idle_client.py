"""A client that opens connections one after another, each sitting idle
before it speaks again -- the habit of a connection pool behind a NAT.

    python3 idle_client.py SERVER PORT CONNECTIONS IDLE [--others K --at S]

Each connection sends a line and reads the echo, sits idle IDLE seconds,
then sends again: prints "conn I ok" when answered, "conn I lost ERR"
when not (a reset, or no answer within 15 s).  With --others, K more
connections are opened S seconds into the first one's idle time, sit
idle throughout, and speak at the end: "other J ok|lost ERR".  Prints
"done" last.  Uses only the standard library: it runs under the system's
python3 inside a test's network namespace and cgroup.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time


def exchange(s: socket.socket, what: bytes) -> str:
    try:
        s.sendall(what + b"\n")
        got = b""
        while not got.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                return "lost eof"
            got += chunk
        return "ok"
    except OSError as e:
        return f"lost {e.__class__.__name__}:{e.errno}"


def connect(server: str, port: int) -> socket.socket:
    s = socket.create_connection((server, port), timeout=15)
    if exchange(s, b"hello") != "ok":
        raise SystemExit("the first exchange failed")
    return s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("server")
    ap.add_argument("port", type=int)
    ap.add_argument("connections", type=int)
    ap.add_argument("idle", type=float)
    ap.add_argument("--others", type=int, default=0)
    ap.add_argument("--at", type=float, default=0.0)
    a = ap.parse_args()
    others: list[socket.socket] = []

    def open_others() -> None:
        time.sleep(a.at)
        others.extend(connect(a.server, a.port) for _ in range(a.others))
        print(f"others open {len(others)}", flush=True)

    opener = threading.Thread(target=open_others) if a.others else None
    for i in range(a.connections):
        s = connect(a.server, a.port)
        if i == 0 and opener:
            opener.start()
        time.sleep(a.idle)
        print(f"conn {i} {exchange(s, b'again')}", flush=True)
        s.close()
    if opener:
        opener.join()
    for j, s in enumerate(others):
        print(f"other {j} {exchange(s, b'again')}", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    main()
