"""``bpfkeep daemon``: keep the config's policies attached to the right
cgroups, export metrics, and never leave a gap in enforcement.

- Start: adopt the attachments a previous daemon left in bpffs (they never
  stopped working), then reconcile: attach/update what the config wants,
  detach what it no longer wants (only attachments the daemon owns).
- New cgroups are seen through inotify on the directories that could hold
  a match, not by polling the tree.
- SIGHUP reloads; a bad config is logged and the old policies stay.
- SIGTERM leaves enforcement in place unless detach_on_exit is set.
- systemd: Type=notify, READY=1 after the first reconcile, STATUS=,
  WATCHDOG=1 when WatchdogSec= is set.

bcc never enters this process (the loader runs apart), so the daemon stays
small: ctypes + libbpf, prometheus_client, and a raw inet_diag socket for
the audit.

The rooms: ``loop`` (the Daemon: wiring and the main loop), ``state`` (the
one table of cgroups), ``scheduler`` (deadlines, retries), ``watch`` (the
cgroup walk), ``reconcile`` (attach/update/detach), ``workloads``
(containers), ``heal`` (restoring unpinned objects), ``passes`` (sweeps,
the periodic pass), ``systemd`` (notify, logging).
"""

from bpfkeep.daemon.loop import Daemon, main

__all__ = ["Daemon", "main"]
