"""A metric family whose every series belongs to one cgroup, written in the
text format straight from the cgroups' samples.

At 10,000 cgroups a scrape has ~330,000 samples.  Made the usual way, each
is a prometheus_client ``Sample`` with a label dict, copied once more for
the workload labels, and its label names checked, sorted and escaped again
by the writer: ~0.3 ms a cgroup, 3 s a scrape.  Here the label text
around a cgroup's sample values is laid out once per cgroup and family
(where the family's own labels fall among the cgroup's in sorted order is
worked out once per set of label names and kept between scrapes), and
each sample is one concatenation.

``samples`` is still there, made on demand by the old path (the
prometheus_client family, ``with_workload_labels``) for anything that reads
it -- ``registry.get_sample_value``, ``generate_latest`` -- and the tests
compare that path's ``generate_latest`` with ``text_format`` byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from bpfkeep.metrics.workloads import (
    MAX_PER_NAMESPACE,
    WORKLOAD_LABELS,
    with_workload_labels,
)

Samples = Iterable[tuple[tuple[str, ...], float]]  # (label values after cgroup, value)
Series = Callable[[], Iterator[tuple[str, Samples]]]  # (cgroup, its samples), in order

R = TypeVar("R")
KINDS: dict[type, str] = {CounterMetricFamily: "counter", GaugeMetricFamily: "gauge"}


def escape_value(v: str) -> str:
    """A label value as the text format writes it."""
    if v.isidentifier():  # most values here: "keepidle", "connect", "EINVAL"
        return v
    if "\\" in v or "\n" in v or '"' in v:
        return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return v


def go_float(v: float) -> str:
    """floatToGoString, with the common case first: a count below 10**6
    (from there Go, and so prometheus_client, writes an exponent)."""
    if type(v) is int and 0 <= v < 1_000_000:
        return f"{v}.0"
    return floatToGoString(v)


# How a family's series look for one set of label names (those of a
# cgroup's series, and the family's own): the text between the family's
# label values, as str.format strings over the cgroup's labels, and which
# of the family's label values goes after each.
_Layout = tuple[tuple[str, ...], tuple[int, ...]]


def _layout(sample_name: str, row_keys: tuple[str, ...], labels: tuple[str, ...]) -> _Layout:
    """``name{k="v",...} `` with the label names sorted (as generate_latest
    writes them), broken at each of the family's own labels."""
    pieces, order = [], []
    text = sample_name + "{{"
    for i, k in enumerate(sorted((*row_keys, *labels))):
        text += f'{"," if i else ""}{k}="'
        if k in row_keys:
            text += "{" + k + '}"'
        else:
            pieces.append(text)
            order.append(labels.index(k))
            text = '"'
    pieces.append(text + "}} ")
    return tuple(pieces), tuple(order)


def _write(out: list[str], layout: _Layout, row: dict[str, str], samples: Samples) -> None:
    """One cgroup's series of one family, as one string: an f-string a
    sample, the value inline when it is a count below 10**6 (go_float's
    common case)."""
    pieces, order = layout
    if not order:
        head = pieces[0].format_map(row)
        lines = [
            f"{head}{n}.0\n"
            if n.__class__ is int and 0 <= n < 1_000_000
            else f"{head}{go_float(n)}\n"
            for _, n in samples
        ]
    elif len(order) == 1:
        head, tail = pieces[0].format_map(row), pieces[1].format_map(row)
        lines = [
            f"{head}{escape_value(v)}{tail}{n}.0\n"
            if n.__class__ is int and 0 <= n < 1_000_000
            else f"{head}{escape_value(v)}{tail}{go_float(n)}\n"
            for (v,), n in samples
        ]
    else:
        chunks = [p.format_map(row) for p in pieces]
        lines = []
        for values, n in samples:
            parts = [chunks[0]]
            for i, piece in zip(order, chunks[1:], strict=True):
                parts += (escape_value(values[i]), piece)
            lines.append(f"{''.join(parts)}{go_float(n)}\n")
    out.append("".join(lines))


class CgroupLabels:
    """The workload labels of one scrape (see with_workload_labels), and the
    escaped label values of each cgroup's series, worked out once a scrape
    for all the families."""

    def __init__(self, workloads: dict[str, dict[str, str]], mode: str):
        self.workloads, self.mode = workloads, mode
        self._rows: dict[str, dict[str, str]] = {}
        self._keys: dict[tuple[str, ...], tuple[str, ...]] = {}

    def merged(self) -> bool:
        """Mode "namespace" with containers to sum: no series of its own
        for every cgroup."""
        return self.mode == "namespace" and bool(self.workloads)

    def of(self, cgroup: str) -> dict[str, str]:
        """Label name -> escaped value, sorted by name: ``cgroup`` and, in
        mode "container", the workload labels the runtime told."""
        row = self._rows.get(cgroup)
        if row is None:
            row = {"cgroup": escape_value(cgroup)}
            w = self.workloads.get(cgroup) if self.mode == "container" else None
            if w:
                row.update((k, escape_value(w[k])) for k in WORKLOAD_LABELS if w.get(k))
                row = dict(sorted(row.items()))
            self._rows[cgroup] = row
        return row

    def keys(self, row: dict[str, str]) -> tuple[str, ...]:
        """The label names of a row, as one shared tuple per set of names."""
        keys = tuple(row)
        return self._keys.setdefault(keys, keys)


