"""systemd: sd_notify in a few lines with no dependency (a no-op outside
systemd), the watchdog's interval, and log lines journald turns into
priorities."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
import typing

log = logging.getLogger("bpfkeep")


def sd_notify(message: str, environ: dict[str, str] | None = None) -> bool:
    """Send a datagram to $NOTIFY_SOCKET; a no-op outside systemd."""
    env = os.environ if environ is None else environ
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError:
        return False


class Notifier:
    """sd_notify over one socket opened at start: a notification (above all
    WATCHDOG=1) must not need a new file descriptor, or a daemon out of
    descriptors would also be killed by its watchdog."""

    def __init__(self, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        self.raw = env.get("NOTIFY_SOCKET") or ""
        self.addr = "\0" + self.raw[1:] if self.raw.startswith("@") else self.raw
        self.sock: socket.socket | None = None
        if self.addr:
            with contextlib.suppress(OSError):
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def send(self, message: str) -> bool:
        if not self.addr:
            return False
        if self.sock is None:  # could not open one at start: try once more
            return sd_notify(message, {"NOTIFY_SOCKET": self.raw})
        try:
            self.sock.sendto(message.encode(), self.addr)
            return True
        except OSError:
            return False


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class JournalFormatter(logging.Formatter):
    """``<N>message`` lines that journald turns into priorities; plain
    timestamps when not under systemd."""

    PRIORITY: typing.ClassVar[dict[int, int]] = {
        logging.DEBUG: 7,
        logging.INFO: 6,
        logging.WARNING: 4,
        logging.ERROR: 3,
    }

    def __init__(self, journal: bool):
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if self.journal:
            return f"<{self.PRIORITY.get(record.levelno, 6)}>{msg}"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        return f"{stamp} bpfkeep[{os.getpid()}] {record.levelname.lower()}: {msg}"


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter(bool(os.environ.get("JOURNAL_STREAM"))))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
