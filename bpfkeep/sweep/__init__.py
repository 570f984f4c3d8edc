"""The sweep of the TCP sockets that already exist: the engine (targets,
namespaces, the kernel's iterator), the work items, and the runs the
commands ask for."""
