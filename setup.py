"""Build hook: ship the BPF C sources and the compiled preload shim inside
the package (bpfkeep/_bpf, bpfkeep/_lib), so an installed bpfkeep needs no
source tree."""

import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildWithNative(build_py):
    def run(self):
        super().run()
        pkg = os.path.join(self.build_lib, "bpfkeep")
        bpf_out = os.path.join(pkg, "_bpf")
        # Exactly the checkout's sources: pip builds in ./build, which
        # keeps what an earlier build copied (a file since renamed or
        # removed would ship, and change the hash that names the pinned
        # programs, progs.header.source_version).
        shutil.rmtree(bpf_out, ignore_errors=True)
        os.makedirs(bpf_out)
        for name in os.listdir(os.path.join(HERE, "bpf")):
            if name.endswith((".c", ".h")):
                shutil.copy2(os.path.join(HERE, "bpf", name), bpf_out)
        subprocess.run(["make", "-C", os.path.join(HERE, "preload")], check=True)
        lib_out = os.path.join(pkg, "_lib")
        os.makedirs(lib_out, exist_ok=True)
        shutil.copy2(os.path.join(HERE, "preload", "libbpfkeep.so"), lib_out)


setup(cmdclass={"build_py": BuildWithNative})
