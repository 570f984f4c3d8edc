#!/usr/bin/env bash
# Set up a Debian/Ubuntu host for bpfkeep, idempotently: system packages,
# bpffs, and a venv (.venv) with bpfkeep installed.  Run as root.
#   scripts/setup.sh            everything the daemon and the tests need
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (it installs packages and mounts bpffs)" >&2
    exit 1
fi

arch=$(dpkg --print-architecture)
pkgs=(
    python3 python3-venv python3-pip python3-bpfcc   # bcc: Debian's, not PyPI's "bcc"
    "linux-headers-$arch"                            # bcc compiles against any header set
    iproute2 bpftool strace                          # ss/ip netns, kernel views, shim tests
    iptables                                         # tests/support/paths.py: NAT routers that forget
    gcc make libc6-dev                               # the preload shim, static test programs
    clang-format                                     # scripts/lint.sh: C formatting (.clang-format)
    ncat curl nginx-light                            # real client/server programs in tests
    libkeepalive0                                    # the peer the shim is compared with
    prometheus                                       # promtool + a real server for the tests
    systemd                                          # systemd-analyze verify of the unit
    qemu-system-x86 e2fsprogs busybox-static         # scripts/kernel-matrix.sh (Debian 12's 6.1)
    mmdebstrap podman runc                           # build-image.sh; tests/test_image.py, test_containers.py
    python3-yaml python3-kubernetes                  # tests/test_image.py: the manifests
)
# docker.io apart: its package would start the system's dockerd, which
# changes the host's firewall (iptables) and adds a docker0 bridge.  The
# tests start their own dockerd (--iptables=false --bridge=none) with
# private state; the system's stays off unless it was there before.
docker_pkgs=(docker.io)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! dpkg-query -W -f='${Status}' docker.io 2>/dev/null | grep -q "install ok installed"; then
    echo "setup.sh: installing ${docker_pkgs[*]} (its service left off)"
    apt-get update -qq
    made_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then  # invoke-rc.d and deb-systemd-invoke: start nothing
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT  # also if the install fails
        made_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${docker_pkgs[@]}" >/dev/null
    if [ -n "$made_policy" ]; then
        rm -f /usr/sbin/policy-rc.d
        trap - EXIT
    fi
    if [ -d /run/systemd/system ]; then
        systemctl disable --now docker.service docker.socket >/dev/null 2>&1 || true
    fi
fi

# bpffs: bpfkeep pins its programs and links there.
if ! awk '$2 == "/sys/fs/bpf" && $3 == "bpf" {found=1} END {exit !found}' /proc/mounts; then
    mount -t bpf bpf /sys/fs/bpf
fi

# The venv must come from the system interpreter: only it can import bcc.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q ".[dev,bench]"  # bench: matplotlib, for the charts and their test
# Reinstall our own package every time so the venv matches this checkout.
.venv/bin/pip install -q --no-deps --force-reinstall .
.venv/bin/python -c 'import bcc, pyroute2, prometheus_client, bpfkeep' 
# The kernel the matrix boots: Debian 12's linux-image-cloud-amd64, cached.
bash scripts/kernel-matrix.sh --fetch
# The container image's Debian root file system, cached for
# tests/test_image.py (which builds the image itself from it).
bash scripts/build-image.sh --rootfs-only
echo "setup.sh: ready (.venv/bin/bpfkeep)"
