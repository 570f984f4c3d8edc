"""What is on the wire: every TCP socket's keepalive as the kernel shows it
(sockets), the values in force on the sockets under a policy (check), and
the ``bpfkeep audit`` command over both (command)."""
