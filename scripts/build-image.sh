#!/usr/bin/env bash
# Build bpfkeep's container image from Debian packages alone: no registry,
# no base image.  Run as root on a Debian 12 host where apt works (the
# image's packages come from the host's own Debian sources).
#   scripts/build-image.sh                    build localhost/bpfkeep:VERSION
#   scripts/build-image.sh --tag NAME         another name
#   scripts/build-image.sh --save FILE        also write it as an archive for
#                                             `ctr -n k8s.io images import` /
#                                             `docker load` on the nodes
#   scripts/build-image.sh --rootfs-only      only make (or find) the cached
#                                             root file system (setup.sh)
#
# Two steps:
#  1. mmdebstrap --variant=extract unpacks python3-bpfcc and
#     python3-prometheus-client with their dependencies into a tarball, and
#     deploy/image/rootfs-hook.sh adds Debian's kernel headers and strips
#     what the image does not need.  Cached in $BPFKEEP_IMAGE_CACHE
#     (/var/cache/bpfkeep-image), keyed by everything that goes into it.
#  2. `podman build` of deploy/image/Containerfile: FROM scratch, that
#     tarball, and bpfkeep installed from this checkout (a wheel, built by
#     pip).  Only ADD/COPY: no container runs during the build.
# Environment: BPFKEEP_IMAGE_CACHE, BPFKEEP_IMAGE_SOURCES (an apt sources
# file for the image; default: the host's Debian sources).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
SUITE=bookworm
PACKAGES=python3-bpfcc,python3-prometheus-client
CACHE=${BPFKEEP_IMAGE_CACHE:-/var/cache/bpfkeep-image}
die() { echo "build-image: $*" >&2; exit 1; }

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$REPO/bpfkeep/__init__.py")
tag="localhost/bpfkeep:$version"
save="" rootfs_only=0
while [ $# -gt 0 ]; do
    case "$1" in
    --tag) tag=${2:?--tag NAME}; shift 2 ;;
    --save) save=${2:?--save FILE}; shift 2 ;;
    --rootfs-only) rootfs_only=1; shift ;;
    *) die "unknown argument $1 (see the top of $0)" ;;
    esac
done
[ "$(id -u)" = 0 ] || die "run as root (mmdebstrap unpacks as root; podman builds into root's storage)"
command -v mmdebstrap >/dev/null || die "mmdebstrap is missing: apt-get install mmdebstrap (scripts/setup.sh does)"

# -- 1. the root file system, cached -------------------------------------------
sources=${BPFKEEP_IMAGE_SOURCES:-}
if [ -z "$sources" ]; then
    for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
        if [ -s "$f" ]; then sources=$f; break; fi
    done
fi
[ -n "$sources" ] && [ -r "$sources" ] || die "no apt sources for the image: set BPFKEEP_IMAGE_SOURCES=FILE"
key=$( (echo "$SUITE $PACKAGES"; cat "$sources" "$REPO/deploy/image/rootfs-hook.sh" "$0") | sha256sum | cut -c1-16)
rootfs="$CACHE/rootfs-$key.tar"
if [ ! -s "$rootfs" ]; then
    mkdir -p "$CACHE"
    echo "build-image: making the root file system (Debian $SUITE: $PACKAGES) from $sources"
    log="$CACHE/rootfs-$key.log"
    # The host's apt may not check Release files' dates (a mirror that
    # serves a dated snapshot does not renew them): the same goes for the
    # image's.  Signatures are checked as always.
    if ! mmdebstrap --variant=extract --format=tar --include="$PACKAGES" \
        --aptopt='Acquire::Check-Valid-Until "false"' \
        --extract-hook="$REPO/deploy/image/rootfs-hook.sh" \
        "$SUITE" "$rootfs.tmp" "$sources" >"$log" 2>&1; then
        rm -f "$rootfs.tmp"
        tail -20 "$log" >&2
        die "mmdebstrap failed (full log: $log)"
    fi
    mv "$rootfs.tmp" "$rootfs"
    find "$CACHE" -maxdepth 1 -name 'rootfs-*' ! -name "rootfs-$key.*" -delete  # older keys
fi
echo "build-image: root file system $rootfs ($(du -m "$rootfs" | cut -f1) MB)"
[ "$rootfs_only" = 0 ] || exit 0

# -- 2. the image ---------------------------------------------------------------
command -v podman >/dev/null || die "podman is missing: apt-get install podman (scripts/setup.sh does)"
pip="$REPO/.venv/bin/pip"
[ -x "$pip" ] || die "no $pip: run scripts/setup.sh first"
ctx=$(mktemp -d /var/tmp/bpfkeep-image.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
ln "$rootfs" "$ctx/rootfs.tar" 2>/dev/null || cp "$rootfs" "$ctx/rootfs.tar"
# bpfkeep: pure Python plus libbpfkeep.so, so one directory serves any
# Python 3 of the image.  pip builds the wheel from this checkout.
site="$ctx/bpfkeep/usr/lib/python3/dist-packages"
"$pip" install -q --no-deps --no-compile --target "$site" "$REPO"
rm -rf "$site/bin"
mkdir -p "$ctx/bpfkeep/usr/local/bin"
printf '#!/usr/bin/python3\nfrom bpfkeep.cli import entry\n\nentry()\n' >"$ctx/bpfkeep/usr/local/bin/bpfkeep"
chmod 0755 "$ctx/bpfkeep/usr/local/bin/bpfkeep"
podman build -q --pull=never --layers=false -f "$REPO/deploy/image/Containerfile" -t "$tag" "$ctx" >/dev/null
size=$(podman image inspect --format '{{.Size}}' "$tag")
echo "build-image: built $tag ($((size / 1000000)) MB)"
if [ -n "$save" ]; then
    podman save -q --format docker-archive -o "$save" "$tag"
    echo "build-image: saved $tag to $save"
fi
