"""Healing: restore what was unpinned under the daemon.  Unpinning a link
(rm, or rm -rf of the whole pin directory) detaches it: the kernel frees a
bpf_link with its last reference, and nothing else would tell."""

from __future__ import annotations

import contextlib
import logging
import os
import time

from bpfkeep.daemon.reconcile import Reconciler
from bpfkeep.daemon.state import HAND, NONE, State
from bpfkeep.errors import BpfkeepError
from bpfkeep.kernel.inotify import PIN_MASK, Inotify
from bpfkeep.pins.pindir import HOOK_NAMES, fully_attached
from bpfkeep.progs import loader

log = logging.getLogger("bpfkeep")

HEAL_EVERY = 5.0  # seconds between checks that our pins and links are all there
HEAL_SETTLE = 0.5  # seconds after the last change under the pin directory
HEAL_COST_FACTOR = 500  # the next check waits at least this many times the last one's time


class Healer:
    def __init__(self, state: State, reconciler: Reconciler, inotify: Inotify):
        self.state = state
        self.reconciler = reconciler
        self.inotify = inotify
        self.cost = 0.0  # seconds of the last check
        self._objects_broken = False  # logged once until they are back

    def watch(self) -> None:
        """inotify on the pin directory: an unpinned link or object is
        noticed at once (the periodic check is the backstop)."""
        for d in self.reconciler.pin_dirs:
            with contextlib.suppress(OSError):
                self.inotify.watch(d, PIN_MASK)

    def every(self) -> float:
        """Cheap, and kept so: at most ~0.2 % of a CPU."""
        return max(HEAL_EVERY, HEAL_COST_FACTOR * self.cost)

    def check(self) -> None:
        t0 = time.monotonic()
        try:
            self._check()
        finally:
            self.cost = time.monotonic() - t0

    def _check(self) -> None:
        state, enforcer, table = self.state, self.state.enforcer, self.state.table
        missing = enforcer.objects_missing()
        ours = table.ours()
        if missing and len(missing) < len(loader.OBJECTS):
            # Attaching needs the whole set; the links keep what they hold.
            if not self._objects_broken:
                state.errors += 1
                log.error(
                    "pinned objects %s are missing under %s while others remain; the "
                    "attachments keep working, new ones fail until bpfkeep detach --all "
                    "and a restart",
                    ", ".join(missing),
                    enforcer.obj_dir,
                )
            self._objects_broken = True
            return
        self._objects_broken = False
        if missing and ours:
            state.errors += 1
            log.error("the pinned programs under %s are gone; loading them again", enforcer.obj_dir)
            try:
                enforcer.prepare()
            except (BpfkeepError, OSError) as e:
                self.reconciler.failed(None, "restoring the pinned programs", e)
                return
        pins = enforcer.link_pins()
        if ours and not os.path.isdir(enforcer.link_dir):
            try:  # rm -rf of the links directory alone
                os.makedirs(enforcer.link_dir, exist_ok=True)
            except OSError as e:
                self.reconciler.failed(None, f"recreating {enforcer.link_dir}", e)
                return
        for cg_id, e in ours.items():
            have = pins.get(cg_id, set())
            if fully_attached(have) or not os.path.isdir(e.cgroup.path):
                continue
            gone = sorted(set(HOOK_NAMES) - have)
            state.errors += 1
            log.error(
                "%s: link pin(s) %s removed under the daemon (its enforcement went with "
                "them); restoring",
                e.cgroup.display,
                ", ".join(gone),
            )
            if e.policy is not None and self.reconciler.attach(e.cgroup, e.policy, e.existing):
                log.info("%s: restored", e.cgroup.display)
        for cg_id, e in table.attached(HAND).items():
            if cg_id not in pins:  # the hand-made attachment was detached
                with table.lock:
                    e.attached = NONE
                self.reconciler.scan(e.cgroup.path)
        self.watch()
