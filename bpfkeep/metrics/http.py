"""``/metrics`` and ``/ready`` over HTTP on one thread."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import os
import resource
import selectors
import socket
import threading
import time
import zlib
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST

from bpfkeep.metrics.exposition import exposition_parts


def _gzip(parts: list[bytes]) -> bytes:
    """gzip.compress(b"".join(parts), compresslevel=1), without the join."""
    z = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return b"".join([*(z.compress(p) for p in parts), z.flush()])


@dataclasses.dataclass
class _Conn:
    sock: socket.socket
    last: float  # monotonic time of the last progress (accept, bytes in or out)
    inbuf: bytes = b""
    out: list[memoryview] | None = None  # response left to send: head, body
    close_after: bool = False
    waiting: tuple[bool, bool] | None = None  # for the next scrape: (HEAD, gzip)


class MetricsServer:
    """``/metrics`` over HTTP on one thread with a bounded number of
    connections, so that no client can take the daemon's threads, file
    descriptors or time.

    prometheus_client's own server spends a thread and a descriptor per
    connection with no limit and no timeout: a local user holding idle
    connections open made the daemon run out of descriptors, and then
    attaching a new cgroup failed.  Here:

    - one thread and one epoll loop serve every connection;
    - at most ``max_connections`` are open, and never more than an eighth of
      RLIMIT_NOFILE (read again at each accept, so a lowered limit counts):
      the rest stays free for the reconcile loop.  When full, the
      connection that made no progress for the longest is closed (a real
      scraper sends its request at once; an idle one is what gets dropped);
    - a connection that sends nothing for ``timeout`` seconds, or does not
      take its response, is closed; requests larger than 8 KiB are refused;
    - out of descriptors at accept, the server stops accepting for a moment
      (the kernel's listen backlog holds new connections meanwhile) instead
      of spinning on a listening socket that stays readable;
    - scrapes never take more than half of the time: after a collection
      that took t seconds the next starts t seconds later at the earliest,
      and requests arriving meanwhile share it.  Collecting holds the GIL
      (at 10,000 cgroups a scrape is ~1 s of CPU), so scraping in a loop
      would otherwise slow the reconcile loop down without limit.

    The text is ``exposition`` of the registry (generate_latest's format).

    ``/ready`` answers from ``ready()`` (None: ready, else the reason) with
    200 or 503, at once and without a collection: a readiness probe
    (Kubernetes) must not wait behind scrapes.
    """

    MAX_REQUEST = 8192

    def __init__(
        self,
        registry,
        host: str,
        port: int,
        *,
        max_connections: int = 32,
        timeout: float = 10.0,
        ready: Callable[[], str | None] = lambda: None,
    ):
        self.registry = registry
        self.ready = ready
        self.max_connections = max_connections
        self.timeout = timeout
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, port), family=family, backlog=64)
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()[:2]
        self.conns: dict[int, _Conn] = {}
        self.refused = 0  # connections closed to stay within the limits
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.sock, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # for close()
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._accept_paused_until = 0.0
        self._waiting: list[_Conn] = []  # requests for the next collection
        self._next_collect = 0.0
        self.collections = 0
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread:
            self._thread.join(timeout=5)
        for c in list(self.conns.values()):
            self._drop(c)
        self._sel.close()
        self.sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def limit(self) -> int:
        """Connections allowed now: max_connections, and at most an eighth
        of the descriptor limit."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return self.max_connections
        return max(1, min(self.max_connections, soft // 8))

    # -- the loop --------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stop:
            now = time.monotonic()
            wait = 1.0
            if self.conns:
                oldest = min(c.last for c in self.conns.values())
                wait = min(wait, max(0.0, oldest + self.timeout - now))
            if self._waiting:
                wait = min(wait, max(0.0, self._next_collect - now))
            if self._accept_paused_until:
                if now >= self._accept_paused_until:
                    self._accept_paused_until = 0.0
                    self._sel.register(self.sock, selectors.EVENT_READ, None)
                else:
                    wait = min(wait, self._accept_paused_until - now)
            try:
                events = self._sel.select(wait)
            except OSError:  # EINTR is retried by Python; anything else: go on
                events = []
            for key, mask in events:
                if key.data == "wake":
                    continue
                if key.data is None:
                    self._accept()
                elif self.conns.get(key.fd) is key.data:  # not dropped meanwhile
                    c = key.data
                    try:
                        if mask & selectors.EVENT_READ:
                            self._read(c)
                        if c.sock.fileno() >= 0 and mask & selectors.EVENT_WRITE:
                            self._write(c)
                    except OSError:
                        self._drop(c)
            if self._waiting and time.monotonic() >= self._next_collect:
                self._collect()
            now = time.monotonic()
            for c in [c for c in self.conns.values() if now - c.last > self.timeout]:
                if c.waiting is None:
                    self._drop(c)

    def _accept(self) -> None:
        for _ in range(16):  # then let the others have a turn
            try:
                s, _addr = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: give one back and stop accepting
                    # for a moment; the connection waits in the backlog.
                    if self.conns:
                        self._evict()
                    self._sel.unregister(self.sock)
                    self._accept_paused_until = time.monotonic() + 0.5
                return  # ECONNABORTED and the like: that client is gone
            while len(self.conns) >= self.limit():
                self._evict()
            s.setblocking(False)
            c = _Conn(s, time.monotonic())
            self.conns[s.fileno()] = c
            self._sel.register(s, selectors.EVENT_READ, c)

    def _evict(self) -> None:
        """Close the connection that made no progress for the longest,
        preferring those that have not sent a full request."""
        victim = min(
            self.conns.values(), key=lambda c: (c.out is not None or c.waiting is not None, c.last)
        )
        self.refused += 1
        self._drop(victim)

    def _drop(self, c: _Conn) -> None:
        self.conns.pop(c.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(c.sock)
        c.sock.close()

    def _read(self, c: _Conn) -> None:
        try:
            data = c.sock.recv(65536)
        except BlockingIOError:
            return
        if not data:
            self._drop(c)
            return
        c.last = time.monotonic()
        if c.out is not None or c.waiting is not None:
            return  # pipelined bytes while we answer: ignored
        c.inbuf += data
        end = c.inbuf.find(b"\r\n\r\n")
        if end < 0:
            if len(c.inbuf) > self.MAX_REQUEST:
                c.close_after = True
                self._respond(c, "431 Request Header Fields Too Large", b"request too large\n")
            return
        head, c.inbuf = c.inbuf[:end], b""
        self._handle(c, head)

    def _handle(self, c: _Conn, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        headers = {}
        for ln in lines[1:]:
            name, _, value = ln.partition(":")
            headers[name.strip().lower()] = value.strip()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            c.close_after = True
            self._respond(c, "400 Bad Request", b"bad request\n")
            return
        method, target, version = parts
        conn_hdr = headers.get("connection", "").lower()
        c.close_after = (version == "HTTP/1.0" and conn_hdr != "keep-alive") or conn_hdr == "close"
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            self._respond(c, "405 Method Not Allowed", b"only GET\n", head_only=False)
            return
        if path == "/ready":
            try:
                reason = self.ready()
            except Exception as e:  # never take the server down
                reason = f"readiness check failed: {e}"
            if reason is None:
                self._respond(c, "200 OK", b"ready\n", head_only=method == "HEAD")
            else:
                body = f"not ready: {reason}\n".encode("utf-8", "backslashreplace")
                self._respond(c, "503 Service Unavailable", body, head_only=method == "HEAD")
            return
        if path not in ("/metrics", "/"):
            self._respond(
                c, "404 Not Found", b"see /metrics or /ready\n", head_only=method == "HEAD"
            )
            return
        c.waiting = (method == "HEAD", "gzip" in headers.get("accept-encoding", ""))
        self._waiting.append(c)

    def _collect(self) -> None:
        """One collection for every request waiting for it."""
        t0 = time.monotonic()
        # A collection at 10,000 cgroups allocates ~150,000 objects that
        # all go when it ends, by reference counting (no cycles among
        # them).  Meanwhile the cyclic collector ran ~200 times a scrape,
        # full passes over the daemon's heap among them: 10-20 % of the
        # scrape.  So it waits until the collection is done.
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            body, error = exposition_parts(self.registry), None
        except Exception as e:  # a failing collector: say so, keep serving
            body, error = (
                [],
                f"collecting metrics failed: {e}\n".encode("utf-8", "backslashreplace"),
            )
        finally:
            if gc_was_on:
                gc.enable()
        self.collections += 1
        self._next_collect = time.monotonic() + (time.monotonic() - t0)
        zipped = None
        waiting, self._waiting = self._waiting, []
        for c in waiting:
            if self.conns.get(c.sock.fileno()) is not c:
                continue  # gone meanwhile
            head_only, gzip_ok = c.waiting or (False, False)
            c.waiting = None
            c.last = time.monotonic()
            if error is not None:
                self._respond(c, "500 Internal Server Error", error)
                continue
            extra, out = [], body
            if gzip_ok and sum(map(len, body)) > 1024:
                zipped = zipped or _gzip(body)
                out = [zipped]
                extra.append(("Content-Encoding", "gzip"))
            self._respond(
                c, "200 OK", out, content_type=CONTENT_TYPE_LATEST, extra=extra,
                head_only=head_only,
            )  # fmt: skip

    def _respond(
        self,
        c: _Conn,
        status: str,
        body: bytes | list[bytes],
        *,
        content_type: str = "text/plain; charset=utf-8",
        extra: list[tuple[str, str]] | None = None,
        head_only: bool = False,
    ) -> None:
        parts = [body] if isinstance(body, bytes) else body
        length = sum(map(len, parts))
        hdrs = [("Content-Type", content_type), ("Content-Length", str(length))]
        hdrs += extra or []
        if c.close_after:
            hdrs.append(("Connection", "close"))
        head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs) + "\r\n"
        # Head and body sent as they are (sendmsg): at 10,000 cgroups the
        # body is ~33 MB, not worth a copy to put it in one piece.
        c.out = [memoryview(head.encode("latin-1"))]
        if not head_only:
            c.out += [memoryview(p) for p in parts if p]
        self._sel.modify(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
        self._write(c)

    def _write(self, c: _Conn) -> None:
        if c.out is None:
            return
        try:
            n = c.sock.sendmsg(c.out[:64])  # IOV_MAX is 1024; a scrape has ~20 pieces
        except BlockingIOError:
            return
        c.last = time.monotonic()
        while c.out and n >= len(c.out[0]):
            n -= len(c.out.pop(0))
        if c.out:
            c.out[0] = c.out[0][n:]
            return
        c.out = None
        if c.close_after:
            self._drop(c)
        else:
            self._sel.modify(c.sock, selectors.EVENT_READ, c)
