"""bpfkeep's exceptions: one base, turned into one line and an exit code."""

from __future__ import annotations


class BpfkeepError(Exception):
    """A problem the user can fix; ``str()`` says what and how."""

    exit_code = 1


class UsageError(BpfkeepError):
    """Bad input: a value, a path, a config key."""

    exit_code = 2


class PermissionProblem(BpfkeepError):
    """Not allowed to load BPF or touch cgroups."""

    exit_code = 77  # EX_NOPERM


class EnvironmentProblem(BpfkeepError):
    """The host lacks something bpfkeep needs (bpffs, headers, cgroup2)."""

    exit_code = 69  # EX_UNAVAILABLE
