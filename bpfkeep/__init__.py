"""bpfkeep: TCP keepalive enforced in the kernel for whole cgroups."""

__version__ = "0.1.0"
