"""A client and a server host in their own network namespaces, joined
through a bridge in a third ("the network"), as tests/conftest.py's
NetnsPair: cutting the server takes its link down while the client's own
link stays up, as when a peer vanishes behind a NAT box or firewall, so
the client's probes and retransmissions leave and are lost.

Addresses are private to these namespaces (10.78.0.0/24); nothing leaves
them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid

from bench.common import which

CLIENT_IP, SERVER_IP = "10.78.0.1", "10.78.0.2"


class NetnsPair:
    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.client, self.server, self.net = f"bkbc-{tag}", f"bkbs-{tag}", f"bkbn-{tag}"
        self.client_if, self.server_if = f"vbc{tag}", f"vbs{tag}"
        self.ip = which("ip")
        self._made: list[str] = []
        try:
            self._setup()
        except BaseException:
            self.cleanup()
            raise

    def _setup(self) -> None:
        for ns in (self.client, self.server, self.net):
            self._ip("netns", "add", ns)
            self._made.append(ns)
            self._ip("-n", ns, "link", "set", "lo", "up")
        self._ip("-n", self.net, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self.net, "link", "set", "br0", "up")
        for ns, ifname, addr in (
            (self.client, self.client_if, CLIENT_IP),
            (self.server, self.server_if, SERVER_IP),
        ):
            port = "p" + ifname
            self._ip(
                "-n", self.net, "link", "add", port, "type", "veth", "peer", "name", ifname,
                "netns", ns,
            )  # fmt: skip
            self._ip("-n", self.net, "link", "set", port, "master", "br0", "up")
            self._ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
            self._ip("-n", ns, "link", "set", ifname, "up")

    def _ip(self, *args: str) -> None:
        subprocess.run([self.ip, *args], check=True, capture_output=True)

    def cut_server(self) -> None:
        """The server vanishes from the network: its link goes down."""
        self._ip("-n", self.server, "link", "set", self.server_if, "down")

    def cleanup(self) -> None:
        for ns in self._made:
            out = subprocess.run([self.ip, "netns", "pids", ns], capture_output=True, text=True)
            for pid in out.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run([self.ip, "netns", "del", ns], capture_output=True, check=False)
        self._made.clear()

    def __enter__(self) -> NetnsPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