class CgroupFamily(Metric):
    """A counter or gauge family with labels ``cgroup`` and ``labels``;
    ``series()`` gives each cgroup's samples, in the order they are written.
    Families made by a CgroupTable are written with the table's others."""

    def __init__(
        self,
        name: str,
        kind: type,  # CounterMetricFamily or GaugeMetricFamily
        documentation: str,
        labels: tuple[str, ...],
        series: Series,
        cgroups: CgroupLabels,
        table: CgroupTable | None = None,
    ):
        super().__init__(name, documentation, KINDS[kind])
        self._kind, self.labels, self._series, self._cgroups = kind, labels, series, cgroups
        self._table = table
        self._samples: list | None = None
        self.sample_name = name + "_total" if self.type == "counter" else name

    # -- prometheus_client's view: the old path -------------------------------------

    @property
    def samples(self) -> list:  # type: ignore[override]
        if self._samples is None:
            family = self._kind(self.name, self.documentation, labels=["cgroup", *self.labels])
            for cgroup, samples in self._series():
                for values, n in samples:
                    family.add_metric([cgroup, *values], n)
            cg = self._cgroups
            self._samples = with_workload_labels(family, cg.workloads, cg.mode).samples
        return self._samples

    @samples.setter
    def samples(self, value: list) -> None:
        # Metric.__init__ sets [] before there is anything: made on demand.
        self._samples = value or None

    # -- the text format, straight -------------------------------------------------------

    def header(self) -> str:
        doc = self.documentation.replace("\\", r"\\").replace("\n", r"\n")
        return f"# HELP {self.sample_name} {doc}\n# TYPE {self.sample_name} {self.type}\n"

    def text_format(self) -> str:
        """This family as generate_latest writes it, without a Sample."""
        if self._table is not None and not self._cgroups.merged():
            return self._table.text(self)
        out = [self.header()]
        layouts: dict[tuple[str, ...], _Layout] = {}
        cgroups = self._cgroups
        if cgroups.merged():
            series: Iterable[tuple[dict[str, str], Samples]] = self._per_namespace()
        else:
            series = ((cgroups.of(cgroup), samples) for cgroup, samples in self._series())
        for row, samples in series:
            keys = cgroups.keys(row)
            layout = layouts.get(keys)
            if layout is None:
                layout = layouts[keys] = _layout(self.sample_name, keys, self.labels)
            _write(out, layout, row, samples)
        return "".join(out)

    def _per_namespace(self) -> Iterator[tuple[dict[str, str], Samples]]:
        """Mode "namespace": the series of Kubernetes containers summed per
        namespace (cgroup ""; the largest for MAX_PER_NAMESPACE), in the
        order each first appears."""
        merged: dict[tuple, list] = {}  # (row labels, values) -> [row, values, value]
        biggest = self.name in MAX_PER_NAMESPACE
        workloads = self._cgroups.workloads
        for cgroup, samples in self._series():
            ns = (workloads.get(cgroup) or {}).get("namespace")
            if ns:
                row = {"cgroup": "", "namespace": escape_value(ns)}
            else:
                row = {"cgroup": escape_value(cgroup)}
            rkey = tuple(row.items())
            for values, n in samples:
                hit = merged.get((rkey, values))
                if hit is None:
                    merged[(rkey, values)] = [row, values, n]
                else:
                    hit[2] = max(hit[2], n) if biggest else hit[2] + n
        for row, values, n in merged.values():
            yield row, (((values, n),))


class CgroupTable(Generic[R]):
    """Families with series for the same rows (one cgroup each), written in
    one pass over the rows: a row's labels, and where each family's labels
    fall among them, are worked out once a row rather than once a row and
    family.  Each family's text is kept until asked for."""

    def __init__(
        self,
        rows: Sequence[R],
        cgroup: Callable[[R], str],
        cgroups: CgroupLabels,
        context: object = None,
    ):
        """``context``: passed to every family's ``samples(row, context)``."""
        self._rows, self._cgroup, self._cgroups = rows, cgroup, cgroups
        self._context = context
        self._families: list[tuple[CgroupFamily, Callable[[R, Any], Samples]]] = []
        self._texts: dict[int, str] | None = None

    def family(
        self,
        name: str,
        kind: type,
        documentation: str,
        labels: tuple[str, ...],
        samples: Callable[[R, Any], Samples],
    ) -> CgroupFamily:
        rows, cgroup, context = self._rows, self._cgroup, self._context

        def series() -> Iterator[tuple[str, Samples]]:
            return ((cgroup(row), samples(row, context)) for row in rows)

        fam = CgroupFamily(name, kind, documentation, labels, series, self._cgroups, self)
        self._families.append((fam, samples))
        return fam

    def text(self, family: CgroupFamily) -> str:
        if self._texts is None:
            self._texts = self._write_all()
        return self._texts.pop(id(family))

    def _write_all(self) -> dict[int, str]:
        fams = self._families
        outs: list[list[str]] = [[fam.header()] for fam, _ in fams]
        layouts: dict[tuple[str, ...], list[_Layout]] = {}
        cgroups, context = self._cgroups, self._context
        for row in self._rows:
            labels = cgroups.of(self._cgroup(row))
            keys = cgroups.keys(labels)
            lays = layouts.get(keys)
            if lays is None:
                lays = layouts[keys] = [_layout(f.sample_name, keys, f.labels) for f, _ in fams]
            for (_, samples), layout, out in zip(fams, lays, outs, strict=True):
                _write(out, layout, labels, samples(row, context))
        return {id(fam): "".join(out) for (fam, _), out in zip(fams, outs, strict=True)}
