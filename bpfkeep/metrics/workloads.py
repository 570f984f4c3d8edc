"""The workload labels (namespace, pod, container) on per-cgroup series."""

from __future__ import annotations

WORKLOAD_LABELS = ("namespace", "pod", "container")
# Gauges whose per-namespace value is the largest of its cgroups', not the sum.
MAX_PER_NAMESPACE = {
    "bpfkeep_policy_dead_peer_bound_seconds",
    "bpfkeep_peer_idle_limit_seconds",
    "bpfkeep_peer_keepidle_seconds",
}


def with_workload_labels(family, workloads: dict[str, dict[str, str]], mode: str):
    """A per-cgroup family with the workload labels added to its samples.

    Cardinality stays bounded: only cgroups with a policy have series, and a
    container's go with its cgroup.  ``mode``:

    - "container": namespace, pod and container labels on the samples of
      containers, those the runtime told (a plain cgroup's series keep
      their labels; a container outside Kubernetes gets only container);
    - "namespace": the series of Kubernetes containers are summed into one
      per namespace (cgroup, pod and container ""; the dead-peer bound and
      a path's idle limit and keepidle are the namespace's largest).  A
      counter summed over containers falls when one goes away:
      Prometheus's rate() reads that as a reset;
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
        elif family.name in MAX_PER_NAMESPACE:
            hit[2] = max(hit[2], s.value)
        else:
            hit[2] += s.value
    family.samples = [s._replace(labels=labels, value=v) for s, labels, v in merged.values()]
    return family
