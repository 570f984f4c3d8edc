"""Paths through middleboxes, made of network namespaces: a client, and
behind each of one or more routers a server namespace with a few
addresses.  A router masquerades the client and, given an idle limit,
forgets flows idle for longer -- dropping what it no longer knows (as
GCP's and Azure's NATs do: silence) or answering it with a RST (as AWS's
NAT gateway does).

Router i (1-based) joins the client at 10.8i.0.2 (the client is
10.8i.0.1) and its servers at 10.9i.0.1; the servers are 10.9i.0.2,
10.9i.0.3, ...  Everything is private to these namespaces and removed by
cleanup().

How a router forgets: conntrack's timeout for established TCP flows is
set in the router's namespace (the conntrack sysctls are per namespace),
with nf_conntrack_tcp_loose=0 so that a mid-stream packet of a forgotten
flow is INVALID, not picked up as a new flow; INVALID packets are dropped,
or answered with a RST first.  A keepalive probe (seq - 1, no data) passes
conntrack's window check, so probes keep a flow remembered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import uuid

DROP, RESET = "drop", "reset"


@dataclasses.dataclass
class Router:
    index: int  # 1-based
    ns: str
    server_ns: str
    idle_limit: int | None  # seconds; None: remembers for ever (a rack)
    answer: str  # DROP or RESET

    @property
    def client_side(self) -> str:
        """The router's address on the client's side."""
        return f"10.8{self.index}.0.2"

    @property
    def server_side(self) -> str:
        """The router's address on the servers' side: the client as its
        servers see it (the router masquerades)."""
        return f"10.9{self.index}.0.1"

    @property
    def network(self) -> str:
        """The servers' network behind this router."""
        return f"10.9{self.index}.0.0/24"

    def server(self, j: int = 0) -> str:
        """The address of server j (0-based) behind this router."""
        return f"10.9{self.index}.0.{2 + j}"


class Paths:
    """A client and, behind routers, servers (see the module's doc).

    ``routers``: one (idle limit or None, DROP or RESET) per router;
    ``servers``: addresses per server namespace."""

    def __init__(
        self, routers: list[tuple[int | None, str]], servers: int = 2, prefix: str = "bkp"
    ):
        if len(routers) > 9:
            raise ValueError("at most 9 routers")
        self.tag = uuid.uuid4().hex[:6]
        self.client = f"{prefix}c-{self.tag}"
        self.ip = shutil.which("ip") or "ip"
        self.routers: list[Router] = []
        self._made: list[str] = []
        try:
            self._add_ns(self.client)
            for i, (limit, answer) in enumerate(routers, start=1):
                self._router(i, limit, answer, servers)
        except BaseException:
            self.cleanup()
            raise

    # -- building ------------------------------------------------------------------

    def _add_ns(self, ns: str) -> None:
        self._run(self.ip, "netns", "add", ns)
        self._made.append(ns)
        self._run(self.ip, "-n", ns, "link", "set", "lo", "up")

    def _run(self, *argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True)

    def exec(self, ns: str, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.ip, "netns", "exec", ns, *argv], check=True, capture_output=True, text=True
        )

    def _router(self, i: int, limit: int | None, answer: str, servers: int) -> None:
        r = Router(i, f"bkr{i}-{self.tag}", f"bks{i}-{self.tag}", limit, answer)
        self._add_ns(r.ns)
        self._add_ns(r.server_ns)
        cif, sif = f"vc{i}{self.tag}", f"vs{i}{self.tag}"
        # client <-> router
        self._run(self.ip, "-n", self.client, "link", "add", cif, "type", "veth", "peer",
                  "name", "toclient", "netns", r.ns)  # fmt: skip
        self._run(self.ip, "-n", self.client, "addr", "add", f"10.8{i}.0.1/24", "dev", cif)
        self._run(self.ip, "-n", self.client, "link", "set", cif, "up")
        self._run(self.ip, "-n", r.ns, "addr", "add", f"{r.client_side}/24", "dev", "toclient")
        self._run(self.ip, "-n", r.ns, "link", "set", "toclient", "up")
        # router <-> servers
        self._run(self.ip, "-n", r.ns, "link", "add", "toservers", "type", "veth", "peer",
                  "name", sif, "netns", r.server_ns)  # fmt: skip
        self._run(self.ip, "-n", r.ns, "addr", "add", f"{r.server_side}/24", "dev", "toservers")
        self._run(self.ip, "-n", r.ns, "link", "set", "toservers", "up")
        for j in range(servers):
            self._run(self.ip, "-n", r.server_ns, "addr", "add", f"{r.server(j)}/24", "dev", sif)
        self._run(self.ip, "-n", r.server_ns, "link", "set", sif, "up")
        self._run(self.ip, "-n", self.client, "route", "add", r.network, "via", r.client_side)
        self.exec(r.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.exec(r.ns, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "toservers",
                  "-j", "MASQUERADE")  # fmt: skip
        self.routers.append(r)
        if limit is not None:
            self.forget_after(r, limit, answer)

    def forget_after(self, r: Router, limit: int, answer: str = DROP) -> None:
        """The router forgets flows idle ``limit`` seconds (from now on)."""
        self.exec(
            r.ns, "sysctl", "-qw", f"net.netfilter.nf_conntrack_tcp_timeout_established={limit}"
        )
        self.exec(r.ns, "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0")
        self.exec(r.ns, "iptables", "-F", "FORWARD")
        if answer == RESET:
            invalid = ("-m", "conntrack", "--ctstate", "INVALID")
            reject = ("-j", "REJECT", "--reject-with", "tcp-reset")
            self.exec(r.ns, "iptables", "-A", "FORWARD", "-p", "tcp", *invalid, *reject)
        self.exec(r.ns, "iptables", "-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID",
                  "-j", "DROP")  # fmt: skip
        r.idle_limit, r.answer = limit, answer

    def cut(self, r: Router) -> None:
        """The servers behind ``r`` vanish: their link goes down (the
        client's own link stays up: its packets leave and are lost)."""
        self._run(self.ip, "-n", r.server_ns, "link", "set", f"vs{r.index}{self.tag}", "down")

    # -- cleanup -------------------------------------------------------------------------

    def cleanup(self) -> None:
        for ns in reversed(self._made):
            out = subprocess.run([self.ip, "netns", "pids", ns], capture_output=True, text=True)
            for pid in out.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run([self.ip, "netns", "del", ns], capture_output=True, check=False)
        self._made.clear()

    def __enter__(self) -> Paths:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
