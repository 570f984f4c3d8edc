#!/usr/bin/env bash
# A short demonstration on this host (as root): attach bpfkeep's default
# policy to a scratch cgroup, start a real client/server pair in it (Python
# sockets, which set no keepalive of their own), and read the result back from the
# kernel with ss.  Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
# A pin directory of its own, so the demo never touches real attachments.
pin=/sys/fs/bpf/bpfkeep-demo-$$
bk() { .venv/bin/bpfkeep --pin-dir "$pin" "$@"; }
cg2=$(awk '$3 == "cgroup2" {print $2; exit}' /proc/mounts)
cg="$cg2/bpfkeep-demo-$$"
port=$((20000 + $$ % 20000))
pids=()

cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    bk detach --all >/dev/null 2>&1 || true
    # Anything still in the cgroup goes too (cgroup.kill: Linux 5.14+), then
    # the cgroup, once its last process is reaped.
    [ -e "$cg/cgroup.kill" ] && echo 1 > "$cg/cgroup.kill" 2>/dev/null
    for _ in $(seq 50); do
        rmdir "$cg" 2>/dev/null && return 0
        [ -d "$cg" ] || return 0
        sleep 0.1
    done
    echo "demo.sh: could not remove $cg" >&2
}
trap cleanup EXIT

mkdir "$cg"
echo "== bpfkeep attach --cgroup ${cg#"$cg2"/}   (default policy: 15 s / 15 s x 9, user timeout 150 s)"
bk attach --cgroup "$cg"

echo "== a server and a client inside the cgroup, one more client outside it"
server='import socket, sys, time
l = socket.create_server(("127.0.0.1", int(sys.argv[1])))
conns = [l.accept()[0] for _ in range(2)]
time.sleep(30)'
client='import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
time.sleep(30)'
in_cgroup() { sh -c 'echo $$ > "$0/cgroup.procs"; exec "$@"' "$cg" "$@"; }
in_cgroup .venv/bin/python -c "$server" "$port" & pids+=($!)
sleep 0.5
in_cgroup .venv/bin/python -c "$client" "$port" & pids+=($!)
.venv/bin/python -c "$client" "$port" & pids+=($!)
sleep 1

echo "== ss -tno: connections on port $port (timer:(keepalive,...) = armed by bpfkeep)"
ss -tnoH state established "( sport = :$port or dport = :$port )" | awk '{print "  " $3, "->", $4, ($5 ~ /keepalive/ ? $5 : "(no keepalive timer)")}'
echo "  (the connection with no keepalive timer is the client outside the cgroup)"

echo "== bpfkeep status"
bk status
