#!/usr/bin/env bash
# Run the kernel tests on Debian 12's stock kernel (linux-image-cloud-amd64,
# 6.1) booted in QEMU, besides the kernel this host runs.  Run as root, after
# scripts/setup.sh (the venv must hold the installed package).
#
#   scripts/kernel-matrix.sh                 the whole suite, as CI runs it
#   scripts/kernel-matrix.sh tests/test_x.py pytest arguments of your own
#   scripts/kernel-matrix.sh --fetch         only download the kernel (setup.sh)
#
# How: no KVM is needed (TCG).  The cloud kernel has no 9p and Debian 12 has
# no virtiofsd, but NVMe and ext4 are built in, so the guest's root is an
# ext4 image of this host's userspace (/usr, /etc), the checkout with its
# venv and bpfkeep's header cache, booted without an initramfs and attached
# with snapshot=on so the guest's writes are thrown away.  The kernel
# package's modules are copied in; busybox stands in for kmod.  The guest's
# PID 1 is scripts/qemu/guest-init.sh: it runs pytest from outside the
# checkout and writes its output to a second serial port, ending with
#   KMATRIX RESULT: PASS|FAIL <release> rc=N
# Exit status: pytest's in the guest; 3 when the guest gave no result.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)

# CI runs the whole suite there (tests/): under TCG it takes ~27 min on a
# 2-CPU host, inside the 50 min we allow the matrix.  To run less, pass
# pytest arguments, e.g. the core kernel tests in ~2.5 min:
#   tests/test_enforcer.py tests/test_sweep.py tests/test_installed.py \
#   tests/test_daemon.py::test_kill9_restart_adopts_without_gap_or_duplicates
PACKAGE=${KMATRIX_KERNEL_PACKAGE:-linux-image-cloud-amd64}
CACHE=${KMATRIX_CACHE:-/var/cache/bpfkeep-kmatrix}
SMP=${KMATRIX_SMP:-2}
MEM=${KMATRIX_MEM:-3G}
TIMEOUT=${KMATRIX_TIMEOUT:-3000}  # seconds for the whole guest run

die() { echo "kernel-matrix: $*" >&2; exit 3; }
[ "$(id -u)" = 0 ] || die "run as root (it mounts in a private namespace and loads BPF in the guest)"
fetch_only=0
if [ "${1:-}" = --fetch ]; then fetch_only=1; shift; fi

