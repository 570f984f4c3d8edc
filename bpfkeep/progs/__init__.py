"""bpfkeep's BPF objects: compiling and pinning them (loader, kheaders),
the shared header as userspace reads it (header), and the codecs of every
map value (maps)."""
