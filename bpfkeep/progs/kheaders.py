"""Kernel headers for bcc.

bcc compiles our C at load time and wants a kernel build tree.  Our programs
use UAPI types only (struct bpf_sock_ops, struct bpf_sockopt), so any
distro header set works, not just the running kernel's.  Debian splits a
set over ``/usr/src/linux-headers-V-FLAVOUR`` (generated, arch) and
``/usr/src/linux-headers-V-common`` (the rest); bcc needs them as one tree,
so we lay out a merged tree of symlinks once and point BCC_KERNEL_SOURCE
at it.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import shutil
import tempfile

from bpfkeep.errors import EnvironmentProblem

CACHE_DIR = "/var/cache/bpfkeep"

_ARCH_PKG = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "powerpc64le", "s390x": "s390x"}


@dataclasses.dataclass(frozen=True)
class HeaderSet:
    version: str  # "6.1.0-56"
    arch_dir: str  # /usr/src/linux-headers-6.1.0-56-amd64
    common_dir: str | None  # /usr/src/linux-headers-6.1.0-56-common


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


def find_header_sets(src: str = "/usr/src") -> list[HeaderSet]:
    """Distro header sets under ``src``, newest first."""
    try:
        names = os.listdir(src)
    except OSError:
        return []
    sets = []
    for name in names:
        m = re.fullmatch(r"linux-headers-(\d[\w.+~-]*?)-(?!common$)([\w]+)", name)
        if not m:
            continue
        arch_dir = os.path.join(src, name)
        if not os.path.isdir(os.path.join(arch_dir, "include")):
            continue
        common = os.path.join(src, f"linux-headers-{m.group(1)}-common")
        sets.append(HeaderSet(m.group(1), arch_dir, common if os.path.isdir(common) else None))
    sets.sort(key=lambda s: _version_key(s.version), reverse=True)
    return sets


def _is_complete(tree: str) -> bool:
    return os.path.isdir(os.path.join(tree, "include", "linux")) and os.path.isdir(
        os.path.join(tree, "arch")
    )


def running_kernel_tree(release: str | None = None) -> str | None:
    release = release or platform.release()
    build = f"/lib/modules/{release}/build"
    if _is_complete(build):
        return build
    source = f"/lib/modules/{release}/source"
    if os.path.isdir(build) and _is_complete(source):
        return build
    if os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return "kheaders"  # bcc unpacks IKHEADERS itself
    return None


def _symlink_tree(src: str, dst: str) -> None:
    """``cp -rs --remove-destination src/. dst/``"""
    for dirpath, _dirnames, filenames in os.walk(src, followlinks=True):
        rel = os.path.relpath(dirpath, src)
        out = os.path.join(dst, rel) if rel != "." else dst
        os.makedirs(out, exist_ok=True)
        for fn in filenames:
            target = os.path.join(out, fn)
            if os.path.lexists(target):
                os.unlink(target)
            os.symlink(os.path.join(dirpath, fn), target)


def merged_tree(hs: HeaderSet, cache_dir: str = CACHE_DIR) -> str:
    """A directory holding common + arch headers as one tree (built once)."""
    if hs.common_dir is None:
        return hs.arch_dir
    dest = os.path.join(cache_dir, "kernel-headers", os.path.basename(hs.arch_dir))
    if _is_complete(dest):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(dest))
    try:
        _symlink_tree(hs.common_dir, tmp)
        _symlink_tree(hs.arch_dir, tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not _is_complete(dest):  # lost a race with another bpfkeep
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def package_hint() -> str:
    arch = _ARCH_PKG.get(platform.machine(), "amd64")
    return f"apt-get install linux-headers-{arch} (or linux-headers-$(uname -r))"


def bcc_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the loader: BCC_KERNEL_SOURCE set when needed."""
    env = dict(os.environ if environ is None else environ)
    if env.get("BCC_KERNEL_SOURCE"):
        return env
    if running_kernel_tree():
        return env
    sets = find_header_sets()
    if not sets:
        raise EnvironmentProblem(
            "no kernel headers for bcc (the running kernel ships none): " + package_hint()
        )
    env["BCC_KERNEL_SOURCE"] = merged_tree(sets[0])
    return env