# -- the kernel: Debian's own package, fetched from the archive -----------
mkdir -p "$CACHE"
image_pkg=$(apt-cache depends "$PACKAGE" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$image_pkg" ] || die "apt-cache knows no $PACKAGE: run apt-get update"
release=${image_pkg#linux-image-}
deb=$(ls "$CACHE"/"${image_pkg}"_*.deb 2>/dev/null | tail -1 || true)
if [ -z "$deb" ]; then
    (cd "$CACHE" && apt-get download -q "$image_pkg" 2>&1 | grep -v "^W: Download is performed unsandboxed") || true
    deb=$(ls "$CACHE"/"${image_pkg}"_*.deb 2>/dev/null | tail -1 || true)
    [ -n "$deb" ] || die "apt-get download $image_pkg failed"
fi
kdir="$CACHE/$release"
if [ ! -f "$kdir/boot/vmlinuz-$release" ]; then
    rm -rf "$kdir.tmp" && dpkg-deb -x "$deb" "$kdir.tmp" && mv "$kdir.tmp" "$kdir"
fi
echo "kernel-matrix: $(basename "$deb")"
[ "$fetch_only" = 0 ] || exit 0
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing: run scripts/setup.sh"
command -v busybox >/dev/null || die "busybox missing: run scripts/setup.sh"
[ -x "$REPO/.venv/bin/bpfkeep" ] || die "$REPO/.venv/bin/bpfkeep missing: run scripts/setup.sh"

# -- the root image -------------------------------------------------------
work=$(mktemp -d /var/tmp/kmatrix.XXXXXX)
trap 'rm -rf "$work"' EXIT
stage="$work/root"
img="$work/root.ext4"
mkdir -p "$stage"/{kmatrix,dev,proc,sys,run,tmp,root,var/tmp,var/cache,etc,usr}
for l in bin lib lib64 sbin; do [ -L "/$l" ] && ln -s "usr/$l" "$stage/$l"; done
ln -s /run "$stage/var/run"
cp "$REPO/scripts/qemu/guest-init.sh" "$stage/kmatrix/init"
chmod 755 "$stage/kmatrix/init"
if [ $# -eq 0 ]; then set -- "$REPO/tests"; fi
args=()
for a in "$@"; do  # the guest runs pytest from /tmp: make test paths absolute
    if [ -e "${a%%::*}" ]; then a="$(cd "$(dirname "${a%%::*}")" && pwd)/$(basename "$a")"; fi
    args+=("$a")
done
set -- "${args[@]}"
{
    printf 'REPO=%q\n' "$REPO"
    printf 'PYTEST_ARGS=%q\n' "-q -rfEs $*"
} >"$stage/kmatrix/env"
mkdir -p "$stage$REPO"

# Big trees no test reads, hidden to keep the image (and mkfs) small.
skip=(/usr/share/doc /usr/share/man /usr/share/info /usr/share/locale /usr/lib/jvm
      /usr/lib/google-cloud-sdk /usr/local/cuda /usr/share/javascript /usr/share/icons)
for d in /usr/local/cuda-*; do [ -d "$d" ] && skip+=("$d"); done

size_mb=$(( $(du -smx /usr /etc "$REPO" 2>/dev/null | awk '{s += $1} END {print s}') + 1500 ))
truncate -s "${size_mb}M" "$img"
t0=$(date +%s)
# A private mount namespace: the bind mounts vanish with it.
unshare -m bash -euo pipefail -c '
    stage=$1 repo=$2 kdir=$3 release=$4 img=$5; shift 5
    mount --make-rprivate /
    mount --bind /usr "$stage/usr"
    mount --bind /etc "$stage/etc"
    mount --bind "$repo" "$stage$repo"
    for d in "$@"; do [ -d "$d" ] && [ ! -L "$d" ] && mount -t tmpfs -o size=1m none "$stage$d"; done
    mount -t tmpfs none "$stage/usr/lib/modules"
    cp -a "$kdir/lib/modules/$release" "$stage/usr/lib/modules/"
    [ -d /var/cache/bpfkeep ] && cp -a /var/cache/bpfkeep "$stage/var/cache/"
    mkfs.ext4 -q -F -L kmatrix -E lazy_itable_init=1 -d "$stage" "$img"
' kmatrix "$stage" "$REPO" "$kdir" "$release" "$img" "${skip[@]}"
echo "kernel-matrix: root image ${size_mb} MB built in $(( $(date +%s) - t0 )) s"

# -- boot -----------------------------------------------------------------
console="$work/console.log"
result="$work/result.log"
t0=$(date +%s)
set +e
timeout --foreground -k 10 "$TIMEOUT" qemu-system-x86_64 \
    -machine q35 -accel tcg,thread=multi -cpu max -smp "$SMP" -m "$MEM" \
    -display none -no-reboot -nic none \
    -kernel "$kdir/boot/vmlinuz-$release" \
    -append "root=/dev/nvme0n1 rw rootfstype=ext4 init=/kmatrix/init console=ttyS0 panic=-1 loglevel=4" \
    -drive "file=$img,if=none,id=root,format=raw,snapshot=on" \
    -device nvme,drive=root,serial=kmatrix \
    -serial "file:$console" -serial "file:$result" \
    </dev/null
qemu_rc=$?
set -e
elapsed=$(( $(date +%s) - t0 ))
tr -d '\r' <"$result" >"$result.txt" || true

verdict=$(grep -a '^KMATRIX RESULT: ' "$result.txt" | tail -1 || true)
# pytest's summary for CI logs: skips with their reasons, failures, totals.
grep -a -E '^(kmatrix:|SKIPPED|FAILED|ERROR|(=+ )?[0-9]+ [a-z]+.* in [0-9.]+s)' "$result.txt" || true
if [ -z "$verdict" ]; then
    echo "kernel-matrix: no result from the guest (qemu exit $qemu_rc after ${elapsed} s); its console:"
    tail -n 60 "$console"
    echo "kernel-matrix: its test output:"
    tail -n 60 "$result.txt"
    exit 3
fi
echo "kernel-matrix: guest ran ${elapsed} s"
case "$verdict" in
    *" $release rc="*) ;;
    *) echo "kernel-matrix: the guest ran another kernel than $release: $verdict"; exit 3 ;;
esac
case "$verdict" in
    "KMATRIX RESULT: PASS "*) echo "$verdict"; exit 0 ;;
    *)
        echo "kernel-matrix: full pytest output of the guest:"
        grep -av '^KMATRIX RESULT: ' "$result.txt"
        echo "$verdict"
        rc=${verdict##*rc=}
        exit "${rc:-1}"
        ;;
esac
