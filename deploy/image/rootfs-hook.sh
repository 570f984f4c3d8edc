#!/bin/sh
# mmdebstrap --extract-hook for bpfkeep's image (scripts/build-image.sh):
# runs on the build host with the extracted root file system as $1.
#
# The image is made with --variant=extract: the packages bcc needs are
# unpacked, never configured, and no Essential set comes along (no shell,
# no coreutils, no perl): nothing in the image runs a maintainer script or
# a shell, and what bcc needs from the package scripts is done here.
set -eu
root=$1
apt_cfg=${MMDEBSTRAP_APT_CONFIG:?run me as an mmdebstrap hook}

# -- Kernel headers -----------------------------------------------------------
# bcc compiles bpfkeep's programs when the daemon first loads them, against
# a kernel header set.  The programs use UAPI types only, so Debian's own
# set works on any kernel (the daemon in this image was tested with
# Debian 12's 6.1 headers on a 6.18 node): it is baked in, and a node needs
# no headers of its own.  linux-headers-amd64 is only unpacked: installing
# it would pull gcc, binutils and perl (~220 MB) that bcc never runs.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
arch=$(dpkg --print-architecture)
deps() { APT_CONFIG=$apt_cfg apt-cache depends "$1" | awk -v re="$2" '$1 == "Depends:" && $2 ~ re {print $2; exit}'; }
flavour=$(deps "linux-headers-$arch" '^linux-headers-[0-9]')
common=$(deps "$flavour" '^linux-headers-[0-9].*-common$')
[ -n "$flavour" ] && [ -n "$common" ] || { echo "rootfs-hook: no linux-headers-$arch in the image's suite" >&2; exit 1; }
(cd "$work" && APT_CONFIG=$apt_cfg apt-get download -q=2 "$flavour" "$common")
mkdir "$work/x"
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/x"; done
# One tree, as bcc wants it (bpfkeep.kheaders would otherwise merge the
# -common and -FLAVOUR halves at run time into a writable cache), holding
# only the directories a compile of bpfkeep's programs reads: traced with
# strace, bcc opened 108 files (0.9 MB), all under include/linux,
# include/asm-generic, include/uapi, include/vdso, include/generated and
# arch/x86/include.  Those directories stay whole (37 MB of the set's
# 78 MB): the rest is other architectures, drivers' and subsystems'
# headers (dt-bindings, net, sound, drm, ...), build scripts and Makefiles.
src="$work/x/usr/src"
merged="$work/merged"
kernel_arch=$(ls "$src/$flavour/arch")  # x86 for amd64: the -FLAVOUR half has only its own
mkdir "$merged"
cp -a "$src/$common/." "$merged/"
cp -a "$src/$flavour/." "$merged/"
tree="$root/usr/src/$flavour"
mkdir -p "$tree/include" "$tree/arch/$kernel_arch"
for d in linux asm-generic uapi vdso generated; do
    mv "$merged/include/$d" "$tree/include/"
done
mv "$merged/arch/$kernel_arch/include" "$tree/arch/$kernel_arch/"

# -- What the package scripts would have done ---------------------------------
# The dynamic linker's cache: libbcc and LLVM live in the multiarch directory.
ldconfig -r "$root"
# Users for whoever looks (ps, the runtime): root and nobody.
[ -e "$root/etc/passwd" ] || printf 'root:x:0:0:root:/root:/nonexistent\nnobody:x:65534:65534:nobody:/nonexistent:/nonexistent\n' >"$root/etc/passwd"
[ -e "$root/etc/group" ] || printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
mkdir -p "$root/root" "$root/tmp" "$root/var/cache/bpfkeep" "$root/etc/bpfkeep"
chmod 1777 "$root/tmp"

# -- What the image does not need ---------------------------------------------
# Documentation, manual pages, translations; dpkg and apt's state (nothing
# is ever installed into this image: it is rebuilt).  The package list
# stays, for scanners and people: /usr/share/bpfkeep-image/packages.
mkdir -p "$root/usr/share/bpfkeep-image"
for deb in "$root"/var/cache/apt/archives/*.deb "$work"/*.deb; do
    [ -e "$deb" ] && dpkg-deb --show --showformat='${Package} ${Version}\n' "$deb"
done | sort -u >"$root/usr/share/bpfkeep-image/packages"
rm -rf "$root"/usr/share/doc "$root"/usr/share/man "$root"/usr/share/locale \
    "$root"/usr/share/info "$root"/usr/share/lintian "$root"/usr/share/gcc \
    "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/*
