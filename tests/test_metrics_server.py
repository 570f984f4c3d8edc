"""MetricsServer on its own (no root needed): real sockets on loopback, a
fresh registry; the limits it promises hold against misbehaving clients."""

from __future__ import annotations

import gzip
import socket
import threading
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

from bpfkeep.metrics.collector import Collector, Row, Snapshot
from bpfkeep.metrics.exposition import exposition, exposition_parts
from bpfkeep.metrics.http import MetricsServer
from bpfkeep.options import Policy


@pytest.fixture()
def server():
    made = []

    def make(**kw) -> MetricsServer:
        reg = CollectorRegistry()
        Counter("probe_things", "things", registry=reg).inc(3)
        s = MetricsServer(reg, "127.0.0.1", 0, **kw)
        s.start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def get(srv: MetricsServer, path: str = "/metrics") -> tuple[int, bytes]:
    url = f"http://127.0.0.1:{srv.address[1]}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def raw(srv: MetricsServer, data: bytes) -> bytes:
    """Send data, read until the server closes (or 10 s pass)."""
    with socket.create_connection(("127.0.0.1", srv.address[1]), timeout=10) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_serves_the_registry(server):
    srv = server()
    status, body = get(srv)
    assert status == 200 and b"probe_things_total 3.0" in body
    assert get(srv, "/other")[0] == 404
    head = raw(srv, b"HEAD /metrics HTTP/1.0\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"probe_things" not in head


def test_keep_alive_serves_several_requests_on_one_connection(server):
    srv = server()
    req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", srv.address[1]), timeout=10) as s:
        for _ in range(3):
            s.sendall(req)
            got = b""
            while b"probe_things_total 3.0" not in got:
                chunk = s.recv(65536)
                assert chunk, got
                got += chunk


def test_bad_and_oversized_requests_are_refused(server):
    srv = server()
    assert raw(srv, b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert raw(srv, b"POST /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 405")
    big = b"GET /metrics HTTP/1.0\r\nX: " + b"a" * 20000
    assert raw(srv, big).startswith(b"HTTP/1.1 431")


def test_a_silent_client_is_dropped(server):
    srv = server(timeout=0.2)
    with socket.create_connection(("127.0.0.1", srv.address[1]), timeout=10) as s:
        s.sendall(b"GET /metr")  # and nothing more
        assert s.recv(1) == b""  # closed by the server, not by our timeout


def test_connections_are_capped_and_the_idle_ones_go_first(server):
    srv = server(max_connections=4)
    idle = [socket.create_connection(("127.0.0.1", srv.address[1])) for _ in range(20)]
    try:
        status, body = get(srv)  # still served: an idle connection made room
        assert status == 200 and b"probe_things" in body
        assert len(srv.conns) <= 4
        assert srv.refused >= 16
    finally:
        for s in idle:
            s.close()


def test_concurrent_scrapes_share_a_collection(server):
    """Scrapes take at most half the time: requests that arrive while a
    collection runs (or right after) are answered by one collection."""

    class Slow:
        def collect(self):
            time.sleep(0.3)  # a large host: collecting takes a while
            yield GaugeMetricFamily("probe_slow", "slow", value=1)

    srv = server()
    srv.registry.register(Slow())
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(get(srv)[0])) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [200] * 6
    assert srv.collections < 6
    print(f"6 concurrent scrapes, {srv.collections} collections")


def test_one_collection_in_flight_however_many_scrapers(server):
    """24 scrapers, 3 scrapes each, all at once: never two collections at
    the same time (the collector counts how many run at once), and each
    collection answers every request waiting for it (far fewer
    collections than requests)."""

    class Counting:
        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.running = self.most = self.calls = 0

        def collect(self):
            with self.lock:
                self.running += 1
                self.calls += 1
                self.most = max(self.most, self.running)
            time.sleep(0.2)  # a large host: collecting takes a while
            with self.lock:
                self.running -= 1
            yield GaugeMetricFamily("probe_slow", "slow", value=1)

    srv = server(max_connections=64)
    counting = Counting()
    srv.registry.register(counting)
    scrapers, rounds = 24, 3
    start = threading.Barrier(scrapers)
    statuses: list[int] = []

    def scraper() -> None:
        start.wait()
        for _ in range(rounds):
            statuses.append(get(srv)[0])

    threads = [threading.Thread(target=scraper) for _ in range(scrapers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == [200] * (scrapers * rounds)
    assert counting.most == 1
    assert counting.calls == srv.collections
    # Each scraper's next request waits for its last answer: a request
    # is answered by the collection after the one it arrived during, at
    # worst, so a round takes at most two collections.
    assert srv.collections <= 2 * rounds, srv.collections
    print(f"{scrapers * rounds} scrapes, {srv.collections} collections, at most 1 at a time")


def test_gzip_answers_the_same_text(server):
    """Prometheus asks with Accept-Encoding: gzip; the body is sent in
    pieces, and compressed from the pieces."""
    srv = server()
    rows = [Row(f"/svc{i}", Policy(keepidle=30), None) for i in range(50)]
    srv.registry.register(
        Collector(lambda: Snapshot(rows, [r.cgroup for r in rows]), lambda: (7200, 75, 9))
    )
    assert len(exposition_parts(srv.registry)) > 2
    plain = get(srv)[1]
    assert plain == exposition(srv.registry)
    req = urllib.request.Request(
        f"http://127.0.0.1:{srv.address[1]}/metrics", headers={"Accept-Encoding": "gzip"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(r.read()) == plain
