"""The Prometheus text format (0.0.4), written byte for byte as
prometheus_client's generate_latest writes it: the per-cgroup families
write themselves (metrics.family), the others are written here in about
half generate_latest's time."""

from __future__ import annotations

import re

from prometheus_client import generate_latest
from prometheus_client.utils import floatToGoString

from bpfkeep.metrics.family import escape_value


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
    two)."""
    return b"".join(exposition_parts(registry))


def exposition_parts(registry) -> list[bytes]:
    """exposition() in pieces that follow each other (a family or a few):
    at 10,000 cgroups the text is ~33 MB, and the server sends the pieces
    as they are rather than copy them into one.  The per-cgroup families
    write themselves (metrics.family); counters, gauges and info families
    are written here, in about half generate_latest's time (it checks and
    escapes every label name of every sample again); anything else (or a
    timestamp, an exemplar) by generate_latest."""
    parts: list[bytes] = []
    out: list[str] = []
    for metric in registry.collect():
        if hasattr(metric, "text_format"):  # a CgroupFamily: it writes itself
            if out:
                parts.append("".join(out).encode("utf-8"))
                out = []
            parts.append(metric.text_format().encode("utf-8"))
            continue
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
                labels = ",".join(f'{k}="{escape_value(v)}"' for k, v in sorted(smp.labels.items()))
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
    if out:
        parts.append("".join(out).encode("utf-8"))
    return parts
