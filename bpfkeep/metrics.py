"""Prometheus metrics: a custom collector that reads the BPF maps at scrape
time (per-CPU counters summed), in the manner of ebpf_exporter."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gzip
import os
import platform
import re
import resource
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector as _CollectorBase
from prometheus_client.utils import floatToGoString

from bpfkeep import __version__
from bpfkeep.bpfmaps import Counters
from bpfkeep.options import Policy, dead_peer_bound, host_keepalive


@dataclasses.dataclass
class Row:
    """One attached cgroup as the collector sees it."""

    cgroup: str  # label value: "/system.slice/nginx.service"
    policy: Policy | None
    counters: Counters | None


@dataclasses.dataclass
class Snapshot:
    rows: list[Row]
    expected: list[str]  # cgroups the config says should have a policy
    reconcile_errors: int = 0
    reconciles: int = 0
    coverage: dict[str, tuple[int, int]] | None = None  # cgroup -> (armed, established)
    audit_errors: int = 0
    unmanaged: list[str] = dataclasses.field(default_factory=list)  # attached by hand
    # Containers: cgroup -> {"namespace", "pod", "container"} where the
    # runtime told; "container" adds them to every per-cgroup series,
    # "namespace" sums Kubernetes containers' series per namespace, "none"
    # leaves them out (see with_workload_labels).
    workloads: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    workload_labels: str = "container"
    # The last sweep and audit pass's CPU time (None: no pass yet), and the
    # wait before the next pass it leads to (None: no pass yet, audits off).
    audit_cpu_seconds: float | None = None
    audit_every_seconds: float | None = None


class Collector(_CollectorBase):
    """Yields bpfkeep's metric families from a snapshot source."""

    def __init__(
        self,
        source: Callable[[], Snapshot],
        keepalive_sysctls: Callable[[], tuple[int, int, int]] = host_keepalive,
    ):
        self._source = source
        # What a policy's keepalive time left at 0 is: the host's sysctl,
        # read at scrape time.
        self._sysctls = keepalive_sysctls

    def describe(self) -> Iterator:
        # Lets the registry learn the names without reading the maps.
        yield from self._families(Snapshot([], []))

    def collect(self) -> Iterator:
        snap = self._source()
        for family in self._families(snap):
            yield with_workload_labels(family, snap.workloads, snap.workload_labels)

    def _families(self, snap: Snapshot) -> Iterator:
        info = InfoMetricFamily("bpfkeep_build", "bpfkeep version and running kernel")
        info.add_metric([], {"version": __version__, "kernel": platform.release()})
        yield info

        attached = GaugeMetricFamily(
            "bpfkeep_policy_attached",
            "1 for each cgroup with a bpfkeep policy attached in the kernel",
            labels=["cgroup", "mode"],
        )
        expected = GaugeMetricFamily(
            "bpfkeep_policy_expected",
            "1 for each existing cgroup that the daemon's config gives a policy",
            labels=["cgroup"],
        )
        bound = GaugeMetricFamily(
            "bpfkeep_policy_dead_peer_bound_seconds",
            "keepidle + keepintvl * keepcnt of the attached policy "
            "(a time left at 0: the host's net.ipv4.tcp_keepalive_* sysctl)",
            labels=["cgroup"],
        )
        host = self._sysctls() if any(r.policy for r in snap.rows) else (0, 0, 0)
        sockets = CounterMetricFamily(
            "bpfkeep_sockets",
            "TCP sockets the policy was applied to, by socket callback",
            labels=["cgroup", "callback"],
        )
        inherited = CounterMetricFamily(
            "bpfkeep_sockets_inherited",
            "Accepted sockets that inherited keepalive from their listener",
            labels=["cgroup"],
        )
        applied = CounterMetricFamily(
            "bpfkeep_options_applied",
            "Socket options set successfully",
            labels=["cgroup", "option"],
        )
        failed = CounterMetricFamily(
            "bpfkeep_option_failures",
            "Socket options the kernel refused, by errno",
            labels=["cgroup", "option", "errno"],
        )
        rewritten = CounterMetricFamily(
            "bpfkeep_setsockopt_rewritten",
            "Application setsockopt calls rewritten in enforce mode",
            labels=["cgroup", "option"],
        )
        sweep_kept = CounterMetricFamily(
            "bpfkeep_sweep_kept_program_values",
            "Existing sockets the sweep left with their program's own keepalive (set mode)",
            labels=["cgroup"],
        )
        sweep_applied = CounterMetricFamily(
            "bpfkeep_sweep_options_applied",
            "Socket options the sweep set on sockets that already existed",
            labels=["cgroup", "option"],
        )
        sweep_failed = CounterMetricFamily(
            "bpfkeep_sweep_option_failures",
            "Socket options the kernel refused to the sweep, by errno",
            labels=["cgroup", "option", "errno"],
        )
        for row in snap.rows:
            mode = row.policy.mode if row.policy else "unknown"
            attached.add_metric([row.cgroup, mode], 1)
            if row.policy:
                bound.add_metric([row.cgroup], dead_peer_bound(row.policy, host))
            c = row.counters
            if c is None:
                continue
            for cb, n in c.seen.items():
                sockets.add_metric([row.cgroup, cb], n)
            inherited.add_metric([row.cgroup], c.inherited)
            for opt, n in c.applied.items():
                applied.add_metric([row.cgroup, opt], n)
            for (opt, err), n in c.failed.items():
                failed.add_metric([row.cgroup, opt, err], n)
            for opt, n in c.rewritten.items():
                rewritten.add_metric([row.cgroup, opt], n)
            if c.sweep is not None:
                # The sweep counts as one more "callback": sockets that
                # existed before the policy (or its last update).
                sockets.add_metric([row.cgroup, "sweep"], c.sweep.swept)
                sweep_kept.add_metric([row.cgroup], c.sweep.app_own)
                for opt, n in c.sweep.applied.items():
                    sweep_applied.add_metric([row.cgroup, opt], n)
                for (opt, err), n in c.sweep.failed.items():
                    sweep_failed.add_metric([row.cgroup, opt, err], n)
        for cg in snap.expected:
            expected.add_metric([cg], 1)
        unmanaged = GaugeMetricFamily(
            "bpfkeep_policy_unmanaged",
            "1 for each cgroup the config matches whose policy was attached by hand "
            "(bpfkeep attach): the daemon leaves it alone",
            labels=["cgroup"],
        )
        for cg in snap.unmanaged:
            unmanaged.add_metric([cg], 1)
        yield from (
            attached,
            expected,
            unmanaged,
            bound,
            sockets,
            inherited,
            applied,
            failed,
            rewritten,
            sweep_kept,
            sweep_applied,
            sweep_failed,
        )

        yield GaugeMetricFamily(
            "bpfkeep_attached_policies", "Cgroups with a bpfkeep policy", value=len(snap.rows)
        )
        yield CounterMetricFamily(
            "bpfkeep_reconciles", "Reconcile passes of the daemon", value=snap.reconciles
        )
        yield CounterMetricFamily(
            "bpfkeep_reconcile_errors",
            "Errors the daemon met while keeping the policies attached: failed attach, "
            "update, detach or walk of the cgroup tree, and pins or links it had to restore",
            value=snap.reconcile_errors,
        )
        audit = GaugeMetricFamily(
            "bpfkeep_audit_sockets",
            "Established TCP sockets per attached cgroup, by keepalive timer state "
            "(inet_diag; sockets the policy has not reached show as off)",
            labels=["cgroup", "keepalive"],
        )
        for cg, (armed, total) in sorted((snap.coverage or {}).items()):
            audit.add_metric([cg, "armed"], armed)
            audit.add_metric([cg, "off"], total - armed)
        yield audit
        yield CounterMetricFamily(
            "bpfkeep_audit_errors", "Failed socket audits", value=snap.audit_errors
        )
        if snap.audit_cpu_seconds is not None:
            yield GaugeMetricFamily(
                "bpfkeep_audit_pass_cpu_seconds",
                "CPU time of the last periodic sweep and audit pass",
                value=snap.audit_cpu_seconds,
            )
        if snap.audit_every_seconds is not None:
            yield GaugeMetricFamily(
                "bpfkeep_audit_interval_seconds",
                "Seconds between periodic sweep and audit passes now: audit_interval, "
                "or 1000 times the last pass's CPU time when longer (a pass takes at "
                "most ~0.1 % of a CPU however many sockets the host has)",
                value=snap.audit_every_seconds,
            )


