#!/bin/bash
# PID 1 of the kernel-matrix guest (scripts/kernel-matrix.sh boots it with
# init=/kmatrix/init).  The root file system is an ext4 image of the host's
# userspace and the checkout with its venv, attached with snapshot=on: what
# we write here is thrown away.  There is no initramfs and no systemd.
#
# Protocol with the host: everything pytest prints goes to the second
# serial port (/dev/ttyS1, a file on the host); the last line there is
#   KMATRIX RESULT: PASS <kernel release> rc=0
# or FAIL with pytest's exit status.  No line at all means the guest died.
# The host passes its arguments in /kmatrix/env (REPO, PYTEST_ARGS).
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 CI=1

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
# Controllers for the tests' cgroups, as systemd would enable them.
echo "+pids +memory" >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null

out=/dev/ttyS1
stty -F "$out" raw -echo 2>/dev/null
say() { echo "$*" >"$out"; }
finish() {
    say "KMATRIX RESULT: $1 $(uname -r) rc=$2"
    sync
    busybox poweroff -f
    echo o >/proc/sysrq-trigger
    sleep 60
}

# shellcheck source=/dev/null
. /kmatrix/env || finish FAIL 99
# A tmpfs /tmp, unless the checkout itself is under /tmp (CI may clone
# there): the image's /tmp is written to a snapshot and thrown away anyway.
case "$REPO" in
/tmp/*) ;;
*) mount -t tmpfs tmpfs /tmp ;;
esac

# The kernel package's modules were copied in by the host; busybox's depmod
# and modprobe stand in for kmod, also for the kernel's own requests (e.g.
# tcp_diag when inet_diag is first asked for TCP sockets), as on a host.
busybox depmod
ln -s /bin/busybox /run/modprobe
echo /run/modprobe >/proc/sys/kernel/modprobe
# tests/support: NetnsPair (ip link add ... type veth|bridge) and the NAT
# routers of paths.py (iptables, nft backend: MASQUERADE, conntrack, REJECT).
for m in veth bridge nf_tables nft_compat nft_chain_nat nf_conntrack nf_nat \
    xt_conntrack xt_MASQUERADE nf_reject_ipv4 ipt_REJECT; do
    busybox modprobe "$m" || say "kmatrix: modprobe $m failed"
done
ip link set lo up
hostname kmatrix-guest

say "kmatrix: kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {print $2}' /proc/meminfo) kB"
cd /tmp || finish FAIL 98
# From /tmp, not the checkout, and with PYTHONSAFEPATH: pytest and every
# python the tests start import the installed package (tests/test_installed.py).
export PYTHONSAFEPATH=1
# shellcheck disable=SC2086
"$REPO/.venv/bin/pytest" -p no:cacheprovider --color=no --rootdir="$REPO" \
    -c "$REPO/pyproject.toml" $PYTEST_ARGS >"$out" 2>&1
rc=$?
if [ "$rc" = 0 ]; then finish PASS 0; else finish FAIL "$rc"; fi
