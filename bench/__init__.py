"""bpfkeep's benchmark (``python -m bench``): connection cost, dead-peer
detection time and the daemon's footprint, measured on the real kernel."""