# -- workload labels -------------------------------------------------------------

WORKLOAD_LABELS = ("namespace", "pod", "container")
# Gauges whose per-namespace value is the largest of its cgroups', not the sum.
_MAX_PER_NAMESPACE = {"bpfkeep_policy_dead_peer_bound_seconds"}


def with_workload_labels(family, workloads: dict[str, dict[str, str]], mode: str):
    """A per-cgroup family with the workload labels added to its samples.

    Cardinality stays bounded: only cgroups with a policy have series, and a
    container's go with its cgroup.  ``mode``:

    - "container": namespace, pod and container labels on the samples of
      containers, those the runtime told (a plain cgroup's series keep
      their labels; a container outside Kubernetes gets only container);
    - "namespace": the series of Kubernetes containers are summed into one
      per namespace (cgroup, pod and container ""; the dead-peer bound is
      the namespace's largest).  A counter summed over containers falls
      when one goes away: Prometheus's rate() reads that as a reset;
    - "none": the family as it is.
    """
    if (
        mode == "none"
        or not workloads
        or not family.samples
        or "cgroup" not in family.samples[0].labels
    ):
        return family
    if mode == "container":
        # Each series keeps its cgroup label: nothing merges, and only the
        # samples of containers change.
        out = []
        for s in family.samples:
            w = workloads.get(s.labels["cgroup"])
            if w:
                extra = {k: w[k] for k in WORKLOAD_LABELS if w.get(k)}
                if extra:
                    s = s._replace(labels={**s.labels, **extra})
            out.append(s)
        family.samples = out
        return family
    merged: dict[tuple, list] = {}  # (name, labels) -> [first sample, labels, value]
    for s in family.samples:
        w = workloads.get(s.labels["cgroup"]) or {}
        labels = dict(s.labels)
        if w.get("namespace"):
            labels["cgroup"] = ""
            labels["namespace"] = w["namespace"]
        key = (s.name, tuple(sorted(labels.items())))
        hit = merged.get(key)
        if hit is None:
            merged[key] = [s, labels, s.value]
        elif family.name in _MAX_PER_NAMESPACE:
            hit[2] = max(hit[2], s.value)
        else:
            hit[2] += s.value
    family.samples = [s._replace(labels=labels, value=v) for s, labels, v in merged.values()]
    return family


