"""What the tracing programs noted of setsockopt calls past the cgroup
hook (bpf/bypass.bpf.c), taken for repair, and the daemon's count of the
sockets it repaired, kept beside them in bpffs so that ``status`` and a
restarted daemon read it back."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable

from bpfkeep.kernel import bpfsys
from bpfkeep.kernel.ringbuf import RingBuffer
from bpfkeep.pins.attach import key_of
from bpfkeep.pins.pindir import PinDir
from bpfkeep.progs import loader, maps


def take_notes(pins: PinDir) -> list[maps.BypassNote]:
    """Every socket noted since the last call, removed from the map (a
    socket noted again meanwhile is noted anew: the programs insert once
    per socket until its note is gone)."""
    with pins.one(loader.MAP_BYPASS) as fd:
        if fd is None:
            return []
        items = bpfsys.map_items(fd, maps.BYPASS_KEY.size, maps.BYPASS.size)
        if not items:
            return []
        keys = [k for k, _ in items]
        try:
            bpfsys.map_delete_batch(fd, keys)
        except OSError:
            for k in keys:
                with contextlib.suppress(OSError):
                    bpfsys.map_delete(fd, k)
    return [maps.decode_bypass_note(k, v) for k, v in items]


def add_repaired(pins: PinDir, counts: dict[int, dict[str, int]]) -> None:
    """Add sockets repaired, per policy (cgroup id) and option.  Only the
    daemon writes the map (one daemon per pin directory)."""
    with pins.one(loader.MAP_REPAIRED) as fd:
        if fd is None:
            return
        for cg_id, by_option in counts.items():
            raw = bpfsys.map_lookup(fd, key_of(cg_id), maps.REPAIRED.size)
            now = maps.decode_enforce_counts(None, raw).repaired
            for opt, n in by_option.items():
                now[opt] = now.get(opt, 0) + n
            bpfsys.map_update(fd, key_of(cg_id), maps.encode_repaired(now))


def forget(pins: PinDir, live: Iterable[int]) -> None:
    """Drop the counts of policies no longer attached (their cgroup ids
    are never used again)."""
    alive = set(live)
    for name in (loader.MAP_BYPASSED, loader.MAP_REPAIRED):
        with pins.one(name) as fd:
            if fd is None:
                continue
            for k in bpfsys.map_keys(fd, 8):
                if int.from_bytes(k, sys.byteorder) not in alive:
                    with contextlib.suppress(OSError):
                        bpfsys.map_delete(fd, k)


def tracing(pins: PinDir) -> list[str]:
    """The tracing programs attached in this version's objects ("tcp",
    "sock", "mptcp"); none: only the periodic enforce pass repairs."""
    return loader.bypass_links(pins.obj_dir)


def bell_id(pins: PinDir) -> int | None:
    """The id of the bell pinned now (the healer may have loaded the
    programs again: a new map)."""
    with pins.one(loader.MAP_BYPASS_BELL) as fd:
        return None if fd is None else bpfsys.map_info(fd)[1]


def bell(pins: PinDir) -> RingBuffer | None:
    """The ring buffer the tracing programs ring at each new note, for the
    daemon's loop to wait on (None: not there)."""
    return pins.ring(loader.MAP_BYPASS_BELL)
