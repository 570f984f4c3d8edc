"""The kernel's interfaces, each in one module: bpf() through libbpf, the
cgroup2 tree, inotify, inet_diag, /proc, capabilities and bpffs.  Nothing
here imports the rest of bpfkeep (only its errors): every layer above
calls down into these."""