# -- the text format --------------------------------------------------------------


def _escape_value(v: str) -> str:
    if "\\" in v or "\n" in v or '"' in v:
        return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return v


class _One:
    """A registry of one family, for generate_latest."""

    def __init__(self, family) -> None:
        self.family = family

    def collect(self) -> list:
        return [self.family]


_OM_SUFFIXES = ("_created", "_gsum", "_gcount")
# Names generate_latest writes as they are (anything else it escapes).
_PLAIN_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_PLAIN_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


def exposition(registry) -> bytes:
    """The registry's families in the text format (0.0.4), byte for byte as
    prometheus_client's generate_latest writes them (tests compare the
    two), in about half its time: a scrape of 1,000 cgroups writes ~20,000
    samples, and generate_latest checks and escapes every label name of
    every sample again.  Counters, gauges and info families are written
    here; anything else (or a timestamp, an exemplar) by generate_latest."""
    out: list[str] = []
    for metric in registry.collect():
        name, kind = metric.name, metric.type
        if kind == "counter":
            name += "_total"
        elif kind == "info":
            name, kind = name + "_info", "gauge"
        names, labels_used, special = {metric.name}, set(), False
        for smp in metric.samples:
            names.add(smp.name)
            labels_used.update(smp.labels)
            special = special or smp.timestamp is not None or smp.exemplar is not None
        if (
            special
            or kind not in ("counter", "gauge")
            or not all(_PLAIN_NAME.match(n) for n in names)
            or not all(_PLAIN_LABEL.match(k) and not k.startswith("__") for k in labels_used)
        ):
            out.append(generate_latest(_One(metric)).decode("utf-8"))
            continue
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
        extra: dict[str, list[str]] = {}  # OpenMetrics samples: families of their own
        for smp in metric.samples:
            if smp.labels:
                labels = ",".join(
                    f'{k}="{_escape_value(v)}"' for k, v in sorted(smp.labels.items())
                )
                line = f"{smp.name}{{{labels}}} {floatToGoString(smp.value)}\n"
            else:
                line = f"{smp.name} {floatToGoString(smp.value)}\n"
            for suffix in _OM_SUFFIXES:
                if smp.name == metric.name + suffix:
                    extra.setdefault(suffix, []).append(line)
                    break
            else:
                out.append(line)
        for suffix, lines in sorted(extra.items()):
            out.append(f"# HELP {metric.name}{suffix} {doc}\n# TYPE {metric.name}{suffix} gauge\n")
            out += lines
    return "".join(out).encode("utf-8")


# -- the HTTP endpoint ----------------------------------------------------------


@dataclasses.dataclass
class _Conn:
    sock: socket.socket
    last: float  # monotonic time of the last progress (accept, bytes in or out)
    inbuf: bytes = b""
    out: memoryview | None = None  # response left to send
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
        try:
            body, error = exposition(self.registry), None
        except Exception as e:  # a failing collector: say so, keep serving
            body, error = (
                b"",
                f"collecting metrics failed: {e}\n".encode("utf-8", "backslashreplace"),
            )
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
            if gzip_ok and len(body) > 1024:
                zipped = zipped or gzip.compress(body, compresslevel=1)
                out = zipped
                extra.append(("Content-Encoding", "gzip"))
            self._respond(
                c, "200 OK", out, content_type=CONTENT_TYPE_LATEST, extra=extra,
                head_only=head_only,
            )  # fmt: skip

    def _respond(
        self,
        c: _Conn,
        status: str,
        body: bytes,
        *,
        content_type: str = "text/plain; charset=utf-8",
        extra: list[tuple[str, str]] | None = None,
        head_only: bool = False,
    ) -> None:
        hdrs = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        hdrs += extra or []
        if c.close_after:
            hdrs.append(("Connection", "close"))
        head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs) + "\r\n"
        c.out = memoryview(head.encode("latin-1") + (b"" if head_only else body))
        self._sel.modify(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
        self._write(c)

    def _write(self, c: _Conn) -> None:
        if c.out is None:
            return
        try:
            n = c.sock.send(c.out)
        except BlockingIOError:
            return
        c.last = time.monotonic()
        c.out = c.out[n:]
        if len(c.out):
            return
        c.out = None
        if c.close_after:
            self._drop(c)
        else:
            self._sel.modify(c.sock, selectors.EVENT_READ, c)
